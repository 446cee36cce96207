"""`zeda rollouts`: every teacher engine answers, a SIGKILLed job resumes with no prompt lost or
answered twice, and SFT reads what it wrote (released rollout shape, loss on the answer only).

The teacher is a tiny random Qwen3-MoE with a real-style BPE tokenizer and a Qwen3-style chat
template, so prompts really go through `apply_chat_template` on the way in and the answers
are real decoded text on the way out.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import ray
import yaml

from zeda_rl.chat_tokenizer import save_tiny_chat_checkpoint

N_PROMPTS, CHUNK = 160, 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("rollouts")
    teacher = save_tiny_chat_checkpoint(root / "teacher", "qwen3_moe", stop_logit=5.0)
    prompts = root / "prompts.jsonl"
    with prompts.open("w") as f:
        for i in range(N_PROMPTS):
            f.write(json.dumps({"id": f"p{i}", "prompt": f"What is {i} + {i % 7}?", "label": str(i + i % 7)}) + "\n")
    overrides = {
        "name": "rollouts",
        "output_dir": str(root / "runs"),
        "model.teacher": str(teacher),
        "data.sft_prompts": str(prompts),
        "sft.prompts": None,
        "sft.teacher_temperature": 1.0,
        "sft.rollout_chunk": CHUNK,
        "sampling.max_new_tokens": 6,
        "teacher.replicas": 2,
        "teacher.cpus": 0.5,
        "cluster.num_cpus": 2,
    }
    return root, teacher, overrides


def _config_file(root, overrides):
    base = yaml.safe_load(open("launch/configs/tiny-cpu.yaml"))
    for dotted, value in overrides.items():
        node = base
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(base))
    return path


@pytest.mark.slow  # 30-45 s: CI runs it; `make test` stays under 15 minutes without it
@pytest.mark.timeout(600)
def test_killed_job_resumes_without_losing_or_repeating_a_prompt(setup):
    from transformers import AutoTokenizer

    from launch import streams
    from launch.config import load_run_config
    from launch.fleet import start_teachers
    from launch.rollouts import plan, sampling_params, write_rollouts

    root, teacher, overrides = setup
    out = root / "out"
    cfg_file = _config_file(root, overrides)
    # a real job, killed (SIGKILL, the whole process group: driver and its local Ray) once shards appear
    job = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "launch.cli",
            "rollouts",
            "--config",
            str(cfg_file),
            "--out",
            str(out),
        ],
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    deadline = time.time() + 300
    while time.time() < deadline and job.poll() is None and len(list(out.glob("rollouts-*.jsonl"))) < 3:
        time.sleep(0.05)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    shards_before = sorted(out.glob("rollouts-*.jsonl"))
    assert shards_before, job.stdout.read().decode()[-3000:]
    before = [json.loads(line)["id"] for p in shards_before for line in p.read_text().splitlines()]
    assert len(before) < N_PROMPTS, "the job finished before it could be killed; kill it sooner"

    cfg = load_run_config(str(cfg_file), [])
    tok = AutoTokenizer.from_pretrained(teacher)
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        pool, _pg = start_teachers(cfg, teacher, tok.pad_token_id)
        items = plan(*streams.sft_prompts(cfg, streams.chat_format(cfg, tok)))
        r = write_rollouts(cfg, pool, items, sampling_params(cfg, tok.eos_token_id), teacher, out)
    finally:
        ray.shutdown()
    # engines of the killed job may finish a chunk after it died: at least what was there is kept
    assert r["already_done"] >= len(before) and r["already_done"] + r["answered"] - r["duplicates_removed"] == N_PROMPTS
    assert len(r["per_engine"]) == 2 and min(r["per_engine"]) > 0  # both teacher engines answered
    records = [json.loads(line) for p in sorted(out.glob("rollouts-*.jsonl")) for line in p.read_text().splitlines()]
    ids = [rec["id"] for rec in records]
    assert sorted(ids) == sorted(it["id"] for it in items)  # every prompt once: none lost, none twice
    assert len(set(ids)) == N_PROMPTS
    assert not list(out.glob(".*tmp*"))
    sizes = [len(p.read_text().splitlines()) for p in out.glob("rollouts-*.jsonl")]
    assert max(sizes) == CHUNK  # sft.rollout_chunk prompts per engine call and shard (dedupe may thin one)
    rec = records[0]
    assert [m["role"] for m in rec["messages"]] == ["user", "assistant"]
    assert rec["sampling"]["temperature"] == 1.0 and rec["sampling"]["max_new_tokens"] == 6
    assert rec["finish_reason"] in ("stop", "length")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["teacher"] == str(teacher) and manifest["prompts"] == N_PROMPTS

    # SFT reads the directory as released rollouts: templated prompt, loss on the answer tokens only
    sft_cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"sft_rollouts": str(out)})})
    fmt = streams.chat_format(sft_cfg, tok)
    batch = streams.sft_records(sft_cfg, fmt)
    stopped = sum(rec["finish_reason"] == "stop" for rec in records)
    assert batch["tokens"].shape[0] == stopped  # answers cut at max_new_tokens are not trained on
    im_start = tok.convert_tokens_to_ids("<|im_start|>")
    row = (
        batch["tokens"][0][batch["attention_mask"][0].astype(bool)] if "attention_mask" in batch else batch["tokens"][0]
    )
    assert im_start in row.tolist()


def test_dedupe_keeps_each_id_in_its_first_shard(tmp_path):
    from launch.rollouts import dedupe, done_ids

    def shard(name, ids):
        (tmp_path / name).write_text("".join(json.dumps({"id": i, "messages": []}) + "\n" for i in ids))

    shard("rollouts-001-00000.jsonl", ["a", "b"])
    shard("rollouts-001-00001.jsonl", ["c"])
    shard("rollouts-002-00000.jsonl", ["c", "d"])  # "c" answered again by a resumed attempt
    shard("rollouts-002-00001.jsonl", ["a"])
    assert dedupe(tmp_path) == 2
    assert done_ids(tmp_path) == {"a", "b", "c", "d"}
    assert not (tmp_path / "rollouts-002-00001.jsonl").exists()
    assert [json.loads(x)["id"] for x in (tmp_path / "rollouts-002-00000.jsonl").read_text().splitlines()] == ["d"]


def test_a_changed_config_is_refused_on_resume(setup, tmp_path):
    from launch.rollouts import _check_manifest

    out = tmp_path / "r"
    out.mkdir()
    assert _check_manifest(out, {"teacher": "a", "sampling": {"temperature": 1.0}}) == 1
    assert _check_manifest(out, {"teacher": "a", "sampling": {"temperature": 1.0}}) == 2  # same: a resumed attempt
    with pytest.raises(ValueError, match="temperature"):
        _check_manifest(out, {"teacher": "a", "sampling": {"temperature": 0.7}})


def test_dedupe_rewrites_answers_holding_unicode_line_separators(tmp_path):
    """ensure_ascii=False leaves U+2028/U+2029/U+0085 raw in an answer: a rewrite must split on "\\n" alone."""
    from launch.rollouts import dedupe

    odd = "a\u2028b\u2029c\x85d"
    rec = lambda i: json.dumps({"id": i, "messages": [{"role": "assistant", "content": odd}]}, ensure_ascii=False)  # noqa: E731
    (tmp_path / "rollouts-001-00000.jsonl").write_text(rec("a") + "\n", encoding="utf-8")
    (tmp_path / "rollouts-002-00000.jsonl").write_text(rec("a") + "\n" + rec("b") + "\n", encoding="utf-8")
    assert dedupe(tmp_path) == 1
    kept = (tmp_path / "rollouts-002-00000.jsonl").read_text(encoding="utf-8").split("\n")
    assert kept[1:] == [""] and json.loads(kept[0]) == {"id": "b", "messages": [{"role": "assistant", "content": odd}]}


@ray.remote(max_restarts=0)
class _Dying:
    def answer_to_shard(self, *args):
        os._exit(1)  # the engine process dies on this chunk, every time


class _DeadPool:
    """A TeacherPool of engines that die on every call (no restarts left)."""

    def __init__(self):
        self.actors = [_Dying.remote()]

    def submit(self, method, *args):
        return getattr(self.actors[0], method).remote(*args)


def test_a_chunk_whose_engine_dies_every_time_ends_the_job_named(setup, tmp_path):
    """Retried forever, a dead pool spun the job without progress; three engine deaths on one chunk end it."""
    from transformers import AutoTokenizer

    from launch import streams
    from launch.config import load_run_config
    from launch.rollouts import plan, sampling_params, write_rollouts

    root, teacher, overrides = setup
    cfg = load_run_config(str(_config_file(tmp_path, overrides)), [])
    tok = AutoTokenizer.from_pretrained(teacher)
    items = plan(*streams.sft_prompts(cfg, streams.chat_format(cfg, tok)))[:8]
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        with pytest.raises(RuntimeError, match="from id 'p.*' failed 3 times, its engine dying each time"):
            write_rollouts(cfg, _DeadPool(), items, sampling_params(cfg, tok.eos_token_id), teacher, tmp_path / "o")
    finally:
        if started:
            ray.shutdown()
