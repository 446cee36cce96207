"""The zero-expert models for transformers: Qwen3MoePlusPlus and Glm4MoeLitePlusPlus.

Everything but the MoE block is transformers' own code: the configs and models below
subclass the stock Qwen3-MoE and GLM-4.7-Flash classes, and only the sparse blocks are
swapped for zero-expert ones. The router grows to N+N_Z rows. Config fields follow the
released ZEDA checkpoints (zce_nums, zce_types, use_zce_mask).

Expert compute: by default these models run their experts with `zeda_rl.skip` ("zeda_skip"),
which compacts the zero slots out before any expert computation and then loops over the
experts that got tokens, so expert work scales with the routed (token, real expert) pairs.
It serves inference and is autograd-correct under grad as well (see `zeda_rl.skip`). An
explicit `experts_implementation="grouped_mm"` or `"eager"` (from_pretrained or
`set_experts_implementation`) selects transformers' fused experts instead: zero slots then
go in as the skip sentinel id N with weight 0 and `_is_expert_parallel` set, so those kernels
skip them (grouped_mm still pays per expert, not per routed pair).
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager

import torch
from torch import nn
from transformers import (
    CONFIG_MAPPING,
    AutoConfig,
    AutoModelForCausalLM,
    Glm4MoeLiteConfig,
    Glm4MoeLiteForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)
from transformers.models.glm4_moe_lite.modeling_glm4_moe_lite import Glm4MoeLiteMoE, Glm4MoeLiteTopkRouter
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock, Qwen3MoeTopKRouter

from zeda_rl import skip
from zeda_rl.arch import TARGETS
from zeda_rl.release import ZCE_KEYS, converted_spec, release_config
from zeda_rl.routing import RouterSpec, route

SUPPORTED_ZCE_TYPES = ("zero", "copy")


class _ZceConfigMixin:
    """zce_nums[i] slots of type zce_types[i]; written back in the released layout (`zeda_rl.release`)."""

    def zce_slots(self) -> list[str]:
        for key in ZCE_KEYS:
            if getattr(self, key, None) is None:
                raise ValueError(f"config: {type(self).__name__} needs {key!r}; expected all of {list(ZCE_KEYS)}")
        nums, types = list(self.zce_nums), list(self.zce_types)
        if len(nums) != len(types):
            raise ValueError(f"config: zce_nums {nums} and zce_types {types} must have the same length")
        for t in types:
            if t not in SUPPORTED_ZCE_TYPES:
                raise ValueError(
                    f"config: zce_types entry {t!r} is not supported; expected one of {SUPPORTED_ZCE_TYPES}"
                )
        return [t for n, t in zip(nums, types) for _ in range(int(n))]

    def to_dict(self) -> dict:
        # stock model_type, v4 field names: what the official stack reads (see zeda_rl.release)
        return release_config(super().to_dict(), TARGETS[self._zce_target])


class Qwen3MoePlusPlusConfig(_ZceConfigMixin, Qwen3MoeConfig):
    model_type = "qwen3_moe_plus_plus"
    _zce_target = "Qwen3MoePlusPlusForCausalLM"
    zce_nums: list[int] | None = None
    zce_types: list[str] | None = None
    use_zce_mask: bool | None = None


class Glm4MoeLitePlusPlusConfig(_ZceConfigMixin, Glm4MoeLiteConfig):
    model_type = "glm4_moe_lite_plus_plus"
    _zce_target = "Glm4MoeLitePlusPlusForCausalLM"
    zce_nums: list[int] | None = None
    zce_types: list[str] | None = None
    use_zce_mask: bool | None = None


def _dispatching(stock: type, zce: type) -> type:
    """A stand-in for the stock config class in AutoConfig's table: a config.json that names a
    zero-expert architecture (checked by `converted_spec`) gets the zero-expert config class,
    anything else the stock one, so `AutoModelForCausalLM` then picks the model from `architectures`."""

    class Dispatch(stock):
        model_type = stock.model_type

        def __new__(cls, *args, **kwargs):  # direct construction (AutoConfig.for_model): the stock class
            return stock(*args, **kwargs)

        @classmethod
        def from_dict(cls, config_dict, **kwargs):
            spec = converted_spec(config_dict)
            return (zce if spec is not None else stock).from_dict(config_dict, **kwargs)

    Dispatch.__name__ = Dispatch.__qualname__ = f"{stock.__name__}OrZeroExpert"
    return Dispatch


def _options(config) -> dict:
    """The baselines' routing options a config carries (plain attributes, written to config.json
    only when set, so a checkpoint without them keeps the released layout)."""
    out = {}
    if getattr(config, "skip_threshold", None):
        out["skip_threshold"] = float(config.skip_threshold)
    if getattr(config, "static_top_k", None):
        out["static_top_k"] = int(config.static_top_k)
    return out


def router_spec(config) -> RouterSpec:
    """The routing rule of a converted config, in the form `zeda_rl.routing.route` takes."""
    slots = config.zce_slots()
    if isinstance(config, Glm4MoeLiteConfig):
        return RouterSpec(
            **_options(config),
            family="sigmoid",
            num_experts=config.n_routed_experts,
            num_zero=len(slots),
            top_k=config.num_experts_per_tok,
            norm_topk_prob=config.norm_topk_prob,
            scaling=config.routed_scaling_factor,
            n_group=config.n_group,
            topk_group=config.topk_group,
            mask_zero=config.use_zce_mask,
        )
    return RouterSpec(
        **_options(config),
        family="softmax",
        num_experts=config.num_experts,
        num_zero=len(slots),
        top_k=config.num_experts_per_tok,
        norm_topk_prob=config.norm_topk_prob,
        mask_zero=config.use_zce_mask,
    )


class _ZeroExpertRouterMixin:
    """Router with N+N_Z output rows. Returns the stock (logits, weights, ids) triple."""

    def _widen(self, config):
        self.spec = router_spec(config)
        self.num_experts = self.spec.total
        self.weight = nn.Parameter(torch.zeros(self.spec.total, self.hidden_dim, dtype=self.weight.dtype))
        if hasattr(self, "e_score_correction_bias"):
            self.e_score_correction_bias = nn.Buffer(torch.zeros(self.spec.total, dtype=torch.float32))

    def forward(self, hidden_states, replay_ids=None):
        x = hidden_states.reshape(-1, self.hidden_dim)
        logits = nn.functional.linear(x.float(), self.weight.float())  # router in fp32
        r = route(logits, self.spec, getattr(self, "e_score_correction_bias", None), replay_ids)
        return logits, r.weights, r.ids


class ZeroExpertQwen3Router(_ZeroExpertRouterMixin, Qwen3MoeTopKRouter):
    def __init__(self, config):
        super().__init__(config)
        self._widen(config)


class ZeroExpertGlmRouter(_ZeroExpertRouterMixin, Glm4MoeLiteTopkRouter):
    def __init__(self, config):
        super().__init__(config)
        self._widen(config)


class _ZeroExpertBlockMixin:
    """Routes, records or replays expert ids, and sends only real (token, expert) pairs to the experts.

    The experts module runs the model's experts implementation: "zeda_skip" (the default of the
    zero-expert models, `zeda_rl.skip`) drops every id >= N before computing anything; the stock
    "grouped_mm" / "eager" get zero slots as the sentinel N with weight 0 and skip them themselves.
    """

    def _setup(self, config):
        # A plain attribute, not a buffer: from_pretrained builds modules on the meta device and
        # would leave a non-persistent buffer uninitialised.
        n = self.spec.num_experts
        self.copy_slots = [n + i for i, t in enumerate(config.zce_slots()) if t == "copy"]
        # The eager and grouped_mm paths skip sentinel ids >= N and, with this flag, zero their rows
        # (batched_mm clamps them onto a real expert instead: refused in _routed_experts).
        self.experts._is_expert_parallel = True
        self.record: list[torch.Tensor] | None = None
        self.replay: torch.Tensor | None = None  # [B, S_total, K], consumed call by call (KV-cache friendly)
        self.replay_pos = 0

    @property
    def spec(self) -> RouterSpec:
        return self.gate.spec

    def _routed_experts(self, x: torch.Tensor, batch: int, seq: int) -> torch.Tensor:
        replay_ids = None
        if self.replay is not None:
            if self.replay.shape[0] != batch or self.replay_pos + seq > self.replay.shape[1]:
                raise ValueError(
                    f"routing replay: ids of shape {tuple(self.replay.shape)} (position {self.replay_pos}) "
                    f"do not cover a forward of batch {batch} x {seq} tokens"
                )
            replay_ids = self.replay[:, self.replay_pos : self.replay_pos + seq].reshape(-1, self.spec.top_k)
            self.replay_pos += seq
        _, weights, ids = self.gate(x, replay_ids)
        if self.record is not None:
            self.record.append(ids.detach().reshape(batch, seq, -1))
        n = self.spec.num_experts
        impl = getattr(self.experts.config, "_experts_implementation", None)
        if impl == "batched_mm":  # it clamps the skip id onto a real expert and multiplies by 0: nothing skipped
            raise ValueError(
                f"experts_implementation 'batched_mm' computes zero-expert slots; use '{skip.NAME}', 'grouped_mm' or 'eager'"
            )
        zero = ids >= n
        out = self.experts(x, ids.masked_fill(zero, n), weights.masked_fill(zero, 0.0).to(x.dtype))
        if self.copy_slots:
            copy = torch.isin(ids, torch.tensor(self.copy_slots, device=ids.device))
            if bool(copy.any()):
                out = out + (weights * copy).sum(-1, keepdim=True).to(x.dtype) * x
        return out


class Qwen3MoePlusPlusSparseMoeBlock(_ZeroExpertBlockMixin, Qwen3MoeSparseMoeBlock):
    def __init__(self, config):
        super().__init__(config)
        self.gate = ZeroExpertQwen3Router(config)
        self._setup(config)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        b, s, h = hidden_states.shape
        return self._routed_experts(hidden_states.reshape(-1, h), b, s).reshape(b, s, h)


class Glm4MoeLitePlusPlusMoE(_ZeroExpertBlockMixin, Glm4MoeLiteMoE):
    def __init__(self, config):
        super().__init__(config)
        self.gate = ZeroExpertGlmRouter(config)
        self._setup(config)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        b, s, h = hidden_states.shape
        out = self._routed_experts(hidden_states.reshape(-1, h), b, s).reshape(b, s, h)
        return out + self.shared_experts(hidden_states)


def _swap_blocks(model: nn.Module, stock: type, zero_block: type, config) -> None:
    for layer in model.model.layers:
        if type(layer.mlp) is stock:
            layer.mlp = zero_block(config)


def _default_skipping(config) -> None:
    """The skipping experts path unless the caller asked for an implementation (None: not asked;
    transformers would resolve it to grouped_mm in the model's __init__)."""
    if config._experts_implementation is None:
        config._experts_implementation = skip.NAME


class Qwen3MoePlusPlusForCausalLM(Qwen3MoeForCausalLM):
    config_class = Qwen3MoePlusPlusConfig
    # transformers decides this by grepping the class's module source for its experts decorator;
    # our experts are the stock (decorated) ones, so say it, or the kernel would depend on import order
    _can_set_experts_implementation_cached_value = True

    def __init__(self, config):
        _default_skipping(config)
        super().__init__(config)
        _swap_blocks(self, Qwen3MoeSparseMoeBlock, Qwen3MoePlusPlusSparseMoeBlock, config)
        self.post_init()


class Glm4MoeLitePlusPlusForCausalLM(Glm4MoeLiteForCausalLM):
    config_class = Glm4MoeLitePlusPlusConfig
    _can_set_experts_implementation_cached_value = True  # see Qwen3MoePlusPlusForCausalLM

    def __init__(self, config):
        _default_skipping(config)
        super().__init__(config)
        _swap_blocks(self, Glm4MoeLiteMoE, Glm4MoeLitePlusPlusMoE, config)
        self.post_init()


def register() -> None:
    """Make AutoConfig / AutoModelForCausalLM load converted checkpoints (idempotent).

    Both layouts load: the released one (stock model_type, `*PlusPlus` architecture, zce_*
    keys), through a dispatching entry for the stock model_type, and our earlier one (its own
    model_type). The checkpoint-conversion mapping is registered too: transformers fuses the
    per-expert HF tensors into its grouped expert parameters by model_type, and our model
    types must inherit the stock families' rules or the expert weights would silently not load.
    """
    from transformers.conversion_mapping import (
        get_checkpoint_conversion_mapping,
        register_checkpoint_conversion_mapping,
    )

    for cfg, model, stock_cfg in (
        (Qwen3MoePlusPlusConfig, Qwen3MoePlusPlusForCausalLM, Qwen3MoeConfig),
        (Glm4MoeLitePlusPlusConfig, Glm4MoeLitePlusPlusForCausalLM, Glm4MoeLiteConfig),
    ):
        stock = stock_cfg.model_type
        AutoConfig.register(cfg.model_type, cfg, exist_ok=True)
        AutoModelForCausalLM.register(cfg, model, exist_ok=True)
        if not getattr(CONFIG_MAPPING[stock], "_zeda_dispatch", False):
            dispatch = _dispatching(stock_cfg, cfg)
            dispatch._zeda_dispatch = True
            AutoConfig.register(stock, dispatch, exist_ok=True)
        if get_checkpoint_conversion_mapping(cfg.model_type) is None:
            mapping = get_checkpoint_conversion_mapping(stock)
            if mapping is not None:
                register_checkpoint_conversion_mapping(cfg.model_type, mapping)


# ---- routing record / replay over a whole model -------------------------------------------------


def moe_blocks(model: nn.Module) -> list[_ZeroExpertBlockMixin]:
    """The zero-expert MoE blocks of a model, in layer order."""
    return [m for m in model.modules() if isinstance(m, _ZeroExpertBlockMixin)]


@contextmanager
def record_routing(model: nn.Module):
    """Record the chosen slot ids of every MoE layer: `rec()` gives [B, S, L, K] over all calls."""
    records = []
    for blk in moe_blocks(model):
        blk.record = []
        records.append(blk.record)

    def ids() -> torch.Tensor:
        return torch.stack([torch.cat(r, dim=1) for r in records], dim=2)

    try:
        yield ids
    finally:
        for blk in moe_blocks(model):
            blk.record = None


@contextmanager
def replay_routing(model: nn.Module, ids: torch.Tensor):
    """Force the slot ids [B, S, L, K] (routing replay); weights are still the router's."""
    blocks = moe_blocks(model)
    if ids.dim() != 4 or ids.shape[2] != len(blocks):
        raise ValueError(
            f"routing replay: ids of shape {list(ids.shape)}, expected [B, S, {len(blocks)} MoE layers, K]"
        )
    for i, blk in enumerate(blocks):
        blk.replay, blk.replay_pos = ids[:, :, i], 0
    try:
        yield
    finally:
        for blk in blocks:
            blk.replay, blk.replay_pos = None, 0


def set_zce_mask(model: nn.Module, on: bool) -> None:
    """Switch use_zce_mask on a loaded model (on: exactly the original static model)."""
    model.config.use_zce_mask = on
    for blk in moe_blocks(model):
        blk.gate.spec = dataclasses.replace(blk.gate.spec, mask_zero=on)


def set_baseline_options(
    model: nn.Module, skip_threshold: float | None = None, static_top_k: int | None = None
) -> None:
    """Turn a loaded zero-expert model into a baseline without a second model class: Dynamic
    Skipping (`skip_threshold`) or a static top-k' (`static_top_k`, NET); None or 0 switches one off.

    With use_zce_mask on, the model is the original one, so this is the training-free baseline
    applied to the teacher. The options travel in the config (save_pretrained writes them), so
    every engine and the learner, which build their routers with `router_spec`, route the same way.
    """
    for key, value in (("skip_threshold", skip_threshold), ("static_top_k", static_top_k)):
        if value:
            setattr(model.config, key, value)
        elif hasattr(model.config, key):
            delattr(model.config, key)
    for blk in moe_blocks(model):
        spec = router_spec(model.config)
        if spec.static_top_k and not 1 <= spec.static_top_k <= spec.top_k:
            raise ValueError(f"static_top_k {spec.static_top_k} must be between 1 and top_k {spec.top_k}")
        blk.gate.spec = dataclasses.replace(spec, mask_zero=blk.gate.spec.mask_zero)
