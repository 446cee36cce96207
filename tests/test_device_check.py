"""The CPU-side parts of the prepared GPU check (tests/gpu/device_check.py, issue 24 item 4).

Checked here, without a GPU: bad step names and budgets are refused with a clear message; the summary writer
turns a fake result set into JSON and markdown; the skip reasons (no CUDA first, then a second GPU, then
missing modules with the wheel to ship); the time budget (steps refused once their estimate no longer fits,
timeouts cut at the budget's end); a run on a CUDA-less machine exits 0 with every step "skipped: no CUDA
device" and still writes both files; and a rehearsal of two steps on the CPU at tiny shapes.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PATH = ROOT / "tests" / "gpu" / "device_check.py"


def _load():
    spec = importlib.util.spec_from_file_location("device_check", PATH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["device_check"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


dc = _load()

NO_GPU_ENV = {
    "cuda": False,
    "gpus": 0,
    "modules": {m: True for m in dc.PROBED_MODULES} | {"sglang": False},
}
ONE_GPU_ENV = {
    "cuda": True,
    "gpus": 1,
    "devices": [dict(name="NVIDIA H100 80GB HBM3", memory_gib=79.2, capability="sm_90", multiprocessors=132)],
    "modules": {m: True for m in dc.PROBED_MODULES} | {"sglang": False, "megatron.core": False},
}


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_import_needs_only_the_standard_library():
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('device_check', {str(PATH)!r})\n"
        "m = importlib.util.module_from_spec(spec); sys.modules['device_check'] = m; spec.loader.exec_module(m)\n"
        "print(sorted(n for n in ('torch', 'transformers', 'numpy', 'megatron', 'zeda_rl') if n in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "arg, message",
    [
        ("moe_layer,bogus", "unknown step 'bogus'; known steps: moe_layer, model, copy, learner, nccl, sglang"),
        ("foo,bar", "unknown steps 'foo', 'bar'"),
        ("copy,copy", "step 'copy' named twice"),
        (",", "no step named"),
    ],
)
def test_bad_step_names_are_refused(capsys, arg, message):
    with pytest.raises(SystemExit) as exc:
        dc.main(["--steps", arg])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "argument --steps" in err and message in err


@pytest.mark.parametrize("value, message", [("0", "must be more than 0 seconds"), ("soon", "expected a number")])
def test_bad_budget_is_refused(capsys, value, message):
    with pytest.raises(SystemExit):
        dc.main(["--budget", value])
    assert message in capsys.readouterr().err


def test_steps_keep_their_order_and_list_prints_them(capsys):
    a = dc.build_parser().parse_args(["--steps", " copy , moe_layer"])
    assert a.steps == ["copy", "moe_layer"]
    assert dc.build_parser().parse_args([]).steps == list(dc.STEPS)
    assert dc.main(["--list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in dc.STEPS)


def test_out_dir_prefers_the_flag_then_OUT():
    assert dc.out_dir("x", {"OUT": "/o"}) == Path("x")
    assert dc.out_dir(None, {"OUT": "/o"}) == Path("/o")
    assert dc.out_dir(None, {}) == ROOT / "runs" / "device_check"


def test_skip_reasons():
    # no CUDA: every step says so, and only that
    assert {n: dc.skip_reason(s, NO_GPU_ENV) for n, s in dc.STEPS.items()} == dict.fromkeys(dc.STEPS, dc.NO_CUDA)
    assert all(s.needs_cuda for s in dc.STEPS.values())
    # one GPU: the single-GPU steps run; NCCL, megatron-core and SGLang say what is missing
    r = {n: dc.skip_reason(s, ONE_GPU_ENV) for n, s in dc.STEPS.items()}
    assert r["moe_layer"] is r["model"] is r["copy"] is None
    assert r["nccl"] == "needs 2 GPUs, this machine has 1"
    assert "megatron.core (ship megatron-core==0.16.1)" in r["learner"] and "wheels/" in r["learner"]
    assert "README" in r["learner"]
    assert r["sglang"].startswith("SGLang is not installed")
    full = ONE_GPU_ENV | {"modules": {m: True for m in dc.PROBED_MODULES}, "gpus": 2}
    assert all(dc.skip_reason(s, full) is None for s in dc.STEPS.values())
    # a rehearsal runs the CUDA steps on the CPU; missing modules still count
    rehearsal = {n: dc.skip_reason(s, NO_GPU_ENV, rehearse=True) for n, s in dc.STEPS.items()}
    assert [n for n, why in rehearsal.items() if why] == ["sglang"]


def test_a_broken_probe_still_says_no_cuda_and_why():
    why = dc.skip_reason(dc.STEPS["copy"], {"error": "Traceback\nImportError: libcuda"})
    assert why == "no CUDA device (the environment probe failed: ImportError: libcuda)"
    why = dc.skip_reason(dc.STEPS["copy"], {"cuda": False, "torch_error": "OSError: bad"})
    assert why == "no CUDA device (torch did not import: OSError: bad)"


def test_a_step_over_its_timeout_is_killed(tmp_path):
    args = dc.build_parser().parse_args([])
    env = dc.child_environ({}, {"PATH": "/usr/bin:/bin", "PYTHONPATH": "", "ZEDA_DEVICE_CHECK_SLEEP": "60"})
    answer, _, seconds = dc.run_worker("env", 1.0, args, env, tmp_path / "log")
    assert answer["error"] == "timed out after 1 s and was killed"
    assert seconds < 30 and "===== env" in (tmp_path / "log").read_text()


def test_budget_refuses_steps_that_no_longer_fit_and_cuts_timeouts():
    clock = FakeClock()
    b = dc.Budget(100, clock=clock, grace_s=10)
    assert b.allows(100) and not b.allows(101)
    assert b.timeout_for(60) == 60
    clock.now += 70
    assert b.left() == 30 and b.elapsed() == 70
    assert not b.allows(31) and b.allows(30)
    assert b.timeout_for(60) == 40  # what is left plus the grace
    clock.now += 100
    assert b.timeout_for(60) == 1.0  # never zero or negative
    assert "time budget: 0 s of 100 s left, the step needs ~75 s" == b.refusal(dc.STEPS["moe_layer"])


def test_run_checks_with_budget_and_failures():
    clock = FakeClock()
    budget = dc.Budget(300, clock=clock, grace_s=30)
    env = ONE_GPU_ENV | {"modules": {m: True for m in dc.PROBED_MODULES}, "gpus": 1}
    calls = []

    def runner(name, timeout):
        calls.append((name, timeout))
        clock.now += {"moe_layer": 100, "model": 50, "copy": 20}.get(name, 0)
        if name == "model":
            raise RuntimeError("runner broke")
        if name == "copy":
            return {"result": {"headline": "fine", "errors": {"pinned": "Traceback ..."}}}, "", 20.0
        return {"result": {"headline": "fast"}}, "", 100.0

    updates = []
    recs = dc.run_checks(
        ["moe_layer", "model", "copy", "learner", "nccl"],
        env,
        budget,
        runner,
        on_update=lambda r: updates.append(len(r)),
    )
    by = {r["name"]: r for r in recs}
    assert [c[0] for c in calls] == ["moe_layer", "model", "copy"]
    assert calls[0][1] == 180  # moe_layer's own cap
    assert by["moe_layer"]["status"] == "ok" and by["moe_layer"]["result"]["headline"] == "fast"
    assert by["model"]["status"] == "failed" and "runner broke" in by["model"]["error"]
    assert by["copy"]["status"] == "partial" and by["copy"]["reason"] == "failed parts: pinned"
    # 170 s used of 300: learner's ~200 s estimate no longer fits, so it is not started
    assert by["learner"]["status"] == "skipped" and by["learner"]["reason"].startswith("time budget: 130 s of 300 s")
    assert by["nccl"]["reason"] == "needs 2 GPUs, this machine has 1"
    assert updates == [1, 2, 3, 4, 5]


def test_settle_reads_a_worker_answer():
    rec = dc.settle(dc.step_record(dc.STEPS["copy"]), {"error": "Traceback\nValueError: boom\n"}, "tail", 3.21)
    assert rec["status"] == "failed" and rec["reason"] == "ValueError: boom" and rec["seconds"] == 3.2
    assert rec["log_tail"] == "tail"
    rec = dc.settle(dc.step_record(dc.STEPS["copy"]), {"result": {"headline": "h"}}, "", 1.0)
    assert rec["status"] == "ok" and rec["reason"] is None


def _fake_report() -> dict:
    steps = [
        dict(
            name="moe_layer",
            part="(a)",
            title="one layer",
            status="ok",
            reason=None,
            seconds=41.5,
            result=dict(
                headline="zeda_skip x1.80 prefill",
                shape="hidden 2048",
                tables=[
                    dict(title="times", columns=["shape", "teacher ms", "ZEDA ms"], rows=[["prefill 4096", 2.5, 1.39]]),
                    dict(title="empty", columns=["a"], rows=[]),
                ],
                raw={"nested": {"not": "rendered"}},
                errors={},
                notes=["replayed routing"],
            ),
        ),
        dict(
            name="copy",
            part="(d)",
            title="copies",
            status="partial",
            reason="failed parts: pinned",
            seconds=9.0,
            result=dict(headline="a | b", tables=[], errors={"pinned": "Traceback\nRuntimeError: pin failed"}),
        ),
        dict(name="learner", part="(c)", title="learner", status="skipped", reason=dc.NO_CUDA, seconds=None),
        dict(
            name="model",
            part="(b)",
            title="model",
            status="failed",
            reason="ValueError: x",
            seconds=3.0,
            error="Traceback\nValueError: x",
            log_tail="some output",
        ),
    ]
    return dict(
        check="zeda-rl device check",
        started="2026-12-07T00:00:00+00:00",
        elapsed_s=123.4,
        budget_s=540.0,
        rehearse=False,
        wheels={"dir": "wheels", "installed": ["megatron-core==0.16.1"], "present": [], "error": None},
        env=dict(
            python="3.12.3",
            torch_cuda="13.0",
            devices=[dict(name="NVIDIA H100 80GB HBM3", memory_gib=79.2, capability="sm_90")],
            versions={"torch": "2.11.0", "transformers": "5.17.0", "megatron-core": "0.16.1"},
        ),
        steps=steps,
    )


def test_summary_writer_json_and_markdown(tmp_path):
    report = _fake_report()
    js, md = dc.write_report(report, tmp_path / "out")
    assert json.loads(js.read_text()) == report
    text = md.read_text()
    assert (js.name, md.name) == ("device_check.json", "device_check.md")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["device_check.json", "device_check.md"]
    assert text.startswith("# zeda-rl device check\n")
    assert "NVIDIA H100 80GB HBM3 (79.2 GiB, sm_90)" in text and "transformers 5.17.0" in text and "(CUDA 13.0)" in text
    assert "123 s of a 540 s budget" in text and "installed megatron-core==0.16.1" in text
    assert "| moe_layer | (a) | ok | 41.5 | zeda_skip x1.80 prefill |" in text
    assert "| learner | (c) | skipped: no CUDA device |  |  |" in text
    assert "| copy | (d) | partial: failed parts: pinned | 9 | a \\| b |" in text  # pipes escaped in cells
    assert "| prefill 4096 | 2.5 | 1.39 |" in text and "(nothing measured)" in text
    assert "- shape: hidden 2048" in text and "- note: replayed routing" in text and "rendered" not in text
    assert "RuntimeError: pin failed" in text and "ValueError: x" in text and "some output" in text
    # rewritten whole: a second write replaces both files
    report["steps"] = report["steps"][:1]
    dc.write_report(report, tmp_path / "out")
    assert "learner" not in md.read_text()


def test_wheels(tmp_path):
    assert dc.wheel_name(Path("megatron_core-0.16.1-cp312-cp312-manylinux_2_28_x86_64.whl")) == (
        "megatron-core",
        "0.16.1",
    )
    with pytest.raises(ValueError, match="not a wheel file name"):
        dc.wheel_name(Path("junk.whl"))
    assert dc.prepare_wheels(tmp_path / "absent", tmp_path / "site")["installed"] == []
    # a wheel of a version already installed is not installed again (no pip call)
    import importlib.metadata as md

    version = md.version("pytest")
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / f"pytest-{version}-py3-none-any.whl").write_bytes(b"")
    info = dc.prepare_wheels(tmp_path / "w", tmp_path / "site")
    assert info["present"] == [f"pytest=={version}"] and info["installed"] == [] and info["target"] is None
    env = dc.child_environ(info, {"PYTHONPATH": "/x"})
    assert env["PYTHONPATH"].split(":") == [str(ROOT), "/x"]
    env = dc.child_environ({"target": "/site"}, {})
    assert env["PYTHONPATH"].split(":") == ["/site", str(ROOT)]


def test_dims_are_qwen3_30b_a3b():
    fixture = json.loads((ROOT / "tests" / "fixtures" / "configs" / "qwen3-30b-a3b.json").read_text())
    for key, value in dc._qwen3_30b_a3b().items():
        if key == "rope_parameters":
            assert value["rope_theta"] == fixture["rope_theta"]
        else:
            assert fixture[key] == value, key
    assert dc.ZERO_EXPERTS == fixture["num_experts"] // 2


def test_learner_layout_is_what_zeda_plan_budgets():
    from launch import plan
    from launch.config import load_config

    cfg = load_config(ROOT / "launch" / "configs" / "qwen3-30b-a3b-h200.yaml", dc.learner_overrides(1024, 4096, 64))
    hf = json.loads((ROOT / "tests" / "fixtures" / "configs" / "qwen3-30b-a3b.json").read_text())
    hf["num_hidden_layers"] = 2
    p = plan.make_plan(cfg, hf, gpu="H100")
    k = p["knobs"]
    assert (k["ep"], k["tp"], k["precision"], k["recompute"], k["optimizer"], k["attention"]) == (
        1,
        1,
        "bf16",
        "full",
        "local",
        "local",
    )
    assert (k["micro_tokens"], k["seq"]) == (4096, 1024)
    assert tuple(p["arch"]["moe_layers"]) == (0, 1) and p["arch"]["zero"] == 64
    assert 35 * dc.GIB < p["learner"]["total"] < 50 * dc.GIB  # fits an H100 with room: ~42 GiB
    assert next(v for v in p["verdicts"] if v["placement"] == "learner rank")["fits"]


@pytest.mark.skipif(
    importlib.util.find_spec("torch") is None or __import__("torch").cuda.is_available(),
    reason="checks the CUDA-less run (this machine has CUDA)",
)
def test_cpu_machine_run_skips_every_step_and_writes_both_files(tmp_path, capsys):
    out = tmp_path / "out"
    rc = dc.main(["--out", str(out), "--wheels", str(tmp_path / "no-wheels")])
    assert rc == 0
    report = json.loads((out / "device_check.json").read_text())
    assert [s["name"] for s in report["steps"]] == list(dc.STEPS)
    assert {(s["status"], s["reason"]) for s in report["steps"]} == {("skipped", "no CUDA device")}
    assert report["env"]["cuda"] is False and report["env"]["versions"]["torch"]
    md = (out / "device_check.md").read_text()
    assert md.count("skipped: no CUDA device") == len(dc.STEPS)
    assert (out / "device_check.log").is_file()
    assert "skipped: no CUDA device" in capsys.readouterr().out


def test_rehearsal_of_the_layer_and_copy_steps_on_cpu():
    """The step code itself at tiny shapes on the CPU (the GPU run is the measurement)."""
    ctx = dc.Ctx(120, rehearse=True)
    copy = dc.step_copy(ctx)
    assert copy["copy_correct"] is True and not copy["errors"]
    assert [r[0] for r in copy["tables"][0]["rows"]] == ["host to device, pageable", "device to device"]
    layer = dc.step_moe_layer(ctx)
    assert not layer["errors"], layer["errors"]
    rows = layer["tables"][0]["rows"]
    assert {(r[0], r[1]) for r in rows} == {
        (shape, impl)
        for shape in ("prefill 256 tokens", "decode batch 1", "decode batch 4")
        for impl in ("zeda_skip", "grouped_mm")
    }
    assert all(r[6] == 2.0 for r in rows)  # half the slots are zero: the limit is x2
    assert all(r[1] < 0.05 for r in layer["tables"][1]["rows"])  # both paths compute the same layer
    md = dc.render_markdown({"steps": [dict(dc.step_record(dc.STEPS["moe_layer"]), status="ok", result=layer)]})
    assert "zeda_skip" in md and "grouped_mm" in md
