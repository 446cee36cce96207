"""`zeda monitor`: a live view of a run: throughput, queues, staleness, KL, zero share, health.

It folds the run's metric events into one screen, from either source:
- the run's metrics JSONL (`zeda monitor runs/<name>`): tail it while the run writes, or
  `--replay` a finished run; throughput is a rate over a sliding window of the events'
  own timestamps, so a replay shows the numbers the run had;
- the run's hub actor inside Ray (`zeda monitor --ray [ADDRESS]`): attach to a running
  job on a local head or a cluster, with no shared filesystem (see launch/metrics_hub.py).

Once a run has ended (and always with `--replay`) the throughput table shows each phase's
average instead: a 10 s window at the end of a run would only see its evaluation.
"""

from __future__ import annotations

import argparse
import time
import uuid
from collections import defaultdict, deque
from pathlib import Path

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from zeda_rl.metrics import Event, read_events
from zeda_rl.progress import clock

WINDOW_S = 10.0
RATES = {  # (component, event) -> (rate key, row label)
    ("rollout", "tokens"): ("rollout_tokens", "rollout tokens/s"),
    ("teacher", "tokens"): ("teacher_tokens", "teacher tokens/s"),
    ("learner", "tokens"): ("learner_tokens", "learner tokens/s"),
    ("learner", "step_done"): ("learner_steps", "learner steps/s"),
}


class MonitorState:
    """Folds events into what the screen shows."""

    def __init__(self):
        self.last: dict[tuple[str, str], Event] = {}
        self.counters: dict[str, deque] = defaultdict(deque)  # (time, amount) per rate
        self.phase = "-"
        self.now = 0.0
        self.started = None
        self.failed_calls = 0  # rollout/teacher calls lost to a dying actor
        self.phases: list[list] = []  # [name, start time, {rate key: amount}] in order

    def update(self, ev: Event) -> None:
        self.now = max(self.now, ev.time)
        self.started = ev.time if self.started is None else min(self.started, ev.time)
        if ev.component == "driver" and ev.name == "phase":
            self.phase = str(ev.value)
            self.phases.append([self.phase, ev.time, defaultdict(float)])
            for key in [k for k in self.last if k[0] == "driver" and k[1].startswith("progress_")]:
                del self.last[key]  # the last phase's progress is not this one's
        self.last[(ev.component, ev.name)] = ev
        rate_of = RATES.get((ev.component, ev.name), (None,))[0]
        if rate_of:
            self.counters[rate_of].append((ev.time, float(ev.value)))
            if self.phases:
                self.phases[-1][2][rate_of] += float(ev.value)
        if ev.component == "driver" and ev.name == "actor_restart":
            self.failed_calls += 1

    def phase_rates(self) -> list[tuple[str, float, dict]]:
        """(phase, seconds, {rate key: average per second}) for every phase that ran."""
        out = []
        for i, (name, start, amounts) in enumerate(self.phases):
            if name in ("finished", "stopped", "failed"):
                continue
            end = self.phases[i + 1][1] if i + 1 < len(self.phases) else self.now
            span = end - start
            out.append((name, span, {k: v / max(span, 1e-9) for k, v in amounts.items()}))
        return out

    def progress(self) -> str:
        """The current phase's progress line, from the `progress_*` events (zeda_rl.progress)."""
        done, total = self.value("driver", "progress_done"), self.value("driver", "progress_total")
        if done is None or not total:
            return ""
        label = self.value("driver", "progress_label", self.phase)
        return f"{label}: {done:.0f}/{total:.0f} ({100 * done / total:.0f}%)"

    def rate(self, key: str) -> float:
        q = self.counters[key]
        while q and q[0][0] < self.now - WINDOW_S:
            q.popleft()
        if not q:
            return 0.0
        span = max(self.now - q[0][0], 1.0)
        return sum(v for _, v in q) / span

    @property
    def ended(self) -> bool:
        return self.phase in ("finished", "stopped", "failed")

    def health(self) -> list[tuple[str, str]]:
        """(group, "alive/total, N restarts") for every actor group the driver watches."""
        groups = sorted(n.removeprefix("total/") for c, n in self.last if c == "driver" and n.startswith("total/"))
        return [
            (
                g,
                f"{self.value('driver', 'alive/' + g, 0):.0f}/{self.value('driver', 'total/' + g, 0):.0f} up, "
                f"{self.value('driver', 'restarts/' + g, 0):.0f} restarts",
            )
            for g in groups
        ]

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
    if s.progress() and not s.ended:
        head.append(f"\n{s.progress()}", "green")
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
        ("dropped missing", "driver", "dropped_missing", "{:.0f}"),
        ("dropped backpressure", "driver", "dropped_backpressure", "{:.0f}"),
        ("reverse KL", "learner", "reverse_kl", "{:.4f}"),
        ("loss", "learner", "loss", "{:.4f}"),
        ("weight sync (s)", "driver", "weight_sync_s", "{:.3f}"),
    ):
        v = s.value(comp, name)
        q.add_row(label, "-" if v is None else fmt.format(v))
    q.add_row("failed calls", str(s.failed_calls))
    for group, text in s.health():
        q.add_row(f"{group} actors", text)
    z = Table(show_header=True, header_style="bold")
    z.add_column("zero-expert ratio")
    z.add_column("value", justify="right")
    overall = s.value("learner", "zero_ratio")
    z.add_row("overall", "-" if overall is None else f"{100 * overall:.1f}%")
    for i, r in enumerate(s.value("learner", "zero_ratio_per_layer", []) or []):
        z.add_row(f"layer {i}", f"{100 * r:.1f}%")
    # real experts' load against uniform (max_e (load - mean) / mean): L_GA must leave their routing healthy
    for i, v in enumerate(s.value("learner", "expert_load_max_violation_per_layer", []) or []):
        z.add_row(f"load max violation {i}", f"{v:.2f}")
    grid = Table.grid(padding=(0, 2))
    if s.ended:
        grid.add_row(q, z)
        return Group(head, _phase_table(s), grid)
    grid.add_row(_live_table(s), q, z)
    return Group(head, grid)


def _fmt(key: str, v: float) -> str:
    return f"{v:.3f}" if key == "learner_steps" else f"{v:.1f}"


def _live_table(s: MonitorState) -> Table:
    t = Table(show_header=True, header_style="bold", expand=False)
    t.add_column("throughput")
    t.add_column("value", justify="right")
    for key, label in RATES.values():
        t.add_row(label, _fmt(key, s.rate(key)))
    return t


def _phase_table(s: MonitorState) -> Table:
    """Each phase's length and average throughput, for a run that has ended."""
    t = Table(show_header=True, header_style="bold", expand=False, title="throughput: average per phase")
    t.add_column("phase")
    t.add_column("s", justify="right")
    for _, label in RATES.values():
        t.add_column(label, justify="right")
    for name, span, rates in s.phase_rates():
        t.add_row(name, f"{span:.0f}", *(_fmt(key, rates[key]) if key in rates else "-" for key, _ in RATES.values()))
    return t


def _eta(s: MonitorState) -> str:
    done, total = s.value("driver", "progress_done"), s.value("driver", "progress_total")
    if not done or not total or not s.started:
        return "-"
    phase_start = s.value("driver", "progress_started", s.started)
    base = s.value("driver", "progress_base", 0) or 0  # a resumed phase counts from its first step, not from 0
    rate = (done - base) / max(s.now - phase_start, 1e-6)
    return clock((total - done) / rate) if rate > 0 else "-"  # the counts are on the progress line


class FileSource:
    """New events of a metrics JSONL since the last poll (a torn last line waits for its end)."""

    def __init__(self, path: str | Path):
        self.path, self.pos, self.buf = Path(path), 0, ""

    def poll(self) -> list[Event]:
        if not self.path.exists():
            return []
        with self.path.open() as f:
            f.seek(self.pos)
            self.buf += f.read()
            self.pos = f.tell()
        *lines, self.buf = self.buf.split("\n")
        return list(_parse(lines))


class HubSource:
    """New events from a run's hub actor; `gone` once the hub (the job's driver) has ended.

    A busy or still-starting hub only delays the screen: a poll waits at most `wait_s`
    and the same request is picked up on the next one.
    """

    def __init__(self, hub, wait_s: float = 0.5):
        self.hub, self.cursor, self.gone, self.wait_s = hub, 0, False, wait_s
        self._pending = None
        self.error = ""
        self.reader = uuid.uuid4().hex  # lets the driver wait, at the end, until this monitor has read it

    def poll(self) -> list[Event]:
        import ray

        if self.gone:
            return []
        if self._pending is None:
            self._pending = self.hub.since.remote(self.cursor, self.reader)
        ready, _ = ray.wait([self._pending], timeout=self.wait_s)
        if not ready:
            return []
        ref, self._pending = self._pending, None
        try:
            self.cursor, events = ray.get(ref)
        except ray.exceptions.RayActorError as err:
            self.gone, self.error = True, f"{type(err).__name__}: {err}"
            return []
        return [Event(**e) for e in events]


def follow(source, state: MonitorState, live: Live | None, refresh_s: float, stop_after_s: float | None):
    """Poll `source` (a FileSource, a HubSource, or a JSONL path) and redraw every `refresh_s`
    until the run's end event, the source going away, or `stop_after_s`."""
    if isinstance(source, (str, Path)):
        source = FileSource(source)
    t0 = time.time()
    while True:
        for ev in source.poll():
            state.update(ev)
        if not state.ended:  # live: rates decay when events stop coming
            state.now = max(state.now, time.time())
        if getattr(source, "gone", False) and not state.ended:
            state.phase = f"{state.phase} (driver gone)"
        if live is not None:
            live.update(render(state))
        if state.ended or getattr(source, "gone", False) or (stop_after_s and time.time() - t0 > stop_after_s):
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
    ap.add_argument("run_dir", nargs="?", help="run directory (runs/<name>) or its metrics.jsonl")
    ap.add_argument("--replay", action="store_true", help="render a finished run once and exit")
    ap.add_argument(
        "--ray",
        nargs="?",
        const="auto",
        default=None,
        metavar="ADDRESS",
        help="attach to a live run through Ray (default address: auto, the local or RAY_ADDRESS cluster; "
        "ray://HOST:10001 through a tunnel)",
    )
    ap.add_argument("--run", default=None, help="with --ray: the run's name (needed when several runs are live)")
    ap.add_argument("--wait", type=float, default=60.0, help="with --ray: seconds to wait for the run to appear")
    ap.add_argument("--refresh", type=float, default=0.5, help="seconds between redraws (<= 1)")
    ap.add_argument("--timeout", type=float, default=None, help="stop following after this many seconds")
    a = ap.parse_args(argv)
    if (a.ray is None) == (a.run_dir is None):
        ap.error("give a run directory, or --ray to attach to a live run")
    state, console = MonitorState(), Console()
    if a.ray is not None:
        source = _attach(a.ray, a.run, a.wait)
    else:
        path = Path(a.run_dir)
        if path.is_dir():
            path = path / "metrics.jsonl"
        if a.replay:
            if not path.exists():
                raise FileNotFoundError(f"{path}: no metrics to replay")
            for ev in read_events(path):
                state.update(ev)
            console.print(render(state))
            return 0
        source = FileSource(path)
    with Live(render(state), console=console, refresh_per_second=max(1.0, 1.0 / a.refresh)) as live:
        follow(source, state, live, min(a.refresh, 1.0), a.timeout)
    if getattr(source, "gone", False) and not state.ended:
        console.print(f"[yellow]the run's metrics hub went away before the run ended ({source.error[:500]})")
    return 0


def _attach(address: str, run: str | None, wait_s: float) -> HubSource:
    import ray

    from launch.fleet import ray_on_loopback
    from launch.metrics_hub import NAMESPACE, find_hub

    with ray_on_loopback():  # a local run's Ray is on 127.0.0.1, which ray.init would turn into the LAN address
        ray.init(address=address, namespace=NAMESPACE, log_to_driver=False, logging_level="error")
    try:
        return HubSource(find_hub(run, wait_s=wait_s))
    except LookupError as err:
        raise FileNotFoundError(str(err)) from None
