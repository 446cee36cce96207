"""The run's two checkpoints before anything trains: the static teacher (the configured one, or the embedded
build) and the student it converts into (zero experts injected), or the student a study names (`model.student`)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from launch.config import RunConfig
from launch.runlog import Phases, console


def prepare_checkpoints(cfg: RunConfig, phases: Phases) -> tuple[Path, Path]:
    """The static teacher (built when embedded) and its zero-expert conversion, the student's start."""
    from launch.fleet import teacher_dir
    from zeda_rl.convert import convert_checkpoint

    with phases("teacher"):
        teacher = teacher_dir(cfg, log=phases.log)
        console.print(f"teacher: {teacher}")
    if cfg.model.student:  # a given student (e.g. after SFT): nothing to convert
        console.print(f"student: {cfg.model.student} (given by model.student)")
        return teacher, Path(cfg.model.student)
    with phases("convert"):
        n = _num_experts(teacher)
        nz = cfg.model.zero_experts or n // 2
        student, made = cfg.run_dir / "student-init", cfg.run_dir / "student-init.json"
        _remove_stale_tmp(cfg.run_dir, student.name)
        want = _conversion(teacher, nz, cfg)
        if student.is_dir() and made.is_file() and json.loads(made.read_text()) == want:
            console.print(f"student: {student} (N={n}, N_Z={nz}; converted by an earlier start of this run, reused)")
            return teacher, student
        made.unlink(missing_ok=True)
        convert_checkpoint(
            teacher,
            student,
            zero_experts=nz,
            zero_type=cfg.model.zero_type,
            seed=cfg.model.convert_seed,
            overwrite=True,
            progress=True,
            log=phases.log,
        )
        tmp = made.with_name(f".{made.name}.tmp")
        tmp.write_text(json.dumps(want, indent=1))
        tmp.rename(made)
        console.print(f"student: {student} (N={n}, N_Z={nz})")
    return teacher, student


def _conversion(teacher: Path, zero_experts: int, cfg: RunConfig) -> dict:
    """What the student-init conversion was made from: a resumed run reuses it when these are the same (a 30B
    conversion reads and writes 61 GB, minutes before anything trains, at every start)."""
    from launch.rollouts import fingerprint

    return {
        "teacher": str(teacher.resolve()),
        "teacher_fingerprint": fingerprint(teacher),
        "zero_experts": zero_experts,
        "zero_type": cfg.model.zero_type,
        "seed": cfg.model.convert_seed,
    }


def _remove_stale_tmp(run_dir: Path, name: str) -> None:
    """Half-written conversions of killed drivers (`.NAME.tmp-PID`, up to 61 GB each): the next start only ever
    removed its own pid's."""
    import psutil

    for tmp in run_dir.glob(f".{name}.tmp-*"):
        pid = tmp.name.rpartition("-")[2]
        if pid.isdigit() and int(pid) != os.getpid() and not psutil.pid_exists(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _num_experts(checkpoint: Path) -> int:
    from zeda_rl.arch import read_config, spec_for

    raw = read_config(checkpoint)
    return spec_for(raw, str(checkpoint / "config.json")).num_experts(raw)
