"""The ZEDA losses as pure functions: group auxiliary loss, SFT NLL, OPD policy loss.

The learner (Megatron) and any plain PyTorch loop call exactly these, so the method's
maths lives in one place and is tested on its own.
"""

from __future__ import annotations

from typing import Callable, Literal

import torch

LossAgg = Literal["sample_mean", "token_mean"]


def group_aux_loss(
    probs: torch.Tensor,
    num_experts: int,
    num_zero: int,
    top_k: int,
    alpha: float = 0.1,
    w: float = 2.0,
    token_mask: torch.Tensor | None = None,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """L_GA for one MoE layer (ZEDA.md section 3).

    probs: [T, N+N_Z] routing distribution over all slots (softmax, or sigmoid scores
    normalised over all experts, no correction bias). The counts f_E/f_Z come from a
    fresh top-K of these same probabilities, as the official Megatron code takes them:
    not from the slots the model ran (steered by the correction bias, or replayed from
    the rollout engine), so the loss sees the router's own preference. It balances only
    the two groups, real vs zero, so the routing among real experts is left as learned;
    its equilibrium zero share is r* = w N_Z / (N + w N_Z).

    `reduce`, when the T tokens are spread over ranks (sequence parallelism), sums the
    vector [real-slot share sum, real-probability sum, token count] over them: it must
    all-reduce in the forward and pass the gradient through unchanged, so that every rank
    gets the loss of all T tokens and each token's gradient arrives once, on its own rank.
    """
    if num_zero <= 0:
        return probs.new_zeros(())
    fresh = torch.topk(probs.detach(), top_k, dim=-1).indices
    real_slot = (fresh < num_experts).to(probs.dtype)
    p_real = probs[:, :num_experts].sum(dim=-1)
    if reduce is not None:
        m = torch.ones_like(p_real) if token_mask is None else token_mask.reshape(-1).to(probs.dtype)
        sums = reduce(torch.stack([(real_slot.mean(dim=-1) * m).sum(), (p_real * m).sum(), m.sum()]))
        denom = sums[2].detach().clamp_min(1.0)
        f_e, p_e = sums[0].detach() / denom, sums[1] / denom
    elif token_mask is not None:
        m = token_mask.reshape(-1).to(probs.dtype)
        denom = m.sum().clamp_min(1.0)
        f_e = (real_slot.mean(dim=-1) * m).sum() / denom
        p_e = (p_real * m).sum() / denom
    else:
        f_e = real_slot.mean()
        p_e = p_real.mean()
    f_z, p_z = 1.0 - f_e, 1.0 - p_e  # f carries no gradient (top-K ids); the router learns through P
    return alpha * (num_experts + w * num_zero) * (f_e * p_e / num_experts + f_z * p_z / (w * num_zero))


def equilibrium_zero_share(num_experts: int, num_zero: int, w: float = 2.0) -> float:
    """r* = w N_Z / (N + w N_Z): where L_GA settles (50% for w=2, N_Z=N/2)."""
    return w * num_zero / (num_experts + w * num_zero)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(tokens[:, t+1] | ..t) from logits [B, S, V]: returns [B, S-1] in fp32."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    return logp.gather(-1, tokens[:, 1:].unsqueeze(-1)).squeeze(-1)


def token_weights(
    loss_mask: torch.Tensor, agg: LossAgg, n_tokens: float | None = None, n_samples: float | None = None
) -> torch.Tensor:
    """Per-token weights w [B, S] such that sum(w * loss_t) is the aggregated loss.

    "token_mean": every response token of the global batch counts the same (1 / tokens);
    "sample_mean": each sample's token mean, then the mean over samples (1 / (len_i x
    samples)), as the official OPD scripts aggregate (slime's default), so a long answer
    weighs no more than a short one. The global counts (`n_tokens`, `n_samples`: over all
    micro-batches and data-parallel ranks) default to those of `loss_mask` itself.
    """
    m = loss_mask.float()
    if agg == "token_mean":
        return m / max(float(m.sum()) if n_tokens is None else n_tokens, 1.0)
    if agg == "sample_mean":
        per_row = m.sum(dim=-1, keepdim=True)
        rows = float((per_row > 0).sum()) if n_samples is None else n_samples
        return m / per_row.clamp_min(1.0) / max(rows, 1.0)
    raise ValueError(f"loss aggregation {agg!r}: expected 'sample_mean' or 'token_mean'")


def sft_loss(logprobs: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Token NLL, per-token mean over the loss mask (response tokens): the official SFT's aggregation."""
    return -(logprobs * token_weights(loss_mask, "token_mean")).sum()


def opd_token_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    clip_eps: float = 0.2,
    is_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token clipped policy loss with A_t = log p_teacher - log p_student: (loss_t, ratio, A).

    The advantage uses the learner's fresh student logprobs (AsyncOPD: recomputing the
    reverse-KL signal under the current student is what survives staleness). The ratio is
    taken against `old_logprobs`, the policy before this update as the learner computes it
    (official: then ratio = 1 for one update per rollout and only its gradient acts), or
    the rollout engine's logprobs when the caller chooses so. `is_weight` (detached, e.g.
    a truncated importance weight for stale samples) multiplies each token's loss.
    """
    adv = (teacher_logprobs - logprobs).detach()
    ratio = torch.exp(logprobs - old_logprobs)
    clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = -torch.minimum(ratio * adv, clipped * adv)
    if is_weight is not None:
        loss = loss * is_weight.detach()
    return loss, ratio.detach(), adv


def topk_reverse_kl(student_logp: torch.Tensor, top_ids: torch.Tensor, top_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-position reverse KL(p_S || p_T) over the teacher's top-k next tokens: [B, S] from the student's
    next-token log-softmax [B, S, V] and the teacher's top-k ids / logprobs [B, S, k].

    Both distributions are renormalised over the k tokens, so with k = V it is the exact reverse KL
    the sampled-token advantage estimates (in expectation over the student's samples), without the
    estimator's noise; with k < V it is the KL restricted to the teacher's likely set ("Revisiting
    OPD"). Its gradient flows through the student's probabilities directly (GKD), no advantage.
    """
    s = student_logp.gather(-1, top_ids)
    s = s - torch.logsumexp(s, dim=-1, keepdim=True)
    t = top_logprobs - torch.logsumexp(top_logprobs, dim=-1, keepdim=True)
    return (s.exp() * (s - t)).sum(-1)


def opd_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    loss_mask: torch.Tensor,
    clip_eps: float = 0.2,
    agg: LossAgg = "sample_mean",
    is_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """`opd_token_loss` aggregated over one batch (`token_weights`), with per-token-mean stats."""
    loss_t, ratio, adv = opd_token_loss(logprobs, old_logprobs, teacher_logprobs, clip_eps, is_weight)
    loss = (loss_t * token_weights(loss_mask, agg)).sum()
    m = loss_mask.bool()
    with torch.no_grad():
        stats = {
            "reverse_kl": float(-adv[m].mean()) if m.any() else 0.0,
            "clip_frac": float(((ratio - 1.0).abs() > clip_eps)[m].float().mean()) if m.any() else 0.0,
            "ratio_mean": float(ratio[m].mean()) if m.any() else 1.0,
        }
    return loss, stats
