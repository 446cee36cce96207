"""Weight sync without a detour: a 2-rank EP learner publishes its own buckets to real Ray engine actors.

What must hold: each rank publishes only what it owns and the driver gets references only; the
engines end with exactly the learner's HF tensors (compared with the EP all-gather of an HF export);
a generate call running during a push sees one complete version, and a push with a bad bucket
leaves the old version serving; the object store is back to its baseline after many pushes; the
broadcast path (gloo here, the code that picks nccl on GPUs) delivers the same tensors to the
fake SGLang engine.
"""

from __future__ import annotations

import pickle
import re
import time

import numpy as np
import pytest
import torch

ray = pytest.importorskip("ray")

from learner.config import LearnerSection, SFTStage  # noqa: E402
from learner.testing import tiny_checkpoint  # noqa: E402
from zeda_rl.metrics import MetricsLog  # noqa: E402
from zeda_rl.sampling import SamplingParams  # noqa: E402
from zeda_rl.weights import WeightPush, model_tensors, pack_bucket, tensor_target, unpack_bucket  # noqa: E402

PROMPTS = [[3 + i, 5, 7 + i, 9] for i in range(12)]
GREEDY = SamplingParams(temperature=0, max_new_tokens=100)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    from actors.rollout import RolloutActor
    from learner.actor import LearnerGroup

    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    d = tmp_path_factory.mktemp("ws")
    ckpt = tiny_checkpoint("qwen3_moe", d / "ckpt", initializer_range=0.1)
    sft = SFTStage(lr=1e-2, schedule="constant", warmup_frac=0.0)
    group = LearnerGroup(ckpt, LearnerSection(ep=2, bucket_bytes=8192), sft)
    engines = [RolloutActor.options(num_cpus=0.25).remote("torch", str(ckpt)) for _ in range(2)]
    ray.get([e.health.remote() for e in engines])
    rng = np.random.default_rng(0)
    batch = {"tokens": rng.integers(0, 64, (4, 12)), "loss_mask": np.tile(np.r_[[0] * 4 + [1] * 8], (4, 1))}
    yield {"group": group, "engines": engines, "ckpt": ckpt, "dir": d, "batch": batch, "sft": sft}
    group.shutdown()
    for e in engines:
        ray.kill(e)
    if started:
        ray.shutdown()


def _learner_tensors(group, out) -> dict[str, torch.Tensor]:
    """The learner's HF tensors through the other road: the EP all-gather of an HF export."""
    from safetensors.torch import load_file

    return load_file(group.export_hf(out) / "model.safetensors")


def _engine_tensors(engine, names) -> dict[str, torch.Tensor]:
    def read(actor, names=names):
        targets = model_tensors(
            getattr(actor.engine, "_engine", actor.engine).model
        )  # torch engine, or the fake SGLang's
        return {n: tensor_target(targets, n).detach().clone() for n in names}

    return ray.get(engine.__ray_call__.remote(read))


def _assert_same(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for n, t in want.items():
        assert torch.equal(got[n], t), n


def _plasma_objects() -> int:
    from ray._private.internal_api import memory_summary

    text = memory_summary(address=ray.get_runtime_context().gcs_address, stats_only=True)
    return int(re.search(r"Plasma memory usage \d+ MiB, (\d+) objects", text).group(1))


def _stable_count() -> int:
    """The object count once frees from earlier calls have landed (two equal readings a second apart)."""
    last, now = -1, _plasma_objects()
    while now != last:
        time.sleep(1.0)
        last, now = now, _plasma_objects()
    return now


def _settles_to(n: int, timeout_s: float = 30.0) -> int:
    """The store's object count once it reaches n (frees are asynchronous), or what it is at the deadline."""
    deadline = time.time() + timeout_s
    while (got := _plasma_objects()) != n and time.time() < deadline:
        time.sleep(0.2)
    return got


def test_ranks_publish_what_they_own_and_engines_end_with_the_learners_tensors(fleet):
    group, engines = fleet["group"], fleet["engines"]
    group.train_step(fleet["sft"], fleet["batch"])

    per_rank = ray.get([a.publish.remote(1, 8192) for a in group.actors])
    names = [[n for r in refs for n, _ in unpack_bucket(ray.get(r), 1)] for refs in per_rank]
    experts = [{int(m) for n in ns for m in re.findall(r"\.experts\.(\d+)\.", n)} for ns in names]
    assert experts == [set(range(4)), set(range(4, 8))]  # EP rank r: its own experts, nothing else
    assert all(".experts." in n for n in names[1])  # the dense tensors come from rank 0 only
    assert len(per_rank[0]) > 1 and len(set(names[0] + names[1])) == len(names[0]) + len(names[1])
    del per_rank

    push = group.publish(1)
    assert isinstance(push, WeightPush) and push.version == 1
    assert push.refs and all(isinstance(r, ray.ObjectRef) for r in push.refs)
    assert len(pickle.dumps(push)) < 100 * len(push.refs)  # references, not tensors
    assert ray.get([e.update_weights.remote(1, list(push.refs)) for e in engines]) == [1, 1]

    want = _learner_tensors(group, fleet["dir"] / "export1")
    assert set(want) == set(names[0] + names[1])
    for e in engines:
        _assert_same(_engine_tensors(e, list(want)), want)


def test_a_push_during_generation_is_seen_whole_or_not_at_all(fleet):
    group, (eng, ref) = fleet["group"], fleet["engines"]
    push1 = group.publish(1)
    ray.get([e.update_weights.remote(1, list(push1.refs)) for e in (eng, ref)])
    old = [s["output_ids"] for s in ray.get(ref.generate.remote(PROMPTS, GREEDY, list(range(len(PROMPTS)))))]
    before = _engine_tensors(eng, list(_learner_tensors(group, fleet["dir"] / "export-old")))

    group.train_step(fleet["sft"], fleet["batch"])
    push2 = group.publish(2)
    bad = ray.put(pack_bucket(2, [("model.layers.0.nope.weight", torch.ones(2))]))

    # a failing push staged while a generate call runs: it fails before that call ends, nothing switches
    running = eng.generate.remote(PROMPTS, GREEDY, list(range(len(PROMPTS))))
    time.sleep(0.1)
    failed = eng.update_weights.remote(2, [*push2.refs, bad])
    with pytest.raises(ray.exceptions.RayTaskError, match="nope"):
        ray.get(failed, timeout=60)
    assert not ray.wait([running], timeout=0)[0], "the generate call ended first: the staging was not concurrent"
    out = ray.get(running)
    assert [s["output_ids"] for s in out] == old and {s["policy_version"] for s in out} == {1}
    assert ray.get(eng.version.remote()) == 1
    _assert_same(_engine_tensors(eng, list(before)), before)

    # a good push during a generate call: that call is all v1, the next one all v2
    running = eng.generate.remote(PROMPTS, GREEDY, list(range(len(PROMPTS))))
    time.sleep(0.2)
    ack = eng.update_weights.remote(2, list(push2.refs))
    after = eng.generate.remote(PROMPTS, GREEDY, list(range(len(PROMPTS))))
    first, v, second = ray.get(running), ray.get(ack), ray.get(after)
    assert v == 2 and [s["output_ids"] for s in first] == old and {s["policy_version"] for s in first} == {1}
    assert {s["policy_version"] for s in second} == {2} and [s["output_ids"] for s in second] != old
    assert ray.get(ref.update_weights.remote(2, list(push2.refs))) == 2
    want = [s["output_ids"] for s in ray.get(ref.generate.remote(PROMPTS, GREEDY, list(range(len(PROMPTS)))))]
    assert [s["output_ids"] for s in second] == want


def test_a_call_naming_a_version_waits_for_its_push(fleet):
    """The staleness bound: a call submitted after a push may reach the engine before the push switches in
    (updates have a concurrency group of their own); with min_version it waits, and says so if it never comes."""
    group, (eng, _) = fleet["group"], fleet["engines"]
    v = max(ray.get(eng.version.remote()), 0) + 1
    ray.get(
        eng.update_weights.remote(v - 1, list(group.publish(v - 1).refs))
    )  # synced (a restarted engine does not wait)
    push = group.publish(v)

    def slow_update(actor, version=v, refs=list(push.refs)):  # a push that takes 1.5 s to switch in
        time.sleep(1.5)
        return actor.update_weights(version, refs)

    ack = eng.__ray_call__.options(concurrency_group="weights").remote(slow_update)
    out = ray.get(eng.generate.remote(PROMPTS[:2], GREEDY, [0, 1], v), timeout=60)
    assert ray.get(ack) == v and {s["policy_version"] for s in out} == {v}
    with pytest.raises(ray.exceptions.RayTaskError, match=f"still serves v{v} .* needs v{v + 1}"):
        ray.get(eng.generate.remote(PROMPTS[:2], GREEDY, [0, 1], v + 1, 0.5), timeout=60)


def test_the_object_store_returns_to_baseline_after_many_pushes(fleet, tmp_path):
    from launch.fleet import WeightSync

    group, engines = fleet["group"], fleet["engines"]
    sync = WeightSync(group, engines, MetricsLog(tmp_path / "m.jsonl"))
    baseline = _stable_count()
    for v in range(10, 16):
        acks = sync.push(v)
        held = _plasma_objects()
        assert held > baseline  # the buckets are in the store while engines fetch them
        assert ray.get(acks) == [v, v]
    assert _settles_to(baseline + len(sync.latest.refs)) == baseline + len(
        sync.latest.refs
    )  # the latest stays, for resyncs
    sync.latest = None
    assert _settles_to(baseline) == baseline


def test_ten_pushes_under_load_through_the_actors_lose_no_request(fleet, tmp_path):
    """Generation calls kept in flight on both engine actors while the driver pushes ten versions: every
    call returns (none aborted), each is one version, and each engine's calls see versions in order."""
    from launch.fleet import WeightSync

    group, engines = fleet["group"], fleet["engines"]
    sync = WeightSync(group, engines, MetricsLog(tmp_path / "m.jsonl"))
    ray.get(sync.push(30))
    params = SamplingParams(temperature=1.0, max_new_tokens=8, seed=0)
    calls = {i: [] for i in range(len(engines))}

    def keep_busy():
        for i, e in enumerate(engines):
            while sum(1 for r in calls[i] if not ray.wait([r], timeout=0)[0]) < 2:
                calls[i].append(e.generate.remote(PROMPTS[:4], params, list(range(4))))

    for v in range(31, 41):
        keep_busy()
        group.train_step(fleet["sft"], fleet["batch"])
        keep_busy()
        assert ray.get(sync.push(v), timeout=120) == [v, v]
    for i in calls:
        versions = [{s["policy_version"] for s in out} for out in ray.get(calls[i], timeout=120)]
        assert all(len(vs) == 1 for vs in versions)
        seen = [vs.pop() for vs in versions]
        assert seen == sorted(seen) and set(seen) <= set(range(30, 41)), seen
        assert len(set(seen)) >= 5, f"engine {i} served only {sorted(set(seen))}: not under load"


def test_broadcast_path_delivers_the_same_tensors_to_fake_sglang(fleet, tmp_path):
    from actors.fake_sglang import FakeSGLangEngine
    from actors.rollout import RolloutActor
    from launch.fleet import WeightSync, settle
    from zeda_rl.sampling import SamplingParams

    group = fleet["group"]
    fakes = [
        RolloutActor.options(num_cpus=0.25).remote(
            "sglang", str(fleet["ckpt"]), 1, {"_engine_factory": FakeSGLangEngine}
        )
        for _ in range(2)
    ]
    try:
        group.train_step(fleet["sft"], fleet["batch"])
        sync = WeightSync(group, fakes, MetricsLog(tmp_path / "m.jsonl"), transport="nccl", timeout_s=120)
        assert ray.get(sync.push(21)) == [21, 21]
        assert sync.latest is None  # nothing went through the object store
        want = _learner_tensors(group, tmp_path / "export")
        for f in fakes:
            _assert_same(_engine_tensors(f, list(want)), want)
        calls = ray.get(fakes[1].__ray_call__.remote(lambda a: dict(a.engine._engine.calls)))
        joined = calls["init_weights_update_group"]
        assert [c["backend"] for c in joined] == ["gloo", "gloo"]  # one group per EP rank; nccl on GPUs
        assert [c["rank_offset"] for c in joined] == [2, 2] and {c["world_size"] for c in joined} == {3}
        assert len(calls["update_weights_from_distributed"]) == len(sync._buckets)

        group.train_step(fleet["sft"], fleet["batch"])  # a second version through the same groups
        assert ray.get(sync.push(22)) == [22, 22]
        want = _learner_tensors(group, tmp_path / "export2")
        _assert_same(_engine_tensors(fakes[0], list(want)), want)

        # An engine that does not stop serving in time (a call running past the push's timeout, here a lock held for
        # it): this push goes through Ray once the engine is free, and the next goes through the groups again
        ray.get(fakes[1].__ray_call__.remote(lambda a: a.engine._serving.lock.acquire()))
        sync.timeout_s = 2.0
        acks = sync.push(23)
        ray.get(fakes[1].__ray_call__.remote(lambda a: a.engine._serving.lock.release()))
        assert ray.get(acks, timeout=60) == [23, 23] and sync.transport == "nccl" and sync.latest.version == 23
        sync.timeout_s = 120.0
        group.train_step(fleet["sft"], fleet["batch"])
        assert ray.get(sync.push(24), timeout=120) == [24, 24] and sync.latest.version == 23  # the groups again

        # An engine lost while a push waits for it: every engine holds before any rank sends, so nothing is sent
        # (the ranks would wait in their broadcasts for a member that never comes: on GPUs until NCCL's watchdog
        # kills them); the push goes through Ray, the learner trains on, the engine that held serves again.
        received = len(
            ray.get(fakes[0].__ray_call__.remote(lambda a: a.engine._engine.calls))["update_weights_from_distributed"]
        )
        ray.kill(fakes[1], no_restart=False)
        group.train_step(fleet["sft"], fleet["batch"])
        settle(sync.push(25), MetricsLog(tmp_path / "m.jsonl"))
        assert sync.transport == "ray"
        calls = ray.get(fakes[0].__ray_call__.remote(lambda a: a.engine._engine.calls))
        assert len(calls["update_weights_from_distributed"]) == received  # no rank started a broadcast
        assert ray.get(fakes[0].serving.remote()) == (25, True)
        group.train_step(fleet["sft"], fleet["batch"])  # the ranks are not stuck in a broadcast
        prompts, params = [[5, 6, 7]], SamplingParams(temperature=0, max_new_tokens=2)
        assert len(ray.get(fakes[0].generate.remote(prompts, params, [0]), timeout=60)) == 1  # released
    finally:
        for f in fakes:
            ray.kill(f)


@pytest.mark.slow  # CI runs it; 30-40 s, out of a developer's `make test` (README, Makefile)
def test_broadcast_under_tensor_parallelism_sends_dense_before_experts(fleet, tmp_path):
    """TP=2 x EP=2: both ranks gather the dense tensors together, and the engines take rank 0's group to its end
    before rank 1's. Rank 1 must therefore finish every TP gather before it sends its first expert bucket: sent in
    between, it would wait in its broadcast for engines still waiting for rank 0, which waits for rank 1's gather."""
    from actors.fake_sglang import FakeSGLangEngine
    from actors.rollout import RolloutActor
    from launch.fleet import WeightSync
    from learner.actor import LearnerGroup

    group = LearnerGroup(fleet["ckpt"], LearnerSection(ep=2, tp=2, bucket_bytes=8192), fleet["sft"])
    fake = RolloutActor.options(num_cpus=0.25).remote(
        "sglang", str(fleet["ckpt"]), 1, {"_engine_factory": FakeSGLangEngine}
    )
    try:
        group.train_step(fleet["sft"], fleet["batch"])
        sync = WeightSync(group, [fake], MetricsLog(tmp_path / "m.jsonl"), transport="nccl", timeout_s=60)
        assert ray.get(sync.push(5), timeout=120) == [5]
        want = _learner_tensors(group, tmp_path / "export")
        _assert_same(_engine_tensors(fake, list(want)), want)
    finally:
        ray.kill(fake)
        group.shutdown()


@pytest.mark.slow  # CI runs it; 30-40 s, out of a developer's `make test` (README, Makefile)
def test_engines_restarted_after_the_last_push_get_the_final_weights_before_eval(fleet, tmp_path):
    """An engine restarted after the last push serves the student it loaded at start; the evaluation samples from
    these engines, so the end of OPD gives it the final version again. One dead for good is left out of the
    evaluation (it used to fail the run after the whole of OPD), and retried ever more rarely meanwhile; with no
    engine left, serve_final refuses."""
    from actors.rollout import RolloutActor
    from launch.fleet import Resync, WeightSync, serve_final, settle
    from zeda_rl.metrics import read_events

    log = MetricsLog(tmp_path / "m.jsonl")
    engines = [RolloutActor.options(num_cpus=0.25).remote("torch", str(fleet["ckpt"])) for _ in range(2)]
    try:
        fleet["group"].train_step(fleet["sft"], fleet["batch"])
        sync = WeightSync(fleet["group"], engines, log)
        settle(sync.push(31), log)
        ray.kill(engines[1], no_restart=False)  # Ray restarts it with the checkpoint's weights
        _settles(lambda: ray.get(engines[1].serving.remote(), timeout=60) == (0, False))
        serve_final(sync, engines, 31, log)
        assert ray.get([e.serving.remote() for e in engines]) == [(31, True), (31, True)]
        want = _learner_tensors(fleet["group"], tmp_path / "export")
        _assert_same(_engine_tensors(engines[1], list(want)), want)
        ray.kill(engines[0], no_restart=True)
        _settles(lambda: not _answers(engines[0]))  # the kill lands asynchronously
        resync = Resync(sync)
        resync.mark([0])
        t0 = time.time()
        while time.time() - t0 < 6.0:  # tries at about 0, 0.5, 1.5 and 3.5 s, the next at 7.5 (it was one a second)
            resync.poll()
            time.sleep(0.05)
        fails = [e for e in read_events(tmp_path / "m.jsonl") if e.name == "actor_restart" and e.time >= t0]
        assert 3 <= len(fails) <= 4 and resync.owed == {0}
        assert serve_final(sync, engines, 31, log, tries=1) == [engines[1]]
        excluded = [e.value for e in read_events(tmp_path / "m.jsonl") if e.name == "final_engines_excluded"]
        assert list(excluded[-1]) == ["0"] and "unreachable" in excluded[-1]["0"]
        ray.kill(engines[1], no_restart=True)
        _settles(lambda: not _answers(engines[1]))  # the kill lands asynchronously
        with pytest.raises(RuntimeError, match=r"no rollout engine serves the final weights v31"):
            serve_final(sync, engines, 31, log, tries=1)
    finally:
        for e in engines:
            ray.kill(e)


def _answers(engine) -> bool:
    try:
        ray.get(engine.serving.remote(), timeout=30)
        return True
    except ray.exceptions.RayError:
        return False


def _settles(ok, timeout_s: float = 60.0) -> None:
    deadline = time.time() + timeout_s
    while True:
        try:
            if ok():
                return
        except ray.exceptions.RayError:
            pass
        assert time.time() < deadline, "the engine did not come back"
        time.sleep(0.5)
