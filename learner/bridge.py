"""HF safetensors <-> the Megatron model's state, experts sharded over EP ranks, dense tensors over TP.

Names and transforms are `learner.hf_names.rules`; this module places them on the ranks.
Local expert j of EP rank r is global expert r * N/EP + j, so each rank reads (and writes)
only its own experts. Under tensor parallelism each rank holds its 1/TP of every tensor
Megatron splits (the parameter's `tensor_model_parallel` / `partition_dim`, set by Megatron
itself, say which and along which dim): column-parallel ones (qkv, MLA's q/kv down and up
projections, dense and shared-expert fc1) by output rows, row-parallel ones (linear_proj, fc2)
by input columns, the embedding and output layer by vocabulary rows (padded with zero rows to a
multiple of TP, cut off again on export); a SwiGLU fc1 is split gate and up separately
([gate_r; up_r] on rank r, as Megatron lays it out). Norms, routers and the correction bias are
replicated; experts are whole (expert TP = 1). Tensors keep their on-disk dtype when they come
out (the learner's fp32 copies are cast back to it), so a round trip is bit-exact.

Out: `local_hf_state` (what this rank holds: the weight publish, `learner.publish`) and
`full_hf_state` (experts all-gathered over EP, in export order: the HF export,
`learner.hf_export`, and tests).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open

from learner.hf_names import Rule, rules, rules_for_expert
from learner.megatron_config import ModelInfo
from learner.model import is_expert_param
from zeda_rl import hfdir
from zeda_rl.checks import check_routers

# ---- reading an HF checkpoint lazily ------------------------------------------------------------


class HFCheckpoint:
    """Lazy reader of an HF safetensors checkpoint (single file or sharded with an index)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.weight_map: dict[str, str] = hfdir.weight_map(self.path)
        self._handles: dict[str, object] = {}

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def _file(self, name: str):
        shard = self.weight_map.get(name)
        if shard is None:
            raise KeyError(f"{self.path}: tensor {name!r} not in the checkpoint")
        if shard not in self._handles:
            self._handles[shard] = safe_open(self.path / shard, framework="pt")
        return self._handles[shard]

    def get(self, name: str) -> torch.Tensor:
        return self._file(name).get_tensor(name)

    def dtype(self, name: str) -> torch.dtype:
        return _SAFE_DTYPES[self._file(name).get_slice(name).get_dtype()]


_SAFE_DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


# ---- tensor-parallel shards -------------------------------------------------------------------


def _tp() -> tuple[int, int]:
    from learner import parallel

    return (parallel.tp_rank(), parallel.tp_size()) if dist.is_initialized() else (0, 1)


def tp_dims(model: torch.nn.Module) -> dict[str, int]:
    """Megatron name -> the dim its TP shards split (only tensors Megatron splits, only under TP > 1)."""
    if _tp()[1] == 1:
        return {}
    return {
        n: int(p.partition_dim)
        for n, p in model.named_parameters()
        if getattr(p, "tensor_model_parallel", False) and not is_expert_param(n)
    }  # experts: expert TP = 1


def tp_shard(full: torch.Tensor, dim: int, rank: int, size: int, blocks: int, local_len: int) -> torch.Tensor:
    """Rank `rank`'s shard (length `local_len` along `dim`) of a full Megatron tensor.

    A tensor shorter than size x local_len (the vocabulary padded to a multiple of TP) gets zero rows first.
    """
    short = local_len * size - full.shape[dim]
    if short:
        if blocks != 1 or short < 0:
            raise ValueError(f"TP shard: {tuple(full.shape)} does not split into {size} x {local_len} along dim {dim}")
        pad = list(full.shape)
        pad[dim] = short
        full = torch.cat([full, full.new_zeros(pad)], dim)
    return torch.cat([b.chunk(size, dim)[rank] for b in full.chunk(blocks, dim)], dim)


def tp_unshard(parts: list[torch.Tensor], dim: int, blocks: int, full_len: int) -> torch.Tensor:
    """The full Megatron tensor from every TP rank's shard (inverse of `tp_shard`, padding cut to `full_len`)."""
    split = [p.chunk(blocks, dim) for p in parts]
    full = torch.cat([torch.cat([s[b] for s in split], dim) for b in range(blocks)], dim)
    return full.narrow(dim, 0, min(full_len, full.shape[dim]))


def _tp_gather(t: torch.Tensor, dim: int | None, rule: Rule, info: ModelInfo) -> torch.Tensor:
    """The full tensor of a TP-sharded one (collective over the TP group); others as they are."""
    if dim is None:
        return t
    from learner import parallel

    parts = [torch.empty_like(t) for _ in range(parallel.tp_size())]
    dist.all_gather(parts, t.contiguous(), group=parallel.tp_group())
    full_len = t.shape[dim] * len(parts)
    if rule.megatron in _VOCAB_TENSORS:
        full_len = info.vocab_size
    return tp_unshard(parts, dim, rule.blocks, full_len)


_VOCAB_TENSORS = ("embedding.word_embeddings.weight", "output_layer.weight")


def _tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    named = dict(model.named_parameters())
    named.update(model.named_buffers())
    return named


def load_hf(
    model: torch.nn.Module, checkpoint_dir: str | Path, ep_rank: int | None = None, ep_size: int | None = None
) -> dict[str, torch.dtype]:
    """Copy an HF checkpoint into the model (this rank's experts only); returns the on-disk dtypes.

    Every parameter and persistent buffer of the model must be covered and every shape
    must match, else ValueError naming the tensor. HF tensors that no rule uses (e.g.
    GLM's multi-token-prediction layer) are ignored. Routers holding NaN/Inf or stored in
    a non-float dtype are refused first (`zeda_rl.checks`), before any weight is copied.
    """
    info: ModelInfo = model.zeda_info
    ep_rank, ep_size = _ep(ep_rank, ep_size)
    check_routers(checkpoint_dir)
    ckpt = HFCheckpoint(checkpoint_dir)
    targets = _tensors(model)
    split = tp_dims(model)
    tp_rank, tp_size = _tp()
    rs = rules(info, ep_rank, ep_size)
    missing = sorted(set(targets) - {r.megatron for r in rs})
    if missing:
        raise ValueError(f"no HF mapping for Megatron tensors {missing[:5]}")
    dtypes: dict[str, torch.dtype] = {}
    with torch.no_grad():
        for r in rs:
            if r.megatron not in targets:
                raise ValueError(f"the Megatron model has no tensor {r.megatron!r} (HF {r.hf})")
            for h in r.hf:
                if h not in ckpt:
                    raise ValueError(f"{checkpoint_dir}: tensor {h!r} (for {r.megatron}) is missing")
                dtypes[h] = ckpt.dtype(h)
            src = r.to_megatron([ckpt.get(h) for h in r.hf])
            dst = targets[r.megatron]
            if r.megatron in split:
                d = split[r.megatron]
                src = tp_shard(src, d, tp_rank, tp_size, r.blocks, dst.shape[d])
            if tuple(src.shape) != tuple(dst.shape):
                raise ValueError(
                    f"{r.megatron}: HF {r.hf} give shape {tuple(src.shape)}, the model has {tuple(dst.shape)}"
                )
            dst.copy_(src.to(dst.dtype))
    model.zeda_hf_dtypes = dtypes
    model.zeda_source = Path(checkpoint_dir)
    return dtypes


# ---- Megatron -> HF -----------------------------------------------------------------------------


def _ep(ep_rank, ep_size):
    if ep_rank is not None and ep_size is not None:
        return ep_rank, ep_size
    if dist.is_initialized():
        from learner import parallel

        return parallel.ep_rank(), parallel.ep_size()
    return 0, 1


def _source(model: torch.nn.Module, grads: bool) -> dict[str, torch.Tensor]:
    if not grads:
        return _tensors(model)
    return {n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}


def local_hf_state(
    model: torch.nn.Module,
    ep_rank: int | None = None,
    ep_size: int | None = None,
    cast: bool = True,
    grads: bool = False,
    dense: bool = True,
    experts: bool = True,
) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) of this rank's tensors: dense ones and its own experts, in export order.

    grads=True maps the parameters' gradients the same way (for tests and diagnostics).
    Under TP the dense tensors are gathered from the TP group first (an HF tensor is whole),
    so it is then collective over the TP group; dense=False gives the experts only (never
    TP-split: no collective), for a rank that publishes no dense tensor; experts=False the dense ones only.
    """
    info: ModelInfo = model.zeda_info
    ep_rank, ep_size = _ep(ep_rank, ep_size)
    targets = _source(model, grads)
    split = tp_dims(model)
    dtypes = getattr(model, "zeda_hf_dtypes", {}) if cast else {}
    for r in rules(info, ep_rank, ep_size):
        if r.megatron not in targets or not (experts if r.expert else dense):  # grads=True: buffers have none
            continue
        full = _tp_gather(targets[r.megatron].detach(), split.get(r.megatron), r, info)
        for h, t in zip(r.hf, r.to_hf(full)):
            yield h, t.to(dtypes.get(h, t.dtype)).contiguous()


def full_hf_state(model: torch.nn.Module, cast: bool = True, grads: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) of the whole model, experts gathered from all EP ranks, in export order.

    Collective over the EP group when EP > 1 and the TP group when TP > 1: every rank of the
    groups must iterate it in step (each yields the same sequence). Dense tensors are
    identical on all ranks.
    """
    info: ModelInfo = model.zeda_info
    ep_rank, ep_size = _ep(None, None)
    if ep_size == 1:
        yield from local_hf_state(model, 0, 1, cast, grads)
        return
    from learner import parallel

    group = parallel.ep_group()
    split = tp_dims(model)
    targets = _source(model, grads)
    dtypes = getattr(model, "zeda_hf_dtypes", {}) if cast else {}
    local = rules(info, ep_rank, ep_size)
    n_local = info.num_experts // ep_size
    pending: dict[str, dict[int, list[tuple[str, torch.Tensor]]]] = {}
    for r in local:
        if r.megatron not in targets:  # grads=True: buffers have none
            continue
        t = targets[r.megatron].detach()
        if not r.expert:
            t = _tp_gather(t, split.get(r.megatron), r, info)
            for h, x in zip(r.hf, r.to_hf(t)):
                yield h, x.to(dtypes.get(h, x.dtype)).contiguous()
            continue
        # gather this local expert tensor from every EP rank; emit in global expert order
        parts = [torch.empty_like(t) for _ in range(ep_size)]
        dist.all_gather(parts, t.contiguous(), group=group)
        m = re.match(r"(decoder\.layers\.\d+\.mlp\.experts\.local_experts\.)(\d+)(\..*)", r.megatron)
        layer_key = m.group(1)
        j = int(m.group(2))
        bucket = pending.setdefault(layer_key, {})
        for src_rank, part in enumerate(parts):
            rule = rules_for_expert(info, r.megatron, src_rank, ep_size)
            bucket.setdefault(src_rank * n_local + j, []).extend(zip(rule.hf, rule.to_hf(part)))
        # a layer's experts are complete once its last local expert's last tensor is gathered
        if j == n_local - 1 and r.megatron.endswith("linear_fc2.weight"):
            for e in sorted(bucket):
                for h, x in bucket[e]:
                    yield h, x.to(dtypes.get(h, x.dtype)).contiguous()
            del pending[layer_key]
