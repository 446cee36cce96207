"""Serving speed: the teacher, the ZEDA student and NET in the same engine on the same prompts.

ZEDA's speed-up claim is about serving (prefill and decode throughput, ZEDA.md 6), and its
size is bounded by how much of a step the routed experts take: skipping a share r of the
expert slots saves at most r x (expert share of the step). So besides tokens/s this times
the expert MLPs themselves (forward hooks on every `mlp.experts` module) and prints the
bound next to the measured ratio; what remains between the two is what the expert kernels
do not save when fewer (token, expert) pairs reach them (per-expert launch and weight reads
at decode batch sizes).

All models run in one process through `actors.torch_engine.TorchEngine`, greedy, to a fixed
length (no stop token), interleaved repeat by repeat so machine noise hits them alike.
Within one generation, prefill is the first forward (prompt in, first token out) and decode is
everything after it, so neither is a difference of two noisy runs.

    python bench/decode.py [--baselines runs/tiny-cpu-baselines] [--batch 32] [--new 16] [--repeats 5]

`--baselines` is a `zeda baselines` output directory (its teacher, ZEDA and NET); --teacher,
--student and --net name checkpoints directly.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch


class ExpertTimer:
    """Wall time inside every routed-experts module (the shared expert of GLM is not one)."""

    def __init__(self, model):
        self.seconds = 0.0
        self._t0: dict[int, float] = {}
        self.modules = [m for name, m in model.named_modules() if name.endswith("mlp.experts")]
        if not self.modules:
            raise ValueError("no mlp.experts module: not a transformers MoE model")
        for m in self.modules:
            m.register_forward_pre_hook(self._start)
            m.register_forward_hook(self._stop)

    def _start(self, module, args):
        self._t0[id(module)] = time.perf_counter()

    def _stop(self, module, args, out):
        self.seconds += time.perf_counter() - self._t0.pop(id(module))


class StepClock:
    """Marks the end of every forward of `model` (time, expert seconds so far): the first one ends prefill."""

    def __init__(self, model, timer: ExpertTimer):
        self.marks: list[tuple[float, float]] = []
        forward = model.forward

        def timed(*args, **kwargs):
            out = forward(*args, **kwargs)
            self.marks.append((time.perf_counter(), timer.seconds))
            return out

        model.forward = timed


def _paths(a) -> dict[str, Path]:
    if a.baselines:
        rows = {r["variant"]: Path(r["checkpoint"]) for r in json.loads((Path(a.baselines) / "baselines.json").read_text())["rows"]}
        return {"teacher": rows["original"], "zeda": rows["zeda"], "net": rows["net"]}
    out = {"teacher": Path(a.teacher), "zeda": Path(a.student)}
    if a.net:
        out["net"] = Path(a.net)
    return out


def _skipped(samples, num_experts: int) -> float:
    """r_ZE over the decoded tokens: share of the K routed slots per token that no expert computed."""
    shares = []
    for s in samples:
        r = np.asarray(s.routed_experts)[:, len(s.prompt_ids) : len(s.prompt_ids) + len(s.output_ids) - 1]
        seen = r >= 0
        shares.append(float(((r >= num_experts) & seen).sum() / max(seen.sum(), 1)))
    return float(np.mean(shares))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baselines", default="runs/tiny-cpu-baselines", help="a `zeda baselines` output directory")
    ap.add_argument("--teacher")
    ap.add_argument("--student")
    ap.add_argument("--net")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--new", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true", help="also print the numbers as one JSON object")
    a = ap.parse_args()
    if a.teacher:
        a.baselines = None
    torch.set_num_threads(a.threads)

    from actors.engine import SamplingParams
    from actors.torch_engine import TorchEngine
    from transformers import AutoTokenizer

    from zeda_rl.modeling import moe_blocks
    from zeda_rl.tasks import make_split

    paths = _paths(a)
    tok = AutoTokenizer.from_pretrained(paths["teacher"])
    examples = make_split("heldout", (a.batch + 3) // 4)[: a.batch]
    prompts = [tok(e.prompt).input_ids for e in examples]
    prompt_tokens = sum(map(len, prompts))
    engines, timers, clocks = {}, {}, {}
    for name, p in paths.items():
        engines[name] = TorchEngine(p, threads=a.threads)
        timers[name] = ExpertTimer(engines[name].model)
        clocks[name] = StepClock(engines[name].model, timers[name])
    full = SamplingParams(temperature=0.0, max_new_tokens=a.new, stop_token_ids=())
    for e in engines.values():  # warm-up
        e.generate(prompts, full)

    keys = ("prefill", "decode", "expert_prefill", "expert_decode")
    t = {n: {k: [] for k in keys} for n in engines}
    samples = {}
    for _ in range(a.repeats):
        for name, e in engines.items():
            timers[name].seconds, clocks[name].marks = 0.0, []
            t0 = time.perf_counter()
            samples[name] = e.generate(prompts, full)
            t1 = time.perf_counter()
            end_prefill, expert_prefill = clocks[name].marks[0]
            for k, v in zip(keys, (end_prefill - t0, t1 - end_prefill, expert_prefill, timers[name].seconds - expert_prefill)):
                t[name][k].append(v)

    res = {}
    for name, e in engines.items():
        med = {k: statistics.median(v) for k, v in t[name].items()}
        blocks = moe_blocks(e.model)
        res[name] = {
            "prefill_tok_s": prompt_tokens / med["prefill"],
            "decode_tok_s": a.batch * (a.new - 1) / med["decode"],
            "expert_share_prefill": med["expert_prefill"] / med["prefill"],
            "expert_share_decode": med["expert_decode"] / med["decode"],
            "expert_decode_s": med["expert_decode"],
            "decode_s": med["decode"],
            "r_ze_decode": _skipped(samples[name], blocks[0].spec.num_experts) if blocks else 0.0,
        }
    base = res["teacher"]
    print(f"batch {a.batch} held-out prompts ({prompt_tokens} prompt tokens), {a.new} new tokens, greedy, "
          f"{a.threads} threads, median of {a.repeats}; same TorchEngine for all")
    print(f"{'model':<8} {'prefill tok/s':>13} {'decode tok/s':>12} {'prefill x':>9} {'decode x':>8} "
          f"{'r_ZE dec':>8} {'expert share dec':>16} {'expert time x':>13} {'bound x':>8}")
    f = base["expert_share_decode"]
    for name, r in res.items():
        r["prefill_speedup"] = r["prefill_tok_s"] / base["prefill_tok_s"]
        r["decode_speedup"] = r["decode_tok_s"] / base["decode_tok_s"]
        r["expert_time_ratio"] = r["expert_decode_s"] / base["expert_decode_s"]
        r["decode_bound"] = 1 / (1 - f * r["r_ze_decode"])  # experts scaled by the slots they compute, nothing else
        print(f"{name:<8} {r['prefill_tok_s']:13.0f} {r['decode_tok_s']:12.0f} {r['prefill_speedup']:9.2f} "
              f"{r['decode_speedup']:8.2f} {100 * r['r_ze_decode']:7.1f}% {100 * r['expert_share_decode']:15.1f}% "
              f"{r['expert_time_ratio']:13.2f} {r['decode_bound']:8.2f}")
    print("bound x = 1 / (1 - teacher's expert share of decode x r_ZE): the decode speed-up if expert time fell "
          "in proportion to the slots skipped; expert time x = the student's expert time over the teacher's")
    if a.json:
        print(json.dumps({"settings": vars(a), "results": res}, indent=2, default=str))


if __name__ == "__main__":
    main()
