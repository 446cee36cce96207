"""A rollout engine killed in the middle of OPD: Ray restarts it, the driver gives it the current
weights, the run finishes, and nothing it sampled before that is trained on.

The kill is real: SIGKILL to the actor's process, found by the title Ray gives it.
"""

from __future__ import annotations

import json
import signal
import threading
import time

import psutil
import pytest
import ray

from launch.config import load_config
from zeda_rl.metrics import read_events

SHORT = {
    "name": "faults", "sft.steps": 4, "sft.prompts": 64, "sft.batch_size": 16, "opd.steps": 40,
    "opd.prompts_per_step": 4, "opd.samples_per_prompt": 2, "opd.rollout_batch": 2, "eval.n_per_family": 2,
    "sampling.max_new_tokens": 8,
}


def _kill_rollout_once_opd_runs(metrics, killed: list, stop: threading.Event):
    while not stop.wait(0.2):
        text = metrics.read_text() if metrics.exists() else ""
        opd_steps = [json.loads(line) for line in text.splitlines() if '"name": "staleness_max"' in line]
        if len(opd_steps) < 5:
            continue
        for p in psutil.process_iter(["pid", "cmdline"]):
            if any(part.startswith("ray::RolloutActor") for part in (p.info["cmdline"] or [])):
                p.send_signal(signal.SIGKILL)
                killed.append(p.info["pid"])
                return


@pytest.mark.timeout(300)
def test_a_killed_rollout_engine_is_restarted_and_resynced(tmp_path):
    from launch.pipeline import run as run_pipeline
    from zeda_rl.teacher import build_teacher

    teacher = build_teacher(tmp_path / "teacher", steps=40, progress=False, min_accuracy=0.0)
    cfg = load_config("launch/configs/tiny-cpu.yaml", {**SHORT, "output_dir": str(tmp_path / "runs"), "model.teacher": str(teacher)})
    killed, stop = [], threading.Event()
    killer = threading.Thread(target=_kill_rollout_once_opd_runs, args=(cfg.run_dir / "metrics.jsonl", killed, stop), daemon=True)
    killer.start()
    if ray.is_initialized():
        ray.shutdown()
    try:
        result = run_pipeline(cfg)
    finally:
        stop.set()
        ray.shutdown()
    assert killed, "the rollout actor was never found to kill"
    events = read_events(cfg.run_dir / "metrics.jsonl")

    def values(component, name):
        return [e.value for e in events if e.component == component and e.name == name]

    assert values("driver", "phase")[-1] == "finished"
    assert len(values("learner", "staleness_max")) == cfg.opd.steps
    assert max(values("learner", "staleness_max")) <= cfg.opd.max_staleness
    assert values("driver", "restarts/rollout")[-1] >= 1 or values("driver", "actor_restart")  # the crash was seen
    final = result["final_policy_version"]
    assert final == cfg.opd.steps and values("rollout", "served_versions")[-1] == [final]  # resynced to the end
