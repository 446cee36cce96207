"""HF safetensors <-> Megatron state, both directions, experts sharded over EP ranks.

One table of name rules maps every Megatron parameter (and the correction-bias buffer)
to the HF tensor(s) it is made of, with the transform each way:
- direct copies (norms, embeddings, routers, o_proj/linear_proj, MLA projections);
- SwiGLU fc1 = cat(gate_proj, up_proj) (dense MLPs, experts, the shared expert);
- Qwen3 attention: Megatron's fused linear_qkv, laid out per query group
  [q heads of the group, k, v], from/to q_proj, k_proj, v_proj;
- GLM MLA with `rope_interleave=False`: the RoPE rows of q_b_proj / kv_a_proj are
  permuted into the interleaved order Megatron's MLA RoPE expects (identity otherwise).
Local expert j of EP rank r is global expert r * N/EP + j, so each rank reads (and
writes) only its own experts. Under tensor parallelism each rank holds its 1/TP of every
tensor Megatron splits (the parameter's `tensor_model_parallel` / `partition_dim`, set by
Megatron itself, say which and along which dim): column-parallel ones (qkv, MLA's q/kv
down and up projections, dense and shared-expert fc1) by output rows, row-parallel ones
(linear_proj, fc2) by input columns, the embedding and output layer by vocabulary rows
(padded with zero rows to a multiple of TP, cut off again on export); a SwiGLU fc1 is split
gate and up separately ([gate_r; up_r] on rank r, as Megatron lays it out). Norms, routers
and the correction bias are replicated; experts are whole (expert TP = 1). Every transform is a pure reindexing, so a round trip is
bit-exact, and tensors keep their on-disk dtype when exported (the learner's fp32
copies are cast back to it).

Export for weight sync gathers the experts of all EP ranks (an all-gather per tensor
over the EP group) and the TP shards (an all-gather over the TP group) and yields (HF name, tensor) in a fixed order: embeddings, layers in
order (experts 0..N-1 inside each), final norm, lm_head; by default with the experts
fused the way the transformers model holds them in memory (the names rollout engines'
`apply_update` takes), or in the per-expert checkpoint layout.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from learner.model import ModelInfo, is_expert_param
from zeda_rl.checks import check_routers
from zeda_rl.weights import WeightUpdate, make_buckets

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_WEIGHT_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack"}


# ---- reading an HF checkpoint lazily ------------------------------------------------------------


class HFCheckpoint:
    """Lazy reader of an HF safetensors checkpoint (single file or sharded with an index)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        index = self.path / INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (self.path / SINGLE).is_file():
            with safe_open(self.path / SINGLE, framework="pt") as f:
                weight_map = dict.fromkeys(f.keys(), SINGLE)
        else:
            raise FileNotFoundError(f"{self.path}: neither {SINGLE} nor {INDEX}")
        self.weight_map: dict[str, str] = weight_map
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


# ---- the name rules -----------------------------------------------------------------------------


@dataclass
class Rule:
    """One Megatron tensor <-> its HF tensors, with the (pure reindexing) transforms."""

    megatron: str
    hf: list[str]
    to_megatron: Callable[[list[torch.Tensor]], torch.Tensor]
    to_hf: Callable[[torch.Tensor], list[torch.Tensor]]
    expert: bool = False
    blocks: int = 1  # independent blocks along the TP-split dim, each split over TP (SwiGLU fc1: gate, up)


def _direct(m: str, h: str, expert: bool = False) -> Rule:
    return Rule(m, [h], lambda ts: ts[0], lambda t: [t], expert)


def _glu(m: str, gate: str, up: str, expert: bool = False) -> Rule:
    return Rule(m, [gate, up], lambda ts: torch.cat(ts, 0), lambda t: list(t.chunk(2, 0)), expert, blocks=2)


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


def _qkv(m: str, prefix: str, heads: int, groups: int, d: int) -> Rule:
    """Megatron linear_qkv rows: for each query group g, [q heads of g (heads/groups * d), k (d), v (d)]."""
    hpg = heads // groups

    def to_m(ts):
        q, k, v = ts
        h = q.shape[-1]
        q = q.reshape(groups, hpg * d, h)
        k = k.reshape(groups, d, h)
        v = v.reshape(groups, d, h)
        return torch.cat([q, k, v], 1).reshape(groups * (hpg + 2) * d, h)

    def to_h(t):
        h = t.shape[-1]
        t = t.reshape(groups, (hpg + 2) * d, h)
        q, k, v = t.split([hpg * d, d, d], 1)
        return [q.reshape(-1, h), k.reshape(-1, h), v.reshape(-1, h)]

    return Rule(m, [f"{prefix}.q_proj.weight", f"{prefix}.k_proj.weight", f"{prefix}.v_proj.weight"], to_m, to_h)


def _rope_rows(m: str, h: str, block: int, rope: int, offset: int, interleave: bool) -> Rule:
    """Rows [offset, offset+rope) of every `block` rows hold RoPE dims; permute them for Megatron's MLA.

    Megatron's MLA RoPE reads its input as interleaved pairs (x0,x1),(x2,x3).. ; HF with
    rope_interleave=True does the same (no change), with False it pairs (i, i+rope/2):
    Megatron row 2i = HF row i, Megatron row 2i+1 = HF row i + rope/2.
    """
    if interleave:
        return _direct(m, h)
    half = rope // 2
    perm = torch.stack([torch.arange(half), torch.arange(half) + half], 1).reshape(-1)  # megatron <- hf
    inv = torch.argsort(perm)

    def apply(t, p):
        t = t.clone()
        n = t.shape[0] // block
        for i in range(n):
            s = i * block + offset
            t[s : s + rope] = t[s : s + rope][p]
        return t

    return Rule(m, [h], lambda ts: apply(ts[0], perm), lambda t: [apply(t, inv)])


def rules(info: ModelInfo, ep_rank: int = 0, ep_size: int = 1) -> list[Rule]:
    """Every Megatron tensor of this EP rank's model, in export order."""
    c = info.hf_config
    n_local = info.num_experts // ep_size
    out: list[Rule] = [_direct("embedding.word_embeddings.weight", "model.embed_tokens.weight")]
    moe = set(info.moe_layers)
    for i in range(info.num_layers):
        m, h = f"decoder.layers.{i}", f"model.layers.{i}"
        out.append(_direct(f"{m}.input_layernorm.weight", f"{h}.input_layernorm.weight"))
        sa, ha = f"{m}.self_attention", f"{h}.self_attn"
        if info.family == "qwen3_moe":
            d = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
            out += [
                _qkv(f"{sa}.linear_qkv.weight", ha, c.num_attention_heads, c.num_key_value_heads, d),
                _direct(f"{sa}.q_layernorm.weight", f"{ha}.q_norm.weight"),
                _direct(f"{sa}.k_layernorm.weight", f"{ha}.k_norm.weight"),
                _direct(f"{sa}.linear_proj.weight", f"{ha}.o_proj.weight"),
            ]
        else:
            inter = bool(getattr(c, "rope_interleave", True))
            qk = c.qk_nope_head_dim + c.qk_rope_head_dim
            if c.q_lora_rank is not None:
                out += [
                    _direct(f"{sa}.linear_q_down_proj.weight", f"{ha}.q_a_proj.weight"),
                    _direct(f"{sa}.q_layernorm.weight", f"{ha}.q_a_layernorm.weight"),
                    _rope_rows(
                        f"{sa}.linear_q_up_proj.weight",
                        f"{ha}.q_b_proj.weight",
                        qk,
                        c.qk_rope_head_dim,
                        c.qk_nope_head_dim,
                        inter,
                    ),
                ]
            else:
                out.append(
                    _rope_rows(
                        f"{sa}.linear_q_proj.weight",
                        f"{ha}.q_proj.weight",
                        qk,
                        c.qk_rope_head_dim,
                        c.qk_nope_head_dim,
                        inter,
                    )
                )
            kv_rows = c.kv_lora_rank + c.qk_rope_head_dim
            out += [
                _rope_rows(
                    f"{sa}.linear_kv_down_proj.weight",
                    f"{ha}.kv_a_proj_with_mqa.weight",
                    kv_rows,
                    c.qk_rope_head_dim,
                    c.kv_lora_rank,
                    inter,
                ),
                _direct(f"{sa}.kv_layernorm.weight", f"{ha}.kv_a_layernorm.weight"),
                _direct(f"{sa}.linear_kv_up_proj.weight", f"{ha}.kv_b_proj.weight"),
                _direct(f"{sa}.linear_proj.weight", f"{ha}.o_proj.weight"),
            ]
        out.append(_direct(f"{m}.pre_mlp_layernorm.weight", f"{h}.post_attention_layernorm.weight"))
        mm, hm = f"{m}.mlp", f"{h}.mlp"
        if i not in moe:
            out += [
                _glu(f"{mm}.linear_fc1.weight", f"{hm}.gate_proj.weight", f"{hm}.up_proj.weight"),
                _direct(f"{mm}.linear_fc2.weight", f"{hm}.down_proj.weight"),
            ]
            continue
        out.append(_direct(f"{mm}.router.weight", f"{hm}.gate.weight"))
        if info.router.family == "sigmoid":
            out.append(_direct(f"{mm}.router.e_score_correction_bias", f"{hm}.gate.e_score_correction_bias"))
        for j in range(n_local):
            e = ep_rank * n_local + j
            me, he = f"{mm}.experts.local_experts.{j}", f"{hm}.experts.{e}"
            out += [
                _glu(f"{me}.linear_fc1.weight", f"{he}.gate_proj.weight", f"{he}.up_proj.weight", expert=True),
                _direct(f"{me}.linear_fc2.weight", f"{he}.down_proj.weight", expert=True),
            ]
        if info.family == "glm4_moe_lite" and getattr(c, "n_shared_experts", 0):
            ms, hs = f"{mm}.shared_experts", f"{hm}.shared_experts"
            out += [
                _glu(f"{ms}.linear_fc1.weight", f"{hs}.gate_proj.weight", f"{hs}.up_proj.weight"),
                _direct(f"{ms}.linear_fc2.weight", f"{hs}.down_proj.weight"),
            ]
    out.append(_direct("decoder.final_layernorm.weight", "model.norm.weight"))
    if not getattr(c, "tie_word_embeddings", False):
        out.append(_direct("output_layer.weight", "lm_head.weight"))
    return out


def _tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    named = dict(model.named_parameters())
    named.update(model.named_buffers())
    return named


# ---- HF -> Megatron -----------------------------------------------------------------------------


def hf_to_megatron(
    info: ModelInfo, get: Callable[[str], torch.Tensor], ep_rank: int = 0, ep_size: int = 1
) -> dict[str, torch.Tensor]:
    """This rank's Megatron state (local experts only) from an HF tensor getter."""
    return {r.megatron: r.to_megatron([get(h) for h in r.hf]) for r in rules(info, ep_rank, ep_size)}


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
) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) of this rank's tensors: dense ones and its own experts, in export order.

    grads=True maps the parameters' gradients the same way (for tests and diagnostics).
    Under TP the dense tensors are gathered from the TP group first (an HF tensor is whole),
    so it is then collective over the TP group; dense=False gives the experts only (never
    TP-split: no collective), for a rank that publishes no dense tensor.
    """
    info: ModelInfo = model.zeda_info
    ep_rank, ep_size = _ep(ep_rank, ep_size)
    targets = _source(model, grads)
    split = tp_dims(model)
    dtypes = getattr(model, "zeda_hf_dtypes", {}) if cast else {}
    for r in rules(info, ep_rank, ep_size):
        if r.megatron not in targets or not (dense or r.expert):  # grads=True: buffers have none
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


def rules_for_expert(info: ModelInfo, megatron_name: str, src_rank: int, ep_size: int) -> Rule:
    """The rule of local expert tensor `megatron_name` as held by EP rank `src_rank`."""
    m = re.match(r"decoder\.layers\.(\d+)\.mlp\.experts\.local_experts\.(\d+)\.(linear_fc[12])\.weight", megatron_name)
    i, j, which = int(m.group(1)), int(m.group(2)), m.group(3)
    e = src_rank * (info.num_experts // ep_size) + j
    he = f"model.layers.{i}.mlp.experts.{e}"
    if which == "linear_fc1":
        return _glu(megatron_name, f"{he}.gate_proj.weight", f"{he}.up_proj.weight", expert=True)
    return _direct(megatron_name, f"{he}.down_proj.weight", expert=True)


_CKPT_EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def fuse_experts(named: Iterator[tuple[str, torch.Tensor]], num_experts: int) -> Iterator[tuple[str, torch.Tensor]]:
    """Per-expert checkpoint tensors -> transformers' in-memory fused layout, order otherwise kept.

    `{p}.{e}.gate_proj/up_proj.weight` -> `{p}.gate_up_proj` [E, 2I, H] (gate rows first) and
    `{p}.{e}.down_proj.weight` -> `{p}.down_proj` [E, H, I], emitted once a layer's experts are complete.
    """
    pending: dict[str, dict[tuple[int, str], torch.Tensor]] = {}
    for name, t in named:
        m = _CKPT_EXPERT.match(name)
        if m is None:
            yield name, t
            continue
        prefix, e, which = m.group(1), int(m.group(2)), m.group(3)
        layer = pending.setdefault(prefix, {})
        layer[(e, which)] = t
        if len(layer) == 3 * num_experts:
            yield (
                f"{prefix}.gate_up_proj",
                torch.stack([torch.cat([layer[(i, "gate_proj")], layer[(i, "up_proj")]]) for i in range(num_experts)]),
            )
            yield f"{prefix}.down_proj", torch.stack([layer[(i, "down_proj")] for i in range(num_experts)])
            del pending[prefix]
    if pending:
        raise ValueError(f"incomplete experts for {sorted(pending)}")


LAYOUTS = ("fused", "checkpoint")


def export_buckets(
    model: torch.nn.Module,
    version: int,
    bucket_bytes: int = 256 << 20,
    cast: bool = True,
    layout: str = "fused",
    keep: bool = True,
) -> WeightUpdate:
    """Weights v`version` as ordered buckets of (name, tensor), experts gathered from the EP ranks.

    layout "fused" (default): the names and shapes of the zeda_rl transformers model's
    state dict (experts as `experts.gate_up_proj` [E, 2I, H] / `experts.down_proj`
    [E, H, I]) - what `zeda_rl.weights.apply_update` and the rollout engines take.
    layout "checkpoint": the per-expert safetensors names of the checkpoint on disk.
    Collective over the EP and TP groups (every rank must call it). A rank with keep=False takes
    part in the gathers tensor by tensor and holds none of them (an empty update): at
    scale the full model must not be materialised on every rank.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r}: expected one of {LAYOUTS}")
    named = full_hf_state(model, cast)
    if not keep:
        for _ in named:
            pass
        return WeightUpdate(version=int(version), buckets=[])
    if layout == "fused":
        named = fuse_experts(named, model.zeda_info.num_experts)
    return WeightUpdate(version=int(version), buckets=make_buckets(named, bucket_bytes))


# ---- HF checkpoint export -----------------------------------------------------------------------


def export_hf_checkpoint(
    model: torch.nn.Module,
    out_dir: str | Path,
    source_dir: str | Path | None = None,
    max_shard_bytes: int = 4 << 30,
    write: bool | None = None,
) -> Path | None:
    """Write the model as an HF checkpoint in the converted format; returns out_dir on the writer.

    config.json and tokenizer/other non-weight files come from `source_dir` (default: the
    checkpoint the model was loaded from); weights are gathered from the EP ranks and
    written as safetensors (sharded with an index above `max_shard_bytes`). Everything
    goes to a temporary directory beside out_dir, renamed into place when complete.
    Source tensors the learner does not hold (e.g. GLM-4.7-Flash's multi-token-prediction
    layer, which is not trained here) are copied through unchanged, so the export is as
    complete as the input. Collective over the EP and TP groups; by default the global rank 0 writes.
    """
    out = Path(out_dir)
    src = Path(source_dir or getattr(model, "zeda_source"))
    if write is None:
        write = not dist.is_initialized() or dist.get_rank() == 0

    def named():
        seen = set()
        for name, t in full_hf_state(model):
            seen.add(name)
            yield name, t
        if write:
            ckpt = HFCheckpoint(src)
            for name in ckpt.keys():
                if name not in seen:
                    yield name, ckpt.get(name)

    if not write:  # the other EP ranks only take part in the gathers
        for _ in named():
            pass
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        # Shards are written as they fill (host memory stays ~max_shard_bytes), renamed once their count is known.
        parts: list[dict[str, int]] = []
        shard: dict[str, torch.Tensor] = {}
        size = 0

        def flush():
            save_file(shard, tmp / f"part-{len(parts):05d}", metadata={"format": "pt"})
            parts.append({k: v.numel() * v.element_size() for k, v in shard.items()})

        for name, t in named():
            n = t.numel() * t.element_size()
            if shard and size + n > max_shard_bytes:
                flush()
                shard, size = {}, 0
            shard[name] = t.detach().to("cpu", copy=True)  # the tensors may live on a GPU or be live parameters
            size += n
        flush()
        if len(parts) == 1:
            (tmp / "part-00000").rename(tmp / SINGLE)
        else:
            weight_map = {}
            for k, names in enumerate(parts):
                fname = f"model-{k + 1:05d}-of-{len(parts):05d}.safetensors"
                (tmp / f"part-{k:05d}").rename(tmp / fname)
                weight_map.update(dict.fromkeys(names, fname))
            total = sum(sum(p.values()) for p in parts)
            (tmp / INDEX).write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n"
            )
        for p in sorted(src.iterdir()):
            if p.is_file() and p.suffix not in _WEIGHT_SUFFIXES and not p.name.endswith(".index.json"):
                shutil.copyfile(p, tmp / p.name)
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException as err:
        from zeda_rl.diskerrors import write_error

        shutil.rmtree(tmp, ignore_errors=True)
        failed = write_error(err, out)  # a full disk as "<out>: No space left on device", whatever the writer said
        if failed is err:
            raise
        raise failed from err
    return out


__all__ = [
    "HFCheckpoint",
    "Rule",
    "rules",
    "hf_to_megatron",
    "load_hf",
    "local_hf_state",
    "full_hf_state",
    "export_buckets",
    "export_hf_checkpoint",
    "is_expert_param",
]
