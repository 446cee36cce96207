"""Streaming conversion of a static HF MoE checkpoint into a ZEDA zero-expert checkpoint.

Only the routers change (ZEDA.md section 1): each router weight [N, H] gains N_Z rows
drawn per hidden dimension from Normal(mean_j, std_j) of the existing rows, each
correction bias [N] gains N_Z entries from Normal(mean, std) of the old biases; every
other tensor is copied byte for byte. The conversion streams: one tensor at a time is
read (with `pread`, so the input file is never mapped wholesale into memory) and written
straight into an output shard of the same name, so peak memory is about the largest
tensor, not the model; a 60 GB checkpoint converts on a 24 GB machine.

The config, shard list, headers and routers (names, shapes, dtypes and values; router data
is the only tensor data read) are checked before anything is written, and all writing goes to
a temporary directory beside the output that is renamed into place only when complete,
so a failure leaves neither a half-written checkpoint nor a temporary directory behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from zeda_rl import hfdir
from zeda_rl.arch import ArchSpec, read_config, spec_for
from zeda_rl.checks import check_router_dtype, check_router_values
from zeda_rl.diskerrors import write_error
from zeda_rl.hfdir import INDEX, copy_side_files, replace_dir
from zeda_rl.release import release_config

ZERO_TYPES = ("zero", "copy")
# Most zero experts per real one. ZEDA uses N_Z = N/2 (64 for Qwen3-30B-A3B's 128, 32 for GLM-4.7-Flash's 64),
# whose target zero share r* = w*N_Z / (N + w*N_Z) is 50% at w=2; at 4N it is already 89%.
MAX_ZERO_PER_REAL = 4
# Weight files that must not travel with the converted checkpoint (they would be the static model).
# Bytes per element of each safetensors dtype: output headers are written before the data.
_ITEMSIZE = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "F8_E4M3FNUZ": 1,
    "F8_E5M2FNUZ": 1,
    "F8_E8M0": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
    "C64": 8,
}


@dataclass
class _Entry:
    """One output tensor: where it comes from and what it will look like."""

    name: str
    dtype: str
    shape: list[int]
    widen: str | None  # None (copy), "weight" or "bias"

    @property
    def nbytes(self) -> int:
        n = _ITEMSIZE[self.dtype]
        for d in self.shape:
            n *= d
        return n


def convert_checkpoint(
    input_dir,
    output_dir,
    zero_experts: int,
    zero_type: str = "zero",
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = False,
    log=None,
) -> Path:
    """Write a ZEDA checkpoint with `zero_experts` zero experts per MoE layer; returns output_dir.

    `progress` shows tensors and GB written (`zeda_rl.progress`); `log`, a MetricsLog, gets the
    monitor's progress events (a 60 GB checkpoint takes minutes).

    Deterministic for a seed: each widened tensor draws from its own generator seeded from
    (seed, tensor name), so the result does not depend on shard order or layout.
    """
    src, dst = Path(input_dir), Path(output_dir)
    if zero_type not in ZERO_TYPES:
        raise ValueError(f"zero_type {zero_type!r} is not supported; expected one of {list(ZERO_TYPES)}")
    if isinstance(zero_experts, bool) or int(zero_experts) != zero_experts or zero_experts < 1:
        raise ValueError(
            f"--zero-experts {zero_experts!r}: expected an integer >= 1 (zero_experts, zero experts per MoE layer; "
            "ZEDA uses N/2, half the real experts)"
        )
    zero_experts = int(zero_experts)
    cfg, spec = _read_config(src)
    _check_zero_experts(src, cfg, spec, zero_experts)  # before a router is read or a row allocated
    if dst.exists() and dst.resolve() == src.resolve():
        raise ValueError(f"output directory {dst} is the input directory; choose another one")
    if src.resolve() in dst.resolve().parents or dst.resolve() in src.resolve().parents:
        raise ValueError(
            f"output directory {dst} and input directory {src} contain one another; replacing the output "
            "would move or delete the input. Choose an output outside the input"
        )
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())) and not overwrite:
        raise FileExistsError(f"output directory {dst} already exists and is not empty; pass --overwrite to replace it")
    shards, index = hfdir.shards(src)
    plan = _plan(src, shards, index, cfg, spec, zero_experts)  # validates everything before writing

    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _write_shards(src, tmp, plan, zero_experts, seed, progress, log)
        _write_metadata(src, tmp, cfg, spec, plan, index, zero_experts, zero_type)
        replace_dir(tmp, dst)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        failed = write_error(err, dst)
        if failed is err:
            raise
        raise failed from err
    return dst


def _read_config(src: Path) -> tuple[dict, ArchSpec]:
    path = src / "config.json"
    cfg = read_config(src)  # present, JSON, an object, experts per token within 1..N
    if "zce_nums" in cfg:
        raise ValueError(f"{path}: already a converted (zero-expert) checkpoint (it has zce_nums={cfg['zce_nums']})")
    spec = spec_for(cfg, where=str(path))
    if not spec.moe_layers(cfg):
        raise ValueError(
            f"{path}: no MoE layers ({spec.num_experts_key}={spec.num_experts(cfg)}, "
            f"num_hidden_layers={cfg.get('num_hidden_layers')!r}); nothing to convert"
        )
    return cfg, spec


def _check_zero_experts(src: Path, cfg: dict, spec: ArchSpec, nz: int) -> None:
    """Refuse N_Z above MAX_ZERO_PER_REAL x N: every widened router would hold that many rows (an
    --zero-experts of 1e8 on an 8-expert, 32-wide router allocates 12.8 GB per router before failing)."""
    n = spec.num_experts(cfg)
    most = MAX_ZERO_PER_REAL * n
    if nz > most:
        key = next(k for k in (spec.num_experts_key, *spec.num_experts_aliases) if cfg.get(k) is not None)
        raise ValueError(
            f"--zero-experts {nz}: expected 1 to {most} ({MAX_ZERO_PER_REAL} x the {n} real experts per MoE layer, "
            f"{key} in {src / 'config.json'}); ZEDA uses about half: N/2 = {max(n // 2, 1)}"
        )


def _open(path: Path):
    """safe_open without mmap where supported: only the tensor being read is resident."""
    try:
        return safe_open(path, framework="pt", backend="pread")
    except TypeError:  # safetensors < 0.8 has no backend argument
        return safe_open(path, framework="pt")


def _plan(src, shards, index, cfg, spec: ArchSpec, nz: int) -> dict[str, tuple[dict | None, list[_Entry]]]:
    """Per shard: its metadata and output entries (in write order, routers already widened).

    Reads headers and the router tensors only, and checks the headers and the routers' names,
    shapes, dtypes and values (`zeda_rl.checks`).
    """
    n, h = spec.num_experts(cfg), cfg.get("hidden_size")
    plan, seen, weights, biases = {}, {}, set(), set()
    for shard in shards:
        path = src / shard
        try:
            with _open(path) as f:
                metadata, entries = f.metadata(), []
                for name in f.keys():
                    sl = f.get_slice(name)
                    entries.append(_Entry(name, sl.get_dtype(), list(sl.get_shape()), None))
        except SafetensorError as err:
            raise ValueError(f"{path}: not a valid safetensors file ({err})") from None
        for e in entries:
            if e.dtype not in _ITEMSIZE:
                raise ValueError(f"{path}: tensor {e.name!r} has unsupported dtype {e.dtype}")
            seen[e.name] = shard
            # The patterns match any layer index, so GLM's multi-token-prediction layer
            # (index num_hidden_layers) gets its router widened too, as it must.
            if m := spec.router_weight.match(e.name):
                check_router_dtype(path, e.name, e.dtype)
                if len(e.shape) != 2 or e.shape[0] != n or (h is not None and e.shape[1] != h):
                    raise ValueError(
                        f"{path}: router tensor {e.name!r} has shape {e.shape}, expected [{n}, {h or 'H'}] "
                        f"([{spec.num_experts_key}, hidden_size] from config.json)"
                    )
                e.widen = "weight"
                weights.add(int(m.group(1)))
            elif spec.router_bias is not None and (m := spec.router_bias.match(e.name)):
                check_router_dtype(path, e.name, e.dtype)
                if e.shape != [n]:
                    raise ValueError(
                        f"{path}: router bias {e.name!r} has shape {e.shape}, expected [{n}] "
                        f"([{spec.num_experts_key}] from config.json)"
                    )
                e.widen = "bias"
                biases.add(int(m.group(1)))
        # Router values are read now (they are small), so a NaN or Inf is refused before anything is written.
        if routers := [e.name for e in entries if e.widen]:
            try:
                with _open(path) as f:
                    for name in routers:
                        check_router_values(path, name, f.get_tensor(name))
            except SafetensorError as err:
                raise ValueError(f"{path}: not a valid safetensors file ({err})") from None
        for e in entries:
            if e.widen:
                e.shape[0] += nz
        # Largest elements first keeps every tensor aligned to its element size (as safetensors does).
        entries.sort(key=lambda e: (-_ITEMSIZE[e.dtype], e.name))
        plan[shard] = (metadata, entries)
    if index is not None:
        for name, shard in index["weight_map"].items():
            if seen.get(name) != shard:
                raise ValueError(f"{src / INDEX}: tensor {name!r} is listed in {shard} but that shard does not hold it")
    for layer in spec.moe_layers(cfg):
        if layer not in weights:
            raise ValueError(
                f"{src}: MoE layer {layer} (per config.json) has no router tensor matching {spec.router_weight.pattern}"
            )
        if spec.router_bias is not None and layer not in biases:
            raise ValueError(
                f"{src}: MoE layer {layer} (per config.json) has no router bias matching {spec.router_bias.pattern}"
            )
    return plan


def _generator(seed: int, name: str) -> torch.Generator:
    """A generator that depends only on (seed, tensor name): stable across runs and layouts."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def widen_router(t: torch.Tensor, nz: int, gen: torch.Generator) -> torch.Tensor:
    """Append nz rows (2-D weight: per-column stats) or entries (1-D bias: scalar stats).

    Statistics and sampling run in float32; old values are kept bit-identical.
    """
    old = t.float()
    if t.dim() == 2:
        mean, std = old.mean(0), (old.std(0) if t.shape[0] > 1 else torch.zeros(t.shape[1]))
        new = mean + std * torch.randn(nz, t.shape[1], generator=gen)
    else:
        mean, std = old.mean(), (old.std() if t.numel() > 1 else torch.zeros(()))
        new = mean + std * torch.randn(nz, generator=gen)
    return torch.cat([t, new.to(t.dtype)])


def _header(metadata: dict | None, entries: list[_Entry]) -> bytes:
    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = metadata
    for e in entries:
        header[e.name] = {"dtype": e.dtype, "shape": e.shape, "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keeps the data 8-byte aligned, as safetensors does
    return len(raw).to_bytes(8, "little") + raw


def _write_shards(src: Path, tmp: Path, plan, nz: int, seed: int, progress: bool, log=None) -> None:
    """Write each output shard: header first (all sizes are known), then tensors one by one."""
    from zeda_rl.progress import Progress

    entries_all = [e for _, entries in plan.values() for e in entries]
    gb = sum(e.nbytes for e in entries_all) / 1e9
    with Progress("convert", len(entries_all), "tensors", log=log, enabled=progress) as bar:
        written = 0
        for shard, (metadata, entries) in plan.items():
            path = src / shard
            try:
                with _open(path) as f, open(tmp / shard, "wb") as out:
                    out.write(_header(metadata, entries))
                    for e in entries:
                        t = f.get_tensor(e.name)
                        if e.widen:
                            t = widen_router(t, nz, _generator(seed, e.name))
                        data = t.contiguous().reshape(-1).view(torch.uint8).numpy()
                        assert data.nbytes == e.nbytes, (e.name, data.nbytes, e.nbytes)
                        out.write(memoryview(data))
                        del t, data
                        written += e.nbytes
                        bar.advance(1, note=f"{written / 1e9:.2f}/{gb:.2f} GB")
            except SafetensorError as err:
                raise ValueError(f"{path}: not a valid safetensors file ({err})") from None


def _write_metadata(src, tmp, cfg, spec: ArchSpec, plan, index, nz: int, zero_type: str) -> None:
    """config.json, the index (sharded inputs only) and every other top-level non-weight file."""
    out_cfg = release_config(cfg, spec, zce_nums=[nz], zce_types=[zero_type], use_zce_mask=False)
    (tmp / "config.json").write_text(json.dumps(out_cfg, indent=2, sort_keys=True) + "\n")
    if index is not None:
        entries = [(shard, e) for shard, (_, es) in plan.items() for e in es]
        meta = dict(index.get("metadata") or {})
        meta["total_size"] = sum(e.nbytes for _, e in entries)
        if "total_parameters" in meta:
            meta["total_parameters"] += sum(
                nz * (e.shape[1] if e.widen == "weight" else 1) for _, e in entries if e.widen
            )
        weight_map = {e.name: shard for shard, e in sorted(entries, key=lambda se: se[1].name)}
        (tmp / INDEX).write_text(json.dumps({**index, "metadata": meta, "weight_map": weight_map}, indent=2) + "\n")
    copy_side_files(src, tmp, skip=("config.json",))
