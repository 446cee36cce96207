"""The OPD probe phase: every student snapshot `launch.opd` exported, measured on held-out prompts.

`opd.probe_every: N` makes the OPD loop export the student after SFT (step 0) and every N steps
(RUN_DIR/probe/step_NNNNN); after the phase this module runs `zeda_rl.probe` on each against the
teacher and writes RUN_DIR/opd_probe.json and opd_probe.png: held-out accuracy (greedy and at
temperature 1), held-out reverse KL (sampled-token estimate and exact), the same estimate on the
training batches, the advantage's mean, spread and positive share, response tokens per update,
and the zero share over steps. The student and the teacher load in the driver: it is a research
tool for the built-in tasks (the config refuses it on other data), not a real-model feature.
"""

from __future__ import annotations

import json
from pathlib import Path

from zeda_rl.metrics import MetricsLog, read_events

LEARNER_SERIES = (
    "reverse_kl",
    "full_kl",
    "adv_mean",
    "adv_std",
    "adv_pos_frac",
    "response_tokens",
    "zero_ratio",
    "aux_loss",
    "expert_load_max_violation",
)


def snapshot_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "probe" / f"step_{step:05d}"


def probe_phase(cfg, teacher_dir: Path, log: MetricsLog) -> dict:
    """Probe every exported snapshot; returns {"points": [...], "train": {...}} (also RUN_DIR/opd_probe.json)."""
    from zeda_rl.evaluate import load
    from zeda_rl.probe import probe_checkpoint
    from zeda_rl.progress import Progress
    from zeda_rl.tasks import make_split

    snaps = sorted(p for p in (Path(cfg.run_dir) / "probe").glob("step_*") if (p / "config.json").is_file())
    teacher, tok = load(teacher_dir)
    examples = make_split("heldout", cfg.opd.probe_per_family, suite=cfg.data.tasks)
    points = []
    with Progress("opd probe", len(snaps), "snapshots", log=log) as bar:
        for snap in snaps:
            step = int(snap.name.split("_")[1])
            r = probe_checkpoint(snap, teacher, tok, examples, seed=cfg.seed)
            points.append({"step": step, **r})
            for k in ("reverse_kl_sampled", "reverse_kl_exact", "adv_pos_frac", "zero_ratio"):
                log.log("probe", k, r[k], step)
            log.log("probe", "accuracy_greedy", r["accuracy_greedy"]["mean"], step)
            log.log("probe", "accuracy_t1", r["accuracy_t1"]["mean"], step)
            bar.advance(1)
    events = read_events(log.path)
    # SFT and OPD both log learner steps from 1: OPD's start is its first reverse_kl (an OPD-only metric)
    opd_at = min((e.time for e in events if e.component == "learner" and e.name == "reverse_kl"), default=float("inf"))
    train = {
        name: [(e.step, e.value) for e in events if e.component == "learner" and e.name == name and e.time >= opd_at]
        for name in LEARNER_SERIES
    }
    out = {"per_family": cfg.opd.probe_per_family, "points": points, "train": train}
    (Path(cfg.run_dir) / "opd_probe.json").write_text(json.dumps(out, indent=1) + "\n")
    plot(out, Path(cfg.run_dir) / "opd_probe.png")
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts, train = result["points"], result["train"]
    steps = [p["step"] for p in pts]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    ax = axes[0]
    ax.plot(steps, [100 * p["accuracy_greedy"]["mean"] for p in pts], "o-", label="greedy")
    ax.plot(steps, [100 * p["accuracy_t1"]["mean"] for p in pts], "s-", label="temperature 1")
    ax.set_xlabel("OPD step")
    ax.set_ylabel(f"held-out exact match (%), {result['per_family']} per family")
    ax.set_title("student accuracy over OPD")
    ax.legend(fontsize=8)
    ax = axes[1]
    ax.plot(steps, [p["reverse_kl_exact"] for p in pts], "o-", label="held-out, exact KL(S||T)")
    ax.plot(steps, [p["reverse_kl_sampled"] for p in pts], "s-", label="held-out, sampled-token estimate")
    tr = train.get("reverse_kl") or []
    if tr:
        ax.plot([s for s, _ in tr], [v for _, v in tr], lw=0.6, alpha=0.6, label="training batches, sampled estimate")
    fk = train.get("full_kl") or []
    if fk:
        ax.plot([s for s, _ in fk], [v for _, v in fk], lw=0.6, alpha=0.6, label="training batches, top-k KL")
    ax.set_xlabel("OPD step")
    ax.set_ylabel("nats per response token")
    ax.set_title("reverse KL to the teacher")
    ax.legend(fontsize=7)
    ax = axes[2]
    ax.plot(steps, [100 * p["zero_ratio"] for p in pts], "o-", label="held-out zero share")
    zr = train.get("zero_ratio") or []
    if zr:
        ax.plot([s for s, _ in zr], [100 * v for _, v in zr], lw=0.6, alpha=0.6, label="training batches")
    ax.set_xlabel("OPD step")
    ax.set_ylabel("routed slots on zero experts (%)")
    ax.set_title("zero share over OPD")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
