"""Both H200 configs build their data exactly as the pipeline would, from small fixture files in
the real shapes and a tiny tokenizer with a Qwen3-style chat template (no Ray, no GPU).

What this catches: a config whose data cannot be built (the 60,000 built-in 'add' prompts
that do not exist, a prompt cap that drops everything, a response cap below the sampling
length) fails here, not hours into a cluster run.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from launch import streams
from launch.config import load_config
from zeda_rl.chat_tokenizer import IM_START, build_chat_tokenizer
from zeda_rl.data import read_records

FIX = Path(__file__).parent / "fixtures" / "data"
H200 = sorted(Path("launch/configs").glob("*h200.yaml"))


@pytest.fixture(scope="module")
def tok():
    return build_chat_tokenizer()


@pytest.mark.parametrize("path", H200, ids=lambda p: p.stem)
def test_shipped_h200_configs_read_the_released_prompt_file_with_32k_answers(path):
    cfg = load_config(path)
    assert cfg.data.sft_prompts == cfg.data.opd_prompts == "/mnt/data/ZEDA-prompts-60k.jsonl"
    assert cfg.sft.prompts is None  # every prompt of the file once
    assert cfg.sampling.max_new_tokens == cfg.data.max_response_tokens == 32768 and cfg.data.enable_thinking


@pytest.mark.parametrize("path", H200, ids=lambda p: p.stem)
def test_h200_config_builds_its_prompt_streams_from_the_fixture(path, tok):
    prompts = FIX / "prompts.jsonl"
    cfg = load_config(path, {"data.sft_prompts": str(prompts), "data.opd_prompts": str(prompts)})
    data = streams.build(cfg, tok)
    n = len(read_records(prompts))
    assert data.sft_count == n and len(data.opd.ids) == n and data.dropped == {"sft_prompts": 0, "opd_prompts": 0}
    assert data.format.templated and data.format.eos_id == tok.eos_token_id
    im_start = tok.convert_tokens_to_ids(IM_START)
    first, _ = data.sft.take(cfg.sft.batch_size)  # cycles: the fixture is smaller than a batch
    assert all(p[0] == im_start for p in first)
    assert tok.decode(first[0]).endswith("<|im_start|>assistant\n")
    opd, ids = data.opd.take(cfg.opd.prompts_per_step)
    assert len(opd) == cfg.opd.prompts_per_step and ids == list(range(cfg.opd.prompts_per_step))


@pytest.mark.parametrize("path", H200, ids=lambda p: p.stem)
def test_h200_config_trains_sft_on_a_rollout_directory(path, tok):
    cfg = load_config(
        path,
        {
            "data.sft_rollouts": str(FIX / "rollouts"),
            "data.opd_prompts": str(FIX / "chat_prompts.jsonl"),
            "data.fields.id": "uuid",
        },
    )
    data = streams.build(cfg, tok)
    b = data.sft_records
    assert b["tokens"].shape[0] == 12 and data.sft is None
    lengths = b["attention_mask"].sum(1)
    assert all(b["tokens"][i, lengths[i] - 1] == tok.eos_token_id for i in range(12))  # each answer ends its turn
    assert all(b["loss_mask"][i, lengths[i] - 1] == 1 and b["loss_mask"][i, 0] == 0 for i in range(12))
    assert [r.id for r in data.opd.records][:2] == ["nemo-0", "nemo-1"]


@pytest.mark.parametrize("path", H200, ids=lambda p: p.stem)
def test_h200_config_with_the_built_in_tasks_fails_clearly_not_late(path, tok):
    """The old H200 configs asked the built-in tasks for 60,000 prompts: it must fail at build time, named."""
    cfg = load_config(path, {"data.sft_prompts": "embedded", "data.opd_prompts": "embedded", "sft.prompts": 60000})
    with pytest.raises(
        ValueError, match=r"data\.\w+_prompts: embedded: 60000 prompts .*only \d+ distinct 'add' examples exist"
    ):
        streams.build(cfg, tok)
