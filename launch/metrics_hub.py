"""The run's metrics, live, inside Ray: one named actor per run.

The driver writes every event to the run's JSONL (the record, replayable) and also
forwards it here, so that:
- `zeda monitor --ray` can attach to a running job from anywhere that can reach the
  cluster (the head node after `ray attach`, or a laptop through an SSH tunnel to the
  Ray client port), without sharing a filesystem with the driver, and
- the same numbers reach Ray's metrics export (Prometheus), so Ray's Grafana can graph
  them: each numeric event becomes a gauge `zeda_<component>_<name>` (Ray prefixes
  `ray_`), token and step counts become counters, per-layer lists carry an `index` tag (longer lists,
  such as a row's tokens, are not exported).

The hub takes no CPU slot and lives exactly as long as the job's driver (it is not
detached), so a finished or stopped run leaves nothing behind.
"""

from __future__ import annotations

import re
import sys
import threading
import time
from dataclasses import asdict

import ray

from zeda_rl.metrics import Event, read_events

NAMESPACE = "zeda"
PREFIX = "zeda-metrics/"
# amounts that add up (tokens produced, steps done): counters, so Prometheus' rate() applies
COUNTED = {"tokens", "step_done"}
MAX_LIST_SERIES = 256  # a list event longer than this is not exported to Prometheus (`export_points`)


def hub_name(run: str) -> str:
    return PREFIX + run


def metric_name(component: str, name: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", f"zeda_{component}_{name}")


def export_points(ev: dict) -> list[tuple[str, int | None, float, bool]]:
    """(metric name, list index or None, value, counted) of what an event adds to Ray's metrics export.

    A list becomes one series per element only up to MAX_LIST_SERIES elements (per-layer figures): a probe's
    logprobs or a batch row's tokens (36k on a real run) would each make a Prometheus series of every position.
    They stay events, for the report and the monitor."""
    value = ev["value"]
    if isinstance(value, bool) or not isinstance(value, (int, float, list)):
        return []
    name = metric_name(ev["component"], ev["name"])
    if isinstance(value, list):
        if len(value) > MAX_LIST_SERIES:
            return []
        return [
            (name, i, float(v), False)
            for i, v in enumerate(value)
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        ]
    return [(name, None, float(value), ev["name"] in COUNTED)]


@ray.remote(num_cpus=0, max_restarts=0)
class MetricsHub:
    """Holds the run's events (append-only) and mirrors numeric ones into Ray's metrics."""

    def __init__(self, run: str, max_events: int = 1_000_000):
        self.run, self.max_events = run, max_events
        self.events: list[dict] = []
        self.offset = 0  # events dropped from the front once max_events is exceeded
        self._metrics: dict[str, object] = {}
        self.readers: dict[str, tuple[int, float]] = {}  # monitor id -> (cursor it has read to, when)

    def push(self, events: list[dict]) -> int:
        self.events.extend(events)
        for ev in events:
            self._export(ev)
        if len(self.events) > self.max_events:
            cut = len(self.events) - self.max_events
            del self.events[:cut]
            self.offset += cut
        return self.offset + len(self.events)

    def since(self, cursor: int, reader: str | None = None) -> tuple[int, list[dict]]:
        """Events from position `cursor` on, and the next cursor."""
        start = max(cursor - self.offset, 0)
        end = self.offset + len(self.events)
        if reader is not None:
            self.readers[reader] = (end, time.time())
        return end, self.events[start:]

    def behind(self, active_s: float = 5.0) -> int:
        """Monitors that polled in the last `active_s` and have not read everything yet."""
        end, now = self.offset + len(self.events), time.time()
        return sum(1 for cursor, seen in self.readers.values() if now - seen < active_s and cursor < end)

    def _export(self, ev: dict) -> None:
        for name, index, value, counted in export_points(ev):
            if index is not None:
                self._metric(name, ("run", "index")).set(value, tags={"run": self.run, "index": str(index)})
            elif counted:
                self._metric(name, ("run",), counter=True).inc(max(value, 0.0), tags={"run": self.run})
            else:
                self._metric(name, ("run",)).set(value, tags={"run": self.run})

    def _metric(self, name: str, tags: tuple, counter: bool = False):
        if name not in self._metrics:
            from ray.util.metrics import Counter, Gauge

            cls = Counter if counter else Gauge
            self._metrics[name] = cls(name, description=f"zeda-rl {name.removeprefix('zeda_')}", tag_keys=tags)
        return self._metrics[name]


class HubSink:
    """A MetricsLog sink: batches events and forwards them to the hub from a thread.

    Fire-and-forget every `interval_s`, so logging never waits on Ray. The events the
    log already holds (written before Ray started) are sent first.
    """

    def __init__(self, hub, backlog_path=None, interval_s: float = 0.25):
        self.hub, self.interval_s = hub, interval_s
        self._buf: list[dict] = [asdict(e) for e in read_events(backlog_path)] if backlog_path else []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="metrics-hub-sink", daemon=True)
        self._thread.start()

    def __call__(self, ev: Event) -> None:
        with self._lock:
            self._buf.append(asdict(ev))

    def flush(self):
        with self._lock:
            batch, self._buf = self._buf, []
        return self.hub.push.remote(batch) if batch else None

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.flush()
            except Exception as err:  # noqa: BLE001 - Ray going down under us: the JSONL still has everything
                print(f"metrics hub sink stopped: {type(err).__name__}: {err}", file=sys.stderr)
                return

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop the thread, deliver what is left, and give attached monitors up to `timeout_s`
        to read it: the hub ends with the driver, and the run's last events are its ending."""
        self._stop.set()
        self._thread.join(timeout=timeout_s)
        deadline = time.time() + timeout_s
        try:
            ref = self.flush()
            if ref is not None:
                ray.get(ref, timeout=timeout_s)
            while time.time() < deadline and ray.get(self.hub.behind.remote(), timeout=timeout_s):
                time.sleep(0.1)
        except Exception:  # noqa: BLE001 - best effort at shutdown
            pass


def start_hub(run: str, log) -> HubSink:
    """Create this run's hub (replacing a stale one of the same name) and attach it to `log`."""
    try:
        ray.kill(ray.get_actor(hub_name(run), namespace=NAMESPACE))
    except ValueError:
        pass
    hub = MetricsHub.options(name=hub_name(run), namespace=NAMESPACE).remote(run)
    sink = HubSink(hub, backlog_path=log.path)
    log.sinks.append(sink)
    return sink


def find_hub(run: str | None = None, wait_s: float = 0.0):
    """The hub of `run`, or of the only run live on the cluster; waits up to `wait_s` for it."""
    deadline = time.time() + wait_s
    while True:
        names = sorted(
            a["name"]
            for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == NAMESPACE and a["name"].startswith(PREFIX)
        )
        if run is not None and hub_name(run) in names:
            return ray.get_actor(hub_name(run), namespace=NAMESPACE)
        if run is None and len(names) == 1:
            return ray.get_actor(names[0], namespace=NAMESPACE)
        if time.time() >= deadline:
            runs = [n.removeprefix(PREFIX) for n in names]
            if run is not None:
                raise LookupError(f"no live run named {run!r} on this Ray cluster (live runs: {runs or 'none'})")
            raise LookupError(
                f"{'no live run' if not runs else f'several live runs {runs}, pick one with --run'} on this Ray cluster"
            )
        time.sleep(0.5)
