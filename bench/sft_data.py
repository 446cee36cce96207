"""SFT data streamed, not held: the driver's peak memory and throughput at 6,000 vs 60,000 records.

Synthetic chat records in the released rollout shape (`messages` ending with the assistant turn,
prompts of 200-2,000 tokens, answers of 200-16,000, 1% marked `finish_reason: length`) are
written as one JSONL per size, then each size goes, in a fresh process (so the peaks do not
mix), through the path a run takes: `launch.streams.sft_records` (the tokenizer workers write
the token file) and `launch.sft.sft_batches` (each SFT step's batch read from it), for a fixed
number of steps. A second fresh process per size builds again from the token file it left (a
resumed run). The tokenizer is the project's byte-level BPE with a Qwen3-style chat template
(`zeda_rl.chat_tokenizer`, no download).

Printed per size: the driver's peak RSS (ru_maxrss of the process that calls sft_records; the
tokenizer workers' own peak apart), tokenization tokens/s (kept tokens over the build's wall
time), batch tokens/s (the steps' real tokens over their time), and what the dense packing SFT
used before would have taken (rows x longest x 14 bytes). Goal: peak RSS at the large size
within 1.2x of the small one and under 4 GB.

    python bench/sft_data.py [--records 6000 60000] [--steps 50] [--batch 8] [--procs N] [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT_TOKENS = (200, 2000)
ANSWER_TOKENS = (200, 16000)
CAPS = {"data.max_prompt_tokens": 4096, "data.max_response_tokens": 32768, "sampling.max_new_tokens": 32768}


def _pool_text(tok, n_words: int, seed: int) -> tuple[str, float]:
    """A long random text of the tokenizer's own words, and its characters per token."""
    from zeda_rl.chat_tokenizer import _corpus

    words = sorted({w for line in _corpus() for w in line.split()})
    rng = random.Random(seed)
    text = " ".join(rng.choices(words, k=n_words))
    sample = text[:200_000]
    return text, len(sample) / len(tok(sample, add_special_tokens=False).input_ids)


def write_records(path: Path, n: int, seed: int = 0) -> dict:
    from zeda_rl.chat_tokenizer import build_chat_tokenizer

    text, cpt = _pool_text(build_chat_tokenizer(), 4_000_000, seed)
    rng = random.Random(seed + 1)

    def piece(tokens: int) -> str:
        chars = int(tokens * cpt)
        at = text.find(" ", rng.randrange(0, len(text) - chars - 1)) + 1
        return text[at : at + chars]

    t0 = time.time()
    with path.open("w") as f:
        for i in range(n):
            row = {
                "id": f"synthetic-{i}",
                "messages": [
                    {"role": "user", "content": piece(rng.randint(*PROMPT_TOKENS))},
                    {"role": "assistant", "content": piece(rng.randint(*ANSWER_TOKENS))},
                ],
                "finish_reason": "length" if rng.random() < 0.01 else "stop",
            }
            f.write(json.dumps(row) + "\n")
    return {"records": n, "bytes": path.stat().st_size, "seconds": time.time() - t0}


def child(source: str, steps: int, batch: int, procs: int | None) -> dict:
    """One driver: build the SFT set the way a run does, then `steps` SFT batches."""
    import numpy as np
    import psutil

    from launch import streams
    from launch.config import load_config
    from launch.sft import sft_batches
    from zeda_rl.chat_tokenizer import build_chat_tokenizer

    cfg = load_config("launch/configs/tiny-cpu.yaml", {**CAPS, "data.sft_rollouts": source})
    fmt = streams.chat_format(cfg, build_chat_tokenizer())
    rss_before = psutil.Process().memory_info().rss
    dropped: dict = {}
    t0 = time.time()
    data = streams.sft_records(cfg, fmt, dropped, **({"procs": procs} if procs else {}))
    build_s = time.time() - t0
    t0, real, padded = time.time(), 0, 0
    for _, b in sft_batches(data, steps, batch, cfg.seed):
        real += int(b["attention_mask"].sum())
        padded += b["tokens"].size
    steps_s = time.time() - t0
    return {
        "rows": len(data),
        "tokens": data.num_tokens,
        "dropped": dropped,
        "on_disk": data.on_disk,
        "build_s": build_s,
        "tokenize_tok_per_s": data.num_tokens / build_s,
        "steps_s": steps_s,
        "batch_tok_per_s": real / steps_s,
        "batch_pad_share": 1 - real / padded,
        "rss_before_mb": rss_before / 2**20,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "workers_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
        "dense_gb": len(data) * int(np.max(data.lengths)) * 14 / 1e9,  # what the old packing would hold
    }


def _run_child(source: Path, args, cache: Path) -> dict:
    env = {**os.environ, "ZEDA_CACHE": str(cache), "OMP_WAIT_POLICY": "PASSIVE"}
    cmd = [sys.executable, __file__, "--child", str(source), "--steps", str(args.steps), "--batch", str(args.batch)]
    if args.procs:
        cmd += ["--procs", str(args.procs)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    if out.returncode:
        raise SystemExit(f"child failed ({out.returncode}):\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, nargs="+", default=[6000, 60000])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--procs", type=int, default=None, help="tokenizer workers (default: one per CPU)")
    ap.add_argument("--dir", default=None, help="where the JSONL files and token files go (default: a temp dir)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.batch, args.procs)))
        return
    work = Path(args.dir or tempfile.mkdtemp(prefix="zeda-sft-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    results = {}
    for n in args.records:
        src = work / f"records-{n}.jsonl"
        gen = write_records(src, n)
        print(f"{n} records: {gen['bytes'] / 1e9:.2f} GB of JSONL written in {gen['seconds']:.0f}s", flush=True)
        first = _run_child(src, args, work / "cache")
        again = _run_child(src, args, work / "cache")
        results[n] = first
        print(
            f"  build: {first['rows']} rows, {first['tokens'] / 1e6:.1f}M tokens in {first['build_s']:.1f}s "
            f"({first['tokenize_tok_per_s'] / 1e6:.2f}M tok/s), dropped {first['dropped']}\n"
            f"  driver peak RSS {first['peak_rss_mb']:.0f} MB (before the build {first['rss_before_mb']:.0f} MB), "
            f"tokenizer workers' peak {first['workers_peak_rss_mb']:.0f} MB\n"
            f"  {args.steps} steps of {args.batch}: {first['steps_s']:.2f}s, {first['batch_tok_per_s'] / 1e6:.1f}M "
            f"tok/s, padding {100 * first['batch_pad_share']:.0f}% of the batch cells\n"
            f"  from the token file (resume): built in {again['build_s']:.3f}s, driver peak RSS "
            f"{again['peak_rss_mb']:.0f} MB\n"
            f"  the dense packing SFT used before: {first['dense_gb']:.1f} GB",
            flush=True,
        )
        src.unlink()
    if len(results) >= 2:
        small, large = min(results), max(results)
        ratio = results[large]["peak_rss_mb"] / results[small]["peak_rss_mb"]
        ok = ratio <= 1.2 and results[large]["peak_rss_mb"] < 4096
        print(
            f"peak driver RSS {large} / {small} records: {ratio:.2f}x "
            f"({results[large]['peak_rss_mb']:.0f} vs {results[small]['peak_rss_mb']:.0f} MB); "
            f"goal <= 1.2x and < 4 GB: {'met' if ok else 'NOT met'}"
        )


if __name__ == "__main__":
    main()
