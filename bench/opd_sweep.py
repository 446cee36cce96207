"""OPD recipes side by side from one SFT student: what each does to the student, measured on held-out prompts.

Each variant is `zeda train` on the same config with the student after SFT given (`model.student`,
`sft.steps: 0`), so the variants differ only in their OPD settings. For each run: the OPD probe's
first and last points (greedy and T=1 accuracy, held-out exact reverse KL, zero share; 200 prompts
per family unless --probe-n), the run's own held-out eval (eval.n_per_family) and the OPD time.
Runs go one after another, each in its own process and local Ray.

    python bench/opd_sweep.py --config launch/configs/tiny-cpu-hard.yaml --student runs/tiny-cpu-hard/probe/step_00000 \\
        --variant official --variant lr2e-5 opd.lr=2e-5 --variant full_kl opd.objective=full_kl
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument(
        "--student", required=True, help="the zero-expert student after SFT (e.g. RUN_DIR/probe/step_00000)"
    )
    ap.add_argument(
        "--variant",
        nargs="+",
        action="append",
        required=True,
        metavar=("NAME", "KEY=VALUE"),
        help="a name and the config keys it sets (repeatable)",
    )
    ap.add_argument("--out", default="runs/opd-sweep")
    ap.add_argument("--probe-every", type=int, default=50)
    ap.add_argument("--probe-n", type=int, default=200)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="set for every variant")
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, *sets in a.variant:
        keys = [
            f"model.student={Path(a.student).resolve()}",
            "sft.steps=0",
            f"opd.probe_every={a.probe_every}",
            f"opd.probe_per_family={a.probe_n}",
            f"name={name}",
            f"output_dir={out}",
            *a.set,
            *sets,
        ]
        cmd = [sys.executable, "-m", "launch.train", "--config", a.config] + [x for k in keys for x in ("--set", k)]
        print(f"== {name}: {' '.join(sets) or '(the config as it is)'}", flush=True)
        t0 = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            print(proc.stdout[-2000:], proc.stderr[-3000:], sep="\n")
            rows.append({"variant": name, "sets": sets, "error": proc.stderr.strip().splitlines()[-1:]})
            continue
        run = out / name
        probe = json.loads((run / "opd_probe.json").read_text())
        report = json.loads((run / "report.json").read_text())
        first, last = probe["points"][0], probe["points"][-1]
        row = {
            "variant": name,
            "sets": sets,
            "seconds": round(time.time() - t0),
            "opd_seconds": round(report["phase_seconds"].get("opd", 0.0)),
            "greedy": [first["accuracy_greedy"]["mean"], last["accuracy_greedy"]["mean"]],
            "t1": [first["accuracy_t1"]["mean"], last["accuracy_t1"]["mean"]],
            "kl_exact": [first["reverse_kl_exact"], last["reverse_kl_exact"]],
            "zero": [first["zero_ratio"], last["zero_ratio"]],
            "eval_student": report["accuracy"]["student"]["mean"],
            "eval_teacher": report["accuracy"]["teacher"]["mean"],
            "eval_zero": report["zero_expert_ratio"]["overall"],
            "probe": probe["points"],
        }
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "probe"}), flush=True)
        with open(out / "sweep.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
    print(
        "\n| variant | settings | greedy (probe) | T=1 (probe) | held-out KL(S||T) | zero share | eval student | OPD s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['variant']} | {' '.join(r['sets'])} | failed: {r['error']} |")
            continue
        pct = lambda p: f"{100 * p[0]:.1f} -> {100 * p[1]:.1f}"  # noqa: E731
        print(
            f"| {r['variant']} | {' '.join(r['sets']) or '-'} | {pct(r['greedy'])} | {pct(r['t1'])} | "
            f"{r['kl_exact'][0]:.4f} -> {r['kl_exact'][1]:.4f} | {pct(r['zero'])} | {100 * r['eval_student']:.1f} "
            f"(teacher {100 * r['eval_teacher']:.1f}) | {r['opd_seconds']} |"
        )


if __name__ == "__main__":
    main()
