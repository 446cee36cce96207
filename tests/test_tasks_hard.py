"""The hard task suite: answers checked independently, deterministic disjoint splits, a teacher
recipe of its own (cache key and directory apart from the basic one), the run config that selects
it, and the skip hooks of bench/skip_sensitivity.py."""

from __future__ import annotations

import json
import re

import pytest
import torch

from launch.config import load_config
from zeda_rl import tasks, teacher

HARD = tasks.SUITES["hard"]


def _expected(e: tasks.Example) -> str:
    if e.family == "add4":
        a, b = map(int, re.fullmatch(r"(\d{4})\+(\d{4})=", e.prompt).groups())
        return str(a + b)
    if e.family in ("mul", "mul4"):
        digits = 3 if e.family == "mul" else 4
        a, b = map(int, re.fullmatch(rf"(\d{{{digits}}})\*([2-9])=", e.prompt).groups())
        return str(a * b)
    raise AssertionError(e.family)


def test_hard_answers_are_correct_and_graded_exactly():
    held = tasks.make_split("heldout", 60, suite="hard")
    assert [e.family for e in held] == [f for f in HARD for _ in range(60)]
    for e in held:
        assert e.answer == _expected(e), e
        assert tasks.score(e, e.answer) and tasks.score(e, f"{e.answer}<eos>9")
        assert not tasks.score(e, e.answer[:-1]) and not tasks.score(e, e.answer + "1")
    assert any(e.family == "add4" and len(e.answer) == 5 for e in held)  # carries out of the fourth digit happen


def test_hard_splits_are_deterministic_disjoint_and_leave_basic_unchanged():
    a = tasks.make_split("train", 40, seed=1, suite="hard")
    assert a == tasks.make_split("train", 40, seed=1, suite="hard") and a != tasks.make_split(
        "train", 40, seed=2, suite="hard"
    )
    n = load_config("launch/configs/tiny-cpu-hard.yaml").eval.n_per_family  # what the hard configs evaluate on
    held = tasks.make_split("heldout", n, suite="hard")
    assert len({e.prompt for e in held}) == len(held) == n * len(HARD)
    assert not {e.prompt for e in a} & {e.prompt for e in held}
    assert tasks.make_split("heldout", 20) == tasks.make_split("heldout", 20, suite="basic")
    assert tasks.families() == tasks.FAMILIES
    with pytest.raises(ValueError, match="'basic', 'hard'"):
        tasks.families("harder")
    with tasks_tokenizer() as tok:  # every character of the hard suite is in the embedded vocabulary
        for e in held[::50]:
            assert tok.decode(tok(e.prompt + e.answer).input_ids) == e.prompt + e.answer


class tasks_tokenizer:
    def __enter__(self):
        from zeda_rl.tokenizer import build_tokenizer

        return build_tokenizer()

    def __exit__(self, *exc):
        return False


def test_cache_keys_apart_per_suite_and_basic_key_unchanged():
    assert teacher.recipe_hash(0, 2000) == "ff02c5f28207"  # the key before suites existed: old caches stay valid
    assert teacher.recipe_hash(0, 2000, "hard") != teacher.recipe_hash(0, 2000)
    with pytest.raises(ValueError, match="unknown"):
        teacher.recipe_hash(0, 10, "harder")


def test_hard_teacher_config_builds(tmp_path, monkeypatch):
    monkeypatch.setenv("ZEDA_CACHE", str(tmp_path))
    monkeypatch.setattr(teacher, "HELDOUT_PER_FAMILY", 2)
    out = teacher.build_teacher(steps=1, progress=False, min_accuracy=0.0, suite="hard")
    assert out.parent == tmp_path and out.name == f"teacher-hard-{teacher.recipe_hash(0, 1, 'hard')}"
    cfg = json.loads((out / "config.json").read_text())
    for k in ("num_hidden_layers", "num_experts_per_tok", "moe_intermediate_size", "router_aux_loss_coef"):
        assert cfg[k] == teacher.HARD_MODEL[k]
    assert cfg["num_local_experts"] == teacher.HARD_MODEL["num_experts"]  # transformers' saved name
    meta = json.loads((out / "teacher.json").read_text())
    assert meta["suite"] == "hard" and set(meta["heldout_accuracy"]) == {*HARD, "mean"}


def test_tiny_cpu_hard_config_selects_the_hard_suite():
    from launch.cli import build_parser
    from launch.config import load_config
    from zeda_rl.data import embedded_records

    cfg = load_config("launch/configs/tiny-cpu-hard.yaml")
    assert cfg.data.tasks == "hard" and cfg.name == "tiny-cpu-hard"
    from launch.plan import load_hf_config  # plan and preflight read the hard teacher's own config, not basic's

    assert load_hf_config(cfg)["num_hidden_layers"] == teacher.HARD_MODEL["num_hidden_layers"] == 3
    assert (
        load_hf_config(load_config("launch/configs/tiny-cpu.yaml"))["num_hidden_layers"]
        == teacher.MODEL["num_hidden_layers"]
    )
    assert load_config("launch/configs/tiny-cpu.yaml").data.tasks == "basic"
    recs = embedded_records("train", 3, cfg.seed, cfg.data.tasks)
    assert [r.extra["family"] for r in recs] == [f for f in HARD for _ in range(3)]
    for suite in tasks.SUITES:  # the CLI's choices (it parses before importing anything) are the suites
        assert build_parser().parse_args(["teacher", "build", "--tasks", suite]).tasks == suite
        assert build_parser().parse_args(["eval", "ckpt", "--tasks", suite]).tasks == suite


def test_skip_hooks_drop_the_share_they_claim():
    from transformers import Qwen3MoeForCausalLM

    from bench.skip_sensitivity import routers, skipping
    from zeda_rl.tiny import tiny_qwen3_moe_config

    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(tiny_qwen3_moe_config(num_experts=8, num_experts_per_tok=4)).eval()
    ids = torch.randint(3, 64, (4, 16))
    with torch.no_grad():
        base = model(ids).logits
        with skipping(model, "none") as c:
            assert torch.allclose(model(ids).logits, base) and c["skipped"] == 0
        router = routers(model)[0]
        h = torch.randn(32, router.hidden_dim)
        with skipping(model, "half", renorm=True) as c:
            half = model(ids).logits
            _, w, _ = router(h)
        assert c["skipped"] * 2 == c["routed"] and not torch.allclose(half, base)
        assert ((w > 0).sum(-1) == 2).all() and torch.allclose(w.sum(-1), torch.ones(32))
        with skipping(model, "half") as c:
            _, w_as_is, _ = router(h)
        _, full, _ = router(h)
        assert torch.allclose(w_as_is.sum(-1), full.topk(2, dim=-1).values.sum(-1))  # as-is: the kept weights unchanged
        with skipping(model, "random", seed=3) as c:
            model(ids)
        assert 0.4 < c["skipped"] / c["routed"] < 0.6
    with pytest.raises(ValueError, match="mode"):
        with skipping(model, "all"):
            pass


def test_the_lean_teacher_is_a_teacher_of_the_hard_suite_with_its_own_cache_key(tmp_path, monkeypatch):
    spec = teacher.teacher_spec("hard", "hard-lean")
    assert spec.suite == "hard" and spec.model["moe_intermediate_size"] == teacher.LEAN_WIDTH < 64
    assert {k: v for k, v in spec.model.items() if k != "moe_intermediate_size"} == {
        k: v for k, v in teacher.HARD_MODEL.items() if k != "moe_intermediate_size"
    }
    assert teacher.recipe_hash(0, 4000, "hard") == "ed5b9aba09f8"  # the wide hard teacher's cache stays valid
    assert teacher.recipe_hash(0, 4000, "hard", "hard-lean") != teacher.recipe_hash(0, 4000, "hard")
    with pytest.raises(ValueError, match="learns the 'hard' tasks, not 'basic'"):
        teacher.teacher_spec("basic", "hard-lean")
    with pytest.raises(ValueError, match="embedded teacher 'tiny' unknown"):
        teacher.teacher_spec("hard", "tiny")
    monkeypatch.setenv("ZEDA_CACHE", str(tmp_path))
    monkeypatch.setattr(teacher, "HELDOUT_PER_FAMILY", 2)
    with pytest.raises(RuntimeError, match="--tasks hard --teacher hard-lean --seed 1"):
        teacher.build_teacher(steps=1, progress=False, suite="hard", name="hard-lean")  # its own bar refuses 1 step
    out = teacher.build_teacher(steps=1, progress=False, min_accuracy=0.0, suite="hard", name="hard-lean")
    assert out.name == f"teacher-hard-lean-{teacher.recipe_hash(0, 1, 'hard', 'hard-lean')}"
    assert json.loads((out / "config.json").read_text())["moe_intermediate_size"] == teacher.LEAN_WIDTH
    assert json.loads((out / "teacher.json").read_text())["teacher"] == "hard-lean"


def test_a_config_names_its_embedded_teacher_and_is_refused_a_teacher_of_another_suite(tmp_path):
    from launch.config import ConfigError, load_config
    from launch.plan import load_hf_config

    cfg = load_config("launch/configs/tiny-cpu-hard.yaml", {"model.embedded_teacher": "hard-lean"})
    assert load_hf_config(cfg)["moe_intermediate_size"] == teacher.LEAN_WIDTH
    with pytest.raises(ConfigError, match="model.embedded_teacher: embedded teacher 'hard-lean' learns the 'hard'"):
        load_config("launch/configs/tiny-cpu.yaml", {"model.embedded_teacher": "hard-lean"})
    with pytest.raises(ConfigError, match="model.embedded_teacher .* names an embedded teacher"):
        load_config(
            "launch/configs/tiny-cpu-hard.yaml", {"model.embedded_teacher": "hard", "model.teacher": str(tmp_path)}
        )
