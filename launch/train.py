"""`python -m launch.train --config FILE`: the driver that `ray job submit` runs (and `make run`).

Where a run writes: `output_dir` as the config gives it when absolute; a relative one is
taken under $ZEDA_RUNS_DIR when set, else under the current directory, except in a Ray
job, whose current directory is a temporary copy of the uploaded working dir: there it
goes under ~/zeda-runs on the head node, and the driver prints where.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def runs_base() -> Path | None:
    """Base for a relative output_dir, or None for the current directory."""
    if os.environ.get("ZEDA_RUNS_DIR"):
        return Path(os.environ["ZEDA_RUNS_DIR"]).expanduser()
    if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):  # set by Ray for a submitted job's entrypoint
        return Path.home() / "zeda-runs"
    return None


def load_run_config(path: str, sets: list[str]):
    """The run config from its YAML and `KEY=VALUE` overrides (values parsed as YAML), with the
    relative output_dir placed as the module docstring says. Raises ConfigError."""
    import yaml

    from launch.config import ConfigError, load_config

    overrides = {}
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        overrides[key] = yaml.safe_load(value)
    cfg = load_config(path, overrides)
    base = runs_base()
    if base is not None and not Path(cfg.output_dir).is_absolute():
        cfg = cfg.model_copy(update={"output_dir": str(base / cfg.output_dir)})
    return cfg


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="launch.train", description="run the ZEDA pipeline from a typed YAML config")
    ap.add_argument("--config", required=True, help="run config YAML (see launch/configs/)")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set opd.steps=5 (value parsed as YAML)",
    )
    ap.add_argument("--resume", action="store_true", help="resume from the run's learner checkpoint")
    a = ap.parse_args(argv)

    from launch.config import ConfigError

    try:
        cfg = load_run_config(a.config, a.set)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2
    from launch.doctor import refusals

    refused = refusals(cfg)  # before any actor starts
    if refused:
        print("\n".join([f"{a.config}: refused:", *(f"  {r}" for r in refused)]), file=sys.stderr)
        return 2
    from launch.pipeline import console, run

    result = run(cfg, resume=a.resume)
    console.print(f"[bold green]done[/]: report at {cfg.run_dir / 'report.md'}")
    acc = result["accuracy"]
    scored = (
        f"teacher {100 * acc['teacher']['mean']:.1f}% | student {100 * acc['student']['mean']:.1f}% | "
        if "mean" in acc["student"]
        else ""
    )
    console.print(f"{scored}zero experts {100 * result['zero_expert_ratio']['overall']:.1f}%")
    return 0


if __name__ == "__main__":  # through the CLI, for its one-line errors (file system, Ctrl-C)
    from launch.cli import main as cli_main

    sys.exit(cli_main(["train", *sys.argv[1:]]))
