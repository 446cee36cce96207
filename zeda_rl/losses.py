"""The ZEDA losses as pure functions: group auxiliary loss, SFT NLL, OPD policy loss.

The learner (Megatron) and any plain PyTorch loop call exactly these, so the method's
maths lives in one place and is tested on its own.
"""

from __future__ import annotations

import torch


def group_aux_loss(
    probs: torch.Tensor,
    ids: torch.Tensor,
    num_experts: int,
    num_zero: int,
    alpha: float = 0.1,
    w: float = 2.0,
    token_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """L_GA for one MoE layer (ZEDA.md section 3).

    probs: [T, N+N_Z] routing distribution over all slots (softmax, or sigmoid scores
    normalised over all experts); ids: [T, K] chosen slots. It balances only the two
    groups, real vs zero, so the routing among real experts is left as learned; its
    equilibrium zero share is r* = w N_Z / (N + w N_Z).
    """
    if num_zero <= 0:
        return probs.new_zeros(())
    real_slot = (ids < num_experts).float()
    p_real = probs[:, :num_experts].sum(dim=-1)
    if token_mask is not None:
        m = token_mask.reshape(-1).to(probs.dtype)
        denom = m.sum().clamp_min(1.0)
        f_e = (real_slot.mean(dim=-1) * m).sum() / denom
        p_e = (p_real * m).sum() / denom
    else:
        f_e = real_slot.mean()
        p_e = p_real.mean()
    f_e = f_e.detach()  # counts carry no gradient; the router learns through P
    f_z, p_z = 1.0 - f_e, 1.0 - p_e
    return alpha * (num_experts + w * num_zero) * (f_e * p_e / num_experts + f_z * p_z / (w * num_zero))


def equilibrium_zero_share(num_experts: int, num_zero: int, w: float = 2.0) -> float:
    """r* = w N_Z / (N + w N_Z): where L_GA settles (50% for w=2, N_Z=N/2)."""
    return w * num_zero / (num_experts + w * num_zero)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(tokens[:, t+1] | ..t) from logits [B, S, V]: returns [B, S-1] in fp32."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    return logp.gather(-1, tokens[:, 1:].unsqueeze(-1)).squeeze(-1)


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp_min(1.0)


def sft_loss(logprobs: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Token NLL, per-token mean over the loss mask (response tokens)."""
    return -_masked_mean(logprobs, loss_mask)


def opd_policy_loss(
    logprobs: torch.Tensor,
    behaviour_logprobs: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    loss_mask: torch.Tensor,
    clip_eps: float = 0.2,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped policy loss with per-token advantage A_t = log p_teacher - log p_student.

    The advantage uses the learner's fresh student logprobs (AsyncOPD: recomputing the
    reverse-KL signal under the current student is what survives staleness); the
    behaviour logprobs of the rollout engine feed only the importance ratio.
    """
    adv = (teacher_logprobs - logprobs).detach()
    ratio = torch.exp(logprobs - behaviour_logprobs)
    clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = -_masked_mean(torch.minimum(ratio * adv, clipped * adv), loss_mask)
    with torch.no_grad():
        m = loss_mask.bool()
        stats = {
            "reverse_kl": float(_masked_mean(-adv, loss_mask)),
            "clip_frac": float(((ratio - 1.0).abs() > clip_eps)[m].float().mean()) if m.any() else 0.0,
            "ratio_mean": float(ratio[m].mean()) if m.any() else 1.0,
        }
    return loss, stats
