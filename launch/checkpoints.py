"""The run's two checkpoints before anything trains: the static teacher (the configured one, or the embedded
build) and the student it converts into (zero experts injected), or the student a study names (`model.student`)."""

from __future__ import annotations

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
        student = convert_checkpoint(
            teacher,
            cfg.run_dir / "student-init",
            zero_experts=nz,
            zero_type=cfg.model.zero_type,
            seed=cfg.model.convert_seed,
            overwrite=True,
            progress=True,
            log=phases.log,
        )
        console.print(f"student: {student} (N={n}, N_Z={nz})")
    return teacher, Path(student)


def _num_experts(checkpoint: Path) -> int:
    from zeda_rl.arch import read_config, spec_for

    raw = read_config(checkpoint)
    return spec_for(raw, str(checkpoint / "config.json")).num_experts(raw)
