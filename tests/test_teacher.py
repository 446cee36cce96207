"""The task suite, the character tokenizer and the teacher build (cache, atomicity, HF format)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from zeda_rl import tasks, teacher
from zeda_rl.tokenizer import VOCAB_SIZE, save_tokenizer


def test_splits_are_deterministic_disjoint_and_cover_every_family():
    a, b = tasks.make_split("train", 50, seed=3), tasks.make_split("train", 50, seed=3)
    assert a == b and len(a) == 50 * len(tasks.FAMILIES)
    held = tasks.make_split("heldout", 50)
    assert {e.family for e in held} == set(tasks.FAMILIES)
    assert not {e.prompt for e in a} & {e.prompt for e in held}
    assert all(tasks.is_heldout(e.prompt) for e in held) and not any(tasks.is_heldout(e.prompt) for e in a)
    with pytest.raises(ValueError, match="'dev'"):
        tasks.make_split("dev", 5)


def test_answers_are_correct_and_scoring_is_exact():
    for e in tasks.make_split("heldout", 20):
        body = e.prompt.split(":", 1)[-1][:-1]
        expected = {
            "add": lambda: str(sum(int(x) for x in body.split("+"))),
            "reverse": lambda: body[::-1],
            "sort": lambda: "".join(sorted(body)),
            "pattern": lambda: e.answer,  # checked below
        }[e.family]()
        assert e.answer == expected
        if e.family == "pattern":
            assert (body + e.answer)[: len(body)] == body
        assert tasks.score(e, e.answer) and tasks.score(e, f" {e.answer}<eos>junk")
        assert not tasks.score(e, e.answer + "0") and not tasks.score(e, "")


def test_tokenizer_round_trips_and_loads_with_autotokenizer(tmp_path):
    save_tokenizer(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert len(tok) == VOCAB_SIZE and tok.padding_side == "left"
    for e in tasks.make_split("train", 5):
        ids = tok(e.prompt + e.answer).input_ids
        assert len(ids) == len(e.prompt + e.answer) and tok.eos_token_id not in ids
        assert tok.decode(ids) == e.prompt + e.answer
    assert tok.decode(tok("a b").input_ids) == "a b"


def test_build_writes_a_loadable_hf_checkpoint_and_reuses_it(tmp_path):
    out = teacher.build_teacher(tmp_path / "t", steps=3, progress=False, min_accuracy=0.0)
    assert (
        (out / "config.json").is_file() and (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    )
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen3MoeForCausalLM"]
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.vocab_size == len(tok)
    meta = json.loads((out / "teacher.json").read_text())
    assert meta["steps"] == 3 and set(meta["heldout_accuracy"]) == {*tasks.FAMILIES, "mean"}
    assert (
        meta["versions"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
        and "transformers" in meta["versions"]
    )
    mtime = (out / "model.safetensors").stat().st_mtime_ns
    assert teacher.build_teacher(tmp_path / "t", steps=3, progress=False, min_accuracy=0.0) == out
    assert (out / "model.safetensors").stat().st_mtime_ns == mtime  # reused, not retrained
    # the same recipe builds the same weights (deterministic)
    again = teacher.build_teacher(tmp_path / "t2", steps=3, progress=False, min_accuracy=0.0)
    a, b = AutoModelForCausalLM.from_pretrained(out), AutoModelForCausalLM.from_pretrained(again)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_a_failed_build_leaves_nothing_behind_and_says_what_to_try(tmp_path):
    with pytest.raises(RuntimeError, match="below") as err:
        teacher.build_teacher(tmp_path / "t", steps=2, progress=False, min_accuracy=0.99, seed=4)
    assert list(tmp_path.iterdir()) == []
    assert "--seed 5" in str(err.value) and "model.teacher_seed: 5" in str(err.value)


def test_the_run_seed_does_not_rebuild_the_teacher():
    """A study over seeds varies the student's training with one teacher: its seed is a key of its own."""
    from launch.config import load_config

    cfg = load_config("launch/configs/tiny-cpu-hard.yaml", {"seed": 7})
    assert cfg.seed == 7 and cfg.model.teacher_seed == 0
    assert load_config("launch/configs/tiny-cpu-hard.yaml", {"model.teacher_seed": 2}).model.teacher_seed == 2


def test_default_location_is_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ZEDA_CACHE", str(tmp_path))
    out = teacher.build_teacher(steps=2, progress=False, min_accuracy=0.0)
    assert out.parent == tmp_path and out.name == f"teacher-{teacher.recipe_hash(0, 2)}"
