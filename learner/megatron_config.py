"""A converted (zero-expert) HF config in Megatron's terms: `ModelInfo` and `transformer_config`.

Both supported families map onto stock Megatron-core configs:
- Qwen3-MoE: GQA self-attention with q/k RMSNorm and RoPE, SwiGLU experts, untied
  embeddings, dense layers where `mlp_only_layers` / `decoder_sparse_step` say so.
- GLM-4.7-Flash: multi-latent attention (`MLATransformerConfig`, interleaved RoPE), one
  shared expert, leading dense layer(s) from `mlp_layer_types`, sigmoid routing with a
  correction bias and a routed scaling factor.

Megatron sees N real experts and top-K; the N_Z zero slots exist only in the router
(`learner.router`), so nothing here counts them. `ModelInfo` is what the rest of the learner
(bridge, metrics, actors) reads about the checkpoint without touching Megatron's config.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from learner import cpu_shims

cpu_shims.apply()

from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig  # noqa: E402

import zeda_rl  # noqa: E402,F401  (registers the zero-expert configs with AutoConfig)
from zeda_rl.arch import TARGETS  # noqa: E402
from zeda_rl.modeling import router_spec  # noqa: E402
from zeda_rl.routing import RouterSpec  # noqa: E402

FAMILIES = {"Qwen3MoePlusPlusForCausalLM": "qwen3_moe", "Glm4MoeLitePlusPlusForCausalLM": "glm4_moe_lite"}


@dataclass(frozen=True)
class ModelInfo:
    """What the learner needs to know about a converted checkpoint, beyond Megatron's config."""

    family: str  # "qwen3_moe" | "glm4_moe_lite"
    hf_config: object  # the transformers config (Qwen3MoePlusPlusConfig / Glm4MoeLitePlusPlusConfig)
    router: RouterSpec
    moe_layers: tuple[int, ...]  # HF layer indices of the MoE layers (others are dense)
    num_layers: int
    vocab_size: int

    @property
    def num_experts(self) -> int:
        return self.router.num_experts

    @property
    def num_zero(self) -> int:
        return self.router.num_zero


def load_hf_config(checkpoint_dir: str | Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(checkpoint_dir))


def model_info(hf_config) -> ModelInfo:
    archs = list(getattr(hf_config, "architectures", None) or [])
    if not archs or archs[0] not in FAMILIES:
        raise ValueError(
            f"config architectures {archs} is not a converted zero-expert checkpoint; expected one of "
            f"{sorted(FAMILIES)} (convert it first with zeda_rl.convert)"
        )
    if "copy" in hf_config.zce_slots():
        # A copy slot adds weight x input to the MoE output; Megatron's MoE layer has no place for
        # it, and training copy slots as zero slots would silently train another model.
        raise ValueError(
            f"config zce_types {list(hf_config.zce_types)}: the learner trains zero experts only; copy experts "
            "(model.zero_type: copy, zeda convert --zero-type copy) are not supported by the Megatron learner "
            "(ZEDA uses zero experts: copy experts broke accuracy)"
        )
    raw = hf_config.to_dict()
    moe_layers = tuple(TARGETS[archs[0]].moe_layers(raw))
    return ModelInfo(
        family=FAMILIES[archs[0]],
        hf_config=hf_config,
        router=router_spec(hf_config),
        moe_layers=moe_layers,
        num_layers=int(hf_config.num_hidden_layers),
        vocab_size=int(hf_config.vocab_size),
    )


def rope_theta(hf_config) -> float:
    rp = getattr(hf_config, "rope_parameters", None) or {}
    if rp.get("rope_type", "default") not in ("default", None):
        raise NotImplementedError(
            f"rope type {rp.get('rope_type')!r} is not supported by the learner yet (only default RoPE)"
        )
    theta = rp.get("rope_theta", getattr(hf_config, "rope_theta", None))
    if theta is None:
        raise ValueError("config has no rope_theta")
    return float(theta)


def check_tp(info: ModelInfo, tp_size: int) -> None:
    """Refuse a TP size the model's split shapes cannot be divided by, naming them (Megatron would assert).

    Split: attention heads (and Qwen's KV heads), dense and shared-expert FFN widths. MLA's down
    projections are duplicated under TP and the vocabulary is padded, so neither constrains it.
    """
    if tp_size == 1:
        return
    c = info.hf_config
    shapes = {"num_attention_heads": c.num_attention_heads}
    if info.family == "qwen3_moe":
        shapes["num_key_value_heads"] = c.num_key_value_heads
    if len(info.moe_layers) < info.num_layers:
        shapes["intermediate_size (dense layers)"] = c.intermediate_size
    if info.family == "glm4_moe_lite" and getattr(c, "n_shared_experts", 0):
        shapes["moe_intermediate_size x n_shared_experts (shared expert)"] = c.moe_intermediate_size * int(
            c.n_shared_experts
        )
    bad = [f"{k}={v}" for k, v in shapes.items() if v % tp_size]
    if bad:
        raise ValueError(
            f"learner.tp={tp_size} does not divide {', '.join(bad)} of this {info.family} model: "
            "choose a TP size that does"
        )


def padded_vocab(info: ModelInfo, tp_size: int = 1) -> int:
    """Rows of the embedding and output layer: the vocabulary rounded up to a multiple of TP (Megatron splits rows evenly)."""
    return -(-info.vocab_size // tp_size) * tp_size


def transformer_config(
    info: ModelInfo,
    ep_size: int = 1,
    dispatcher: str = "allgather",
    params_dtype: torch.dtype = torch.float32,
    tp_size: int = 1,
    **overrides,
) -> TransformerConfig:
    """Megatron's TransformerConfig (MLATransformerConfig for GLM) for a converted HF config."""
    check_tp(info, tp_size)
    c = info.hf_config
    on_cpu = not torch.cuda.is_available()
    moe_set = set(info.moe_layers)
    if getattr(c, "attention_bias", False):
        raise NotImplementedError("attention_bias=True is not supported by the learner")
    kw = dict(
        num_layers=info.num_layers,
        hidden_size=c.hidden_size,
        num_attention_heads=c.num_attention_heads,
        ffn_hidden_size=c.intermediate_size,
        normalization="RMSNorm",
        layernorm_epsilon=c.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=getattr(c, "initializer_range", 0.02),
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        use_cpu_initialization=on_cpu,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        # MoE: N real experts for Megatron (zero slots never reach it), our router does the rest.
        num_moe_experts=info.num_experts,
        moe_router_topk=info.router.top_k,
        moe_ffn_hidden_size=c.moe_intermediate_size,
        moe_layer_freq=[1 if i in moe_set else 0 for i in range(info.num_layers)],
        moe_router_dtype="fp32",
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
        moe_token_dispatcher_type=dispatcher,
        moe_grouped_gemm=False,
        moe_permute_fusion=False,
        expert_model_parallel_size=ep_size,
        expert_tensor_parallel_size=1,
        tensor_model_parallel_size=tp_size,
        sequence_parallel=tp_size > 1,  # Megatron refuses MoE with TP but without it
        pipeline_model_parallel_size=1,
    )
    if info.family == "qwen3_moe":
        kw.update(
            num_query_groups=c.num_key_value_heads,
            kv_channels=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
            qk_layernorm=True,
        )
        kw.update(overrides)
        return TransformerConfig(**kw)
    kw.update(
        q_lora_rank=c.q_lora_rank,
        kv_lora_rank=c.kv_lora_rank,
        qk_head_dim=c.qk_nope_head_dim,
        qk_pos_emb_head_dim=c.qk_rope_head_dim,
        v_head_dim=c.v_head_dim,
        qk_layernorm=True,  # MLA's q_a / kv_a RMSNorms
        rope_type="rope",
        rotary_base=rope_theta(c),
        rotary_scaling_factor=1.0,
        mscale_all_dim=0.0,
        moe_shared_expert_intermediate_size=c.moe_intermediate_size * int(c.n_shared_experts or 0) or None,
    )
    kw.update(overrides)
    return MLATransformerConfig(**kw)


RECOMPUTE = {
    "none": {},
    # Megatron's selective recompute: the core attention (the S x S scores) is rebuilt in the backward.
    "selective": dict(recompute_granularity="selective", recompute_modules=["core_attn"]),
    # every layer checkpointed on its own: only layer inputs are kept, one layer is rebuilt at a time
    "full": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
}


def recompute_config(mode: str) -> dict:
    """TransformerConfig fields of a `learner.recompute` value."""
    if mode not in RECOMPUTE:
        raise ValueError(f"recompute {mode!r}: expected one of {sorted(RECOMPUTE)}")
    return dict(RECOMPUTE[mode])
