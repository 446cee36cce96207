"""Benchmark suites: a small YAML naming local benchmark files and their graders, run and reported.

A suite is the paper's evaluation in one file: decoding (temperature 0.6, top-p 0.95,
top-k 20 by default), avg@k samples per problem, thinking on or off, and one entry per
benchmark. Running one needs only a `generate(prompts, params) -> samples` callable, so
this module knows nothing of Ray or of the engine backends (`actors.eval_pool` spreads the
requests over engine actors). The report follows the ZEDA paper's Table 1: per benchmark,
avg@k accuracy and r_ZE (each request's share of routed slots on zero experts over all
its tokens, prompt and output, averaged over requests), overall and per MoE layer.

Prompts go through the checkpoint tokenizer's chat template the same way training data does
(`zeda_rl.chat.ChatFormat`), so a benchmark prompt is rendered exactly like a training prompt.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Callable, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from zeda_rl.chat import ChatFormat, stop_ids
from zeda_rl.data import Record
from zeda_rl.evaluate import mean_zero_ratio, moe_shape, sample_zero_shares
from zeda_rl.graders import make_grader, strip_thinking
from zeda_rl.progress import Progress
from zeda_rl.sampling import SamplingParams


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Decoding(SamplingParams):
    """The engines' sampling type with the paper's defaults, plus k of avg@k; stop ids are the model's."""

    temperature: float = Field(0.6, ge=0)
    top_p: float = Field(0.95, gt=0, le=1)
    top_k: int = Field(20, ge=-1)  # -1 or 0: off
    max_new_tokens: int = Field(32768, ge=1)
    seed: int | None = 0
    samples: int = Field(1, ge=1)  # k of avg@k


class Benchmark(_Strict):
    name: str = Field(min_length=1)
    path: Path  # relative to the suite file
    grader: Literal["math", "code", "ifeval", "ifbench"]
    fields: dict[str, str] = {}  # role -> record field, where the file does not use the usual names
    prompt_template: str | None = None  # "{prompt}" is replaced by the record's prompt; default: the grader's
    limit: int | None = Field(None, ge=1)  # only the first N problems
    samples: int | None = Field(None, ge=1)
    max_new_tokens: int | None = Field(None, ge=1)
    options: dict = {}  # the grader's own keyword arguments (timeout_s, memory_mb, metric, nltk_data, ...)


class Suite(_Strict):
    name: str = Field(min_length=1)
    decoding: Decoding = Decoding()
    enable_thinking: bool = True
    batch_size: int = Field(32, ge=1)  # requests per engine call
    benchmarks: list[Benchmark] = Field(min_length=1)

    @field_validator("benchmarks")
    @classmethod
    def _unique(cls, v):
        names = [b.name for b in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"benchmark names must be unique; repeated: {dup}")
        return v


def load_suite(path: str | Path) -> Suite:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: suite file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping with name, decoding, benchmarks")
    try:
        suite = Suite.model_validate(raw)
    except ValidationError as err:
        lines = [f"{path}: invalid suite"]
        for e in err.errors():
            key = ".".join(str(p) for p in e["loc"]) or "<top>"
            got = f" (got {e['input']!r})" if "input" in e and not isinstance(e["input"], (dict, list)) else ""
            lines.append(f"  {key}: {e['msg']}{got}")
        raise ValueError("\n".join(lines)) from None
    for b in suite.benchmarks:
        b.path = (path.parent / b.path).resolve() if not b.path.is_absolute() else b.path
    return suite


def suite_problems(path: str | Path) -> list[str]:
    """What would stop the suite at `path` from running, one line each ([]: it runs): the suite file itself,
    then every benchmark file it names, present and read whole by its grader (a missing or broken file is
    found before hours of training, not at the eval phase)."""
    try:
        suite = load_suite(path)
    except (OSError, ValueError) as err:
        return [f"eval.suite: {err}"]
    out = []
    for b in suite.benchmarks:
        where = f"eval.suite ({path}): benchmark {b.name!r}"
        if not b.path.is_file():
            out.append(f"{where}: {b.path}: no such file")
            continue
        try:
            problems = make_grader(b.grader, **b.options).load(b.path, b.fields)
        except (OSError, ValueError, KeyError, TypeError) as err:
            out.append(f"{where}: {b.path} does not parse: {err}")
            continue
        if not problems:
            out.append(f"{where}: {b.path} has no records")
    return out


def render_prompt(tokenizer, text: str, enable_thinking: bool) -> list[int]:
    """Token ids of one user turn, exactly as training renders a prompt (`zeda_rl.chat.ChatFormat`)."""
    return ChatFormat(tokenizer, enable_thinking).prompt_ids(
        Record(id="", where="", messages=({"role": "user", "content": text},))
    )


def thinking_opened(tokenizer, prompt_ids: list[int]) -> bool:
    """Whether the rendered prompt ends inside an opened thinking block (GLM-4.7-Flash's ends in `<think>`)."""
    return tokenizer.decode(prompt_ids[-8:], skip_special_tokens=False).rstrip().endswith("<think>")


def response_text(tokenizer, output_ids: list[int], stops: tuple[int, ...]) -> str:
    """The decoded response, thinking tags kept (they are not special to Qwen3), end-of-turn dropped."""
    ids = [t for t in output_ids if t not in stops and t != tokenizer.pad_token_id]
    return tokenizer.decode(ids, skip_special_tokens=False)


Generate = Callable[[list[list[int]], SamplingParams], list]  # (prompt ids, sampling) -> Samples


def run_suite(
    checkpoint: str | Path,
    suite: Suite,
    generate: Generate,
    tokenizer=None,
    progress: bool = True,
    log=None,
    label: str | None = None,
) -> dict:
    """Every benchmark of `suite` on one checkpoint: the report dict (with every sample under "samples").

    Progress (`zeda_rl.progress`) counts samples, one benchmark's worth at a time (`generate` answers a
    whole benchmark in one call, so its engines stay busy to the end); `log` gets the monitor's events.
    """
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    n_experts, n_layers = moe_shape(checkpoint)
    stops = stop_ids(checkpoint, tokenizer)  # the same stop ids as training's rollouts and OPD
    loaded = []
    for bench in suite.benchmarks:
        grader = make_grader(bench.grader, **bench.options)
        problems = grader.load(bench.path, bench.fields)[: bench.limit]
        if not problems:
            raise ValueError(f"{bench.path}: benchmark {bench.name!r} has no records")
        loaded.append((bench, grader, problems, bench.samples or suite.decoding.samples))
    rows, samples_out = [], []
    bar = Progress(
        label or f"eval {Path(checkpoint).name}",
        sum(len(p) * k for _, _, p, k in loaded),
        "samples",
        log=log,
        enabled=bool(progress),
    )
    with bar:
        for bench, grader, problems, k in loaded:
            bar.update(bar.done, note=f"{bench.name}: {len(problems)} problems x {k}")
            rows.append(
                _run_benchmark(
                    bench, grader, problems, k, suite, generate, tokenizer, stops, n_experts, n_layers, samples_out
                )
            )
            bar.advance(len(problems) * k)
    return {
        "suite": suite.name,
        "checkpoint": str(checkpoint),
        "decoding": suite.decoding.model_dump(exclude={"stop_token_ids"}),
        "enable_thinking": suite.enable_thinking,
        "num_experts": n_experts,
        "moe_layers": n_layers,
        "benchmarks": rows,
        "average": {
            "accuracy": sum(r["accuracy"] for r in rows) / len(rows),
            "r_ze": sum(r["r_ze"]["overall"] for r in rows) / len(rows),
        },
        "samples": samples_out,
    }


def _run_benchmark(
    bench, grader, problems, k, suite, generate, tokenizer, stops, n_experts, n_layers, samples_out
) -> dict:
    """One benchmark: generate k samples per problem, grade them; its row (its samples appended to samples_out)."""
    template = bench.prompt_template or grader.template
    prompts = [
        render_prompt(tokenizer, template.replace("{prompt}", p.prompt), suite.enable_thinking) for p in problems
    ]
    params = suite.decoding.model_copy(
        update={"max_new_tokens": bench.max_new_tokens or suite.decoding.max_new_tokens, "stop_token_ids": stops}
    )
    outs = generate([p for p in prompts for _ in range(k)], params)
    texts = [response_text(tokenizer, s.output_ids, stops) for s in outs]
    opened = [thinking_opened(tokenizer, p) for p in prompts for _ in range(k)]
    grades = grader.grade(
        [p for p in problems for _ in range(k)], [strip_thinking(t, o) for t, o in zip(texts, opened)]
    )
    shares = [sample_zero_shares(s, n_experts, n_layers) for s in outs]
    scores = [g.score for g in grades]
    for i, (s, text, g, z) in enumerate(zip(outs, texts, grades, shares)):
        samples_out.append(
            {
                "benchmark": bench.name,
                "problem": problems[i // k].id,
                "sample": i % k,
                "response": text,
                "score": g.score,
                "detail": g.detail,
                "finish": s.finish_reason,
                "r_ze": float(z.mean()) if z.size else 0.0,
            }
        )
    return {
        "name": bench.name,
        "grader": bench.grader,
        "path": str(bench.path),
        "problems": len(problems),
        "samples": k,
        "accuracy": sum(scores) / len(scores),
        "r_ze": {key: v for key, v in mean_zero_ratio(shares).items() if key != "requests"},
        "finish": {r: sum(s.finish_reason == r for s in outs) for r in ("stop", "length")},
        "grading_errors": sum("error" in g.detail for g in grades),  # a checker that raised, not a wrong answer
        "per_problem": [{"id": p.id, "scores": scores[i * k : (i + 1) * k]} for i, p in enumerate(problems)],
    }


# ---- the report ---------------------------------------------------------------------------------


def table(student: dict, teacher: dict | None = None) -> list[dict]:
    """Table 1's rows: per benchmark (and an average row) teacher acc, student acc, student r_ZE."""
    t_acc = {r["name"]: r["accuracy"] for r in teacher["benchmarks"]} if teacher else {}
    rows = [
        {
            "benchmark": r["name"],
            "teacher_acc": t_acc.get(r["name"]),
            "student_acc": r["accuracy"],
            "student_r_ze": r["r_ze"]["overall"],
        }
        for r in student["benchmarks"]
    ]
    rows.append(
        {
            "benchmark": "Average",
            "teacher_acc": teacher["average"]["accuracy"] if teacher else None,
            "student_acc": student["average"]["accuracy"],
            "student_r_ze": student["average"]["r_ze"],
        }
    )
    return rows


def render_markdown(student: dict, teacher: dict | None = None) -> str:
    pct = lambda x: "-" if x is None else f"{100 * x:.1f}"  # noqa: E731
    lines = [f"# Evaluation: {student['suite']}", ""]
    if teacher:
        lines.append(f"Teacher `{teacher['checkpoint']}`, student `{student['checkpoint']}`.")
    else:
        lines.append(f"Checkpoint `{student['checkpoint']}`.")
    d = student["decoding"]
    lines += [
        f"Decoding: {', '.join(f'{k} {v}' for k, v in d.items())}; thinking {'on' if student.get('enable_thinking') else 'off'}. "
        "Accuracy is avg@k (%), r_ZE the share of routed slots on zero experts (%), per request over all its tokens, "
        "averaged over requests.",
        "",
        "| Benchmark | Teacher acc | Student acc | Student r_ZE |" if teacher else "| Benchmark | Acc | r_ZE |",
        "| --- | ---: | ---: | ---: |" if teacher else "| --- | ---: | ---: |",
    ]
    for r in table(student, teacher):
        name = f"**{r['benchmark']}**" if r["benchmark"] == "Average" else r["benchmark"]
        if teacher:
            lines.append(f"| {name} | {pct(r['teacher_acc'])} | {pct(r['student_acc'])} | {pct(r['student_r_ze'])} |")
        else:
            lines.append(f"| {name} | {pct(r['student_acc'])} | {pct(r['student_r_ze'])} |")
    n_layers = max((len(r["r_ze"]["per_layer"]) for r in student["benchmarks"]), default=0)
    if n_layers:
        lines += [
            "",
            "r_ZE per MoE layer (%):",
            "",
            "| Benchmark | " + " | ".join(f"L{i}" for i in range(n_layers)) + " |",
            "| --- |" + " ---: |" * n_layers,
        ]
        for r in student["benchmarks"]:
            lines.append(f"| {r['name']} | " + " | ".join(pct(x) for x in r["r_ze"]["per_layer"]) + " |")
    return "\n".join(lines) + "\n"


def comparison(student: dict, teacher: dict | None = None) -> dict:
    """The JSON report: both runs without their samples, and the table."""
    strip = lambda r: {k: v for k, v in r.items() if k != "samples"}  # noqa: E731
    return {"student": strip(student), "teacher": strip(teacher) if teacher else None, "table": table(student, teacher)}


def write_outputs(out_dir: str | Path, student: dict, teacher: dict | None = None) -> dict[str, Path]:
    """eval.json, eval.md and samples.jsonl under out_dir, each written whole or not at all."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    samples = [dict(s, model="student") for s in student.get("samples", [])]
    if teacher:
        samples += [dict(s, model="teacher") for s in teacher.get("samples", [])]
    files = {
        "json": (out / "eval.json", json.dumps(comparison(student, teacher), indent=2) + "\n"),
        "markdown": (out / "eval.md", render_markdown(student, teacher)),
        "samples": (out / "samples.jsonl", "".join(json.dumps(s) + "\n" for s in samples)),
    }
    for path, text in files.values():
        fd, tmp = tempfile.mkstemp(dir=out, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return {k: p for k, (p, _) in files.items()}
