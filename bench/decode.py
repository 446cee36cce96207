"""Serving speed: the teacher, ZEDA, NET and the static top-K/2 teacher in the same engine on the same prompts.

ZEDA's speed-up claim is about serving (prefill and decode throughput, ZEDA.md 6). Every model
runs in one process through `actors.torch_engine.TorchEngine`, greedy, to a fixed length (no
stop token), with the same experts implementation (`--experts`, default `zeda_skip`: the
skipping path of `zeda_rl.skip`, which the zero-expert models use by default; the teacher is
switched to it too, so the ratios compare routing, not kernels), interleaved repeat by repeat
so machine noise hits them alike. Within one generation, prefill is the first forward (prompt
in, first token out) and decode is everything after it, so neither is a difference of two
noisy runs.

Models: `teacher`; `zeda` (the student); `net` (NET, trained static top-K/2) when given;
`teacher_k2` (the untrained teacher with NET's routing option static_top_k = K/2, the honest
no-training baseline: the teacher's weights, its config rewritten as `launch.baselines.
net_checkpoint` does, weights symlinked into a temporary directory).

For every batch size x prompt length it prints, against the teacher:
- prefill x / decode x: the teacher's wall time over the model's (> 1: faster), and the same
  for process CPU time (steadier on a busy machine, SKIP-NOTES);
- skip: the share of routed slots (of the teacher's K per token) that no expert computes;
- expert x: the teacher's time inside the routed experts modules (forward hooks on every
  `mlp.experts`; GLM's shared expert is not one) over the model's, next to its physical limit
  1/(1 - skip) (expert compute scaled by the slots it really computes) and their quotient
  (eff: 1.00 = the limit reached);
- bound x: 1/(1 - teacher's expert share of the phase x skip), the phase speed-up if expert time
  fell in proportion to the skipped slots and nothing else changed.

    python bench/decode.py [--baselines runs/tiny-cpu-baselines] [--batch 1 8 32] [--prompt-len 16 256]
                           [--new 16] [--repeats 5] [--threads 1] [--experts zeda_skip]

`--baselines` is a `zeda baselines` output directory (its teacher, ZEDA and NET); --teacher,
--student and --net name checkpoints directly. `--prompt-len 0` uses the held-out task prompts
as they are (variable lengths, left-padded: the old behaviour of this bench); any other length
cuts windows of exactly that many tokens out of the held-out prompts' token stream.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
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
    """Marks the end of every forward of `model` (wall time, CPU time, expert seconds so far): the first one ends prefill."""

    def __init__(self, model, timer: ExpertTimer):
        self.marks: list[tuple[float, float, float]] = []
        forward = model.forward

        def timed(*args, **kwargs):
            out = forward(*args, **kwargs)
            self.marks.append((time.perf_counter(), time.process_time(), timer.seconds))
            return out

        model.forward = timed


def _paths(a) -> dict[str, Path]:
    if a.baselines:
        rows = {
            r["variant"]: Path(r["checkpoint"])
            for r in json.loads((Path(a.baselines) / "baselines.json").read_text())["rows"]
        }
        return {"teacher": rows["original"], "zeda": rows["zeda"], "net": rows["net"]}
    out = {"teacher": Path(a.teacher), "zeda": Path(a.student)}
    if a.net:
        out["net"] = Path(a.net)
    return out


def half_teacher(teacher: Path, out: Path) -> Path:
    """The teacher with NET's routing option static_top_k = K/2 and no training: `net_checkpoint`'s
    config.json, the teacher's other files symlinked (no copy of the weights)."""
    from zeda_rl.arch import read_config, spec_for
    from zeda_rl.release import release_config

    raw = read_config(teacher)
    k = int(raw["num_experts_per_tok"])
    if k < 2:
        raise ValueError(f"{teacher}: top_k {k} cannot be halved")
    cfg = release_config(
        raw, spec_for(raw, str(teacher / "config.json")), zce_nums=[0], zce_types=["zero"], use_zce_mask=False
    )
    cfg["static_top_k"] = k // 2
    out.mkdir(parents=True, exist_ok=True)
    for f in teacher.iterdir():
        if f.name != "config.json":
            os.symlink(f.resolve(), out / f.name)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return out


def _prompts(tok, batch: int, length: int) -> list[list[int]]:
    """`batch` prompts: the held-out task prompts as they are (length 0), or windows of exactly
    `length` tokens of their concatenated token stream (cycled when it is too short)."""
    from zeda_rl.tasks import make_split

    if length == 0:
        return [tok(e.prompt).input_ids for e in make_split("heldout", (batch + 3) // 4)[:batch]]
    stream = [t for e in make_split("heldout", 64) for t in tok(e.prompt).input_ids]
    return [[stream[(i * length + j) % len(stream)] for j in range(length)] for i in range(batch)]


def _skipped(samples, num_experts: int | None, top_k: int) -> tuple[float, float]:
    """Share of the K routed slots per token that no expert computed: (prompt tokens, decoded tokens).
    A model without zero-expert blocks (the stock teacher) computes all of them."""
    if num_experts is None:
        return 0.0, 0.0
    out = []
    for part in ("prefill", "decode"):
        skipped = seen = 0
        for s in samples:
            p, o = len(s.prompt_ids), len(s.output_ids)
            r = np.asarray(s.routed_experts)[:p] if part == "prefill" else np.asarray(s.routed_experts)[p : p + o - 1]
            rows = (r >= 0).all(-1)  # recorded tokens ([T, L]); -1 rows were never fed
            skipped += int(((r >= num_experts) & rows[..., None]).sum())
            seen += int(rows.sum()) * top_k
        out.append(skipped / max(seen, 1))
    return out[0], out[1]


def _measure(engines, timers, clocks, prompts, a) -> dict:
    """Median prefill/decode wall, CPU and expert seconds per model over `a.repeats` interleaved generations."""
    from zeda_rl.modeling import moe_blocks
    from zeda_rl.sampling import SamplingParams

    full = SamplingParams(temperature=0.0, max_new_tokens=a.new, stop_token_ids=())
    for e in engines.values():  # warm-up
        e.generate(prompts, full)
    keys = ("prefill", "decode", "cpu_prefill", "cpu_decode", "expert_prefill", "expert_decode")
    t = {n: {k: [] for k in keys} for n in engines}
    samples = {}
    for _ in range(a.repeats):
        for name, e in engines.items():
            timers[name].seconds, clocks[name].marks = 0.0, []
            t0, c0 = time.perf_counter(), time.process_time()
            samples[name] = e.generate(prompts, full)
            t1, c1 = time.perf_counter(), time.process_time()
            w_pre, c_pre, x_pre = clocks[name].marks[0]
            for k, v in zip(
                keys, (w_pre - t0, t1 - w_pre, c_pre - c0, c1 - c_pre, x_pre, timers[name].seconds - x_pre)
            ):
                t[name][k].append(v)
    res = {}
    prompt_tokens, batch = sum(map(len, prompts)), len(prompts)
    for name, e in engines.items():
        med = {k: statistics.median(v) for k, v in t[name].items()}
        blocks = moe_blocks(e.model)
        top_k = int(e.model.config.num_experts_per_tok)
        skip_pre, skip_dec = _skipped(samples[name], blocks[0].spec.num_experts if blocks else None, top_k)
        res[name] = {
            **med,
            "skip_prefill": skip_pre,
            "skip_decode": skip_dec,
            "prefill_tok_s": prompt_tokens / med["prefill"],
            "decode_tok_s": batch * (a.new - 1) / med["decode"],
        }
    base = res["teacher"]
    for r in res.values():
        for ph in ("prefill", "decode"):
            r[f"{ph}_x"] = base[ph] / r[ph]
            r[f"cpu_{ph}_x"] = base[f"cpu_{ph}"] / r[f"cpu_{ph}"]
            r[f"expert_{ph}_x"] = base[f"expert_{ph}"] / r[f"expert_{ph}"]
            r[f"expert_{ph}_limit"] = 1 / (1 - r[f"skip_{ph}"]) if r[f"skip_{ph}"] < 1 else float("inf")
            r[f"expert_{ph}_eff"] = r[f"expert_{ph}_x"] / r[f"expert_{ph}_limit"]
            r[f"expert_share_{ph}"] = r[f"expert_{ph}"] / r[ph]
            r[f"{ph}_bound"] = 1 / (1 - base[f"expert_share_{ph}"] * r[f"skip_{ph}"])
    return res


def _print(res: dict, batch: int, length: int, prompt_tokens: int, a) -> None:
    what = f"prompts of {length} tokens" if length else f"held-out prompts ({prompt_tokens} tokens)"
    print(
        f"\nbatch {batch}, {what}, {a.new} new tokens, greedy, {a.threads} threads, experts {a.experts}, median of {a.repeats}"
    )
    print(
        f"{'model':<11} {'phase':<7} {'tok/s':>8} {'x':>6} {'cpu x':>6} {'skip':>6} {'exp share':>9} "
        f"{'expert x':>8} {'limit':>6} {'eff':>5} {'bound x':>7}"
    )
    for name, r in res.items():
        for ph in ("prefill", "decode"):
            print(
                f"{name:<11} {ph:<7} {r[f'{ph}_tok_s']:8.0f} {r[f'{ph}_x']:6.2f} {r[f'cpu_{ph}_x']:6.2f} "
                f"{100 * r[f'skip_{ph}']:5.1f}% {100 * r[f'expert_share_{ph}']:8.1f}% {r[f'expert_{ph}_x']:8.2f} "
                f"{r[f'expert_{ph}_limit']:6.2f} {r[f'expert_{ph}_eff']:5.2f} {r[f'{ph}_bound']:7.2f}"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baselines", default="runs/tiny-cpu-baselines", help="a `zeda baselines` output directory")
    ap.add_argument("--teacher")
    ap.add_argument("--student")
    ap.add_argument("--net")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument(
        "--prompt-len", type=int, nargs="+", default=[16, 256], help="0: the held-out task prompts as they are"
    )
    ap.add_argument("--new", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 gives the steadiest ratios, SKIP-NOTES)")
    ap.add_argument(
        "--experts",
        default="zeda_skip",
        choices=["zeda_skip", "grouped_mm", "eager"],
        help="experts implementation of every model (zeda_skip: the skipping path, the zero-expert default)",
    )
    ap.add_argument("--no-half-teacher", action="store_true", help="leave out the static top-K/2 teacher")
    ap.add_argument("--json", action="store_true", help="also print the numbers as one JSON object")
    a = ap.parse_args()
    if a.new < 2:
        ap.error("--new must be at least 2 (decode is every forward after the first)")
    if a.teacher:
        a.baselines = None
    torch.set_num_threads(a.threads)

    from transformers import AutoTokenizer

    from actors.torch_engine import TorchEngine

    paths = _paths(a)
    tok = AutoTokenizer.from_pretrained(paths["teacher"])
    with tempfile.TemporaryDirectory() as tmp:
        if not a.no_half_teacher:
            paths["teacher_k2"] = half_teacher(paths["teacher"], Path(tmp) / "teacher-k2")
        engines, timers, clocks = {}, {}, {}
        for name, p in paths.items():
            engines[name] = TorchEngine(p, threads=a.threads)
            engines[name].model.set_experts_implementation(a.experts)
            timers[name] = ExpertTimer(engines[name].model)
            clocks[name] = StepClock(engines[name].model, timers[name])
        results = {}
        for length in a.prompt_len:
            for batch in a.batch:
                prompts = _prompts(tok, batch, length)
                res = _measure(engines, timers, clocks, prompts, a)
                _print(res, batch, length, sum(map(len, prompts)), a)
                results[f"batch{batch}_prompt{length}"] = res
    print(
        "\nx = teacher's time / the model's (> 1: faster); cpu x the same in process CPU time; skip = share of the "
        "teacher's K slots per token no expert computes; expert x = teacher's time in the routed experts / the "
        "model's, limit = 1/(1 - skip), eff = expert x / limit; bound x = 1/(1 - teacher's expert share x skip)"
    )
    if a.json:
        print(json.dumps({"settings": vars(a), "results": results}, indent=2, default=str))


if __name__ == "__main__":
    main()
