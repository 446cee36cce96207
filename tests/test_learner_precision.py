"""The learner's memory knobs: recompute, chunked logprobs, bf16 with fp32 masters, Megatron's
distributed optimiser, and the refusals of what cannot run (flash without TE on a GPU, cpu_offload in megatron-core 0.16.1).

Tolerances (fp32 unless said): recompute vs none and chunked vs plain logprobs, loss and gradients
atol 1e-6 (seen <= 1e-7); bf16 + full recompute + chunked logprobs vs fp32 from the same bf16
checkpoint, SFT loss over 3 steps within 0.2% relative (seen <= 0.01%), L_GA within 5%; distributed vs local optimiser over 2 gloo ranks, losses
1e-6, parameters after 2 AdamW steps (lr 1e-2) atol 1e-4 = lr/100 (see test_learner_ep; seen <= 1e-5); bf16 with
EP=2 and the distributed optimiser vs local fp32, losses within 1% relative.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from learner import bridge, layer_specs, logprob, optim
from learner.config import LearnerSection, OPDStage, SFTStage, not_implemented
from learner.megatron_config import load_hf_config, model_info, transformer_config
from learner.model import forward_logits
from learner.parallel import free_port
from learner.publish import owned_buckets
from learner.router import ZeroExpertRouter, last_routing, record_routing, routers
from learner.testing import tiny_checkpoint
from learner.train import Learner
from zeda_rl.losses import token_logprobs

FAMILIES = ["qwen3_moe", "glm4_moe_lite"]
SFT = SFTStage(lr=1e-2, schedule="constant", warmup_frac=0.0)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("learner_precision")
    return {f: tiny_checkpoint(f, root / f) for f in FAMILIES}


def batch(seed=0, b=4, s=12, opd=False, routed=None):
    rng = np.random.default_rng(seed)
    out = {
        "tokens": rng.integers(0, 64, (b, s)),
        "loss_mask": np.zeros((b, s), np.uint8),
        "attention_mask": np.ones((b, s), np.uint8),
    }
    out["loss_mask"][:, 4:] = 1
    out["attention_mask"][1, 9:] = 0
    if opd:
        out["behaviour_logprobs"] = rng.normal(-2, 0.5, (b, s)).astype(np.float32)
        out["teacher_logprobs"] = rng.normal(-2, 0.5, (b, s)).astype(np.float32)
    if routed is not None:
        out["routed_experts"] = routed
    return out


def make(ckpt, stage=SFT, temperature=1.0, **kw):
    return Learner(ckpt, LearnerSection(**{"micro_batch_tokens": 24, **kw}), stage, temperature=temperature)


def grads_of(learner, b):
    st = learner.accumulate(b)
    g = {k: v.clone() for k, v in bridge.full_hf_state(learner.model, cast=False, grads=True)}
    return st, g


def assert_same_step(a, b, atol=1e-6):
    (sa, ga), (sb, gb) = a, b
    assert sa["sums"]["main"] == pytest.approx(sb["sums"]["main"], abs=atol)
    torch.testing.assert_close(sa["aux"], sb["aux"], atol=atol, rtol=0)
    assert torch.equal(sa["zero_slots"], sb["zero_slots"])  # routing ids recorded once per forward
    for k in ga:
        torch.testing.assert_close(ga[k], gb[k], atol=atol, rtol=1e-5, msg=k)


@pytest.mark.parametrize("family", FAMILIES)
def test_recompute_equals_none(ckpts, family):
    b = batch()
    ref = grads_of(make(ckpts[family]), b)
    for mode in ("selective", "full"):
        assert_same_step(grads_of(make(ckpts[family], recompute=mode), b), ref)


def test_full_recompute_replays_and_records_routing_once(ckpts):
    """OPD with replayed ids: the recompute pass in the backward must route with them too."""
    ck = ckpts["glm4_moe_lite"]
    none = make(ck, OPDStage(lr=1e-2))
    info = none.info
    rng = np.random.default_rng(1)
    routed = np.stack(
        [rng.permutation(info.router.total)[: info.router.top_k] for _ in range(len(info.moe_layers) * 48)]
    )
    b = batch(opd=True, routed=routed.reshape(4, 12, len(info.moe_layers), -1))
    full = make(ck, OPDStage(lr=1e-2), recompute="full")
    assert_same_step(grads_of(full, b), grads_of(none, b))
    # a training forward + backward under record_routing: one set of ids, not two
    tokens = torch.as_tensor(b["tokens"])
    full.model.train()
    with record_routing(full.model, 4, 12) as ids:
        forward_logits(full.model, tokens).float().sum().backward()
        rec = ids()
    assert tuple(rec.shape) == (4, 12, len(info.moe_layers), info.router.top_k)
    assert torch.equal(rec, last_routing(full.model, 4, 12))


def test_chunked_logprob_equals_plain():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 13, 16, generator=g).requires_grad_()
    weight = (0.3 * torch.randn(50, 16, generator=g)).requires_grad_()  # logits of std ~1.7, as a model's
    tokens = torch.randint(0, 50, (3, 13), generator=g)
    up = torch.randn(3, 12, generator=g)
    plain = token_logprobs((hidden @ weight.t()) / 0.7, tokens)
    (plain * up).sum().backward()
    want = [plain.detach(), hidden.grad.clone(), weight.grad.clone()]
    hidden.grad = weight.grad = None
    got = logprob.token_logprobs(hidden, weight, tokens, chunk=5, temperature=0.7)  # 36 tokens: a short last chunk
    (got * up).sum().backward()
    for x, y in zip([got.detach(), hidden.grad, weight.grad], want):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-6)


def _largest_saved_logits(learner, b) -> int:
    """Elements of the largest tensor autograd keeps whose last dim is the vocabulary, over a step's backward graph."""
    vocab, sizes = learner.info.vocab_size, [0]

    def pack(t):
        if t.dim() and t.shape[-1] == vocab:
            sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = grads_of(learner, b)
    return max(sizes), out


def test_chunked_logprob_in_the_learner(ckpts):
    """OPD at temperature 0.7 (the student's logprobs at the rollout temperature) and SFT; no [tokens, V]
    tensor is kept for the backward (the plain path keeps the micro-batch's log-softmax)."""
    ck = ckpts["qwen3_moe"]
    for stage, b in ((OPDStage(lr=1e-2), batch(opd=True)), (SFT, batch(seed=3))):
        plain, ref = _largest_saved_logits(make(ck, stage, temperature=0.7), b)
        chunked, got = _largest_saved_logits(make(ck, stage, temperature=0.7, logits_chunk_tokens=7), b)
        assert_same_step(got, ref)
        assert plain >= 2 * 11 * 64 and chunked == 0  # micro-batches of 2 rows x 11 predicted tokens, V = 64


def test_bf16_tracks_fp32_keeps_fp32_masters_and_resumes_exactly(tmp_path):
    ck = tiny_checkpoint("qwen3_moe", tmp_path / "bf16", dtype=torch.bfloat16)  # as real checkpoints and engines are
    ref, lo = make(ck), make(ck, precision="bf16", recompute="full", logits_chunk_tokens=16)
    for i in range(3):
        a, b = ref.train_step(batch(seed=0)), lo.train_step(batch(seed=0))
        print(f"step {i}: fp32 {a['sft_loss']:.5f} bf16 {b['sft_loss']:.5f}")
        assert b["sft_loss"] == pytest.approx(a["sft_loss"], rel=2e-3)
        assert b["aux_loss"] == pytest.approx(a["aux_loss"], rel=5e-2)
    fp32 = {id(r.weight) for r in routers(lo.model)}
    for name, p in lo.model.named_parameters():
        assert p.dtype == (torch.float32 if id(p) in fp32 else torch.bfloat16), name
        if id(p) not in fp32:  # the bf16 weight is the rounded fp32 master
            assert p.main_param.dtype == torch.float32 and torch.equal(p.data, p.main_param.to(torch.bfloat16)), name
    # weight push / HF export in the checkpoint's (engine's) bf16: the bf16 weights, the fp32 routers rounded
    published = [named for bucket in owned_buckets(lo.model, 1 << 20) for named in bucket]  # learner.publish
    mine = dict(bridge.full_hf_state(lo.model, cast=False))
    assert {n for n, _ in published} == set(mine)
    for name, t in published:
        assert t.dtype == torch.bfloat16 and torch.equal(t, mine[name].to(torch.bfloat16)), name
    # exact resume: fp32 masters and Adam state come back
    lo.save(tmp_path / "ck")
    m = lo.train_step(batch(seed=5))
    after = dict(bridge.full_hf_state(lo.model, cast=False))
    lo.load(tmp_path / "ck")
    r = lo.train_step(batch(seed=5))
    assert r["loss"] == m["loss"] and r["grad_norm"] == m["grad_norm"]
    assert all(torch.equal(v, after[k]) for k, v in bridge.full_hf_state(lo.model, cast=False))
    # the next stage starts Adam afresh and keeps the fp32 masters
    masters = [p.main_param.clone() for p in lo.model.parameters() if hasattr(p, "main_param")]
    lo.set_stage(OPDStage(lr=0.0))
    assert all(not o.optimizer.state for o in lo.optimizer.chained_optimizers)
    lo.train_step(batch(opd=True))
    assert all(
        torch.equal(a, p.main_param)
        for a, p in zip(masters, [p for p in lo.model.parameters() if hasattr(p, "main_param")])
    )


def _dist_worker(rank, world, port, ckpt, out):
    shard = {k: v[rank * 2 : (rank + 1) * 2] for k, v in batch().items()}
    result = {}
    layouts = {
        "local": {},
        "distributed": dict(optimizer="distributed"),
        # experts get their own sharded optimiser; full recompute reruns the dispatcher's collectives in the backward
        "bf16_ep2": dict(optimizer="distributed", precision="bf16", ep=2, recompute="full", logits_chunk_tokens=16),
    }
    for opt, kw in layouts.items():
        learner = Learner(
            ckpt, LearnerSection(micro_batch_tokens=24, **kw), SFT, rank=rank, world_size=world, master_port=port
        )
        ms = [learner.train_step(shard) for _ in range(2)]
        result[opt] = (
            [m["loss"] for m in ms],
            {k: v.clone() for k, v in bridge.full_hf_state(learner.model, cast=False)},
        )
        if opt == "distributed":  # each rank's shard of the master weights and Adam state resumes exactly
            learner.save(out / "ck")
            m3 = learner.train_step(shard)
            learner.load(out / "ck")
            result["resume"] = learner.train_step(shard)["loss"] == m3["loss"]
        result[opt + "_optimizers"] = [type(o).__name__ for o in getattr(learner.optimizer, "chained_optimizers", [])]
    learner.close()
    torch.save(result, out / f"rank{rank}.pt")


def test_distributed_optimizer_matches_local_over_two_ranks(ckpts, tmp_path):
    mp.spawn(_dist_worker, args=(2, free_port(), ckpts["glm4_moe_lite"], tmp_path), nprocs=2)
    for rank in range(2):
        r = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert r["distributed_optimizers"] == ["DistributedOptimizer"] and r["resume"]
        assert r["bf16_ep2_optimizers"] == ["DistributedOptimizer"] * 2  # dense and expert parameters
        (la, pa), (lb, pb), (lc, _) = r["local"], r["distributed"], r["bf16_ep2"]
        assert lb == pytest.approx(la, abs=1e-6) and lc == pytest.approx(la, rel=1e-2)
        for k in pa:
            torch.testing.assert_close(pb[k], pa[k], atol=1e-4, rtol=0, msg=k)


def test_flash_needs_te_on_a_gpu_and_plugs_into_the_local_spec(ckpts, monkeypatch):
    with pytest.raises(RuntimeError, match="needs transformer_engine on a GPU"):
        make(ckpts["qwen3_moe"], attention="flash")
    info = model_info(load_hf_config(ckpts["glm4_moe_lite"]))
    cfg = transformer_config(info)
    local = layer_specs.block_spec(info, cfg)
    assert {layer.submodules.self_attention.submodules.core_attention for layer in local.layer_specs} == {
        layer_specs.MLACoreAttention
    }

    class FakeTECoreAttention:  # what the TE spec would hand over
        pass

    import megatron.core.models.gpt.gpt_layer_specs as specs

    te = specs.get_gpt_layer_local_spec(num_experts=None, qk_layernorm=True, multi_latent_attention=True)
    te = layer_specs._attention_spec(te, FakeTECoreAttention)
    monkeypatch.setattr(layer_specs, "flash_unavailable", lambda: "")
    monkeypatch.setattr(specs, "get_gpt_layer_with_transformer_engine_spec", lambda **kw: te)
    flash = layer_specs.block_spec(info, cfg, attention="flash")
    for i, (a, b) in enumerate(zip(flash.layer_specs, local.layer_specs)):
        sa = a.submodules.self_attention.submodules
        assert sa.core_attention is FakeTECoreAttention and sa.q_layernorm is not None
        if i in info.moe_layers:  # the zero-expert router is in the flash spec too
            assert a.submodules.mlp.submodules.router.func is ZeroExpertRouter


def test_the_config_refuses_tp_with_chunked_logprobs_and_cpu_offload_only_and_so_does_the_learner(ckpts):
    knobs = dict(
        precision="bf16", recompute="full", optimizer="distributed", attention="flash", logits_chunk_tokens=4096
    )
    assert not_implemented(LearnerSection(**knobs)) == []
    assert not_implemented(LearnerSection(**{**knobs, "tp": 4, "logits_chunk_tokens": None})) == []
    refused = not_implemented(LearnerSection(**{**knobs, "tp": 4, "optimizer": "cpu_offload"}))
    assert [m.split(":")[0] for m in refused] == ["learner.optimizer", "learner.logits_chunk_tokens"]
    assert "HybridDeviceOptimizer" in refused[0]
    with pytest.raises(NotImplementedError, match="learner.optimizer: cpu_offload is planned but not runnable"):
        make(ckpts["qwen3_moe"], optimizer="cpu_offload")
    assert optim.uses_megatron(LearnerSection(precision="bf16")) and not optim.uses_megatron(LearnerSection())
