"""Per-architecture knowledge, in one table.

Everything the converter and the model need to know about a source MoE family lives
in one `ArchSpec` row: which config fields hold the expert counts, which tensor names
are routers (and correction biases), how routing is scored, and which layers are MoE.
Adding Mixtral, DeepSeek-V3 or OLMoE means adding one row here (plus, for the model,
a subclass of its transformers MoE block).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Literal


def _qwen3_moe_layers(cfg: dict) -> list[int]:
    n_layers = int(cfg["num_hidden_layers"])
    if int(cfg.get("num_experts") or cfg.get("num_local_experts") or 0) <= 0:
        return []
    step = int(cfg.get("decoder_sparse_step") or 1)
    dense = set(cfg.get("mlp_only_layers") or [])
    return [i for i in range(n_layers) if i not in dense and (i + 1) % step == 0]


def _glm4_moe_lite_layers(cfg: dict) -> list[int]:
    n_layers = int(cfg["num_hidden_layers"])
    if int(cfg.get("n_routed_experts") or 0) <= 0:
        return []
    types = cfg.get("mlp_layer_types") or (["dense"] + ["sparse"] * (n_layers - 1))
    return [i for i, t in enumerate(types[:n_layers]) if t == "sparse"]


@dataclass(frozen=True)
class ArchSpec:
    source: str  # architectures[0] of the static checkpoint
    target: str  # architectures[0] of the converted (zero-expert) checkpoint
    source_model_type: str
    target_model_type: str
    router: Literal["softmax", "sigmoid"]
    num_experts_key: str  # config field holding N (real experts)
    router_weight: re.Pattern  # matches router weights [N, H]; group 1 = layer index
    router_bias: re.Pattern | None  # matches correction biases [N]; group 1 = layer index
    moe_layers: Callable[[dict], list[int]]
    # Other names the same field is saved under (transformers 5 writes Qwen3-MoE's as num_local_experts).
    num_experts_aliases: tuple[str, ...] = ()

    def num_experts(self, cfg: dict) -> int:
        """N from a raw config dict, whichever of the known names it is saved under (0 if absent)."""
        for key in (self.num_experts_key, *self.num_experts_aliases):
            if cfg.get(key) is not None:
                return int(cfg[key])
        return 0


ARCHS: dict[str, ArchSpec] = {
    spec.source: spec
    for spec in (
        ArchSpec(
            source="Qwen3MoeForCausalLM",
            target="Qwen3MoePlusPlusForCausalLM",
            source_model_type="qwen3_moe",
            target_model_type="qwen3_moe_plus_plus",
            router="softmax",
            num_experts_key="num_experts",
            router_weight=re.compile(r"^model\.layers\.(\d+)\.mlp\.gate\.weight$"),
            router_bias=None,
            moe_layers=_qwen3_moe_layers,
            num_experts_aliases=("num_local_experts",),
        ),
        ArchSpec(
            source="Glm4MoeLiteForCausalLM",
            target="Glm4MoeLitePlusPlusForCausalLM",
            source_model_type="glm4_moe_lite",
            target_model_type="glm4_moe_lite_plus_plus",
            router="sigmoid",
            num_experts_key="n_routed_experts",
            # also matches the multi-token-prediction layer (index num_hidden_layers), which is widened too
            router_weight=re.compile(r"^model\.layers\.(\d+)\.mlp\.gate\.weight$"),
            router_bias=re.compile(r"^model\.layers\.(\d+)\.mlp\.gate\.e_score_correction_bias$"),
            moe_layers=_glm4_moe_lite_layers,
        ),
    )
}
TARGETS: dict[str, ArchSpec] = {spec.target: spec for spec in ARCHS.values()}


def spec_for(config: dict, where: str = "config.json") -> ArchSpec:
    """The row for a static (source) config; clear error naming the supported ones."""
    archs = config.get("architectures") or []
    if not archs:
        raise ValueError(f"{where}: no 'architectures' entry; expected one of {sorted(ARCHS)}")
    name = archs[0]
    if name in TARGETS:
        raise ValueError(f"{where}: architecture {name!r} is already a converted (zero-expert) checkpoint")
    if name not in ARCHS:
        raise ValueError(f"{where}: unsupported architecture {name!r}; supported: {sorted(ARCHS)}")
    return ARCHS[name]
