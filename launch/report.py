"""The run report: runs/<name>/report.md, report.json with the same numbers, and PNG plots.

Every number comes from this run's evaluation results and metrics JSONL.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from zeda_rl.metrics import read_events  # noqa: E402

PHASE_ORDER = ("teacher", "convert", "start", "sft", "opd", "probe", "export", "eval")


def lineage(events) -> list:
    """The events of the final model's lineage. A killed driver logged steps past the checkpoint the run resumed
    from, which the resumed driver trained again: at each `resumed` marker (cursor stage and step), the earlier
    drivers' events of that stage logged at a later step, and those of every later phase, are left out, so a
    step-indexed series holds each step once (the report counted steps 71-77 twice after a resume at step 70)."""
    kept: list[tuple] = []  # (event, phase it was logged in)
    phase = None
    for e in events:
        if e.component == "driver" and e.name == "resumed" and isinstance(e.value, dict):
            stage, step = e.value.get("stage"), int(e.value.get("step") or 0)
            at = PHASE_ORDER.index(stage) if stage in PHASE_ORDER else None
            if at is not None:
                kept = [
                    (x, ph)
                    for x, ph in kept
                    if ph not in PHASE_ORDER
                    or PHASE_ORDER.index(ph) < at
                    or (PHASE_ORDER.index(ph) == at and x.step <= step)
                ]
        if e.component == "driver" and e.name == "phase":
            phase = e.value
        kept.append((e, phase))
    return [x for x, _ in kept]


def phase_times(events, current: dict) -> tuple[dict, dict]:
    """Wall time per phase over every driver of the run, and the part of it a killed driver spent in phases it did not
    finish (work the resumed driver did again). `current`: the times of this driver (`Phases.times`, with its
    `total`). Earlier drivers are the stretches of `events` between `driver_started` markers: a finished phase
    counts its logged `phase_seconds`, an unfinished one the time to the driver's last event. Before, a resumed
    run's report showed its last driver's times alone, hiding the hours of the one that was killed."""
    drivers: list[list] = []
    for e in events:
        if e.component == "driver" and e.name == "driver_started":
            drivers.append([])
        if drivers:
            drivers[-1].append(e)
    total, cut = dict(current), {}
    for d in drivers[:-1]:
        done = set()
        for e in d:
            if e.component == "driver" and e.name.startswith("phase_seconds/"):
                name = e.name.split("/", 1)[1]
                done.add(name)
                total[name] = total.get(name, 0.0) + e.value
        started = [e for e in d if e.component == "driver" and e.name == "phase" and e.value in PHASE_ORDER]
        if started and started[-1].value not in done:
            name, lost = started[-1].value, d[-1].time - started[-1].time
            total[name] = total.get(name, 0.0) + lost
            cut[name] = cut.get(name, 0.0) + lost
        if "total" in total:
            total["total"] += d[-1].time - d[0].time
    return total, cut


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


def faults(events) -> dict:
    """What went wrong and was survived: actor restarts (launch.health), failures the driver saw,
    malformed inbox messages dropped (by reason), resumes (from which checkpoint and step)."""

    def last(name, default):
        return next((e.value for e in reversed(events) if e.component == "driver" and e.name == name), default)

    groups = sorted(
        {e.name.split("/", 1)[1] for e in events if e.component == "driver" and e.name.startswith("restarts/")}
    )
    return {
        "restarts": {g: last(f"restarts/{g}", 0) for g in groups},
        "failures_seen": sum(1 for e in events if e.component == "driver" and e.name == "actor_restart"),
        "malformed_dropped": last("dropped_malformed", 0),
        "malformed_reasons": last("malformed_reasons", {}),
        "resumes": [e.value for e in events if e.component == "driver" and e.name == "resumed"],
    }


def write_report(
    cfg, teacher_eval: dict, student_eval: dict, phase_times_now: dict, metrics_path: Path, final_version: int = 0
) -> dict:
    run = Path(cfg.run_dir)
    raw = read_events(metrics_path)
    events = lineage(raw)
    zr = student_eval["zero_ratio"]
    t_acc, s_acc = teacher_eval["accuracy"], student_eval["accuracy"]
    times, cut = phase_times(raw, phase_times_now)
    rkl = _series(events, "learner", "reverse_kl")
    zero_steps = _series(events, "learner", "zero_ratio")
    load_vio = _series(events, "learner", "expert_load_max_violation_per_layer")
    load_mean = _series(events, "learner", "expert_load_mean_violation_per_layer")
    stale = _series(events, "driver", "dropped_stale")
    too_long = {
        e.name.split("/", 1)[1]: e.value
        for e in events
        if e.component == "data" and e.name.startswith("dropped_too_long/")
    }
    scored = "mean" in t_acc and "mean" in s_acc
    opd_at = next((e.time for e in events if e.component == "driver" and e.name == "phase" and e.value == "opd"), None)
    result = {
        "name": cfg.name,
        "accuracy": {
            "teacher": t_acc,
            "student": s_acc,
            "delta_points": 100 * (s_acc["mean"] - t_acc["mean"]) if scored else None,
        },
        "eval_skipped": student_eval.get("skipped"),
        "suite": student_eval.get("suite"),
        "dropped_too_long": too_long,
        "zero_expert_ratio": {"overall": zr["overall"], "per_layer": zr["per_layer"]},
        "expert_flops_eliminated": zr["overall"],
        "reverse_kl": [{"step": s, "value": v} for s, v, _ in rkl],
        "zero_ratio_over_steps": [{"step": s, "value": v} for s, v, _ in zero_steps],
        # the normal experts' load against uniform, per layer, on the last training step (0: perfectly even)
        "expert_load_violation": {
            "max_per_layer": load_vio[-1][1] if load_vio else [],
            "mean_per_layer": load_mean[-1][1] if load_mean else [],
        },
        "opd_starts_at": None
        if opd_at is None
        else sum(t < opd_at for _, _, t in zero_steps),  # index in the list above
        "tokens_per_s": throughput(events),
        "phase_seconds": times,  # every driver's, a killed one's included
        "phase_seconds_cut": cut,  # of which in phases a killed driver did not finish (done again after the resume)
        "final_policy_version": final_version,
        "dropped_stale": stale[-1][1] if stale else 0,
        "opd_admission": next(
            (e.value for e in reversed(events) if e.component == "driver" and e.name == "admission"), None
        ),  # the last driver's: a killed one never logs its summary
        # samples trained into the final model, by every driver (a resumed run's admission counts the last one's)
        "opd_trained_in_lineage": sum(
            len(e.value) for e in events if e.component == "driver" and e.name == "trained_ids"
        ),
        "faults": faults(events),
        "versions": _versions(),
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
    _zero_ratio_plot(run, r)
    _training_plot(run, r)
    _time_plot(run, r)


def _label_bars(ax, bars) -> None:
    ax.bar_label(bars, labels=[f"{b.get_height():.1f}" for b in bars], padding=2, fontsize=8)


def _accuracy_plot(run: Path, r: dict) -> None:
    """Left: both models per family, labelled. Right: the question the report answers, student minus
    teacher in points against the 2-point target (at ~99% the bars alone cannot show it)."""
    t, s = r["accuracy"]["teacher"], r["accuracy"]["student"]
    fams = [f for f in t if f != "mean"] + ["mean"]
    limit = r["targets"]["accuracy_within_points"]
    fig, (ax, dx) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 2]})
    xs = np.arange(len(fams))
    for off, who, vals in ((-0.2, "teacher", t), (0.2, "student (ZEDA)", s)):
        _label_bars(ax, ax.bar(xs + off, [100 * vals[f] for f in fams], 0.4, label=who))
    ax.set_xticks(xs, fams)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 122)
    ax.set_title("accuracy per family")
    ax.legend(loc="upper center", ncol=2, fontsize=8)
    delta = [100 * (s[f] - t[f]) for f in fams]
    met = "tab:green" if delta[-1] >= -limit else "tab:red"  # the target is on the mean; families show where it goes
    bars = dx.bar(xs, delta, 0.6, color=["tab:gray"] * (len(fams) - 1) + [met])
    dx.bar_label(bars, labels=[f"{d:+.1f}" for d in delta], padding=2, fontsize=8)
    dx.axhline(-limit, ls="--", c="tab:red", lw=1, label=f"target: mean within {limit:g} points")
    dx.axhline(0, c="black", lw=0.8)
    dx.set_ylim(min(-limit - 1, min(delta) - 1), max(1, max(delta) + 1))
    dx.set_xticks(xs, fams)
    dx.set_ylabel("student - teacher (points)")
    dx.set_title("accuracy change")
    dx.legend(fontsize=8, loc="lower right")
    _save(fig, run / "accuracy.png")


def _zero_ratio_plot(run: Path, r: dict) -> None:
    per, target = r["zero_expert_ratio"]["per_layer"], 100 * r["targets"]["zero_ratio_at_least"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    vals = [100 * v for v in per] + [100 * r["zero_expert_ratio"]["overall"]]
    bars = ax.bar(
        [f"layer {i}" for i in range(len(per))] + ["all"], vals, color=["tab:blue"] * len(per) + ["tab:purple"]
    )
    _label_bars(ax, bars)
    ax.axhline(target, ls="--", c="tab:red", lw=1, label=f"target >= {target:g}%")
    ax.set_ylim(0, max(vals + [target]) * 1.25 + 1)
    ax.set_ylabel("routed slots on zero experts (%)")
    ax.set_title("Student's zero-expert share per MoE layer (evaluation)")
    ax.legend(fontsize=8, loc="upper left")
    _save(fig, run / "zero_ratio.png")


def _smooth(values: list[float]) -> np.ndarray:
    """Trailing mean over ~5% of the points (at least 5): the per-step estimates are noisy."""
    v = np.asarray(values, dtype=float)
    w = max(5, len(v) // 20)
    c = np.cumsum(np.insert(v, 0, 0.0))
    idx = np.arange(1, len(v) + 1)
    return (c[idx] - c[np.maximum(idx - w, 0)]) / np.minimum(idx, w)


def _training_plot(run: Path, r: dict) -> None:
    fig, (kl, zr) = plt.subplots(1, 2, figsize=(11, 3.8))
    rkl = r["reverse_kl"]
    if rkl:
        steps, vals = [p["step"] for p in rkl], [p["value"] for p in rkl]
        kl.plot(steps, vals, c="tab:blue", alpha=0.25, lw=0.8, label="per step (sampled-token estimate)")
        kl.plot(steps, _smooth(vals), c="tab:blue", lw=2, label="trailing mean")
        kl.axhline(0, c="black", lw=0.6)
        kl.legend(fontsize=8)
    kl.set_title("OPD reverse KL(student || teacher)")
    kl.set_xlabel("OPD step")
    zs = [100 * p["value"] for p in r["zero_ratio_over_steps"]]
    if zs:
        zr.plot(range(1, len(zs) + 1), zs, c="tab:purple", alpha=0.25, lw=0.8, label="per step")
        zr.plot(range(1, len(zs) + 1), _smooth(zs), c="tab:purple", lw=2, label="trailing mean")
        zr.axhline(100 * r["targets"]["zero_ratio_at_least"], ls="--", c="tab:red", lw=1, label="target")
        if r.get("opd_starts_at"):
            zr.axvline(r["opd_starts_at"] + 0.5, c="gray", ls=":", lw=1.5)
            zr.annotate(
                "OPD starts",
                (r["opd_starts_at"], 2),
                xytext=(4, 0),
                textcoords="offset points",
                fontsize=8,
                color="gray",
            )
        zr.set_ylim(0, 100)
        zr.legend(fontsize=8, loc="upper left")
    zr.set_title("zero-expert share during training (%)")
    zr.set_xlabel("learner step (SFT, then OPD)")
    _save(fig, run / "training.png")


def _time_plot(run: Path, r: dict) -> None:
    fig, (tp, ph) = plt.subplots(1, 2, figsize=(11, 3.8))
    tps = r["tokens_per_s"]
    bars = tp.bar(list(tps), list(tps.values()), color="tab:blue")
    tp.bar_label(bars, labels=[f"{v:,.0f}" for v in tps.values()], padding=2, fontsize=8)
    tp.set_ylim(0, max(list(tps.values()) + [1]) * 1.2)
    tp.set_ylabel("tokens/s")
    tp.set_title("throughput per component (while it reported)")
    times = {k: v for k, v in r["phase_seconds"].items() if k != "total"}
    bars = ph.barh(list(times), list(times.values()), color="tab:gray")
    ph.bar_label(bars, labels=[_duration(v) for v in times.values()], padding=3, fontsize=8)
    ph.invert_yaxis()  # phases top to bottom in run order
    ph.set_xlim(0, max(list(times.values()) + [1]) * 1.2)
    ph.set_xlabel("seconds")
    total = r["phase_seconds"].get("total")
    ph.set_title("wall time per phase" + (f" (total {_duration(total)})" if total else ""))
    _save(fig, run / "throughput_time.png")


def _duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 60 else f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _admission_line(a: dict | None, resumes: list, lineage_trained: int) -> str:
    if not a:
        return "- OPD admission: no OPD samples"
    util = ", ".join(f"{100 * u:.0f}%" for u in a["engine_utilisation"])
    at = [r.get("step", 0) for r in resumes if r.get("stage") == "opd"]
    return (
        f"- OPD samples{f' (counted by the last driver, from OPD step {at[-1]})' if at else ''}: {a['admitted']} "
        f"admitted, {a['trained']} trained, {100 * a['drop_share']:.1f}% dropped "
        f"({', '.join(f'{k}: {v}' for k, v in a['dropped'].items()) or 'none'}); rollout engines busy {util} of the phase, "
        f"calls per engine {a['engine_calls']}"
        + (f"; trained into the final model by every driver: {lineage_trained}" if at else "")
    )


def _faults_line(f: dict) -> str:
    restarts = ", ".join(f"{g} {n}" for g, n in f["restarts"].items()) or "none seen"
    reasons = ", ".join(f"{k}: {v}" for k, v in sorted(f["malformed_reasons"].items()))
    resumes = "; ".join(
        f"from learner step {r.get('learner_step')} (OPD step {r.get('step', '-')})" for r in f["resumes"]
    )
    return (
        f"- Faults survived: actor restarts {restarts}; engine failures seen by the driver {f['failures_seen']}; "
        f"malformed inbox messages dropped {f['malformed_dropped']}{f' ({reasons})' if reasons else ''}; "
        f"resumed {len(f['resumes'])} time{'' if len(f['resumes']) == 1 else 's'}{f' ({resumes})' if resumes else ''}"
    )


def _versions() -> dict:
    from zeda_rl.versions import library_versions

    return library_versions()


def _phase_rows(times: dict, cut: dict) -> str:
    return "\n".join(
        f"| {k} | {v:.1f}{f' (of which {cut[k]:.1f} in a killed driver, done again)' if k in cut else ''} |"
        for k, v in times.items()
    )


def _markdown(r: dict) -> str:
    t, s = r["accuracy"]["teacher"], r["accuracy"]["student"]
    rows = "\n".join(f"| {f} | {100 * t[f]:.1f} | {100 * s[f]:.1f} |" for f in t)
    per = ", ".join(f"{100 * v:.1f}%" for v in r["zero_expert_ratio"]["per_layer"])
    tps = r["tokens_per_s"]
    ph = _phase_rows(r["phase_seconds"], r["phase_seconds_cut"])
    tg = r["targets"]
    rkl = r["reverse_kl"]
    accuracy = (
        f"""| {"benchmark" if r.get("suite") else "task family"} | teacher | student |
|---|---|---|
{rows}

Student minus teacher: {r["accuracy"]["delta_points"]:+.1f} points.

![accuracy](accuracy.png)"""
        if not r["eval_skipped"]
        else f"Evaluation skipped: {r['eval_skipped']}."
    )
    dropped = r["dropped_too_long"]
    return f"""# ZEDA run report: {r["name"]}

## Accuracy ({f"benchmark suite {r['suite']}, avg@k, %; per-benchmark r_ZE in [eval/eval.md](eval/eval.md)" if r.get("suite") else "held-out exact match, %"})
{accuracy}

## Zero experts
- Routed slots on zero experts: **{100 * r["zero_expert_ratio"]["overall"]:.1f}%** (per MoE layer: {per})
- Routed-expert FLOPs eliminated: ~{100 * r["expert_flops_eliminated"]:.1f}% (all routed experts have the same size; a shared expert is not counted)
- Load of the real experts against uniform, last training step, per MoE layer (max / mean relative violation): {", ".join(f"{a:.2f} / {b:.2f}" for a, b in zip(r["expert_load_violation"]["max_per_layer"], r["expert_load_violation"]["mean_per_layer"])) or "n/a"}

![zero ratio](zero_ratio.png)

## Training
- OPD reverse KL: {f"{rkl[0]['value']:.4f} -> {rkl[-1]['value']:.4f}" if rkl else "n/a"} over {len(rkl)} steps
- Final policy version: {r["final_policy_version"]}; samples dropped as too stale: {r["dropped_stale"]}
{_admission_line(r["opd_admission"], r["faults"]["resumes"], r["opd_trained_in_lineage"])}
{_faults_line(r["faults"])}
- Records dropped as longer than data.max_prompt_tokens / data.max_response_tokens: {sum(dropped.values())}{f" ({', '.join(f'{k}: {v}' for k, v in dropped.items())})" if dropped else ""}

![training](training.png)

## Throughput and time
- tokens/s: rollout {tps["rollout"]:.1f}, teacher {tps["teacher"]:.1f}, learner {tps["learner"]:.1f}
- versions: {", ".join(f"{k} {v}" for k, v in r["versions"].items())}

| phase | seconds |
|---|---|
{ph}

![throughput](throughput_time.png)

## Targets (embedded default)
- zero share >= 45%: {"met" if tg["met_zero"] else "NOT met: raise learner.w (r* = wN_Z/(N+wN_Z)) or alpha, or train longer (sft.steps)"}
- accuracy within 2 points of the teacher: {"met" if tg["met_accuracy"] else "NOT met: more SFT steps or prompts, then more OPD steps; a lower w trades zero share for accuracy"}
"""
