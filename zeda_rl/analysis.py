"""Where a ZEDA student skips (paper 4.1), and the calibration of the Dynamic Skipping baseline.

ZEDA's claim is that compute goes where the student is unsure or disagrees with the teacher,
not where a human sees difficulty. That is a statement about single decode steps, so it is
measured per generated token: the share of its routed slots (all MoE layers) that went to zero
experts, the student's entropy at that step, and |teacher - student| logprob of the token it
emitted. The generations are the evaluation's own (greedy, same prompts, same length cap),
replayed teacher-forced so the teacher scores exactly the student's tokens; the routing of a
teacher-forced pass is that of the KV-cache decode (same positions, same inputs).

Dynamic Skipping is compared at ZEDA's zero share, so its threshold is searched for (not
guessed): the share it skips is monotone in the threshold for one layer, and nearly so across
layers, so bisection on a teacher-forced calibration pass reaches the target within a tolerance.
"""

from __future__ import annotations

import numpy as np
import torch

from zeda_rl.chat import stop_ids
from zeda_rl.generate import stop_mask
from zeda_rl.modeling import moe_blocks, record_routing, set_baseline_options

# ---- Dynamic Skipping: threshold for a target skip share ------------------------------------


@torch.no_grad()
def skipped_share(model, batches: list[dict]) -> float:
    """Share of routed (token, layer, slot) entries on the skip/zero sentinel over the batches' real tokens."""
    n = moe_blocks(model)[0].spec.num_experts
    skipped = total = 0.0
    for enc in batches:
        with record_routing(model) as rec:
            model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        ids = rec()  # [B, S, L, K]
        m = enc["attention_mask"].bool()[:, :, None, None].expand_as(ids)
        skipped += float(((ids >= n) & m).sum())
        total += float(m.sum())
    return skipped / max(total, 1.0)


def calibrate_skip_threshold(
    model, tokenizer, texts: list[str], target: float, tol: float = 0.005, iters: int = 20, batch_size: int = 64
) -> dict:
    """The Dynamic Skipping threshold whose skip share on `texts` is `target` (within `tol`).

    The model is left with that threshold set. With K slots at most (K-1)/K can be skipped (the
    top slot is always kept); a larger target gets the threshold that skips every lower slot,
    and the result says the target was out of reach.
    """
    tokenizer.padding_side = "right"
    batches = [
        dict(tokenizer(texts[i : i + batch_size], return_tensors="pt", padding=True))
        for i in range(0, len(texts), batch_size)
    ]
    k = moe_blocks(model)[0].spec.top_k
    reachable = (k - 1) / k
    lo, hi = 0.0, 1.0 + 1e-6  # above 1 every slot but the top one is below threshold x top
    set_baseline_options(model, skip_threshold=hi)
    best = (hi, skipped_share(model, batches))
    if target < best[1] - tol:
        for _ in range(iters):
            mid = (lo + hi) / 2
            set_baseline_options(model, skip_threshold=mid)
            share = skipped_share(model, batches)
            if abs(share - target) < abs(best[1] - target):
                best = (mid, share)
            if abs(share - target) <= tol:
                break
            lo, hi = (mid, hi) if share < target else (lo, mid)
    set_baseline_options(model, skip_threshold=best[0])
    return {
        "threshold": best[0],
        "share": best[1],
        "target": target,
        "reachable": reachable,
        "reached": abs(best[1] - target) <= tol,
        "calibration_texts": len(texts),
    }


# ---- per generated token: zero share, entropy, teacher gap -----------------------------------


@torch.no_grad()
def token_stats(student, teacher, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 64) -> dict:
    """Per generated token of `student`'s greedy completions: zero share, entropy, |teacher gap|.

    Returns flat arrays over every generated token (EOS included: choosing to stop is a step
    too) with, per token, the index of its prompt; and `prompt_zero_share`, per prompt, the
    zero share of the tokens the model only reads (its prompt but the last token). The step that emits token t is the forward
    at position t-1, so the zero share, the entropy and both logprobs are read there.
    """
    n = moe_blocks(student)[0].spec.num_experts
    out = {
        "prompt": [],
        "zero_share": [],
        "entropy": [],
        "teacher_gap": [],
        "student_logprob": [],
        "teacher_logprob": [],
    }
    prompt_zero = []  # per prompt: zero share over its prompt tokens but the last (that one is a generation step)
    tokenizer.padding_side = "left"
    stops = stop_ids(tokenizer)  # the model's turn ends, as the engines stop (GLM-4.x: <|user|>, not its eos)
    for start in range(0, len(prompts), batch_size):
        enc = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True)
        seq = student.generate(
            input_ids=enc.input_ids,
            attention_mask=enc.attention_mask,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=list(stops) or None,
        )
        plen = enc.input_ids.shape[1]
        new = seq[:, plen:]
        gen_mask = stop_mask(new, stops)  # up to and including the first stop; what generate pads after is not
        mask = torch.cat([enc.attention_mask, gen_mask.long()], dim=1)
        pos = (mask.cumsum(-1) - 1).clamp_min(0)
        with record_routing(student) as rec:
            s_logits = student(input_ids=seq, attention_mask=mask, position_ids=pos).logits.float()
        ids = rec()  # [B, S, L, K]
        t_logits = teacher(input_ids=seq, attention_mask=mask, position_ids=pos).logits.float()
        # the forward at position j produces token j+1: take positions plen-1 .. S-2
        steps = slice(plen - 1, seq.shape[1] - 1)
        s_lp = torch.log_softmax(s_logits[:, steps], -1)
        t_lp = torch.log_softmax(t_logits[:, steps], -1)
        tok = new[:, :, None]
        s_tok, t_tok = s_lp.gather(-1, tok).squeeze(-1), t_lp.gather(-1, tok).squeeze(-1)
        entropy = -(s_lp.exp() * s_lp).sum(-1)
        zero = (ids[:, steps] >= n).float().mean(dim=(2, 3))  # over layers and slots: [B, T]
        reading = enc.attention_mask.bool().clone()
        reading[:, -1] = False
        zp = (ids[:, :plen] >= n).float().mean(dim=(2, 3))
        prompt_zero.append(((zp * reading).sum(1) / reading.sum(1).clamp_min(1)).numpy())
        rows = torch.arange(new.shape[0])[:, None].expand_as(new) + start
        for key, val in (
            ("prompt", rows),
            ("zero_share", zero),
            ("entropy", entropy),
            ("teacher_gap", (t_tok - s_tok).abs()),
            ("student_logprob", s_tok),
            ("teacher_logprob", t_tok),
        ):
            out[key].append(val[gen_mask].numpy())
    return {k: np.concatenate(v) if v else np.zeros(0) for k, v in {**out, "prompt_zero_share": prompt_zero}.items()}


def binned(x: np.ndarray, y: np.ndarray, bins: int = 8) -> list[dict]:
    """Mean of `y` in quantile bins of `x` (equal counts, so a long tail gets its own bins).

    Ties can make quantile edges coincide; such empty bins are dropped, never reported as NaN.
    """
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.size == 0:
        return []
    edges = np.unique(np.quantile(x, np.linspace(0, 1, bins + 1)))
    if edges.size == 1:
        return [
            {
                "lo": float(edges[0]),
                "hi": float(edges[0]),
                "x": float(x.mean()),
                "y": float(y.mean()),
                "count": int(x.size),
            }
        ]
    which = np.clip(np.searchsorted(edges, x, side="right") - 1, 0, edges.size - 2)
    out = []
    for b in range(edges.size - 1):
        sel = which == b
        if sel.any():
            out.append(
                {
                    "lo": float(edges[b]),
                    "hi": float(edges[b + 1]),
                    "x": float(x[sel].mean()),
                    "y": float(y[sel].mean()),
                    "count": int(sel.sum()),
                }
            )
    return out


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    if x.size < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    return float(np.corrcoef(rx, ry)[0, 1])


def summarize(stats: dict, families: list[str], bins: int = 8) -> dict:
    """The report's numbers: binned curves, rank correlations and the zero share per task family.

    `families[i]` is the family of prompt i.
    """
    z, ent, gap = stats["zero_share"], stats["entropy"], stats["teacher_gap"]
    fam = np.asarray(families, dtype=object)[stats["prompt"].astype(int)] if z.size else np.zeros(0, dtype=object)
    per_family = {f: float(z[fam == f].mean()) for f in dict.fromkeys(families) if (fam == f).any()}
    reading = {}
    if "prompt_zero_share" in stats:
        pf = np.asarray(families, dtype=object)
        reading = {f: float(stats["prompt_zero_share"][pf == f].mean()) for f in dict.fromkeys(families)}
    return {
        "zero_share_prompt_tokens_per_family": reading,
        "tokens": int(z.size),
        "zero_share_mean": float(z.mean()) if z.size else 0.0,
        "zero_share_by_entropy": binned(ent, z, bins),
        "zero_share_by_teacher_gap": binned(gap, z, bins),
        "spearman_zero_entropy": _spearman(ent, z),
        "spearman_zero_teacher_gap": _spearman(gap, z),
        "zero_share_per_family": per_family,
    }


def plot_curves(summary: dict, path) -> None:
    """Zero share against entropy and against the teacher gap (binned), and per family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, key, label in (
        (axes[0], "zero_share_by_entropy", "student entropy (nats)"),
        (axes[1], "zero_share_by_teacher_gap", "|teacher - student| logprob of the token"),
    ):
        pts = summary[key]
        ax.plot([p["x"] for p in pts], [100 * p["y"] for p in pts], "o-", c="tab:purple")
        ax.set_xlabel(label + " (quantile bins)")
        ax.set_ylabel("zero share of the step (%)")
        rho = summary["spearman_zero_entropy" if "entropy" in key else "spearman_zero_teacher_gap"]
        ax.set_title(f"zero share vs {label.split(' (')[0].split(' of')[0]}  (Spearman {rho:+.2f})", fontsize=9)
        ax.set_xscale("symlog", linthresh=1e-4)  # most greedy steps are near-certain: the bins crowd near 0
    fam, reading = summary["zero_share_per_family"], summary.get("zero_share_prompt_tokens_per_family") or {}
    xs = np.arange(len(fam))
    for off, vals, label, colour in (
        (-0.2, fam, "steps that generate", "tab:purple"),
        (0.2, reading, "prompt tokens (read only)", "tab:gray"),
    ):
        if vals:
            bars = axes[2].bar(xs + off, [100 * vals[f] for f in fam], 0.4, label=label, color=colour)
            axes[2].bar_label(bars, labels=[f"{100 * vals[f]:.0f}" for f in fam], padding=2, fontsize=7)
    axes[2].set_xticks(xs, list(fam))
    axes[2].set_ylim(0, 100)
    axes[2].set_ylabel("zero share (%)")
    axes[2].legend(fontsize=7, loc="upper left")
    axes[2].set_title("per task family")
    fig.suptitle(f"ZEDA student: where tokens skip ({summary['tokens']} generated tokens)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
