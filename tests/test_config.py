"""Every shipped run config loads and validates; bad configs fail naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from launch.config import ConfigError, RunConfig, load_config
from tests.helpers import train_main

CONFIGS = sorted(Path("launch/configs").glob("*.yaml"))


def test_there_are_configs_for_cpu_and_both_h200_families():
    names = {p.stem for p in CONFIGS}
    assert {"tiny-cpu", "qwen3-30b-a3b-h200", "glm-4.7-flash-h200"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_loads_and_validates(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    assert cfg.opd.max_staleness >= 0 and cfg.opd.sync_every >= 1
    if "h200" in path.stem:
        # ZEDA.md section 5: alpha 0.1, w 2, SFT lr 2e-5 cosine, OPD lr 5e-6 (Qwen) or 1e-6 (GLM) constant
        assert cfg.learner.alpha == 0.1 and cfg.learner.w == 2.0
        assert (
            cfg.sft.lr == 2e-5 and cfg.sft.schedule == "cosine" and cfg.opd.lr == (1e-6 if "glm" in path.stem else 5e-6)
        )
        assert cfg.rollout.backend == cfg.teacher.backend == "sglang" and cfg.learner.gpus_per_rank >= 1


def test_unknown_key_is_named(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("name: x\nopd: {stepz: 3}\n")
    with pytest.raises(ConfigError, match=r"opd\.stepz"):
        load_config(p)


def test_bad_value_is_named_with_what_was_given(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("rollout: {backend: vllm}\nlearner: {ep: 0}\n")
    with pytest.raises(ConfigError) as err:
        load_config(p)
    msg = str(err.value)
    assert "rollout.backend" in msg and "'vllm'" in msg and "learner.ep" in msg and str(p) in msg


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    p = tmp_path / "list.yaml"
    p.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(p)


def test_overrides_apply_by_dotted_key():
    cfg = load_config("launch/configs/tiny-cpu.yaml", {"opd.steps": 3, "sampling.temperature": 0.5})
    assert cfg.opd.steps == 3 and cfg.sampling.temperature == 0.5


def test_driver_exits_2_with_the_key_on_a_bad_override(capsys):
    assert train_main(["--config", "launch/configs/tiny-cpu.yaml", "--set", "opd.max_staleness=-1"]) == 2
    assert "opd.max_staleness" in capsys.readouterr().err


def test_booleans_are_not_counts():
    """YAML's `true` is 1 to Python: `opd.steps: true` or `learner.ep: true` must be refused, naming the key."""
    from launch.config import RunConfig

    for bad, key in (
        ({"opd": {"steps": True}}, "opd.steps"),
        ({"learner": {"ep": True}}, "learner.ep"),
        ({"seed": False}, "seed"),
        ({"sft": {"lr": True}}, "sft.lr"),
    ):
        with pytest.raises(ValueError, match=key.replace(".", r"\.")) as err:
            RunConfig.model_validate(bad)
        assert "boolean" in str(err.value)
    assert RunConfig.model_validate({"opd": {"asynchronous": False, "steps": 3}}).opd.steps == 3


def test_extends_merges_sections_key_by_key_and_the_child_wins(tmp_path):
    (tmp_path / "base.yaml").write_text("name: base\nseed: 3\nopd: {steps: 7, lr: 1.0e-4}\nsft: {steps: 5}\n")
    (tmp_path / "sub").mkdir()
    child = tmp_path / "sub" / "child.yaml"
    child.write_text("extends: ../base.yaml\nname: child\nopd: {steps: 9}\n")
    cfg = load_config(child, {"opd.lr": 2e-4})
    assert (cfg.name, cfg.seed, cfg.sft.steps) == ("child", 3, 5)  # inherited, the child's name
    assert (cfg.opd.steps, cfg.opd.lr) == (9, 2e-4)  # the child's key, then --set on top


def test_the_lean_hard_config_is_the_hard_recipe_with_another_teacher():
    hard = load_config("launch/configs/tiny-cpu-hard.yaml").model_dump()
    lean = load_config("launch/configs/tiny-cpu-hard-lean.yaml").model_dump()
    differ = {(s, k) for s in hard if isinstance(hard[s], dict) for k in hard[s] if hard[s][k] != lean[s][k]}
    assert differ == {("model", "embedded_teacher")} and lean["name"] == "tiny-cpu-hard-lean"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("extends: missing.yaml\n", r"missing\.yaml: config file not found \(extended by .*child\.yaml\)"),
        ("extends: 3\n", r"child\.yaml: extends: expected the path of another config file, got 3"),
        ("extends: child.yaml\n", r"child\.yaml: extends: child\.yaml makes a loop"),
    ],
)
def test_a_broken_extends_names_the_file_and_what_was_expected(tmp_path, text, expected):
    child = tmp_path / "child.yaml"
    child.write_text(text)
    with pytest.raises(ConfigError, match=expected):
        load_config(child)


def test_a_loop_through_two_files_is_refused(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match=r"makes a loop"):
        load_config(tmp_path / "a.yaml")


def test_an_invalid_key_inherited_from_the_base_names_both_files(tmp_path):
    (tmp_path / "base.yaml").write_text("opd: {stepz: 3}\n")
    (tmp_path / "child.yaml").write_text("extends: base.yaml\nname: child\n")
    with pytest.raises(ConfigError, match=r"child\.yaml \(extending .*base\.yaml\): invalid config\n  opd\.stepz"):
        load_config(tmp_path / "child.yaml")
