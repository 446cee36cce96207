"""The whole pipeline (launch.pipeline.run, local Ray, real actors, ZMQ and Megatron learner) on a
tiny MoE with a byte-level BPE tokenizer and a Qwen3-style chat template, from data files.

Case 1: SFT on the teacher's answers to a prompt JSONL, then OPD from the same file, then a
resumed run that must continue the OPD prompt stream, not start it again. Case 2: SFT on a
directory of released-shape rollouts (`messages` ending with the assistant turn), OPD on a
Nemotron-shaped chat file, a GLM-style model. What reached the learner is read back from each
stage's first trained row: templated prompt ids, loss only on the assistant's tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from launch import streams
from launch.config import load_config
from tests.helpers import run_on_fresh_ray
from zeda_rl.chat_tokenizer import IM_START, build_chat_tokenizer, save_tiny_chat_checkpoint
from zeda_rl.data import Fields, read_records
from zeda_rl.metrics import read_events

FIX = Path(__file__).parent / "fixtures" / "data"
SHORT = {
    "sft.steps": 2,
    "sft.batch_size": 8,
    "sft.prompts": 16,
    "opd.steps": 2,
    "opd.prompts_per_step": 2,
    "opd.samples_per_prompt": 2,
    "opd.rollout_batch": 2,
    "sampling.max_new_tokens": 6,
    "eval.n_per_family": 4,
    "data.max_prompt_tokens": 128,
    "data.max_response_tokens": 256,
}


def _config(tmp: Path, family: str, overrides: dict):
    teacher = save_tiny_chat_checkpoint(
        tmp / f"teacher-{family}", family, stop_logit=5.0
    )  # answers that end: SFT drops cut ones
    return load_config(
        "launch/configs/tiny-cpu.yaml",
        {**SHORT, **overrides, "output_dir": str(tmp / "runs"), "model.teacher": str(teacher)},
    )


def _value(events, name):
    (v,) = [e.value for e in events if e.component == "driver" and e.name == name]
    return v


def _prompt_of(row: list[int], fmt, records) -> list[int]:
    """The templated prompt of the fixture record this row starts with (fails if none does)."""
    for rec in records:
        p = fmt.prompt_ids(rec)
        if row[: len(p)] == p:
            return p
    raise AssertionError(f"row does not start with any fixture prompt: {row[:20]}")


def _trained_prompts(events) -> list[int]:
    return [p for e in events if e.component == "driver" and e.name == "trained_prompts" for p in e.value]


def _resume(cfg) -> dict:
    import ray

    from launch.pipeline import run

    if ray.is_initialized():
        ray.shutdown()
    try:
        return run(cfg, resume=True)
    finally:
        ray.shutdown()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_prompt_file_run_is_templated_and_resume_continues_the_prompt_stream(tmp_path):
    prompts = str(FIX / "prompts.jsonl")
    cfg = _config(tmp_path, "qwen3_moe", {"name": "chat", "data.sft_prompts": prompts, "data.opd_prompts": prompts})
    result = run_on_fresh_ray(cfg)
    first = read_events(cfg.run_dir / "metrics.jsonl")
    tok = build_chat_tokenizer()
    fmt = streams.chat_format(cfg, tok)
    records = read_records(prompts)
    im_start = tok.convert_tokens_to_ids(IM_START)
    for stage in ("sft", "opd"):
        row, mask = _value(first, f"first_row/{stage}/tokens"), _value(first, f"first_row/{stage}/loss_mask")
        p = _prompt_of(row, fmt, records)
        assert row[0] == im_start and tok.decode(p).endswith("<|im_start|>assistant\n"), stage
        # loss on the sampled answer only (1..max_new_tokens tokens after the prompt), never on the prompt
        assert (
            mask == [0] * len(p) + [1] * (len(row) - len(p)) and 1 <= len(row) - len(p) <= cfg.sampling.max_new_tokens
        ), stage
    assert result["eval_skipped"] and "chat template" in result["eval_skipped"]
    dropped = result["dropped_too_long"]  # the teacher's answers that ran to the token cap are dropped, and counted
    assert {k: dropped[k] for k in ("opd_prompts", "sft_prompts", "sft_rollouts")} == dict.fromkeys(
        ("opd_prompts", "sft_prompts", "sft_rollouts"), 0
    )
    assert set(dropped) <= {"opd_prompts", "sft_prompts", "sft_rollouts", "sft_rollouts_cut_at_max_new_tokens"}
    md = (cfg.run_dir / "report.md").read_text()
    assert "Evaluation skipped:" in md and "Records dropped as longer than data.max_prompt_tokens" in md
    assert 0.0 <= result["zero_expert_ratio"]["overall"] <= 1.0 and len(result["zero_expert_ratio"]["per_layer"]) == 2

    # resumed with two more OPD steps: the next prompts of the stream, none of the first run's again
    done = _trained_prompts(first)
    resumed_cfg = cfg.model_copy(update={"opd": cfg.opd.model_copy(update={"steps": 4})})
    _resume(resumed_cfg)
    events = read_events(cfg.run_dir / "metrics.jsonl")[len(first) :]
    later = _trained_prompts(events)
    assert len(later) == 2 * cfg.opd.prompts_per_step and not set(later) & set(done), (done, later)
    assert min(later) > max(done)
    stream = streams.opd_prompts(cfg, fmt)  # positions name prompts: a restarted stream would give the first ones
    assert len({stream.record_at(i).id for i in done + later}) == len(done + later) <= len(records)
    assert [e.value for e in events if e.name == "staleness_max"] and _value(events, "first_row/opd/tokens")[
        0
    ] == im_start


@pytest.mark.timeout(600)
def test_sft_from_a_rollout_directory_trains_exactly_the_templated_answer(tmp_path):
    cfg = _config(
        tmp_path,
        "glm4_moe_lite",
        {
            "name": "chat-rollouts",
            "data.sft_rollouts": str(FIX / "rollouts"),
            "data.opd_prompts": str(FIX / "chat_prompts.jsonl"),
            "data.fields.id": "uuid",
            "opd.steps": 1,
            "learner.ep": 1,
            "sft.batch_size": 4,
            "eval.suite": str(Path(__file__).parent / "fixtures" / "eval" / "suite.yaml"),
        },
    )
    result = run_on_fresh_ray(cfg)
    # the benchmark suite ran on the run's own engines: Table 1 in RUN_DIR/eval, its numbers in the report
    table = json.loads((cfg.run_dir / "eval" / "eval.json").read_text())["table"]
    assert [r["benchmark"] for r in table] == ["gsm8k", "math500", "humaneval", "ifeval", "Average"]
    assert result["suite"] == "fixture-suite" and set(result["accuracy"]["student"]) == {
        "gsm8k",
        "math500",
        "humaneval",
        "ifeval",
        "mean",
    }
    assert result["zero_expert_ratio"]["overall"] == table[-1]["student_r_ze"] > 0
    assert "benchmark suite fixture-suite" in (cfg.run_dir / "report.md").read_text()
    events = read_events(cfg.run_dir / "metrics.jsonl")
    tok = build_chat_tokenizer()
    fmt = streams.chat_format(cfg, tok)
    row, mask = _value(events, "first_row/sft/tokens"), _value(events, "first_row/sft/loss_mask")
    answers = [fmt.sft_ids(r) for r in read_records(FIX / "rollouts", need_response=True)]
    ((p, a),) = [(p, a) for p, a in answers if row == p + a]  # exactly one released rollout, token for token
    assert mask == [0] * len(p) + [1] * len(a) and row[-1] == tok.eos_token_id
    assert tok.decode(a).startswith("<think>\n") and tok.decode(a).endswith("<|im_end|>")
    opd_row = _value(events, "first_row/opd/tokens")
    chat = read_records(FIX / "chat_prompts.jsonl", Fields(id="uuid"))
    assert tok.decode(_prompt_of(opd_row, fmt, chat)).startswith("<|im_start|>system\nYou are a helpful assistant.")
    sft_start = min(e.time for e in events if e.name == "phase" and e.value == "sft")
    opd_start = min(e.time for e in events if e.name == "phase" and e.value == "opd")
    assert not [
        e for e in events if e.component == "teacher" and e.name == "tokens" and sft_start <= e.time < opd_start
    ]
