"""The engine -> teacher -> learner logprob chain, end to end on real parts (issue 9, section 3).

Why: OPD's importance ratio is exp(learner logprob - behaviour logprob) and its advantage
is teacher logprob - learner logprob, token by token. Each of the three comes from a
different program (the rollout engine's KV-cache decode over left-padded prompts, the
teacher engine's right-padded prefill, Megatron's forward over the packed batch), and
the arrays meet only through `zeda_rl.trajectory.pack_samples` and the wire. A wrong
temperature, a column shift in the packing, or a routing replay that replays the wrong
token makes OPD train on garbage without any error. This test runs the chain as the
pipeline does and checks every link against an independent forward:

- student: `actors.torch_engine.TorchEngine` on a converted tiny checkpoint
  (`learner.testing.tiny_checkpoint`, initializer_range=0.1 so logits are not flat)
  samples responses of prompts of different lengths (left padding inside the engine) at
  temperature T, returning behaviour logprobs and routed expert ids;
- teacher: a TorchEngine on the static checkpoint the student was converted from scores
  the sampled sequences at T, as `actors.teacher_pool.TeacherActor.score_and_push` does;
- packing: `pack_samples(samples, teacher)`, then the wire (`zeda_rl.wire.encode/decode`)
  and the learner's `normalise_batch`, i.e. exactly what `Learner.accumulate` receives;
- learner: the Megatron model built from the same converted checkpoint
  (`learner.model.build_model` + `learner.bridge.load_hf`), forward over the packed tokens
  with routing replay of the recorded ids and, separately, without replay; token logprobs
  as train.py computes them (`forward_logits`, logits / T, `zeda_rl.losses.token_logprobs`).

Checked, for both families and T in {1.0, 0.7}:
1. learner logprobs (column t-1 of token_logprobs) == packed behaviour logprobs (column t)
   on every loss-masked position, with and without replay: |diff| <= LOGPROB_ATOL;
2. the learner's own routing without replay (`last_routing`) == the engine's recorded
   ids on every recorded position; recorded positions are exactly tokens 0..len-2 of each
   sequence (-1 marks the last token and the padding); with replay the learner routes
   exactly the recorded ids;
3. packed teacher logprobs (column t) == transformers' own forward of the static model,
   one unpadded sequence at a time, log_softmax(logits / T) of token t: |diff| <= LOGPROB_ATOL;
   column 0 and padding hold 0.
Plus guards that keep the checks from passing vacuously: at T=0.7 the T=1 logprobs are
far outside the tolerance (so a dropped temperature is caught), the same array shifted
by one column is far outside it (so a packing shift is caught), and teacher != student.

Tolerance: LOGPROB_ATOL = 1e-5 (float32 on CPU). Observed maximum differences when it was
written (torch 2.13 CPU, 2 threads): behaviour vs learner 4.8e-7 at T=1 and 9.5e-7 at
T=0.7, teacher vs transformers the same, i.e. 1-2 float32 ulps of logprobs of magnitude
~4; the rest is headroom for BLAS/thread-count differences. A dropped temperature or a
one-column shift moves logprobs by far more than 100 x the tolerance (guarded below).
Routed ids must be identical.

Checked by hand when this test was written (each change made temporarily in a copy of
the tree, then reverted): dropping the temperature division in `actors.torch_engine._sample`
fails test 1 at T=0.7 (by ~0.5); dropping it in `TorchEngine.score` fails test 3 at T=0.7
(by ~0.5); packing the behaviour logprobs one column to the left in `pack_samples` fails
test 1 (by ~5), the teacher logprobs one column left fails test 3, and the routed ids one
column right fails test 2 and the replayed forward of test 1 (by ~0.2-0.5).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from actors.torch_engine import TorchEngine
from learner import bridge, parallel
from learner.batch import normalise_batch
from learner.megatron_config import load_hf_config, model_info
from learner.model import build_model, forward_logits
from learner.router import last_routing, replay_routing
from learner.testing import load_hf_reference, tiny_checkpoint
from tests.helpers import save_static
from zeda_rl import wire
from zeda_rl.losses import token_logprobs
from zeda_rl.sampling import SamplingParams
from zeda_rl.trajectory import pack_samples

LOGPROB_ATOL = 1e-5
FAMILIES = ["qwen3_moe", "glm4_moe_lite"]
TEMPERATURES = [1.0, 0.7]
OVERRIDES = dict(initializer_range=0.1)
PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14], [20], [30, 31, 32, 33]]
STOP = (1, 2, 3)  # some samples may stop early: uneven response lengths as well as prompt lengths
MAX_NEW = 8
SEED = 7


@pytest.fixture(scope="module", autouse=True)
def world1():
    parallel.setup(0, 1, 1)
    return parallel


@pytest.fixture(scope="module", params=FAMILIES)
def parts(request, tmp_path_factory):
    """Student engine, teacher engine, the learner's Megatron model and transformers' static model."""
    family = request.param
    root = tmp_path_factory.mktemp(f"chain_{family}")
    student_dir = tiny_checkpoint(family, root / "zeda", **OVERRIDES)
    # the static model tiny_checkpoint converted (same seed, same config): the student's teacher
    save_static(family, root / "static", seed=0, **OVERRIDES)
    m = build_model(model_info(load_hf_config(student_dir)))
    bridge.load_hf(m, student_dir)
    student, teacher = TorchEngine(student_dir), TorchEngine(root / "static")
    emb = lambda eng: eng.model.get_input_embeddings().weight  # noqa: E731
    assert torch.equal(emb(student), emb(teacher))  # really the model the student was converted from
    return dict(
        family=family,
        student=student,
        teacher=teacher,
        learner=m.eval(),
        static_ref=load_hf_reference(root / "static"),
    )


@pytest.fixture(scope="module")
def runs(parts):
    """Per temperature: the packed batch as the learner receives it and the learner's forwards of it."""
    out = {}
    for temp in TEMPERATURES:
        params = SamplingParams(temperature=temp, max_new_tokens=MAX_NEW, stop_token_ids=STOP, seed=SEED)
        samples = parts["student"].generate(PROMPTS, params)
        # as actors.rollout.EngineActor.generate hands them over (Ray-ready dicts)
        dicts = [dict(dataclasses.asdict(s), sample_id=i) for i, s in enumerate(samples)]
        # as actors.teacher_pool.TeacherActor.score_and_push scores and packs them
        seqs = [list(d["prompt_ids"]) + list(d["output_ids"]) for d in dicts]
        teacher = parts["teacher"].score(seqs, temperature=temp)
        arrays = pack_samples(dicts, teacher, pad_id=parts["student"].pad_id)
        frames = wire.encode(wire.TrajectoryBatch.from_arrays(arrays, meta={"temperature": temp}))
        batch = normalise_batch(wire.decode([bytes(f) for f in frames]).arrays, "opd")

        m, tokens = parts["learner"], batch["tokens"]
        b, s = tokens.shape
        padding = ~batch["attention_mask"]
        with torch.no_grad():
            with replay_routing(m, batch["routed_experts"]):
                logits_replay = forward_logits(m, tokens, padding)
            replayed_ids = last_routing(m, b, s)
            logits_free = forward_logits(m, tokens, padding)
            free_ids = last_routing(m, b, s)
        out[temp] = dict(
            samples=samples,
            seqs=seqs,
            batch=batch,
            # as learner.objective.student_logprobs: logits / T, then token_logprobs -> [B, S-1]
            logp_replay=token_logprobs(logits_replay / temp, tokens),
            logp_free=token_logprobs(logits_free / temp, tokens),
            logp_free_t1=token_logprobs(logits_free, tokens),
            replayed_ids=replayed_ids,
            free_ids=free_ids,
        )
    return out


def _masked_maxdiff(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    return float((a - b).abs()[mask].max())


@pytest.mark.parametrize("temp", TEMPERATURES)
def test_behaviour_logprobs_match_learner_forward(runs, temp):
    r = runs[temp]
    batch = r["batch"]
    mask = batch["loss_mask"][:, 1:]  # column t of the batch is column t-1 of token_logprobs
    behaviour = batch["behaviour_logprobs"][:, 1:]
    assert int(mask.sum()) == sum(len(s.output_ids) for s in r["samples"]) > 0
    assert len({len(x) for x in r["seqs"]}) > 1  # right padding really happens in the packed batch
    reasons = {s.finish_reason for s in r["samples"]}
    assert reasons == {"stop", "length"}, (
        f"seed {SEED} no longer gives early stops and full-length samples ({reasons}): pick another"
    )
    for name in ("logp_replay", "logp_free"):
        diff = _masked_maxdiff(r[name], behaviour, mask)
        assert diff <= LOGPROB_ATOL, f"{name}: behaviour vs learner logprobs differ by {diff:.3g} at T={temp}"
    # guards: a one-column shift, and at T != 1 a dropped temperature, are far outside the tolerance
    shifted = torch.zeros_like(behaviour)
    shifted[:, :-1] = behaviour[:, 1:]
    assert _masked_maxdiff(r["logp_free"], shifted, mask) > 100 * LOGPROB_ATOL
    if temp != 1.0:
        assert _masked_maxdiff(r["logp_free_t1"], behaviour, mask) > 100 * LOGPROB_ATOL


@pytest.mark.parametrize("temp", TEMPERATURES)
def test_recorded_experts_match_learner_routing(parts, runs, temp):
    r = runs[temp]
    batch = r["batch"]
    rec = batch["routed_experts"]  # [B, S, L_moe, K]
    lengths = batch["attention_mask"].sum(1)
    recorded = (rec >= 0).all(-1)  # [B, S, L]
    expect = torch.arange(rec.shape[1])[None, :] < (lengths[:, None] - 1)  # tokens 0..len-2 were fed to the engine
    assert torch.equal(recorded, expect[:, :, None].expand_as(recorded))
    assert bool((rec[~recorded] == -1).all())  # the last token and the padding: -1, all K slots
    sel = recorded[..., None].expand_as(rec)
    n_wrong = int((r["free_ids"][sel] != rec[sel]).sum())
    assert n_wrong == 0, (
        f"learner routing (no replay) differs from the engine's recorded ids in {n_wrong} slots at T={temp}"
    )
    assert torch.equal(r["replayed_ids"][sel], rec[sel])
    # both kinds of slots were recorded, so the comparison covers real and zero experts
    zero_share = float((rec[sel] >= parts["learner"].zeda_info.num_experts).float().mean())
    assert 0 < zero_share < 1


@pytest.mark.parametrize("temp", TEMPERATURES)
def test_teacher_logprobs_match_transformers_static(parts, runs, temp):
    r = runs[temp]
    batch = r["batch"]
    teacher = batch["teacher_logprobs"]
    hf = parts["static_ref"]
    worst = 0.0
    for i, seq in enumerate(r["seqs"]):
        ids = torch.tensor([seq])
        with torch.no_grad():
            logits = hf(ids).logits[0, :-1].float() / temp
        ref = torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None]).squeeze(-1)
        n = len(seq)
        worst = max(worst, float((teacher[i, 1:n] - ref).abs().max()))
        assert float(teacher[i, 0]) == 0.0 and bool((teacher[i, n:] == 0).all())
        if i == 0:  # guard: one column off is far outside the tolerance
            assert float((teacher[i, : n - 1] - ref).abs().max()) > 100 * LOGPROB_ATOL
    assert worst <= LOGPROB_ATOL, f"teacher logprobs vs transformers' static forward differ by {worst:.3g} at T={temp}"
    # the teacher is a different model from the student: the OPD advantage is not identically 0
    mask = batch["loss_mask"]
    assert float((teacher - batch["behaviour_logprobs"]).abs()[mask].max()) > 100 * LOGPROB_ATOL


def test_teacher_top_k_targets_survive_the_chain(parts, runs):
    """opd.objective full_kl: the teacher engine's top-k next tokens, packed and through the wire, give
    the learner the teacher's exact distribution (k = vocabulary) at every response position, in the
    same columns as the sampled-token logprobs; `score_topk`'s own logprobs equal `score`'s at T=1."""
    from zeda_rl.losses import topk_reverse_kl

    r = runs[1.0]
    dicts = [dict(dataclasses.asdict(s), sample_id=i) for i, s in enumerate(r["samples"])]
    vocab = parts["static_ref"].config.vocab_size
    top = parts["teacher"].score_topk(r["seqs"], vocab)
    for t, lp in zip(top, parts["teacher"].score(r["seqs"], temperature=1.0)):
        np.testing.assert_allclose(t["logprobs"], lp, atol=LOGPROB_ATOL)
    arrays = pack_samples(dicts, [t["logprobs"] for t in top], pad_id=parts["student"].pad_id, teacher_top=top)
    frames = wire.encode(wire.TrajectoryBatch.from_arrays(arrays, meta={}))
    batch = normalise_batch(wire.decode([bytes(f) for f in frames]).arrays, "opd")
    assert batch["teacher_top_ids"].shape == (*batch["tokens"].shape, vocab)
    mask = batch["loss_mask"][:, 1:]
    worst = 0.0
    for i, seq in enumerate(r["seqs"]):
        with torch.no_grad():
            ref = torch.log_softmax(parts["static_ref"](torch.tensor([seq])).logits[0, :-1].float(), -1)
        got = torch.full_like(ref, float("nan")).scatter(
            -1, batch["teacher_top_ids"][i, 1 : len(seq)], batch["teacher_top_logprobs"][i, 1 : len(seq)]
        )
        worst = max(worst, float((got - ref).abs().max()))
    assert worst <= LOGPROB_ATOL
    # the learner's KL against those targets is the KL of the two models' full distributions
    m, tokens = parts["learner"], batch["tokens"]
    with torch.no_grad(), replay_routing(m, batch["routed_experts"]):
        s_all = torch.log_softmax(forward_logits(m, tokens, ~batch["attention_mask"])[:, :-1].float(), -1)
    kl = topk_reverse_kl(s_all, batch["teacher_top_ids"][:, 1:], batch["teacher_top_logprobs"][:, 1:])
    assert bool(torch.isfinite(kl).all()) and float(kl[mask].min()) >= -1e-6 and float(kl[mask].max()) > 1e-3
