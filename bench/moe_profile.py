"""One MoE layer, phase by phase: where ZEDA's expert time goes beyond its limit 1/(1 - skipped share).

bench/decode.py measures whole generations; this bench profiles ONE MoE layer at a time (`--layer`;
by default each layer of the tiny models' 3 in turn, since their skipped shares differ a lot: 17%
to 98%) of the hard teacher (stock Qwen3-MoE, switched to the `zeda_skip` experts path as
decode.py does, so nothing is skipped) and of the ZEDA student (same layer index, its own router,
its real zero slots). Inputs are the hidden states that really enter that layer's MoE block: a
forward pre-hook records them while `TorchEngine` greedily generates from held-out prompt windows
(bench/decode.py's `_paths` and `_prompts`), each model on its own hidden states. Cases: `1x16
prefill` (one 16-token prompt), `1x16 decode` (the single-token inputs of the decode steps after
it, one call each), `32x256 prefill` (32 x 256 tokens) and `32x256 decode` (32 rows of one token
a step).

The layer is run by a step-by-step copy of the block's forward (the router module, the zero-slot
masking of `zeda_rl.modeling`, then `zeda_rl.skip.skip_experts_forward` with `compact` and
`expert_mlp` inlined, same ops in the same order); its output is checked to equal the real
block's output bit for bit before anything is timed. Phases:

- router: the gate module (gate matmul, softmax, top-k, renormalisation);
- zero_slots: ZEDA's `ids >= N` masking of ids and weights (the teacher has none);
- compact: `compact()` (nonzero, sort, bincount + tolist, the groups) plus the output allocation
  and the per-pair routing-weight gather;
- per hit expert: gather (token slice + index_select), gate_up (weight select + linear), act
  (chunk, silu, mul), down (weight select + linear), weight (x routing weight), index_add;
- other: the real code's time the phases leave (Python loop, calls, getattr, the transformers
  experts dispatch, reshapes): the un-instrumented real experts module minus its phases
  ("experts other"), and the real block minus that module and the router phases.

Timing: a clock around every phase (CPU ops are synchronous, so a phase's time is its ops' time).
Calls under 2 ms of CPU use the wall clock, and a sample counts only when the thread was not
preempted meanwhile (wall minus thread CPU time under 10 us + 2%; `--tries` retries, the report
gives the share of such samples); longer calls (32x256 prefill), which the other jobs of a loaded
machine always preempt, use the thread's CPU time. Median over repeats for every input, mean over
a case's inputs (decode: its steps). Every layer and both models take turns within each repeat.
The same copy then runs under torch.profiler with `record_function` labels around the phases: the
per-aten-op breakdown and the profiler's own phase times (inflated by its per-op recording,
shown as a cross-check).

Matmul ideal: `pairs x 3 x H x I x 2` flops at the peak throughput of the same weight select +
`F.linear` calls on the same expert weights in a microbench over 1..`--mm-rows-max` rows; the
per-call fixed cost c0 is the microbench's 1-row time minus its flops at peak. ZEDA's gap to its
limit, `X_zeda - X_teacher x pairs_zeda / pairs_teacher` (X: time inside the experts module, what
decode.py's expert x / limit / eff measure), is split phase by phase (each part z - rho x t):
- routing/compaction: compact's gap (its cost follows the K slots a token, not the pairs);
- per-expert ops + loop: gather, act, weight, index_add and the experts module's other time;
- matmul fixed per call: experts hit x (c0 of gate_up + c0 of down);
- matmul small-row efficiency: measured matmul minus ideal minus fixed (the ideal is proportional
  to the pairs and cancels);
and over all layers together (decode.py's pooled view) the layers' parts are summed, plus "uneven
skip across layers", the per-layer limits' difference to the pooled one (about 0 when the
teacher's layers take equal time).

    OMP_WAIT_POLICY=PASSIVE python bench/moe_profile.py [--baselines runs/tiny-cpu-hard-baselines]
        [--teacher DIR --student DIR] [--layer 0 1 2] [--cases "1x16 decode" ...] [--repeats 11]
        [--new 16] [--json out.json]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported (2 cores shared with other jobs)

import argparse
import importlib.util
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/moe_profile.py`: zeda_rl and actors come from the repository
    sys.path.insert(0, str(ROOT))

from zeda_rl.skip import compact  # noqa: E402

ROUTER_PHASES = ("router", "zero_slots")
EXPERT_PHASES = ("compact", "gather", "gate_up", "act", "down", "weight", "index_add")
PHASES = ROUTER_PHASES + EXPERT_PHASES
MATMULS = ("gate_up", "down")
PER_EXPERT_OPS = ("gather", "act", "weight", "index_add")  # per hit expert, besides the two matmuls
CASES = (("1x16", "prefill"), ("1x16", "decode"), ("32x256", "prefill"), ("32x256", "decode"))


# ---- pure helpers ---------------------------------------------------------------------------------


def pair_stats(ids: torch.Tensor, num_experts: int) -> dict:
    """Routed (token, real expert) pairs of a [T, K] id table: ids outside [0, N) are skipped slots."""
    flat = ids.reshape(-1)
    real = flat[(flat >= 0) & (flat < num_experts)]
    rows = torch.bincount(real, minlength=num_experts).tolist()
    hit = [r for r in rows if r]
    return {
        "slots": int(flat.numel()),
        "pairs": int(real.numel()),
        "skipped": 1 - real.numel() / flat.numel() if flat.numel() else 0.0,
        "experts_hit": len(hit),
        "rows_per_expert": rows,
        "mean_rows_per_hit_expert": sum(hit) / len(hit) if hit else 0.0,
    }


def matmul_model(rows: list[int], seconds: list[float], flops_per_row: float) -> dict:
    """Throughput and per-call fixed cost of one matmul shape from its times at several row counts:
    peak = the best flops/s seen, fixed = the 1-row (or fewest-row) time minus its flops at peak."""
    if not rows or len(rows) != len(seconds):
        raise ValueError("matmul_model: need one time per row count")
    peak = max(r * flops_per_row / s for r, s in zip(rows, seconds))
    r0, s0 = min(zip(rows, seconds))
    return {"peak_flops": peak, "fixed_s": max(s0 - r0 * flops_per_row / peak, 0.0)}


def median_dict(samples: list[dict]) -> dict:
    """Key-wise median of a list of dicts of numbers (missing keys count as 0)."""
    keys = sorted({k for s in samples for k in s})
    return {k: statistics.median([s.get(k, 0.0) for s in samples]) for k in keys}


def gap_breakdown(t: dict, z: dict) -> dict:
    """Split ZEDA's experts-module gap to its limit into causes.

    `t` and `z` (teacher, ZEDA) hold per-call seconds for EXPERT_PHASES and "experts_other"
    (the experts module's time the phases leave), "experts_total", "pairs", "experts_hit",
    "mm_ideal" (matmul flops at peak) and "mm_fixed" (experts hit x fixed cost of the two calls).
    The limit scales the teacher's experts time by rho = pairs_z / pairs_t; every component is
    z - rho x t, so the components sum to the gap."""
    rho = z["pairs"] / t["pairs"]

    def g(k: str) -> float:
        return z[k] - rho * t[k]

    mm = {k: sum(d[p] for p in MATMULS) for k, d in (("t", t), ("z", z))}
    rest = {k: mm[k] - d["mm_ideal"] - d["mm_fixed"] for k, d in (("t", t), ("z", z))}
    parts = {
        "routing/compaction": g("compact"),
        "per-expert ops + loop": sum(g(p) for p in PER_EXPERT_OPS) + g("experts_other"),
        "matmul fixed per call": g("mm_fixed"),
        "matmul small-row efficiency": rest["z"] - rho * rest["t"],
        "matmul ideal (cancels)": g("mm_ideal"),
    }
    limit = rho * t["experts_total"]
    return {
        "rho": rho,
        "limit_s": limit,
        "gap_s": z["experts_total"] - limit,
        "eff": limit / z["experts_total"] if z["experts_total"] else float("nan"),
        "expert_x": t["experts_total"] / z["experts_total"] if z["experts_total"] else float("nan"),
        "parts_s": parts,
    }


def combine_layers(per_layer: list[tuple[dict, dict, dict]]) -> dict:
    """Several layers as decode.py sees a whole model: [(teacher, zeda, gap_breakdown)] per layer ->
    expert x, limit and eff over their summed experts time, with the limit on the pooled pair ratio
    rho = sum pairs_z / sum pairs_t. The gap is the sum of the layers' own gaps (each against its own
    rho_l) plus "uneven skip across layers" = sum (rho_l - rho) x teacher_l, the difference between the
    per-layer limits and the pooled one (0 when the teacher's layers take equal time)."""
    rho = sum(z["pairs"] for _, z, _ in per_layer) / sum(t["pairs"] for t, _, _ in per_layer)
    tt = sum(t["experts_total"] for t, _, _ in per_layer)
    zz = sum(z["experts_total"] for _, z, _ in per_layer)
    parts: dict[str, float] = defaultdict(float)
    for _, _, g in per_layer:
        for k, v in g["parts_s"].items():
            parts[k] += v
    parts["uneven skip across layers"] = sum((g["rho"] - rho) * t["experts_total"] for t, _, g in per_layer)
    return {
        "rho": rho,
        "limit_s": rho * tt,
        "gap_s": zz - rho * tt,
        "eff": rho * tt / zz if zz else float("nan"),
        "expert_x": tt / zz if zz else float("nan"),
        "layer_x": sum(t["layer_total"] for t, _, _ in per_layer) / sum(z["layer_total"] for _, z, _ in per_layer),
        "teacher_experts_s": tt,
        "zeda_experts_s": zz,
        "parts_s": dict(parts),
    }


# ---- the instrumented copy of the MoE block ----------------------------------------------------------


class Clock:
    """Accumulates seconds per phase on `timer` (perf_counter or thread_time); with `profile`, also
    labels every phase for torch.profiler."""

    def __init__(self, timer=time.perf_counter, profile: bool = False):
        self.timer, self.profile = timer, profile
        self.seconds: dict[str, float] = defaultdict(float)
        self._name = ""
        self._t0 = 0.0
        self._rf = None

    def __call__(self, name: str) -> Clock:
        self._name = name
        return self

    def __enter__(self):
        if self.profile:
            self._rf = torch.autograd.profiler.record_function(self._name)
            self._rf.__enter__()
        self._t0 = self.timer()

    def __exit__(self, *exc):
        self.seconds[self._name] += self.timer() - self._t0
        if self.profile:
            self._rf.__exit__(*exc)


def _route(block, xr: torch.Tensor, clk: Clock):
    """The block's router and zero-slot masking (`_ZeroExpertBlockMixin._routed_experts`, stock block)."""
    with clk("router"):
        _, weights, ids = block.gate(xr)
    if hasattr(block, "spec"):  # a zero-expert block: zero slots go to the sentinel N with weight 0
        with clk("zero_slots"):
            n = block.spec.num_experts
            zero = ids >= n
            ids, weights = ids.masked_fill(zero, n), weights.masked_fill(zero, 0.0).to(xr.dtype)
    return ids, weights


def experts_forward(experts, hs: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, clk: Clock):
    """`zeda_rl.skip.skip_experts_forward` with `expert_mlp` inlined, phase by phase (same ops)."""
    if getattr(experts, "is_transposed", False) or getattr(experts, "has_bias", False):
        raise ValueError("moe_profile copies the plain layout only (no bias, not transposed: Qwen3-MoE)")
    if not getattr(experts, "has_gate", True) or getattr(experts, "has_post_expert_norm", False):
        raise ValueError("moe_profile copies the gated experts without post-expert norm only")
    with clk("compact"):
        pairs = compact(top_k_index, experts.num_experts)
        groups, tokens = pairs.groups, pairs.tokens
        out = torch.zeros_like(hs)
        if groups:
            weights = top_k_weights.reshape(-1).index_select(0, pairs.slots)
    for e, a, b in groups:
        with clk("gather"):
            tok = tokens[a:b]
            x = hs.index_select(0, tok)
        with clk("gate_up"):
            h = F.linear(x, experts.gate_up_proj[e], None)
        with clk("act"):
            h = experts._apply_gate(h)
        with clk("down"):
            y = F.linear(h, experts.down_proj[e], None)
        with clk("weight"):
            y = y * weights[a:b, None].to(hs.dtype)
        with clk("index_add"):
            out.index_add_(0, tok, y.to(out.dtype))
    return out


def block_forward(block, x: torch.Tensor, clk: Clock) -> torch.Tensor:
    b, s, h = x.shape
    xr = x.reshape(-1, h)
    ids, weights = _route(block, xr, clk)
    return experts_forward(block.experts, xr, ids, weights, clk).reshape(b, s, h)


# ---- capture, timing, profiler ------------------------------------------------------------------------


def _load_decode_bench():
    spec = importlib.util.spec_from_file_location("bench_decode", ROOT / "bench" / "decode.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def capture(engine, layers: list[int], prompts: list[list[int]], new: int) -> dict:
    """Hidden states entering each of `layers`' MoE blocks during one greedy generation:
    {layer: (prefill input, [decode inputs])}."""
    from zeda_rl.sampling import SamplingParams

    seen: dict[int, list[torch.Tensor]] = {li: [] for li in layers}
    hooks = [
        engine.model.model.layers[li].mlp.register_forward_pre_hook(
            lambda m, args, li=li: seen[li].append(args[0].detach().clone())
        )
        for li in layers
    ]
    try:
        engine.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=new, stop_token_ids=()))
    finally:
        for h in hooks:
            h.remove()
    return {li: (xs[0], xs[1:]) for li, xs in seen.items()}


def pick_timer(seconds_per_call: float, clock: str):
    """Wall clock (perf_counter, 0.2 us a read) for short calls, whose samples are kept only when the
    thread was not preempted (see `Sampler`); thread CPU time (3.4 us a read on this VM) for long
    calls, which are always preempted on a loaded machine."""
    if clock == "wall" or (clock == "auto" and seconds_per_call < 2e-3):
        return "wall", time.perf_counter
    return "cpu", time.thread_time


def _cpu_seconds(fn) -> float:
    """This thread's CPU seconds for one call of `fn` (least of three)."""
    out = []
    for _ in range(3):
        c0 = time.thread_time()
        fn()
        out.append(time.thread_time() - c0)
    return min(out)


class Sampler:
    """Runs a sample until it was not preempted: wall time minus this thread's CPU time over the sample
    (the time other jobs had the core) under 10 us + 2% of the wall time; after `tries` the least
    preempted try is kept and counted as dirty."""

    def __init__(self, tries: int):
        self.tries, self.clean, self.dirty = tries, 0, 0

    def run(self, fn):
        best = None
        for _ in range(self.tries):
            c0, w0 = time.thread_time(), time.perf_counter()
            out = fn()
            w1, c1 = time.perf_counter(), time.thread_time()
            lost = (w1 - w0) - (c1 - c0)
            if lost < 10e-6 + 0.02 * (w1 - w0):
                self.clean += 1
                return out
            if best is None or lost < best[0]:
                best = (lost, out)
        self.dirty += 1
        return best[1]


def measure_case(blocks: dict, inputs: dict, repeats: int, clock: str, tries: int) -> dict:
    """Per-call seconds per phase: median over repeats for every captured input (decode: every step),
    then the mean over the inputs; models interleaved within every repeat.

    One sample of an input = the real block, the real experts module on the ids and weights the block
    routes to, then the instrumented copy, all on the same timer."""
    prep, samples, timers, samplers = {}, {}, {}, {}
    with torch.no_grad():
        for m, block in blocks.items():
            prep[m] = []
            for x in inputs[m]:
                xr = x.reshape(-1, x.shape[-1])
                ids, w = _route(block, xr, Clock())
                prep[m].append((xr, ids, w))
                ref = block(x)
                if not torch.equal(ref, block_forward(block, x, Clock())):
                    raise AssertionError(f"{m}: the instrumented copy differs from the real block")
            samples[m] = [[] for _ in inputs[m]]
        # one clock for the whole case, chosen on the longest call's CPU time (wall would count preemptions)
        est = max(_cpu_seconds(lambda b=b: b(inputs[m][0])) for m, b in blocks.items())
        for m in blocks:
            timers[m] = pick_timer(est, clock)
            samplers[m] = Sampler(tries if timers[m][0] == "wall" else 1)
        for _ in range(repeats):
            for m, block in blocks.items():
                timer = timers[m][1]
                for j, x in enumerate(inputs[m]):
                    xr, ids, w = prep[m][j]

                    def real(block=block, x=x, timer=timer):
                        t0 = timer()
                        block(x)
                        return {"layer_total": timer() - t0}

                    def experts(block=block, xr=xr, ids=ids, w=w, timer=timer):
                        t0 = timer()
                        block.experts(xr, ids, w)
                        return {"experts_total": timer() - t0}

                    def copy(block=block, x=x, timer=timer):
                        clk = Clock(timer)
                        block_forward(block, x, clk)
                        return {p: clk.seconds.get(p, 0.0) for p in PHASES}

                    # each part on its own, so a preemption costs one part's retry
                    run = samplers[m].run
                    samples[m][j].append(run(real) | run(experts) | run(copy))
    out = {}
    for m in blocks:
        per_input = [median_dict(s) for s in samples[m]]
        r = {k: statistics.mean(d[k] for d in per_input) for k in per_input[0]}
        r["experts_other"] = r["experts_total"] - sum(r[p] for p in EXPERT_PHASES)
        r["router_other"] = r["layer_total"] - r["experts_total"] - sum(r[p] for p in ROUTER_PHASES)
        r["clock"] = timers[m][0]
        r["samples"] = samples[m]
        r["clean_samples"] = (
            samplers[m].clean / max(samplers[m].clean + samplers[m].dirty, 1) if timers[m][0] == "wall" else None
        )
        out[m] = r
    return out


def profile_case(blocks: dict, inputs: dict, repeats: int, tries: int) -> dict:
    """The instrumented copy under torch.profiler, one session per call (kept when not preempted, as
    `Sampler`): per-call ms per labelled phase and the top aten ops by self time (median over repeats
    per input, mean over inputs)."""
    from torch.profiler import ProfilerActivity, profile

    out = {}
    with torch.no_grad():
        for m, block in blocks.items():
            per_input, sampler = [], Sampler(tries)
            for x in inputs[m]:

                def session(block=block, x=x):
                    with profile(activities=[ProfilerActivity.CPU]) as prof:
                        with torch.autograd.profiler.record_function("layer"):
                            block_forward(block, x, Clock(profile=True))
                    return prof

                runs = []
                for _ in range(repeats):
                    row = {}
                    for e in sampler.run(session).key_averages():
                        if e.key in PHASES or e.key == "layer":
                            row[e.key] = e.cpu_time_total / 1e3
                        elif e.key.startswith("aten::"):
                            row["op " + e.key[6:]] = e.self_cpu_time_total / 1e3
                            row["calls " + e.key[6:]] = e.count
                    runs.append(row)
                per_input.append(median_dict(runs))
            keys = sorted({k for d in per_input for k in d})
            r = {k: statistics.mean(d.get(k, 0.0) for d in per_input) for k in keys}
            ops = sorted(
                ((k[3:], v, r["calls " + k[3:]]) for k, v in r.items() if k.startswith("op ")), key=lambda t: -t[1]
            )
            out[m] = {
                "phases_ms": {k: v for k, v in r.items() if k in PHASES or k == "layer"},
                "top_ops": [{"op": k, "ms": t, "calls": c} for k, t, c in ops[:8]],
                "clean_sessions": sampler.clean / max(sampler.clean + sampler.dirty, 1),
            }
    return out


def matmul_bench(experts, rows: list[int], repeats: int, clock: str) -> dict:
    """The two expert matmuls (weight select + F.linear, as the layer calls them) at several row counts."""
    h, i = experts.hidden_dim, experts.intermediate_dim
    g = torch.Generator().manual_seed(0)
    x, hh = torch.randn(max(rows), h, generator=g), torch.randn(max(rows), i, generator=g)
    res = {}
    with torch.no_grad():
        for name, inp, w, flops in (
            ("gate_up", x, experts.gate_up_proj, 2 * h * 2 * i),
            ("down", hh, experts.down_proj, 2 * i * h),
        ):
            times = []
            for r in rows:
                a = inp[:r].contiguous()
                timer = pick_timer(_cpu_seconds(lambda a=a, w=w: F.linear(a, w[0], None)), clock)[1]
                samples = []
                for _ in range(repeats):
                    t0 = timer()
                    F.linear(a, w[0], None)
                    samples.append(timer() - t0)
                times.append(statistics.median(samples))
            res[name] = {"rows": rows, "seconds": times, "flops_per_row": flops, **matmul_model(rows, times, flops)}
    return res


def add_matmul_model(r: dict, stats: dict, mm: dict) -> None:
    r["pairs"], r["experts_hit"] = stats["pairs"], stats["experts_hit"]
    r["mm_ideal"] = sum(stats["pairs"] * mm[p]["flops_per_row"] / mm[p]["peak_flops"] for p in MATMULS)
    r["mm_fixed"] = stats["experts_hit"] * sum(mm[p]["fixed_s"] for p in MATMULS)


# ---- report -----------------------------------------------------------------------------------------


def _print_case(name: str, res: dict, stats: dict, prof: dict, gap: dict, top_k: int) -> None:
    t, z = res["teacher"], res["zeda"]
    st, sz = stats["teacher"], stats["zeda"]
    clean = (
        ""
        if t["clean_samples"] is None
        else f", unpreempted samples {100 * min(t['clean_samples'], z['clean_samples']):.0f}%"
    )
    print(
        f"\n== {name} ({st['slots'] / top_k:.0f} tokens a call, {st['calls']} calls; clock {t['clock']}{clean}): pairs teacher {st['pairs']:.1f} / ZEDA "
        f"{sz['pairs']:.1f} (skipped {100 * sz['skipped']:.1f}%), experts hit {st['experts_hit']:.1f} / "
        f"{sz['experts_hit']:.1f}, rows per hit expert {st['mean_rows_per_hit_expert']:.1f} / "
        f"{sz['mean_rows_per_hit_expert']:.1f}"
    )
    print(
        f"{'phase':<22}{'teacher ms':>11}{'share':>7}{'ZEDA ms':>10}{'share':>7}{'limit ms':>10}{'gap ms':>9}"
        f"{'profiler T / Z':>17}"
    )
    rho = gap["rho"]
    rows = [(p, p) for p in ROUTER_PHASES] + [("router-side other", "router_other")]
    rows += [(p, p) for p in EXPERT_PHASES] + [("experts other (loop)", "experts_other")]
    rows += [("= experts module", "experts_total"), ("= layer", "layer_total")]
    for label, k in rows:
        if k in EXPERT_PHASES or k in ("experts_other", "experts_total"):
            lim = rho * t[k]
        elif k == "layer_total":
            lim = t[k] - (1 - rho) * t["experts_total"]
        else:
            lim = t[k]
        pk = "layer" if k == "layer_total" else k
        pt, pz = prof["teacher"]["phases_ms"].get(pk), prof["zeda"]["phases_ms"].get(pk)
        pcol = "" if pt is None and pz is None else " / ".join("-" if v is None else f"{v:.3f}" for v in (pt, pz))
        print(
            f"{label:<22}{1e3 * t[k]:11.3f}{100 * t[k] / t['layer_total']:6.1f}%{1e3 * z[k]:10.3f}"
            f"{100 * z[k] / z['layer_total']:6.1f}%{1e3 * lim:10.3f}{1e3 * (z[k] - lim):9.3f}{pcol:>17}"
        )
    for m, r in (("teacher", t), ("ZEDA", z)):
        mm = sum(r[p] for p in MATMULS)
        other = sum(r[p] for p in PER_EXPERT_OPS) + r["experts_other"]
        hit = max(r["experts_hit"], 1e-9)
        print(
            f"  {m:<8} matmuls {1e3 * mm:.3f} ms = FLOP ideal {1e3 * r['mm_ideal']:.3f} + fixed {1e3 * r['mm_fixed']:.3f}"
            f" + small-row rest {1e3 * (mm - r['mm_ideal'] - r['mm_fixed']):.3f}; a hit expert: matmuls "
            f"{1e6 * mm / hit:.1f} us, other ops + loop {1e6 * other / hit:.1f} us"
        )
    print(f"  layer x {t['layer_total'] / z['layer_total']:.2f}; " + _gap_line(gap))
    for m in ("teacher", "zeda"):
        ops = ", ".join(f"{o['op']} {1e3 * o['ms']:.0f}us/{o['calls']:.0f}" for o in prof[m]["top_ops"][:6])
        print(f"  profiler ops ({m}, self us / calls a layer call): {ops}")


def _gap_line(gap: dict) -> str:
    return (
        f"expert x {gap['expert_x']:.2f}, limit {1 / gap['rho']:.2f}, eff {gap['eff']:.2f}; ZEDA's experts gap "
        f"{1e3 * gap['gap_s']:.3f} ms = "
        + ", ".join(f"{k} {1e3 * v:+.3f}" for k, v in gap["parts_s"].items() if "cancels" not in k)
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baselines", default="runs/tiny-cpu-hard-baselines", help="a `zeda baselines` output directory")
    ap.add_argument("--teacher")
    ap.add_argument("--student")
    ap.add_argument(
        "--layer", type=int, nargs="+", help="MoE layer(s) to profile, each on its own (default: every layer)"
    )
    ap.add_argument("--new", type=int, default=16, help="tokens generated while capturing (decode inputs: new - 1)")
    ap.add_argument("--repeats", type=int, default=11, help="samples per input (median); 32x256 prefill: a third")
    ap.add_argument("--prof-repeats", type=int, default=3, help="profiler sessions per input (median)")
    ap.add_argument("--tries", type=int, default=4, help="tries per sample to get one the other jobs did not preempt")
    ap.add_argument(
        "--clock", choices=["auto", "wall", "cpu"], default="auto", help="auto: wall < 2 ms a call, else cpu"
    )
    ap.add_argument("--mm-rows-max", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--cases", nargs="+", default=[f"{s} {p}" for s, p in CASES], help='e.g. "1x16 decode" (default: all four)'
    )
    ap.add_argument("--json", help="write every number to this file")
    a = ap.parse_args()
    a.net = None  # decode.py's _paths: no NET here
    if a.teacher:
        a.baselines = None
    torch.set_num_threads(a.threads)

    from transformers import AutoTokenizer

    from actors.torch_engine import TorchEngine

    t_start = time.perf_counter()
    dec = _load_decode_bench()
    paths = {k: v for k, v in dec._paths(a).items() if k in ("teacher", "zeda")}
    tok = AutoTokenizer.from_pretrained(paths["teacher"])
    engines = {m: TorchEngine(p, threads=a.threads) for m, p in paths.items()}
    for e in engines.values():
        e.model.set_experts_implementation("zeda_skip")
    cfg = engines["teacher"].model.config
    layers = a.layer if a.layer is not None else list(range(cfg.num_hidden_layers))
    blocks = {li: {m: e.model.model.layers[li].mlp for m, e in engines.items()} for li in layers}
    inputs: dict = defaultdict(lambda: defaultdict(dict))  # (shape, phase) -> layer -> model -> [x]
    for shape in ("1x16", "32x256"):
        b, s = map(int, shape.split("x"))
        prompts = dec._prompts(tok, b, s)
        for m, e in engines.items():
            for li, (pre, steps) in capture(e, layers, prompts, a.new).items():
                inputs[(shape, "prefill")][li][m] = [pre]
                inputs[(shape, "decode")][li][m] = steps

    rows = [r for r in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096) if r <= a.mm_rows_max]
    mm = matmul_bench(blocks[layers[0]]["teacher"].experts, rows, 5 * a.repeats, a.clock)
    print(
        f"layers {layers} of {cfg.num_hidden_layers}, each profiled on its own; H {cfg.hidden_size}, I "
        f"{cfg.moe_intermediate_size}, N {blocks[layers[0]]['teacher'].experts.num_experts}, K "
        f"{cfg.num_experts_per_tok}; threads {torch.get_num_threads()}; experts zeda_skip; teacher {paths['teacher']}, "
        f"ZEDA {paths['zeda']}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    for p in MATMULS:
        m = mm[p]
        print(
            f"matmul {p}: peak {m['peak_flops'] / 1e9:.1f} GFLOP/s, 1-row call {1e6 * m['seconds'][0]:.1f} us "
            f"(fixed {1e6 * m['fixed_s']:.1f} us); GFLOP/s by rows "
            + " ".join(f"{r}:{r * m['flops_per_row'] / s / 1e9:.0f}" for r, s in zip(m["rows"], m["seconds"]))
        )

    # the profiler's first session pays its set-up: not in any case's numbers
    profile_case(blocks[layers[0]], inputs[("1x16", "decode")][layers[0]], 1, 1)
    results, summary = {}, {}
    for shape, phase in CASES:
        name = f"{shape} {phase}"
        if name not in a.cases:
            continue
        ins = {(li, m): xs for li in layers for m, xs in inputs[(shape, phase)][li].items()}
        flat_blocks = {(li, m): blk for li in layers for m, blk in blocks[li].items()}
        big = ins[(layers[0], "teacher")][0].shape[:2].numel() > 1024
        # every layer and both models in each repeat, so the other jobs' load hits them alike
        single = len(ins[(layers[0], "teacher")]) == 1  # prefill: one input, more samples of it
        reps = max(5, a.repeats // 2) if big else 3 * a.repeats if single else a.repeats
        res_all = measure_case(flat_blocks, ins, reps, a.clock, a.tries)
        per_layer = []
        for li in layers:
            stats, res = {}, {}
            for m, block in blocks[li].items():
                with torch.no_grad():
                    per_call = [
                        pair_stats(_route(block, x.reshape(-1, x.shape[-1]), Clock())[0], block.experts.num_experts)
                        for x in ins[(li, m)]
                    ]
                stats[m] = {
                    k: statistics.mean(s[k] for s in per_call)
                    for k in ("slots", "pairs", "skipped", "experts_hit", "mean_rows_per_hit_expert")
                }
                stats[m]["calls"] = len(per_call)
                res[m] = res_all[(li, m)]
                add_matmul_model(res[m], stats[m], mm)
            prof = profile_case(blocks[li], inputs[(shape, phase)][li], a.prof_repeats, 1 if big else a.tries)
            gap = gap_breakdown(res["teacher"], res["zeda"])
            _print_case(f"{name}, layer {li}", res, stats, prof, gap, cfg.num_experts_per_tok)
            results[f"{name}, layer {li}"] = {"stats": stats, "seconds": res, "profiler": prof, "gap": gap}
            per_layer.append((res["teacher"], res["zeda"], gap))
        if len(layers) > 1:
            summary[name] = combine_layers(per_layer)

    if summary:
        print(f"\n== layers {layers} together (as decode.py pools them; ms a forward, the layers summed)")
        for name, g in summary.items():
            print(
                f"{name:<15} teacher {1e3 * g['teacher_experts_s']:8.3f} ms, ZEDA {1e3 * g['zeda_experts_s']:8.3f} ms "
                f"in the experts; layers x {g['layer_x']:.2f}; " + _gap_line(g)
            )
    print(
        f"\nms a layer call (decode: mean over the {a.new - 1} decode steps of the per-step medians). limit: the "
        "teacher's time x pairs_ZEDA / pairs_teacher for the experts module's phases (decode.py's 1/(1 - skip)), the "
        "teacher's time for the router side; gap = ZEDA - limit. profiler T / Z: the same phases under torch.profiler "
        f"(wall; its per-op recording inflates them). Run {time.perf_counter() - t_start:.0f} s, load average "
        f"{os.getloadavg()[0]:.1f}"
    )
    if a.json:
        Path(a.json).write_text(
            json.dumps(
                {"settings": vars(a), "matmul": mm, "results": results, "layers_together": summary},
                indent=2,
                default=str,
            )
            + "\n"
        )
        print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
