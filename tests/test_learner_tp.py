"""Tensor parallelism (with sequence parallelism) x expert parallelism on CPU processes (gloo) against one process.

World 2 with TP=2 and EP=2: both ranks form one TP group (one data-parallel rank: both get
all 4 rows, each holds half of every split tensor and half of the sequence between the TP
regions) and one EP group (4 of the 8 experts each); also with Megatron's DDP + distributed
optimiser and full recompute (GLM). World 4 with TP=2, EP=2, DP=2 adds dense
data parallelism over TP groups (rows split by `shard_rows`). The one-process reference runs
the same rows as the same micro-batches. The Qwen checkpoint has a vocabulary of 63, padded to
64 under TP (one padding row on rank 1), and eval uses an odd length (sequence padding).

Tolerances (float32, as tests/test_learner_ep.py): loss and L_GA abs 1e-6, grad norm rel 1e-5;
gradients per HF tensor atol 1e-6, rtol 1e-5 (seen <= 3e-7, the embedding's); eval logits
atol 1e-5 (seen ~1e-6); parameters after one AdamW step (lr 1e-2) atol 1e-4 = lr/100 (Adam's
first step turns round-off on tiny gradients into update differences). Exact: the HF round
trip, HF export and the published tensors (learner.publish) under TP (bit-exact), routing
ids recorded and replayed, zero ratios.
"""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from learner import bridge, parallel
from learner.actor import shard_rows
from learner.config import LearnerSection, OPDStage, SFTStage
from learner.megatron_config import check_tp, load_hf_config, model_info, padded_vocab
from learner.model import forward_logits
from learner.parallel import free_port
from learner.publish import owned_tensors
from learner.router import last_routing, record_routing, replay_routing
from learner.testing import tiny_checkpoints
from learner.train import Learner

ROWS = 4
VOCAB = {"qwen3_moe": 63, "glm4_moe_lite": 64}
SFT = SFTStage(lr=1e-2, schedule="constant", warmup_frac=0.0)
OPD = OPDStage(lr=1e-2)
TEMPERATURE = 0.7


def batch(vocab: int) -> dict:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (ROWS, 12), generator=g)
    loss_mask = torch.zeros(ROWS, 12, dtype=torch.uint8)
    loss_mask[:, 4:] = 1
    attn = torch.ones(ROWS, 12, dtype=torch.uint8)
    attn[1, 9:] = 0
    attn[3, 6:] = 0
    out = {"tokens": tokens.numpy(), "loss_mask": loss_mask.numpy(), "attention_mask": attn.numpy()}
    out["behaviour_logprobs"] = (-torch.rand(ROWS, 12, generator=g)).numpy()
    out["teacher_logprobs"] = (-2 * torch.rand(ROWS, 12, generator=g)).numpy()
    return out


def eval_inputs(info) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Odd-length tokens, a padding mask, and forced slot ids (K distinct per token, some rows -1)."""
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, info.vocab_size, (2, 11), generator=g)
    pad = torch.zeros(2, 11, dtype=torch.bool)
    pad[1, 8:] = True
    n_layers, k, total = len(info.moe_layers), info.router.top_k, info.router.total
    forced = torch.stack([torch.randperm(total, generator=g)[:k] for _ in range(n_layers * 2 * 11)]).reshape(
        2, 11, n_layers, k
    )
    forced[0, 3] = -1  # not recorded: the router chooses
    return tokens, pad, forced


def _eval(learner) -> dict:
    m = learner.model
    m.eval()
    tokens, pad, forced = eval_inputs(learner.info)
    with torch.no_grad():
        with record_routing(m, 2, 11) as ids:
            logits = forward_logits(m, tokens, pad)
            recorded = ids()
        with replay_routing(m, forced):
            replayed = forward_logits(m, tokens, pad)
        replayed_ids = last_routing(m, 2, 11)
    return dict(logits=logits, ids=recorded, replayed=replayed, replayed_ids=replayed_ids)


def _steps(learner, rows: dict) -> dict:
    """SFT grads + metrics, then OPD grads + metrics (at a temperature) and one update."""
    st = learner.accumulate(rows)
    gn = parallel.grad_norm(learner.model)
    sft = dict(
        metrics=learner.metrics(st, gn, 0.0, 1.0),
        grads={k: v.clone() for k, v in bridge.full_hf_state(learner.model, cast=False, grads=True)},
    )
    learner.set_stage(OPD)
    learner.temperature = TEMPERATURE
    st = learner.accumulate(rows)
    opd_grads = {k: v.clone() for k, v in bridge.full_hf_state(learner.model, cast=False, grads=True)}
    gn, lr = learner.update()
    params = {k: v.clone() for k, v in bridge.full_hf_state(learner.model, cast=False)}
    return dict(sft=sft, opd=dict(metrics=learner.metrics(st, gn, lr, 1.0), grads=opd_grads), params=params)


def _worker(rank, world, tp, ep, port, ckpt, out):
    cfg = LearnerSection(micro_batch_tokens=24, ep=ep, tp=tp, dp=world // ep)
    learner = Learner(ckpt, cfg, SFT, rank=rank, world_size=world, master_port=port)
    res = {}
    exported = dict(bridge.full_hf_state(learner.model))  # collective
    written = learner.export_hf(out / "export")
    torch.save(dict(owned_tensors(learner.model)), out / f"owned{rank}.pt")  # what this rank publishes
    if rank == 0:
        on_disk = load_file(ckpt / "model.safetensors")
        res["round_trip"] = set(exported) == set(on_disk) and all(torch.equal(exported[k], on_disk[k]) for k in on_disk)
        again = load_file(written / "model.safetensors")
        res["export_hf"] = set(again) == set(on_disk) and all(torch.equal(again[k], on_disk[k]) for k in on_disk)
        res["export_names"] = list(exported)
    res["eval"] = _eval(learner)
    full = batch(VOCAB[learner.info.family])
    res.update(_steps(learner, shard_rows(full, world, tp)[rank]))
    if world == tp:  # TP peers handed different rows are refused (rank 0: rows 0-1, rank 1: rows 2-3)
        try:
            learner.set_stage(SFT)
            learner.accumulate(shard_rows(full, world, 1)[rank])
            res["mismatch"] = None
        except ValueError as e:
            res["mismatch"] = str(e)
    if rank == 0:
        torch.save(res, out / "result.pt")
    learner.barrier()
    learner.close()


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    return tiny_checkpoints(tmp_path_factory.mktemp("learner_tp"), {f: {"vocab_size": v} for f, v in VOCAB.items()})


@pytest.fixture(scope="module")
def reference(ckpts):
    """TP=EP=1, one process, the same rows as two micro-batches (rows 0-1, 2-3)."""
    out = {}
    for family, ckpt in ckpts.items():
        learner = Learner(ckpt, LearnerSection(micro_batch_tokens=24), SFT)
        names = [n for n, _ in bridge.full_hf_state(learner.model)]
        out[family] = dict(eval=_eval(learner), export_names=names, **_steps(learner, batch(VOCAB[family])))
        learner.close()
    return out


def _published_once(out, world: int, ckpt) -> None:
    """The ranks' published tensors (learner.publish) are the checkpoint, each tensor from exactly one rank."""
    owned = [torch.load(out / f"owned{r}.pt", weights_only=False) for r in range(world)]
    on_disk = load_file(ckpt / "model.safetensors")
    assert sum(len(o) for o in owned) == len(on_disk)
    merged = {k: v for o in owned for k, v in o.items()}
    assert set(merged) == set(on_disk) and all(torch.equal(merged[k], on_disk[k]) for k in on_disk)


def _same_step(res: dict, ref: dict) -> None:
    for stage in ("sft", "opd"):
        m, rm = res[stage]["metrics"], ref[stage]["metrics"]
        for k in ("loss", "aux_loss", "nll") + (("reverse_kl", "policy_loss") if stage == "opd" else ()):
            assert m[k] == pytest.approx(rm[k], abs=1e-6), (stage, k)
        assert m["zero_ratio_per_layer"] == pytest.approx(rm["zero_ratio_per_layer"], abs=1e-12), stage
        assert m["tokens"] == rm["tokens"] and m["response_tokens"] == rm["response_tokens"]
        assert m["grad_norm"] == pytest.approx(rm["grad_norm"], rel=1e-5), stage
        assert set(res[stage]["grads"]) == set(ref[stage]["grads"])
        for k, g in ref[stage]["grads"].items():
            torch.testing.assert_close(res[stage]["grads"][k], g, atol=1e-6, rtol=1e-5, msg=f"{stage} {k}")
    for k, p in ref["params"].items():
        torch.testing.assert_close(res["params"][k], p, atol=1e-4, rtol=0, msg=k)


@pytest.mark.parametrize("family", ["qwen3_moe", "glm4_moe_lite"])
def test_tp2_ep2_matches_one_process(ckpts, reference, tmp_path, family):
    mp.spawn(_worker, args=(2, 2, 2, free_port(), ckpts[family], tmp_path), nprocs=2, join=True)
    res = torch.load(tmp_path / "result.pt", weights_only=False)
    ref = reference[family]
    assert res["round_trip"], "HF -> Megatron (TP- and EP-sharded) -> HF is not bit-exact"
    _published_once(tmp_path, 2, ckpts[family])
    assert res["export_hf"], "the HF checkpoint exported under TP differs from the source"
    assert res["export_names"] == ref["export_names"]
    ev, rev = res["eval"], ref["eval"]
    assert torch.equal(ev["ids"], rev["ids"]), "routing ids recorded under TP differ"
    torch.testing.assert_close(ev["logits"], rev["logits"], atol=1e-5, rtol=0)
    forced = eval_inputs(model_info(load_hf_config(ckpts[family])))[2]
    keep = (forced >= 0).all(-1, keepdim=True).expand_as(forced)
    assert torch.equal(ev["replayed_ids"][keep], forced[keep]), "replayed ids not applied to the right tokens"
    assert torch.equal(ev["replayed_ids"], rev["replayed_ids"])
    torch.testing.assert_close(ev["replayed"], rev["replayed"], atol=1e-5, rtol=0)
    _same_step(res, ref)
    assert res["mismatch"] is not None and "different batch shares" in res["mismatch"]


def test_tp2_ep2_dp2_matches_one_process(ckpts, reference, tmp_path):
    """World 4: two TP groups as data-parallel ranks (dense grads over DP after the TP sums)."""
    family = "qwen3_moe"
    mp.spawn(_worker, args=(4, 2, 2, free_port(), ckpts[family], tmp_path), nprocs=4, join=True)
    res = torch.load(tmp_path / "result.pt", weights_only=False)
    assert res["round_trip"] and res["export_hf"]
    _published_once(tmp_path, 4, ckpts[family])
    assert torch.equal(res["eval"]["ids"], reference[family]["eval"]["ids"])
    _same_step(res, reference[family])


def test_layout_validation_and_row_shards(ckpts):
    from learner.config import not_implemented

    assert not any(m.startswith("learner.tp") for m in not_implemented(LearnerSection(ep=2, tp=2)))
    with pytest.raises(ValueError, match="not a multiple of the tensor-parallel size 3"):
        parallel.check_layout(4, 2, 3)
    info = model_info(load_hf_config(ckpts["qwen3_moe"]))
    with pytest.raises(ValueError, match="num_key_value_heads=2"):
        check_tp(info, 4)
    assert padded_vocab(info, 2) == 64 and padded_vocab(info, 1) == 63
    shards = shard_rows(batch(63), 4, tp=2)  # TP peers (consecutive ranks) share their DP rank's rows
    assert [s["tokens"].shape[0] for s in shards] == [2, 2, 2, 2]
    assert shards[0]["tokens"] is shards[1]["tokens"] and (shards[2]["tokens"] == batch(63)["tokens"][2:]).all()


MEGATRON_KNOBS = dict(optimizer="distributed", recompute="full")  # Megatron's DDP + optimiser, layers recomputed


def _megatron_step(rank, world, tp, ep, port, ckpt, out):
    """One SFT step with Megatron's DDP/optimiser and full recompute: metrics and params after it."""
    cfg = LearnerSection(micro_batch_tokens=24, ep=ep, tp=tp, dp=world // ep, **MEGATRON_KNOBS)
    learner = Learner(ckpt, cfg, SFT, rank=rank, world_size=world, master_port=port)
    m = learner.train_step(shard_rows(batch(VOCAB[learner.info.family]), world, tp)[rank])
    params = {k: v.clone() for k, v in bridge.full_hf_state(learner.model, cast=False)}
    if rank == 0:
        torch.save(dict(metrics=m, params=params), out / "megatron.pt")
    learner.barrier()
    learner.close()


def test_tp2_ep2_with_megatron_optimizer_and_full_recompute(ckpts, tmp_path):
    """The DDP path's TP sum (learner.optim.sum_tp_partial_grads) and the router's TP collectives under recompute."""
    family = "glm4_moe_lite"
    _megatron_step(0, 1, 1, 1, None, ckpts[family], tmp_path)
    ref = torch.load(tmp_path / "megatron.pt", weights_only=False)
    mp.spawn(_megatron_step, args=(2, 2, 2, free_port(), ckpts[family], tmp_path), nprocs=2, join=True)
    res = torch.load(tmp_path / "megatron.pt", weights_only=False)
    for k in ("loss", "aux_loss", "nll"):
        assert res["metrics"][k] == pytest.approx(ref["metrics"][k], abs=1e-6), k
    assert res["metrics"]["grad_norm"] == pytest.approx(ref["metrics"]["grad_norm"], rel=1e-5)
    for k, p in ref["params"].items():
        torch.testing.assert_close(res["params"][k], p, atol=1e-4, rtol=0, msg=k)
