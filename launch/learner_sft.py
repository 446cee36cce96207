"""`python -m launch.learner_sft`: a few SFT steps of the Megatron learner on a converted checkpoint.

    python -m launch.learner_sft --make-tiny qwen3_moe --checkpoint /tmp/tiny-qwen --ep 2 --steps 5
    python -m launch.learner_sft --checkpoint /path/to/converted --ep 2 --steps 5 --export /tmp/student

Starts a local Ray of its own, on loopback as every local run's (`launch.fleet.start_local_ray`), or joins the
cluster at RAY_ADDRESS; places one learner actor per rank in a
placement group (EP x DP ranks; gloo and the allgather dispatcher on CPU, nccl and
alltoall on GPU), and trains on synthetic data: arithmetic token sequences whose second
half is the "response" (loss mask 1), which any model learns quickly, so the loss visibly
falls. Prints one line of metrics per step (loss parts, L_GA, zero-expert share per
layer, grad norm, tokens/s). `--make-tiny FAMILY` first writes a random tiny converted
checkpoint of that family to --checkpoint (if it is not there yet).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np


def synthetic_batch(step: int, batch_size: int, seq_len: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Rows t_i = (a + i*d) mod V (a, d drawn per row); the second half is trained."""
    rng = np.random.default_rng([seed, step])
    a = rng.integers(0, vocab, (batch_size, 1))
    d = rng.integers(1, 4, (batch_size, 1))
    tokens = (a + d * np.arange(seq_len)[None, :]) % vocab
    loss_mask = np.zeros((batch_size, seq_len), np.uint8)
    loss_mask[:, seq_len // 2 :] = 1
    return {"tokens": tokens.astype(np.int64), "loss_mask": loss_mask, "attention_mask": np.ones_like(loss_mask)}


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m launch.learner_sft", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--checkpoint", required=True, help="converted (zero-expert) HF checkpoint directory")
    p.add_argument(
        "--make-tiny", choices=["qwen3_moe", "glm4_moe_lite"], help="first write a tiny converted checkpoint there"
    )
    p.add_argument("--ep", type=int, default=2, help="expert-parallel size (default 2)")
    p.add_argument("--world", type=int, default=None, help="ranks in all (EP x DP); default = --ep")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=8, help="rows per global batch")
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--token-budget", type=int, default=4096, help="max rows x length per micro-batch")
    p.add_argument("--alpha", type=float, default=0.1)
    p.add_argument("--w", type=float, default=2.0)
    p.add_argument("--cpus-per-rank", type=float, default=1)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--recompute", choices=["none", "selective", "full"], default="none")
    p.add_argument("--optimizer", choices=["local", "distributed"], default="local")
    p.add_argument("--logits-chunk-tokens", type=int, default=None, help="tokens per chunk of the fused logprob")
    p.add_argument("--save", help="save the full learner state here at the end")
    p.add_argument("--export", help="export the student as an HF checkpoint here at the end")
    p.add_argument("--json", action="store_true", help="print metrics as JSON lines")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse(argv)
    import ray

    from launch.fleet import start_local_ray
    from learner.actor import LearnerGroup
    from learner.config import LearnerSection, SFTStage
    from learner.megatron_config import load_hf_config

    ckpt = Path(a.checkpoint)
    if a.make_tiny:
        from learner.testing import tiny_checkpoint

        tiny_checkpoint(a.make_tiny, ckpt)
    if not (ckpt / "config.json").is_file():
        print(f"error: {ckpt} has no config.json (use --make-tiny FAMILY to create a tiny checkpoint)", file=sys.stderr)
        return 2
    vocab = int(load_hf_config(ckpt).vocab_size)
    world = a.world or a.ep
    if world % a.ep:
        print(f"error: --world {world} is not a multiple of --ep {a.ep}", file=sys.stderr)
        return 2
    cfg = LearnerSection(
        ep=a.ep,
        dp=world // a.ep,
        cpus_per_rank=a.cpus_per_rank,
        micro_batch_tokens=a.token_budget,
        alpha=a.alpha,
        w=a.w,
        precision=a.precision,
        recompute=a.recompute,
        optimizer=a.optimizer,
        logits_chunk_tokens=a.logits_chunk_tokens,
    )
    steps = max(2, a.steps)
    stage = SFTStage(steps=steps, lr=a.lr, schedule="cosine", warmup_frac=1 / steps)  # one warmup step
    started = False
    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init(include_dashboard=False, log_to_driver=False)
        else:  # a fresh local Ray of our own on loopback, never someone else's cluster on this machine
            start_local_ray(num_cpus=max(2, int(world * a.cpus_per_rank + 0.999)), log_to_driver=False)
        started = True
    t0 = time.time()
    group = LearnerGroup(ckpt, cfg, stage)
    print(
        f"{group.info['family']}: {world} ranks, EP={a.ep} ({group.info['num_experts'] // a.ep} of "
        f"{group.info['num_experts']} experts per rank), {world} data-parallel shards, {group.info['moe_layers']} MoE layers; "
        f"ready in {time.time() - t0:.1f}s"
    )
    try:
        for step in range(a.steps):
            batch = synthetic_batch(step, a.batch_size, a.seq_len, vocab)
            m = group.train_step(stage, batch, data_cursor={"step": step + 1})
            if a.json:
                print(json.dumps(m))
            else:
                zl = " ".join(f"{z:.2f}" for z in m["zero_ratio_per_layer"])
                print(
                    f"step {m['step']:>3}  loss {m['loss']:.4f}  nll {m['sft_loss']:.4f}  L_GA {m['aux_loss']:.4f}  "
                    f"zero {100 * m['zero_ratio']:.1f}% [{zl}]  |g| {m['grad_norm']:.3f}  lr {m['lr']:.2e}  "
                    f"{m['tokens_per_s']:.0f} tok/s"
                )
        if a.save:
            print(f"saved learner state to {group.save(a.save)}")
        if a.export:
            print(f"exported HF checkpoint to {group.export_hf(a.export)}")
    finally:
        group.shutdown()
        if started:
            ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
