"""Data records from every file format, the chat template applied the same way for prompts and
SFT answers, length caps, and the prompt stream's resumable position. No Ray, no models."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from launch import streams
from launch.config import ConfigError, load_config
from zeda_rl.chat import ChatFormat, TemplateError
from zeda_rl.chat_tokenizer import IM_START, build_chat_tokenizer
from zeda_rl.data import DataError, Fields, read_records, to_record
from zeda_rl.tokenizer import build_tokenizer

FIX = Path(__file__).parent / "fixtures" / "data"
TINY = "launch/configs/tiny-cpu.yaml"


@pytest.fixture(scope="module")
def chat_tok():
    return build_chat_tokenizer()


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_prompt_lines_get_file_line_ids_and_keep_their_other_fields():
    recs = read_records(FIX / "prompts.jsonl")
    assert len(recs) == 40
    r = recs[1]
    assert r.id == "prompts.jsonl:2" and r.where == f"{FIX / 'prompts.jsonl'}:2"
    assert r.messages == ({"role": "user", "content": "What is 10 * 7? Put the final answer in \\boxed{}."},)
    assert r.response is None and r.extra == {"label": "70"}


def test_messages_rows_split_into_prompt_and_answer_and_ids_come_from_the_row():
    recs = read_records(FIX / "rollouts", need_response=True)  # a directory of shards, in file order
    assert [r.id for r in recs] == [f"zeda-prompts-60k:{i}" for i in range(12)]
    assert [m["role"] for m in recs[0].messages] == ["user"] and recs[0].response.startswith("<think>")
    assert recs[6].where.endswith("rollouts-00001.jsonl:1") and "sampling" in recs[6].extra
    chat = read_records(FIX / "chat_prompts.jsonl", Fields(id="uuid"))
    assert chat[3].id == "nemo-3" and [m["role"] for m in chat[3].messages] == ["system", "user"]


def test_parquet_saved_dataset_and_shards_read_like_the_jsonl(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(x) for x in (FIX / "chat_prompts.jsonl").read_text().splitlines()]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "saved_dict"))
    shards = tmp_path / "shards"
    shards.mkdir()
    pq.write_table(pa.Table.from_pylist(rows[:3]), shards / "a.parquet")
    _jsonl(shards / "b.jsonl", rows[3:])
    want = [(r.id, r.messages, r.response) for r in read_records(FIX / "chat_prompts.jsonl", Fields(id="uuid"))]
    for src in ("p.parquet", "saved", "saved_dict", "shards"):
        got = [(r.id, r.messages, r.response) for r in read_records(tmp_path / src, Fields(id="uuid"))]
        assert got == want, src
    assert read_records(tmp_path / "p.parquet")[2].id == "p.parquet:2"  # no id field: file:row
    assert read_records(tmp_path / "p.parquet")[2].where.endswith("p.parquet row 2")


def test_field_names_are_configurable(tmp_path):
    p = _jsonl(tmp_path / "q.jsonl", [{"uid": 7, "question": "2+2?", "answer": "4"}])
    (r,) = read_records(p, Fields(prompt="question", response="answer", id="uid"), need_response=True)
    assert r.id == "7" and r.messages[0]["content"] == "2+2?" and r.response == "4"


@pytest.mark.parametrize(
    "row, msg",
    [
        ('{"text": "hi"}', r"bad\.jsonl:2: expected a \{'prompt': str\} or \{'messages'.*got keys \{'text': 'str'\}"),
        ("not json", r"bad\.jsonl:2: not valid JSON"),
        ("[1, 2]", r"bad\.jsonl:2: expected .* got a list"),
        ('{"messages": [{"role": "user"}]}', r"bad\.jsonl:2: messages\[0\] must be \{'role': str, 'content': str\}"),
        ('{"messages": [{"role": "assistant", "content": "x"}]}', r"bad\.jsonl:2: the prompt must end with a user"),
        ('{"id": "a", "prompt": "again"}', r"bad\.jsonl:2: id 'a' already used at .*bad\.jsonl:1"),
    ],
)
def test_bad_rows_are_refused_with_file_line_and_what_was_expected(tmp_path, row, msg):
    p = _jsonl(tmp_path / "bad.jsonl", ['{"id": "a", "prompt": "fine"}', row])
    with pytest.raises(DataError, match=msg):
        read_records(p)


def test_bad_sources_are_named(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_records(tmp_path / "missing.jsonl")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=r"x\.csv: unknown data file type '\.csv'"):
        read_records(tmp_path / "x.csv")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no \\*.jsonl or \\*.parquet shards"):
        read_records(tmp_path / "empty")
    with pytest.raises(DataError, match=r"prompts\.jsonl:1: expected .* with an answer .*this row has no answer"):
        read_records(FIX / "prompts.jsonl", need_response=True)
    (tmp_path / "x.parquet").write_text("not parquet")
    with pytest.raises(DataError, match=r"x\.parquet: not a readable Parquet file"):
        read_records(tmp_path / "x.parquet")


def test_prompts_go_through_the_chat_template(chat_tok):
    fmt = ChatFormat(chat_tok)
    rec = read_records(FIX / "chat_prompts.jsonl", Fields(id="uuid"))[0]
    ids = fmt.prompt_ids(rec)
    text = chat_tok.apply_chat_template(list(rec.messages), tokenize=False, add_generation_prompt=True)
    assert ids[0] == chat_tok.convert_tokens_to_ids(IM_START)
    assert ids == chat_tok(text, add_special_tokens=False).input_ids
    assert chat_tok.decode(ids).endswith("<|im_start|>assistant\n")
    no_think = ChatFormat(chat_tok, enable_thinking=False).prompt_ids(rec)
    assert chat_tok.decode(no_think).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_sft_answer_is_the_rest_of_the_template_up_to_eos(chat_tok):
    fmt = ChatFormat(chat_tok)
    rec = read_records(FIX / "rollouts", need_response=True)[0]
    p, a = fmt.sft_ids(rec)
    assert p == fmt.prompt_ids(rec)  # trained on the very prompt the engines are given
    full = chat_tok.apply_chat_template([*rec.messages, {"role": "assistant", "content": rec.response}], tokenize=False)
    assert a[-1] == chat_tok.eos_token_id and chat_tok.decode(p + a) == full.rstrip("\n")
    assert chat_tok.decode(a).startswith("<think>\nsolve")


def test_a_template_without_the_prefix_property_is_refused(chat_tok):
    rec = read_records(FIX / "rollouts", need_response=True)[0]
    # thinking off: the generation prompt writes an empty think block the full conversation does not have
    with pytest.raises(
        TemplateError, match=r"rollouts-00000\.jsonl:1: the chat template .*enable_thinking=False\) differently"
    ):
        ChatFormat(chat_tok, enable_thinking=False).sft_ids(rec)
    tok = build_chat_tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(TemplateError, match="does not end the assistant turn with the eos token"):
        ChatFormat(tok).sft_ids(rec)


def test_plain_format_without_a_template_is_the_embedded_one():
    tok = build_tokenizer()
    fmt = ChatFormat(tok)
    assert not fmt.templated
    rec = to_record({"prompt": "12+30=", "response": "42"}, "x:1", "x:1")
    p, a = fmt.sft_ids(rec)
    assert p == tok("12+30=").input_ids and a == tok("42", add_special_tokens=False).input_ids + [tok.eos_token_id]
    with pytest.raises(TemplateError, match="needs a chat template"):
        fmt.prompt_ids(read_records(FIX / "chat_prompts.jsonl", Fields(id="uuid"))[0])


def test_embedded_streams_are_the_built_in_tasks_in_the_seeded_order():
    from zeda_rl.tasks import make_split

    tok = build_tokenizer()
    cfg = load_config(TINY, {"sft.prompts": 64})
    data = streams.build(cfg, tok)
    ex = make_split("train", 16, seed=cfg.seed)
    assert list(data.sft.ids) == [tok(e.prompt).input_ids for e in ex] and data.sft_count == 64
    order = list(range(64))
    random.Random(cfg.seed).shuffle(order)
    prompts, ids = data.sft.take(3)
    assert prompts == [data.sft.ids[order.pop()] for _ in range(3)] and ids == [0, 1, 2]
    assert list(data.opd.ids) == [tok(e.prompt).input_ids for e in make_split("train", 16, seed=cfg.seed + 1)]


def test_prompt_ids_are_packed_four_bytes_a_token():
    """The driver holds every prompt of a real OPD set: one int32 array, not a Python int object per token."""
    rows = [[5, 70000, 3], [], [2**31 - 1], list(range(1000))]
    ids = streams.PackedIds(rows)
    assert len(ids) == 4 and list(ids) == rows and ids[-1] == rows[-1] and ids[1:3] == rows[1:3]
    assert all(type(t) is int for t in ids[0])  # plain ints: msgpack and JSON take them as they are
    assert ids.flat.nbytes == 4 * sum(map(len, rows))
    with pytest.raises(IndexError, match="prompt 4 of 4"):
        ids[4]
    with pytest.raises(OverflowError):
        streams.PackedIds([[2**31]])


def test_prompt_stream_resumes_at_its_position(chat_tok):
    cfg = load_config(TINY, {"data.opd_prompts": str(FIX / "prompts.jsonl")})
    fmt = streams.chat_format(cfg, chat_tok)
    a = streams.opd_prompts(cfg, fmt)
    a.take(30)  # into the second pass over the 40 prompts
    a_next = a.take(25)
    b = streams.opd_prompts(cfg, fmt)
    b.seek(30)
    assert b.take(25) == a_next
    assert streams.opd_prompts(cfg, fmt).take(25)[0] != a_next[0]  # a fresh stream would repeat the first ones
    assert b.record_at(31).id == a.records[[i for i, x in enumerate(a.ids) if x == a_next[0][1]][0]].id
    with pytest.raises(ValueError, match="cannot go back"):
        b.seek(3)


def test_prompts_given_back_on_resume_come_first_and_stay_owed_until_taken(chat_tok):
    """A resumed stream gives the prompts in flight at the checkpoint again, under their own positions, before any
    new one; those not taken yet are `pending`, so a checkpoint written meanwhile still lists them."""
    cfg = load_config(TINY, {"data.opd_prompts": str(FIX / "prompts.jsonl")})
    fmt = streams.chat_format(cfg, chat_tok)
    first = streams.opd_prompts(cfg, fmt)
    ids, positions = first.take(48)
    resumed = streams.opd_prompts(cfg, fmt)
    resumed.seek(48)
    resumed.reissue(list(range(16, 48)))
    got, at = resumed.take(16)
    assert at == list(range(16, 32)) and got == ids[16:32]
    assert resumed.pending() == list(range(32, 48)) and resumed.position == 48
    got, at = resumed.take(20)  # the rest of the owed ones, then new positions
    assert at == [*range(32, 48), 48, 49, 50, 51] and got[:16] == ids[32:48] and resumed.pending() == []
    with pytest.raises(ValueError, match="below the stream's position"):
        resumed.reissue([60])


def test_too_long_records_are_dropped_and_counted(tmp_path, chat_tok):
    from zeda_rl.metrics import MetricsLog, read_events

    long = "word " * 400
    p = _jsonl(tmp_path / "p.jsonl", [{"prompt": "short one"}, {"prompt": long}, {"prompt": "short two"}])
    r = _jsonl(tmp_path / "r.jsonl", [{"prompt": "q", "response": "a"}, {"prompt": "q2", "response": long}])
    cfg = load_config(
        TINY,
        {
            "data.sft_prompts": str(p),
            "data.opd_prompts": str(p),
            "sft.prompts": None,
            "data.max_prompt_tokens": 64,
            "data.max_response_tokens": 64,
        },
    )
    log = MetricsLog(tmp_path / "m.jsonl")
    data = streams.build(cfg, chat_tok, log)
    log.close()
    assert data.sft_count == 2 and [x.id for x in data.opd.records] == ["p.jsonl:1", "p.jsonl:3"]
    ev = {e.name: e.value for e in read_events(tmp_path / "m.jsonl") if e.component == "data"}
    assert ev == {"dropped_too_long/sft_prompts": 1, "dropped_too_long/opd_prompts": 1}
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"sft_rollouts": str(r)})})
    data = streams.build(cfg, chat_tok)
    assert data.sft_records["tokens"].shape[0] == 1 and data.dropped["sft_rollouts"] == 1
    with pytest.raises(
        DataError, match=r"sft\.prompts is 3 but data\.sft_prompts .* has 2 prompts .*1 longer ones dropped"
    ):
        streams.sft_prompts(
            load_config(TINY, {"data.sft_prompts": str(p), "sft.prompts": 3, "data.max_prompt_tokens": 64}),
            streams.chat_format(cfg, chat_tok),
        )


def test_sft_records_train_only_on_the_answer(chat_tok):
    cfg = load_config(TINY, {"data.sft_rollouts": str(FIX / "rollouts")})
    data = streams.build(cfg, chat_tok)
    b = data.sft_records
    fmt = data.format
    for i, rec in enumerate(read_records(FIX / "rollouts", need_response=True)):
        p, a = fmt.sft_ids(rec)
        n = len(p) + len(a)
        assert b["tokens"][i, :n].tolist() == p + a
        assert b["loss_mask"][i].tolist() == [0] * len(p) + [1] * len(a) + [0] * (b["tokens"].shape[1] - n)
    assert data.sft is None and np.all(b["behaviour_logprobs"] == 0)


@pytest.mark.parametrize(
    "over, msg",
    [
        ({"sft.data": "x.jsonl"}, r"sft\.data: Extra inputs"),
        ({"data.sft_prompts": "embedded", "sft.prompts": None}, r"sft\.prompts: a number is needed"),
        (
            {"sampling.max_new_tokens": 100, "data.max_response_tokens": 50},
            r"sampling\.max_new_tokens \(100\) must be <= data\.max_response_tokens",
        ),
        ({"eval.suite": "no-such-suite.yaml"}, r"eval\.suite \('no-such-suite\.yaml'\): no such suite file"),
        ({"data.fields": {"prompt": "q", "answer": "a"}}, r"data\.fields\.answer"),
    ],
)
def test_data_config_errors_name_the_key(over, msg):
    with pytest.raises(ConfigError, match=msg):
        load_config(TINY, over)
