"""The statistics behind `zeda baselines --seeds`: paired intervals on known inputs, and the verdict rule."""

from __future__ import annotations

import numpy as np
import pytest

from zeda_rl import stats


def _pair(n: int, a_only: int, b_only: int, both: int):
    """Per-prompt 0/1 scores: `both` prompts right in both, `a_only` right only in a, `b_only` only in b."""
    a, b = np.zeros(n), np.zeros(n)
    a[:both] = b[:both] = 1
    a[both : both + a_only] = 1
    b[both + a_only : both + a_only + b_only] = 1
    return a, b


def test_paired_prompt_interval_resolves_a_one_point_gap_on_2000_prompts():
    a, b = _pair(2000, a_only=40, b_only=20, both=1800)  # +1.0 point, 60 discordant prompts
    lo, hi = stats.paired_prompt_ci(a, b)
    assert lo < 1.0 < hi
    # the paired standard error is sqrt(60) / 2000 = 0.39 points: the interval is about +-0.76
    assert 0.6 < (hi - lo) / 2 < 0.95
    assert lo > 0 and stats.verdict((lo, hi), "A", "B") == "A better"


def test_unpaired_noise_of_the_same_size_is_no_difference():
    a, b = _pair(2000, a_only=30, b_only=30, both=1800)
    ci = stats.paired_prompt_ci(a, b)
    assert ci[0] < 0 < ci[1] and stats.verdict(ci, "A", "B") == "no difference"
    assert stats.verdict((-2.0, -0.1), "A", "B") == "B better"


def test_identical_variants_give_a_point_interval():
    a, _ = _pair(100, 0, 0, 90)
    assert stats.paired_prompt_ci(a, a) == (0.0, 0.0)


def test_seed_interval_is_the_textbook_t_interval():
    lo, hi = stats.seed_ci(np.array([1.0, 2.0, 3.0]))
    # mean 2, sd 1, t(0.975, 2) = 4.3027: half width 4.3027 / sqrt(3) = 2.4842
    assert lo == pytest.approx(2 - 2.4842, abs=1e-3) and hi == pytest.approx(2 + 2.4842, abs=1e-3)
    assert all(np.isnan(stats.seed_ci(np.array([1.0]))))


def test_hierarchical_interval_widens_with_seed_disagreement():
    a1, b1 = _pair(1000, 30, 10, 900)  # seed 1: +2 points
    a2, b2 = _pair(1000, 10, 30, 900)  # seed 2: -2 points
    agree = stats.hierarchical_ci(np.stack([a1, a1]), np.stack([b1, b1]))
    disagree = stats.hierarchical_ci(np.stack([a1, a2]), np.stack([b1, b2]))
    assert agree[0] > 0  # two seeds that agree: a win
    assert disagree[0] < 0 < disagree[1]  # seeds that disagree: no difference
    assert disagree[1] - disagree[0] > agree[1] - agree[0]


def test_compare_repeats_a_seed_independent_variant_and_refuses_unpaired_inputs():
    a1, t = _pair(500, 0, 25, 450)  # the student misses 25 prompts the teacher gets
    c = stats.compare(np.stack([a1, a1, a1]), t, "ZEDA", "teacher")
    assert c["delta_points"] == pytest.approx(-5.0) and c["per_seed"] == pytest.approx([-5.0] * 3)
    assert c["verdict"] == "teacher better" and c["ci"][1] < 0
    with pytest.raises(ValueError, match="same prompts"):
        stats.compare(a1[:100], t, "ZEDA", "teacher")


def test_spread_over_seeds():
    s = stats.spread([0.90, 0.92, 0.94])
    assert s["mean"] == pytest.approx(92.0) and s["std"] == pytest.approx(2.0) and (s["min"], s["max"]) == (90.0, 94.0)


def test_baselines_summary_and_table_from_per_seed_results():
    """`zeda baselines --seeds` turns per-seed evaluations into the seed-mean table with intervals and verdicts."""
    from launch.baselines import markdown, summarise
    from launch.config import load_config

    cfg = load_config("launch/configs/tiny-cpu-hard.yaml", {})
    rng = np.random.default_rng(0)
    n = 300

    def row(name, p):
        hits = (rng.random(n) < p).astype(int).tolist()
        acc = {
            "add4": float(np.mean(hits[:100])),
            "mul": float(np.mean(hits[100:200])),
            "mul4": float(np.mean(hits[200:])),
        }
        acc["mean"] = sum(acc.values()) / 3
        return {"variant": name, "checkpoint": f"/x/{name}", "accuracy": acc, "hits": hits, "r_ze": 0.5}

    per_seed = []
    for seed in (0, 1, 2):
        r = {v: row(v, p) for v, p in (("zeda", 0.9), ("zeda_sft", 0.9), ("net", 0.6), ("dynamic_skipping", 0.5))}
        r["dynamic_skipping"]["calibration"] = {
            "threshold": 0.1,
            "share": 0.5,
            "calibration_texts": 10,
            "target": 0.5,
            "reachable": 0.75,
        }
        per_seed.append({"seed": seed, "zeda_checkpoint": "/x/zeda", **r})
    original = row("original", 0.95)
    analysis = {
        "tokens": 10,
        "zero_share_per_family": {},
        "zero_share_by_entropy": [],
        "zero_share_by_teacher_gap": [],
        "spearman_zero_entropy": 0.0,
        "spearman_zero_teacher_gap": 0.0,
    }
    result = summarise(cfg, original, per_seed, analysis, {"total": 1.0})
    verdicts = {c["variant"]: c["verdict"] for c in result["comparison"]}
    assert verdicts["net"] == "ZEDA better" and verdicts["dynamic_skipping"] == "ZEDA better"
    assert verdicts["zeda_sft"] == "no difference"
    assert result["seeds"] == [0, 1, 2] and result["rows"][0]["variant"] == "original"
    table = markdown(result)
    assert "**no difference**" in table and "95% CI, both" in table and "torch" in table
