"""Long phases show progress: plain periodic lines off a terminal, rich's bar on one, events for the monitor."""

from __future__ import annotations

import io
import re

import pytest

from launch.monitor import MonitorState, render
from zeda_rl.metrics import MetricsLog, read_events
from zeda_rl.progress import Progress, line

PLAIN = re.compile(
    r"^(?P<label>[\w ]+): (?P<done>\d+)/(?P<total>\d+) (?P<unit>\w+) \(\d+\.\d \w+/s, ETA (\d\d:\d\d|--:--)\)"
)


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_line_has_counts_rate_and_eta():
    assert (
        line("eval student", 500, 2000, 10.0, "prompts") == "eval student: 500/2000 prompts (10.0 prompts/s, ETA 02:30)"
    )
    assert (
        line("teacher build", 0, 2000, 0.0, "steps", "loss 1.2")
        == "teacher build: 0/2000 steps (0.0 steps/s, ETA --:--) loss 1.2"
    )
    assert line("x", 1, 100_000, 1.0, "steps").endswith("ETA 27:46:39)")


def test_off_a_terminal_prints_plain_lines_at_start_on_interval_and_at_end():
    out = io.StringIO()
    with Progress("teacher build", 4, "steps", stream=out, every_s=0) as p:
        for _ in range(4):
            p.advance(1, note="loss 0.5")
    lines = out.getvalue().splitlines()
    assert [PLAIN.match(x)["done"] for x in lines] == ["0", "1", "2", "3", "4"]  # no duplicate final line
    assert all(x.endswith("loss 0.5") for x in lines[1:])

    out = io.StringIO()
    with Progress("eval", 100, "prompts", stream=out, every_s=3600) as p:
        for _ in range(10):
            p.advance(10)
    assert [PLAIN.match(x)["done"] for x in out.getvalue().splitlines()] == ["0", "100"]


def test_on_a_terminal_draws_richs_bar_not_plain_lines():
    out = _Tty()
    with Progress("convert", 3, "tensors", stream=out, every_s=0) as p:
        for _ in range(3):
            p.advance(1)
    text = out.getvalue()
    assert "3/3" in text and "convert" in text and "\x1b[" in text  # drawn with terminal control codes
    assert not any(PLAIN.match(x) for x in text.splitlines())


def test_disabled_prints_nothing_and_still_logs(tmp_path):
    out, log = io.StringIO(), MetricsLog(tmp_path / "m.jsonl")
    with Progress("rollouts", 8, "prompts", log=log, enabled=False, stream=out, done=2) as p:
        p.update(8)
    log.close()
    assert out.getvalue() == ""
    ev = {(e.name): e.value for e in read_events(tmp_path / "m.jsonl") if e.component == "driver"}
    assert ev["progress_label"] == "rollouts" and ev["progress_total"] == 8 and ev["progress_done"] == 8
    assert ev["progress_started"] > 0


def test_monitor_shows_the_current_phases_progress_and_forgets_the_last_ones(tmp_path):
    log = MetricsLog(tmp_path / "m.jsonl")
    log.log("driver", "phase", "teacher")
    with Progress("teacher build", 2000, "steps", log=log, enabled=False) as p:
        p.update(500)
    log.log("driver", "phase", "convert")
    log.close()
    state = MonitorState()
    events = read_events(tmp_path / "m.jsonl")
    for ev in events[:-1]:
        state.update(ev)
    assert state.progress() == "teacher build: 500/2000 (25%)"
    assert "teacher build: 500/2000" in _text(render(state))
    state.update(events[-1])  # the next phase starts: the teacher's progress is not its progress
    assert state.progress() == ""


def _text(renderable) -> str:
    from rich.console import Console

    console = Console(file=io.StringIO(), width=200)
    console.print(renderable)
    return console.file.getvalue()


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    from zeda_rl.teacher import build_teacher

    log = MetricsLog(tmp_path_factory.mktemp("prog") / "teacher.jsonl")
    out = build_teacher(tmp_path_factory.mktemp("prog") / "teacher", steps=3, progress=False, min_accuracy=0.0, log=log)
    log.close()
    return out, log.path


def test_teacher_build_and_eval_report_progress_events(tiny_teacher, tmp_path):
    from zeda_rl.evaluate import evaluate

    teacher, teacher_log = tiny_teacher
    ev = [e for e in read_events(teacher_log) if e.name.startswith("progress_")]
    assert ev[0].value == "teacher build" and ev[-1].name == "progress_done" and ev[-1].value == 3
    log = MetricsLog(tmp_path / "eval.jsonl")
    evaluate(teacher, n_per_family=20, batch_size=32, log=log, progress=False, label="eval teacher")
    log.close()
    done = [e.value for e in read_events(log.path) if e.name == "progress_done"]
    total = [e.value for e in read_events(log.path) if e.name == "progress_total"]
    assert total == [80] and done[0] == 0 and done[-1] == 80
