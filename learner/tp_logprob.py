"""Token log-probabilities from vocab-parallel logits (tensor parallelism), with their gradient.

Under TP each rank holds logits for its contiguous 1/TP of the (padded) vocabulary only;
gathering the full [B, S, V] logits on every rank would cost TP times the largest
activation of the step. The log-softmax needs just three numbers per token from the
other ranks: the max (for stability, no gradient), the sum of exponentials and the
sampled token's logit (held by one rank, zero elsewhere). Both sums go through one
all-reduce whose backward is the identity (Megatron's `reduce_from_tensor_model_parallel_region`):
every TP rank computes the same loss and backpropagates it, so each rank's slice gets
exactly its part of softmax - onehot. Columns past the real vocabulary (padding to a
multiple of TP) are -inf, so they take no probability and get no gradient.

Kept apart from `zeda_rl.losses.token_logprobs` (the one-rank definition, which this must
equal) so the learner's loss path only chooses which one to call.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from learner import cpu_shims

cpu_shims.apply()

from megatron.core import parallel_state  # noqa: E402
from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region  # noqa: E402
from megatron.core.utils import get_pg_rank  # noqa: E402


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, vocab_size: int, group=None) -> torch.Tensor:
    """log p(tokens[:, t+1] | ..t) [B, S-1] fp32 from this TP rank's logits [B, S, V_padded / TP].

    `vocab_size` is the real vocabulary (columns at or past it are padding). Collective over
    the TP group; every rank returns the same values.
    """
    group = group if group is not None else parallel_state.get_tensor_model_parallel_group()
    local = logits.shape[-1]
    start = get_pg_rank(group) * local
    x = logits[:, :-1].float()
    if start + local > vocab_size:
        x = x.masked_fill(torch.arange(start, start + local, device=x.device) >= vocab_size, float("-inf"))
    with torch.no_grad():
        top = x.max(dim=-1).values
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    target = tokens[:, 1:] - start
    mine = (target >= 0) & (target < local)
    picked = x.gather(-1, target.clamp(0, local - 1).unsqueeze(-1)).squeeze(-1)
    picked = torch.where(mine, picked, torch.zeros_like(picked))
    sumexp = torch.exp(x - top.unsqueeze(-1)).sum(dim=-1)
    both = reduce_from_tensor_model_parallel_region(torch.stack([picked, sumexp]), group)
    return both[0] - top - torch.log(both[1])
