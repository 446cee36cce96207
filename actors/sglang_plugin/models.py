"""SGLang model classes for converted checkpoints: only the MoE routing changes.

The classes subclass SGLang's own Qwen3-MoE and GLM-4.7-Flash models and, after the stock
constructor has built everything, patch each sparse MoE block in three places:

- `gate`: the router grows to N+N_Z rows (and, for sigmoid routing, the correction bias
  to N+N_Z entries), so the converted `mlp.gate.weight` / `e_score_correction_bias` load
  by their usual names. The Qwen router is kept in fp32, as ZEDA trains it.
- `topk`: `ZeroSlotTopK` chooses K of N+N_Z slots with `zeda_rl.routing.route` (via
  `zero_slots.select`), records the chosen slot ids for routing replay (zero slots keep
  their ids >= N there), then hands zero slots to the experts as id -1 with weight 0.
- `experts`: the Triton runner only checks for id -1 when it believes some experts are
  remote (`filter_expert`, derived from num_experts != num_local_experts); the global
  expert count is set to N+N_Z, which is true and turns that check on. Without it, blocks
  of id -1 would index expert -1 (outside the weights) instead of being skipped.

The expert weights, attention and everything else are SGLang's, untouched. Backends and
options that cannot take id -1 (DeepEP and other a2a backends, EPLB, redundant experts,
fused shared experts, non-Triton MoE runners) are refused in `actors.sglang_engine`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from sglang.srt.layers.moe.topk import StandardTopKOutput, TopK
from sglang.srt.model_loader.weight_utils import default_weight_loader
from sglang.srt.models.qwen3_moe import Qwen3MoeForCausalLM
from torch import nn

from actors.sglang_plugin.zero_slots import mask_padded_rows, router_spec_from_config, select, to_kernel_slots

try:  # GLM-4.7-Flash has its own model file in recent SGLang releases
    from sglang.srt.models.glm4_moe_lite import Glm4MoeLiteForCausalLM
except ImportError:  # pragma: no cover - depends on the SGLang version
    Glm4MoeLiteForCausalLM = None


def _capturer_getter():
    """SGLang's routed-experts capturer getter (the module moved between 0.5.x releases)."""
    try:
        from sglang.srt.state_capturer.routed_experts import get_global_experts_capturer
    except ImportError:
        try:
            from sglang.srt.layers.moe.routed_experts_capturer import get_global_experts_capturer
        except ImportError:
            return lambda: None
    return get_global_experts_capturer


_global_capturer = _capturer_getter()  # None when capture is off (newer) or a no-op object (older)


class Fp32Router(nn.Module):
    """Router [N+N_Z, H] in fp32; returns (logits, None) like SGLang's ReplicatedLinear."""

    def __init__(self, hidden_size: int, total: int, device, weight_loader):
        super().__init__()
        self.weight = nn.Parameter(
            torch.empty(total, hidden_size, dtype=torch.float32, device=device), requires_grad=False
        )
        self.weight.weight_loader = weight_loader

    def forward(self, hidden_states: torch.Tensor):
        return F.linear(hidden_states.float(), self.weight), None


class ZeroSlotTopK(nn.Module):
    """Drop-in for SGLang's TopK: route() over N+N_Z slots, zero slots handed on as id -1."""

    def __init__(self, stock: TopK, gate: nn.Module, spec, layer_id: int | None):
        super().__init__()
        self.spec = spec
        self.layer_id = layer_id
        self.topk_config = stock.topk_config  # some MoE code paths read it
        # Follow the stock contract for the routed scaling factor (sigmoid family).
        self.scaling_in_weights = bool(getattr(stock.topk_config, "apply_routed_scaling_factor_on_output", False))
        object.__setattr__(self, "_gate", gate)  # a reference, not a submodule: parameter names stay mlp.gate.*
        if getattr(self.topk_config, "correction_bias", None) is not None:  # point it at the widened bias too
            self.topk_config.correction_bias = gate.e_score_correction_bias

    def forward(
        self, hidden_states, router_logits, *, num_token_non_padded=None, expert_location_dispatch_info=None, **_
    ):
        bias = getattr(self._gate, "e_score_correction_bias", None)
        weights, ids = select(router_logits, self.spec, bias, self.scaling_in_weights)
        cap = _global_capturer()
        if cap is not None and self.layer_id is not None:
            cap.capture(self.layer_id, ids.to(torch.int32))  # zero slots keep ids >= N for routing replay
        weights, ids = to_kernel_slots(weights, ids, self.spec.num_experts)
        if num_token_non_padded is not None:
            weights, ids = mask_padded_rows(weights, ids, num_token_non_padded)
        return StandardTopKOutput(weights, ids, router_logits)

    def empty_topk_output(self, device) -> StandardTopKOutput:
        k = self.spec.top_k
        return StandardTopKOutput(
            torch.empty((0, k), dtype=torch.float32, device=device),
            torch.full((0, k), -1, dtype=torch.int32, device=device),
            torch.empty((0, self.spec.total), dtype=torch.float32, device=device),
        )


def _widened(param: nn.Parameter, total: int) -> nn.Parameter:
    new = nn.Parameter(
        torch.empty((total, *param.shape[1:]), dtype=param.dtype, device=param.device), requires_grad=False
    )
    new.__dict__.update(param.__dict__)  # weight_loader and friends
    return new


def _widen_gate(block: nn.Module, spec) -> None:
    gate = block.gate
    if hasattr(gate, "e_score_correction_bias"):  # GLM-style gate: fp32 weight + bias, returns logits
        gate.weight = _widened(gate.weight, spec.total)
        gate.e_score_correction_bias = _widened(gate.e_score_correction_bias, spec.total)
        return
    old = gate.weight
    if tuple(old.shape) != (spec.num_experts, old.shape[1]):
        raise RuntimeError(
            f"zero-expert plugin: router weight of shape {tuple(old.shape)}, expected [{spec.num_experts}, H]"
        )
    block.gate = Fp32Router(old.shape[1], spec.total, old.device, getattr(old, "weight_loader", default_weight_loader))


def _force_skip_check(experts: nn.Module, total: int) -> None:
    """Make the Triton runner test for id -1 (its `filter_expert`), wherever it keeps its config."""
    configs = [getattr(experts, "moe_runner_config", None)]
    runner = getattr(getattr(experts, "quant_method", None), "runner", None)
    configs.append(getattr(runner, "config", None))
    for cfg in configs:
        if cfg is not None and getattr(cfg, "num_experts", None) == getattr(cfg, "num_local_experts", None):
            cfg.num_experts = total


def install_zero_experts(model: nn.Module, config) -> int:
    """Patch every sparse MoE block of a freshly built SGLang model; returns how many."""
    spec = router_spec_from_config(config)
    if spec is None:
        return 0
    blocks = [
        m
        for m in model.modules()
        if isinstance(getattr(m, "topk", None), TopK) and hasattr(m, "gate") and hasattr(m, "experts")
    ]
    if not blocks:
        raise RuntimeError(f"zero-expert plugin: no MoE block (gate/topk/experts) found in {type(model).__name__}")
    for block in blocks:
        if getattr(block, "num_fused_shared_experts", 0):
            raise ValueError(
                "zero-expert plugin: the shared expert is fused into the routed experts (it takes id N, "
                "which is a zero slot here); start SGLang with disable_shared_experts_fusion=True"
            )
        _widen_gate(block, spec)
        layer_id = getattr(block.topk, "layer_id", None)
        block.topk = ZeroSlotTopK(block.topk, block.gate, spec, getattr(block, "layer_id", layer_id))
        _force_skip_check(block.experts, spec.total)
    return len(blocks)


def _config_of(args, kwargs):
    if "config" in kwargs:
        return kwargs["config"]
    return args[0] if args else None


class Qwen3MoePlusPlusForCausalLM(Qwen3MoeForCausalLM):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        install_zero_experts(self, _config_of(args, kwargs))


EntryClass = [Qwen3MoePlusPlusForCausalLM]

if Glm4MoeLiteForCausalLM is not None:

    class Glm4MoeLitePlusPlusForCausalLM(Glm4MoeLiteForCausalLM):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            install_zero_experts(self, _config_of(args, kwargs))

    EntryClass.append(Glm4MoeLitePlusPlusForCausalLM)
