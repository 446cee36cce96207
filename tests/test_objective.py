"""The training objective as the official ZEDA code computes it, checked on the real Megatron learner.

Every reference here is written out in this file from ZEDA.md (sections 3 and 5), never
taken from zeda_rl.losses, so a wrong scale, count or aggregation in the learner shows up
as a mismatch. L_GA is isolated by a loss mask of zeros: the token loss is then exactly 0
and every gradient comes from the aux loss the routers attach.
"""

from __future__ import annotations

import json
import shutil
from contextlib import contextmanager

import numpy as np
import pytest
import torch

from launch.config import RunConfig
from learner.config import LearnerSection, OPDStage, SFTStage
from learner.model import forward_logits
from learner.router import last_routing, replay_routing, routers
from learner.testing import tiny_checkpoint
from learner.train import Learner

FAMILIES = ["qwen3_moe", "glm4_moe_lite"]
ALPHA, W = 0.1, 2.0


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("objective")
    return {f: tiny_checkpoint(f, root / f) for f in FAMILIES}


def make(ckpt, stage=None, **kw) -> Learner:
    """A learner without clipping or weight decay, micro-batches of 24 tokens, at a constant lr of 1e-2 (SFT by default)."""
    section = LearnerSection(**{"grad_clip": 0.0, "weight_decay": 0.0, "micro_batch_tokens": 24, **kw})
    return Learner(ckpt, section, stage or SFTStage(lr=1e-2, schedule="constant", warmup_frac=0.0))


def batch(b=4, s=12, seed=0, loss_from=4):
    """Rows 1 and 3 right-padded; with token_budget=24 the learner runs rows [0, 1] and [2, 3]."""
    rng = np.random.default_rng(seed)
    attn = np.ones((b, s), np.uint8)
    attn[1, 9:] = 0
    attn[3, 6:] = 0
    loss_mask = np.zeros((b, s), np.uint8)
    loss_mask[:, loss_from:] = 1
    return {"tokens": rng.integers(0, 64, (b, s)), "loss_mask": loss_mask * attn, "attention_mask": attn}


MICRO_BATCHES = ([0, 1], [2, 3])


def reference_l_ga(logits, sigmoid: bool, n: int, nz: int, k: int, valid, alpha=ALPHA, w=W):
    """ZEDA.md section 3: shares of a fresh top-K (no bias), P over all slots, valid tokens only."""
    if sigmoid:
        s = torch.sigmoid(logits)
        p = s / s.sum(-1, keepdim=True)
    else:
        p = torch.softmax(logits, -1)
    v = valid.float()
    f_e = ((p.detach().topk(k, -1).indices < n).float().mean(-1) * v).sum() / v.sum()
    p_e = (p[:, :n].sum(-1) * v).sum() / v.sum()
    return alpha * (n + w * nz) * (f_e * p_e / n + (1 - f_e) * (1 - p_e) / (w * nz))


@contextmanager
def router_inputs(model, replace=None):
    """The hidden states each router sees ([S, B, H], Megatron order); `replace` swaps in given ones."""
    seen, hooks = [], []

    def hook(module, args):
        x = args[0] if replace is None else replace.to(args[0].dtype)
        seen.append(x)
        return (x, *args[1:])

    for r in routers(model):
        hooks.append(r.register_forward_pre_hook(hook))
    try:
        yield seen
    finally:
        for h in hooks:
            h.remove()


def reference_backward(learner, b: dict, alpha=ALPHA) -> list[float]:
    """Backward of our own L_GA (mean over the learner's micro-batches) through the aux-free model.

    Fills .grad of every parameter; returns the zero-expert share of the routed slots per step
    (what the learner reports as zero_ratio)."""
    model, info = learner.model, learner.info
    model.eval()  # the routers attach nothing outside training: only our loss is differentiated
    for p in model.parameters():
        p.grad = None
    total, zero, slots = 0.0, 0.0, 0.0
    for rows in MICRO_BATCHES:
        tokens = torch.as_tensor(b["tokens"][rows])
        attn = torch.as_tensor(b["attention_mask"][rows]).bool()
        replay = None if b.get("routed_experts") is None else torch.as_tensor(b["routed_experts"][rows]).long()
        with router_inputs(model) as xs, replay_routing(model, replay):
            forward_logits(model, tokens, ~attn)
        valid = attn.T.reshape(-1)
        for r, x in zip(routers(model), xs):
            logits = x.reshape(-1, x.shape[-1]).float() @ r.weight.float().T
            total = total + reference_l_ga(
                logits,
                info.router.family == "sigmoid",
                info.num_experts,
                info.num_zero,
                info.router.top_k,
                valid,
                alpha=alpha,
            ) / len(MICRO_BATCHES)
        ids = last_routing(model, *tokens.shape)
        zero += float(((ids >= info.num_experts) & attn[:, :, None, None]).sum())
        slots += float(attn.sum()) * ids.shape[2] * ids.shape[-1]
    total.backward()
    return zero / slots


def router_grads(learner):
    return [r.weight.grad.clone() for r in routers(learner.model)]


# ---- L_GA in the learner ------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_l_ga_router_gradient_equals_autograd_of_the_formula(ckpts, family):
    """Two micro-batches with padding; GLM's correction bias pushed hard towards the zero slots and
    Qwen's slots replayed from a zero-heavy record, so counting the slots the model ran instead of
    a fresh top-K would change f and with it the gradient."""
    learner = make(ckpts[family])
    info = learner.info
    b = batch(loss_from=12)  # no token loss: L_GA alone
    rs = routers(learner.model)
    if family == "glm4_moe_lite":
        for r in rs:
            r.e_score_correction_bias[info.num_experts :] += 0.5
    else:
        rng = np.random.default_rng(1)
        shape = (*b["tokens"].shape, len(rs), info.router.top_k)
        b["routed_experts"] = rng.integers(info.num_experts - 2, info.router.total, shape)
        b["routed_experts"][..., 1] = info.num_experts  # distinct slots per token: a real/zero mix, then zero slot N
        b["routed_experts"][..., 0] = np.minimum(b["routed_experts"][..., 0], info.num_experts - 1)
    st = learner.accumulate(b)
    assert st["n_mb"] == 2 and st["sums"]["main"] == 0.0
    got = router_grads(learner)
    used_share = float(st["zero_slots"].sum() / (st["routed_slots"] * len(rs)))
    reference_backward(learner, b)
    want = [r.weight.grad for r in rs]
    fresh_share = _fresh_zero_share(learner, b)
    assert abs(used_share - fresh_share) > 0.1, (used_share, fresh_share)  # the counts really differ here
    for g, r in zip(got, want):
        assert r.abs().max() > 1e-4
        torch.testing.assert_close(g, r, atol=1e-7, rtol=1e-4)


def _fresh_zero_share(learner, b) -> float:
    """Zero share of a fresh top-K of the router probabilities (no bias), valid tokens, all layers."""
    info, model = learner.info, learner.model
    zero = slots = 0.0
    with torch.no_grad():
        for rows in MICRO_BATCHES:
            attn = torch.as_tensor(b["attention_mask"][rows]).bool()
            with router_inputs(model) as xs:
                forward_logits(model, torch.as_tensor(b["tokens"][rows]), ~attn)
            valid = attn.T.reshape(-1)
            for r, x in zip(routers(model), xs):
                z = x.reshape(-1, x.shape[-1]).float() @ r.weight.float().T
                p = torch.sigmoid(z) if info.router.family == "sigmoid" else torch.softmax(z, -1)
                top = p.topk(info.router.top_k, -1).indices[valid]
                zero += float((top >= info.num_experts).sum())
                slots += top.numel()
    return zero / slots


def test_l_ga_value_and_gradient_pinned_on_a_hand_made_batch(ckpts):
    """Router inputs and weights set so that each token's routing distribution is a chosen q:
    logits = log q. Six valid tokens: 3 prefer two real experts (p_real 0.88), 2 two zero slots
    (0.24), 1 one of each (0.61); the padding tokens put everything on zero slots and must not
    count. N=8, N_Z=4, K=2, alpha=0.1, w=2: f_E = 3.5/6, P_E = 3.73/6, by hand."""
    learner = make(ckpts["qwen3_moe"])
    n, nz, hidden = 8, 4, learner.model.config.hidden_size
    assert (learner.info.num_experts, learner.info.num_zero, learner.info.router.top_k) == (n, nz, 2)

    def q(first, second):
        v = torch.full((n + nz,), 0.03)
        v[first], v[second] = 0.4, 0.3
        return v

    real, zero, mixed, pad = q(0, 1), q(8, 9), q(2, 10), torch.tensor([0.0] * n + [0.25] * nz) + 1e-9
    table = torch.stack(
        [torch.stack(row) for row in [[real, real, zero, mixed], [zero, real, pad, pad]]]
    )  # [B, S, slots]
    x = torch.zeros(4, 2, hidden)  # [S, B, H]
    x[..., : n + nz] = table.log().transpose(0, 1)
    weight = torch.zeros(n + nz, hidden)
    weight[:, : n + nz] = torch.eye(n + nz)
    for r in routers(learner.model):
        r.weight.data.copy_(weight)
    b = {
        "tokens": np.ones((2, 4), np.int64),
        "loss_mask": np.zeros((2, 4), np.uint8),
        "attention_mask": np.array([[1, 1, 1, 1], [1, 1, 0, 0]], np.uint8),
    }
    with router_inputs(learner.model, replace=x):
        st = learner.accumulate(b)

    f_e, p_e = 3.5 / 6, (3 * 0.88 + 2 * 0.24 + 0.61) / 6
    value = 0.1 * (8 + 2 * 4) * (f_e * p_e / 8 + (1 - f_e) * (1 - p_e) / (2 * 4))
    assert value == pytest.approx(0.2 * (7 / 12 * 3.73 / 6 + 5 / 12 * 2.27 / 6))
    assert st["aux"].tolist() == pytest.approx([value] * len(routers(learner.model)), rel=1e-6)
    # dL/dz_te = alpha (N + w N_Z) (f_E/N - f_Z/(w N_Z)) / T_valid * q_te (1[e < N] - p_real_t), 0 on padding
    q_flat = table.transpose(0, 1).reshape(-1, n + nz)
    valid = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]).T.reshape(-1, 1).float()
    p_real = q_flat[:, :n].sum(-1, keepdim=True)
    is_real = (torch.arange(n + nz) < n).float()
    dz = 0.1 * 16 * (f_e / 8 - (1 - f_e) / 8) / 6 * q_flat * (is_real - p_real) * valid
    want = dz.T @ x.reshape(-1, hidden)
    for g in router_grads(learner):
        torch.testing.assert_close(g, want, atol=1e-8, rtol=1e-5)


def test_zero_share_follows_alpha(ckpts):
    """Plain SGD steps on L_GA alone (Adam with eps >> |g| and no momentum is SGD with step lr/eps,
    so a wrong L_GA scale changes the path, which Adam's scale invariance would hide): with alpha
    the zero share climbs towards r* = 50% along the path of our own L_GA; with alpha = 0 it does
    not move at all."""
    sgd = dict(
        stage=SFTStage(lr=300.0, schedule="constant", warmup_frac=0.0), eps=1e3, betas=(0.0, 0.0)
    )  # SGD, step 0.3: 31% -> 43% in 3 steps
    b = batch(loss_from=12)
    flat = make(ckpts["qwen3_moe"], alpha=0.0, **sgd)
    shares0 = [flat.train_step(b)["zero_ratio"] for _ in range(3)]
    assert shares0[0] == shares0[1] == shares0[2]

    learner = make(ckpts["qwen3_moe"], alpha=ALPHA, **sgd)
    ref = make(ckpts["qwen3_moe"], alpha=ALPHA, **sgd)
    got, want = [], []
    for _ in range(4):
        got.append(learner.train_step(b)["zero_ratio"])
        want.append(reference_backward(ref, b))
        ref.update()
    assert got[0] == pytest.approx(shares0[0])
    assert got[-1] > got[0] + 0.05, got
    assert got == pytest.approx(want, abs=0.01), (got, want)


# ---- the OPD policy loss ------------------------------------------------------------------------


def opd_batch(learner, seed=3):
    """An OPD batch whose engine logprobs are far from the learner's (a bf16 engine, a stale policy)."""
    b = batch(seed=seed)
    lp = np.zeros(b["tokens"].shape, np.float32)
    lp[:, 1:] = _logprobs(learner, b).detach().numpy()
    rng = np.random.default_rng(seed)
    b["behaviour_logprobs"] = lp + rng.normal(0.0, 0.5, lp.shape).astype(np.float32)
    b["teacher_logprobs"] = lp + rng.normal(0.0, 1.0, lp.shape).astype(np.float32)
    info = learner.info
    ids = rng.integers(0, info.router.total, (*lp.shape, len(info.moe_layers), 1))
    b["routed_experts"] = np.concatenate([ids, (ids + 1) % info.router.total], -1)  # replayed, distinct slots
    return b


def _logprobs(learner, b, rows=None):
    rows = list(range(len(b["tokens"]))) if rows is None else rows
    tokens = torch.as_tensor(b["tokens"][rows])
    replay = None if b.get("routed_experts") is None else torch.as_tensor(b["routed_experts"][rows]).long()
    with replay_routing(learner.model, replay):
        logits = forward_logits(learner.model, tokens, ~torch.as_tensor(b["attention_mask"][rows]).bool())
    return torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, tokens[:, 1:, None])[..., 0]


def reference_opd_grads(learner, b, agg: str, tis_cap=None) -> dict[str, torch.Tensor]:
    """ZEDA.md 5 with the official ratio (1, gradient of logp): loss_t = -A_t logp_t, A_t detached,
    optionally times min(exp(logp - logp_engine), cap); aggregated over the whole batch."""
    model = learner.model
    model.eval()
    for p in model.parameters():
        p.grad = None
    logp = _logprobs(learner, b)
    mask = torch.as_tensor(b["loss_mask"][:, 1:]).float()
    adv = torch.as_tensor(b["teacher_logprobs"][:, 1:]) - logp.detach()
    loss_t = -adv * logp
    if tis_cap is not None:
        loss_t = loss_t * torch.exp(logp.detach() - torch.as_tensor(b["behaviour_logprobs"][:, 1:])).clamp(max=tis_cap)
    if agg == "token_mean":
        loss = (loss_t * mask).sum() / mask.sum()
    else:
        rows = mask.sum(1) > 0
        loss = ((loss_t * mask).sum(1)[rows] / mask.sum(1)[rows]).mean()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("agg,tis_cap", [("sample_mean", None), ("token_mean", None), ("sample_mean", 1.2)])
def test_opd_gradient_is_the_official_objective(ckpts, agg, tis_cap):
    """Recomputed ratio (default): over two micro-batches with routing replay, the learner's gradient
    is that of the unclipped -A logp objective, though the engine's logprobs are far off."""
    learner = make(ckpts["qwen3_moe"], OPDStage(lr=1e-2, loss_agg=agg, tis_cap=tis_cap), alpha=0.0)
    b = opd_batch(learner)
    st = learner.accumulate(b)
    assert st["n_mb"] == 2
    m = learner.metrics(st, 0.0, 0.0, 1.0)
    assert m["clip_frac"] == 0.0 and m["ratio_mean"] == 1.0 and m["behaviour_clip_frac"] > 0.2
    got = {n: p.grad.clone() for n, p in learner.model.named_parameters()}
    want = reference_opd_grads(learner, b, agg, tis_cap)
    assert max(float(g.abs().max()) for g in want.values()) > 1e-3
    for name, g in want.items():
        torch.testing.assert_close(got[name], g, atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize("k", [64, 5])
def test_full_kl_gradient_is_the_reverse_kl_over_the_teachers_top_k(ckpts, k):
    """opd.objective full_kl: the learner's gradient is that of sum_v p_S(v) (log p_S(v) - log p_T(v)), both
    renormalised over the teacher's k tokens (k = 64 = the vocabulary: the exact reverse KL), per sample
    mean, written out here from its definition; the sampled-token metrics are still reported."""
    learner = make(ckpts["qwen3_moe"], OPDStage(lr=1e-2, objective="full_kl"), alpha=0.0)
    b = opd_batch(learner)
    rng = np.random.default_rng(5)
    teacher_logits = torch.as_tensor(rng.normal(0.0, 2.0, (*b["tokens"].shape, 64)), dtype=torch.float32)
    t_all = torch.log_softmax(teacher_logits, -1)
    top_lp, top_ids = t_all.topk(k, -1)
    b["teacher_top_ids"], b["teacher_top_logprobs"] = top_ids.numpy().astype(np.int32), top_lp.numpy()
    st = learner.accumulate(b)
    m = learner.metrics(st, 0.0, 0.0, 1.0)
    got = {n: p.grad.clone() for n, p in learner.model.named_parameters()}

    model = learner.model
    model.eval()
    for p in model.parameters():
        p.grad = None
    tokens = torch.as_tensor(b["tokens"])
    with replay_routing(model, torch.as_tensor(b["routed_experts"]).long()):
        logits = forward_logits(model, tokens, ~torch.as_tensor(b["attention_mask"]).bool())
    s_all = torch.log_softmax(logits[:, :-1].float(), -1)
    ids, t = top_ids[:, 1:], top_lp[:, 1:]
    s = s_all.gather(-1, ids)
    s, t = s - s.logsumexp(-1, keepdim=True), t - t.logsumexp(-1, keepdim=True)
    kl = (s.exp() * (s - t)).sum(-1)
    if k == 64:  # the whole vocabulary: the textbook reverse KL of the two full distributions
        torch.testing.assert_close(kl, (s_all.exp() * (s_all - t_all[:, 1:])).sum(-1), atol=1e-5, rtol=1e-5)
    mask = torch.as_tensor(b["loss_mask"][:, 1:]).float()
    rows = mask.sum(1) > 0
    loss = ((kl * mask).sum(1)[rows] / mask.sum(1)[rows]).mean()
    loss.backward()
    assert m["full_kl"] == pytest.approx(float((kl.detach() * mask).sum() / mask.sum()), rel=1e-5)
    assert "reverse_kl" in m and "adv_mean" in m and 0 <= m["adv_pos_frac"] <= 1
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(got[name], p.grad, atol=1e-6, rtol=1e-4, msg=name)
    with pytest.raises(ValueError, match="teacher_top_ids"):  # a full_kl learner given a batch without targets
        learner.accumulate(opd_batch(learner))


def test_behaviour_ratio_clips_what_the_official_ratio_does_not(ckpts):
    learner = make(ckpts["qwen3_moe"], OPDStage(lr=1e-2, ratio="behaviour"), alpha=0.0)
    b = opd_batch(learner)
    st = learner.accumulate(b)
    m = learner.metrics(st, 0.0, 0.0, 1.0)
    assert m["clip_frac"] == m["behaviour_clip_frac"] > 0.2
    got = {n: p.grad.clone() for n, p in learner.model.named_parameters()}
    want = reference_opd_grads(learner, b, "sample_mean")
    assert any(not torch.allclose(got[n], g, atol=1e-6, rtol=1e-4) for n, g in want.items())


# ---- configuration ------------------------------------------------------------------------------


def test_run_config_carries_the_switches_with_official_defaults():
    from learner.config import learner_part

    o = learner_part(RunConfig().opd)
    assert type(o) is OPDStage and (o.ratio, o.loss_agg, o.tis_cap) == ("recomputed", "sample_mean", None)
    cfg_ = RunConfig.model_validate({"opd": {"ratio": "behaviour", "loss_agg": "token_mean", "clip_eps": 0.3}})
    assert learner_part(cfg_.opd) == OPDStage(ratio="behaviour", loss_agg="token_mean", clip_eps=0.3)
    assert learner_part(RunConfig.model_validate({"opd": {"tis_cap": 2.0}}).opd).tis_cap == 2.0
    with pytest.raises(ValueError, match="loss_agg"):
        RunConfig.model_validate({"opd": {"loss_agg": "sum"}})
    with pytest.raises(ValueError, match="opd.tis_cap"):
        RunConfig.model_validate({"opd": {"tis_cap": 2.0, "ratio": "behaviour"}})
    with pytest.raises(ValueError, match="tis_cap"):
        OPDStage(tis_cap=2.0, ratio="behaviour")
    # the dense objective is a switch beside the official one, refused where the learner cannot run it
    assert (
        o.objective == "sampled_token"
        and learner_part(
            RunConfig.model_validate({"opd": {"objective": "full_kl", "teacher_top_k": 8}}).opd
        ).teacher_top_k
        == 8
    )
    with pytest.raises(ValueError, match="full_kl needs the whole micro-batch"):
        RunConfig.model_validate({"opd": {"objective": "full_kl"}, "learner": {"ep": 2, "tp": 2}})
    with pytest.raises(ValueError, match="full_kl needs the whole micro-batch"):
        RunConfig.model_validate({"opd": {"objective": "full_kl"}, "learner": {"logits_chunk_tokens": 512}})


def test_teacher_scores_at_temperature_one_only():
    """SGLang computes input-token logprobs at temperature 1 whatever a request says: any other teacher
    temperature is refused by the config (naming the key) and by the teacher actor itself."""
    from actors.teacher_pool import check_score_temperature

    assert RunConfig().opd.teacher_temperature == 1.0
    with pytest.raises(ValueError, match="opd.teacher_temperature"):
        RunConfig.model_validate({"opd": {"teacher_temperature": 0.7}})
    check_score_temperature(1.0)
    with pytest.raises(ValueError, match="opd.teacher_temperature"):
        check_score_temperature(0.7)
    # a student sampling at 0.7 is still scored by the teacher at 1: the config takes it
    assert RunConfig.model_validate({"sampling": {"temperature": 0.7}}).opd.teacher_temperature == 1.0
    with pytest.raises(ValueError, match="opd.probe_every"):
        RunConfig.model_validate({"opd": {"probe_every": 10}, "data": {"opd_prompts": "/data/p.jsonl"}})


def test_learner_refuses_copy_experts(ckpts, tmp_path):
    """Copy slots (output = input) have no place in Megatron's MoE layer: refused, not trained as zero slots."""
    copy_ckpt = tmp_path / "copy"
    shutil.copytree(ckpts["qwen3_moe"], copy_ckpt)
    conf = json.loads((copy_ckpt / "config.json").read_text())
    conf["zce_types"] = ["copy"]
    (copy_ckpt / "config.json").write_text(json.dumps(conf))
    with pytest.raises(ValueError, match=r"zce_types.*model\.zero_type: copy"):
        make(copy_ckpt)
