"""Rollout speed: the `torch` engine against transformers' own `generate`, same model, same prompts.

The engine does more per token than `generate` (it records behaviour logprobs and the
routed expert ids of every token for routing replay), so the ratio is the price of that
bookkeeping plus whatever its simpler KV-cache loop saves. Both run greedily to a fixed
length (no stop token) so they produce the same number of tokens; the two are
interleaved in one run so machine noise hits both alike.

    python bench/rollout.py [--checkpoint DIR] [--batch 32] [--new 24] [--repeats 5]

Without --checkpoint it converts a random Qwen3-MoE of the embedded teacher's shape
(N_Z = N/2) into a temporary directory.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def _default_checkpoint(tmp: Path, experts: int) -> Path:
    from transformers import Qwen3MoeForCausalLM

    from zeda_rl.convert import convert_checkpoint
    from zeda_rl.tiny import tiny_qwen3_moe_config

    torch.manual_seed(0)
    cfg = tiny_qwen3_moe_config(
        vocab_size=64, hidden_size=128, moe_intermediate_size=64, num_hidden_layers=4, num_experts=experts
    )
    Qwen3MoeForCausalLM(cfg).save_pretrained(tmp / "static")
    return convert_checkpoint(tmp / "static", tmp / "student", zero_experts=experts // 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=12)
    ap.add_argument("--new", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--experts", type=int, default=8)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    from actors.torch_engine import TorchEngine
    from zeda_rl.sampling import SamplingParams

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(a.checkpoint) if a.checkpoint else _default_checkpoint(Path(tmp), a.experts)
        engine = TorchEngine(ckpt)
        model = engine.model  # the very same weights for both
        vocab = model.config.vocab_size
        g = torch.Generator().manual_seed(0)
        prompts = torch.randint(3, vocab, (a.batch, a.prompt_len), generator=g)
        params = SamplingParams(temperature=0.0, max_new_tokens=a.new, stop_token_ids=())

        def run_engine() -> int:
            return sum(len(s.output_ids) for s in engine.generate(prompts.tolist(), params))

        @torch.no_grad()
        def run_hf() -> int:
            out = model.generate(
                input_ids=prompts,
                attention_mask=torch.ones_like(prompts),
                do_sample=False,
                max_new_tokens=a.new,
                min_new_tokens=a.new,
                pad_token_id=0,
                eos_token_id=None,
            )
            return int(out[:, a.prompt_len :].numel())

        run_engine(), run_hf()  # warm-up
        times = {"engine": [], "hf": []}
        tokens = {}
        for _ in range(a.repeats):
            for name, fn in (("engine", run_engine), ("hf", run_hf)):
                t0 = time.perf_counter()
                tokens[name] = fn()
                times[name].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        tps = {k: tokens[k] / med[k] for k in med}
        print(f"checkpoint {ckpt.name}: batch {a.batch}, prompt {a.prompt_len}, new {a.new}, threads {a.threads}")
        print(
            f"torch engine      : {tps['engine']:9.1f} tok/s  (median {med['engine'] * 1e3:.1f} ms, with logprobs + routed experts)"
        )
        print(f"transformers gen. : {tps['hf']:9.1f} tok/s  (median {med['hf'] * 1e3:.1f} ms)")
        print(f"engine / transformers throughput ratio: {tps['engine'] / tps['hf']:.2f}")


if __name__ == "__main__":
    main()
