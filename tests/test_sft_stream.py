"""SFT data streamed, not held (zeda_rl.sft_data): records tokenized into a token file by worker
processes, each step's batch read from it. Every batch must be what the dense packing of the whole
set gave (pack_samples, then take_rows), the drops and counts the same, the cache reused and
replaced when the source changes, and a resumed SFT phase must replay the same rows. No Ray."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from launch import streams
from launch.config import load_config
from launch.sft import sft_batches, sft_phase
from zeda_rl.chat_tokenizer import build_chat_tokenizer
from zeda_rl.data import DataError, read_records
from zeda_rl.metrics import MetricsLog, read_events
from zeda_rl.sft_data import SftSet, load_sft_set
from zeda_rl.trajectory import pack_samples, take_rows

FIX = Path(__file__).parent / "fixtures" / "data"
TINY = "launch/configs/tiny-cpu.yaml"


@pytest.fixture(scope="module")
def tok():
    return build_chat_tokenizer()


def _cfg(source, **over):
    return load_config(TINY, {"data.sft_rollouts": str(source), **over})


def _rows(n: int, cut=(), long=()) -> list[dict]:
    out = []
    for i in range(n):
        answer = ("word " * 300) if i in long else f"the answer is {i} " * (1 + i % 7)
        row = {"id": f"r{i}", "messages": [{"role": "user", "content": f"what is {i}? " * (1 + i % 3)}]}
        row["messages"].append({"role": "assistant", "content": answer})
        if i in cut:
            row["finish_reason"] = "length"
        out.append(row)
    return out


def _write(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _dense(cfg, fmt, source) -> dict:
    """What SFT held before: every usable record packed into one padded batch."""
    samples = []
    for rec in read_records(source, need_response=True):
        if rec.extra.get("finish_reason") == "length":
            continue
        p, a = fmt.sft_ids(rec)
        if len(p) <= cfg.data.max_prompt_tokens and len(a) <= cfg.data.max_response_tokens:
            samples.append({"prompt_ids": p, "output_ids": a, "logprobs": np.zeros(len(a)), "sample_id": len(samples)})
    return pack_samples(samples, None, pad_id=fmt.tokenizer.pad_token_id or 0)


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_batches_are_the_rows_of_the_dense_packing(tok):
    cfg = _cfg(FIX / "rollouts")
    fmt = streams.chat_format(cfg, tok)
    data = streams.sft_records(cfg, fmt)
    assert isinstance(data, SftSet) and not data.on_disk and len(data) == 12
    dense = _dense(cfg, fmt, FIX / "rollouts")
    rng = np.random.default_rng(0)
    for pick in ([0], [3, 1, 11], rng.permutation(12)[:5], np.arange(12)):
        _same(data.take(pick), take_rows(dense, pick))
    _same({k: data[k] for k in data.keys()}, dense)  # the whole-set view the older callers read
    assert "attention_mask" in data and "nope" not in data


def test_a_large_source_goes_through_worker_processes_into_a_reused_token_file(tmp_path, tok):
    """in_memory_bytes=0: the path of a real data set (spawned tokenizer workers, token file, cache)."""
    rows = _rows(150, cut={4, 90}, long={7, 8, 120})
    src = _write(tmp_path / "answers.jsonl", rows)
    cfg = _cfg(src, **{"data.max_response_tokens": 256, "sampling.max_new_tokens": 12})
    fmt = streams.chat_format(cfg, tok)
    cache = tmp_path / "cache"
    dropped: dict = {}
    data = streams.sft_records(cfg, fmt, dropped, cache=cache, in_memory_bytes=0, procs=2)
    assert data.on_disk and len(data) == 145
    assert dropped == {"sft_rollouts": 3, "sft_rollouts_cut_at_max_new_tokens": 2}
    dense = _dense(cfg, fmt, src)
    assert len(data) == dense["tokens"].shape[0] and data.num_tokens == int(dense["attention_mask"].sum())
    for pick in ([0], [144, 2, 77, 3], np.random.default_rng(1).permutation(145)[:16]):
        _same(data.take(pick), take_rows(dense, pick))
    p, a = data.row(5)  # row 5 is record r6 (r4 was cut)
    assert (p.tolist(), a.tolist()) == tuple(list(x) for x in fmt.sft_ids(read_records(src)[6]))
    [entry] = [d for d in cache.iterdir()]
    assert json.loads((entry / "meta.json").read_text())["rows"] == 145

    # the next build reads the token file back (no workers), with the same counts
    caps = cfg.data.max_prompt_tokens, cfg.data.max_response_tokens
    again, counts = load_sft_set(src, fmt, streams._fields(cfg), *caps, cache=cache, in_memory_bytes=0)
    assert counts == {"records": 150, "cut": 2, "too_long": 3, "template": 0, "template_first": "", "from_cache": True}
    _same(again.take(np.arange(145)), data.take(np.arange(145)))

    # the same files under other caps (another run's config): a second entry beside it, the first one kept
    other = load_sft_set(src, fmt, streams._fields(cfg), caps[0], 128, cache=cache, in_memory_bytes=0, procs=0)[0]
    assert len(list(cache.iterdir())) == 2 and entry.is_dir() and len(other) <= 145
    _same(data.take([0, 1]), take_rows(dense, [0, 1]))  # still readable: nothing removed under a reader

    # a changed source is tokenized again and the token files of its old version removed
    _write(src, rows + _rows(160)[150:])
    grown = streams.sft_records(cfg, fmt, {}, cache=cache, in_memory_bytes=0, procs=0)  # in this process
    assert len(grown) == 155 and not entry.exists() and len(list(cache.iterdir())) == 1


def test_nothing_usable_is_refused_and_leaves_no_token_file(tmp_path, tok):
    src = _write(tmp_path / "a.jsonl", _rows(3, cut={0}, long={1, 2}))
    cfg = _cfg(src, **{"data.max_response_tokens": 64, "sampling.max_new_tokens": 12})
    with pytest.raises(DataError, match=r"none of its 3 records is usable: 1 were cut at the token cap"):
        streams.sft_records(cfg, streams.chat_format(cfg, tok), cache=tmp_path / "c", in_memory_bytes=0, procs=0)
    assert not list((tmp_path / "c").iterdir())
    dup = _write(tmp_path / "d.jsonl", _rows(2) + _rows(1))
    with pytest.raises(DataError, match=r"d\.jsonl:3: id 'r0' already used at .*d\.jsonl:1"):
        streams.sft_records(_cfg(dup), streams.chat_format(cfg, tok))
    with pytest.raises(DataError, match="no records"):
        streams.sft_records(_cfg(_write(tmp_path / "e.jsonl", [])), streams.chat_format(cfg, tok))


def test_the_whole_set_view_refuses_what_would_not_fit(tok, monkeypatch):
    import zeda_rl.sft_data as sft_data

    cfg = _cfg(FIX / "rollouts")
    data = streams.sft_records(cfg, streams.chat_format(cfg, tok))
    monkeypatch.setattr(sft_data, "DENSE_LIMIT", 10)
    with pytest.raises(ValueError, match=r"packing all 12 rows .* read batches with take\(rows\)"):
        data["tokens"]
    assert data.take([1, 2])["tokens"].shape[0] == 2


def test_sft_batches_keep_the_seeded_order_and_a_resume_replays_it():
    lengths = np.arange(1, 11, dtype=np.int64)
    data = SftSet(np.arange(int(lengths.sum()), dtype=np.int32), np.cumsum(lengths) - lengths, lengths // 2, lengths)
    full = list(sft_batches(data, 7, 3, seed=5))
    rng = np.random.default_rng(5)  # the order SFT has always used: a new permutation when a pass runs out
    order, cursor, want = rng.permutation(10), 0, []
    for _ in range(7):
        if cursor + 3 > len(order):
            order, cursor = rng.permutation(10), 0
        want.append(order[cursor : cursor + 3].tolist())
        cursor += 3
    assert [s for s, _ in full] == list(range(7)) and [b["sample_ids"].tolist() for _, b in full] == want
    resumed = list(sft_batches(data, 7, 3, seed=5, start=4))
    assert [s for s, _ in resumed] == [4, 5, 6]
    for (_, a), (_, b) in zip(resumed, full[4:]):
        _same(a, b)
    for _, b in full:  # each batch padded to its own longest row
        assert b["tokens"].shape[1] == int(lengths[b["sample_ids"]].max())


class _Learner:
    def __init__(self):
        self.batches = []

    def train_step(self, spec, batch, meta):
        self.batches.append((meta["step"], batch))
        return {"loss": 1.0}


def test_sft_phase_trains_on_the_streamed_batches_and_logs_the_first_row(tmp_path, tok):
    cfg = _cfg(FIX / "rollouts", **{"sft.steps": 5, "sft.batch_size": 4})
    data = streams.build(cfg, tok)
    log = MetricsLog(tmp_path / "m.jsonl")
    learner = _Learner()
    sft_phase(cfg, None, learner, None, data, log, start=2)
    log.close()
    assert [s for s, _ in learner.batches] == [3, 4, 5]
    want = list(sft_batches(data.sft_records, 5, 4, cfg.seed, start=2))
    for (_, got), (_, b) in zip(learner.batches, want):
        _same(got, b)
    ev = {e.name: e.value for e in read_events(tmp_path / "m.jsonl") if e.component == "driver"}
    first = learner.batches[0][1]
    n = int(first["attention_mask"][0].sum())
    assert ev["first_row/sft/tokens"] == first["tokens"][0, :n].tolist()
    assert ev["first_row/sft/loss_mask"] == first["loss_mask"][0, :n].tolist()


@pytest.mark.parametrize("in_memory_bytes", [1 << 30, 0], ids=["in memory", "token file"])
def test_an_answer_the_glm_template_refuses_is_left_out_not_the_whole_set(tmp_path, in_memory_bytes):
    """GLM-4.7-Flash's prompt ends in `<think>`; an answer with an empty thinking block renders as no continuation
    of it. One such answer among a real run's 60k made the whole SFT set fail to build, at every resume."""
    from transformers import AutoTokenizer

    from zeda_rl.chat import ChatFormat, TemplateError

    tok = AutoTokenizer.from_pretrained(Path(__file__).parent / "fixtures" / "tokenizers" / "glm-4.7-flash")
    fmt = ChatFormat(tok, enable_thinking=True)
    rows = [
        {"id": f"r{i}", "messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": a}]}
        for i, a in enumerate(["<think>greet</think>Hello!", "</think>Hello!", "<think>sum</think>4"])
    ]
    src = _write(tmp_path / "glm.jsonl", rows)
    cfg = load_config("launch/configs/glm-4.7-flash-h200.yaml", {"data.sft_rollouts": str(src)})
    args = (src, fmt, streams._fields(cfg), 4096, 4096)
    data, counts = load_sft_set(*args, cache=tmp_path / "c", in_memory_bytes=in_memory_bytes, procs=0)
    assert len(data) == 2 and counts["template"] == 1 and "glm.jsonl:2:" in counts["template_first"]
    _write(src, [rows[1], {**rows[1], "id": "r9"}])  # every answer refused: the template does not fit
    with pytest.raises(TemplateError, match="the chat template refuses 2 of 2 answers; the first: .*glm.jsonl:1:"):
        load_sft_set(*args, cache=tmp_path / "c", in_memory_bytes=in_memory_bytes, procs=0)
