"""`zeda baselines`: ZEDA against the paper's baselines, each through the same engine and evaluation.

The paper's comparison (its Table 2 layout): the original model (the teacher, the reference),
Dynamic Skipping (training-free: a lower-ranked selected expert is skipped when its gate weight
is below a threshold times the top weight, the threshold calibrated to ZEDA's zero share), NET
(static top-K/2, trained with the same SFT -> OPD recipe), ZEDA after SFT only, and ZEDA.

None of them is a fork of the model. Dynamic Skipping is an inference option of the zero-expert
model (`skip_threshold`) on the converted checkpoint with use_zce_mask on, which is the teacher
exactly. NET is the routing option `static_top_k` = K/2 on a converted checkpoint with N_Z = 0: the same
model as the teacher with top_k halved (a test pins it), which the learner trains as it trains
ZEDA (router_spec is shared; L_GA is off, there is no zero group; routing replay replays the
K/2 slots), and whose skipped half is counted like every other variant's skips: routed slots
that no expert computes, out of the teacher's K.

Training reuses the pipeline's phases (`launch.sft`, `launch.opd`) on the run's config; the
teacher's SFT answers are generated once and NET trains on the same file in the same order.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from launch.config import RunConfig
from launch.runlog import Phases, console
from zeda_rl.metrics import MetricsLog

VARIANTS = ("original", "dynamic_skipping", "net", "zeda_sft", "zeda")
LABELS = {
    "original": "Original (teacher)",
    "dynamic_skipping": "Dynamic Skipping",
    "net": "NET (static top-K/2)",
    "zeda_sft": "ZEDA (SFT only)",
    "zeda": "ZEDA",
}
MATCHED = 0.03  # zero shares this close count as matched


# ---- checkpoints ----------------------------------------------------------------------------------


def net_checkpoint(teacher: Path, out: Path) -> Path:
    """The teacher as a zero-expert checkpoint with no zero expert and a static top-K/2: what NET trains.

    Only config.json changes (the router keeps its N rows, top_k stays K, static_top_k = K/2
    fills the other half of the slots with the skip sentinel), so the weights are the teacher's,
    Megatron keeps its top-K dispatcher (it refuses top-1 without pre-softmax routing), and the
    engines' recorded ids replay in the learner as they do for ZEDA.
    """
    from zeda_rl.arch import read_config, spec_for
    from zeda_rl.hfdir import replace_dir
    from zeda_rl.release import release_config

    raw = read_config(teacher)
    spec = spec_for(raw, str(teacher / "config.json"))
    k = int(raw["num_experts_per_tok"])
    if k < 2:
        raise ValueError(f"{teacher}: top_k {k} cannot be halved (NET needs K >= 2)")
    cfg = release_config(raw, spec, zce_nums=[0], zce_types=["zero"], use_zce_mask=False)
    cfg["static_top_k"] = k // 2
    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(teacher, tmp)
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    replace_dir(tmp, out)
    return out


def load_variant(checkpoint: Path, mask: bool = False):
    """A checkpoint for evaluation (`mask`: use_zce_mask on, i.e. the original model)."""
    from zeda_rl.evaluate import load
    from zeda_rl.modeling import set_zce_mask

    model, tok = load(checkpoint)
    if mask:
        set_zce_mask(model, True)
    return model, tok


# ---- training: the pipeline's phases, plus an export after SFT -----------------------------------


def train(cfg: RunConfig, teacher: Path, init: Path, log: MetricsLog, phases: Phases, label: str) -> tuple[Path, Path]:
    """SFT then OPD from `init` with the run's recipe; returns (checkpoint after SFT, final checkpoint)."""
    import ray
    from ray.util.placement_group import remove_placement_group

    from launch.fleet import start_actors
    from launch.opd import opd_phase
    from launch.pipeline import prepare_data
    from launch.sft import sft_phase
    from learner.actor import LearnerGroup

    data = prepare_data(cfg, teacher, log)
    learner = LearnerGroup.from_run_config(cfg, init)
    actors, pg = [], None
    try:
        endpoint = learner.open_inbox(cfg.cluster.bind_host, cfg.cluster.inbox_port)
        rollouts, teachers, pg = start_actors(cfg, teacher, init, endpoint, data.format.tokenizer.pad_token_id or 0)
        actors = rollouts + list(teachers.actors)
        with phases(f"{label} sft"):
            sft_phase(cfg, teachers, learner, teacher, data, log)
            sft_dir = learner.export_hf(cfg.run_dir / "student-sft")
        with phases(f"{label} opd"):
            opd_phase(cfg, rollouts, teachers, learner, data, log)
            final = learner.export_hf(cfg.run_dir / "student")
        if cfg.opd.probe_every:
            from launch.probe import probe_phase

            with phases(f"{label} probe"):
                probe_phase(cfg, teacher, log)
    finally:
        learner.shutdown()
        for a in actors:
            ray.kill(a)
        if pg is not None:
            remove_placement_group(pg)
    return sft_dir, final


# ---- evaluation -------------------------------------------------------------------------------


def suite_of(cfg: RunConfig) -> str:
    """The built-in task suite the run trains and evaluates on ('basic' unless the config names another)."""
    return cfg.data.tasks


def evaluate_variant(name: str, checkpoint: Path, cfg: RunConfig, log: MetricsLog, model=None, tok=None) -> dict:
    """Accuracy per family and r_ZE (share of the K routed slots per token that no expert computes)."""
    from zeda_rl.evaluate import evaluate

    if model is None:
        model, tok = load_variant(checkpoint)
    t0 = time.time()
    r = evaluate(
        checkpoint,
        n_per_family=cfg.eval.n_per_family,
        model=model,
        tokenizer=tok,
        log=log,
        label=f"eval {name}",
        tasks=suite_of(cfg),
    )
    return {
        "variant": name,
        "label": LABELS[name],
        "checkpoint": str(checkpoint),
        "accuracy": r["accuracy"],
        "r_ze": r["zero_ratio"]["overall"],
        "zero_ratio_per_layer": r["zero_ratio"]["per_layer"],
        "hits": r["hits"],  # per held-out prompt: what the paired comparisons resample
        "eval_seconds": round(time.time() - t0, 1),
    }


def calibration_texts(cfg: RunConfig, n_per_family: int = 64) -> list[str]:
    """Training-split prompts with their answers: Dynamic Skipping never sees the held-out prompts."""
    from zeda_rl.tasks import make_split

    return [e.prompt + e.answer for e in make_split("train", n_per_family, seed=cfg.seed + 1, suite=suite_of(cfg))]


def analyse(cfg: RunConfig, zeda: Path, teacher: Path, n_per_family: int, out: Path) -> dict:
    """Where the ZEDA student skips, over its greedy held-out generations (`zeda_rl.analysis`)."""
    from zeda_rl.analysis import plot_curves, summarize, token_stats
    from zeda_rl.evaluate import load
    from zeda_rl.tasks import make_split

    examples = make_split("heldout", n_per_family, suite=suite_of(cfg))
    student, tok = load(zeda)
    teacher_model, _ = load(teacher)
    max_new = max(len(tok(e.answer).input_ids) for e in examples) + 4  # zeda_rl.evaluate's cap
    stats = token_stats(student, teacher_model, tok, [e.prompt for e in examples], max_new)
    summary = summarize(stats, [e.family for e in examples])
    plot_curves(summary, out / "skip_analysis.png")
    return summary


# ---- the whole comparison ------------------------------------------------------------------------


def run_baselines(
    cfg: RunConfig,
    out: Path | None = None,
    analysis_per_family: int = 200,
    seeds: list[int] | None = None,
    eval_only: bool = False,
) -> dict:
    """Train ZEDA and NET once per seed, evaluate every variant, write baselines.{json,md} and the plots under `out`.

    `seeds` vary the students' training (SFT data order, OPD sampling, the learner's init of nothing
    else): the teacher (`model.teacher_seed`) and the converted checkpoint are the same for all of them,
    so the spread over seeds is the training noise alone. Rows are means over seeds; each comparison
    comes with paired 95% intervals over prompts, over seeds and over both (`zeda_rl.stats`).
    """
    from launch.checkpoints import prepare_checkpoints
    from launch.fleet import connect_ray

    seeds = list(seeds) if seeds else [cfg.seed]
    out = Path(out) if out is not None else Path(cfg.output_dir) / f"{cfg.name}-baselines"
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").unlink(missing_ok=True)
    log = MetricsLog(out / "metrics.jsonl")
    phases = Phases(log)
    t_start = time.time()
    try:
        icfg = cfg.model_copy(update={"output_dir": str(out), "name": "init"})
        icfg.run_dir.mkdir(parents=True, exist_ok=True)
        teacher, zinit = prepare_checkpoints(icfg, phases)
        ninit = net_checkpoint(teacher, icfg.run_dir / "net-init")
        if not eval_only:
            connect_ray(cfg)
        per_seed = []
        for seed in seeds:
            tag = f"-s{seed}" if len(seeds) > 1 else ""
            scfg = cfg.model_copy(update={"seed": seed, "output_dir": str(out)})
            zcfg = scfg.model_copy(update={"name": f"zeda{tag}"})
            ncfg = scfg.model_copy(
                update={
                    "name": f"net{tag}",
                    "data": cfg.data.model_copy(update={"sft_rollouts": str(zcfg.run_dir / "rollouts")}),
                }
            )
            for c in (zcfg, ncfg):
                c.run_dir.mkdir(parents=True, exist_ok=True)
            if eval_only:  # an earlier run's students, evaluated again (e.g. with more prompts)
                zsft, zfinal, nsft, nfinal = (
                    _trained(c.run_dir / d) for c in (zcfg, ncfg) for d in ("student-sft", "student")
                )
            else:
                zsft, zfinal = train(
                    zcfg, teacher, zinit, MetricsLog(zcfg.run_dir / "metrics.jsonl"), phases, f"zeda{tag}"
                )
                nsft, nfinal = train(
                    ncfg, teacher, ninit, MetricsLog(ncfg.run_dir / "metrics.jsonl"), phases, f"net{tag}"
                )
            rows = {}
            with phases(f"eval{tag}"):
                rows["zeda"] = evaluate_variant("zeda", zfinal, cfg, log)
                rows["zeda_sft"] = evaluate_variant("zeda_sft", zsft, cfg, log)
                rows["net"] = evaluate_variant("net", nfinal, cfg, log)
                from zeda_rl.analysis import calibrate_skip_threshold

                model, tok = load_variant(
                    zinit, mask=True
                )  # the converted teacher with the mask on: the original model
                calib = calibrate_skip_threshold(model, tok, calibration_texts(scfg), target=rows["zeda"]["r_ze"])
                rows["dynamic_skipping"] = evaluate_variant("dynamic_skipping", zinit, cfg, log, model, tok)
                rows["dynamic_skipping"]["calibration"] = calib
            per_seed.append({"seed": seed, "zeda_checkpoint": str(zfinal), **rows})
        with phases("eval"):
            original = evaluate_variant("original", teacher, cfg, log)
        with phases("analysis"):
            summary = analyse(
                cfg, Path(per_seed[0]["zeda_checkpoint"]), teacher, min(analysis_per_family, cfg.eval.n_per_family), out
            )
        phases.times["total"] = time.time() - t_start
        result = summarise(cfg, original, per_seed, summary, phases.times)
        write_outputs(result, out)
        return result
    finally:
        log.close()


def _trained(path: Path) -> Path:
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no trained checkpoint here (--eval-only evaluates an earlier run's students)")
    return path


def summarise(cfg: RunConfig, original: dict, per_seed: list[dict], analysis: dict, times: dict) -> dict:
    """The seed-averaged rows (the table), each variant's spread over seeds, and the paired comparisons."""
    import numpy as np

    from zeda_rl import stats

    def mean_row(name: str) -> dict:
        rs = [p[name] for p in per_seed] if name != "original" else [original]
        acc = {k: float(np.mean([r["accuracy"][k] for r in rs])) for k in rs[0]["accuracy"]}
        row = {
            "variant": name,
            "label": LABELS[name],
            "accuracy": acc,
            "r_ze": float(np.mean([r["r_ze"] for r in rs])),
            "checkpoint": rs[0]["checkpoint"],
            "spread": stats.spread([r["accuracy"]["mean"] for r in rs]),
            "per_seed": [{"accuracy": r["accuracy"]["mean"], "r_ze": r["r_ze"]} for r in rs],
        }
        if name == "dynamic_skipping":
            row["calibration"] = rs[0]["calibration"]
        return row

    def hits(name: str):
        return [original["hits"]] if name == "original" else [p[name]["hits"] for p in per_seed]

    rows = {v: mean_row(v) for v in VARIANTS}
    comparisons = []
    for other in ("zeda_sft", "net", "dynamic_skipping", "original"):
        c = stats.compare(hits("zeda"), hits(other), "ZEDA", LABELS[other])
        c.update(
            variant=other,
            zeda_r_ze=rows["zeda"]["r_ze"],
            variant_r_ze=rows[other]["r_ze"],
            matched=abs(rows["zeda"]["r_ze"] - rows[other]["r_ze"]) <= MATCHED,
        )
        comparisons.append(c)
    return {
        "config": cfg.name,
        "suite": suite_of(cfg),
        "n_per_family": cfg.eval.n_per_family,
        "seeds": [p["seed"] for p in per_seed],
        "teacher_seed": cfg.model.teacher_seed,
        "rows": [rows[v] for v in VARIANTS],
        "comparison": comparisons,
        "analysis": analysis,
        "phase_seconds": {k: round(v, 1) for k, v in times.items()},
        "versions": _versions(),
    }


def _versions() -> dict:
    from zeda_rl.versions import library_versions

    return library_versions()


# ---- outputs ------------------------------------------------------------------------------------


def markdown(result: dict) -> str:
    rows = result["rows"]
    fams = [f for f in rows[0]["accuracy"] if f != "mean"]
    head = "| method | " + " | ".join(fams) + " | Avg. | r_ZE |\n|---|" + "---|" * (len(fams) + 2)
    lines = [
        f"| {r['label']} | "
        + " | ".join(f"{100 * r['accuracy'][f]:.1f}" for f in fams)
        + f" | **{100 * r['accuracy']['mean']:.1f}** | {100 * r['r_ze']:.1f}% |"
        for r in rows
    ]
    verdict = [
        "| ZEDA vs | difference (points) | per seed | 95% CI, prompts | 95% CI, seeds | 95% CI, both | verdict | r_ZE |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in result["comparison"]:
        where = "matched" if c["matched"] else "NOT matched"
        ci = [f"[{lo:+.1f}, {hi:+.1f}]" if lo == lo else "-" for lo, hi in (c["ci_prompts"], c["ci_seeds"], c["ci"])]
        verdict.append(
            f"| {LABELS[c['variant']]} | {c['delta_points']:+.2f} | {', '.join(f'{d:+.1f}' for d in c['per_seed'])} | "
            f"{' | '.join(ci)} | **{c['verdict']}** | {100 * c['zeda_r_ze']:.1f}% vs {100 * c['variant_r_ze']:.1f}% ({where}) |"
        )
    spread = ", ".join(
        f"{r['label']} {r['spread']['mean']:.1f} +- {r['spread']['std']:.1f} "
        f"({r['spread']['min']:.1f}-{r['spread']['max']:.1f})"
        for r in rows
        if r["variant"] != "original"
    )
    v = result.get("versions", {})
    ds = next(r for r in rows if r["variant"] == "dynamic_skipping")["calibration"]
    a = result["analysis"]
    reading = a.get("zero_share_prompt_tokens_per_family") or {}
    fam_z = ", ".join(
        f"{f} {100 * v:.1f}% (prompt tokens {100 * reading[f]:.1f}%)" if f in reading else f"{f} {100 * v:.1f}%"
        for f, v in a["zero_share_per_family"].items()
    )
    ent = ", ".join(f"{p['x']:.2g}: {100 * p['y']:.0f}%" for p in a["zero_share_by_entropy"])
    gap = ", ".join(f"{p['x']:.2g}: {100 * p['y']:.0f}%" for p in a["zero_share_by_teacher_gap"])
    times = ", ".join(f"{k} {v:.0f} s" for k, v in result["phase_seconds"].items())
    return f"""# ZEDA and its baselines ({result["config"]}, {result["suite"]} tasks)

Held-out exact match (%), {result["n_per_family"]} prompts per family, greedy, mean over training seeds
{result.get("seeds", [])} (one teacher, teacher seed {result.get("teacher_seed", 0)}); r_ZE = share of the
teacher's K routed slots per token that no expert computes (zero experts, skipped or static).

{head}
{chr(10).join(lines)}

Spread over seeds (mean +- sd, min-max): {spread}.

Paired comparisons on the same held-out prompts (and, per seed, the same training seed). A difference
whose 95% interval over prompts and seeds together ("both") holds 0 is "no difference".

{chr(10).join(verdict)}

Versions: {", ".join(f"{k} {x}" for k, x in v.items())}.

Dynamic Skipping threshold {ds["threshold"]:.4f}: {100 * ds["share"]:.1f}% skipped on {ds["calibration_texts"]} training-split
texts for a target of {100 * ds["target"]:.1f}% (at most {100 * ds["reachable"]:.1f}% can be skipped with K slots: the top one stays).

![accuracy and zero share](baselines.png)

## Where the ZEDA student skips ({a["tokens"]} generated tokens)

- zero share of the steps that generate, per family (and of the prompt tokens the model only reads): {fam_z}
- zero share by student entropy (bin mean in nats: share): {ent}; Spearman {a["spearman_zero_entropy"]:+.2f}
- zero share by |teacher - student| logprob (bin mean: share): {gap}; Spearman {a["spearman_zero_teacher_gap"]:+.2f}

![where tokens skip](skip_analysis.png)

Wall time: {times}.
"""


def bar_plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = result["rows"]
    fams = [f for f in rows[0]["accuracy"] if f != "mean"] + ["mean"]
    fig, (ax, zx) = plt.subplots(1, 2, figsize=(13, 4), gridspec_kw={"width_ratios": [3, 1.3]})
    width = 0.8 / len(rows)
    xs = np.arange(len(fams))
    for i, r in enumerate(rows):
        bars = ax.bar(
            xs + (i - (len(rows) - 1) / 2) * width, [100 * r["accuracy"][f] for f in fams], width, label=r["label"]
        )
        ax.bar_label(bars, labels=[f"{100 * r['accuracy'][f]:.1f}" for f in fams], padding=1, fontsize=5.5, rotation=90)
    ax.set_xticks(xs, [f if f != "mean" else "Avg." for f in fams])
    ax.set_ylabel("held-out exact match (%)")
    # zoomed to the bars: the question is a point or two, which a 0-100 axis cannot show
    low = min(100 * r["accuracy"][f] for r in rows for f in fams)
    lo = max(0.0, 5 * np.floor((low - 2) / 5))
    ax.set_ylim(lo, 100 + 0.12 * (100 - lo))
    ref = 100 * rows[0]["accuracy"]["mean"] - 2  # rows[0] is the original model
    ax.axhline(ref, color="grey", ls="--", lw=0.8, label="teacher Avg. - 2 points")
    ax.legend(fontsize=7, ncol=len(rows) + 1, loc="upper center", bbox_to_anchor=(0.5, -0.08))
    ax.set_title("accuracy per task family")
    bars = zx.bar(range(len(rows)), [100 * r["r_ze"] for r in rows], color=[f"C{i}" for i in range(len(rows))])
    zx.bar_label(bars, labels=[f"{100 * r['r_ze']:.1f}" for r in rows], padding=2, fontsize=8)
    zx.set_xticks(
        range(len(rows)), [r["label"].replace(" (", "\n(") for r in rows], rotation=30, ha="right", fontsize=7
    )
    zx.set_ylabel("r_ZE: routed slots not computed (%)")
    zx.set_ylim(0, 100)
    zx.set_title("zero / skipped share")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_outputs(result: dict, out: Path) -> dict:
    (out / "baselines.json").write_text(json.dumps(result, indent=2) + "\n")
    bar_plot(result, out / "baselines.png")
    (out / "baselines.md").write_text(markdown(result))
    console.print(f"baselines table: {out / 'baselines.md'}")
    return {"json": out / "baselines.json", "markdown": out / "baselines.md", "plot": out / "baselines.png"}
