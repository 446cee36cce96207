"""Real skipping of zero-expert slots in the CPU reference engine: the `zeda_skip` experts path.

transformers' fused experts (`grouped_mm`, `eager`) take a [T, K] table of expert ids; the
zero-expert blocks hand them the sentinel id N for a zero slot, and grouped_mm then pays per
expert, not per routed (token, expert) pair (ZEDA measured decode x0.95 / prefill x1.01 against
the teacher with it). This path instead:

1. compacts the routed pairs first: every (token, slot) whose id is not a real expert (a zero
   slot, the sentinel of static_top_k / skip_threshold, or a negative id) is dropped before
   anything indexes with it, so no kernel ever sees a sentinel;
2. sorts the kept pairs by expert (stable: token order kept inside an expert);
3. per expert with at least one pair: gathers its tokens (index_select), gate/up matmul,
   activation, down matmul, times the routing weight, index_add into a zero-initialised output.

Expert compute therefore scales with the routed (token, real expert) pairs; a token routed to
no real expert gets exactly 0 from the routed experts (its output row is never written and
stays zero). SKIP-NOTES measured this loop at 0.55x of the static layer's time with half the
slots skipped on CPU (grouped_mm: 0.72x).

The weights are the experts module's own (transformers 5 layout): `gate_up_proj` [E, 2*I, H]
with the gate rows first (`_apply_gate`: act(gate) * up), `down_proj` [E, H, I], no bias for
Qwen3-MoE and GLM-4.7-Flash (biases, transposed layouts and a post-expert norm are honoured as
transformers' grouped_mm path honours them).

Autograd: every op is differentiable (index_select, linear, index_add into a fresh tensor), so
the path is correct under grad too (tests/test_skip.py checks the gradients against the stock
path); it is used whenever it is the selected implementation, with or without grad. It is a
Python loop over the hit experts with one host sync per layer, so on an accelerator or for
training at scale pick `grouped_mm` explicitly (`from_pretrained(..., experts_implementation=
"grouped_mm")` or `model.set_experts_implementation("grouped_mm")`).

`register()` adds the path to transformers' experts registry as "zeda_skip", so any model whose
experts use transformers' `@use_experts_implementation` (the stock teachers included) can be
switched to it with `set_experts_implementation("zeda_skip")`; the zero-expert models of
`zeda_rl.modeling` use it by default.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

NAME = "zeda_skip"


@dataclass
class RoutedPairs:
    """The routed (token, real expert) pairs of one forward, grouped by expert."""

    tokens: torch.Tensor  # [P] long: token row of each pair, pairs of one expert contiguous
    slots: torch.Tensor  # [P] long: flat slot index t * K + k of each pair (for its routing weight)
    groups: list[tuple[int, int, int]]  # (expert, start, end) for every expert with >= 1 pair

    @property
    def count(self) -> int:
        return int(self.tokens.numel())


def compact(top_k_index: torch.Tensor, num_experts: int) -> RoutedPairs:
    """Keep the (token, slot) pairs routed to a real expert 0..N-1 and group them by expert.

    Ids outside [0, N) (zero slots N..N+N_Z-1, the skip sentinel N, -1) are dropped here, before
    any expert computation indexes with them."""
    k = top_k_index.shape[-1]
    flat = top_k_index.reshape(-1)
    slots = ((flat >= 0) & (flat < num_experts)).nonzero().squeeze(1)
    ids, order = flat.index_select(0, slots).sort(stable=True)
    slots = slots.index_select(0, order)
    counts = torch.bincount(ids, minlength=num_experts).tolist()  # the one host sync of the layer
    groups, start = [], 0
    for e, c in enumerate(counts):
        if c:
            groups.append((e, start, start + c))
            start += c
    return RoutedPairs(tokens=torch.div(slots, k, rounding_mode="floor"), slots=slots, groups=groups)


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    return (x @ weight + bias if bias is not None else x @ weight) if transposed else F.linear(x, weight, bias)


def expert_mlp(experts, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert `e` of a transformers fused experts module on the rows `x` [r, H] -> [r, H] (unweighted)."""
    tr, bias = getattr(experts, "is_transposed", False), getattr(experts, "has_bias", False)
    if getattr(experts, "has_gate", True):
        h = _linear(x, experts.gate_up_proj[e], experts.gate_up_proj_bias[e] if bias else None, tr)
        h = experts._apply_gate(h)
    else:
        h = experts.act_fn(_linear(x, experts.up_proj[e], experts.up_proj_bias[e] if bias else None, tr))
    y = _linear(h, experts.down_proj[e], experts.down_proj_bias[e] if bias else None, tr)
    if getattr(experts, "has_post_expert_norm", False):
        y = experts.post_expert_norm(y)
    return y


def skip_experts_forward(
    self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """The experts forward with the signature of transformers' implementations: [T, H], [T, K], [T, K] -> [T, H]."""
    pairs = compact(top_k_index, self.num_experts)
    out = torch.zeros_like(hidden_states)  # rows no pair writes (0 real experts) stay exactly 0
    if not pairs.groups:
        return out
    weights = top_k_weights.reshape(-1).index_select(0, pairs.slots)
    for e, a, b in pairs.groups:
        tok = pairs.tokens[a:b]
        y = expert_mlp(self, e, hidden_states.index_select(0, tok)) * weights[a:b, None].to(hidden_states.dtype)
        out.index_add_(0, tok, y.to(out.dtype))
    return out


def register() -> None:
    """Add the path to transformers' experts registry as "zeda_skip" (idempotent)."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    if ALL_EXPERTS_FUNCTIONS.get(NAME) is not skip_experts_forward:
        ALL_EXPERTS_FUNCTIONS.register(NAME, skip_experts_forward)


register()
