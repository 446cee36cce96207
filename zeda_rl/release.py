"""The config.json of a released ZEDA checkpoint: how one is recognised, and how one is written.

The official recipe keeps the stock `model_type` (`qwen3_moe`, `glm4_moe_lite`), names a
`*PlusPlus` class in `architectures` and adds `zce_nums`, `zce_types`, `use_zce_mask`. Its
config class defaults a missing key to "mask on, copy experts", which silently gives another
model, so here a `*PlusPlus` config without one of the three keys is refused by name.

What we write must also load in the official stack (transformers 4.57 with the released
model files, its SGLang fork, its Megatron bridge), which reads the v4 field names: Qwen3-MoE's
expert count as `num_experts` (a transformers-5 save writes `num_local_experts`) and RoPE
as `rope_theta` / `rope_scaling` (a transformers-5 save writes only `rope_parameters`, and 4.57
would silently fall back to its default theta). Both spellings are written; transformers 5
reads either.
"""

from __future__ import annotations

from zeda_rl.arch import ARCHS, TARGETS, ArchSpec

ZCE_KEYS = ("zce_nums", "zce_types", "use_zce_mask")
# model types our own earlier versions wrote; still read, never written
LEGACY_MODEL_TYPES = {spec.target_model_type: spec for spec in ARCHS.values()}


def converted_spec(cfg: dict, where: str = "config.json") -> ArchSpec | None:
    """The arch row of a zero-expert config (released or legacy layout); None for a static one.

    A `*PlusPlus` architecture must carry all of ZCE_KEYS; zce keys on a stock architecture
    are refused too (the router rows would not match the class that loads them).
    """
    archs = cfg.get("architectures") or []
    spec = TARGETS.get(archs[0]) if archs else None
    spec = spec or LEGACY_MODEL_TYPES.get(cfg.get("model_type"))
    present = [k for k in ZCE_KEYS if k in cfg]
    if spec is None:
        if present:
            raise ValueError(
                f"{where}: has {present} but architectures {archs} names no zero-expert class; "
                f"expected one of {sorted(TARGETS)}"
            )
        return None
    for key in ZCE_KEYS:
        if cfg.get(key) is None:
            raise ValueError(
                f"{where}: architecture {spec.target!r} needs {key!r} (the released ZEDA config class would "
                f"silently default it); expected all of {list(ZCE_KEYS)}, e.g. zce_nums: [64], "
                "zce_types: ['zero'], use_zce_mask: false"
            )
    nums, types = cfg["zce_nums"], cfg["zce_types"]
    if not isinstance(nums, list) or not isinstance(types, list) or len(nums) != len(types) or not nums:
        raise ValueError(
            f"{where}: zce_nums {nums!r} and zce_types {types!r} must be non-empty lists of the same length"
        )
    if not isinstance(cfg["use_zce_mask"], bool):
        raise ValueError(f"{where}: use_zce_mask must be true or false, got {cfg['use_zce_mask']!r}")
    return spec


def release_config(cfg: dict, spec: ArchSpec, **zce) -> dict:
    """`cfg` (a raw config dict, stock or converted) laid out as the released checkpoints are.

    `zce` sets or overrides the three ZCE_KEYS (the converter passes them; an export keeps them).
    """
    out = dict(cfg)
    out.update(zce)
    out["architectures"] = [spec.target]
    out["model_type"] = spec.source_model_type
    n = spec.num_experts(cfg)
    for alias in spec.num_experts_aliases:
        out.pop(alias, None)
    out[spec.num_experts_key] = n
    rope = out.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope:
        out.setdefault("rope_theta", rope["rope_theta"])
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        if scaling.get("rope_type", "default") != "default":
            out.setdefault("rope_scaling", scaling)
    for key in ZCE_KEYS:
        if key not in out:
            raise ValueError(f"release_config: {key!r} is not set; pass it or start from a converted config")
    return out
