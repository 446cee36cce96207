"""Megatron layer specs for the two families: local modules, our norms and router, a chosen core attention.

Megatron's local (non TransformerEngine) GPT layer spec is the base, rewritten in three places:
- the MoE layers get `learner.router.ZeroExpertRouter`;
- norms are `RMSNorm` (torch's, marked for sequence parallelism, which the local spec's
  WrappedTorchNorm refuses), GLM's q_a / kv_a norms with their fixed epsilon;
- the core attention is `learner.attention`'s (`core_attention`): the local one, or only the
  core attention of the TE spec, so parameter names (learner.bridge) are the same either way.
MLA gets `MLACoreAttention` (the local DotProductAttention with MLA's v head dim) and, under
TP, duplicated down projections (`_duplicated_linear`).
"""

from __future__ import annotations

import copy
import dataclasses
import functools

import torch

from learner import cpu_shims

cpu_shims.apply()

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec  # noqa: E402
from megatron.core.transformer.dot_product_attention import DotProductAttention  # noqa: E402
from megatron.core.transformer.spec_utils import ModuleSpec  # noqa: E402
from megatron.core.transformer.torch_norm import WrappedTorchNorm  # noqa: E402
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules  # noqa: E402
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402

from learner.megatron_config import ModelInfo  # noqa: E402
from learner.router import ZeroExpertRouter  # noqa: E402


class RMSNorm(torch.nn.RMSNorm):
    """torch's RMSNorm built from Megatron's norm arguments, usable with sequence parallelism.

    The local spec's WrappedTorchNorm refuses sequence_parallel; this one marks its weight
    `sequence_parallel` instead, so its gradient (of a sequence shard) is summed over TP.
    """

    fixed_eps: float | None = None

    def __init__(self, config=None, hidden_size: int = 0, eps: float = 1e-5, **kwargs):
        super().__init__(hidden_size, eps=self.fixed_eps if self.fixed_eps is not None else eps)
        setattr(self.weight, "sequence_parallel", bool(getattr(config, "sequence_parallel", False)))


def _fixed_eps_rmsnorm(eps: float) -> type:
    """RMSNorm with a fixed epsilon (GLM's q_a / kv_a norms use 1e-6, not rms_norm_eps)."""
    return type(f"RMSNormEps{eps:g}", (RMSNorm,), {"fixed_eps": eps})


def _own_norms(layer_spec: ModuleSpec) -> ModuleSpec:
    """The layer spec with the local spec's WrappedTorchNorm replaced by `RMSNorm` (see there)."""
    swap = lambda m: RMSNorm if m is WrappedTorchNorm else m  # noqa: E731
    attn = layer_spec.submodules.self_attention
    attn_sub = attn.submodules
    norm_fields = {
        f.name: swap(getattr(attn_sub, f.name)) for f in dataclasses.fields(attn_sub) if f.name.endswith("layernorm")
    }
    attn = ModuleSpec(
        module=attn.module, params=dict(attn.params), submodules=dataclasses.replace(attn_sub, **norm_fields)
    )
    return ModuleSpec(
        module=layer_spec.module,
        params=dict(layer_spec.params),
        submodules=dataclasses.replace(
            layer_spec.submodules,
            self_attention=attn,
            input_layernorm=swap(layer_spec.submodules.input_layernorm),
            pre_mlp_layernorm=swap(layer_spec.submodules.pre_mlp_layernorm),
        ),
        metainfo=dict(getattr(layer_spec, "metainfo", {}) or {}),
    )


def _with_router(layer_spec: ModuleSpec, router) -> ModuleSpec:
    mlp = layer_spec.submodules.mlp
    moe = dataclasses.replace(mlp.submodules, router=router)
    mlp = ModuleSpec(
        module=mlp.module, params=dict(mlp.params), submodules=moe, metainfo=dict(getattr(mlp, "metainfo", {}) or {})
    )
    return ModuleSpec(
        module=layer_spec.module,
        params=dict(layer_spec.params),
        submodules=dataclasses.replace(layer_spec.submodules, mlp=mlp),
        metainfo=dict(getattr(layer_spec, "metainfo", {}) or {}),
    )


class MLACoreAttention(DotProductAttention):
    """Megatron's local DotProductAttention for MLA, whose q/k and v head dims differ.

    The local spec's DotProductAttention does not take MLA's k_channels / v_channels; its
    maths is head-dim agnostic except the output width, which must be heads x v_channels.
    """

    def __init__(
        self,
        config,
        layer_number,
        attn_mask_type,
        attention_type,
        attention_dropout=None,
        softmax_scale=None,
        k_channels=None,
        v_channels=None,
        cp_comm_type=None,
        pg_collection=None,
    ):
        if v_channels is not None and config.kv_channels != v_channels:
            config = copy.copy(config)
            config.kv_channels = v_channels
        super().__init__(
            config,
            layer_number,
            attn_mask_type,
            attention_type,
            attention_dropout=attention_dropout,
            softmax_scale=softmax_scale,
            cp_comm_type=cp_comm_type,
            pg_collection=pg_collection,
        )


def _duplicated_linear() -> type:
    """Megatron's plain (TP-duplicated) Linear, which MLA takes for its down projections under TP.

    Megatron's MLA takes its q/kv down projections either duplicated (TransformerEngine's
    TELinear on GPU runs, or this `Linear`) or column-parallel (the local spec's default). The
    column-parallel path computes the RoPE key part of kv_a_proj on the full sequence on every
    TP rank and splits its gradient instead of summing it over the ranks' heads, so that
    gradient is wrong under TP (seen: kv_a_proj_with_mqa grads off by 1e-2). The duplicated one
    runs on the rank's sequence shard with its weight marked `sequence_parallel` (its gradient
    is summed over TP), as the GPU runs do.
    """
    import megatron.core.transformer.multi_latent_attention as mla

    if mla.Linear is None:
        raise NotImplementedError(
            "MLA under tensor parallelism needs megatron.core.post_training.modelopt.layers.Linear, "
            "which megatron-core did not import here"
        )
    return mla.Linear


def _attention_spec(layer_spec: ModuleSpec, core_attention, norm=None, down_proj=None) -> ModuleSpec:
    """The layer spec with another core attention (and, for MLA, the fixed-eps q_a / kv_a norms and,
    under TP, duplicated down projections: see `_duplicated_linear`)."""
    attn = layer_spec.submodules.self_attention
    sub = dict(core_attention=core_attention)
    if norm is not None:
        sub.update(q_layernorm=norm, kv_layernorm=norm)
    if down_proj is not None:
        sub.update(linear_q_down_proj=down_proj, linear_kv_down_proj=down_proj)
    attn = ModuleSpec(
        module=attn.module, params=dict(attn.params), submodules=dataclasses.replace(attn.submodules, **sub)
    )
    return ModuleSpec(
        module=layer_spec.module,
        params=dict(layer_spec.params),
        submodules=dataclasses.replace(layer_spec.submodules, self_attention=attn),
        metainfo=dict(getattr(layer_spec, "metainfo", {}) or {}),
    )


ATTENTION = ("local", "flash")


def flash_unavailable() -> str:
    """Why `attention: flash` cannot run in this process ('' when it can)."""
    if not torch.cuda.is_available():
        return "no GPU in this process"
    try:  # the PyTorch extension, not just TE's core (what `zeda doctor` checks too: launch.config)
        import transformer_engine.pytorch  # noqa: F401
    except Exception as err:
        return f"transformer_engine.pytorch is not importable ({type(err).__name__}: {str(err)[:200]})"
    return ""


def core_attention(attention: str, mla: bool):
    """The core-attention module of `learner.attention`.

    local: Megatron's DotProductAttention (MLACoreAttention for MLA), which materialises the
    S x S scores: the CPU path. flash: the core attention of Megatron's TransformerEngine layer
    spec (TEDotProductAttention: fused flash / cuDNN kernels, MLA's q/k and v head dims native).
    Only the core attention is taken from the TE spec: the projections, norms and the router stay
    the local spec's, so parameter names (learner.bridge) and the zero-expert router are the same
    in both; the TE path is untested on this project's CPU machines.
    """
    if attention == "local":
        return MLACoreAttention if mla else DotProductAttention
    if attention != "flash":
        raise ValueError(f"attention {attention!r}: expected one of {ATTENTION}")
    why = flash_unavailable()
    if why:
        raise RuntimeError(
            f"learner.attention: flash needs transformer_engine on a GPU ({why}); use learner.attention: local"
        )
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

    te = get_gpt_layer_with_transformer_engine_spec(num_experts=None, qk_layernorm=True, multi_latent_attention=mla)
    return te.submodules.self_attention.submodules.core_attention


def block_spec(
    info: ModelInfo, config: TransformerConfig, alpha: float = 0.1, w: float = 2.0, attention: str = "local"
) -> TransformerBlockSubmodules:
    """Per-layer local specs: dense or MoE (with ZeroExpertRouter), MLA norms fixed for GLM, the chosen core attention."""
    mla = info.family == "glm4_moe_lite"
    dense = get_gpt_layer_local_spec(
        num_experts=None, qk_layernorm=True, multi_latent_attention=mla, normalization="RMSNorm"
    )
    moe = get_gpt_layer_local_spec(
        num_experts=info.num_experts, qk_layernorm=True, multi_latent_attention=mla, normalization="RMSNorm"
    )
    moe = _with_router(moe, functools.partial(ZeroExpertRouter, spec=info.router, alpha=alpha, w=w))
    core = core_attention(attention, mla)
    norm = _fixed_eps_rmsnorm(1e-6) if mla else None
    down = _duplicated_linear() if mla and config.tensor_model_parallel_size > 1 else None
    dense, moe = _own_norms(dense), _own_norms(moe)
    dense, moe = _attention_spec(dense, core, norm, down), _attention_spec(moe, core, norm, down)
    layers = [moe if i in info.moe_layers else dense for i in range(info.num_layers)]
    return TransformerBlockSubmodules(layer_specs=layers, layer_norm=RMSNorm)
