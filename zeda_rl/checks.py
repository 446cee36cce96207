"""Router sanity checks on a checkpoint on disk, before anything trusts its routers.

A router that holds NaN or Inf routes every token of its layer nowhere sensible, and the
converter would spread the NaN into every new zero-expert row (their mean and std come
from the old rows); an integer, bool or fp8 router cannot be widened or routed with in
float arithmetic and would be converted (or loaded) silently. So the converter, `zeda eval`,
the learner's loader and both engines refuse such a checkpoint before reading its weights,
naming the file, the tensor and what was expected.

Only the router tensors (the arch table's router weights [N(+N_Z), H] and correction biases)
are read: a few MB even for a 60 GB checkpoint, so the check is cheap enough to run on
every load.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from zeda_rl.arch import ARCHS, TARGETS, ArchSpec, read_config
from zeda_rl.hfdir import SINGLE, read_index

# safetensors dtypes a router may be stored in (fp8 and the integer/bool types are refused)
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


def open_safetensors(path: Path):
    """safe_open without mmap where supported (safetensors >= 0.8): only what is read is resident."""
    try:
        return safe_open(path, framework="pt", backend="pread")
    except TypeError:
        return safe_open(path, framework="pt")


def is_router(spec: ArchSpec, name: str) -> bool:
    """Whether `name` is a router weight or correction bias of this architecture."""
    return bool(spec.router_weight.match(name) or (spec.router_bias is not None and spec.router_bias.match(name)))


def check_router_dtype(path, name: str, dtype: str) -> None:
    """Refuse a router stored as anything but a 16/32/64-bit float (`dtype`: the safetensors name)."""
    if dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"{path}: router tensor {name!r} is stored as {dtype}; expected one of {', '.join(FLOAT_DTYPES)} "
            "(integer, bool and fp8 routers are not supported)"
        )


def check_router_values(path, name: str, t: torch.Tensor) -> None:
    """Refuse a router holding any NaN or Inf, with the count and the first bad position."""
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        nan, first = int(torch.isnan(t).sum()), [int(i) for i in bad.nonzero()[0]]
        raise ValueError(
            f"{path}: router tensor {name!r} holds {nan} NaN and {int(bad.sum()) - nan} Inf values "
            f"(first at index {first}); expected finite values"
        )


def _spec(cfg: dict) -> ArchSpec | None:
    name = (cfg.get("architectures") or [None])[0]
    legacy = {s.target_model_type: s for s in ARCHS.values()}.get(cfg.get("model_type"))
    return TARGETS.get(name) or ARCHS.get(name) or legacy


def check_routers(checkpoint_dir: str | Path) -> int:
    """Check every router tensor of a safetensors checkpoint (static or converted); returns how many.

    ValueError naming the file, the tensor and what was expected for a non-float dtype or a
    non-finite value (and naming config.json for one `zeda_rl.arch.read_config` refuses). An
    architecture the arch table does not know, or a checkpoint without safetensors files, has
    nothing this can check (0): its loader reports what it finds.
    """
    d = Path(checkpoint_dir)
    spec = _spec(read_config(d))  # config.json itself checked first (zeda_rl.arch.read_config)
    if spec is None:
        return 0
    try:
        index = read_index(d)
    except FileNotFoundError:  # no safetensors files: nothing to check here
        return 0
    if index is not None:
        by_shard: dict[str, list[str]] = {}
        for name, shard in index["weight_map"].items():
            if is_router(spec, name):
                by_shard.setdefault(shard, []).append(name)
    else:
        by_shard = {SINGLE: None}  # names read from the header
    checked = 0
    for shard, names in sorted(by_shard.items()):
        path = d / shard
        try:
            with open_safetensors(path) as f:
                for name in names if names is not None else [k for k in f.keys() if is_router(spec, k)]:
                    check_router_dtype(path, name, f.get_slice(name).get_dtype())
                    check_router_values(path, name, f.get_tensor(name))
                    checked += 1
        except SafetensorError as err:
            raise ValueError(f"{path}: not a valid safetensors file ({err})") from None
    return checked
