"""The Ray LearnerGroup with EP=2 on a local Ray: SFT steps, weights published in buckets, OPD switch.

The published buckets are applied to the transformers model (zeda_rl.weights.apply_update,
what a rollout engine does) and must give the learner's logits (atol 1e-4, float32).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

ray = pytest.importorskip("ray")

from learner.config import LearnerSection, OPDStage, SFTStage  # noqa: E402
from learner.testing import load_hf_reference, tiny_checkpoint  # noqa: E402
from zeda_rl.weights import WeightUpdate, apply_update, unpack_bucket  # noqa: E402


@pytest.fixture(scope="module")
def local_ray():
    started = False
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        started = True
    yield
    if started:
        ray.shutdown()


def test_learner_group_ep2_trains_and_exports(local_ray, tmp_path):
    from learner.actor import LearnerGroup

    ckpt = tiny_checkpoint("qwen3_moe", tmp_path / "ckpt", initializer_range=0.1)
    sft = SFTStage(lr=1e-2, schedule="constant", warmup_frac=0.0)
    group = LearnerGroup(ckpt, LearnerSection(ep=2, bucket_bytes=256 << 20), sft)
    try:
        assert group.world_size == 2 and group.info["num_experts"] == 8
        rng = np.random.default_rng(0)
        batch = {"tokens": rng.integers(0, 64, (4, 12)), "loss_mask": np.tile(np.r_[[0] * 4 + [1] * 8], (4, 1))}
        ms = [group.train_step(sft, batch, data_cursor={"i": i}) for i in range(3)]
        assert ms[-1]["sft_loss"] < ms[0]["sft_loss"]
        json.dumps(ms)  # plain data only
        assert all(len(m["zero_ratio_per_layer"]) == 2 and m["aux_loss"] > 0 for m in ms)
        assert group.state() == {"step": 3, "stage": "sft", "data_cursor": {"i": 2}, "saved_step": None}

        push = group.publish(4)  # what the ranks publish (one bucket each here), fetched as an engine does
        upd = WeightUpdate(push.version, [unpack_bucket(ray.get(r), push.version) for r in push.refs])
        assert upd.version == 4 and len(upd.buckets) == 2
        names = [n for n, _ in upd.named_tensors()]
        assert len(names) == len(set(names))
        assert sum(1 for n in names if ".mlp.experts." in n) == 2 * 8 * 3  # per-expert names, experts of both ranks
        # what a rollout engine does with them: apply to the transformers model, then it serves the learner's weights
        hf = load_hf_reference(ckpt)
        assert {n for n in names if ".mlp.experts." not in n} <= set(hf.state_dict())
        assert apply_update(hf, upd) == 4
        tokens = rng.integers(0, 64, (2, 9))
        with torch.no_grad():
            ref = hf(torch.as_tensor(tokens)).logits.numpy()
        np.testing.assert_allclose(group.logits(tokens), ref, atol=1e-4, rtol=0)

        # OPD through the same group: the stage switches to the section given
        b = dict(
            batch, behaviour_logprobs=np.zeros((4, 12), np.float32), teacher_logprobs=np.zeros((4, 12), np.float32)
        )
        m = group.train_step(OPDStage(lr=1e-3), b)
        assert m["lr"] == 1e-3 and "reverse_kl" in m and group.stage == "opd"
    finally:
        group.shutdown()


def test_tiny_cpu_yaml_reaches_the_learner_unchanged(local_ray, tmp_path):
    """The embedded default's learner runs with exactly what launch/configs/tiny-cpu.yaml says, in both stages."""
    from pathlib import Path

    import yaml

    from launch.config import load_config
    from learner.actor import LearnerGroup

    path = Path(__file__).parents[1] / "launch" / "configs" / "tiny-cpu.yaml"
    raw, cfg = yaml.safe_load(path.read_text()), load_config(path, {"output_dir": str(tmp_path)})
    group = LearnerGroup.from_run_config(cfg, tiny_checkpoint("qwen3_moe", tmp_path / "ckpt"))
    try:
        assert group.world_size == raw["learner"]["ep"] * raw["learner"]["dp"] == 2
        s = group.settings()
        assert s["config"] == cfg.learner.model_dump(mode="json") and raw["learner"].items() <= s["config"].items()
        assert (s["temperature"], s["seed"]) == (raw["sampling"]["temperature"], raw["seed"])
        sft = {k: raw["sft"][k] for k in ("steps", "lr", "schedule", "warmup_frac")}
        assert s["stage"] == {"name": "sft", "min_lr": 0.0, **sft}
        rng = np.random.default_rng(0)
        batch = {"tokens": rng.integers(0, 64, (4, 12)), "loss_mask": np.tile(np.r_[[0] * 4 + [1] * 8], (4, 1))}
        m = group.train_step(cfg.sft, batch)
        assert m["lr"] == pytest.approx(
            raw["sft"]["lr"] / round(raw["sft"]["warmup_frac"] * raw["sft"]["steps"])
        )  # warmup step 1

        b = dict(
            batch, behaviour_logprobs=np.zeros((4, 12), np.float32), teacher_logprobs=np.zeros((4, 12), np.float32)
        )
        m = group.train_step(cfg.opd, b)
        s = group.settings()
        opd = {
            k: raw["opd"].get(k, v) for k, v in OPDStage().model_dump().items()
        }  # the YAML's keys, defaults elsewhere
        assert (
            s["stage"] == {"name": "opd", **opd}
            and opd["lr"] == raw["opd"]["lr"]
            and opd["steps"] == raw["opd"]["steps"]
        )
        assert m["lr"] == raw["opd"]["lr"] and group.state()["stage"] == "opd"
        assert s["config"] == cfg.learner.model_dump(mode="json") and s["temperature"] == raw["sampling"]["temperature"]
    finally:
        group.shutdown()


@pytest.mark.slow  # 30-45 s: CI runs it; `make test` stays under 15 minutes without it
def test_sft_command_runs_two_ep_ranks(tmp_path):
    """The documented demo: `python -m launch.learner_sft --make-tiny ... --ep 2 --steps 3` in its own process and Ray."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    cmd = [
        sys.executable,
        "-m",
        "launch.learner_sft",
        "--make-tiny",
        "glm4_moe_lite",
        "--checkpoint",
        str(tmp_path / "tiny"),
        "--ep",
        "2",
        "--steps",
        "3",
        "--json",
        "--export",
        str(tmp_path / "student"),
    ]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    steps = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [m["step"] for m in steps] == [1, 2, 3]
    assert steps[-1]["sft_loss"] < steps[0]["sft_loss"]
    assert (tmp_path / "student" / "model.safetensors").is_file()
