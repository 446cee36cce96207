"""The `zeda` command as a user runs it: convert, eval --json, and the errors that must not destroy data."""

from __future__ import annotations

import json
import subprocess
import sys
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
