"""Greedy completion and exact-match accuracy with a plain transformers model.

Evaluation deliberately uses transformers' own `generate`, not the project's rollout
engine, so the numbers are independent of the code being trained and tested.
"""

from __future__ import annotations

import torch

from zeda_rl.tasks import Example, score


@torch.no_grad()
def greedy_complete(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 64) -> list[str]:
    """Greedy completions (text after the prompt, cut at EOS) of left-padded batches."""
    tokenizer.padding_side = "left"
    out = []
    for i in range(0, len(prompts), batch_size):
        enc = tokenizer(prompts[i : i + batch_size], return_tensors="pt", padding=True)
        gen = model.generate(
            input_ids=enc.input_ids,
            attention_mask=enc.attention_mask,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        for row in gen[:, enc.input_ids.shape[1] :].tolist():
            if tokenizer.eos_token_id in row:
                row = row[: row.index(tokenizer.eos_token_id)]
            out.append(tokenizer.decode(row, skip_special_tokens=True))
    return out


def accuracy(model, tokenizer, examples: list[Example], batch_size: int = 64) -> dict[str, float]:
    """Exact match per family present in `examples`, plus their mean."""
    max_new = max(len(e.answer) for e in examples) + 2
    completions = greedy_complete(model, tokenizer, [e.prompt for e in examples], max_new, batch_size)
    per = {}
    for fam in dict.fromkeys(e.family for e in examples):  # any suite's families, in the examples' order
        hits = [score(e, c) for e, c in zip(examples, completions) if e.family == fam]
        if hits:
            per[fam] = sum(hits) / len(hits)
    per["mean"] = sum(per.values()) / max(len(per), 1)
    return per
