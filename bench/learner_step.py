"""Learner throughput: tokens/s and model-FLOPs utilisation of a few SFT steps.

    python bench/learner.py                         # small Qwen3-MoE, EP=2 on 2 processes (CPU: gloo, allgather)
    python bench/learner.py --family glm4_moe_lite --ep 1 --steps 6
    python bench/learner.py --checkpoint /path/to/converted --ep 8   # GPU: nccl, alltoall

Each rank is a process (torch.multiprocessing spawn; the Ray actors add nothing per
step). Model FLOPs per trained token = 6 x active parameters + 6 x attention score/value
FLOPs (q.k and p.v over the padded length, PaLM's convention, no causal discount), with
active = all dense weights + router + shared expert + lm_head + K x (1 - zero share) x
one expert (the zero share is the one measured in the step: zero slots cost nothing).
Peak: on CPU, a measured fp32 GEMM rate per process times the number of processes (so
MFU here means "of what this machine's matmul reaches"); on GPU, the datasheet dense
peak of the dtype (H100/H200 SXM: 989 TFLOP/s bf16, 67 TFLOP/s fp32). The ratio printed
is a measurement, not a test: nothing fails on a slow machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SMALL = {
    "qwen3_moe": dict(
        vocab_size=1024,
        hidden_size=256,
        intermediate_size=512,
        moe_intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=32,
        num_experts=16,
        num_experts_per_tok=4,
        max_position_embeddings=1024,
    ),
    "glm4_moe_lite": dict(
        vocab_size=1024,
        hidden_size=256,
        intermediate_size=512,
        moe_intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=8,
        n_routed_experts=16,
        num_experts_per_tok=4,
        kv_lora_rank=64,
        q_lora_rank=96,
        qk_rope_head_dim=16,
        qk_nope_head_dim=32,
        v_head_dim=32,
        max_position_embeddings=1024,
    ),
}


def measured_gemm_peak(threads: int, n: int = 1024, reps: int = 10) -> float:
    """fp32 matmul FLOP/s of this process with `threads` threads."""
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(2):
        a @ b
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def active_flops_per_token(model, info, zero_share: float, seq: int) -> float:
    """Training FLOPs per token (6 x active params + attention scores), see the module docstring."""
    c = info.hf_config
    dense, expert_one = 0, 0
    for name, p in model.named_parameters():
        if p.dim() < 2 or name.startswith("embedding."):
            continue
        if ".mlp.experts.local_experts." in name:
            if ".local_experts.0." in name:
                expert_one += p.numel() / len(info.moe_layers)
            continue
        dense += p.numel()
    k_real = info.router.top_k * (1.0 - zero_share)
    active = dense + len(info.moe_layers) * k_real * expert_one
    if info.family == "qwen3_moe":
        d_qk = d_v = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    else:
        d_qk, d_v = c.qk_nope_head_dim + c.qk_rope_head_dim, c.v_head_dim
    attn = 6 * info.num_layers * seq * c.num_attention_heads * (d_qk + d_v)
    return 6 * active + attn


def _rank(rank, world, ep, port, ckpt, args, out):
    from learner.config import LearnerSection, SFTStage
    from learner.train import Learner

    threads = max(1, args.threads)
    torch.set_num_threads(threads)
    learner = Learner(
        ckpt,
        LearnerSection(ep=ep, micro_batch_tokens=args.token_budget),
        SFTStage(lr=1e-4, schedule="constant", warmup_frac=0.0),
        rank=rank,
        world_size=world,
        master_port=port,
    )
    vocab = learner.info.vocab_size
    rng = np.random.default_rng(rank)
    rows = args.batch_size // world
    batch = {
        "tokens": rng.integers(0, vocab, (rows, args.seq_len)),
        "loss_mask": np.ones((rows, args.seq_len), np.uint8),
    }
    for _ in range(args.warmup):
        learner.train_step(batch)
    learner.barrier()
    t0 = time.perf_counter()
    ms = [learner.train_step(batch) for _ in range(args.steps)]
    learner.barrier()
    dt = time.perf_counter() - t0
    if rank == 0:
        tokens = sum(m["tokens"] for m in ms)
        zero = float(np.mean([m["zero_ratio"] for m in ms]))
        fpt = active_flops_per_token(learner.model, learner.info, zero, args.seq_len)
        if torch.cuda.is_available():
            peak = world * (989e12 if learner.model.config.bf16 else 67e12)
            peak_kind = "datasheet"
        else:
            peak = world * measured_gemm_peak(threads)
            peak_kind = "measured fp32 GEMM"
        achieved = fpt * tokens / dt
        res = {
            "family": learner.info.family,
            "world": world,
            "ep": ep,
            "device": "cuda" if torch.cuda.is_available() else "cpu",
            "dispatcher": learner.model.config.moe_token_dispatcher_type,
            "steps": args.steps,
            "tokens_per_step": ms[0]["tokens"],
            "step_time_s": dt / args.steps,
            "tokens_per_s": tokens / dt,
            "zero_share": zero,
            "model_flops_per_token": fpt,
            "model_tflops": achieved / 1e12,
            "peak_tflops": peak / 1e12,
            "peak_kind": peak_kind,
            "mfu": achieved / peak,
        }
        (out / "bench.json").write_text(json.dumps(res))
    learner.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="converted checkpoint (default: a small random one of --family)")
    ap.add_argument("--family", default="qwen3_moe", choices=sorted(SMALL))
    ap.add_argument("--ep", type=int, default=2)
    ap.add_argument("--world", type=int, default=None, help="ranks (default --ep)")
    ap.add_argument("--batch-size", type=int, default=8, help="global rows per step")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--token-budget", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank (CPU)")
    a = ap.parse_args()
    from learner.parallel import free_port
    from learner.testing import tiny_checkpoint

    world = a.world or a.ep
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = (
            Path(a.checkpoint)
            if a.checkpoint
            else tiny_checkpoint(a.family, Path(tmp) / "ckpt", zero_experts=8, **SMALL[a.family])
        )
        out = Path(tmp)
        if world == 1:
            _rank(0, 1, a.ep, free_port(), ckpt, a, out)
        else:
            mp.spawn(_rank, args=(world, a.ep, free_port(), ckpt, a, out), nprocs=world, join=True)
        res = json.loads((out / "bench.json").read_text())
    print(json.dumps(res, indent=2))
    print(
        f"{res['family']} on {res['world']} {res['device']} rank(s), EP={res['ep']} ({res['dispatcher']}): "
        f"{res['tokens_per_s']:.0f} tokens/s, {res['model_tflops'] * 1e3:.2f} GFLOP/s model, "
        f"MFU {100 * res['mfu']:.1f}% of {res['peak_kind']} peak, zero share {100 * res['zero_share']:.1f}%"
    )


if __name__ == "__main__":
    main()
