"""Shared test helpers: tiny static checkpoints and their converted copies."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import Glm4MoeLiteForCausalLM, Qwen3MoeForCausalLM

from zeda_rl.tiny import tiny_glm4_moe_lite_config, tiny_qwen3_moe_config

FAMILIES = {
    "qwen3_moe": (tiny_qwen3_moe_config, Qwen3MoeForCausalLM),
    "glm4_moe_lite": (tiny_glm4_moe_lite_config, Glm4MoeLiteForCausalLM),
}


def save_static(family: str, out: Path, seed: int = 0, **overrides) -> torch.nn.Module:
    """A random tiny static MoE of one family, saved in HF format; returns the model (eval, fp32)."""
    make_config, model_cls = FAMILIES[family]
    torch.manual_seed(seed)
    model = model_cls(make_config(**overrides)).eval()
    if family == "glm4_moe_lite":  # a non-trivial correction bias, as in the real model
        with torch.no_grad():
            for layer in model.model.layers:
                if hasattr(layer.mlp, "gate"):
                    layer.mlp.gate.e_score_correction_bias.normal_(0, 0.1)
    model.save_pretrained(out)
    return model


def short_run_config(tmp: Path, overrides: dict):
    """The embedded default's config, shortened by `overrides`, over a 40-step teacher built under `tmp`."""
    from launch.config import load_config
    from zeda_rl.teacher import build_teacher

    teacher = build_teacher(tmp / "teacher", steps=40, progress=False, min_accuracy=0.0)
    return load_config(
        "launch/configs/tiny-cpu.yaml", {**overrides, "output_dir": str(tmp / "runs"), "model.teacher": str(teacher)}
    )


def run_on_fresh_ray(cfg) -> dict:
    """The whole pipeline on a Ray of its own, shut down afterwards whatever happens."""
    import ray

    from launch.pipeline import run

    if ray.is_initialized():
        ray.shutdown()
    try:
        return run(cfg)
    finally:
        ray.shutdown()


def train_main(argv: list[str]) -> int:
    """`zeda train ARGV` (what `python -m launch.train ARGV` runs) in this process: its exit code."""
    from launch.cli import main

    return main(["train", *argv])


def widen_zero_rows(model, scale):
    """Push the router toward zero slots by `scale`: as it grows, zero slots win more often.

    Softmax family: zero row j := scale * real row j. Sigmoid family (scores are compared
    after the correction bias): zero-slot bias := (scale - 1) / 10 (scores live in (0, 1))."""
    from zeda_rl.modeling import moe_blocks

    with torch.no_grad():
        for blk in moe_blocks(model):
            n, w = blk.spec.num_experts, blk.gate.weight
            bias = getattr(blk.gate, "e_score_correction_bias", None)
            if bias is None:
                w[n:] = scale * w[: w.shape[0] - n]
            else:
                bias[n:] = (scale - 1.0) * 0.1
