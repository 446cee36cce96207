"""The engine fleet: starting the rollout and teacher actors, pushing weights to them, resyncing
restarted ones, probing which weights they serve. The OPD loop uses these; it owns none of them."""

from __future__ import annotations

import time
from pathlib import Path

import ray

from launch.config import RunConfig
from zeda_rl.metrics import MetricsLog


def push_weights(learner, rollouts: list, version: int, log: MetricsLog) -> list:
    """Publish the learner's weights as version `version`; returns the actors' ack refs.

    The frames go into Ray's object store once and every rollout actor applies them
    between generation batches (its queue), so nothing in flight is aborted.
    """
    t0 = time.time()
    frames = learner.export_update(version)
    ref = ray.put(frames)
    acks = [a.update_weights.remote(ref) for a in rollouts]
    log.log("driver", "weight_sync_s", time.time() - t0, version)
    log.log("driver", "policy_version", version, version)
    return acks, ref


def settle(acks: list, log: MetricsLog, timeout_s: float | None = None) -> list:
    """Wait for weight-push acks; a failed one (its actor died; Ray restarts it) is logged, not raised."""
    served = []
    for ack in acks:
        try:
            served.append(ray.get(ack, timeout=timeout_s))
        except ray.exceptions.RayError as err:
            log.log("driver", "actor_restart", f"weight push: {str(err)[:200]}")
    return served


class Resync:
    """Rollout engines owed the current weights: their calls failed (Ray restarts them) or unsynced
    samples arrived. Each gets one push at a time, retried once a second until one reaches the
    restarted process; the regular pushes of later versions reach it as well."""

    def __init__(self, rollouts: list, log: MetricsLog):
        self.rollouts, self.log = rollouts, log
        self.owed: set[int] = set()
        self.pending: dict = {}  # ack ref -> engine index
        self.last_try: dict[int, float] = {}

    def mark(self, indices) -> None:
        self.owed.update(indices)

    def poll(self, frames) -> None:
        now = time.time()
        for j in self.owed - set(self.pending.values()):
            if now - self.last_try.get(j, 0.0) >= 1.0:
                self.pending[self.rollouts[j].update_weights.remote(frames)], self.last_try[j] = j, now
        if self.pending:
            done, _ = ray.wait(list(self.pending), num_returns=len(self.pending), timeout=0)
            for ref in done:
                j = self.pending.pop(ref)
                if settle([ref], self.log):
                    self.owed.discard(j)


def probe_rollouts(rollouts: list, probe: list[list[int]], log: MetricsLog, version: int) -> None:
    """Log the version each engine serves and its logprobs of the probe sequences."""
    try:
        versions = ray.get([a.version.remote() for a in rollouts])
        lps = ray.get(rollouts[0].score.remote(probe))
    except ray.exceptions.RayError as err:  # an engine restarting: skip this probe
        log.log("driver", "actor_restart", f"probe: {str(err)[:200]}")
        return
    log.log("rollout", "served_versions", [int(v) for v in versions], version)
    log.log("rollout", "probe_logprobs", [float(x) for lp in lps for x in lp], version)


def engine_kwargs(section) -> dict:
    """An engine section's backend arguments; its dtype reaches every backend (SGLang's server arg has the same name)."""
    return {**section.engine_kwargs, "dtype": section.dtype}


def start_actors(cfg: RunConfig, teacher_dir: Path, student_dir: Path, endpoint: str, pad_id: int):
    """Rollout and teacher actors in one placement group (PACK: one node when it fits)."""
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from actors.rollout import RolloutActor
    from actors.teacher_pool import TeacherActor, TeacherPool

    from launch.placement import engine_bundles

    pg = placement_group(engine_bundles(cfg), strategy="PACK")
    ray.get(pg.ready(), timeout=600)

    def opts(e, i):
        return dict(num_cpus=e.cpus, num_gpus=e.gpus,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i))

    rollouts = [
        RolloutActor.options(**opts(cfg.rollout, i)).remote(cfg.rollout.backend, str(student_dir), cfg.rollout.threads, engine_kwargs(cfg.rollout))
        for i in range(cfg.rollout.replicas)
    ]
    base = cfg.rollout.replicas
    teachers = [
        TeacherActor.options(**opts(cfg.teacher, base + i)).remote(
            cfg.teacher.backend, str(teacher_dir), cfg.teacher.threads, engine_kwargs(cfg.teacher), learner_endpoint=endpoint, pad_id=pad_id
        )
        for i in range(cfg.teacher.replicas)
    ]
    ray.get([a.health.remote() for a in rollouts + teachers])
    return rollouts, TeacherPool(teachers), pg
