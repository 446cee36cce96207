"""`zeda monitor`: a live view of a run, built from its metrics JSONL.

The driver appends every event to runs/<name>/metrics.jsonl; the monitor tails that
file (attach to a running job, locally or on the head node through `ray attach` or an
SSH tunnel's shared filesystem) or reads it whole (replay a finished run). Throughput
is a rate over a sliding window of the events' own timestamps, so a replay shows the
numbers the run had.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict, deque
from pathlib import Path

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from zeda_rl.metrics import Event, read_events

WINDOW_S = 10.0


class MonitorState:
    """Folds events into what the screen shows."""

    def __init__(self):
        self.last: dict[tuple[str, str], Event] = {}
        self.counters: dict[str, deque] = defaultdict(deque)  # (time, amount) per rate
        self.phase = "-"
        self.now = 0.0
        self.started = None
        self.restarts = 0

    def update(self, ev: Event) -> None:
        self.now = max(self.now, ev.time)
        self.started = ev.time if self.started is None else min(self.started, ev.time)
        self.last[(ev.component, ev.name)] = ev
        if ev.component == "driver" and ev.name == "phase":
            self.phase = str(ev.value)
        rate_of = {
            ("rollout", "tokens"): "rollout_tokens",
            ("teacher", "tokens"): "teacher_tokens",
            ("learner", "tokens"): "learner_tokens",
            ("learner", "step_done"): "learner_steps",
        }.get((ev.component, ev.name))
        if rate_of:
            self.counters[rate_of].append((ev.time, float(ev.value)))
        if ev.component == "driver" and ev.name == "actor_restart":
            self.restarts += 1

    def rate(self, key: str) -> float:
        q = self.counters[key]
        while q and q[0][0] < self.now - WINDOW_S:
            q.popleft()
        if not q:
            return 0.0
        span = max(self.now - q[0][0], 1.0)
        return sum(v for _, v in q) / span

    def value(self, component: str, name: str, default=None):
        ev = self.last.get((component, name))
        return default if ev is None else ev.value


def render(s: MonitorState):
    head = Text.assemble(
        ("ZEDA run  ", "bold"),
        (f"phase: {s.phase}   ", "cyan"),
        (f"elapsed: {(s.now - s.started) if s.started else 0:.0f}s   ", ""),
        (f"ETA: {_eta(s)}", "magenta"),
    )
    t = Table(show_header=True, header_style="bold", expand=False)
    t.add_column("throughput")
    t.add_column("value", justify="right")
    t.add_row("rollout tokens/s", f"{s.rate('rollout_tokens'):.1f}")
    t.add_row("teacher tokens/s", f"{s.rate('teacher_tokens'):.1f}")
    t.add_row("learner tokens/s", f"{s.rate('learner_tokens'):.1f}")
    t.add_row("learner steps/s", f"{s.rate('learner_steps'):.3f}")
    q = Table(show_header=True, header_style="bold")
    q.add_column("pipeline")
    q.add_column("value", justify="right")
    for label, comp, name, fmt in (
        ("learner step", "learner", "step", "{:.0f}"),
        ("policy version", "driver", "policy_version", "{:.0f}"),
        ("inbox queue depth", "driver", "queue_depth", "{:.0f}"),
        ("samples in flight", "driver", "inflight_samples", "{:.0f}"),
        ("staleness mean", "learner", "staleness_mean", "{:.2f}"),
        ("staleness max", "learner", "staleness_max", "{:.0f}"),
        ("dropped stale", "driver", "dropped_stale", "{:.0f}"),
        ("dropped malformed", "driver", "dropped_malformed", "{:.0f}"),
        ("reverse KL", "learner", "reverse_kl", "{:.4f}"),
        ("loss", "learner", "loss", "{:.4f}"),
        ("weight sync (s)", "driver", "weight_sync_s", "{:.3f}"),
        ("actors alive", "driver", "actors_alive", "{:.0f}"),
    ):
        v = s.value(comp, name)
        q.add_row(label, "-" if v is None else fmt.format(v))
    q.add_row("actor restarts", str(s.restarts))
    z = Table(show_header=True, header_style="bold")
    z.add_column("zero-expert ratio")
    z.add_column("value", justify="right")
    overall = s.value("learner", "zero_ratio")
    z.add_row("overall", "-" if overall is None else f"{100 * overall:.1f}%")
    for i, r in enumerate(s.value("learner", "zero_ratio_per_layer", []) or []):
        z.add_row(f"layer {i}", f"{100 * r:.1f}%")
    grid = Table.grid(padding=(0, 2))
    grid.add_row(t, q, z)
    return Group(head, grid)


def _eta(s: MonitorState) -> str:
    done, total = s.value("driver", "progress_done"), s.value("driver", "progress_total")
    if not done or not total or not s.started:
        return "-"
    phase_start = s.value("driver", "progress_started", s.started)
    rate = done / max(s.now - phase_start, 1e-6)
    return f"{(total - done) / rate:.0f}s ({done}/{total})" if rate > 0 else "-"


def follow(path: Path, state: MonitorState, live: Live | None, refresh_s: float, stop_after_s: float | None):
    """Tail the JSONL, updating at least every `refresh_s`; stop at the run's end event."""
    pos, t0, buf = 0, time.time(), ""
    while True:
        if path.exists():
            with path.open() as f:
                f.seek(pos)
                buf += f.read()
                pos = f.tell()
            *lines, buf = buf.split("\n")
            for ev in _parse(lines):
                state.update(ev)
        if live is not None:
            live.update(render(state))
        if state.phase == "finished" or (stop_after_s and time.time() - t0 > stop_after_s):
            return
        time.sleep(refresh_s)


def _parse(lines):
    import json

    for line in lines:
        try:
            yield Event(**json.loads(line))
        except (ValueError, TypeError):
            continue


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="zeda monitor", description=__doc__.splitlines()[0])
    ap.add_argument("run", help="run directory (runs/<name>) or its metrics.jsonl")
    ap.add_argument("--replay", action="store_true", help="render a finished run once and exit")
    ap.add_argument("--refresh", type=float, default=0.5, help="seconds between redraws (<= 1)")
    ap.add_argument("--timeout", type=float, default=None, help="stop following after this many seconds")
    a = ap.parse_args(argv)
    path = Path(a.run)
    if path.is_dir():
        path = path / "metrics.jsonl"
    state = MonitorState()
    console = Console()
    if a.replay:
        if not path.exists():
            raise FileNotFoundError(f"{path}: no metrics to replay")
        for ev in read_events(path):
            state.update(ev)
        console.print(render(state))
        return 0
    with Live(render(state), console=console, refresh_per_second=max(1.0, 1.0 / a.refresh)) as live:
        follow(path, state, live, min(a.refresh, 1.0), a.timeout)
    return 0
