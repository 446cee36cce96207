"""The run report: runs/<name>/report.md, report.json with the same numbers, and PNG plots.

Every number comes from this run's evaluation results and metrics JSONL.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from zeda_rl.metrics import read_events  # noqa: E402


def _series(events, component, name):
    return [(e.step, e.value, e.time) for e in events if e.component == component and e.name == name]


def throughput(events) -> dict[str, float]:
    """Tokens/s per component, over the span in which that component reported."""
    out = {}
    for comp in ("rollout", "teacher", "learner"):
        pts = [(e.time, float(e.value)) for e in events if e.component == comp and e.name == "tokens"]
        if len(pts) >= 2:
            span = max(pts[-1][0] - pts[0][0], 1e-6)
            out[comp] = sum(v for _, v in pts[1:]) / span
        else:
            out[comp] = 0.0
    return out


def write_report(cfg, teacher_eval: dict, student_eval: dict, phase_times: dict, metrics_path: Path, final_version: int = 0) -> dict:
    run = Path(cfg.run_dir)
    events = read_events(metrics_path)
    zr = student_eval["zero_ratio"]
    t_acc, s_acc = teacher_eval["accuracy"], student_eval["accuracy"]
    rkl = _series(events, "learner", "reverse_kl")
    zero_steps = _series(events, "learner", "zero_ratio")
    stale = _series(events, "driver", "dropped_stale")
    too_long = {e.name.split("/", 1)[1]: e.value for e in events if e.component == "data" and e.name.startswith("dropped_too_long/")}
    scored = "mean" in t_acc and "mean" in s_acc
    result = {
        "name": cfg.name,
        "accuracy": {"teacher": t_acc, "student": s_acc, "delta_points": 100 * (s_acc["mean"] - t_acc["mean"]) if scored else None},
        "eval_skipped": student_eval.get("skipped"),
        "suite": student_eval.get("suite"),
        "dropped_too_long": too_long,
        "zero_expert_ratio": {"overall": zr["overall"], "per_layer": zr["per_layer"]},
        "expert_flops_eliminated": zr["overall"],
        "reverse_kl": [{"step": s, "value": v} for s, v, _ in rkl],
        "zero_ratio_over_steps": [{"step": s, "value": v} for s, v, _ in zero_steps],
        "tokens_per_s": throughput(events),
        "phase_seconds": phase_times,
        "final_policy_version": final_version,
        "dropped_stale": stale[-1][1] if stale else 0,
        "opd_admission": next((e.value for e in reversed(events) if e.component == "driver" and e.name == "admission"), None),
        "targets": {
            "zero_ratio_at_least": 0.45,
            "accuracy_within_points": 2.0,
            "met_zero": zr["overall"] >= 0.45,
            "met_accuracy": scored and 100 * (t_acc["mean"] - s_acc["mean"]) <= 2.0,
        },
    }
    tmp = run / "report.json.tmp"
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(run / "report.json")
    _plots(run, result)
    md = _markdown(result)
    tmp = run / "report.md.tmp"
    tmp.write_text(md)
    tmp.replace(run / "report.md")
    return result


def _plots(run: Path, r: dict) -> None:
    if not r["eval_skipped"]:
        _accuracy_plot(run, r)
    _other_plots(run, r)


def _accuracy_plot(run: Path, r: dict) -> None:
    fams = [f for f in r["accuracy"]["teacher"] if f != "mean"] + ["mean"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    xs = range(len(fams))
    ax.bar([x - 0.2 for x in xs], [100 * r["accuracy"]["teacher"][f] for f in fams], 0.4, label="teacher")
    ax.bar([x + 0.2 for x in xs], [100 * r["accuracy"]["student"][f] for f in fams], 0.4, label="student (ZEDA)")
    ax.set_xticks(list(xs), fams)
    ax.set_ylabel("held-out exact match (%)")
    ax.set_ylim(0, 105)
    ax.legend()
    _save(fig, run / "accuracy.png")


def _other_plots(run: Path, r: dict) -> None:
    per = r["zero_expert_ratio"]["per_layer"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar([f"L{i}" for i in range(len(per))] + ["all"], [100 * v for v in per] + [100 * r["zero_expert_ratio"]["overall"]])
    ax.axhline(50, ls="--", c="gray", lw=1)
    ax.set_ylabel("routed slots on zero experts (%)")
    _save(fig, run / "zero_ratio.png")

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    if r["reverse_kl"]:
        axes[0].plot([p["step"] for p in r["reverse_kl"]], [p["value"] for p in r["reverse_kl"]])
    axes[0].set_title("OPD reverse KL (sampled-token estimate)")
    axes[0].set_xlabel("OPD step")
    if r["zero_ratio_over_steps"]:
        axes[1].plot(range(len(r["zero_ratio_over_steps"])), [100 * p["value"] for p in r["zero_ratio_over_steps"]])
    axes[1].set_title("zero-expert ratio during training (%)")
    axes[1].set_xlabel("learner step (SFT then OPD)")
    _save(fig, run / "training.png")

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    tps = r["tokens_per_s"]
    axes[0].bar(list(tps), list(tps.values()))
    axes[0].set_title("tokens/s")
    ph = {k: v for k, v in r["phase_seconds"].items() if k != "total"}
    axes[1].barh(list(ph), list(ph.values()))
    axes[1].set_title("wall time per phase (s)")
    _save(fig, run / "throughput_time.png")


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _admission_line(a: dict | None) -> str:
    if not a:
        return "- OPD admission: no OPD samples"
    util = ", ".join(f"{100 * u:.0f}%" for u in a["engine_utilisation"])
    return (f"- OPD samples: {a['admitted']} admitted, {a['trained']} trained, {100 * a['drop_share']:.1f}% dropped "
            f"({', '.join(f'{k}: {v}' for k, v in a['dropped'].items()) or 'none'}); rollout engines busy {util} of the phase, "
            f"calls per engine {a['engine_calls']}")


def _markdown(r: dict) -> str:
    t, s = r["accuracy"]["teacher"], r["accuracy"]["student"]
    rows = "\n".join(f"| {f} | {100 * t[f]:.1f} | {100 * s[f]:.1f} |" for f in t)
    per = ", ".join(f"{100 * v:.1f}%" for v in r["zero_expert_ratio"]["per_layer"])
    tps = r["tokens_per_s"]
    ph = "\n".join(f"| {k} | {v:.1f} |" for k, v in r["phase_seconds"].items())
    tg = r["targets"]
    rkl = r["reverse_kl"]
    accuracy = f"""| {'benchmark' if r.get('suite') else 'task family'} | teacher | student |
|---|---|---|
{rows}

Student minus teacher: {r['accuracy']['delta_points']:+.1f} points.

![accuracy](accuracy.png)""" if not r["eval_skipped"] else f"Evaluation skipped: {r['eval_skipped']}."
    dropped = r["dropped_too_long"]
    return f"""# ZEDA run report: {r['name']}

## Accuracy ({f"benchmark suite {r['suite']}, avg@k, %; per-benchmark r_ZE in [eval/eval.md](eval/eval.md)" if r.get('suite') else "held-out exact match, %"})
{accuracy}

## Zero experts
- Routed slots on zero experts: **{100 * r['zero_expert_ratio']['overall']:.1f}%** (per MoE layer: {per})
- Routed-expert FLOPs eliminated: ~{100 * r['expert_flops_eliminated']:.1f}% (all routed experts have the same size; a shared expert is not counted)

![zero ratio](zero_ratio.png)

## Training
- OPD reverse KL: {f"{rkl[0]['value']:.4f} -> {rkl[-1]['value']:.4f}" if rkl else "n/a"} over {len(rkl)} steps
- Final policy version: {r['final_policy_version']}; samples dropped as too stale: {r['dropped_stale']}
{_admission_line(r['opd_admission'])}
- Records dropped as longer than data.max_prompt_tokens / data.max_response_tokens: {sum(dropped.values())}{f" ({', '.join(f'{k}: {v}' for k, v in dropped.items())})" if dropped else ""}

![training](training.png)

## Throughput and time
- tokens/s: rollout {tps['rollout']:.1f}, teacher {tps['teacher']:.1f}, learner {tps['learner']:.1f}

| phase | seconds |
|---|---|
{ph}

![throughput](throughput_time.png)

## Targets (embedded default)
- zero share >= 45%: {'met' if tg['met_zero'] else 'NOT met: raise learner.w (r* = wN_Z/(N+wN_Z)) or alpha, or train longer (sft.steps)'}
- accuracy within 2 points of the teacher: {'met' if tg['met_accuracy'] else 'NOT met: more SFT steps or prompts, then more OPD steps; a lower w trades zero share for accuracy'}
"""
