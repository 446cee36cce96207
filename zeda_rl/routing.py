"""Routing with zero experts (ZEDA.md section 2), as pure functions.

One function serves the transformers model, the Megatron learner and the rollout
engines, so "which expert does this token use" has a single definition. Experts
0..N-1 are real; N..N+N_Z-1 are zero-computation slots. Zero slots keep the weight
the router gave them but are dropped without renormalising the real ones, so a token
uses between 0 and K real experts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch


@dataclass(frozen=True)
class RouterSpec:
    family: Literal["softmax", "sigmoid"]
    num_experts: int  # N real experts
    num_zero: int  # N_Z zero-computation slots
    top_k: int
    norm_topk_prob: bool = True
    scaling: float = 1.0  # routed scaling factor (sigmoid family)
    n_group: int = 1  # grouped top-k over the real experts (sigmoid family)
    topk_group: int = 1
    mask_zero: bool = False  # use_zce_mask: zero slots never chosen -> the original model exactly
    # The paper's baselines, applied after the choice above; a skipped or unfilled slot gets the
    # skip sentinel id N, so every consumer counts and skips it like a zero slot and shapes keep K.
    skip_threshold: float = (
        0.0  # Dynamic Skipping (inference only): drop a selected expert below threshold x the top weight
    )
    static_top_k: int | None = None  # NET: a static top-k' < K; slots k'..K-1 hold the sentinel (trainable, replayable)

    @property
    def total(self) -> int:
        return self.num_experts + self.num_zero


@dataclass
class Routing:
    ids: torch.Tensor  # [T, K] int64, ids >= N are zero slots
    weights: torch.Tensor  # [T, K] float32, zero slots included (their weight is simply not used)
    probs: torch.Tensor  # [T, N+N_Z] float32 routing distribution for the group auxiliary loss


def route(
    logits: torch.Tensor,
    spec: RouterSpec,
    bias: torch.Tensor | None = None,
    replay_ids: torch.Tensor | None = None,
) -> Routing:
    """Choose K of N+N_Z slots per token from fp32 router logits [T, N+N_Z].

    With `replay_ids` the choice is given (routing replay: the learner reuses the
    rollout engine's experts) and only the weights are recomputed, so gradients still
    reach the router through the weights and the auxiliary loss. Rows of -1 in
    `replay_ids` mean "not recorded, let the router choose" (e.g. the last sampled
    token, which the engine never ran through the model).
    """
    logits = logits.float()
    if logits.shape[-1] != spec.total:
        raise ValueError(f"router logits have {logits.shape[-1]} columns, expected N+N_Z = {spec.total}")
    n = spec.num_experts
    if spec.mask_zero and spec.num_zero:
        logits = torch.cat([logits[:, :n], torch.full_like(logits[:, n:], float("-inf"))], dim=-1)

    if spec.family == "softmax":
        scores = torch.softmax(logits, dim=-1)
        probs = scores
        choice = scores
    elif spec.family == "sigmoid":
        scores = torch.sigmoid(logits)
        probs = scores / scores.sum(dim=-1, keepdim=True).clamp_min(1e-20)
        choice = scores if bias is None else scores + bias.float()
        if spec.mask_zero and spec.num_zero:
            choice = torch.cat([choice[:, :n], torch.full_like(choice[:, n:], float("-inf"))], dim=-1)
        if spec.n_group > 1:
            choice = _mask_groups(choice, spec)
    else:
        raise ValueError(f"unknown router family {spec.family!r}; expected 'softmax' or 'sigmoid'")

    k = spec.static_top_k or spec.top_k
    if not 1 <= k <= spec.top_k:
        raise ValueError(f"static_top_k {spec.static_top_k} must be between 1 and top_k {spec.top_k}")
    if replay_ids is not None and spec.skip_threshold > 0:
        raise ValueError(
            "skip_threshold (Dynamic Skipping) is an inference option; routing replay (training) does not take it"
        )
    ids = torch.topk(choice, k, dim=-1).indices
    if replay_ids is not None:
        if replay_ids.shape != (logits.shape[0], spec.top_k):
            raise ValueError(
                f"replayed expert ids have shape {tuple(replay_ids.shape)}, expected {(logits.shape[0], spec.top_k)}"
            )
        given = replay_ids[:, :k].to(device=logits.device, dtype=torch.long)  # a static top-k' replays its k' slots
        if int(given.max()) >= spec.total:
            raise ValueError(f"replayed expert id {int(given.max())} out of range for {spec.total} slots")
        ids = torch.where(given[:, :1] >= 0, given, ids)
    weights = scores.gather(1, ids)
    if spec.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    if spec.family == "sigmoid":
        weights = weights * spec.scaling
    if k < spec.top_k or spec.skip_threshold > 0:
        ids, weights = _baseline_slots(ids, weights, spec)
    return Routing(ids=ids, weights=weights, probs=probs)


def dynamic_skip(weights: torch.Tensor, threshold: float) -> torch.Tensor:
    """Dynamic Skipping's rule on [T, K] gate weights: which selected slots to skip (bool [T, K]).

    A slot is skipped when its weight is below `threshold` times the row's top weight; the top
    slot itself is always kept, so every token still runs at least one expert. Skipped weight
    is not given back to the kept slots, as ZEDA drops its zero slots (the rule of the baseline
    it is compared with scales nothing either).
    """
    top = weights.max(dim=-1, keepdim=True)
    skip = weights < threshold * top.values
    return skip.scatter(1, top.indices, False)


def _baseline_slots(ids: torch.Tensor, weights: torch.Tensor, spec: RouterSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Back to K slots per token, the dropped ones on the sentinel id N: every consumer (the expert
    kernels, the zero-share counts, the engines' routed ids) already treats ids >= N as skipped."""
    n = spec.num_experts
    if spec.skip_threshold > 0:
        ids = ids.masked_fill(dynamic_skip(weights, spec.skip_threshold) & (ids < n), n)
    pad = spec.top_k - ids.shape[1]
    if pad:
        ids = torch.cat([ids, torch.full_like(ids[:, :pad], n)], dim=1)
        weights = torch.cat([weights, torch.zeros_like(weights[:, :pad])], dim=1)
    return ids, weights


def _mask_groups(choice: torch.Tensor, spec: RouterSpec) -> torch.Tensor:
    """DeepSeek-style grouped top-k over the real experts; zero slots stay eligible.

    Zero slots belong to no group, so adding them never changes which real groups win,
    and with the mask on the original model's choice is reproduced exactly.
    """
    n, g = spec.num_experts, spec.n_group
    real = choice[:, :n].reshape(choice.shape[0], g, n // g)
    group_scores = real.topk(2, dim=-1).values.sum(dim=-1)
    keep = torch.zeros_like(group_scores)
    keep.scatter_(1, torch.topk(group_scores, spec.topk_group, dim=-1).indices, 1.0)
    real = real.masked_fill(keep.unsqueeze(-1) == 0, float("-inf")).reshape(choice.shape[0], n)
    return torch.cat([real, choice[:, n:]], dim=-1)


def zero_ratio(ids: torch.Tensor, num_experts: int, token_mask: torch.Tensor | None = None) -> dict:
    """Share of routed slots sent to zero experts, overall and per MoE layer.

    `ids` is [..., L, K] (tokens first, e.g. [B, S, L, K]). `token_mask` ([...], bool) limits the
    count to some tokens, e.g. the response. Expert FLOPs eliminated ~= this share (ZEDA.md 6).
    """
    zero = (ids >= num_experts).float().flatten(0, -3)  # [tokens, L, K]
    if token_mask is not None:
        m = token_mask.reshape(-1).to(zero.dtype)
        per_layer = (zero * m[:, None, None]).sum((0, 2)) / (m.sum() * zero.shape[-1]).clamp_min(1)
    else:
        per_layer = zero.mean((0, 2))
    return {"overall": float(per_layer.mean()) if len(per_layer) else 0.0, "per_layer": per_layer.tolist()}
