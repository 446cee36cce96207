"""OPD loop throughput: asynchronous against synchronous, same config, one run.

Both modes run the pipeline's own `opd_phase` from the same converted student, with
fresh actors and a fresh learner each, so the only difference is the switch: in the
asynchronous loop the rollout actors keep sampling (admission-capped by max_staleness)
while the learner trains; in the synchronous loop each step waits for its samples and
for the weight push. The modes alternate for `--rounds` so machine noise hits both.

    python bench/loop.py [--config launch/configs/tiny-cpu.yaml] [--steps 8] [--rounds 1] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import ray
import yaml


def run_mode(cfg, teacher_dir: Path, student_dir: Path, data, asynchronous: bool, log) -> dict:
    from launch.fleet import start_actors
    from launch.opd import opd_phase
    from learner.actor import LearnerGroup

    cfg = cfg.model_copy(update={"opd": cfg.opd.model_copy(update={"asynchronous": asynchronous})})
    learner = LearnerGroup.from_run_config(cfg, student_dir)
    endpoint = learner.open_inbox(cfg.cluster.bind_host)
    rollouts, teachers, pg = start_actors(
        cfg, teacher_dir, student_dir, endpoint, data.format.tokenizer.pad_token_id or 0
    )
    try:
        t0 = time.perf_counter()
        opd_phase(cfg, rollouts, teachers, learner, data, log)
        wall = time.perf_counter() - t0
    finally:
        from ray.util.placement_group import remove_placement_group

        learner.shutdown()
        for a in rollouts + teachers.actors:
            ray.kill(a)
        remove_placement_group(pg)
    samples = cfg.opd.steps * cfg.opd.prompts_per_step * cfg.opd.samples_per_prompt
    return {"wall_s": wall, "steps_per_s": cfg.opd.steps / wall, "samples_per_s": samples / wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="launch/configs/tiny-cpu.yaml")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    a = ap.parse_args()

    from launch.checkpoints import prepare_checkpoints
    from launch.config import load_config
    from launch.pipeline import prepare_data
    from launch.runlog import Phases
    from zeda_rl.metrics import MetricsLog

    overrides = {k: yaml.safe_load(v) for k, _, v in (s.partition("=") for s in a.set)}
    cfg = load_config(a.config, {"name": "bench-loop", "opd.steps": a.steps, **overrides})
    log = MetricsLog(cfg.run_dir / "metrics.jsonl")
    teacher_dir, student_dir = prepare_checkpoints(cfg, Phases(log))
    from launch.fleet import start_local_ray

    start_local_ray(num_cpus=cfg.cluster.num_cpus, log_to_driver=False)  # loopback only, as a local run
    results: dict[str, list[dict]] = {"async": [], "sync": []}
    for _ in range(a.rounds):
        for name, asynchronous in (("async", True), ("sync", False)):
            data = prepare_data(cfg, teacher_dir, log)  # a fresh prompt stream: both modes see the same prompts
            results[name].append(run_mode(cfg, teacher_dir, student_dir, data, asynchronous, log))
    ray.shutdown()
    o = cfg.opd
    print(
        f"config {a.config}: {o.steps} OPD steps x {o.prompts_per_step} prompts x {o.samples_per_prompt} samples, "
        f"sync_every {o.sync_every}, max_staleness {o.max_staleness}, {a.rounds} round(s)"
    )
    best = {k: min(v, key=lambda r: r["wall_s"]) for k, v in results.items()}
    for k, r in best.items():
        print(f"{k:5s}: {r['wall_s']:7.1f} s  {r['steps_per_s']:.3f} steps/s  {r['samples_per_s']:.1f} samples/s")
    print(f"async / sync throughput ratio: {best['async']['samples_per_s'] / best['sync']['samples_per_s']:.2f}")


if __name__ == "__main__":
    main()
