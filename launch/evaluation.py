"""The eval phase: teacher and student on a benchmark suite, or on the built-in tasks."""

from __future__ import annotations

import json
from pathlib import Path

from launch.config import RunConfig
from launch.runlog import console
from launch.streams import RunData
from zeda_rl.metrics import MetricsLog


def evaluate_phase(
    cfg: RunConfig, teacher_dir: Path, student_dir: Path, data: RunData, log: MetricsLog, engines: dict | None = None
) -> tuple[dict, dict]:
    """Teacher and student on the benchmark suite (eval.suite), else on the built-in tasks, which only
    mean something with the embedded tokenizer.

    A suite runs on the run's own engines (`engines`: the teacher actors for the teacher, the rollout
    actors, which serve the final weights, for the student), so it costs no new GPUs; its Table-1
    report goes to RUN_DIR/eval. With a real tokenizer and no suite the accuracy eval is skipped
    (said in the report); the student's zero-expert share is still measured, teacher-forced over
    the first OPD prompts as the chat template renders them.
    """
    from zeda_rl.evaluate import evaluate, load, routed_zero_ratio

    if cfg.eval.suite:
        return _suite_eval(cfg, teacher_dir, student_dir, log, engines or {})
    if not data.format.templated:
        kw = dict(n_per_family=cfg.eval.n_per_family, log=log, tasks=cfg.data.tasks)
        teacher_eval = evaluate(teacher_dir, label="eval teacher", **kw)
        student_eval = evaluate(student_dir, label="eval student", **kw)
        log.log("eval", "teacher_accuracy", teacher_eval["accuracy"]["mean"])
        log.log("eval", "student_accuracy", student_eval["accuracy"]["mean"])
    else:
        reason = (
            "the teacher's tokenizer has a chat template, so the built-in tasks (the embedded tokenizer's plain "
            "prompts) would not measure it; set eval.suite for benchmark accuracy"
        )
        console.print(f"[yellow]accuracy eval skipped: {reason}")
        log.log("eval", "skipped", reason)
        model, tok = load(student_dir)
        texts = [data.format.prompt_text(r) for r in data.opd.records[: cfg.eval.n_per_family]]
        zr = routed_zero_ratio(model, tok, texts)
        zr["note"] = f"teacher-forced over {len(texts)} OPD prompts (no completions)"
        teacher_eval = {
            "checkpoint": str(teacher_dir),
            "accuracy": {},
            "skipped": reason,
            "zero_ratio": {"overall": 0.0, "per_layer": [0.0] * len(zr["per_layer"]), "note": "static model"},
        }
        student_eval = {"checkpoint": str(student_dir), "accuracy": {}, "skipped": reason, "zero_ratio": zr}
    log.log("eval", "student_zero_ratio", student_eval["zero_ratio"]["overall"])
    return teacher_eval, student_eval


def _teacher_key(teacher_dir: Path, suite) -> str:
    """What the teacher's suite results depend on: its weights (config, names, sizes, mtimes), the suite and its
    benchmark files. A run whose student eval failed reruns only the student (the teacher's can take hours of
    32k-token answers); the teacher is the static model, so its results do not change between attempts."""
    import hashlib

    from launch.rollouts import fingerprint

    files = [(str(b.path), b.path.stat().st_size, b.path.stat().st_mtime_ns) for b in suite.benchmarks]
    spec = {"teacher": fingerprint(teacher_dir), "suite": suite.model_dump(mode="json"), "files": files}
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _suite_eval(
    cfg: RunConfig, teacher_dir: Path, student_dir: Path, log: MetricsLog, engines: dict
) -> tuple[dict, dict]:
    """eval.suite on the run's engines; returned in the report's shape (accuracy per benchmark, mean, r_ZE)."""
    from actors.eval_pool import EvalEngines
    from zeda_rl.suites import load_suite, run_suite, write_outputs

    suite = load_suite(cfg.eval.suite)
    runs = {}
    kept = cfg.run_dir / "eval" / "teacher-run.json"  # the teacher's results, for a rerun of this phase
    key = _teacher_key(teacher_dir, suite)
    if kept.is_file() and (old := json.loads(kept.read_text())).get("key") == key:
        runs["teacher"] = old["run"]
        console.print(f"eval teacher: reused {kept} (same teacher, suite and benchmark files)")
    for who, ckpt in (("teacher", teacher_dir), ("student", student_dir)):
        if who in runs:
            continue
        with EvalEngines.over(engines[who], batch_size=suite.batch_size) as gen:
            runs[who] = run_suite(ckpt, suite, gen, log=log, label=f"eval {who}")
        if who == "teacher":
            kept.parent.mkdir(parents=True, exist_ok=True)
            tmp = kept.with_name(f".{kept.name}.tmp")
            tmp.write_text(json.dumps({"key": key, "run": runs["teacher"]}))
            tmp.replace(kept)
    files = write_outputs(cfg.run_dir / "eval", runs["student"], runs["teacher"])
    console.print(f"benchmark report: {files['markdown']}")
    out = []
    for who in ("teacher", "student"):
        r = runs[who]
        per_layer = [
            sum(b["r_ze"]["per_layer"][i] for b in r["benchmarks"]) / len(r["benchmarks"])
            for i in range(len(r["benchmarks"][0]["r_ze"]["per_layer"]))
        ]
        acc = {b["name"]: b["accuracy"] for b in r["benchmarks"]} | {"mean": r["average"]["accuracy"]}
        log.log("eval", f"{who}_accuracy", acc["mean"])
        out.append(
            {
                "checkpoint": str(r["checkpoint"]),
                "accuracy": acc,
                "suite": suite.name,
                "zero_ratio": {
                    "overall": r["average"]["r_ze"],
                    "per_layer": per_layer,
                    "note": "per request, over the suite",
                },
            }
        )
    log.log("eval", "student_zero_ratio", out[1]["zero_ratio"]["overall"])
    return out[0], out[1]
