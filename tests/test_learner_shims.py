"""Each CPU shim of learner.cpu_shims does what it claims (a megatron-core upgrade that breaks one fails here)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from learner import cpu_shims

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the shims apply only without CUDA")

TESTED = {
    "rng",
    "device_streams",
    "te_general_gemm",
    "mla_have_te",
    "alltoall_splits",
    "cuda_literals",
    "optimizer_param_types",
}


@pytest.fixture(scope="module", autouse=True)
def shims():
    assert cpu_shims.apply() is True
    return cpu_shims


@pytest.fixture(scope="module")
def world1():
    """A one-rank gloo world with Megatron's parallel state (shared with the other learner tests)."""
    from learner import parallel

    parallel.setup(0, 1, 1)
    return parallel


def test_every_shim_has_a_test_and_apply_is_idempotent():
    assert set(cpu_shims.SHIMS) == TESTED, "a shim was added or renamed: give it a test here"
    before = (torch.cuda.get_rng_state, torch.cuda.current_device)
    assert cpu_shims.apply() is True and cpu_shims.applied()
    assert (torch.cuda.get_rng_state, torch.cuda.current_device) == before


def test_rng_tracker_forks_on_the_cpu_generator():
    from megatron.core.tensor_parallel import random as mrandom

    torch.manual_seed(5)
    assert torch.equal(torch.cuda.get_rng_state(), torch.get_rng_state())
    state = torch.get_rng_state()
    torch.cuda.set_rng_state(state)
    assert torch.equal(mrandom._get_cuda_rng_state(), state)

    mrandom.model_parallel_cuda_manual_seed(123, tp_rank=0, ep_rank=0, etp_rank=0)
    after_seed = torch.get_rng_state()
    plain = torch.rand(4)
    torch.set_rng_state(after_seed)
    tracker = mrandom.get_cuda_rng_tracker()
    with tracker.fork(mrandom._EXPERT_PARALLEL_RNG_TRACKER_NAME):
        forked = torch.rand(4)
    assert not torch.equal(forked, plain)  # the fork draws from its own stream
    assert torch.equal(torch.rand(4), plain)  # and gives the default stream back untouched
    # different EP ranks get different expert streams
    mrandom.model_parallel_cuda_manual_seed(123, tp_rank=0, ep_rank=1, etp_rank=0)
    with mrandom.get_cuda_rng_tracker().fork(mrandom._EXPERT_PARALLEL_RNG_TRACKER_NAME):
        other = torch.rand(4)
    assert not torch.equal(other, forked)


def test_device_and_stream_dummies():
    dev = torch.cuda.current_device()
    assert torch.zeros(2, device=dev).device.type == "cpu"
    s = torch.cuda.Stream(device=dev)
    s.wait_stream(torch.cuda.current_stream())
    torch.cuda.default_stream().wait_stream(s)
    with torch.cuda.stream(s):
        x = torch.ones(3) * 2
    ev = torch.cuda.Event()
    ev.record(s)
    ev.synchronize()
    torch.cuda.synchronize()
    assert x.sum() == 6


def test_router_gating_gemm_without_transformer_engine():
    from megatron.core.transformer.moe import moe_utils

    assert moe_utils.te_general_gemm is None
    inp = torch.randn(5, 8, requires_grad=True)
    w = torch.randn(3, 8, requires_grad=True)
    out = moe_utils.router_gating_linear(inp, w, None, torch.float32)
    torch.testing.assert_close(out, inp @ w.T)
    out.sum().backward()
    torch.testing.assert_close(w.grad, inp.detach().sum(0).expand(3, 8))


def test_mla_module_knows_transformer_engine_is_absent():
    import megatron.core.transformer.multi_latent_attention as mla

    assert mla.HAVE_TE is False


def test_alltoall_split_sizes_become_host_arrays():
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    assert token_dispatcher.maybe_move_tensor_to_cpu is moe_utils.maybe_move_tensor_to_cpu
    t = torch.tensor([3, 1, 2])
    out = moe_utils.maybe_move_tensor_to_cpu(t, as_numpy=True)
    assert isinstance(out, np.ndarray) and out.tolist() == [3, 1, 2]
    assert moe_utils.maybe_move_tensor_to_cpu(t) is t


def test_cuda_literals_land_on_cpu(world1):
    from megatron.core.optimizer import clip_grads
    from megatron.core.transformer import utils as tutils

    mask = tutils.get_default_causal_mask(4)
    assert mask.device.type == "cpu" and torch.equal(mask, torch.triu(torch.ones(4, 4), 1).bool())

    g1, g2 = torch.tensor([3.0, 0.0]), torch.tensor([[4.0]])
    norm = clip_grads.get_grad_norm_fp32([g1, g2], grad_stats_parallel_group=world1.dp_group())
    assert norm == pytest.approx(5.0)

    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor([3.0, 4.0])
    clip_grads.clip_grad_by_total_norm_fp32([p], max_norm=1.0, total_norm=5.0)
    torch.testing.assert_close(p.grad, torch.tensor([0.6, 0.8]), atol=1e-6, rtol=1e-5)
    p.grad = torch.tensor([0.3, 0.4])
    clip_grads.clip_grad_by_total_norm_fp32([p], max_norm=1.0, total_norm=0.5)  # below the max: untouched
    torch.testing.assert_close(p.grad, torch.tensor([0.3, 0.4]))


def test_mixed_precision_optimizer_takes_host_parameters(world1):
    """Float16OptimizerWithFloat16Params keeps an fp32 master of a bf16 CPU parameter (upstream: TypeError)."""
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params

    w = torch.nn.Parameter(torch.tensor([1.0, 2.0 + 2**-10], dtype=torch.bfloat16))
    cfg = OptimizerConfig(optimizer="adam", bf16=True, lr=0.1)
    opt = Float16OptimizerWithFloat16Params(torch.optim.AdamW([w], lr=0.1), cfg, None, None)
    main = opt.optimizer.param_groups[0]["params"][0]
    assert main.dtype == torch.float32 and w.main_param is main and torch.equal(main, w.float())
    assert w.type() == "torch.BFloat16Tensor"  # Tensor.type is only renamed while an optimiser is built
