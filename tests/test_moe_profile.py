"""bench/moe_profile.py's pure parts: pair counts, the matmul model, the gap split, and that its
phase-by-phase copy of the MoE block computes exactly what the real block computes (no checkpoint)."""

from __future__ import annotations

import pytest
import torch

from bench.moe_profile import (
    EXPERT_PHASES,
    PHASES,
    Clock,
    block_forward,
    combine_layers,
    gap_breakdown,
    matmul_model,
    median_dict,
    pair_stats,
)
from zeda_rl import skip  # noqa: F401  (registers zeda_skip)
from zeda_rl.modeling import Qwen3MoePlusPlusConfig, Qwen3MoePlusPlusSparseMoeBlock
from zeda_rl.tiny import tiny_qwen3_moe_config


def test_pair_stats_drops_zero_slots_and_sentinels():
    ids = torch.tensor([[0, 8], [0, 3], [9, -1], [3, 3]])  # N = 8: 8, 9 are zero slots, -1 unrecorded
    s = pair_stats(ids, 8)
    assert s["slots"] == 8 and s["pairs"] == 5 and s["skipped"] == pytest.approx(3 / 8)
    assert s["experts_hit"] == 2 and s["rows_per_expert"][0] == 2 and s["rows_per_expert"][3] == 3
    assert s["mean_rows_per_hit_expert"] == pytest.approx(2.5)
    assert pair_stats(torch.full((2, 2), 8), 8)["experts_hit"] == 0


def test_matmul_model_peak_and_fixed_cost():
    # t(r) = 4 us + r x 1 us at 1000 flops a row: the best throughput is at the most rows
    rows = [1, 10, 100]
    secs = [4e-6 + r * 1e-6 for r in rows]
    m = matmul_model(rows, secs, 1000.0)
    assert m["peak_flops"] == pytest.approx(100 * 1000 / 104e-6)
    assert m["fixed_s"] == pytest.approx(5e-6 - 1000 / m["peak_flops"])
    with pytest.raises(ValueError):
        matmul_model([1], [], 1.0)


def test_median_dict():
    assert median_dict([{"a": 1.0}, {"a": 3.0, "b": 2.0}, {"a": 2.0}]) == {"a": 2.0, "b": 0.0}


def _side(scale: float, pairs: float, hit: float) -> dict:
    d = {p: scale * (i + 1) * 1e-5 for i, p in enumerate(EXPERT_PHASES)}
    d["experts_other"] = scale * 1e-5
    d["experts_total"] = sum(d.values())
    d["layer_total"] = d["experts_total"] + 5e-5
    d.update(pairs=pairs, experts_hit=hit, mm_ideal=scale * 2e-5, mm_fixed=hit * 1e-6)
    return d


def test_gap_parts_sum_to_the_gap():
    t, z = _side(1.0, 100, 16), _side(0.8, 50, 14)
    g = gap_breakdown(t, z)
    assert g["rho"] == 0.5 and g["limit_s"] == pytest.approx(0.5 * t["experts_total"])
    assert sum(g["parts_s"].values()) == pytest.approx(g["gap_s"])
    assert g["eff"] == pytest.approx(g["limit_s"] / z["experts_total"])
    # a copy of the teacher with half the pairs and everything halved sits at its limit
    half = {k: v / 2 if isinstance(v, float) else v for k, v in t.items()} | {"pairs": 50}
    assert gap_breakdown(t, half)["gap_s"] == pytest.approx(0.0, abs=1e-15)


def test_combined_layers_add_the_uneven_skip_term():
    layers = []
    for zs, pairs in ((0.9, 90), (0.1, 10)):  # one layer barely skips, the other skips 90%
        t, z = _side(1.0, 100, 16), _side(zs, pairs, 8)
        layers.append((t, z, gap_breakdown(t, z)))
    c = combine_layers(layers)
    assert c["rho"] == pytest.approx(0.5)
    assert sum(c["parts_s"].values()) == pytest.approx(c["gap_s"])
    assert c["parts_s"]["uneven skip across layers"] == pytest.approx(0.0)  # equal teacher layers: no term


@pytest.mark.parametrize("zero", [0, 8])
def test_the_instrumented_copy_equals_the_real_block(zero):
    torch.manual_seed(0)
    base = tiny_qwen3_moe_config().to_dict()
    base.pop("model_type")
    if zero:
        cfg = Qwen3MoePlusPlusConfig(**base, zce_nums=[zero], zce_types=["zero"], use_zce_mask=False)
        cfg._experts_implementation = skip.NAME
        block = Qwen3MoePlusPlusSparseMoeBlock(cfg).eval()
    else:
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeConfig, Qwen3MoeSparseMoeBlock

        cfg = Qwen3MoeConfig(**base)
        cfg._experts_implementation = skip.NAME
        block = Qwen3MoeSparseMoeBlock(cfg).eval()
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(3, 5, cfg.hidden_size)
    clk = Clock()
    with torch.no_grad():
        assert torch.equal(block(x), block_forward(block, x, clk))
    assert set(clk.seconds) <= set(PHASES) and "gate_up" in clk.seconds
    assert ("zero_slots" in clk.seconds) == bool(zero)
