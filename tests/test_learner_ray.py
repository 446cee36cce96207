"""The Ray LearnerGroup with EP=2 on a local Ray: SFT steps, weight export in buckets, OPD switch.

The exported buckets are applied to the transformers model (zeda_rl.weights.apply_update,
what a rollout engine does) and must give the learner's logits (atol 1e-4, float32).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

ray = pytest.importorskip("ray")

from learner.testing import load_hf_reference, tiny_checkpoint  # noqa: E402
from learner.train import LearnerConfig  # noqa: E402
from zeda_rl.weights import apply_update, decode_update  # noqa: E402


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
    cfg = LearnerConfig(lr=1e-2, schedule="constant", warmup_steps=0, ep_size=2)
    group = LearnerGroup(ckpt, cfg, stage_overrides={"opd": {"lr": 1e-3}})
    try:
        assert group.world_size == 2 and group.info["num_experts"] == 8
        rng = np.random.default_rng(0)
        batch = {"tokens": rng.integers(0, 64, (4, 12)), "loss_mask": np.tile(np.r_[[0] * 4 + [1] * 8], (4, 1))}
        ms = [group.train_step(batch, data_cursor={"i": i}) for i in range(3)]
        assert ms[-1]["sft_loss"] < ms[0]["sft_loss"]
        json.dumps(ms)  # plain data only
        assert all(len(m["zero_ratio_per_layer"]) == 2 and m["aux_loss"] > 0 for m in ms)
        assert group.state() == {"step": 3, "stage": "sft", "data_cursor": {"i": 2}}

        upd = group.export_buckets(version=4, bucket_bytes=8192)
        assert upd.version == 4 and len(upd.buckets) > 1
        names = [n for n, _ in upd.named_tensors()]
        assert len(names) == len(set(names))
        frames = group.export_update(version=5)
        again = decode_update(frames, copy=True)
        assert again.version == 5 and [n for n, _ in again.named_tensors()] == names
        # what a rollout engine does with them: apply to the transformers model, then it serves the learner's weights
        hf = load_hf_reference(ckpt)
        assert set(names) == set(hf.state_dict())
        assert apply_update(hf, again) == 5
        tokens = rng.integers(0, 64, (2, 9))
        with torch.no_grad():
            ref = hf(torch.as_tensor(tokens)).logits.numpy()
        np.testing.assert_allclose(group.logits(tokens), ref, atol=1e-4, rtol=0)
        ck = group.export_buckets(version=6, layout="checkpoint")
        assert sum(1 for n, _ in ck.named_tensors() if ".mlp.experts." in n) == 2 * 8 * 3  # experts of both ranks

        # OPD through the same group: the stage switches with its preset
        b = dict(batch, behaviour_logprobs=np.zeros((4, 12), np.float32), teacher_logprobs=np.zeros((4, 12), np.float32))
        m = group.train_step("opd", b)
        assert m["lr"] == 1e-3 and "reverse_kl" in m and group.stage == "opd"
    finally:
        group.shutdown()


def test_sft_command_runs_two_ep_ranks(tmp_path):
    """The documented demo: `python -m learner.sft --make-tiny ... --ep 2 --steps 3` in its own process and Ray."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "learner.sft", "--make-tiny", "glm4_moe_lite", "--checkpoint", str(tmp_path / "tiny"),
           "--ep", "2", "--steps", "3", "--json", "--export", str(tmp_path / "student")]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    steps = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [m["step"] for m in steps] == [1, 2, 3]
    assert steps[-1]["sft_loss"] < steps[0]["sft_loss"]
    assert (tmp_path / "student" / "model.safetensors").is_file()
