"""Is one variant better than another? Paired intervals over held-out prompts and over training seeds.

Near 92% accuracy one standard error on 1,500 prompts is about 0.7 points, and the effects this
project chases (SFT -> OPD against SFT alone) are of that size, so a table of means decides
nothing. Every comparison here is paired: both variants answered the same held-out prompts, and
per seed both were trained from the same seed. Three intervals, 95% by default:
- over prompts: a paired bootstrap of the seed-averaged per-prompt difference (scipy's);
- over seeds: a t-interval of the per-seed differences (the training noise; wide with 3 seeds);
- over both: a two-level bootstrap that resamples seeds, then prompts, which is the one the verdict uses.
A difference whose interval holds 0 is "no difference", never a win.
"""

from __future__ import annotations

import numpy as np


def paired_prompt_ci(
    a: np.ndarray, b: np.ndarray, level: float = 0.95, n_boot: int = 10_000, seed: int = 0
) -> tuple[float, float]:
    """Interval of mean(a - b) over prompts, in points, from per-prompt scores a, b [n_prompts] (paired bootstrap)."""
    from scipy.stats import bootstrap

    d = 100.0 * (np.asarray(a, float) - np.asarray(b, float))
    if np.all(d == d[0]):  # no spread: the bootstrap is degenerate, the interval is the point
        return float(d[0]), float(d[0])
    r = bootstrap(
        (d,),
        np.mean,
        confidence_level=level,
        n_resamples=n_boot,
        method="percentile",
        random_state=np.random.default_rng(seed),
        vectorized=True,
    )
    return float(r.confidence_interval.low), float(r.confidence_interval.high)


def seed_ci(diffs: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """t-interval of the mean of per-seed differences (points); one seed gives (nan, nan)."""
    from scipy.stats import t

    d = np.asarray(diffs, float)
    if len(d) < 2:
        return float("nan"), float("nan")
    half = t.ppf(0.5 + level / 2, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
    return float(d.mean() - half), float(d.mean() + half)


def hierarchical_ci(
    a: np.ndarray, b: np.ndarray, level: float = 0.95, n_boot: int = 4_000, seed: int = 0
) -> tuple[float, float]:
    """Interval of the mean difference (points) from per-seed, per-prompt scores a, b [n_seeds, n_prompts]:
    each resample draws seeds with replacement, then prompts with replacement (the same prompts for
    both variants and every drawn seed: the pairing is kept)."""
    d = 100.0 * (np.asarray(a, float) - np.asarray(b, float))
    if d.ndim == 1:
        d = d[None]
    rng = np.random.default_rng(seed)
    s, p = d.shape
    out = np.empty(n_boot)
    for i in range(n_boot):
        rows = d[rng.integers(0, s, s)]
        out[i] = rows[:, rng.integers(0, p, p)].mean()
    lo, hi = np.quantile(out, [0.5 - level / 2, 0.5 + level / 2])
    return float(lo), float(hi)


def verdict(ci: tuple[float, float], a: str, b: str) -> str:
    lo, hi = ci
    if lo > 0:
        return f"{a} better"
    if hi < 0:
        return f"{b} better"
    return "no difference"


def compare(a: np.ndarray, b: np.ndarray, a_name: str, b_name: str, level: float = 0.95) -> dict:
    """Everything the README's table shows for `a` against `b`, both [n_seeds, n_prompts] of 0/1 (or scores).

    A variant that does not depend on the seed (the teacher) may be given as one row: it is used for every seed.
    """
    a, b = np.atleast_2d(np.asarray(a, float)), np.atleast_2d(np.asarray(b, float))
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"{a_name} has {a.shape[1]} prompts, {b_name} {b.shape[1]}: a paired comparison needs the same prompts"
        )
    n = max(len(a), len(b))
    a, b = (np.repeat(x, n, axis=0) if len(x) == 1 else x for x in (a, b))
    if len(a) != len(b):
        raise ValueError(f"{a_name} has {len(a)} seeds, {b_name} {len(b)}")
    per_seed = 100.0 * (a.mean(1) - b.mean(1))
    both = hierarchical_ci(a, b, level)
    return {
        "a": a_name,
        "b": b_name,
        "delta_points": float(per_seed.mean()),
        "per_seed": per_seed.tolist(),
        "ci_prompts": paired_prompt_ci(a.mean(0), b.mean(0), level),
        "ci_seeds": seed_ci(per_seed, level),
        "ci": both,
        "level": level,
        "verdict": verdict(both, a_name, b_name),
    }


def spread(acc: list[float]) -> dict:
    """Mean, sample standard deviation, min and max of a variant's accuracy over seeds (points)."""
    v = 100.0 * np.asarray(acc, float)
    return {
        "mean": float(v.mean()),
        "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
        "min": float(v.min()),
        "max": float(v.max()),
        "seeds": len(v),
    }
