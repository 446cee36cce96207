"""OPD recipes' students against their own seed's SFT student, paired on the same held-out prompts.

After `zeda baselines --seeds ...` (which keeps each seed's student after SFT, OUT/zeda-sN/student-sft) and OPD
reruns from those students (`zeda train --set model.student=OUT/zeda-sN/student-sft --set sft.steps=0 --set seed=N
--set output_dir=ROOT --set name=zeda-sN`, or `zeda` for one seed), this evaluates ROOT/zeda-sN/student for every recipe and prints, per
recipe, each seed's accuracy, the mean, the zero share and the difference to SFT with its paired 95% interval over
prompts and seeds (`zeda_rl.stats.compare`). The baselines run itself is the first recipe. `--vs NAME=ROOT` pairs
every recipe against ROOT/zeda-sN/student instead (a control, such as a longer SFT with `opd.steps: 0`).

    python bench/opd_vs_sft.py --baselines runs/tiny-cpu-hard-lean-baselines --seeds 0,1,2 --tasks hard --n 700 \\
        --recipe lr1e-4=runs/lean-opd/lr1e-4 --recipe steps600=runs/lean-opd/steps600
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baselines", required=True, help="a `zeda baselines` output dir with zeda-sN/student-sft")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--tasks", default="hard")
    ap.add_argument("--n", type=int, default=700, help="held-out prompts per family")
    ap.add_argument(
        "--recipe", action="append", default=[], metavar="NAME=ROOT", help="a recipe's run root (repeatable)"
    )
    ap.add_argument(
        "--vs", metavar="NAME=ROOT", help="pair against ROOT/zeda-sN/student instead of the SFT students (a control)"
    )
    ap.add_argument("--json", help="also write the rows here")
    a = ap.parse_args(argv)

    from zeda_rl.evaluate import evaluate
    from zeda_rl.stats import compare

    base = Path(a.baselines)
    seeds = [int(s) for s in a.seeds.split(",")]
    recipes = [("the baselines run", base)]
    for item in a.recipe:
        name, sep, root = item.partition("=")
        if not sep:
            ap.error(f"--recipe {item!r}: expected NAME=ROOT")
        recipes.append((name, Path(root)))

    def ev(path: Path) -> dict:  # evaluate refuses a dir without a checkpoint, naming it
        return evaluate(path, n_per_family=a.n, tasks=a.tasks)

    tag = (lambda s: f"-s{s}") if len(seeds) > 1 else (lambda s: "")  # launch.baselines names one seed's run `zeda`
    ref_name, ref = "SFT", [base / f"zeda{tag(s)}" / "student-sft" for s in seeds]
    if a.vs:
        ref_name, _, root = a.vs.partition("=")
        ref = [Path(root) / f"zeda{tag(s)}" / "student" for s in seeds]
    sft = [ev(path) for path in ref]
    S = np.array([r["hits"] for r in sft])
    print(f"{ref_name} students: {[round(100 * r['accuracy']['mean'], 2) for r in sft]}, mean {100 * S.mean():.2f}")
    rows = []
    for name, root in recipes:
        rs = [ev(root / f"zeda{tag(s)}" / "student") for s in seeds]
        Z = np.array([r["hits"] for r in rs])
        c = compare(Z, S, name, ref_name)
        row = {
            "recipe": name,
            "per_seed": [round(100 * r["accuracy"]["mean"], 2) for r in rs],
            "mean": round(100 * float(Z.mean()), 2),
            "r_ze": round(100 * float(np.mean([r["zero_ratio"]["overall"] for r in rs])), 1),
            "vs": ref_name,
            "delta": round(c["delta_points"], 2),
            "ci": [round(x, 2) for x in c["ci"]],
            "per_seed_delta": [round(x, 2) for x in c["per_seed"]],
        }
        rows.append(row)
        print(
            f"{name}: {row['per_seed']} mean {row['mean']}, r_ZE {row['r_ze']}%, vs {ref_name} {row['delta']:+.2f} "
            f"[{row['ci'][0]:+.2f}, {row['ci'][1]:+.2f}] ({c['verdict']})",
            flush=True,
        )
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
