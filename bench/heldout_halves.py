"""Does OPD generalise further from prompts the teacher never trained on? Held-out halves, one to train on.

The embedded teachers were trained on every training-split prompt (the mul family has about 6,500), so SFT and OPD
distil answers the teacher memorised, while the held-out prompts need the computation the teacher generalises with.
This splits the hard suite's 2,100 evaluation prompts in two by a second hash: OPD from a seed's SFT student on half
A (prompts no model has trained on) against OPD on as many training-split prompts of each family, and every student
evaluated on half B only, paired against the first one given. Exploratory: half A is held-out data, so a student
trained on it is never reported on the whole held-out set.

    python bench/heldout_halves.py write runs/halves          # runs/halves/{heldA,trainA}.jsonl
    zeda train --config launch/configs/tiny-cpu-hard-lean.yaml --set model.student=.../zeda-s0/student-sft \\
        --set sft.steps=0 --set data.opd_prompts=runs/halves/heldA.jsonl --set output_dir=runs/halves/heldA
    python bench/heldout_halves.py eval sft=.../zeda-s0/student-sft heldA=runs/halves/heldA/tiny-cpu-hard-lean/student
"""

from __future__ import annotations

import argparse
import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np

N_PER_FAMILY, SUITE = 700, "hard"  # the hard configs' eval.n_per_family


def _in_a(prompt: str) -> bool:
    return hashlib.sha256(f"ab:{prompt}".encode()).digest()[0] % 2 == 0


def _write(path: Path, examples) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps({"id": e.prompt, "prompt": e.prompt}) + "\n" for e in examples))
    tmp.replace(path)


def write(out: Path) -> None:
    from zeda_rl.tasks import make_split

    held_a = [e for e in make_split("heldout", N_PER_FAMILY, suite=SUITE) if _in_a(e.prompt)]
    want, got, train_a = Counter(e.family for e in held_a), Counter(), []
    for e in make_split("train", max(want.values()), seed=77, suite=SUITE):
        if got[e.family] < want[e.family]:
            train_a.append(e)
            got[e.family] += 1
    out.mkdir(parents=True, exist_ok=True)
    _write(out / "heldA.jsonl", held_a)
    _write(out / "trainA.jsonl", train_a)
    print(f"{out}/heldA.jsonl and trainA.jsonl: {dict(want)} prompts per family each")


def evaluate_b(students: list[tuple[str, str]]) -> None:
    from zeda_rl.evaluate import evaluate
    from zeda_rl.stats import paired_prompt_ci
    from zeda_rl.tasks import make_split

    examples = make_split("heldout", N_PER_FAMILY, suite=SUITE)
    in_b = np.array([not _in_a(e.prompt) for e in examples])
    family = np.array([e.family for e in examples])
    hits = {}
    for name, path in students:
        h = np.array(evaluate(path, n_per_family=N_PER_FAMILY, tasks=SUITE, progress=False)["hits"], float)
        hits[name] = h[in_b]
        per = {str(f): round(100 * float(h[in_b & (family == f)].mean()), 2) for f in sorted(set(family))}
        print(f"{name}: half B {per}, all of B {100 * h[in_b].mean():.2f}", flush=True)
    first = students[0][0]
    for name, h in list(hits.items())[1:]:
        lo, hi = paired_prompt_ci(h, hits[first])
        print(
            f"{name} vs {first} on half B ({int(in_b.sum())} prompts): {100 * (h - hits[first]).mean():+.2f} "
            f"[{lo:+.2f}, {hi:+.2f}]"
        )


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("write").add_argument("out", type=Path)
    sub.add_parser("eval").add_argument("students", nargs="+", metavar="NAME=CHECKPOINT")
    a = ap.parse_args(argv)
    if a.cmd == "write":
        write(a.out)
        return
    pairs = [s.partition("=")[::2] for s in a.students]
    for s, (name, path) in zip(a.students, pairs):
        if not name or not path:
            ap.error(f"{s!r}: expected NAME=CHECKPOINT")
    evaluate_b(pairs)


if __name__ == "__main__":
    main()
