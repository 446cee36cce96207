"""One metric event type for the whole system: (component, name, value, step, time).

Every component reports through it; the run's JSONL is the source the live monitor
replays and the report is drawn from.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass
class Event:
    component: str  # rollout | teacher | learner | driver | eval
    name: str
    value: float | str | list
    step: int = 0
    time: float = 0.0


class MetricsLog:
    """Append-only JSONL of events, flushed per write so a monitor can tail it."""

    def __init__(self, path: str | Path, sinks: tuple = ()):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        torn = False
        if self.path.is_file() and self.path.stat().st_size:
            with self.path.open("rb") as f:
                f.seek(-1, 2)
                torn = f.read(1) != b"\n"
        self._f = self.path.open("a", buffering=1)
        if torn:  # a killed driver's last line: a resumed run's first event must not be glued to it
            self._f.write("\n")
        self._lock = threading.Lock()
        self.sinks = list(sinks)  # callables(Event), e.g. the Prometheus exporter

    def log(self, component: str, name: str, value, step: int = 0) -> None:
        ev = Event(component, name, value, step, time.time())
        with self._lock:
            self._f.write(json.dumps(asdict(ev)) + "\n")
        for sink in self.sinks:
            sink(ev)

    def log_many(self, component: str, values: dict, step: int = 0) -> None:
        for k, v in values.items():
            if isinstance(v, (int, float, str, list)):
                self.log(component, k, v, step)

    def close(self) -> None:
        self._f.close()


def read_events(path: str | Path) -> list[Event]:
    """All events of a run's JSONL; a torn last line (a run still writing) is skipped."""
    events = []
    for line in Path(path).read_text().splitlines():
        try:
            events.append(Event(**json.loads(line)))
        except (json.JSONDecodeError, TypeError):
            continue
    return events
