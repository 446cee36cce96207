"""Actor health as the driver sees it: which actors answer, and which came back restarted.

Every actor has a cheap `health()` that returns its pid. The driver pings each actor
every `every_s` without waiting. The engines answer in a concurrency group of their own
(`health`), so a call of 32k-token answers running for minutes does not hold the ping; the
learner ranks answer between their steps, so for them a pending ping counts as alive however
old (their death ends the run through `LearnerGroup.check`). Any other actor is alive while its
last answer is younger than `grace_s` or its pending ping is. A restart is counted once per outage: a ping
that fails (the actor died or is restarting) after one that answered, or a new pid behind
the same handle; a short run can end before a restarted engine answers again, so waiting
for the new pid alone missed restarts. Groups in `no_restarts` (the learner ranks, which Ray
does not restart) count nothing: their death ends the run. The figures go to the
metrics log as `driver/alive/<group>`, `driver/total/<group>`, `driver/restarts/<group>`, when they
change and once a minute (every 2 s they were 90% of a day's metrics log).
It runs in a thread of the driver, beside the loop, so no phase has to remember to ask.
"""

from __future__ import annotations

import threading
import time

import ray


class Health:
    def __init__(self, groups: dict[str, list], log, every_s: float = 2.0, grace_s: float = 60.0, no_restarts=()):
        self.groups, self.log, self.every_s, self.grace_s = groups, log, every_s, grace_s
        self.no_restarts = set(no_restarts)
        self.down: set[tuple[str, int]] = set()  # failed their last ping after answering once: restart counted
        now = time.time()
        self.last_ok = {(g, i): now for g, actors in groups.items() for i in range(len(actors))}
        self.pids: dict[tuple[str, int], int] = {}
        self.restarts = {g: 0 for g in groups}
        self.pending: dict = {}  # ref -> (group, index, sent at)
        self.last_report = 0.0
        self.logged: dict[str, tuple[int, float]] = {}  # name -> (value, when) last logged
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="actor-health", daemon=True)

    def start(self) -> "Health":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.wait(0.5):
            try:
                self.poll()
            except Exception:  # noqa: BLE001 - Ray shutting down under us
                return

    def poll(self) -> None:
        now = time.time()
        if self.pending:
            done, _ = ray.wait(list(self.pending), num_returns=len(self.pending), timeout=0)
            for ref in done:
                key = self.pending.pop(ref)[:2]
                try:
                    pid = ray.get(ref)["pid"]
                except ray.exceptions.RayError:  # dead or restarting: no answer, last_ok ages
                    if key in self.pids and key not in self.down and key[0] not in self.no_restarts:
                        self.down.add(key)
                        self.restarts[key[0]] += 1
                    continue
                if key in self.down:
                    self.down.discard(key)  # back: this outage is counted already
                elif key in self.pids and self.pids[key] != pid and key[0] not in self.no_restarts:
                    self.restarts[key[0]] += 1
                self.pids[key], self.last_ok[key] = pid, now
        if now - self.last_report < self.every_s:
            return
        self.last_report = now
        waiting = {(g, i): sent for g, i, sent in self.pending.values()}
        for g, actors in self.groups.items():
            for i, actor in enumerate(actors):
                if (g, i) not in waiting:
                    self.pending[actor.health.remote()] = (g, i, now)
            busy_ok = g in self.no_restarts  # a learner rank's ping waits for its step: pending is alive
            alive = sum(
                1
                for i in range(len(actors))
                if now - self.last_ok[(g, i)] < self.grace_s
                or ((g, i) in waiting and (busy_ok or now - waiting[(g, i)] < self.grace_s))
            )
            for name, value in (
                (f"alive/{g}", alive),
                (f"total/{g}", len(actors)),
                (f"restarts/{g}", self.restarts[g]),
            ):
                self._log(name, value, now)

    def _log(self, name: str, value: int, now: float) -> None:
        last = self.logged.get(name)
        if last is None or last[0] != value or now - last[1] >= 60.0:
            self.log.log("driver", name, value)
            self.logged[name] = (value, now)
