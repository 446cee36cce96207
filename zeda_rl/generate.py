"""Greedy completion and exact-match accuracy with a plain transformers model.

Evaluation deliberately uses transformers' own `generate`, not the project's rollout
engine, so the numbers are independent of the code being trained and tested.
"""

from __future__ import annotations

import torch

from zeda_rl.chat import stop_ids
from zeda_rl.tasks import Example, score


def until_stop(row: list[int], stops, keep: bool = False) -> list[int]:
    """`row` cut at its first stop id (`keep`: that id included): what generate pads after it is not output."""
    end = next((i for i, t in enumerate(row) if t in stops), None)
    return row if end is None else row[: end + keep]


def stop_mask(new: torch.Tensor, stops) -> torch.Tensor:
    """[B, T] True for generated tokens up to and including each row's first stop id."""
    hit = torch.isin(new, torch.tensor(sorted(stops), dtype=new.dtype, device=new.device))
    return ~(torch.cumsum(hit.long(), dim=1) - hit.long() > 0)


@torch.no_grad()
def greedy_complete(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 64) -> list[str]:
    """Greedy completions (text after the prompt, cut at the first stop id) of left-padded batches.

    The stop ids are the model's (`zeda_rl.chat.stop_ids`: generation_config's and config's eos ids and the
    tokenizer's), as every engine uses: GLM-4.x ends a turn on `<|user|>`, which is not its tokenizer's eos."""
    tokenizer.padding_side = "left"
    stops, out = stop_ids(tokenizer), []
    for i in range(0, len(prompts), batch_size):
        enc = tokenizer(prompts[i : i + batch_size], return_tensors="pt", padding=True)
        gen = model.generate(
            input_ids=enc.input_ids,
            attention_mask=enc.attention_mask,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=list(stops) or None,
        )
        for row in gen[:, enc.input_ids.shape[1] :].tolist():
            out.append(tokenizer.decode(until_stop(row, stops), skip_special_tokens=True))
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
