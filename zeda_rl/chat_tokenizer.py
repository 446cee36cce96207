"""A real-style tokenizer for tests of the real-model path: byte-level BPE plus a Qwen3-style chat template.

The embedded teacher's character tokenizer has no chat template, so it cannot show
that prompts, rollouts and SFT records go through `apply_chat_template` the way they
do for Qwen3-30B-A3B. This one can: it is trained with `tokenizers` (byte-level BPE,
so any text encodes, as with the real vocabularies) on a small built-in corpus, has the
Qwen3 special tokens (`<|im_start|>`, `<|im_end|>` as end of turn, `<think>`), and a
template in the Qwen3 style, including `enable_thinking` and the thinking block of the
last assistant turn. Deterministic, offline, a fraction of a second.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

PAD, IM_START, IM_END, THINK, END_THINK = "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"
SPECIALS = (PAD, IM_START, IM_END, THINK, END_THINK)
VOCAB_SIZE = 512

# Qwen3's template, reduced to what matters here: system/user/assistant turns, a generation
# prompt, `enable_thinking=False` writing an empty thinking block, and earlier assistant turns
# losing their thinking (only the last assistant turn keeps it), as Qwen3's own does.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- set content = message['content'] -%}"
    "{%- if message['role'] == 'assistant' and not loop.last and '</think>' in content -%}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') -%}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>' + '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}"
    "{{- '<think>\\n\\n</think>\\n\\n' -}}"
    "{%- endif -%}"
    "{%- endif -%}"
)


def _corpus() -> list[str]:
    from zeda_rl.tasks import FAMILIES, make_split

    words = (
        "the a of to and in is that for it as with was on be by this are or from at which an have not they you "
        "solve compute answer question number sum product reverse sort pattern string list value result step "
        "def return print if else for while import class self true false none math code write function test "
        "user assistant system think reasoning final boxed please explain briefly respond words sentence"
    ).split()
    lines = [" ".join(words[i : i + 7]) for i in range(0, len(words), 3)]
    lines += [e.prompt + e.answer for e in make_split("train", 50, seed=0)]
    lines += ["What is 12 + 34? The answer is \\boxed{46}.", "def add(a, b):\n    return a + b\n", f"{FAMILIES}"]
    return lines * 4


def build_chat_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        eos_token=IM_END,
        padding_side="left",
        model_max_length=512,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def save_chat_tokenizer(out: str | Path) -> PreTrainedTokenizerFast:
    tok = build_chat_tokenizer()
    tok.save_pretrained(str(out))
    return tok


def save_tiny_chat_checkpoint(
    out: str | Path, family: str = "qwen3_moe", seed: int = 0, stop_logit: float | None = None, **overrides
) -> Path:
    """A random tiny static MoE of `family` with this tokenizer, in HF format (a stand-in for a hub download).

    A random model almost never samples its end-of-turn token, so every answer would run to the
    token cap (and SFT rightly drops those). `stop_logit` makes it stop like a chat model: hidden
    dimension 0 of every embedding is set to a positive constant (about as large as the other
    dimensions together, so routing still differs from token to token), and the eos row of the
    output head reads only that dimension, scaled to give eos a logit of about `stop_logit`.
    """
    import torch
    from transformers import Glm4MoeLiteForCausalLM, Qwen3MoeForCausalLM

    from zeda_rl.tiny import tiny_glm4_moe_lite_config, tiny_qwen3_moe_config

    make, cls = {
        "qwen3_moe": (tiny_qwen3_moe_config, Qwen3MoeForCausalLM),
        "glm4_moe_lite": (tiny_glm4_moe_lite_config, Glm4MoeLiteForCausalLM),
    }[family]
    out = Path(out)
    tok = build_chat_tokenizer()
    ids = dict(pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None)
    g = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = cls(make(**{"vocab_size": len(tok), "max_position_embeddings": 512, **ids, **overrides})).eval()
        with torch.no_grad():
            for layer in model.model.layers:  # a non-trivial correction bias, as in the real GLM
                bias = getattr(getattr(layer.mlp, "gate", None), "e_score_correction_bias", None)
                if bias is not None:
                    bias.normal_(0, 0.1)
            if stop_logit is not None:
                h, sigma = model.config.hidden_size, model.config.initializer_range
                c = 5 * sigma  # about as large as the rest of the embedding together: routing still varies by token
                model.model.embed_tokens.weight[:, 0] = c
                head = model.lm_head.weight
                head[tok.eos_token_id] = 0.0
                head[tok.eos_token_id, 0] = stop_logit / (c / ((c * c + (h - 1) * sigma * sigma) / h) ** 0.5)
        model.save_pretrained(out)
    finally:
        torch.random.set_rng_state(g)
    tok.save_pretrained(str(out))
    return out
