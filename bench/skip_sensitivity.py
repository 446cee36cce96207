"""How much does skipping half the expert slots with no training cost a static teacher?

ZEDA is worth its training only where the cheap ways to skip half the experts hurt. This
measures two of them on a static Qwen3-MoE checkpoint (the embedded teacher) over held-out
prompts of a built-in task suite, with greedy decoding:

- `half`: static half-K, every token keeps its K/2 highest-weighted slots of its top-K
  (top-1 of top-2, top-2 of top-4), the rest are skipped;
- `random`: each selected slot is skipped with probability 1/2, independently (a token may
  keep none), from a seeded generator.

Skipped slots get weight 0, which gives the same output as not computing them. The kept
weights are used as they are (`as-is`, what ZEDA's zero experts do to the real slots) or
rescaled to the total of all K slots (`renorm`: 1 for Qwen3-MoE, the routed scaling factor for
GLM-4.7-Flash); both are reported. The hook sits on the router's
output, so it works on the unmodified transformers model and needs nothing from
zeda_rl.modeling (whose formal NET / Dynamic Skipping baselines are a separate option).

    .venv/bin/python -m bench.skip_sensitivity [--tasks hard] [--checkpoint DIR] [--n 500]

prints one JSON object: accuracy per family and mean per mode, and the measured skipped share.
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import contextmanager

import torch

MODES = ("none", "half", "random")


def routers(model) -> list[torch.nn.Module]:
    """The top-K routers of a static Qwen3-MoE or GLM-4.7-Flash (Qwen3MoeTopKRouter, Glm4MoeLiteTopkRouter)."""
    out = [m for m in model.modules() if type(m).__name__.lower().endswith("topkrouter") and hasattr(m, "top_k")]
    if not out:
        raise ValueError(
            "no top-K router found: expected a static Qwen3-MoE or GLM-4.7-Flash checkpoint "
            "(the teacher, not a converted one)"
        )
    return out


@contextmanager
def skipping(model, mode: str, renorm: bool = False, seed: int = 0):
    """Within the block every router's selected slots are skipped per `mode`; yields a dict that counts
    (skipped, routed) slots so the realised share is reported, not assumed."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} unknown; expected one of {MODES}")
    gen = torch.Generator().manual_seed(seed)
    count = {"skipped": 0, "routed": 0}

    def hook(module, args, output):
        logits, weights, idx = output
        if mode == "none":
            keep = torch.ones_like(weights, dtype=torch.bool)
        elif mode == "half":
            k = max(weights.shape[-1] // 2, 1)
            top = weights.topk(k, dim=-1).indices
            keep = torch.zeros_like(weights, dtype=torch.bool).scatter_(-1, top, True)
        else:
            keep = torch.rand(weights.shape, generator=gen) >= 0.5
        w = weights * keep
        if renorm:  # back to the full slots' total (1 for Qwen3-MoE, routed_scaling_factor for GLM)
            w = w * (weights.sum(-1, keepdim=True) / w.sum(-1, keepdim=True).clamp_min(1e-20))
        count["skipped"] += int((~keep).sum())
        count["routed"] += keep.numel()
        return logits, w.to(weights.dtype), idx

    handles = [r.register_forward_hook(hook) for r in routers(model)]
    try:
        yield count
    finally:
        for h in handles:
            h.remove()


def measure(
    model, tokenizer, examples, modes=MODES, renorms=(False, True), seed: int = 0, batch_size: int = 64
) -> dict:
    """Accuracy per family (and mean) and the skipped share, for every (mode, renorm) asked for."""
    from zeda_rl.generate import accuracy

    out = {}
    for mode in modes:
        for renorm in (False,) if mode == "none" else renorms:
            t0 = time.time()
            with skipping(model, mode, renorm, seed) as count:
                acc = accuracy(model, tokenizer, examples, batch_size=batch_size)
            name = mode if mode == "none" else f"{mode}/{'renorm' if renorm else 'as-is'}"
            out[name] = {
                "accuracy": acc,
                "skipped_share": count["skipped"] / max(count["routed"], 1),
                "seconds": round(time.time() - t0, 1),
            }
    return out


def main(argv=None) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from zeda_rl import tasks
    from zeda_rl.teacher import build_teacher

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default="hard", choices=sorted(tasks.SUITES), help="built-in task suite")
    p.add_argument(
        "--checkpoint", default=None, help="static checkpoint (default: the suite's embedded teacher, built if missing)"
    )
    p.add_argument("--n", type=int, default=500, help="held-out prompts per family")
    p.add_argument("--seed", type=int, default=0, help="seed of the random skipping")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    ckpt = a.checkpoint or build_teacher(suite=a.tasks)
    model = AutoModelForCausalLM.from_pretrained(ckpt).eval()
    tok = AutoTokenizer.from_pretrained(ckpt)
    examples = tasks.make_split("heldout", a.n, suite=a.tasks)
    result = {
        "checkpoint": str(ckpt),
        "tasks": a.tasks,
        "n_per_family": a.n,
        "top_k": routers(model)[0].top_k,
        "num_experts": routers(model)[0].num_experts,
        "modes": measure(model, tok, examples, seed=a.seed),
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
