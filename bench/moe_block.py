"""MoE block speed: zero share forced to ~50% vs the same block with the mask on (static).

Both variants run the same converted block on the same inputs, interleaved in one run,
so machine noise hits both alike. The ideal ratio is ~0.5 plus router overhead.

    python bench/moe_block.py [--tokens 4096] [--repeats 20] [--impl grouped_mm eager]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from zeda_rl.modeling import Qwen3MoePlusPlusConfig, Qwen3MoePlusPlusSparseMoeBlock, set_zce_mask  # noqa: F401
from zeda_rl.tiny import tiny_qwen3_moe_config


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--inter", type=int, default=512)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--impl", nargs="+", default=["grouped_mm", "eager"], choices=["grouped_mm", "eager"])
    a = ap.parse_args()
    for impl in a.impl:
        bench(a, impl)


def bench(a, impl: str) -> None:
    torch.manual_seed(0)
    n, k = a.experts, a.top_k
    base = tiny_qwen3_moe_config(
        hidden_size=a.hidden, moe_intermediate_size=a.inter, num_experts=n, num_experts_per_tok=k
    ).to_dict()
    base.pop("model_type")
    cfg = Qwen3MoePlusPlusConfig(**base, zce_nums=[n // 2], zce_types=["zero"], use_zce_mask=False)
    cfg._experts_implementation = impl
    block = Qwen3MoePlusPlusSparseMoeBlock(cfg).eval()
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.02)
    x = torch.randn(1, a.tokens, a.hidden)

    # ~50% zero: per token, K/2 real experts and K/2 zero slots, drawn at random (replayed routing)
    perm_real = torch.rand(a.tokens, n).argsort(-1)[:, : k - k // 2]
    perm_zero = n + torch.rand(a.tokens, n // 2).argsort(-1)[:, : k // 2]
    half = torch.cat([perm_real, perm_zero], -1).reshape(1, a.tokens, k)

    def run_dynamic():
        block.replay, block.replay_pos = half, 0
        block(x)
        block.replay = None

    def run_static():
        block.gate.spec = static_spec
        block(x)
        block.gate.spec = dyn_spec

    import dataclasses

    dyn_spec = block.gate.spec
    static_spec = dataclasses.replace(dyn_spec, mask_zero=True)
    times = {"dynamic": [], "static": []}
    with torch.no_grad():
        run_dynamic(), run_static()  # warm-up
        for _ in range(a.repeats):
            for name, fn in (("static", run_static), ("dynamic", run_dynamic)):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    s, d = statistics.median(times["static"]), statistics.median(times["dynamic"])
    print(
        f"config: tokens={a.tokens} hidden={a.hidden} inter={a.inter} N={n} N_Z={n // 2} K={k} impl={impl} threads={torch.get_num_threads()}"
    )
    print(f"static (mask on, K real experts/token): {s * 1e3:8.2f} ms (median of {a.repeats})")
    print(f"dynamic (50% zero slots)             : {d * 1e3:8.2f} ms")
    print(f"time ratio dynamic/static            : {d / s:.3f}  (ideal ~0.5 + router overhead)")


if __name__ == "__main__":
    main()
