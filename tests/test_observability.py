"""The driver's view of the run, on a real local Ray: actor health with restarts, and the metrics hub."""

from __future__ import annotations

import os
import time
import types

import pytest
import ray

from launch.health import Health
from launch.metrics_hub import MAX_LIST_SERIES, export_points, find_hub, metric_name, start_hub
from launch.monitor import HubSource, MonitorState
from zeda_rl.metrics import MetricsLog, read_events


@pytest.fixture(scope="module")
def local_ray():
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@ray.remote(num_cpus=0, max_restarts=2, max_task_retries=0)
class Pingable:
    def health(self) -> dict:
        return {"pid": os.getpid()}

    def die(self) -> None:
        os._exit(1)


class _Log:
    def __init__(self):
        self.values = {}

    def log(self, component, name, value, step=0):
        self.values[(component, name)] = value


def _until(cond, timeout_s=60.0):
    t0 = time.time()
    while not cond():
        assert time.time() - t0 < timeout_s, "timed out"
        time.sleep(0.2)


def test_health_counts_alive_actors_and_restarts(local_ray):
    actors = [Pingable.remote(), Pingable.remote()]
    log = _Log()
    health = Health({"rollout": actors}, log, every_s=0.2, grace_s=30.0).start()
    try:
        _until(lambda: len(health.pids) == 2)
        assert log.values[("driver", "alive/rollout")] == 2 and log.values[("driver", "total/rollout")] == 2
        assert log.values[("driver", "restarts/rollout")] == 0
        actors[1].die.remote()  # the process exits; Ray restarts the actor (max_restarts=2) with a new pid
        _until(lambda: log.values.get(("driver", "restarts/rollout")) == 1)
    finally:
        health.stop()


def test_hub_replays_the_backlog_then_streams_and_names_metrics(local_ray, tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.log("driver", "phase", "teacher")  # before the hub exists: reaches it as backlog
    sink = start_hub("obs", log)
    try:
        for step in range(1, 4):
            log.log("learner", "tokens", 100, step)
            log.log("learner", "zero_ratio_per_layer", [0.4, 0.6], step)
        log.log("driver", "phase", "finished")
        source, state = HubSource(find_hub("obs", wait_s=30)), MonitorState()
        _until(lambda: len([state.update(e) for e in source.poll()]) >= 0 and state.ended)
        assert source.cursor == len(read_events(tmp_path / "metrics.jsonl")) == 8
        assert state.value("learner", "zero_ratio_per_layer") == [0.4, 0.6]
        with pytest.raises(LookupError, match="no live run named 'other'.*obs"):
            find_hub("other")
    finally:
        sink.close(timeout_s=1.0)
        log.close()
    assert metric_name("driver", "phase_seconds/sft") == "zeda_driver_phase_seconds_sft"


def test_prometheus_gets_per_layer_lists_but_not_a_rows_tokens():
    """One series per list element is right for 48 layers and wrong for a 36k-token row (one series a position)."""

    def ev(name, value):
        return {"component": "learner", "name": name, "value": value, "step": 1, "time": 0.0}

    assert export_points(ev("zero_ratio_per_layer", [0.4, 0.6])) == [
        ("zeda_learner_zero_ratio_per_layer", 0, 0.4, False),
        ("zeda_learner_zero_ratio_per_layer", 1, 0.6, False),
    ]
    assert len(export_points(ev("layers", [0.5] * MAX_LIST_SERIES))) == MAX_LIST_SERIES
    assert export_points(ev("first_row/tokens", list(range(36_864)))) == []
    assert export_points(ev("tokens", 7)) == [("zeda_learner_tokens", None, 7.0, True)]
    assert export_points(ev("loss", 0.5)) == [("zeda_learner_loss", None, 0.5, False)]
    assert export_points(ev("phase", "sft")) == export_points(ev("done", True)) == []


@ray.remote(num_cpus=0)
class Slow:
    def work(self, seconds: float) -> int:
        time.sleep(seconds)
        return os.getpid()


def test_teacher_pool_sends_each_request_to_the_least_loaded_actor(local_ray):
    from actors.teacher_pool import TeacherPool

    pool = TeacherPool([Slow.remote(), Slow.remote()])
    long_ref = pool.submit("work", 3.0)  # actor 0 busy for a while
    assert pool.load() == [1, 0]
    quick = [pool.submit("work", 0.0)]  # -> actor 1
    assert pool.load() == [1, 1]
    ray.get(quick)
    assert pool.load() == [1, 0]  # finished requests are forgotten
    second = pool.submit("work", 0.0)  # -> actor 1 again, not the busy one
    assert ray.get(second) == ray.get(quick[0]) != ray.get(long_ref)


def test_replay_of_a_finished_run_shows_each_phases_average(tmp_path):
    """The live rate window (the last 10 s) of a finished run is its evaluation: replay shows per-phase averages."""
    import io
    import json

    from rich.console import Console

    from launch.monitor import main as monitor_main
    from launch.monitor import render
    from zeda_rl.metrics import Event

    events = [Event("driver", "phase", "sft", 0, 100.0)]
    events += [Event("learner", "tokens", 500, i, 100.0 + i) for i in range(1, 11)]  # 5000 tokens in the 20 s of sft
    events += [Event("learner", "step_done", 1, i, 100.0 + i) for i in range(1, 11)]
    events += [Event("driver", "phase", "eval", 0, 120.0), Event("driver", "phase", "finished", 0, 150.0)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(e.__dict__) + "\n" for e in events))
    state = MonitorState()
    for ev in events:
        state.update(ev)
    assert state.rate("learner_tokens") == 0.0  # what the screen used to show
    phases = {name: (round(span), rates) for name, span, rates in state.phase_rates()}
    assert phases["sft"] == (20, {"learner_tokens": 250.0, "learner_steps": 0.5}) and phases["eval"] == (30, {})
    console = Console(file=io.StringIO(), width=120)
    console.print(render(state))
    text = console.file.getvalue()
    assert "average per phase" in text and "250.0" in text and "0.500" in text
    assert monitor_main([str(tmp_path), "--replay"]) == 0


def test_learner_import_prints_none_of_megatrons_known_warnings():
    """A learner rank imports these modules (Ray actors too: their class lives in learner.actor); the known,
    harmless Megatron fallbacks are filtered by message, and any other Megatron warning still shows."""
    import subprocess
    import sys

    code = (
        "import learner.actor, learner.model, learner.train, learner.checkpoint, warnings\n"
        "from megatron.core.transformer import TransformerConfig\n"
        "TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1)\n"
        "warnings.warn_explicit('Apex is slow today', UserWarning, 'megatron/core/x.py', 1, module='megatron.core.x')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    for known in ("Transformer Engine and Apex are not installed", "Apex is not installed", "full scope is deprecated"):
        assert known not in out.stderr, out.stderr
    assert "Apex is slow today" in out.stderr


def test_report_plots_mark_where_opd_starts(tmp_path):
    """The report finds the SFT/OPD boundary in the learner's steps (the training plot's marker) and draws every plot."""
    import json
    from types import SimpleNamespace

    from launch.report import write_report

    log = MetricsLog(tmp_path / "metrics.jsonl")
    for stage, steps in (("sft", 12), ("opd", 8)):
        log.log("driver", "phase", stage)
        for i in range(1, steps + 1):
            log.log("learner", "zero_ratio", 0.3 + 0.01 * i, i)
            if stage == "opd":
                log.log("learner", "reverse_kl", 0.1 / i, i)
    log.close()
    acc = {"add": 0.99, "sort": 0.97, "mean": 0.98}
    zr = {"overall": 0.5, "per_layer": [0.48, 0.52]}
    r = write_report(
        SimpleNamespace(run_dir=tmp_path, name="t"),
        {"accuracy": acc, "zero_ratio": zr},
        {"accuracy": {**acc, "sort": 0.95, "mean": 0.97}, "zero_ratio": zr},
        {"sft": 3.0, "opd": 2.0, "total": 6.0},
        tmp_path / "metrics.jsonl",
    )
    assert r["opd_starts_at"] == 12 and json.loads((tmp_path / "report.json").read_text())["opd_starts_at"] == 12
    for png in ("accuracy", "zero_ratio", "training", "throughput_time"):
        assert (tmp_path / f"{png}.png").stat().st_size > 10_000


def test_eta_after_a_resume_counts_only_the_steps_this_driver_trained():
    """Resumed at OPD step 70 of 320, the first step 225 s later: 249 steps to go at 225 s a step are 15.6 h (the
    monitor divided all 71 steps by 225 s and showed 13 minutes)."""
    from launch.monitor import _eta
    from zeda_rl.metrics import Event

    state = MonitorState()
    for ev in (
        Event("driver", "phase", "opd", 0, 1000.0),
        Event("driver", "progress_started", 1000.0, 0, 1000.0),
        Event("driver", "progress_base", 70, 0, 1000.0),
        Event("driver", "progress_total", 320, 71, 1225.0),
        Event("driver", "progress_done", 71, 71, 1225.0),
    ):
        state.update(ev)
    assert _eta(state) == "15:33:45"  # 249 steps to go at 225 s


@ray.remote(num_cpus=0, max_restarts=0, concurrency_groups={"health": 1})
class BusyEngine:
    """Pinged as the engines are: `health` in a lane of its own, so it answers during a long call."""

    @ray.method(concurrency_group="health")
    def health(self) -> dict:
        return {"pid": os.getpid()}

    def generate(self, seconds: float) -> None:
        time.sleep(seconds)


def test_an_engine_busy_for_longer_than_the_grace_is_still_alive_and_unchanged_counts_are_not_relogged(local_ray):
    """A call of 32k-token answers runs for minutes; with pings queued behind it the monitor showed 0 of 4 engines
    alive while all worked. And every 2 s the same three counts per group went to the log: 90% of a day's events."""
    from tests.test_observability import _Log as _Values

    class Log(_Values):
        def __init__(self):
            super().__init__()
            self.count = 0

        def log(self, component, name, value, step=0):
            self.count += 1
            super().log(component, name, value, step)

    engine, log = BusyEngine.remote(), Log()
    ray.get(engine.health.remote())
    health = Health({"rollout": [engine]}, log, every_s=0.2, grace_s=1.0).start()
    try:
        busy = engine.generate.remote(4.0)
        time.sleep(3.0)  # three times the grace, with the call still running
        assert log.values[("driver", "alive/rollout")] == 1
        assert log.count == 3  # alive, total, restarts: once, as nothing changed
        ray.get(busy)
    finally:
        health.stop()


@ray.remote(num_cpus=0, max_restarts=1, max_task_retries=0)
class Flaky:
    """Dies on its first call when `dies`; back after a 4 s restart (a teacher reloading its checkpoint)."""

    def __init__(self, dies: bool):
        self.dies = dies and not ray.get_runtime_context().was_current_actor_reconstructed
        if ray.get_runtime_context().was_current_actor_reconstructed:
            time.sleep(4.0)

    def health(self) -> dict:
        return {"pid": os.getpid()}

    def work(self) -> int:
        if self.dies:
            os._exit(1)
        return os.getpid()


def test_with_its_only_teacher_restarting_the_pool_says_so_instead_of_blocking(local_ray):
    """The OPD loop admits no call while no teacher is up, and goes on collecting (a submit would wait in it)."""
    from actors.teacher_pool import TeacherPool

    pool = TeacherPool([Flaky.remote(True)], retry_s=0.5)
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(pool.submit("work"))
    assert not pool.available()
    _until(pool.available, timeout_s=30)  # pinged back once restarted
    assert ray.get(pool.submit("work")) > 0


def test_teacher_pool_leaves_a_restarting_teacher_out_until_it_answers(local_ray):
    """While a teacher restarts, every call sent to it fails at once, and least-loaded dispatch sends it the most
    (nothing in flight): the rollouts job gave up on a chunk after three such failures with the others healthy."""
    from actors.teacher_pool import TeacherPool

    pool = TeacherPool([Flaky.remote(True), Flaky.remote(False)], retry_s=0.5)
    first = [pool.submit("work") for _ in range(2)]  # one to each: the first kills its teacher
    outcomes = []
    for ref in first:
        try:
            outcomes.append(ray.get(ref))
        except ray.exceptions.RayActorError:
            outcomes.append("died")
    assert outcomes.count("died") == 1
    t0, failed, pids = time.time(), 0, set()
    while time.time() - t0 < 8.0:  # through the restart and after it
        try:
            pids.add(ray.get(pool.submit("work")))
        except ray.exceptions.RayActorError:
            failed += 1
        time.sleep(0.05)
    assert failed == 0 and len(pids) == 2  # nothing sent to it while it restarted; used again once back


def test_the_report_counts_each_step_once_after_a_resume():
    """A driver killed at OPD step 10, resumed from its step-6 checkpoint: steps 7-10 were trained again by the
    resumed driver. The report plotted 1..10 then 7..20; the lineage is 1..20, and the killed driver's SFT stays."""
    from launch.report import _series, lineage
    from zeda_rl.metrics import Event

    t = iter(range(10_000))
    events = [Event("driver", "phase", "sft", 0, next(t))] + [Event("learner", "loss", 1.0, s, next(t)) for s in (1, 2)]
    events += [Event("driver", "phase", "opd", 0, next(t))]
    events += [Event("learner", "reverse_kl", 0.1, s, next(t)) for s in range(1, 11)]
    events += [Event("driver", "phase", "start", 0, next(t))]
    events += [Event("driver", "resumed", {"from": "step_8", "learner_step": 8, "stage": "opd", "step": 6}, 0, next(t))]
    events += [Event("driver", "phase", "sft", 0, next(t)), Event("driver", "phase", "opd", 0, next(t))]
    events += [Event("learner", "reverse_kl", 0.2, s, next(t)) for s in range(7, 21)]
    kept = lineage(events)
    assert [s for s, _, _ in _series(kept, "learner", "reverse_kl")] == list(range(1, 21))
    assert [v for s, v, _ in _series(kept, "learner", "reverse_kl") if s in (6, 7)] == [0.1, 0.2]
    assert [s for s, _, _ in _series(kept, "learner", "loss")] == [1, 2]
    assert [s for s, _, _ in _series(events, "learner", "reverse_kl")] != list(range(1, 21))  # what it was


def test_the_report_times_every_driver_of_a_resumed_run():
    """The killed driver's finished phases and the OPD it was killed in count with the resumed driver's own times
    (the report showed the last driver's alone), and the killed OPD's time is shown as done again."""
    from launch.report import _phase_rows, phase_times
    from zeda_rl.metrics import Event

    def ev(name, value, t):
        return Event("driver", name, value, 0, t)

    events = [ev("driver_started", {"resume": False}, 100.0), ev("phase", "teacher", 100.0)]
    events += [ev("phase_seconds/teacher", 2.0, 102.0), ev("phase", "sft", 102.0), ev("phase_seconds/sft", 10.0, 112.0)]
    events += [ev("phase", "opd", 112.0), Event("learner", "reverse_kl", 0.1, 3, 140.0)]  # killed after t = 140
    events += [ev("driver_started", {"resume": True}, 500.0), ev("phase", "teacher", 500.0)]
    now = {"teacher": 0.5, "start": 4.0, "sft": 0.1, "opd": 20.0, "total": 30.0}
    times, cut = phase_times(events, now)
    assert times == {"teacher": 2.5, "start": 4.0, "sft": 10.1, "opd": 48.0, "total": 70.0}
    assert cut == {"opd": 28.0}
    assert phase_times(events[:7], now) == (now, {})  # one driver: its own times
    assert phase_times([], now) == (now, {})  # a log from before the markers
    assert "| opd | 48.0 (of which 28.0 in a killed driver, done again) |" in _phase_rows(times, cut).splitlines()


@ray.remote(num_cpus=0, max_restarts=1, max_task_retries=0)
class Wedged:
    """An engine alive and answering pings whose generation never returns (a wedged request)."""

    def health(self) -> dict:
        return {"pid": os.getpid()}

    def generate(self) -> list:
        time.sleep(3600)
        return []

    def score_and_push(self, samples) -> dict:
        return {"sent": True, "tokens": 0}


def test_a_call_that_never_returns_is_given_up_and_its_engine_restarted(local_ray, tmp_path):
    """A wedged SGLang request kept its step waiting forever, every actor alive. Past opd.call_timeout_s the call's
    samples are dropped, the rollout engine holding it is killed (Ray restarts it) and owed the weights."""
    from actors.teacher_pool import TeacherPool
    from launch.admission import Admission
    from launch.fleet import Resync, WeightSync
    from launch.opd import _expire

    class Inbox:  # what _expire calls on the LearnerGroup, recorded
        def __init__(self):
            self.discarded = []

        def inbox_discard(self, ids):
            self.discarded.extend(ids)

    engine, teacher = Wedged.remote(), Wedged.remote()
    pid = ray.get(engine.health.remote())["pid"]
    log = MetricsLog(tmp_path / "m.jsonl")
    pool, resync = TeacherPool([teacher]), Resync(WeightSync(None, [engine], log))
    adm = Admission(prompts_per_step=1, samples_per_prompt=2, window=1, engines=1, rollout_batch=1)
    gen = engine.generate.remote()
    ref = pool.submit("score_and_push", gen)
    ids = adm.submitted(ref, *adm.next_call(0)[:1], 0, [0], source=gen)
    inbox = Inbox()
    _expire(adm, log, resync, inbox, [engine], pool, timeout_s=60.0)
    assert adm.calls and not inbox.discarded  # not overdue yet
    time.sleep(0.3)
    _expire(adm, log, resync, inbox, [engine], pool, timeout_s=0.2)
    assert not adm.calls and adm.dropped["timeout"] == 2 and inbox.discarded == ids and resync.owed == {0}

    def restarted() -> bool:
        try:
            return ray.get(engine.health.remote(), timeout=30)["pid"] != pid
        except ray.exceptions.RayActorError:  # restarting
            return False

    _until(restarted)  # killed, restarted by Ray, answering again
    assert [e.name for e in read_events(tmp_path / "m.jsonl")].count("call_timeout") == 1


@ray.remote(num_cpus=0, max_restarts=1, max_task_retries=0)
class OnDemand:
    """A rollout engine or a teacher that fails on demand: dies, or raises what `mode` names."""

    def generate(self, mode: str) -> str:
        if mode == "engine dies":
            os._exit(1)
        if mode == "version never served":
            from actors.rollout import VersionWaitTimeout

            raise VersionWaitTimeout("rollout engine still serves v3 after 1800 s; the call needs v4")
        return mode

    def score_and_push(self, mode: str) -> dict:
        if mode == "teacher dies":
            os._exit(1)
        return {"sent": True, "tokens": 1}

    def update_weights(self, version: int, refused: bool) -> int:
        if refused:
            raise ValueError("bucket 3: shape [64, 128], expected [128, 64]")
        return version


def test_only_a_rollout_engines_own_failure_makes_it_owed_the_weights(local_ray, tmp_path):
    """A teacher's death failed the OPD call holding its generation, and the driver took it for the rollout engine's:
    a needless full resync, after which every push went through Ray for the rest of the run (about 460 s a push on
    16 H200s, against 3 s over NCCL). The engine is owed the weights when it died or never served the version its
    call waited for, and when a push to it failed; not when its teacher died."""
    from actors.teacher_pool import TeacherPool
    from launch.admission import Admission
    from launch.fleet import Resync, WeightSync
    from launch.opd import _applied, _collect

    class Inbox:  # what _collect calls on the LearnerGroup
        def inbox_discard(self, ids):
            pass

    from launch.opd import _engine_at_fault

    me = types.SimpleNamespace(_actor_id=bytes.fromhex("ab"))
    for err, owed in (
        (ray.exceptions.RayActorError(actor_id="ab"), True),  # the engine's death
        (ray.exceptions.RayActorError(actor_id="cd"), False),  # another actor's: its teacher's
        (ray.exceptions.ActorDiedError(), True),  # an actor lost, none named: assumed the engine
        (ray.exceptions.ObjectLostError("ab" * 14, None, ""), True),  # its answer lost with its node
        (ray.exceptions.RayTaskError("score_and_push", "", ValueError("bad")), False),  # a task's own error
    ):
        assert _engine_at_fault(err, me) is owed, err
    log = MetricsLog(tmp_path / "m.jsonl")
    engine, teacher = OnDemand.remote(), OnDemand.remote()
    for mode, owed in (("ok", False), ("version never served", True), ("teacher dies", False), ("engine dies", True)):
        sync = WeightSync(None, [engine], log, transport="nccl")
        resync = Resync(sync)
        adm = Admission(prompts_per_step=1, samples_per_prompt=1, window=1, engines=1, rollout_batch=1)
        gen = engine.generate.remote(mode)
        adm.submitted(TeacherPool([teacher]).submit("score_and_push", gen), *adm.next_call(0)[:1], 0, [0], source=gen)
        _until(lambda: (_collect(adm, log, resync, Inbox(), [engine], timeout_s=0.2), not adm.calls)[1])
        assert (resync.owed == {0}) is owed and (sync.transport == "ray") is owed, mode
        assert adm.dropped["engine_failure"] == (mode != "ok"), mode
        teacher = OnDemand.remote() if mode == "teacher dies" else teacher  # not waiting for Ray's restart
    engine = OnDemand.remote()
    resync = Resync(WeightSync(None, [engine], log))
    acks = {engine.update_weights.remote(5, False): 0}
    _applied(acks, log, 1, resync, wait=True)
    assert not acks and not resync.owed
    acks = {engine.update_weights.remote(6, True): 0, engine.update_weights.remote(7, False): 0}
    _applied(acks, log, 1, resync, wait=True)  # a refused push, then a newer one applied: nothing owed
    assert not acks and not resync.owed
    acks = {engine.update_weights.remote(8, True): 0}  # the engine refused a bucket: it serves no known version
    _applied(acks, log, 1, resync, wait=True)
    assert not acks and resync.owed == {0}
