"""Zero-expert routing in the form SGLang's fused MoE kernel takes, as pure torch functions.

Why its own module: the SGLang plugin (`models`) cannot be imported without SGLang and a
GPU, but the part that decides which work the kernel skips must be tested on CPU against
`zeda_rl.routing.route`, the single definition of "which expert does this token use".

The contract with SGLang's Triton fused MoE kernel: a (token, slot) pair with expert id
-1 lands in blocks that the kernel fills with zeros without reading any expert weight, so
both GEMMs are really skipped. Zero slots therefore become id -1 with weight 0 (the weight
is not needed: the kernel writes zeros, but 0 keeps any other combine path exact). Real
slots keep the router's weight unchanged: no renormalisation after dropping zero slots.
No function here synchronises with the host, so all of it can be captured in CUDA graphs.
"""

from __future__ import annotations

import torch

from zeda_rl.arch import TARGETS
from zeda_rl.release import ZCE_KEYS
from zeda_rl.routing import RouterSpec, route

SKIP_ID = -1  # the only expert id SGLang's Triton fused MoE kernel skips


def router_spec_from_config(config) -> RouterSpec | None:
    """The routing rule of a converted checkpoint's config (an HF config object or a dict).

    Reads the same fields as `zeda_rl.modeling.router_spec` (a `*PlusPlus` config must name all
    three zce keys, as there), but
    works on the stock config classes SGLang loads (the zce_* fields ride along as extra
    attributes). Returns None for a static checkpoint (no zero experts).
    """

    def get(key, default=None):
        value = config.get(key) if isinstance(config, dict) else getattr(config, key, None)
        return default if value is None else value

    archs = list(get("architectures", []))
    if archs and archs[0] in TARGETS:  # a released-layout config: no key may fall back to a default
        for key in ZCE_KEYS:
            if get(key) is None:
                raise ValueError(f"config: architecture {archs[0]!r} needs {key!r}; expected all of {list(ZCE_KEYS)}")
    nums = [int(n) for n in get("zce_nums", [])]
    if not sum(nums):
        return None
    types = list(get("zce_types", ["zero"] * len(nums)))
    if len(types) != len(nums):
        raise ValueError(f"config: zce_nums {nums} and zce_types {types} must have the same length")
    if any(t != "zero" for t in types):
        raise ValueError(
            f"config: zce_types {types}: the SGLang plugin serves only 'zero' experts; a 'copy' expert "
            "(output = input) is not something the fused MoE kernel can skip"
        )
    mask = bool(get("use_zce_mask", True))  # the released config class defaults to the mask on
    if get("n_routed_experts") is not None:  # GLM-4.7-Flash / DeepSeek-V3 style
        return RouterSpec(
            family="sigmoid",
            num_experts=int(get("n_routed_experts")),
            num_zero=sum(nums),
            top_k=int(get("num_experts_per_tok")),
            norm_topk_prob=bool(get("norm_topk_prob", True)),
            scaling=float(get("routed_scaling_factor", 1.0)),
            n_group=int(get("n_group", 1)),
            topk_group=int(get("topk_group", 1)),
            mask_zero=mask,
        )
    return RouterSpec(
        family="softmax",
        num_experts=int(get("num_experts", get("num_local_experts", 0))),
        num_zero=sum(nums),
        top_k=int(get("num_experts_per_tok")),
        norm_topk_prob=bool(get("norm_topk_prob", False)),  # transformers' Qwen3MoeConfig default
        mask_zero=mask,
    )


def select(
    logits: torch.Tensor,
    spec: RouterSpec,
    bias: torch.Tensor | None = None,
    scaling_in_weights: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights float32 [T, K], slot ids int64 [T, K]) from router logits [T, N+N_Z].

    The choice is `route()`'s. `scaling_in_weights=False` follows SGLang's convention for
    models whose routed scaling factor is applied after the experts (in the combine step
    or the model's forward): the weights are then returned without the factor, exactly
    as the stock TopK would, so the model applies it once.
    """
    r = route(logits.float(), spec, bias)
    weights = r.weights
    if spec.family == "sigmoid" and not scaling_in_weights and spec.scaling != 1.0:
        weights = weights / spec.scaling
    return weights, r.ids


def to_kernel_slots(weights: torch.Tensor, ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero slots (ids >= N) -> id -1, weight 0; real slots untouched. Returns (float32, int32)."""
    zero = ids >= num_experts
    return weights.masked_fill(zero, 0.0).float(), ids.masked_fill(zero, SKIP_ID).to(torch.int32)


def mask_padded_rows(
    weights: torch.Tensor, ids: torch.Tensor, num_token_non_padded: torch.Tensor | int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows past `num_token_non_padded` (CUDA-graph padding) skip every slot, as SGLang's TopK does."""
    rows = torch.arange(ids.shape[0], device=ids.device)
    if isinstance(num_token_non_padded, torch.Tensor):
        num_token_non_padded = num_token_non_padded.to(ids.device)
    pad = (rows >= num_token_non_padded)[:, None]
    return weights.masked_fill(pad, 0.0), ids.masked_fill(pad, SKIP_ID)
