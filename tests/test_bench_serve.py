"""bench/serve.py's pure parts: latency statistics, the dynamic batcher's grouping, argument checks (no Ray, no model)."""

from __future__ import annotations

import threading
import time

import pytest

from bench.serve import Batcher, parse_args, percentile, ratios, schedule, split_rounds, summarize
from zeda_rl.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=8)
HOT = SamplingParams(temperature=1.0, max_new_tokens=8)


def test_percentile_interpolates_between_order_statistics():
    assert percentile([4, 1, 3, 2], 50) == pytest.approx(2.5)  # unsorted input
    xs = list(range(1, 101))
    assert percentile(xs, 50) == pytest.approx(50.5)
    assert percentile(xs, 99) == pytest.approx(99.01)
    assert percentile(xs, 0) == 1 and percentile(xs, 100) == 100
    assert percentile([7.0], 99) == 7.0
    # one slow request out of 100 barely moves p99 but sets the max
    assert percentile([1.0] * 99 + [11.0], 99) == pytest.approx(1.1)


def test_percentile_refuses_nothing_and_bad_q():
    with pytest.raises(ValueError, match="no values"):
        percentile([], 50)
    with pytest.raises(ValueError, match="outside"):
        percentile([1, 2], 101)


def test_summarize_and_ratios():
    t = summarize([1.0, 2.0, 3.0, 4.0], tokens=400, wall_s=5.0, batches=[2, 2, 2, 2], queued=[0.1] * 4, cpu_s=8.0)
    assert t["requests"] == 4 and t["output_tokens"] == 400
    assert t["tok_s"] == pytest.approx(80.0) and t["req_s"] == pytest.approx(0.8)
    assert t["p50_s"] == pytest.approx(2.5) and t["p99_s"] == pytest.approx(3.97)
    assert t["mean_batch"] == 2 and t["mean_queue_s"] == pytest.approx(0.1)
    assert t["tok_per_cpu_s"] == pytest.approx(50.0)
    z = summarize([0.5, 1.0, 1.5, 2.0], tokens=400, wall_s=2.5, batches=[4] * 4, queued=[0.0] * 4, cpu_s=4.0)
    r = ratios({"teacher": t, "zeda": z})
    assert set(r) == {"zeda"}
    assert r["zeda"]["tok_s_x"] == pytest.approx(2.0)
    assert r["zeda"]["tok_per_cpu_s_x"] == pytest.approx(2.0)
    assert r["zeda"]["p50_x"] == pytest.approx(0.5) and r["zeda"]["p99_x"] == pytest.approx(1.985 / 3.97)
    # no CPU time (SGLang): no CPU ratio, the rest as before
    assert ratios({"teacher": {**t, "tok_per_cpu_s": None}, "zeda": z})["zeda"]["tok_per_cpu_s_x"] is None
    with pytest.raises(ValueError, match="one batch size"):
        summarize([1.0, 2.0], tokens=10, wall_s=1.0, batches=[1])
    with pytest.raises(ValueError, match="at least one request"):
        summarize([], tokens=0, wall_s=1.0, batches=[])


def test_schedule_reverses_every_other_round_and_rounds_split_the_requests():
    assert schedule(["teacher", "zeda"], 3) == [
        (0, "teacher"),
        (0, "zeda"),
        (1, "zeda"),
        (1, "teacher"),
        (2, "teacher"),
        (2, "zeda"),
    ]
    assert split_rounds(10, 3) == [4, 3, 3]
    assert split_rounds(8, 4) == [2, 2, 2, 2]


def test_batcher_takes_the_oldest_requests_up_to_max_batch():
    b = Batcher(max_batch=3)
    for i in range(5):
        b.submit([i + 1], GREEDY)
    assert [p.prompt for p in b.take()] == [[1], [2], [3]]
    assert [p.prompt for p in b.take()] == [[4], [5]]
    assert b.take(timeout=0.01) == []  # nothing waits


def test_batcher_groups_by_sampling_params_and_keeps_the_others_in_order():
    b = Batcher(max_batch=8)
    for i, params in enumerate([GREEDY, HOT, GREEDY, HOT, GREEDY]):
        b.submit([i], params)
    first = b.take()
    assert [p.prompt for p in first] == [[0], [2], [4]] and {p.params for p in first} == {GREEDY}
    assert [p.prompt for p in b.take()] == [[1], [3]]
    assert b.waiting() == 0


def test_batcher_holds_the_batch_open_for_requests_sent_at_the_same_moment():
    b = Batcher(max_batch=2, max_wait_s=30.0)
    b.submit([1], GREEDY)
    threading.Timer(0.05, lambda: b.submit([2], GREEDY)).start()
    t0 = time.perf_counter()
    batch = b.take()
    assert [p.prompt for p in batch] == [[1], [2]]
    assert time.perf_counter() - t0 < 20  # a full batch ends the wait, not the 30 s window
    # without a window the first request goes alone (a take that waited for a second would get it after 5 s)
    c = Batcher(max_batch=2)
    c.submit([1], GREEDY)
    late = threading.Timer(5.0, lambda: c.submit([2], GREEDY))
    late.start()
    assert [p.prompt for p in c.take()] == [[1]]
    late.cancel()


def test_batcher_window_ends_with_a_partial_batch_and_close_releases_take():
    b = Batcher(max_batch=4, max_wait_s=0.05)
    b.submit([1], GREEDY)
    assert [p.prompt for p in b.take()] == [[1]]
    threading.Timer(0.05, b.close).start()
    assert b.take() == []  # blocked with nothing waiting, released by close
    with pytest.raises(RuntimeError, match="closed"):
        b.submit([2], GREEDY)


def test_pending_carries_the_result_or_the_engine_error():
    b = Batcher(max_batch=2)
    ok, bad = b.submit([1], GREEDY), b.submit([2], GREEDY)
    ok.resolve({"tokens": 3})
    bad.resolve(error=ValueError("engine failed"))
    assert ok.wait(1) == {"tokens": 3}
    with pytest.raises(ValueError, match="engine failed"):
        bad.wait(1)
    with pytest.raises(TimeoutError):
        b.submit([3], GREEDY).wait(0.01)


def test_batcher_refuses_bad_sizes():
    with pytest.raises(ValueError, match="max_batch"):
        Batcher(0)
    with pytest.raises(ValueError, match="max_wait_s"):
        Batcher(2, max_wait_s=-1)


@pytest.fixture
def baselines(tmp_path):
    (tmp_path / "baselines.json").write_text('{"rows": []}')
    return ["--baselines", str(tmp_path)]


def test_parse_args_defaults(baselines):
    a = parse_args(baselines)
    assert (a.requests, a.concurrency, a.max_batch, a.rounds, a.backend) == (256, 8, 8, 4, "torch")
    assert parse_args([*baselines, "--backend", "sglang"]).rounds == 1
    assert parse_args([*baselines, "--concurrency", "4"]).max_batch == 4  # default: the concurrency


@pytest.mark.parametrize(
    "args, message",
    [
        (["--concurrency", "0"], "--concurrency must be at least 1, got 0"),
        (["--requests", "0"], "--requests must be at least 1"),
        (["--max-batch", "0"], "--max-batch must be at least 1"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
        (["--batch-wait-ms", "-1"], "--batch-wait-ms must be >= 0"),
        (["--requests", "16", "--concurrency", "8", "--rounds", "4"], "--concurrency 8 exceeds the 4 requests"),
        (["--requests", "2", "--concurrency", "1", "--rounds", "3"], "--rounds 3 is more than --requests 2"),
        (["--backend", "sglang", "--rounds", "2"], "with --backend sglang one engine holds the GPU"),
        (["--models", "zeda"], "--models must include teacher"),
        (["--engine-kwargs", "[1]"], "--engine-kwargs must be a JSON object"),
    ],
)
def test_parse_args_refuses_bad_arguments(baselines, args, message, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args([*baselines, *args])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_parse_args_names_missing_models(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--baselines", str(tmp_path / "nowhere")])
    assert "no baselines.json there" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--teacher", str(tmp_path)])
    assert "--teacher and --student go together" in capsys.readouterr().err
