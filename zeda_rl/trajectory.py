"""Samples (prompt + response, as an engine returns them) to a padded training batch.

Alignment convention, used by the learner and the losses: column t of `loss_mask`,
`behaviour_logprobs` and `teacher_logprobs` describes token t as predicted from
position t-1; column 0 is never trained.

Every array of a batch is row-first: [B] or [B, S, ...] (`routed_experts` [B, S, L_moe, K]), so
selecting, concatenating and padding treat all fields alike; padding is 0, -1 for expert ids.
"""

from __future__ import annotations

import numpy as np


def pack_samples(
    samples: list[dict],
    teacher_logprobs: list[np.ndarray] | None = None,
    pad_id: int = 0,
    teacher_top: list[dict] | None = None,
) -> dict[str, np.ndarray]:
    """Right-pad samples into named arrays (the fields of `zeda_rl.wire.TrajectoryBatch`).

    Each sample dict has prompt_ids, output_ids, logprobs [O], policy_version, sample_id
    and optionally routed_experts [P+O, L, K]. `teacher_logprobs[i]` is the engine's
    score of the whole sequence: log p(seq[t] | seq[:t]) for t >= 1. `teacher_top[i]`, when
    given (`Engine.score_topk`: top_ids / top_logprobs [len-1, k]), adds the teacher's k most likely
    tokens at every position as `teacher_top_ids` / `teacher_top_logprobs` [B, S, k], same alignment;
    padding columns hold id 0 and logprob 0 (finite, so a masked-out KL term stays 0, never NaN).
    """
    if not samples:
        raise ValueError("pack_samples: no samples")
    seqs = [list(s["prompt_ids"]) + list(s["output_ids"]) for s in samples]
    b, n = len(samples), max(len(x) for x in seqs)
    tokens = np.full((b, n), pad_id, dtype=np.int32)
    attn = np.zeros((b, n), dtype=np.uint8)
    loss_mask = np.zeros((b, n), dtype=np.uint8)
    behaviour = np.zeros((b, n), dtype=np.float32)
    teacher = np.zeros((b, n), dtype=np.float32)
    routed = None
    if samples[0].get("routed_experts") is not None:
        _, layers, k = samples[0]["routed_experts"].shape
        routed = np.full((b, n, layers, k), -1, dtype=np.int16)
    for i, (s, seq) in enumerate(zip(samples, seqs)):
        p, o = len(s["prompt_ids"]), len(s["output_ids"])
        tokens[i, : len(seq)] = seq
        attn[i, : len(seq)] = 1
        loss_mask[i, p : p + o] = 1
        lp = np.asarray(s["logprobs"], dtype=np.float32)
        if lp.shape != (o,):
            raise ValueError(f"sample {s.get('sample_id')}: logprobs shape {lp.shape}, expected ({o},)")
        behaviour[i, p : p + o] = lp
        if teacher_logprobs is not None:
            t = np.asarray(teacher_logprobs[i], dtype=np.float32)
            if t.shape != (len(seq) - 1,):
                raise ValueError(
                    f"sample {s.get('sample_id')}: teacher logprobs shape {t.shape}, expected ({len(seq) - 1},)"
                )
            teacher[i, 1 : len(seq)] = t
        if routed is not None:
            routed[i, : len(seq)] = s["routed_experts"]
        if teacher_top is not None:
            top_ids, top_lp = (np.asarray(teacher_top[i][k]) for k in ("top_ids", "top_logprobs"))
            if i == 0:
                kk = top_ids.shape[-1] if top_ids.ndim == 2 else 0
                tops = np.zeros((b, n, kk), dtype=np.int32), np.zeros((b, n, kk), dtype=np.float32)
            if top_ids.shape != (len(seq) - 1, tops[0].shape[2]) or top_lp.shape != top_ids.shape:
                raise ValueError(
                    f"sample {s.get('sample_id')}: teacher top-k shapes {top_ids.shape} / {top_lp.shape}, "
                    f"expected ({len(seq) - 1}, {tops[0].shape[2]})"
                )
            tops[0][i, 1 : len(seq)], tops[1][i, 1 : len(seq)] = top_ids, top_lp
    out = {
        "tokens": tokens,
        "attention_mask": attn,
        "loss_mask": loss_mask,
        "behaviour_logprobs": behaviour,
        "teacher_logprobs": teacher,
        "policy_version": np.array([s.get("policy_version", 0) for s in samples], dtype=np.int64),
        "sample_ids": np.array([s.get("sample_id", i) for i, s in enumerate(samples)], dtype=np.int64),
    }
    if routed is not None:
        out["routed_experts"] = routed
    if teacher_top is not None:
        out["teacher_top_ids"], out["teacher_top_logprobs"] = tops
    return out


def _pad_to(a: np.ndarray, length: int, axis: int, fill) -> np.ndarray:
    if a.shape[axis] == length:
        return a
    pad = [(0, 0)] * a.ndim
    pad[axis] = (0, length - a.shape[axis])
    return np.pad(a, pad, constant_values=fill)


def concat_batches(batches: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Row-concatenate packed batches of different sequence lengths (padding as pack_samples)."""
    if not batches:
        raise ValueError("concat_batches: nothing to concatenate")
    n = max(b["tokens"].shape[1] for b in batches)
    out = {}
    for key in batches[0]:
        if batches[0][key].ndim >= 2:  # [B, S, ...]: padded to the longest sequence
            fill = -1 if key == "routed_experts" else 0
            out[key] = np.concatenate([_pad_to(b[key], n, 1, fill) for b in batches], axis=0)
        else:
            out[key] = np.concatenate([b[key] for b in batches], axis=0)
    return out


def take_rows(batch: dict[str, np.ndarray], rows) -> dict[str, np.ndarray]:
    """Select samples (rows) and trim the padding the selection no longer needs."""
    rows = np.asarray(rows)
    out = {k: v[rows] for k, v in batch.items()}
    n = int(out["attention_mask"].sum(1).max()) if "attention_mask" in out else out["tokens"].shape[1]
    return {k: v[:, :n] if v.ndim >= 2 else v for k, v in out.items()}


def num_rows(batch: dict[str, np.ndarray]) -> int:
    return int(batch["tokens"].shape[0])
