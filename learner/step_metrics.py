"""A training step's metrics: token sums and routing counts per rank, reduced over data parallelism.

Every rank accumulates plain sums while it runs its micro-batches (`SUM_KEYS`, `routing_counts`);
`step_metrics` all-reduces them in one call over the data-parallel group (TP peers compute the
same numbers, so summing over the world would count them TP times) and turns them into the means
the driver logs. Expert load (`expert_load`, `load_violation`) is reported because L_GA pushes
tokens to zero experts and must leave the real experts' routing balanced.
"""

from __future__ import annotations

import torch

from learner import parallel
from learner.megatron_config import ModelInfo

# token sums of a step, each over the response tokens of the rank's real micro-batches
SUM_KEYS = (
    "main",
    "nll",
    "reverse_kl",
    "clip_frac",
    "ratio_sum",
    "beh_ratio_sum",
    "beh_clip",
    "adv_sq",
    "adv_pos",
    "full_kl",
)


def expert_load(ids: torch.Tensor, valid: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Slots routed to each real expert, per MoE layer: [L, N] from ids [B, S, L, K] (zero slots, -1 and
    slots not `valid` left out)."""
    n_layers, bins = ids.shape[2], num_experts + 1  # the left-out ones land in an extra bin per layer
    binned = torch.where(valid & (ids >= 0) & (ids < num_experts), ids, num_experts)
    binned = binned + torch.arange(n_layers)[:, None] * bins  # layer l counts into bins l*(N+1)..
    return torch.bincount(binned.flatten(), minlength=n_layers * bins).view(n_layers, bins)[:, :num_experts].double()


def load_violation(load: torch.Tensor) -> dict[str, list[float]]:
    """Per layer, how far the real experts' loads [L, N] are from uniform, relative to the uniform load:
    max_e (load_e - mean) / mean and mean_e |load_e - mean| / mean (0: perfectly balanced; a layer that
    routed nothing to real experts reports 0)."""
    mean = load.mean(dim=1, keepdim=True)
    rel = torch.where(mean > 0, (load - mean) / mean.clamp_min(1e-12), torch.zeros_like(load))
    return {"max": rel.max(dim=1).values.tolist(), "mean": rel.abs().mean(dim=1).tolist()}


def routing_counts(ids: torch.Tensor, attention_mask: torch.Tensor, num_experts: int):
    """(zero slots per layer [L], slots of one layer, slots per real expert [L, N]) of one micro-batch's
    chosen ids [B, S, L, K], over its real (attended) tokens."""
    valid = attention_mask[:, :, None, None].expand_as(ids)
    zero_slots = ((ids >= num_experts) & valid).sum((0, 1, 3)).double()
    return zero_slots, float(valid[:, :, 0].sum()), expert_load(ids, valid, num_experts)


def step_metrics(st: dict, info: ModelInfo, stage, step: int, grad_norm: float, lr: float, dt: float) -> dict:
    """The step's global metrics from this rank's `Learner.accumulate` stats (collective over DP)."""
    sums, aux, zero_slots, routed_slots = st["sums"], st["aux"], st["zero_slots"], st["routed_slots"]
    real_mb_total, resp_total, valid_total = st["real_mb_total"], st["resp_total"], st["valid_total"]
    n_layers = len(info.moe_layers)
    keys = SUM_KEYS
    red = parallel.all_reduce_sum(
        [sums[k] for k in keys] + [routed_slots] + aux.tolist() + zero_slots.tolist() + st["load"].flatten().tolist(),
        group=parallel.dp_group(),
    )
    tot = dict(zip(keys, red))
    main, slots, red = tot["main"], red[len(keys)], red[len(keys) + 1 :]
    aux_l = [a / max(real_mb_total, 1.0) for a in red[:n_layers]]
    zr = [z / max(slots, 1.0) for z in red[n_layers : 2 * n_layers]]
    vio = load_violation(torch.tensor(red[2 * n_layers :], dtype=torch.float64).reshape(n_layers, -1))
    aux_total = sum(aux_l) / st["aux_layer_div"]
    m = {
        "step": step,
        "lr": lr,
        "loss": main + aux_total,
        "aux_loss": aux_total,
        "aux_loss_per_layer": aux_l,
        "zero_ratio": float(sum(zr) / len(zr)) if zr else 0.0,
        "zero_ratio_per_layer": zr,
        "grad_norm": grad_norm,
        "tokens": valid_total,
        "response_tokens": resp_total,
        "tokens_per_s": valid_total / dt if dt > 0 else 0.0,
        "step_time_s": dt,
        "micro_batches": st["n_mb"],
        "nll": tot["nll"] / resp_total,
        # how unevenly the real experts are loaded (0: uniform): L_GA must leave their routing healthy
        "expert_load_max_violation": max(vio["max"], default=0.0),
        "expert_load_max_violation_per_layer": vio["max"],
        "expert_load_mean_violation_per_layer": vio["mean"],
    }
    if stage.name == "sft":
        m["sft_loss"] = main
    else:  # per-token means over the response tokens
        m.update(
            policy_loss=main,
            **{
                k: tot[src] / resp_total
                for k, src in (
                    ("reverse_kl", "reverse_kl"),
                    ("clip_frac", "clip_frac"),
                    ("ratio_mean", "ratio_sum"),
                    ("behaviour_ratio_mean", "beh_ratio_sum"),
                    ("behaviour_clip_frac", "beh_clip"),
                )
            },
        )
        # the advantage A_t = log p_T - log p_S (fresh) of the response tokens: its mean is -reverse_kl
        adv_mean = -tot["reverse_kl"] / resp_total
        m.update(
            adv_mean=adv_mean,
            adv_std=max(tot["adv_sq"] / resp_total - adv_mean**2, 0.0) ** 0.5,
            adv_pos_frac=tot["adv_pos"] / resp_total,
        )
        if stage.objective == "full_kl":
            m["full_kl"] = tot["full_kl"] / resp_total
    return m
