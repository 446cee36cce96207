"""A rank's share of a training batch, checked and cut into micro-batches every rank agrees on.

Batch fields, all [B, S] unless said (column t describes token t, predicted from t-1; column 0
is never trained): `tokens` int, `loss_mask` 0/1, optional `attention_mask` (1 = real token;
right padding only), OPD: `behaviour_logprobs`, `teacher_logprobs`, optional `teacher_top_ids` /
`teacher_top_logprobs` [B, S, k] (opd.objective full_kl); optional `routed_experts`
[B, S, L_moe, K] (-1 = not recorded) for routing replay.

Why the micro-batches are planned for the whole world: expert parallelism makes every forward
and backward collective over the EP group, and the allgather dispatcher needs equal shapes, so
every rank runs the same number of micro-batches of the same shapes (`plan_micro_batches`),
padding with rows and columns that carry no loss (`take_rows`) and dummy micro-batches of pure
padding (`padding_batch`) where it has fewer rows.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from learner import parallel


def as_tensor(x, dtype=None) -> torch.Tensor:
    """A torch tensor of an array or tensor, cast to `dtype` when given."""
    if not isinstance(x, torch.Tensor):
        a = np.ascontiguousarray(x)
        x = torch.from_numpy(a if a.flags.writeable else a.copy())  # Ray hands arrays over zero-copy, read-only
    return x.to(dtype) if dtype is not None else x


_NDIM = {"routed_experts": 4, "teacher_top_ids": 3, "teacher_top_logprobs": 3}  # fields beyond [B, S]


def normalise_batch(batch: dict, stage: str) -> dict[str, torch.Tensor]:
    """Checked torch tensors: tokens (int64), loss_mask/attention_mask (bool), logprobs (fp32), routed ids."""
    if "tokens" not in batch or "loss_mask" not in batch:
        raise ValueError("batch needs 'tokens' and 'loss_mask' ([B, S] each)")
    tokens = as_tensor(batch["tokens"], torch.long)
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be [B, S], got {tuple(tokens.shape)}")
    out = {"tokens": tokens, "loss_mask": as_tensor(batch["loss_mask"]).bool()}
    am = batch.get("attention_mask")
    out["attention_mask"] = as_tensor(am).bool() if am is not None else torch.ones_like(tokens, dtype=torch.bool)
    if stage == "opd":
        for k in ("behaviour_logprobs", "teacher_logprobs"):
            if k not in batch:
                raise ValueError(f"an OPD batch needs {k!r} [B, S]")
            out[k] = as_tensor(batch[k], torch.float32)
        if batch.get("teacher_top_ids") is not None:  # opd.objective full_kl
            out["teacher_top_ids"] = as_tensor(batch["teacher_top_ids"], torch.long)
            out["teacher_top_logprobs"] = as_tensor(batch["teacher_top_logprobs"], torch.float32)
            if out["teacher_top_ids"].shape != out["teacher_top_logprobs"].shape or out["teacher_top_ids"].dim() != 3:
                raise ValueError(
                    f"teacher_top_ids {tuple(out['teacher_top_ids'].shape)} and teacher_top_logprobs "
                    f"{tuple(out['teacher_top_logprobs'].shape)}: expected the same [B, S, k]"
                )
    if batch.get("routed_experts") is not None:
        out["routed_experts"] = as_tensor(batch["routed_experts"], torch.long)
    for k, v in out.items():
        if tuple(v.shape[:2]) != tuple(tokens.shape) or v.dim() != _NDIM.get(k, 2):
            raise ValueError(
                f"batch field {k!r} has shape {tuple(v.shape)}, expected [B, S{', ...' if k in _NDIM else ''}] "
                f"with [B, S] = {tuple(tokens.shape)}"
            )
    out["loss_mask"] = out["loss_mask"] & out["attention_mask"]
    out["loss_mask"][:, 0] = False  # column 0 has no prediction
    return out


def plan_micro_batches(
    lengths: list[list[int]], rank: int, token_budget: int
) -> tuple[list[list[int]], list[tuple[int, int]]]:
    """One micro-batch plan for the whole world, from every rank's row lengths.

    Every rank runs the same sequence of forward shapes (EP collectives need it), so the
    budget must hold for the padded common shape, not per rank: micro-batch i takes the
    next `rows` consecutive rows of every rank, with `rows` the most for which rows x (the
    longest of those rows on any rank) stays within the budget (one row at least). Returns
    this rank's row groups and the common (rows, length) of every micro-batch; a rank that
    runs out early pads the remaining ones.
    """
    pos = [0] * len(lengths)
    groups, common = [], []
    while any(p < len(rows) for p, rows in zip(pos, lengths)):
        take, longest = 0, 0
        while True:
            nxt = [rows[p + take] for p, rows in zip(pos, lengths) if p + take < len(rows)]
            if not nxt:
                break
            m = max(longest, *nxt)
            if take and (take + 1) * m > token_budget:
                break
            take, longest = take + 1, m
        mine = list(range(pos[rank], min(pos[rank] + take, len(lengths[rank]))))
        if mine:
            groups.append(mine)
        common.append((take, max(longest, 1)))
        pos = [p + take for p in pos]
    return groups, common


def world_lengths(batch: dict[str, torch.Tensor]) -> tuple[list[list[int]], int]:
    """Every rank's row lengths (one all-reduce of a world x rows table) and this rank's index."""
    mine = batch["attention_mask"].sum(1).clamp_min(1).tolist()
    if not dist.is_initialized():
        return [mine], 0
    world, rank = dist.get_world_size(), dist.get_rank()
    n = parallel.all_reduce_max([len(mine)])[0]
    table = [0] * (world * n)
    table[rank * n : rank * n + len(mine)] = mine
    table = parallel.all_reduce_max(table)
    return [[x for x in table[r * n : (r + 1) * n] if x > 0] for r in range(world)], rank


def take_rows(batch: dict[str, torch.Tensor], rows: list[int], b: int, s: int) -> dict[str, torch.Tensor]:
    """Rows of the batch padded/trimmed to [b, s, ...] (padding: token 0, no loss, not attended; expert
    ids -1, the router chooses)."""
    out = {}
    for k, v in batch.items():
        x = v[torch.tensor(rows, dtype=torch.long), :s]
        fill = -1 if k == "routed_experts" else 0
        padded = torch.full((b, s, *x.shape[2:]), fill, dtype=x.dtype)
        padded[: x.shape[0], : x.shape[1]] = x
        out[k] = padded
    return out


def padding_batch(rows: int, seq: int, stage: str) -> dict[str, torch.Tensor]:
    """Rows of pure padding: they run through the model (collectives match) and carry no loss."""
    out = {
        "tokens": torch.zeros(rows, seq, dtype=torch.long),
        "loss_mask": torch.zeros(rows, seq, dtype=torch.bool),
        "attention_mask": torch.zeros(rows, seq, dtype=torch.bool),
        "loss_weight": torch.zeros(rows, seq),
    }
    if stage == "opd":
        out["behaviour_logprobs"] = torch.zeros(rows, seq)
        out["teacher_logprobs"] = torch.zeros(rows, seq)
    return out
