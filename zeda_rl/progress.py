"""Progress of one long phase (teacher build, conversion, rollouts, evaluation), for people and the monitor.

A rich bar only draws where its stream is a terminal: under `ray job submit`, in CI or
behind a pipe it shows nothing until it ends, so a multi-minute phase looked dead. Here a
terminal gets rich's bar (count, rate, ETA); anything else gets a plain line when the phase
starts, every `every_s` seconds and when it ends:

    teacher build: 500/2000 steps (11.8 steps/s, ETA 02:07) loss 0.031

Both go to stderr, so a command's stdout (`zeda eval --json`) stays its result. Given a
MetricsLog it also logs the driver events `progress_label`, `progress_total`,
`progress_started`, `progress_base` (the count it started from) and `progress_done` (at most twice a second, and at the end), from which
`zeda monitor` draws the current phase's progress line and ETA. `ZEDA_PROGRESS_EVERY` sets
the default interval of the plain lines (seconds, default 10).
"""

from __future__ import annotations

import os
import sys
import time

from rich.console import Console
from rich.errors import LiveError
from rich.progress import BarColumn, MofNCompleteColumn, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.progress import Progress as _RichProgress
from rich.text import Text

LOG_EVERY_S = 0.5


def clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def line(label: str, done: int, total: int, rate: float, unit: str, note: str = "") -> str:
    """The plain progress line: `label: done/total unit (rate unit/s, ETA mm:ss) note`."""
    eta = clock((total - done) / rate) if rate > 0 and total else "--:--"
    return f"{label}: {done}/{total} {unit} ({rate:.1f} {unit}/s, ETA {eta})" + (f" {note}" if note else "")


class _Rate(ProgressColumn):
    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        return Text(f"{task.speed or 0:.1f} {self.unit}/s")


class Progress:
    """`with Progress("eval student", 2000, "prompts", log=log) as p: ... p.advance(64)`."""

    def __init__(
        self,
        label: str,
        total: int,
        unit: str = "steps",
        *,
        log=None,
        enabled: bool = True,
        every_s: float | None = None,
        stream=None,
        done: int = 0,
    ):
        self.label, self.total, self.unit, self.log, self.enabled = label, int(total), unit, log, enabled
        self.every_s = float(os.environ.get("ZEDA_PROGRESS_EVERY", 10)) if every_s is None else every_s
        self.stream = stream if stream is not None else sys.stderr
        self.done = self._done0 = int(done)
        self.note = ""
        self._bar = None

    @property
    def rate(self) -> float:
        return (self.done - self._done0) / max(time.time() - self.t0, 1e-9)

    def __enter__(self) -> Progress:
        self.t0 = self._printed = time.time()
        self._logged, self._printed_done, self._logged_done = 0.0, None, None
        if self.log is not None:
            self.log.log("driver", "progress_label", self.label)
            self.log.log("driver", "progress_total", self.total)
            self.log.log("driver", "progress_started", self.t0)
            self.log.log("driver", "progress_base", self._done0)
            self._log_done()
        if self.enabled:
            console = Console(file=self.stream)
            if console.is_terminal:
                bar = _RichProgress(
                    TextColumn("[bold]{task.description}"),
                    BarColumn(),
                    MofNCompleteColumn(),
                    TextColumn(self.unit),
                    _Rate(self.unit),
                    TimeRemainingColumn(),
                    TextColumn("{task.fields[note]}"),
                    console=console,
                )
                try:
                    bar.start()
                    self._task = bar.add_task(self.label, total=self.total, completed=self.done, note="")
                    self._bar = bar
                except LiveError:  # another live display is active: plain lines instead
                    pass
            if self._bar is None:
                self._print()
        return self

    def advance(self, n: int = 1, note: str | None = None) -> None:
        self.update(self.done + n, note=note)

    def update(self, done: int, note: str | None = None) -> None:
        self.done = int(done)
        self.note = self.note if note is None else note
        now = time.time()
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done, note=self.note)
        elif self.enabled and now - self._printed >= self.every_s:
            self._print()
        if self.log is not None and now - self._logged >= LOG_EVERY_S:
            self._log_done()

    def _log_done(self) -> None:
        self._logged, self._logged_done = time.time(), self.done
        self.log.log("driver", "progress_done", self.done)

    def _print(self) -> None:
        self._printed, self._printed_done = time.time(), self.done
        print(line(self.label, self.done, self.total, self.rate, self.unit, self.note), file=self.stream, flush=True)

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._bar is not None:
            self._bar.stop()
        elif self.enabled and exc_type is None and self._printed_done != self.done:
            self._print()
        if self.log is not None and self._logged_done != self.done:
            self._log_done()
