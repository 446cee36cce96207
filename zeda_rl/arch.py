"""Per-architecture knowledge, in one table.

Everything the converter and the model need to know about a source MoE family lives
in one `ArchSpec` row: which config fields hold the expert counts, which tensor names
are routers (and correction biases), how routing is scored, and which layers are MoE.
Adding Mixtral, DeepSeek-V3 or OLMoE means adding one row here (plus, for the model,
a subclass of its transformers MoE block).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
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


# Where any MoE config keeps N, for an architecture the table does not know (Mixtral, DeepSeek, OLMoE).
_EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")
_JSON_KINDS = {list: "array", str: "string", int: "number", float: "number", bool: "boolean", type(None): "null"}


def read_config(checkpoint_dir) -> dict:
    """A checkpoint directory's config.json, checked before anything loads weights by it.

    The one reader of config.json that `zeda convert`, `zeda eval`, the router checks (and so the
    learner's loader and the engines), `zeda plan` and the baselines share. Refused, naming the file
    and what was expected: no config.json (FileNotFoundError), a file that is not JSON text, JSON that
    is not an object, and a MoE whose experts per token (`num_experts_per_tok`) is not between 1 and its
    expert count (transformers would fail inside routing with an index error, or route every token nowhere).
    """
    d = Path(checkpoint_dir)
    if not (d / "config.json").is_file():
        raise FileNotFoundError(f"{d}: not a checkpoint directory (no config.json; expected a Hugging Face checkpoint)")
    return read_config_file(d / "config.json")


def read_config_file(path) -> dict:
    """`read_config` for a config file given by its own path (`zeda plan --hf-config FILE`)."""
    path = Path(path)
    try:
        cfg = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err}); expected a Hugging Face model config") from None
    if not isinstance(cfg, dict):
        kind = _JSON_KINDS.get(type(cfg), type(cfg).__name__)
        raise ValueError(
            f'{path}: expected a JSON object (a Hugging Face model config, {{"architectures": [...], ...}}), '
            f"got a JSON {kind}"
        )
    check_experts_per_token(cfg, str(path))
    return cfg


def check_experts_per_token(cfg: dict, where: str = "config.json") -> None:
    """Refuse an expert count that is no whole number, or experts per token outside 1..N (N > 0: a MoE)."""
    archs, model_type = cfg.get("architectures"), cfg.get("model_type")
    name = archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else None
    legacy = {s.target_model_type: s for s in ARCHS.values()}.get(model_type) if isinstance(model_type, str) else None
    spec = TARGETS.get(name) or ARCHS.get(name) or legacy
    keys = (spec.num_experts_key, *spec.num_experts_aliases) if spec else _EXPERT_KEYS
    key = next((k for k in keys if cfg.get(k) is not None), None)
    if key is None:
        return  # a dense model, or one that keeps N elsewhere: nothing to check
    n = cfg[key]
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"{where}: {key}={n!r}; expected a whole number of experts per MoE layer (>= 0)")
    k = cfg.get("num_experts_per_tok")
    if n == 0 or k is None:
        return  # no MoE layers; or K left to the config class's default
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise ValueError(
            f"{where}: num_experts_per_tok={k!r} with {key}={n}; expected 1 <= num_experts_per_tok <= {key} "
            f"(each token is routed to num_experts_per_tok of the {n} real experts)"
        )
