"""Expert parallelism on 2 CPU processes (gloo) against one process, on the same global batch.

World 2 with EP=2: each rank holds 4 of the 8 experts and takes 2 of the 4 rows; the
one-process reference (EP=1) runs the same rows as two micro-batches (the same
micro-batch partition, so L_GA, which is per micro-batch, is the same). Tolerances
(float32): loss abs 1e-6; gradients atol 1e-6, rtol 1e-5 (seen: <= 4e-9); parameters
after one AdamW step (lr 1e-2) atol 1e-4 = lr/100 (Adam's first step is lr*g/(|g|+eps),
which turns round-off on gradients of size ~eps into update differences; seen 3.5e-5). Also checked under EP=2: the HF round trip is
bit-exact with experts gathered from both ranks, the ranks publish every tensor
exactly once (learner.publish), and a save/load on both ranks resumes exactly.
"""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from learner import bridge
from learner.config import LearnerSection, OPDStage, SFTStage
from learner.parallel import free_port
from learner.publish import owned_tensors
from learner.testing import tiny_checkpoints
from learner.train import Learner

ROWS = 4


def batch():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 64, (ROWS, 12), generator=g)
    loss_mask = torch.zeros(ROWS, 12, dtype=torch.uint8)
    loss_mask[:, 4:] = 1
    attn = torch.ones(ROWS, 12, dtype=torch.uint8)
    attn[1, 9:] = 0  # rows of different lengths: ranks must pad to a common shape
    attn[3, 6:] = 0
    return {"tokens": tokens.numpy(), "loss_mask": loss_mask.numpy(), "attention_mask": attn.numpy()}


def config(ep: int, dispatcher: str) -> LearnerSection:
    return LearnerSection(micro_batch_tokens=24, ep=ep, dispatcher=dispatcher, collective_timeout_s=4321.0)


SFT = SFTStage(lr=1e-2, schedule="constant", warmup_frac=0.0)


def _worker(rank, world, ep, port, ckpt, dispatcher, out):
    learner = Learner(ckpt, config(ep, dispatcher), SFT, rank=rank, world_size=world, master_port=port)
    result = {}
    if rank == 0:
        on_disk = load_file(ckpt / "model.safetensors")
    exported = dict(bridge.full_hf_state(learner.model))  # collective: both ranks
    if rank == 0:
        result["round_trip"] = set(exported) == set(on_disk) and all(
            torch.equal(exported[k], on_disk[k]) for k in on_disk
        )
    if rank == 0:
        result["export_names"] = list(exported)
    torch.save(dict(owned_tensors(learner.model)), out / f"owned{rank}.pt")  # what this rank publishes
    per = ROWS // world
    shard = {k: v[rank * per : (rank + 1) * per] for k, v in batch().items()}
    st = learner.accumulate(shard)
    grads = {k: v.clone() for k, v in bridge.full_hf_state(learner.model, cast=False, grads=True)}
    gn, lr = learner.update()
    m = learner.metrics(st, gn, lr, 1.0)
    params = {k: v.clone() for k, v in bridge.full_hf_state(learner.model, cast=False)}
    # exact resume on both ranks: save after step 1, take step 2, reload, take step 2 again
    learner.save(out / "ck")
    m2 = learner.train_step(shard)
    p2 = {k: v.clone() for k, v in bridge.full_hf_state(learner.model, cast=False)}
    learner.load(out / "ck")
    r2 = learner.train_step(shard)
    q2 = {k: v.clone() for k, v in bridge.full_hf_state(learner.model, cast=False)}
    # a rank with no rows (batch smaller than the world) still takes part, in both stages
    empty = {k: v[:0] for k, v in shard.items()}
    solo = learner.train_step(shard if rank == 0 else empty)
    learner.set_stage(OPDStage(lr=1e-2))
    zeros = torch.zeros(shard["tokens"].shape).numpy()
    opd_shard = dict(shard, behaviour_logprobs=zeros, teacher_logprobs=zeros)
    solo_opd = learner.train_step(opd_shard if rank == 0 else {k: v[:0] for k, v in opd_shard.items()})
    if rank == 0:
        result.update(metrics=m, grads=grads, params=params)
        result["resume_exact"] = m2["loss"] == r2["loss"] and all(torch.equal(p2[k], q2[k]) for k in p2)
        # the learner's world waits learner.collective_timeout_s in a collective, not torch's 10 minutes
        result["timeout_s"] = torch.distributed.group.WORLD._get_backend(torch.device("cpu")).options._timeout
        result["solo"] = (solo, solo_opd)
        torch.save(result, out / "result.pt")
    learner.barrier()
    learner.close()


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    return tiny_checkpoints(tmp_path_factory.mktemp("learner_ep"))


@pytest.fixture(scope="module")
def reference(ckpts):
    """EP=1, one process, rows 0-1 and 2-3 as two micro-batches (the token budget makes that split)."""
    out = {}
    for family, ckpt in ckpts.items():
        learner = Learner(ckpt, config(1, "allgather"), SFT)
        st = learner.accumulate(batch())
        assert st["n_mb"] == 2
        grads = {k: v.clone() for k, v in bridge.full_hf_state(learner.model, cast=False, grads=True)}
        gn, lr = learner.update()
        out[family] = dict(
            metrics=learner.metrics(st, gn, lr, 1.0),
            grads=grads,
            params={k: v.clone() for k, v in bridge.full_hf_state(learner.model, cast=False)},
        )
    return out


@pytest.mark.parametrize(
    "family,world,ep,dispatcher",
    [
        ("qwen3_moe", 2, 2, "allgather"),
        ("qwen3_moe", 2, 2, "alltoall"),
        ("glm4_moe_lite", 2, 2, "allgather"),
        ("glm4_moe_lite", 2, 1, "allgather"),  # pure data parallelism
    ],
)
def test_expert_parallel_matches_one_process(ckpts, reference, tmp_path, family, world, ep, dispatcher):
    mp.spawn(_worker, args=(world, ep, free_port(), ckpts[family], dispatcher, tmp_path), nprocs=world, join=True)
    res = torch.load(tmp_path / "result.pt", weights_only=False)
    ref = reference[family]
    assert res["round_trip"], "HF -> Megatron (EP-sharded) -> HF is not bit-exact"
    assert res["export_names"] == list(ref["params"])
    owned = [torch.load(tmp_path / f"owned{r}.pt", weights_only=False) for r in range(world)]
    on_disk = load_file(ckpts[family] / "model.safetensors")
    assert sum(len(o) for o in owned) == len(on_disk)  # each tensor published by exactly one rank
    assert all(torch.equal(t, on_disk[k]) for o in owned for k, t in o.items())
    assert res["resume_exact"]
    assert res["timeout_s"].total_seconds() == 4321.0
    solo, solo_opd = res["solo"]
    assert solo["tokens"] == float(batch()["attention_mask"][: ROWS // world].sum())  # only rank 0's rows
    assert torch.isfinite(torch.tensor([solo["loss"], solo_opd["loss"], solo_opd["reverse_kl"]])).all()
    m, rm = res["metrics"], ref["metrics"]
    assert m["loss"] == pytest.approx(rm["loss"], abs=1e-6)
    assert m["aux_loss"] == pytest.approx(rm["aux_loss"], abs=1e-6)
    assert m["zero_ratio_per_layer"] == pytest.approx(rm["zero_ratio_per_layer"], abs=1e-9)
    assert m["grad_norm"] == pytest.approx(rm["grad_norm"], rel=1e-5)
    assert set(res["grads"]) == set(ref["grads"])
    for k, g in ref["grads"].items():
        torch.testing.assert_close(res["grads"][k], g, atol=1e-6, rtol=1e-5, msg=k)
    for k, p in ref["params"].items():
        torch.testing.assert_close(res["params"][k], p, atol=1e-4, rtol=0, msg=k)
