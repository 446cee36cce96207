"""The learner on one GPU (nccl, alltoall dispatcher, no CPU shims). Skipped without CUDA.

Written without a GPU at hand (the CPU path is what the other learner tests cover): the
first GPU run is its first real check. Tolerance: logits atol 1e-3 in float32 (cuBLAS may
reorder sums; TF32 stays off for float32 matmuls by PyTorch's default).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_one_gpu_parity_training_and_export(tmp_path):
    from learner.config import SFTStage
    from learner.router import routers
    from learner.testing import load_hf_reference, tiny_checkpoint
    from learner.train import Learner

    ckpt = tiny_checkpoint("glm4_moe_lite", tmp_path / "ckpt", initializer_range=0.1)
    learner = Learner(ckpt, None, SFTStage(lr=1e-2, schedule="constant", warmup_frac=0.0))
    assert learner.model.config.moe_token_dispatcher_type == "alltoall"
    assert next(learner.model.parameters()).is_cuda
    hf = load_hf_reference(ckpt).cuda()
    tokens = torch.randint(0, 64, (3, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(tokens.cuda()).logits.float().cpu()
    torch.testing.assert_close(learner.logits(tokens), ref, atol=1e-3, rtol=0)
    assert routers(learner.model)[0].weight.dtype == torch.float32

    rng = np.random.default_rng(0)
    batch = {"tokens": rng.integers(0, 64, (4, 12)), "loss_mask": np.tile(np.r_[[0] * 4 + [1] * 8], (4, 1))}
    ms = [learner.train_step(batch) for _ in range(3)]
    assert ms[-1]["sft_loss"] < ms[0]["sft_loss"]
    out = learner.export_hf(tmp_path / "student")
    again = load_hf_reference(out).cuda()
    with torch.no_grad():
        torch.testing.assert_close(learner.logits(tokens), again(tokens.cuda()).logits.float().cpu(), atol=1e-3, rtol=0)
    learner.save(tmp_path / "state")
    learner.close()
