"""A full disk and a read-only output while converting, exporting and checkpointing.

For each: a clear error (an OSError naming the path and the cause), nothing half-written left
beside the output, and the previous output, there before, unchanged and still loadable.

The disk is real where this machine lets a test mount one (root: a tmpfs, shrunk to what it
already holds for "full", remounted read-only for "read-only"); elsewhere the same checks run
on a write made to fail with ENOSPC part-way, and on a chmod'ed directory for a non-root user.
"""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from learner import checkpoint
from learner.config import LearnerSection, SFTStage
from learner.testing import tiny_checkpoint
from tests.helpers import save_static
from zeda_rl.convert import convert_checkpoint


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny static checkpoint, its conversion, and a one-rank learner that has taken a step."""
    import numpy as np

    from learner.train import Learner

    root = tmp_path_factory.mktemp("disk")
    save_static("qwen3_moe", root / "static")
    ckpt = tiny_checkpoint("qwen3_moe", root / "converted")
    learner = Learner(
        ckpt, LearnerSection(micro_batch_tokens=64), SFTStage(lr=1e-2, schedule="constant", warmup_frac=0.0)
    )
    rng = np.random.default_rng(0)
    learner.train_step(
        {
            "tokens": rng.integers(0, 64, (2, 8)),
            "loss_mask": np.ones((2, 8), np.uint8),
            "attention_mask": np.ones((2, 8), np.uint8),
        }
    )
    yield {"static": root / "static", "learner": learner}
    learner.close()


class Disk:
    """A tmpfs of its own: `full()` shrinks it to what it holds, `read_only()` remounts it so."""

    def __init__(self, path: Path):
        self.path = path

    def _remount(self, opts: str) -> None:
        subprocess.run(["mount", "-o", f"remount,{opts}", str(self.path)], check=True, capture_output=True)

    def full(self) -> None:
        st = os.statvfs(self.path)
        self._remount(f"size={(st.f_blocks - st.f_bfree) * st.f_frsize + 8192}")

    def read_only(self) -> None:
        self._remount("ro")


@pytest.fixture
def disk(tmp_path):
    d = tmp_path / "disk"
    d.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(d)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()[:100]}")
    yield Disk(d)
    subprocess.run(["umount", "-l", str(d)], capture_output=True)


def _snapshot(d: Path) -> dict[str, str]:
    return {
        str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(d.rglob("*"))
    }


def _convert(setup, out: Path):
    return convert_checkpoint(setup["static"], out, zero_experts=4, overwrite=True)


def _export(setup, out: Path):
    return setup["learner"].export_hf(out)


def _save(setup, out: Path):
    return checkpoint.save(setup["learner"], out)


def _loads(kind: str, setup, out: Path) -> None:
    """The previous output still loads as what it is."""
    if kind == "save":
        before = {k: v.clone() for k, v in setup["learner"].model.state_dict().items() if isinstance(v, torch.Tensor)}
        checkpoint.load(setup["learner"], out)
        after = setup["learner"].model.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)
        assert checkpoint.latest(out.parent) == out
    else:
        assert (out / "config.json").is_file()
        assert sum(len(load_file(p)) for p in out.glob("*.safetensors")) > 0


WRITERS = {"convert": _convert, "export": _export, "save": _save}


@pytest.mark.parametrize("kind", list(WRITERS))
@pytest.mark.parametrize("fault", ["full", "read_only"])
def test_a_full_or_read_only_disk_fails_clearly_and_keeps_the_previous_output(setup, disk, kind, fault):
    out = disk.path / ("step_00000001" if kind == "save" else "out")
    WRITERS[kind](setup, out)  # the previous output
    before = _snapshot(disk.path)
    getattr(disk, fault)()
    with pytest.raises(OSError) as info:
        WRITERS[kind](setup, out)
    assert info.value.errno == (errno.ENOSPC if fault == "full" else errno.EROFS), info.value
    assert str(disk.path) in str(info.value), info.value  # names where it failed
    assert _snapshot(disk.path) == before  # nothing half-written beside it, the previous output untouched
    _loads(kind, setup, out)


def _fail_midway():
    """A writer that gets part of its bytes out, then finds the disk full."""

    def write(obj, f, *a, **kw):
        Path(f).write_bytes(b"\0" * 100)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))

    return write


def test_a_checkpoint_that_fails_midway_leaves_the_previous_one(setup, tmp_path, monkeypatch):
    """Where no disk can be mounted: the same promise with torch.save failing after 100 bytes."""
    out = tmp_path / "learner" / "step_00000001"
    checkpoint.save(setup["learner"], out)
    before = _snapshot(tmp_path)
    monkeypatch.setattr(torch, "save", _fail_midway())
    with pytest.raises(OSError) as info:
        checkpoint.save(setup["learner"], out)
    assert info.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert _snapshot(tmp_path) == before
    _loads("save", setup, out)


def test_a_conversion_that_fails_midway_leaves_the_previous_one(setup, tmp_path, monkeypatch):
    import zeda_rl.convert as convert

    out = tmp_path / "student"
    _convert(setup, out)
    before = _snapshot(tmp_path)

    def full(*a, **kw):  # the shards are written, then config.json finds the disk full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(out))

    monkeypatch.setattr(convert, "_write_metadata", full)
    with pytest.raises(OSError):
        _convert(setup, out)
    assert _snapshot(tmp_path) == before
    _loads("convert", setup, out)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through a read-only mode; the tmpfs test covers it")
@pytest.mark.parametrize("kind", list(WRITERS))
def test_a_read_only_directory_fails_clearly(setup, tmp_path, kind):
    out = tmp_path / "ro" / ("step_00000001" if kind == "save" else "out")
    WRITERS[kind](setup, out)
    before = _snapshot(tmp_path)
    (tmp_path / "ro").chmod(0o555)
    try:
        with pytest.raises(PermissionError):
            WRITERS[kind](setup, out)
    finally:
        (tmp_path / "ro").chmod(0o755)
    assert _snapshot(tmp_path) == before
    _loads(kind, setup, out)


def test_a_killed_writers_leftovers_are_removed_at_the_next_start(tmp_path):
    """A save killed before its rename leaves `.step_N.tmp`; the next start removes it and keeps complete ones."""
    from learner.checkpoint import clean_partial, latest

    done = tmp_path / "step_00000004"
    done.mkdir()
    (done / "meta.json").write_text("{}")
    half = tmp_path / ".step_00000006.tmp"
    half.mkdir()
    (half / "rank00000.pt").write_bytes(b"partial")
    assert clean_partial(tmp_path) == [".step_00000006.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000004"] and latest(tmp_path) == done
    assert clean_partial(tmp_path / "absent") == []
