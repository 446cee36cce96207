"""The driver's view of the run, on a real local Ray: actor health with restarts, and the metrics hub."""

from __future__ import annotations

import os
import time

import pytest
import ray

from launch.health import Health
from launch.metrics_hub import find_hub, metric_name, start_hub
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
        _until(lambda: [state.update(e) for e in source.poll()] is not None and state.ended)
        assert source.cursor == len(read_events(tmp_path / "metrics.jsonl")) == 8
        assert state.value("learner", "zero_ratio_per_layer") == [0.4, 0.6]
        with pytest.raises(LookupError, match="no live run named 'other'.*obs"):
            find_hub("other")
    finally:
        sink.close(timeout_s=1.0)
        log.close()
    assert metric_name("driver", "phase_seconds/sft") == "zeda_driver_phase_seconds_sft"


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
