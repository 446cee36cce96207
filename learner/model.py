"""A Megatron-core GPTModel built from a converted (zero-expert) HF config, with the ZEDA router.

Both supported families map onto stock Megatron-core pieces with the local (non
TransformerEngine) layer specs (`attention: flash` swaps in only the TE spec's core attention,
see `core_attention`; `recompute` is Megatron's, see RECOMPUTE):
- Qwen3-MoE: GQA self-attention with q/k RMSNorm and RoPE, SwiGLU experts, untied
  embeddings, dense layers where `mlp_only_layers` / `decoder_sparse_step` say so.
- GLM-4.7-Flash: multi-latent attention (`MLATransformerConfig`, interleaved RoPE), one
  shared expert, leading dense layer(s) from `mlp_layer_types`, sigmoid routing with a
  correction bias and a routed scaling factor.

The only new module is `ZeroExpertRouter`, a subclass of Megatron's `TopKRouter` put in
the MoE layer spec. Its gate has N+N_Z rows and keeps Megatron's fp32 gating GEMM; the
choice of slots is `zeda_rl.routing.route` (the same definition the transformers model
and the rollout engines use). Zero slots are then removed before the token dispatcher:
the (probs, routing_map) pair handed to Megatron covers only the N real experts, so a
zero slot is dispatched nowhere and costs nothing, and a token uses 0..K real experts.
The group auxiliary loss (`zeda_rl.losses.group_aux_loss`, counts from a fresh top-K of
the probabilities: neither the correction bias nor replayed ids) is attached to the router
output with Megatron's `MoEAuxLossAutoScaler`, as Megatron attaches its own aux losses;
`MoEAuxLossAutoScaler.set_loss_scale` therefore sets its weight in the backward pass.
Routing replay and recording go through the routers (`replay_routing`, `record_routing`).

Tensor parallelism (`tp_size` > 1) is stock Megatron with sequence parallelism: column/row-parallel
linears, a vocab-parallel embedding and output layer (the vocabulary padded to a multiple of TP
when it is not one), experts whole on their EP rank (expert TP = 1). Between the TP regions each TP
rank holds a contiguous 1/TP of the sequence, so a router sees only its shard's tokens: it takes its
rows of replayed ids, all-gathers the ids it chose (records and metrics are of the whole sequence),
and L_GA sums its statistics over the TP group (counts without gradient, the probability sums with
an all-reduce whose backward is the identity), so every TP rank attaches the loss of the whole
micro-batch and its gradient reaches each token's router row once. Sequences are padded on the
right to a multiple of TP inside `forward_logits` (padding flagged, so it carries no loss and no
L_GA) and trimmed again on the way out.

Token order inside Megatron is [S, B] (sequence first); the helpers here take and give
[B, S] like the rest of zeda_rl.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from learner import cpu_shims

cpu_shims.apply()

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec  # noqa: E402
from megatron.core.models.gpt.gpt_model import GPTModel  # noqa: E402
from megatron.core.tensor_parallel.mappings import (  # noqa: E402
    gather_from_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
)
from megatron.core.transformer.dot_product_attention import DotProductAttention  # noqa: E402
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler  # noqa: E402
from megatron.core.transformer.moe.router import TopKRouter  # noqa: E402
from megatron.core.transformer.spec_utils import ModuleSpec  # noqa: E402
from megatron.core.transformer.torch_norm import WrappedTorchNorm  # noqa: E402
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules  # noqa: E402
from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig  # noqa: E402
from megatron.core.utils import get_pg_rank, get_pg_size  # noqa: E402

import zeda_rl  # noqa: E402,F401  (registers the zero-expert configs with AutoConfig)
from zeda_rl.arch import TARGETS  # noqa: E402
from zeda_rl.losses import group_aux_loss  # noqa: E402
from zeda_rl.modeling import router_spec  # noqa: E402
from zeda_rl.routing import RouterSpec, route  # noqa: E402

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


def _rope_theta(hf_config) -> float:
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
        rotary_base=_rope_theta(c),
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


# ---- the zero-expert router -----------------------------------------------------------------


def _in_backward() -> bool:
    """True while autograd runs a backward: under full recompute the router's forward then runs a second time."""
    return torch._C._current_graph_task_id() != -1


class ZeroExpertRouter(TopKRouter):
    """TopKRouter over N+N_Z slots whose zero slots never reach the dispatcher.

    Forward: Megatron's fp32 gating GEMM -> `zeda_rl.routing.route` (optionally with
    replayed ids) -> L_GA attached with MoEAuxLossAutoScaler -> (probs, routing_map) over
    the N real experts only. The last chosen ids (all K slots, zero ones included) and
    the last L_GA value are kept for metrics. Under full recompute the forward runs twice
    (without grad, then again inside the backward): ids are recorded in the first pass only,
    L_GA exists only in the second (the graph the backward uses), so neither is counted twice.
    """

    def __init__(self, config, pg_collection=None, *, spec: RouterSpec, alpha: float = 0.1, w: float = 2.0):
        super().__init__(config=config, pg_collection=pg_collection)
        if spec.num_experts != config.num_moe_experts or spec.top_k != config.moe_router_topk:
            raise ValueError(
                f"router spec {spec} does not match Megatron's {config.num_moe_experts} experts / top-{config.moe_router_topk}"
            )
        self.spec = spec
        self.alpha, self.w = float(alpha), float(w)
        # N+N_Z gate rows, always fp32 (the router runs in fp32 whatever the model dtype).
        self.weight = torch.nn.Parameter(torch.empty(spec.total, config.hidden_size, dtype=torch.float32))
        if config.perform_initialization:
            config.init_method(self.weight)
        # it sees a sequence shard under sequence parallelism: its grad is summed over TP (learner.parallel)
        setattr(self.weight, "sequence_parallel", bool(config.sequence_parallel))
        if spec.family == "sigmoid":
            # Fixed during adaptation (bias update rate 0), so a buffer, as in the HF model.
            self.register_buffer("e_score_correction_bias", torch.zeros(spec.total, dtype=torch.float32))
        else:
            self.e_score_correction_bias = None
        self.replay_ids: torch.Tensor | None = None  # [S*B, K] for the next forward (Megatron token order)
        self.record: list[torch.Tensor] | None = None
        self.last_ids: torch.Tensor | None = None
        self.last_aux_loss: torch.Tensor | None = None

    def _maintain_float32_expert_bias(self):
        if self.e_score_correction_bias is not None and self.e_score_correction_bias.dtype != torch.float32:
            self.e_score_correction_bias.data = self.e_score_correction_bias.data.float()

    def _sp_size(self) -> int:
        """TP ranks sharing this router's sequence (1 without sequence parallelism)."""
        return get_pg_size(self.tp_group) if self.config.sequence_parallel else 1

    def _local_replay(self, replay: torch.Tensor, rows: int) -> torch.Tensor:
        """This rank's rows of the whole sequence's replayed ids ([S*B, K], Megatron order).

        Ids for the sequence padding `forward_logits` added (rows past the end) are -1: the router chooses.
        """
        sp = self._sp_size()
        full = rows * sp
        if replay.shape[0] > full or (sp == 1 and replay.shape[0] != full):
            raise ValueError(f"routing replay: {replay.shape[0]} rows of ids for {full} tokens")
        if replay.shape[0] < full:
            replay = torch.cat([replay, replay.new_full((full - replay.shape[0], replay.shape[1]), -1)])
        return replay.narrow(0, get_pg_rank(self.tp_group) * rows, rows) if sp > 1 else replay

    def forward(self, input: torch.Tensor, padding_mask: torch.Tensor | None = None):
        self._maintain_float32_expert_bias()
        logits = self.gating(input)  # Megatron's gating GEMM in fp32 (moe_router_dtype="fp32")
        logits = logits.reshape(-1, self.spec.total)
        replay = self.replay_ids
        if replay is not None:
            replay = self._local_replay(replay.to(logits.device), logits.shape[0])
            # a row with any id < 0 was not recorded (padding, the last sampled token): the router chooses
            replay = torch.where((replay < 0).any(-1, keepdim=True), torch.full_like(replay, -1), replay)
        r = route(logits, self.spec, self.e_score_correction_bias, replay)
        n = self.spec.num_experts
        ids = r.ids
        sp = self._sp_size()
        if not _in_backward():  # a recompute pass repeats the ids of its forward: record them once
            if sp > 1:  # records and metrics are of the whole sequence, in Megatron order
                gathered = ids.new_empty((ids.shape[0] * sp, ids.shape[1]))
                torch.distributed.all_gather_into_tensor(gathered, ids.detach().contiguous(), group=self.tp_group)
                self.last_ids = gathered
            else:
                self.last_ids = ids.detach()
            if self.record is not None:
                self.record.append(self.last_ids)

        # Drop zero slots: they map to an extra column N that is cut off, so they dispatch nowhere.
        real = ids < n
        col = ids.masked_fill(~real, n)
        rows = logits.shape[0]
        routing_map = torch.zeros(rows, n + 1, dtype=torch.bool, device=logits.device).scatter(1, col, True)[:, :n]
        probs = torch.zeros(rows, n + 1, dtype=r.weights.dtype, device=logits.device)
        probs = probs.scatter(1, col, r.weights.masked_fill(~real, 0.0))[:, :n]

        # Under full recompute the first forward runs without grad and the recompute pass (in the backward)
        # with it, so L_GA is attached, and kept for metrics, exactly once: in the pass whose graph is used.
        if not _in_backward():
            self.last_aux_loss = None
        if self.training and torch.is_grad_enabled() and self.spec.num_zero > 0 and self.alpha > 0:
            token_mask = None if padding_mask is None else ~padding_mask.reshape(-1)
            reduce = None
            if sp > 1:  # the statistics of the whole micro-batch, every TP rank seeing its shard
                reduce = functools.partial(reduce_from_tensor_model_parallel_region, group=self.tp_group)
            aux = group_aux_loss(
                r.probs,
                n,
                self.spec.num_zero,
                self.spec.top_k,
                alpha=self.alpha,
                w=self.w,
                token_mask=token_mask,
                reduce=reduce,
            )
            self.last_aux_loss = aux.detach()
            probs = MoEAuxLossAutoScaler.apply(probs, aux)
        return probs.contiguous(), routing_map.contiguous()


# ---- layer specs ----------------------------------------------------------------------------


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
    if not cpu_shims._have_te():
        return "transformer_engine is not installed"
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
    layers = [moe if i in set(info.moe_layers) else dense for i in range(info.num_layers)]
    final_norm = RMSNorm
    return TransformerBlockSubmodules(layer_specs=layers, layer_norm=final_norm)


def build_model(
    info: ModelInfo,
    ep_size: int = 1,
    dispatcher: str = "allgather",
    params_dtype: torch.dtype = torch.float32,
    alpha: float = 0.1,
    w: float = 2.0,
    recompute: str = "none",
    attention: str = "local",
    tp_size: int = 1,
    **config_overrides,
) -> GPTModel:
    """The Megatron GPTModel of a converted checkpoint (weights uninitialised: load them with the bridge).

    Needs torch.distributed and Megatron's parallel state initialised (`learner.parallel.setup`)
    with the same TP and EP sizes. Under TP the output layer keeps its logits vocab-parallel
    (`forward_logits(gather=False)`, `learner.tp_logprob`); `forward_logits` gathers them by default.
    `recompute` / `attention`: the `learner:` knobs of those names (see RECOMPUTE, core_attention).
    """
    overrides = {**recompute_config(recompute), **config_overrides}
    config = transformer_config(
        info, ep_size=ep_size, dispatcher=dispatcher, params_dtype=params_dtype, tp_size=tp_size, **overrides
    )
    c = info.hf_config
    model = GPTModel(
        config=config,
        transformer_layer_spec=block_spec(info, config, alpha=alpha, w=w, attention=attention),
        vocab_size=padded_vocab(info, tp_size),
        max_sequence_length=int(c.max_position_embeddings),
        pre_process=True,
        post_process=True,
        parallel_output=tp_size > 1,
        share_embeddings_and_output_weights=bool(getattr(c, "tie_word_embeddings", False)),
        position_embedding_type="rope" if info.family == "qwen3_moe" else "none",
        rotary_base=_rope_theta(c),
    )
    model.zeda_info = info
    return model


# ---- running it -----------------------------------------------------------------------------


def routers(model: torch.nn.Module) -> list[ZeroExpertRouter]:
    """The zero-expert routers in layer order (one per MoE layer)."""
    return [m for m in model.modules() if isinstance(m, ZeroExpertRouter)]


def tp_size_of(model: GPTModel) -> int:
    return int(model.config.tensor_model_parallel_size)


def forward_logits(
    model: GPTModel, tokens: torch.Tensor, padding_mask: torch.Tensor | None = None, gather: bool = True
) -> torch.Tensor:
    """Logits [B, S, V] for token ids [B, S] (causal; right padding only, flagged True in padding_mask).

    Under TP, `gather=False` gives this rank's vocab-parallel slice [B, S, V_padded / TP] instead
    (`learner.tp_logprob` takes it); the gathered logits have the padding columns cut off.
    """
    b, s = tokens.shape
    tp = tp_size_of(model)
    pad = -s % tp  # sequence parallelism splits the sequence evenly over the TP ranks
    if pad:
        tokens = torch.cat([tokens, tokens.new_zeros(b, pad)], 1)
        mask = (
            padding_mask.bool()
            if padding_mask is not None
            else torch.zeros(b, s, dtype=torch.bool, device=tokens.device)
        )
        padding_mask = torch.cat([mask, mask.new_ones(b, pad)], 1)
    position_ids = torch.arange(s + pad, device=tokens.device).unsqueeze(0).expand(b, s + pad)
    kwargs = {}
    if padding_mask is not None:
        kwargs["padding_mask"] = padding_mask.bool()
    logits = model(tokens, position_ids, None, **kwargs)
    if tp > 1 and gather:
        logits = gather_from_tensor_model_parallel_region(logits)[..., : model.zeda_info.vocab_size]
    return logits[:, :s] if pad else logits


def _to_megatron_order(ids_bsk: torch.Tensor) -> torch.Tensor:
    b, s, k = ids_bsk.shape
    return ids_bsk.transpose(0, 1).reshape(s * b, k)


def _from_megatron_order(ids: torch.Tensor, b: int, s: int) -> torch.Tensor:
    # rows past s * b are the sequence padding forward_logits adds under TP
    return ids[: s * b].reshape(s, b, -1).transpose(0, 1)


@contextmanager
def replay_routing(model: torch.nn.Module, ids: torch.Tensor | None):
    """Force slot ids [L_moe, B, S, K] (rows of -1: let the router choose) for forwards inside.

    Under full recompute the backward runs the routers again: keep the backward inside too, so
    the recompute pass routes with the same ids.
    """
    rs = routers(model)
    if ids is None:
        yield
        return
    ids = torch.as_tensor(ids)
    if ids.shape[0] != len(rs):
        raise ValueError(f"routing replay: ids cover {ids.shape[0]} MoE layers, the model has {len(rs)}")
    for r, layer_ids in zip(rs, ids):
        r.replay_ids = _to_megatron_order(layer_ids.long())
    try:
        yield
    finally:
        for r in rs:
            r.replay_ids = None


@contextmanager
def record_routing(model: torch.nn.Module, batch: int, seq: int):
    """Record chosen slot ids; `ids()` gives [L_moe, B, S, K] of the (single) forward inside."""
    rs = routers(model)
    for r in rs:
        r.record = []

    def ids() -> torch.Tensor:
        return torch.stack([_from_megatron_order(torch.cat(r.record), batch, seq) for r in rs])

    try:
        yield ids
    finally:
        for r in rs:
            r.record = None


def last_routing(model: torch.nn.Module, batch: int, seq: int) -> torch.Tensor:
    """Slot ids [L_moe, B, S, K] chosen in the last forward."""
    return torch.stack([_from_megatron_order(r.last_ids, batch, seq) for r in routers(model)])


def last_aux_losses(model: torch.nn.Module) -> list[float]:
    """L_GA per MoE layer of the last training forward (0.0 where none was computed)."""
    return [float(r.last_aux_loss) if r.last_aux_loss is not None else 0.0 for r in routers(model)]


def set_aux_loss_scale(scale: float) -> None:
    """Weight of the attached L_GA in the next backward passes (Megatron's aux-loss mechanism)."""
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(float(scale)))


def is_expert_param(name: str) -> bool:
    """Parameters sharded over expert-parallel ranks (each rank holds N/EP experts)."""
    return ".mlp.experts." in name
