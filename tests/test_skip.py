"""The skipping experts path (`zeda_rl.skip`, "zeda_skip"): same numbers as the stock fused experts
with sentinel ids, expert work equal to the routed (token, real expert) pairs, same generations."""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM

import zeda_rl  # noqa: F401  (registers the Auto classes)
from learner.testing import tiny_checkpoint
from tests.helpers import widen_zero_rows
from zeda_rl import skip
from zeda_rl.modeling import moe_blocks, record_routing, replay_routing, set_baseline_options

FAMILIES = ("qwen3_moe", "glm4_moe_lite")
N = 8  # real experts of the tiny configs (K = 2)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("skip")
    return {f: tiny_checkpoint(f, root / f, zero_experts=8, initializer_range=0.1) for f in FAMILIES}


def _load(path, impl=None):
    kw = {"experts_implementation": impl} if impl else {}
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw).eval()


def _stock(model, impl="grouped_mm"):
    """The previous path on the same weights: transformers' fused experts fed the sentinel ids."""
    model.set_experts_implementation(impl)
    return model


def test_default_is_skipping_and_explicit_choice_is_kept(checkpoints):
    for path in checkpoints.values():
        assert _load(path).config._experts_implementation == skip.NAME
        assert _load(path, "grouped_mm").config._experts_implementation == "grouped_mm"
        assert _load(path, "eager").config._experts_implementation == "eager"
        m = _load(path, "batched_mm")  # clamps sentinels onto a real expert: still refused
        with pytest.raises(ValueError, match="batched_mm"), torch.no_grad():
            m(torch.tensor([[3, 4, 5]]))


@pytest.mark.parametrize("family", FAMILIES)
def test_experts_function_equals_stock_on_random_ids(checkpoints, family):
    """The experts module alone, on random ids over all N+N_Z slots (many rows with 0 real experts)."""
    model = _load(checkpoints[family])
    experts = moe_blocks(model)[0].experts
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, experts.hidden_dim, generator=g)
    ids = torch.randint(0, 2 * N, (64, 2), generator=g)
    ids[:8] = N + torch.randint(0, N, (8, 2), generator=g)  # rows routed to no real expert
    w = torch.rand(64, 2, generator=g)
    zero = ids >= N
    got = skip.skip_experts_forward(experts, x, ids, w)  # raw zero ids: compacted out, never indexed
    assert torch.equal(got, experts(x, ids.masked_fill(zero, N), w.masked_fill(zero, 0.0)))  # what the block hands it
    for impl in ("grouped_mm", "eager"):
        _stock(model, impl)
        ref = experts(x, ids.masked_fill(zero, N), w.masked_fill(zero, 0.0))
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert zero.all(1).sum() >= 8 and torch.equal(got[zero.all(1)], torch.zeros_like(got[zero.all(1)]))
    empty = skip.skip_experts_forward(experts, x[:0], ids[:0], w[:0])
    assert empty.shape == (0, experts.hidden_dim)
    everything_zero = skip.skip_experts_forward(experts, x, torch.full_like(ids, N), w)
    assert torch.equal(everything_zero, torch.zeros_like(x))


CASES = [
    ({}, False),
    ({"static_top_k": 1}, False),
    ({"skip_threshold": 0.6}, False),
    ({}, True),
    ({"static_top_k": 1}, True),
]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    "options,forced", CASES, ids=["plain", "static_top_k", "skip_threshold", "replay", "replay_static_top_k"]
)
def test_block_and_model_equal_stock_path(checkpoints, family, options, forced):
    """Every MoE block and the whole model, skipping vs the stock fused experts with sentinels,
    with the baselines' routing options, natural routing or a replay that sends some tokens to
    zero experts only (their routed output is exactly 0; GLM's shared expert still runs)."""
    model = _load(checkpoints[family])
    widen_zero_rows(model, 2.0)
    set_baseline_options(model, **options)
    ids = torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), record_routing(model) as rec:
        model(ids)
    routed = rec()  # [B, S, L, K]
    if forced:
        routed = routed.clone()
        routed[:, ::3] = N + torch.arange(2)  # every third token: both slots on zero experts
    blocks = moe_blocks(model)
    with torch.no_grad(), replay_routing(model, routed) if forced else nullcontext():
        with record_routing(model) as rec_new:
            new_logits = model(ids).logits
    # each block on the same random hidden states, with the same routing replayed for both paths
    xs = [
        torch.randn(3, 12, blk.experts.hidden_dim, generator=torch.Generator().manual_seed(7 + i)) * 2
        for i, blk in enumerate(blocks)
    ]
    chosen = rec_new()
    block_new = _block_outputs(blocks, xs, chosen if options.get("skip_threshold") is None else None)

    _stock(model)
    with torch.no_grad(), replay_routing(model, routed) if forced else nullcontext():
        with record_routing(model) as rec_old:
            old_logits = model(ids).logits
    assert torch.equal(rec_old(), chosen)
    torch.testing.assert_close(new_logits, old_logits, rtol=1e-5, atol=1e-5)
    block_old = _block_outputs(blocks, xs, chosen if options.get("skip_threshold") is None else None)
    for (new, none_real), (old, _) in zip(block_new, block_old):
        torch.testing.assert_close(new, old, rtol=1e-5, atol=1e-6)

    zero_share = float((chosen >= N).float().mean())
    assert zero_share > (0.5 if options.get("static_top_k") else 0.2), zero_share
    # tokens routed to 0 real experts: the routed part of the block's output is exactly 0
    assert any(bool(m.any()) for _, m in block_new)
    for blk, x, (new, none_real) in zip(blocks, xs, block_new):
        with torch.no_grad():
            rest = blk.shared_experts(x) if hasattr(blk, "shared_experts") else torch.zeros_like(x)
        assert torch.equal(new[none_real], rest[none_real])


def _block_outputs(blocks, xs, routed):
    """(output [B, S, H], mask [B, S] of tokens with no real expert) of every block on its input;
    `routed` [B, S, L, K] is replayed when given (skip_threshold cannot be replayed: natural routing)."""
    outs = []
    for i, (blk, x) in enumerate(zip(blocks, xs)):
        blk.record = []
        if routed is not None:
            blk.replay, blk.replay_pos = routed[:, :, i], 0
        with torch.no_grad():
            y = blk(x)
        ids = blk.record[0]
        blk.record, blk.replay, blk.replay_pos = None, None, 0
        outs.append((y, (ids >= N).all(-1)))
    return outs


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_equal_stock_path(checkpoints, family):
    """Under grad the skipping path is autograd-correct: the same loss and gradients (router included)."""
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(2))
    grads = {}
    for impl in (skip.NAME, "eager"):
        model = _load(checkpoints[family], impl).train()
        widen_zero_rows(model, 2.0)
        loss = torch.nn.functional.cross_entropy(model(ids).logits[:, :-1].reshape(-1, 64), ids[:, 1:].reshape(-1))
        loss.backward()
        grads[impl] = (loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
    (l_new, g_new), (l_old, g_old) = grads[skip.NAME], grads["eager"]
    torch.testing.assert_close(l_new, l_old, rtol=1e-6, atol=1e-6)
    assert g_new.keys() == g_old.keys() and any(".experts." in k for k in g_new) and any(".gate." in k for k in g_new)
    for k in g_new:
        torch.testing.assert_close(g_new[k], g_old[k], rtol=1e-4, atol=1e-6, msg=k)


class _ExpertRows(TorchDispatchMode):
    """Rows every matmul over a fused expert weight sees, per (layer, projection, expert): the
    weight operand of the matmul shares the storage of `experts.gate_up_proj` / `down_proj`, and
    its storage offset says which expert."""

    def __init__(self, model):
        super().__init__()
        self.weights = {}
        for layer, blk in enumerate(moe_blocks(model)):
            for proj in ("gate_up_proj", "down_proj"):
                p = getattr(blk.experts, proj)
                self.weights[p.untyped_storage().data_ptr()] = (layer, proj, p[0].numel())
        self.rows: dict[tuple[int, str, int], int] = {}
        self.other_expert_ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for a in args:
            if isinstance(a, torch.Tensor) and a.untyped_storage().data_ptr() in self.weights:
                layer, proj, per_expert = self.weights[a.untyped_storage().data_ptr()]
                if func is torch.ops.aten.mm.default and a is args[1]:
                    key = (layer, proj, a.storage_offset() // per_expert)
                    self.rows[key] = self.rows.get(key, 0) + int(args[0].shape[0])
                elif func not in (torch.ops.aten.select.int, torch.ops.aten.t.default):
                    self.other_expert_ops.append(func)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("family", FAMILIES)
def test_expert_rows_equal_routed_real_pairs(checkpoints, family):
    """Skipped pairs cost nothing: per layer and expert, the rows its two matmuls see are exactly
    the (token, real expert) pairs routed to it, at every zero share (all zero included)."""
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    totals = []
    for scale in (0.0, 1.0, 3.0, 10.0):
        model = _load(checkpoints[family])
        widen_zero_rows(model, scale)
        with torch.no_grad(), record_routing(model) as rec, _ExpertRows(model) as counter:
            model(ids)
        routed = rec()
        assert not counter.other_expert_ops, counter.other_expert_ops
        for layer in range(routed.shape[2]):
            mine = routed[:, :, layer]
            want = torch.bincount(mine[mine < N].reshape(-1), minlength=N).tolist()
            for proj in ("gate_up_proj", "down_proj"):
                got = [counter.rows.get((layer, proj, e), 0) for e in range(N)]
                assert got == want, (layer, proj, got, want)
        real = int((routed < N).sum())
        assert sum(counter.rows.values()) == 2 * real
        totals.append((float((routed >= N).float().mean()), real))
    shares = [s for s, _ in totals]
    assert shares[0] < 0.3 and shares[-1] > 0.7 and all(a < b for a, b in zip(shares, shares[1:])), totals

    model = _load(checkpoints[family])  # every slot on a zero expert: no expert matmul at all
    forced = torch.full((4, 16, len(moe_blocks(model)), 2), N)
    with torch.no_grad(), replay_routing(model, forced), _ExpertRows(model) as counter:
        model(ids)
    assert counter.rows == {}


@pytest.mark.parametrize("family", FAMILIES)
def test_torch_engine_generations_identical(checkpoints, family, tmp_path):
    """Greedy TorchEngine generations (batched, left-padded, KV cache) on a converted checkpoint whose
    zero experts take a good share of the slots: the same tokens, routed ids and logprobs."""
    from actors.torch_engine import TorchEngine
    from zeda_rl.sampling import SamplingParams

    model = _load(checkpoints[family])
    widen_zero_rows(model, 2.0)
    model.save_pretrained(tmp_path / "zeda")
    engine = TorchEngine(tmp_path / "zeda", threads=1)
    assert engine.model.config._experts_implementation == skip.NAME  # the engine's default: skipping
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(2, 64, (int(n),), generator=g).tolist() for n in (3, 9, 5, 12, 1, 7)]
    params = SamplingParams(temperature=0.0, max_new_tokens=10, stop_token_ids=())
    new = engine.generate(prompts, params)
    _stock(engine.model)
    old = engine.generate(prompts, params)
    routed = np.concatenate([s.routed_experts[:-1] for s in new])
    assert float((routed >= N).mean()) > 0.25
    for a, b in zip(new, old):
        assert a.output_ids == b.output_ids
        assert np.array_equal(a.routed_experts, b.routed_experts)
        np.testing.assert_allclose(a.logprobs, b.logprobs, rtol=0, atol=1e-5)
