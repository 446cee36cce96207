"""The `zeda` command as a user runs it: convert, eval --json, and the errors that must not destroy data."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ZEDA = str(Path(sys.executable).parent / "zeda")


def zeda(*args) -> subprocess.CompletedProcess:
    return subprocess.run([ZEDA, *map(str, args)], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    from zeda_rl.teacher import build_teacher

    return build_teacher(tmp_path_factory.mktemp("cli") / "teacher", steps=40, progress=False, min_accuracy=0.0)


def test_convert_then_eval_json(teacher, tmp_path):
    out = zeda("convert", teacher, tmp_path / "student", "--zero-experts", 4)
    assert out.returncode == 0, out.stderr
    ev = zeda("eval", tmp_path / "student", "--n", 3, "--json")
    assert ev.returncode == 0, ev.stderr
    assert "eval student: 12/12 prompts (" in ev.stderr  # not a terminal: plain progress lines, on stderr only
    result = json.loads(ev.stdout)
    assert set(result["accuracy"]) >= {"add", "reverse", "sort", "pattern", "mean"}
    assert len(result["zero_ratio"]["per_layer"]) == 2 and 0 < result["zero_ratio"]["overall"] < 1
    static = json.loads(zeda("eval", teacher, "--n", 3, "--json").stdout)["zero_ratio"]
    assert static["per_layer"] == [0.0, 0.0] and static["tokens"] > 0  # the teacher: every slot real


def test_errors_name_the_problem_and_keep_the_data(teacher, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    out = zeda("convert", teacher, tmp_path / "taken", "--zero-experts", 4)
    assert out.returncode == 2 and "not empty" in out.stderr and "--overwrite" in out.stderr
    out = zeda("convert", teacher, teacher / "inner", "--zero-experts", 4, "--overwrite")
    assert out.returncode == 2 and "contain one another" in out.stderr
    out = zeda("teacher", "build", "--out", tmp_path / "taken")
    assert out.returncode == 2 and "does not hold a teacher build" in out.stderr
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine" and (teacher / "config.json").is_file()


def test_parsing_imports_neither_torch_nor_transformers():
    code = (
        "import sys, launch.cli; launch.cli.build_parser().parse_args(['eval', 'x', '--n', '3']); "
        "print(sorted(m for m in ('torch', 'transformers', 'ray', 'zeda_rl') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr
    bad = zeda("eval", "--n", "x")
    assert bad.returncode == 2 and "invalid int value" in bad.stderr
    v = zeda("--version")
    assert v.returncode == 0 and v.stdout.strip().startswith("zeda 0.")
    seeds = zeda("baselines", "--config", "launch/configs/tiny-cpu-hard.yaml", "--seeds", "0,0")
    assert seeds.returncode == 2 and "distinct" in seeds.stderr


def _one_error_line(out: subprocess.CompletedProcess, cmd: str) -> str:
    assert "Traceback" not in out.stderr, out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith(f"zeda {cmd}: "), out.stderr
    return last


def test_file_system_errors_are_one_line_naming_path_and_cause(teacher, tmp_path):
    readonly = Path("/sys/zeda-test-out")  # sysfs: no directory can be made there, not even by root
    out = zeda("convert", teacher, readonly / "student", "--zero-experts", 4)
    assert out.returncode == 1 and str(readonly) in _one_error_line(out, "convert")
    (tmp_path / "a-file").write_text("")
    out = zeda("eval", teacher, "--n", 1, "--out", tmp_path / "a-file" / "eval")
    line = _one_error_line(out, "eval")
    assert out.returncode == 1 and str(tmp_path / "a-file") in line and "Not a directory" in line


def test_disk_full_during_convert(teacher, tmp_path, monkeypatch, capsys):
    """ENOSPC from a write names no file: the converter names its output (zeda_rl.diskerrors), and nothing half-written stays."""
    import builtins

    from launch import cli
    from zeda_rl import convert

    class Full:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(convert, "open", lambda *a, **k: Full(builtins.open(*a, **k)), raising=False)
    assert cli.main(["convert", str(teacher), str(tmp_path / "student"), "--zero-experts", "4"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"zeda convert: error: {tmp_path / 'student'}: No space left on device"
    assert list(tmp_path.iterdir()) == []
    assert (
        cli.describe(OSError(errno.EBUSY, "Device or resource busy", "/mnt/runs"))
        == "/mnt/runs: Device or resource busy"
    )
    assert (
        cli.describe(OSError(errno.ENOSPC, "No space left on device"), "/runs/x")
        == "writing under /runs/x: No space left on device"
    )


def _interrupt(args, ready: str, on: str = "stderr", env=None) -> subprocess.CompletedProcess:
    """Start `zeda args`, send Ctrl-C (SIGINT) once its stderr (or stdout) shows `ready`, collect what it printed."""
    # SIGINT back to its default in the child, as a terminal gives it: a suite started in the background
    # (`make test &`) inherits SIGINT ignored, Python then installs no KeyboardInterrupt handler, and the
    # child ran to the end with status 0 (two clean-clone runs failed so).
    p = subprocess.Popen(
        [ZEDA, *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "ZEDA_PROGRESS_EVERY": "0", **(env or {})},
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    seen = []
    for text in getattr(p, on):
        seen.append(text)
        if ready in text:
            break
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    if on == "stdout":
        return subprocess.CompletedProcess(args, p.returncode, "".join(seen) + out, err)
    return subprocess.CompletedProcess(args, p.returncode, out, "".join(seen) + err)


def test_ctrl_c_in_eval_and_train_is_one_line(teacher, tmp_path):
    out = _interrupt(["eval", teacher, "--n", 400], ready="prompts (")  # a progress line: generation under way
    assert out.returncode == 130 and _one_error_line(out, "eval") == "zeda eval: interrupted"
    cfg = Path(__file__).parents[1] / "launch" / "configs" / "tiny-cpu.yaml"
    out = _interrupt(
        ["train", "--config", cfg, "--set", f"output_dir={tmp_path}", "--set", "model.teacher=" + str(teacher)],
        ready="run directory:",
        on="stdout",
    )
    assert out.returncode == 130 and _one_error_line(out, "train") == "zeda train: interrupted"


def test_readme_and_docs_links_resolve_in_a_plain_clone():
    import re

    root = Path(__file__).parents[1]
    pages = [root / "README.md", *sorted((root / "docs").glob("*.md"))]
    assert len(pages) >= 3  # README, docs/method.md, docs/architecture.md
    for page in pages:
        for target in re.findall(r"\]\(([^)#\s]+)[^)]*\)", page.read_text()):
            if "://" in target:
                continue
            path = (page.parent / target).resolve()
            assert path.is_relative_to(root) and path.exists(), f"{page.name}: dead link {target}"


def test_resume_without_a_checkpoint_is_refused_before_anything_starts(tmp_path):
    """No teacher build, conversion, Ray or files: the missing checkpoint is named at once."""
    t0 = time.monotonic()
    out = zeda("train", "--config", "launch/configs/tiny-cpu.yaml", "--set", f"output_dir={tmp_path}", "--resume")
    assert out.returncode != 0 and "no learner checkpoint under" in out.stderr and "--resume" in out.stderr, out.stderr
    assert time.monotonic() - t0 < 60 and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "meta, expected",
    [
        ({"format": "zeda-learner-checkpoint/1", "step": 8}, "Format 1 .* model.student"),
        ("{not json", "meta.json: not JSON"),
        ({"format": "zeda-learner-checkpoint/2", "step": 8, "ep_size": 4, "tp_size": 1}, "learner.ep=4"),
    ],
)
def test_a_checkpoint_this_version_cannot_resume_is_refused_before_anything_starts(tmp_path, meta, expected):
    """An earlier format, a damaged meta.json or another layout: refused at once, saying how to go on."""
    ckpt = tmp_path / "tiny-cpu" / "learner" / "step_00000008"
    ckpt.mkdir(parents=True)
    (ckpt / "meta.json").write_text(meta if isinstance(meta, str) else json.dumps(meta))
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    out = zeda("train", "--config", "launch/configs/tiny-cpu.yaml", "--set", f"output_dir={tmp_path}", "--resume")
    assert out.returncode != 0 and re.search(expected, out.stderr), out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written
