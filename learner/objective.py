"""The stages' token losses on one micro-batch: the student's logprobs and the OPD policy loss.

Loss definitions (global batch over all DP ranks; a `loss_weight` per token, see
zeda_rl.losses.token_weights, which `learner.train` multiplies in):
- SFT:  per-token mean NLL over the response tokens (the official SFT), plus L_GA.
- OPD:  clipped policy loss with A_t = log p_teacher - log p_student(fresh, detached); each
        sample's token mean, then the mean over samples (`loss_agg: sample_mean`, the
        official OPD scripts), or the per-token mean (`token_mean`); plus the same L_GA.
        The ratio exp(logp - logp_old) is taken against the policy before this update
        (`ratio: recomputed`, official). A step is one optimiser update on its batch, so
        that policy is the very weights of this forward (replayed experts included), and
        logp_old, recomputed without grad, is logp.detach(): no second forward is needed,
        the ratio is 1 and the clip never acts, whatever precision the engine sampled in.
        (A learner that took several updates per batch would have to compute logp_old once,
        before the first.) `ratio: behaviour` takes it against the engine's logprobs.
        Stale samples may get a truncated importance weight min(exp(logp_old -
        logp_behaviour), tis_cap) on their loss (`tis_cap`; off by default, as officially);
        otherwise the behaviour logprobs only feed the staleness statistics
        (behaviour_ratio_mean, behaviour_clip_frac).
- L_GA: attached by the routers (`learner.router`), not here; its weight per micro-batch is
        set by `learner.train`.
"""

from __future__ import annotations

import torch

from learner import cpu_shims

cpu_shims.apply()

from learner import logprob as chunked  # noqa: E402
from learner import tp_logprob  # noqa: E402
from learner.config import LearnerSection  # noqa: E402
from learner.model import forward_logits  # noqa: E402
from zeda_rl.losses import opd_token_loss, token_logprobs, topk_reverse_kl  # noqa: E402


def student_logprobs(
    model: torch.nn.Module,
    section: LearnerSection,
    tokens: torch.Tensor,
    padding: torch.Tensor,
    temperature: float,
    full: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Training logprobs [B, S-1] (fp32) of the next tokens at `temperature`, and with `full` the whole
    next-token log-softmax [B, S-1, V] (opd.objective full_kl; refused with TP or chunking by the config).

    `logits_chunk_tokens` set: the output layer is fused into a chunked logprob (learner.logprob),
    so neither the micro-batch's logits nor their fp32 log-softmax exist in full. Under TP the
    logits stay vocab-parallel and the log-softmax reduces over the TP group (learner.tp_logprob).
    """
    chunk, tp = section.logits_chunk_tokens, section.tp
    if full and (chunk or tp > 1):
        raise NotImplementedError("opd.objective full_kl with learner.logits_chunk_tokens or learner.tp > 1")
    if chunk:
        with chunked.hidden_states(model) as out:
            hidden = forward_logits(model, tokens, padding)
        return chunked.token_logprobs(hidden, out["weight"], tokens, chunk, temperature), None
    logits = forward_logits(model, tokens, padding, gather=tp == 1)
    if temperature != 1.0:
        logits = logits / temperature
    if tp > 1:
        return tp_logprob.token_logprobs(logits, tokens, model.zeda_info.vocab_size), None
    if full:
        logp_all = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        return logp_all.gather(-1, tokens[:, 1:, None]).squeeze(-1), logp_all
    return token_logprobs(logits, tokens), None


def opd_loss(
    stage,
    logp: torch.Tensor,
    logp_all: torch.Tensor | None,
    mb: dict,
    sums: dict,
    m: torch.Tensor,
    real: bool = True,
) -> torch.Tensor:
    """OPD per-token loss [B, S-1] of one micro-batch (see the module docstring) under `stage` (the OPD
    section); adds its token sums over the mask `m` to `sums` (`learner.step_metrics.SUM_KEYS`)."""
    c = stage
    behaviour, teacher = mb["behaviour_logprobs"][:, 1:], mb["teacher_logprobs"][:, 1:]
    old = logp.detach() if c.ratio == "recomputed" else behaviour
    with torch.no_grad():
        beh_ratio = torch.exp(logp - behaviour)  # the engine-vs-learner mismatch: staleness and precision
    is_weight = beh_ratio.clamp(max=c.tis_cap) if c.tis_cap is not None else None
    loss_t, ratio, adv = opd_token_loss(logp, old, teacher, c.clip_eps, is_weight)
    if logp_all is not None and "teacher_top_ids" in mb:
        kl = topk_reverse_kl(logp_all, mb["teacher_top_ids"][:, 1:], mb["teacher_top_logprobs"][:, 1:])
        sums["full_kl"] += float(kl.detach()[m].sum())
        loss_t = kl if is_weight is None else kl * is_weight.detach()
    elif logp_all is not None and real:
        raise ValueError(
            "opd.objective full_kl: the batch carries no teacher_top_ids / teacher_top_logprobs "
            "(the teacher pool sends them when the run's opd.objective is full_kl)"
        )
    sums["reverse_kl"] += float(-adv[m].sum())
    sums["adv_sq"] += float((adv[m] ** 2).sum())
    sums["adv_pos"] += float((adv[m] > 0).sum())
    sums["clip_frac"] += float(((ratio - 1.0).abs() > c.clip_eps)[m].sum())
    sums["ratio_sum"] += float(ratio[m].sum())
    sums["beh_ratio_sum"] += float(beh_ratio[m].sum())
    sums["beh_clip"] += float(((beh_ratio - 1.0).abs() > c.clip_eps)[m].sum())
    return loss_t
