"""A config a run cannot use is refused before any actor starts, naming the key, the value and what was expected.

Two layers: the validators at load (the YAML alone) and `launch.config.preflight` (the teacher's HF config,
the file system, this machine's addresses), which `zeda train` runs before the pipeline and `zeda doctor`
shows. No Ray, no weights: the embedded teacher's figures come from its recipe.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import launch.pipeline
from launch.config import ConfigError, RunConfig, load_config, local_addresses, preflight
from tests.helpers import train_main

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "launch" / "configs" / "tiny-cpu.yaml"
QWEN = ROOT / "launch" / "configs" / "qwen3-30b-a3b-h200.yaml"
FIX = ROOT / "tests" / "fixtures"


@pytest.mark.parametrize(
    "overrides,key,expected",
    [
        ({"name": "../.."}, "name", "one plain path component"),
        ({"name": "/tmp/elsewhere"}, "name", "one plain path component"),
        ({"name": ".."}, "name", "one plain path component"),
        ({"name": "a/b"}, "name", "one plain path component"),
        ({"name": ""}, "name", "one plain path component"),
        ({"sft.lr": 0}, "sft.lr", "learning rate > 0"),
        ({"opd.lr": -1e-6}, "opd.lr", "greater than or equal to 0"),
        ({"opd.lr": 0.0}, "opd.lr", "learning rate > 0"),
        ({"sft.min_lr": 1.0}, "sft.min_lr (1.0) must be <= sft.lr", "climb"),
        ({"opd.clip_eps": 0}, "opd.clip_eps", "greater than 0"),
        ({"learner.grad_clip": -1}, "learner.grad_clip", "greater than or equal to 0"),
        ({"cluster.num_cpus": -2}, "cluster.num_cpus", "greater than or equal to 1"),
        ({"cluster.num_cpus": 0}, "cluster.num_cpus", "greater than or equal to 1"),
        ({"rollout.cpus": -1}, "rollout.cpus", "greater than 0"),
        ({"learner.tp": 3}, "learner.tp (3) must divide the learner ranks", "2 x 1 = 2"),
        ({"cluster.bind_host": "0.0.0.0"}, "cluster.bind_host: 0.0.0.0", "cluster.allow_all_interfaces: true"),
        ({"cluster.bind_host": "*"}, "cluster.bind_host: *", "cluster.allow_all_interfaces: true"),
        ({"cluster.bind_host": "eth0"}, "cluster.bind_host", "an IPv4 address of this machine"),
        ({"learner.attention": "flash"}, "learner.attention: flash", "learner.gpus_per_rank > 0"),
        ({"opd.weight_sync": "nccl"}, "opd.weight_sync: nccl", "rollout.backend: torch engines receive pushes"),
    ],
)
def test_load_refuses_naming_key_and_expectation(overrides, key, expected):
    with pytest.raises(ConfigError) as err:
        load_config(TINY, overrides)
    msg = str(err.value)
    assert str(TINY) in msg and key in msg and expected in msg, msg


def test_what_the_checks_allow_still_loads():
    cfg = load_config(
        TINY,
        {
            "name": "run-1.b_c",
            "cluster.bind_host": "0.0.0.0",
            "cluster.allow_all_interfaces": True,
            "learner.ep": 4,
            "learner.dp": 2,
            "learner.tp": 4,
            "cluster.num_cpus": 1,
        },
    )
    assert cfg.cluster.bind_host == "0.0.0.0" and cfg.learner.tp == 4
    assert RunConfig().cluster.bind_host == "127.0.0.1" and not RunConfig().cluster.allow_all_interfaces


def test_set_into_a_scalar_is_a_config_error(capsys):
    with pytest.raises(ConfigError, match=r"--set seed\.x: seed is 0 in .*tiny-cpu\.yaml, not a section"):
        load_config(TINY, {"seed.x": 1})
    with pytest.raises(ConfigError, match=r"--set sampling\.temperature\.y: sampling\.temperature is 1\.0"):
        load_config(TINY, {"sampling.temperature.y": 1})
    assert train_main(["--config", str(TINY), "--set", "seed.x=1"]) == 2
    err = capsys.readouterr().err
    assert "--set seed.x" in err and "Traceback" not in err


def test_the_shipped_tiny_config_passes_preflight():
    assert preflight(load_config(TINY)) == []


@pytest.mark.parametrize(
    "overrides,expected",
    [
        (
            {"learner.ep": 3},
            "learner.ep (3) does not divide the teacher's 8 experts (the embedded teacher's recipe "
            "(zeda_rl.teacher.TEACHERS['basic'])): expected one of [1, 2, 4, 8]",
        ),
        ({"learner.ep": 4, "learner.tp": 4}, "learner.tp (4) does not divide the teacher's num_key_value_heads (2"),
        (
            {"sampling.max_new_tokens": 64},
            "sampling.max_new_tokens (64) + a 1-token prompt exceeds the teacher's max_position_embeddings (64",
        ),
        ({"data.max_prompt_tokens": 60}, "sampling.max_new_tokens (12) + data.max_prompt_tokens (60) = 72 exceeds"),
        ({"model.teacher": "/nonexistent/teacher"}, "model.teacher (/nonexistent/teacher): no such directory"),
        (
            {"data.opd_prompts": "/nonexistent/p.jsonl"},
            "data.opd_prompts (/nonexistent/p.jsonl): no such file or directory",
        ),
        (
            {"data.sft_prompts": "/nonexistent/s.jsonl", "sft.prompts": 4},
            "data.sft_prompts (/nonexistent/s.jsonl): no such file",
        ),
        ({"data.sft_rollouts": "/nonexistent/r"}, "data.sft_rollouts (/nonexistent/r): no such file"),
        (
            {"cluster.bind_host": "203.0.113.7"},
            "cluster.bind_host (203.0.113.7): not an address of this machine (its IPv4 addresses: ",
        ),
    ],
)
def test_preflight_names_the_problem(overrides, expected):
    problems = preflight(load_config(TINY, overrides))
    assert len(problems) == 1 and expected in problems[0], problems


def test_the_embedded_teacher_needs_no_directory_and_a_given_prompt_budget_that_fits_passes():
    cfg = load_config(TINY, {"data.max_prompt_tokens": 52, "sampling.max_new_tokens": 12, "cluster.bind_host": "auto"})
    assert preflight(cfg) == []
    assert preflight(load_config(TINY, {"cluster.bind_host": sorted(local_addresses())[-1]})) == []


def test_a_teacher_directory_without_config_json_and_a_given_hf_config(tmp_path, monkeypatch):
    import launch.config as config

    monkeypatch.setattr(config, "_IMPORTS", {config.FLASH_MODULE: ""})  # as on a node with TransformerEngine
    (tmp_path / "empty").mkdir()
    assert preflight(load_config(TINY, {"model.teacher": str(tmp_path / "empty")})) == [
        f"model.teacher ({tmp_path / 'empty'}): no config.json in it (expected a Hugging Face checkpoint directory)"
    ]
    teacher = tmp_path / "qwen"
    teacher.mkdir()
    shutil.copy(FIX / "configs" / "qwen3-30b-a3b.json", teacher / "config.json")
    prompts = str(FIX / "data" / "prompts.jsonl")
    base = {
        "model.teacher": str(teacher),
        "data.sft_prompts": prompts,
        "data.opd_prompts": prompts,
        "cluster.bind_host": "auto",
        "eval.suite": None,  # the paper's benchmark files are not on this machine (their check has a test of its own)
    }
    assert preflight(load_config(QWEN, base)) == []  # the shipped H200 layout fits Qwen3-30B-A3B's shape
    bad = preflight(load_config(QWEN, {**base, "learner.ep": 6, "learner.tp": 3}))
    assert [p.split(" (")[0] for p in bad] == ["learner.ep", "learner.tp", "learner.tp"]
    assert f"128 experts ({teacher / 'config.json'})" in bad[0]
    assert "num_attention_heads (32" in bad[1] and "num_key_value_heads (4" in bad[2]
    hf = json.loads((teacher / "config.json").read_text())
    long = preflight(load_config(QWEN, {**base, "sampling.max_new_tokens": 40000, "data.max_response_tokens": 40000}))
    assert long == [
        f"sampling.max_new_tokens (40000) + data.max_prompt_tokens (4096) = 44096 exceeds the teacher's "
        f"max_position_embeddings ({hf['max_position_embeddings']}, {teacher / 'config.json'}): the rollouts "
        "could not be scored"
    ]
    # an HF config given in place of the teacher's (zeda doctor --hf-config) sets the figures
    assert (
        "learner.ep (8) does not divide the teacher's 6 experts (mine)"
        in preflight(load_config(QWEN, base), {**hf, "num_experts": 6}, "mine")[0]
    )


def test_train_refuses_every_problem_at_once_before_any_actor(monkeypatch, capsys):
    def no_run(*a, **k):
        raise AssertionError("the pipeline started")

    monkeypatch.setattr(launch.pipeline, "run", no_run)
    code = train_main(
        [
            "--config",
            str(TINY),
            "--set",
            "learner.ep=3",
            "--set",
            "data.opd_prompts=/nonexistent/p.jsonl",
            "--set",
            "cluster.bind_host=203.0.113.7",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and f"{TINY}: refused:" in err
    for key in ("learner.ep (3)", "data.opd_prompts (/nonexistent/p.jsonl)", "cluster.bind_host (203.0.113.7)"):
        assert f"\n  {key}" in err, err


def test_every_benchmark_file_of_the_eval_suite_is_checked_before_training(tmp_path):
    """eval.suite: a missing or unparsable benchmark file is a refusal naming it, before anything starts; the real
    configs evaluate on the paper's suite by default."""
    import shutil

    from launch.config import load_config, preflight

    fix = Path(__file__).parent / "fixtures" / "eval"
    for f in ("gsm8k.jsonl", "math500.jsonl"):
        shutil.copy(fix / f, tmp_path / f)
    (tmp_path / "math500.jsonl").write_text('{"problem": "1+1", "answer": "2"}\n{"problem": \n')  # a torn line
    (tmp_path / "suite.yaml").write_text(
        "name: s\ndecoding: {temperature: 0.6, max_new_tokens: 16}\nbenchmarks:\n"
        "  - {name: gsm8k, path: gsm8k.jsonl, grader: math}\n  - {name: math500, path: math500.jsonl, grader: math}\n"
        "  - {name: aime, path: aime.jsonl, grader: math}\n"
    )
    cfg = load_config(str(TINY), {"eval.suite": str(tmp_path / "suite.yaml")})
    problems = [p for p in preflight(cfg) if p.startswith("eval.suite")]
    assert len(problems) == 2, problems
    assert "'math500'" in problems[0] and "does not parse" in problems[0]
    assert "'aime'" in problems[1] and str(tmp_path / "aime.jsonl") in problems[1] and "no such file" in problems[1]
    assert [p for p in preflight(load_config(str(TINY), {"eval.suite": str(fix / "suite.yaml")})) if "eval" in p] == []
    for name in ("qwen3-30b-a3b-h200.yaml", "glm-4.7-flash-h200.yaml"):
        assert load_config(f"launch/configs/{name}", {}).eval.suite == "launch/suites/paper.yaml"


def _fake_te(root: Path, pytorch_body: str) -> Path:
    """A transformer_engine package under `root` whose `pytorch` module runs `pytorch_body`."""
    pkg = root / "transformer_engine"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "pytorch.py").write_text(pytorch_body)
    return root


def test_flash_needs_transformer_engine_importable_where_the_driver_runs(tmp_path, monkeypatch):
    """learner.attention: flash is refused by preflight (zeda doctor, zeda train) naming the key and the package when
    transformer_engine.pytorch does not import in this environment; a CPU config (attention local) is never asked."""
    import launch.config as config

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(config, "_IMPORTS", {})
    flash = load_config(QWEN, {"cluster.address": None})
    assert load_config(TINY).learner.attention == "local" and config.package_problems(load_config(TINY)) == []
    missing = config.package_problems(flash)  # this machine has no TransformerEngine
    assert len(missing) == 1 and missing[0].startswith("learner.attention: flash needs the package transformer_engine")
    assert "no module named 'transformer_engine'" in missing[0] and config.TE_REQUIREMENT in missing[0]
    assert missing[0] in preflight(flash)

    broken = _fake_te(tmp_path / "broken", "raise ImportError('libtransformer_engine.so: cannot open shared object')")
    monkeypatch.syspath_prepend(str(broken))
    monkeypatch.setenv("PYTHONPATH", str(broken))
    monkeypatch.setattr(config, "_IMPORTS", {})
    (why,) = config.package_problems(flash)
    assert "import transformer_engine.pytorch: ImportError: libtransformer_engine.so: cannot open" in why

    good = _fake_te(tmp_path / "good", "")
    monkeypatch.syspath_prepend(str(good))
    monkeypatch.setenv("PYTHONPATH", str(good))
    monkeypatch.setattr(config, "_IMPORTS", {})
    assert config.package_problems(flash) == [] and not [p for p in preflight(flash) if "transformer_engine" in p]

    # a Ray Client driver runs off the cluster: its packages are not the learner's, so it is not refused here
    monkeypatch.setattr(config, "_IMPORTS", {config.FLASH_MODULE: "no module named 'transformer_engine'"})
    assert config.package_problems(load_config(QWEN, {"cluster.address": "ray://10.0.0.1:10001"})) == []


def test_train_refuses_flash_without_transformer_engine_before_any_actor(tmp_path, monkeypatch, capsys):
    import launch.config as config

    def no_run(*a, **k):
        raise AssertionError("the pipeline started")

    monkeypatch.setattr(launch.pipeline, "run", no_run)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(config, "_IMPORTS", {})
    (tmp_path / "config.json").write_text((FIX / "configs" / "qwen3-30b-a3b.json").read_text())
    code = train_main(["--config", str(QWEN), "--set", f"model.teacher={tmp_path}", "--set", "cluster.address=null"])
    err = capsys.readouterr().err
    assert code == 2 and f"{QWEN}: refused:" in err
    assert "\n  learner.attention: flash needs the package transformer_engine" in err, err
