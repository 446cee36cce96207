"""Megatron tensor names <-> HF tensor names, with the transform each way: `rules`.

One table of name rules maps every Megatron parameter (and the correction-bias buffer) to
the HF tensor(s) it is made of:
- direct copies (norms, embeddings, routers, o_proj/linear_proj, MLA projections);
- SwiGLU fc1 = cat(gate_proj, up_proj) (dense MLPs, experts, the shared expert);
- Qwen3 attention: Megatron's fused linear_qkv, laid out per query group
  [q heads of the group, k, v], from/to q_proj, k_proj, v_proj;
- GLM MLA with `rope_interleave=False`: the RoPE rows of q_b_proj / kv_a_proj are
  permuted into the interleaved order Megatron's MLA RoPE expects (identity otherwise).
Local expert j of EP rank r is global expert r * N/EP + j, so each rank's rules name only its
own experts. Every transform is a pure reindexing, so a round trip is bit-exact. The rules
order is the export order: embeddings, layers in order (experts 0..N-1 inside each), final
norm, lm_head. Sharding over ranks (EP, TP) is `learner.bridge`'s business, not this table's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch

from learner.megatron_config import ModelInfo


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


def rules_for_expert(info: ModelInfo, megatron_name: str, src_rank: int, ep_size: int) -> Rule:
    """The rule of local expert tensor `megatron_name` as held by EP rank `src_rank`."""
    m = re.match(r"decoder\.layers\.(\d+)\.mlp\.experts\.local_experts\.(\d+)\.(linear_fc[12])\.weight", megatron_name)
    i, j, which = int(m.group(1)), int(m.group(2)), m.group(3)
    e = src_rank * (info.num_experts // ep_size) + j
    he = f"model.layers.{i}.mlp.experts.{e}"
    if which == "linear_fc1":
        return _glu(megatron_name, f"{he}.gate_proj.weight", f"{he}.up_proj.weight", expert=True)
    return _direct(megatron_name, f"{he}.down_proj.weight", expert=True)
