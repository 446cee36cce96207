"""A character-level tokenizer for the task suite, built with the `tokenizers` library.

One token per character keeps the tiny teacher's job about the tasks, not about
segmentation, and the vocabulary is exactly 64 ids so it matches the model's embedding.
It is saved as a standard tokenizer.json so AutoTokenizer loads it with no custom code.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIALS = ("<pad>", "<eos>", "<unk>")  # ids 0, 1, 2
CHARS = "0123456789abcdefghijklmnopqrstuvwxyz+-*=:.,;?!()[]<>/|_#@$%& "
VOCAB_SIZE = len(SPECIALS) + len(CHARS)
assert VOCAB_SIZE == 64 and len(set(CHARS)) == len(CHARS)


def build_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {t: i for i, t in enumerate((*SPECIALS, *CHARS))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # every character, spaces included
    tok.decoder = decoders.Fuse()  # no spaces inserted between characters
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="<eos>",
        unk_token="<unk>",
        padding_side="left",
        model_max_length=64,
    )


def save_tokenizer(out: str | Path) -> PreTrainedTokenizerFast:
    tok = build_tokenizer()
    tok.save_pretrained(str(out))
    return tok
