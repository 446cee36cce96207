"""Tiny converted checkpoints and a reference transformers loader, for tests, demos and benches.

`tiny_checkpoint(family, dir)` writes a random tiny static model of one family (the
configs of `zeda_rl.tiny`) and converts it with `zeda_rl.convert.convert_checkpoint`,
so every learner test starts from exactly what a user would feed the learner.

`load_hf_reference(dir)` loads a converted checkpoint with transformers'
AutoModelForCausalLM (after `import zeda_rl`) and checks that every weight really
arrived.
"""

from __future__ import annotations

from pathlib import Path

import torch

import zeda_rl  # noqa: F401  (registers the zero-expert architectures)


def tiny_checkpoint(
    family: str, out: str | Path, zero_experts: int = 4, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides
) -> Path:
    """A converted tiny checkpoint of `family` ("qwen3_moe" | "glm4_moe_lite") in `out` (reused if present)."""
    from transformers import Glm4MoeLiteForCausalLM, Qwen3MoeForCausalLM

    from zeda_rl.convert import convert_checkpoint
    from zeda_rl.tiny import tiny_glm4_moe_lite_config, tiny_qwen3_moe_config

    out = Path(out)
    if (out / "config.json").is_file():
        return out
    make, cls = {
        "qwen3_moe": (tiny_qwen3_moe_config, Qwen3MoeForCausalLM),
        "glm4_moe_lite": (tiny_glm4_moe_lite_config, Glm4MoeLiteForCausalLM),
    }[family]
    static = out.parent / f".{out.name}.static"
    g = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = cls(make(**overrides)).eval()
        with torch.no_grad():
            for layer in model.model.layers:  # a non-trivial correction bias, as in the real GLM
                bias = getattr(getattr(layer.mlp, "gate", None), "e_score_correction_bias", None)
                if bias is not None:
                    bias.normal_(0, 0.1)
        model.to(dtype).save_pretrained(static)
    finally:
        torch.random.set_rng_state(g)
    (static / "tokenizer_config.json").write_text('{"model_max_length": 128}\n')
    convert_checkpoint(static, out, zero_experts=zero_experts, seed=seed)
    import shutil

    shutil.rmtree(static, ignore_errors=True)
    return out


def tiny_checkpoints(root: str | Path, overrides: dict[str, dict] | None = None) -> dict[str, Path]:
    """One converted tiny checkpoint per family under `root`, as the multi-process learner tests use them.

    initializer_range 0.1 (10x the default) gives routers decided enough that float round-off
    between layouts does not flip top-k choices; `overrides` maps a family to its config overrides.
    """
    root = Path(root)
    return {
        f: tiny_checkpoint(f, root / f, initializer_range=0.1, **(overrides or {}).get(f, {}))
        for f in ("qwen3_moe", "glm4_moe_lite")
    }


def load_hf_reference(path: str | Path, dtype: torch.dtype = torch.float32):
    """transformers' model of a converted checkpoint (eval), with every weight checked to be loaded."""
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, output_loading_info=True)
    bad = {k: v for k, v in info.items() if k != "error_msgs" and v}
    if bad or info.get("error_msgs"):
        raise RuntimeError(f"{path}: transformers did not load the checkpoint cleanly: {bad} {info.get('error_msgs')}")
    return model.eval()
