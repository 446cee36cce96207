"""The learner's model: a Megatron-core GPTModel of a converted (zero-expert) HF checkpoint.

Pieces, one module each: `learner.megatron_config` (the HF config in Megatron's terms,
`ModelInfo`), `learner.layer_specs` (local specs with our norms, router and core attention),
`learner.router` (the zero-expert router, routing replay and records). This module puts them
together (`build_model`) and runs the model on [B, S] token ids (`forward_logits`). Weights come
from the bridge (`learner.bridge.load_hf`); `recompute` is Megatron's (`megatron_config.RECOMPUTE`).

Tensor parallelism (`tp_size` > 1) is stock Megatron with sequence parallelism: column/row-parallel
linears, a vocab-parallel embedding and output layer (the vocabulary padded to a multiple of TP
when it is not one), experts whole on their EP rank (expert TP = 1). Sequence parallelism splits
the sequence evenly over the TP ranks, so `forward_logits` pads it on the right to a multiple of
TP (padding flagged, so it carries no loss and no L_GA) and trims it again on the way out.
"""

from __future__ import annotations

import torch

from learner import cpu_shims

cpu_shims.apply()

from megatron.core.models.gpt.gpt_model import GPTModel  # noqa: E402
from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region  # noqa: E402

from learner.layer_specs import block_spec  # noqa: E402
from learner.megatron_config import ModelInfo, padded_vocab, recompute_config, rope_theta, transformer_config  # noqa: E402


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
    `recompute` / `attention`: the `learner:` knobs of those names (see `megatron_config.RECOMPUTE`, `layer_specs.core_attention`).
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
        rotary_base=rope_theta(c),
    )
    model.zeda_info = info
    return model


def forward_logits(
    model: GPTModel, tokens: torch.Tensor, padding_mask: torch.Tensor | None = None, gather: bool = True
) -> torch.Tensor:
    """Logits [B, S, V] for token ids [B, S] (causal; right padding only, flagged True in padding_mask).

    Under TP, `gather=False` gives this rank's vocab-parallel slice [B, S, V_padded / TP] instead
    (`learner.tp_logprob` takes it); the gathered logits have the padding columns cut off.
    """
    b, s = tokens.shape
    tp = int(model.config.tensor_model_parallel_size)
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


def is_expert_param(name: str) -> bool:
    """Parameters sharded over expert-parallel ranks (each rank holds N/EP experts)."""
    return ".mlp.experts." in name
