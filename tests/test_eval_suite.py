"""Benchmark suites end to end on a tiny chat model: top-k decoding, suite files, Ray engines, the report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from zeda_rl.chat_tokenizer import save_tiny_chat_checkpoint
from zeda_rl.convert import convert_checkpoint
from zeda_rl.graders import make_grader
from zeda_rl.sampling import SamplingParams
from zeda_rl.suites import load_suite, render_prompt, run_suite, write_outputs

FIX = Path(__file__).parent / "fixtures" / "eval"


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval")
    save_tiny_chat_checkpoint(d / "teacher")
    convert_checkpoint(d / "teacher", d / "student", zero_experts=4)
    return d / "teacher", d / "student"


@pytest.fixture(scope="module")
def ray_local():
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


# ---- top-k decoding ----------------------------------------------------------------------------


def _ranks_and_logprobs(model, sample, temperature):
    ids = torch.tensor([sample.prompt_ids + sample.output_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(sample.prompt_ids) - 1 : -1].float()
    out = torch.tensor(sample.output_ids)
    chosen = logits.gather(-1, out[:, None])
    ranks = (logits > chosen).sum(-1)  # 0 = the most likely token
    lp = torch.log_softmax(logits / temperature, -1).gather(-1, out[:, None])[:, 0]
    return ranks.numpy(), lp.numpy()


def test_top_k_on_the_torch_engine(ckpts):
    from actors.torch_engine import TorchEngine

    eng = TorchEngine(ckpts[1])
    prompts = [[5, 6, 7, 8], [9, 10, 11]] * 3
    greedy = eng.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=8))
    top1 = eng.generate(prompts, SamplingParams(temperature=1.5, top_k=1, max_new_tokens=8, seed=1))
    assert [s.output_ids for s in top1] == [s.output_ids for s in greedy]
    top3 = eng.generate(prompts, SamplingParams(temperature=1.5, top_k=3, max_new_tokens=12, seed=2))
    free = eng.generate(prompts, SamplingParams(temperature=1.5, top_k=-1, max_new_tokens=12, seed=2))
    off0 = eng.generate(prompts, SamplingParams(temperature=1.5, top_k=0, max_new_tokens=12, seed=2))
    assert [s.output_ids for s in off0] == [s.output_ids for s in free]  # 0 is off, like -1
    all_ranks = []
    for s in top3:
        ranks, lp = _ranks_and_logprobs(eng.model, s, 1.5)
        assert ranks.max() < 3
        # behaviour logprobs are those of the untruncated temperature-scaled distribution
        np.testing.assert_allclose(s.logprobs, lp, atol=1e-4)
        all_ranks.extend(ranks.tolist())
    assert max(max(_ranks_and_logprobs(eng.model, s, 1.5)[0]) for s in free) >= 3  # without the cut it goes further
    assert len(set(all_ranks)) > 1  # and with it, still sampling among the three
    with pytest.raises(ValueError, match="top_k"):
        SamplingParams(top_k=-2)


def test_top_k_through_the_sglang_backend(ckpts):
    from actors.fake_sglang import FakeSGLangEngine
    from actors.sglang_engine import SGLangEngine

    sent = []

    class Recording(FakeSGLangEngine):
        def generate(self, *a, sampling_params=None, **kw):
            sent.append(sampling_params)
            return super().generate(*a, sampling_params=sampling_params, **kw)

    eng = SGLangEngine(ckpts[1], _engine_factory=Recording)
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    greedy = eng.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=6))
    top1 = eng.generate(prompts, SamplingParams(temperature=1.5, top_k=1, max_new_tokens=6, seed=4))
    assert [s.output_ids for s in top1] == [s.output_ids for s in greedy]
    eng.generate(prompts, SamplingParams(temperature=1.0, top_k=0, max_new_tokens=2, seed=4))
    assert (
        "top_k" not in sent[0]
        and [sp["top_k"] for sp in sent[1]] == [1, 1]
        and all("top_k" not in sp for sp in sent[2])
    )
    with pytest.raises(ValueError, match="top_k must be -1"):  # SGLang's own rule, kept by the fake
        eng._engine.generate(input_ids=prompts, sampling_params={"top_k": 0, "max_new_tokens": 1})


# ---- suite files -------------------------------------------------------------------------------


def test_suite_files_are_validated(tmp_path):
    suite = load_suite(FIX / "suite.yaml")
    assert [b.name for b in suite.benchmarks] == ["gsm8k", "math500", "humaneval", "ifeval"]
    assert suite.benchmarks[0].path == (FIX / "gsm8k.jsonl").resolve() and suite.decoding.top_k == 20
    assert load_suite(Path(__file__).parents[1] / "launch" / "suites" / "paper.yaml").decoding.temperature == 0.6

    def refused(text, *patterns):
        (tmp_path / "s.yaml").write_text(text)
        with pytest.raises(ValueError) as err:
            load_suite(tmp_path / "s.yaml")
        for p in patterns:
            assert p in str(err.value), str(err.value)

    refused(
        "name: x\nbenchmarks: [{name: a, path: a.jsonl, grader: math, shots: 4}]\n",
        "s.yaml",
        "benchmarks.0.shots",
        "Extra inputs",
    )
    refused(
        "name: x\ndecoding: {temprature: 1}\nbenchmarks: [{name: a, path: a.jsonl, grader: math}]\n",
        "decoding.temprature",
    )
    refused("name: x\nbenchmarks: [{name: a, path: a.jsonl, grader: regex}]\n", "benchmarks.0.grader", "'math'")
    refused(
        "name: x\nbenchmarks: [{name: a, path: a, grader: math}, {name: a, path: b, grader: code}]\n", "repeated: ['a']"
    )
    refused("name: x\ndecoding: {top_p: 0}\nbenchmarks: [{name: a, path: a, grader: math}]\n", "decoding.top_p")
    refused("- just a list\n", "expected a mapping")
    with pytest.raises(FileNotFoundError, match="nope.yaml: suite file not found"):
        load_suite(tmp_path / "nope.yaml")


def test_prompts_go_through_the_chat_template(ckpts):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ckpts[0])
    on = tok.decode(render_prompt(tok, "What is 2+2?", enable_thinking=True))
    off = tok.decode(render_prompt(tok, "What is 2+2?", enable_thinking=False))
    assert on == "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    assert off == on + "<think>\n\n</think>\n\n"


# ---- end to end --------------------------------------------------------------------------------


def test_suite_end_to_end_teacher_vs_student(ckpts, ray_local, tmp_path):
    from actors.eval_pool import EvalEngines

    teacher_ckpt, student_ckpt = ckpts
    suite = load_suite(FIX / "suite.yaml")
    with EvalEngines("torch", teacher_ckpt, engines=0, batch_size=4) as gen:
        teacher = run_suite(teacher_ckpt, suite, gen)
    with EvalEngines("torch", student_ckpt, engines=2, batch_size=4) as gen:
        student = run_suite(student_ckpt, suite, gen)
    with EvalEngines("torch", student_ckpt, engines=0, batch_size=4) as gen:
        again = run_suite(student_ckpt, suite, gen)
    # the share-out over actors changes nothing: same requests, same seeds, same order back; and the zero shares the
    # actors send instead of the expert ids are those the ids give in process
    assert [s["response"] for s in again["samples"]] == [s["response"] for s in student["samples"]]
    assert [s["r_ze"] for s in again["samples"]] == pytest.approx([s["r_ze"] for s in student["samples"]])

    k = {"gsm8k": 2, "math500": 1, "humaneval": 2, "ifeval": 2}  # avg@k: the suite's 2, math500's own 1
    for rep, is_student in ((teacher, False), (student, True)):
        rows = {r["name"]: r for r in rep["benchmarks"]}
        assert list(rows) == list(k) and rep["moe_layers"] == 2 and rep["num_experts"] == 8
        for name, r in rows.items():
            assert r["problems"] == 3 and r["samples"] == k[name]
            assert [len(p["scores"]) for p in r["per_problem"]] == [k[name]] * 3
            assert sum(r["finish"].values()) == 3 * k[name]
            flat = [s for p in r["per_problem"] for s in p["scores"]]
            assert r["accuracy"] == pytest.approx(sum(flat) / len(flat)) and 0 <= r["accuracy"] <= 1
            z = r["r_ze"]
            assert len(z["per_layer"]) == 2 and all(0 <= x <= 1 for x in z["per_layer"])
            assert z["overall"] == pytest.approx(np.mean(z["per_layer"]))
            assert (z["overall"] > 0) if is_student else (z["per_layer"] == [0.0, 0.0])
        assert len(rep["samples"]) == sum(3 * v for v in k.values())
        assert rep["average"]["accuracy"] == pytest.approx(np.mean([r["accuracy"] for r in rows.values()]))
    # r_ZE is each request's share, averaged over requests
    per_req = [s["r_ze"] for s in student["samples"] if s["benchmark"] == "gsm8k"]
    assert student["benchmarks"][0]["r_ze"]["overall"] == pytest.approx(np.mean(per_req))

    files = write_outputs(tmp_path / "out", student, teacher)
    report = json.loads(files["json"].read_text())
    assert [r["benchmark"] for r in report["table"]] == list(k) + ["Average"]
    assert set(report["table"][0]) == {"benchmark", "teacher_acc", "student_acc", "student_r_ze"}
    assert "samples" not in report["student"] and report["teacher"]["checkpoint"] == str(teacher_ckpt)
    md = files["markdown"].read_text()
    assert (
        "| Benchmark | Teacher acc | Student acc | Student r_ZE |" in md
        and "| **Average** |" in md
        and "| L0 | L1 |" in md
    )
    lines = files["samples"].read_text().splitlines()
    assert len(lines) == 2 * len(student["samples"]) and {json.loads(x)["model"] for x in lines} == {
        "teacher",
        "student",
    }
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no temp files left


def test_graders_fed_the_references_score_everything():
    suite = load_suite(FIX / "suite.yaml")
    for b in suite.benchmarks:
        g = make_grader(b.grader, **b.options)
        problems = g.load(b.path, b.fields)
        if b.grader == "ifeval":
            refs = [json.loads(line)["known_good"] for line in b.path.read_text().splitlines()]
        else:
            refs = [p.reference for p in problems]
        assert [x.score for x in g.grade(problems, refs)] == [1.0] * len(problems), b.name


def test_cli_suite_side_by_side(ckpts, tmp_path):
    teacher_ckpt, student_ckpt = ckpts
    (tmp_path / "one.yaml").write_text(
        "name: one\ndecoding: {max_new_tokens: 8, samples: 1}\nenable_thinking: false\n"
        f"benchmarks: [{{name: gsm8k, path: {FIX / 'gsm8k.jsonl'}, grader: math, limit: 2}}]\n"
    )
    zeda = str(Path(sys.executable).parent / "zeda")
    out = subprocess.run(
        [
            zeda,
            "eval",
            str(student_ckpt),
            "--suite",
            str(tmp_path / "one.yaml"),
            "--teacher",
            str(teacher_ckpt),
            "--engines",
            "0",
            "--out",
            str(tmp_path / "out"),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    rep = json.loads(out.stdout)
    assert rep["table"][0]["benchmark"] == "gsm8k" and rep["student"]["benchmarks"][0]["problems"] == 2
    assert rep["student"]["enable_thinking"] is False and rep["table"][0]["student_r_ze"] > 0
    assert (tmp_path / "out" / "eval.md").is_file()
    (tmp_path / "bad.yaml").write_text("name: x\nbenchmarks: [{name: a, path: a.jsonl, grader: math, extra: 1}]\n")
    bad = subprocess.run(
        [zeda, "eval", str(student_ckpt), "--suite", str(tmp_path / "bad.yaml")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "benchmarks.0.extra" in bad.stderr


def test_builtin_tasks_side_by_side(ckpts):
    from zeda_rl.evaluate import builtin_report, evaluate
    from zeda_rl.suites import render_markdown, table

    teacher_ckpt, student_ckpt = ckpts
    t = builtin_report(evaluate(teacher_ckpt, n_per_family=2, batch_size=8))
    s = builtin_report(evaluate(student_ckpt, n_per_family=2, batch_size=8))
    rows = table(s, t)
    assert [r["benchmark"] for r in rows] == ["add", "reverse", "sort", "pattern", "Average"]
    assert t["average"]["r_ze"] == 0.0 and 0 < s["average"]["r_ze"] < 1
    assert "| **Average** |" in render_markdown(s, t)


def test_eval_over_the_runs_engines_skips_one_that_restarted_unsynced(ckpts, ray_local):
    """A rollout engine that restarted after the last push serves the student it loaded at start (its samples carry
    policy version -1): the evaluation answers its chunks on the other engines, and refuses when none is left."""
    from actors.eval_pool import EvalEngines
    from actors.rollout import RolloutActor
    from zeda_rl.sampling import SamplingParams

    _, student = ckpts
    unsynced, synced = (RolloutActor.options(num_cpus=0.25).remote("torch", str(student)) for _ in range(2))
    try:
        ray_local.get(synced.__ray_call__.remote(lambda a: setattr(a, "synced", True)))  # as after a weight push
        prompts = [[5 + i, 6, 7] for i in range(6)]
        params = SamplingParams(temperature=0, max_new_tokens=3)
        got = EvalEngines.over([unsynced, synced], batch_size=2)(prompts, params)
        assert [s.prompt_ids for s in got] == prompts and all(s.policy_version == 0 for s in got)
        # the driver gets each sample's per-layer zero share, not its expert ids (24 MB for a 32k-token answer)
        assert all(s.routed_experts is None and len(s.extra["zero_shares"]) == 2 for s in got)
        with pytest.raises(RuntimeError, match="no engine left of 1 .*engine 0 restarted"):
            EvalEngines.over([unsynced], batch_size=2)(prompts, params)
    finally:
        for a in (unsynced, synced):
            ray_local.kill(a)


def test_a_rerun_of_the_eval_phase_reuses_the_teachers_results(ckpts, ray_local, tmp_path):
    """The teacher's suite results (hours of 32k-token answers on a real run) were kept only in memory, so a failure
    in the student's evaluation threw them away: a rerun reuses them while teacher, suite and files are the same."""
    from actors.rollout import RolloutActor
    from launch.config import load_config
    from launch.evaluation import _suite_eval
    from zeda_rl.metrics import MetricsLog

    teacher_ckpt, student_ckpt = ckpts
    cfg = load_config(
        "launch/configs/tiny-cpu.yaml", {"output_dir": str(tmp_path), "eval.suite": str(FIX / "suite.yaml")}
    )
    log = MetricsLog(tmp_path / "m.jsonl")
    teacher, student = (
        RolloutActor.options(num_cpus=0.25).remote("torch", str(c)) for c in (teacher_ckpt, student_ckpt)
    )
    try:
        for a in (teacher, student):  # as after a weight push (rollout actors stand for the run's engines here)
            ray_local.get(a.__ray_call__.remote(lambda a: setattr(a, "synced", True)))
        first = _suite_eval(cfg, teacher_ckpt, student_ckpt, log, {"teacher": [teacher], "student": [student]})
        assert (cfg.run_dir / "eval" / "teacher-run.json").is_file()
        ray_local.kill(teacher)  # gone: only the kept results can give the teacher's side now
        again = _suite_eval(cfg, teacher_ckpt, student_ckpt, log, {"teacher": [teacher], "student": [student]})
        assert again[0] == first[0] and again[1]["accuracy"] == first[1]["accuracy"]
    finally:
        for a in (teacher, student):
            ray_local.kill(a)


def test_zero_shares_from_ids_or_from_the_engine():
    from zeda_rl.evaluate import reduce_routing, sample_zero_shares
    from zeda_rl.sampling import Sample

    ids = np.array([[[0, 9]], [[8, 8]], [[-1, -1]]], dtype=np.int16)  # 3 tokens, 1 MoE layer, top-2, N = 8
    s = Sample([1, 2], [3], np.zeros(1, np.float32), ids, "stop")
    assert sample_zero_shares(s, 8, 1).tolist() == [0.75]  # 3 of the 4 recorded slots are zero experts
    small = reduce_routing(s, 8, 1)
    assert small.routed_experts is None and sample_zero_shares(small, 8, 1).tolist() == [0.75]
    with pytest.raises(ValueError, match="zero shares of 1 layers from the engine; expected 2 MoE layers"):
        sample_zero_shares(small, 8, 2)
