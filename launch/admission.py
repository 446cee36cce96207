"""Admission control for asynchronous OPD: which prompts go to which engine, and which samples make each step.

Every admitted prompt is given the step that will train its samples (its *target step*), in
admission order, `prompts_per_step` per step, and a step's batch is exactly the samples with
that target: the slow, long-answer samples are waited for, never overtaken and dropped, so
nothing biases the batch towards short answers. Prompts are admitted at most `window` steps
ahead of the step being trained, `window = max_staleness * sync_every + 1` (1 when
synchronous): a sample admitted at step s is trained by step s + window - 1, which holds at
most `max_staleness` version bumps, and a generation call first waits in its engine for the
version pushed last before it (`RolloutActor.generate(min_version=...)`: updates run in a
concurrency group of their own and could otherwise switch in after the call started), so
the hard bound holds by construction. Calls are sized so the window
spreads over every engine (at most `rollout_batch` prompts per call, two calls queued per
engine), and each engine's busy time is measured, so the report can show that all work.

Pure bookkeeping, no Ray: the driver asks `next_call`, reports `submitted` / `finished` /
`failed`, and asks `ready(step)` for the ids to train. Every sample id is accounted for:
trained, or dropped with a reason.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass, field

MAX_REFILLS = 4  # an engine restarted unseen, or every sample stale, empties a step now and then; 5 in a row is stuck


@dataclass
class Call:
    engine: int
    sample_ids: list[int]
    targets: list[int]  # target step of each sample
    started: float = field(default_factory=time.monotonic)
    source: object = None  # the generation the call scores (the driver's: which engine to blame if it hangs)


class Admission:
    def __init__(
        self,
        prompts_per_step: int,
        samples_per_prompt: int,
        window: int,
        engines: int,
        rollout_batch: int,
        start_step: int = 0,
        end_step: int | None = None,
        per_engine_queue: int = 2,
    ):
        if engines < 1:
            raise ValueError("admission needs at least one rollout engine")
        self.pps, self.spp, self.window, self.engines = prompts_per_step, samples_per_prompt, window, engines
        self.queue = per_engine_queue
        # the whole window over every engine, at most rollout_batch prompts a call
        self.call_prompts = max(1, min(rollout_batch, math.ceil(prompts_per_step * window / engines)))
        self.quota: dict[int, int] = {}  # target step -> prompts still to admit for it
        self.expected: dict[int, list[int]] = {}  # target step -> sample ids admitted for it
        self.pending: set[int] = set()  # sample ids admitted, not yet back from their call
        self.calls: dict[object, Call] = {}  # call handle -> call
        self.dropped: Counter = Counter()  # reason -> samples
        self.refills: Counter = Counter()  # step -> times it was admitted again, nothing of it trained
        self.trained = 0
        self.admitted = 0
        self.busy_s = [0.0] * engines
        self.busy_since: list[float | None] = [None] * engines
        self.load = [0] * engines
        self.calls_per_engine = [0] * engines
        self.start, self.end = start_step, end_step  # nothing is admitted for steps at or after end_step
        self.t0 = time.monotonic()

    # ---- admitting ------------------------------------------------------------------------------

    def _open(self, step: int) -> list[tuple[int, int]]:
        """(target step, prompts still to admit) for the steps of the window, oldest first."""
        out = []
        for t in range(step, step + self.window if self.end is None else min(step + self.window, self.end)):
            self.quota.setdefault(t, self.pps)
            if self.quota[t] > 0:
                out.append((t, self.quota[t]))
        return out

    def next_call(self, step: int, usable=lambda i: True) -> tuple[int, int] | None:
        """(engine, prompts) for the next generation call, or None while the window or the engines are full."""
        room = self._open(step)
        if not room:
            return None
        free = [i for i in range(self.engines) if self.load[i] < self.queue and usable(i)]
        if not free:
            return None
        engine = min(free, key=lambda i: (self.load[i], self.busy_s[i]))
        return engine, min(self.call_prompts, sum(n for _, n in room))

    def sample_ids(self, prompt_positions: list[int]) -> list[int]:
        """The ids of the samples of these prompts (stream positions): samples_per_prompt each."""
        return [p * self.spp + k for p in prompt_positions for k in range(self.spp)]

    def submitted(self, handle, engine: int, step: int, prompt_positions: list[int], source=None) -> list[int]:
        """Record a call of these prompts (stream positions) on `engine`; returns its sample ids."""
        ids, targets = [], []
        for p in prompt_positions:
            t = next(t for t, n in self._open(step) if n > 0)
            self.quota[t] -= 1
            for sid in self.sample_ids([p]):
                ids.append(sid)
                targets.append(t)
                self.expected.setdefault(t, []).append(sid)
        self.pending.update(ids)
        self.calls[handle] = Call(engine, ids, targets, source=source)
        self.admitted += len(ids)
        if self.load[engine] == 0:
            self.busy_since[engine] = time.monotonic()
        self.load[engine] += 1
        self.calls_per_engine[engine] += 1
        return ids

    def _release(self, handle) -> Call:
        call = self.calls.pop(handle)
        self.pending.difference_update(call.sample_ids)
        self.load[call.engine] -= 1
        if self.load[call.engine] == 0 and self.busy_since[call.engine] is not None:
            self.busy_s[call.engine] += time.monotonic() - self.busy_since[call.engine]
            self.busy_since[call.engine] = None
        return call

    def finished(self, handle) -> Call:
        """The call returned and its samples are on the learner's socket."""
        return self._release(handle)

    def failed(self, handle, reason: str) -> Call:
        """The call's samples will never arrive (a dead engine, backpressure): dropped and counted."""
        call = self._release(handle)
        lost = set(call.sample_ids)
        for t in set(call.targets):
            self.expected[t] = [s for s in self.expected.get(t, []) if s not in lost]
        self.dropped[reason] += len(lost)
        return call

    # ---- training ---------------------------------------------------------------------------------

    def ready(self, step: int) -> list[int] | None:
        """The sample ids of step `step`'s batch once all of them are back, else None."""
        if self.quota.get(step, self.pps) > 0:
            return None
        ids = self.expected.get(step, [])
        if any(s in self.pending for s in ids):
            return None
        return ids

    def trained_step(self, step: int, report: dict) -> None:
        """Account for what the learner did with step `step`'s samples (its inbox report)."""
        self.expected.pop(step, None)
        self.quota.pop(step, None)
        self.trained += len(report["trained"])
        for reason in ("stale", "unsynced", "missing"):
            if report[reason]:
                self.dropped[reason] += len(report[reason])

    def refill(self, step: int, report: dict | None = None) -> None:
        """Nothing of step `step` could be trained (its inbox `report` says why): admit a full step's prompts for it
        again, up to MAX_REFILLS times. A step that never trains (a stuck inbox: every call backpressured, every
        sample missing) would otherwise be admitted again forever, at a generation's cost each time."""
        self.refills[step] += 1
        if self.refills[step] > MAX_REFILLS:
            why = ", ".join(f"{len(report[k])} {k}" for k in ("stale", "unsynced", "missing") if (report or {}).get(k))
            raise RuntimeError(
                f"OPD step {step + 1}: none of its samples could be trained, {self.refills[step]} times in a row "
                f"(last: {why or 'no sample came back'}; dropped so far: {dict(self.dropped)}). The learner's "
                "inbox is not receiving (see its stats) or the engines serve no usable weights; the last "
                "checkpoint resumes the run"
            )
        self.expected.pop(step, None)
        self.quota[step] = self.pps

    def overdue(self, timeout_s: float) -> list:
        """Handles of the calls running for longer than `timeout_s`."""
        now = time.monotonic()
        return [h for h, c in self.calls.items() if now - c.started > timeout_s]

    def waiting(self) -> int:
        """Samples back from their calls and not yet trained (the learner inbox's queue)."""
        return sum(len(ids) for ids in self.expected.values()) - len(self.pending)

    def outstanding(self) -> list[int]:
        """Ids admitted and not yet trained or dropped (what is left when the phase ends)."""
        return sorted({s for ids in self.expected.values() for s in ids})

    def utilisation(self) -> list[float]:
        now, span = time.monotonic(), max(time.monotonic() - self.t0, 1e-9)
        return [(b + (now - s if s is not None else 0.0)) / span for b, s in zip(self.busy_s, self.busy_since)]

    def summary(self) -> dict:
        dropped = sum(self.dropped.values())
        return {
            "admitted": self.admitted,
            "trained": self.trained,
            "dropped": dict(self.dropped),
            "drop_share": dropped / max(self.admitted, 1),
            "engine_utilisation": self.utilisation(),
            "engine_calls": list(self.calls_per_engine),
            "call_prompts": self.call_prompts,
            "window_steps": self.window,
        }
