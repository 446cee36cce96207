"""The engine fleet: starting the rollout and teacher actors, pushing weights to them, resyncing
restarted ones, probing which weights they serve. The OPD loop uses these; it owns none of them."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import ray

from launch.config import RunConfig
from zeda_rl.metrics import MetricsLog


class WeightSync:
    """How the driver pushes weights: it hands the engines references and versions, never tensors.

    transport "ray": the learner ranks put their buckets in Ray's object store and the engines
    fetch them (`learner.publish`). The latest push is kept for engines that must be resynced;
    an older one lives on only as the argument of engine calls still running and is freed when
    the last of them returns (Ray pins a pending task's arguments), so the store holds at most
    the versions not yet applied everywhere.
    transport "nccl" (gloo when the learner runs on CPU): one broadcast group per publishing
    learner rank with every engine, set up on the first push; each push every engine first stops
    serving (`_hold`: the driver waits for the calls running on them to end), then the driver tells
    the engines the bucket specs and the ranks broadcast. A group cannot take a restarted engine
    back, so once an engine is lost (`engine_lost`) pushes go through Ray for the rest of the run.
    """

    def __init__(self, learner, rollouts: list, log: MetricsLog, transport: str = "ray", timeout_s: float = 600.0):
        if transport not in ("ray", "nccl"):
            raise ValueError(f"weight_sync {transport!r}: expected 'ray' or 'nccl'")
        self.learner, self.rollouts, self.log, self.transport, self.timeout_s = (
            learner,
            rollouts,
            log,
            transport,
            timeout_s,
        )
        self.latest = None  # WeightPush of the newest version (ray), for resyncs
        self.version = None
        self._buckets = None  # nccl: [(group, spec)] in the order every engine receives them

    def push(self, version: int) -> list:
        """Publish the learner's weights as `version`; returns the engines' ack refs."""
        t0 = time.time()
        self.version = version
        acks = self._broadcast(version) if self.transport == "nccl" else None
        if acks is None:
            self.latest = self.learner.publish(version)
            acks = [a.update_weights.remote(version, list(self.latest.refs)) for a in self.rollouts]
        self.log.log("driver", "weight_sync_s", time.time() - t0, version)
        self.log.log("driver", "policy_version", version, version)
        return acks

    def resync(self, engine: int):
        """An ack ref for engine `engine` getting the current version through Ray's object store."""
        if self.latest is None or self.latest.version != self.version:
            self.latest = self.learner.publish(self.version)
        return self.rollouts[engine].update_weights.remote(self.latest.version, list(self.latest.refs))

    def engine_lost(self) -> None:
        if self.transport == "nccl":
            self.transport = "ray"
            self.log.log("driver", "weight_sync_fallback", "an engine restarted: weights go through Ray from now on")

    def _broadcast(self, version: int) -> list | None:
        """The engines' acks, or None if the groups failed (then this push and the next go through Ray)."""
        try:
            if self._buckets is None:
                self._join()
            if not self._hold():
                return None  # this push goes through Ray; the next tries the groups again
            acks = [a.update_weights_from_distributed.remote(version, self._buckets) for a in self.rollouts]
            ray.get(self.learner.broadcast(), timeout=self.timeout_s)
            return acks
        except ray.exceptions.RayError as err:  # a dead member, a refused bucket, or a timeout
            self.transport = "ray"
            self.log.log(
                "driver", "weight_sync_fallback", f"broadcast failed, weights go through Ray: {str(err)[:200]}"
            )
            return None

    def _hold(self) -> bool:
        """Every engine stops serving before any rank sends. A broadcast waits for every member, and an engine takes a
        push only after its running call (minutes at 32k tokens): an engine lost in that time left the learner ranks
        waiting in their broadcasts until the group's timeout (NCCL's watchdog then kills them, ending the run). Lost
        here, before anything is sent, it sends this push through Ray and raises (pushes go through Ray from then on,
        as after any engine loss); the engines that held serve again. Only slow (a call running past `timeout_s`): this
        push goes through Ray (False) and the next tries the groups again."""
        try:
            ray.get([a.hold_for_update.remote() for a in self.rollouts], timeout=self.timeout_s)
            return True
        except ray.exceptions.RayError as err:
            for a in self.rollouts:  # after its hold, in the engine's weights lane; a dead engine's is dropped
                a.release_hold.remote()
            if not isinstance(err, ray.exceptions.GetTimeoutError):
                raise
            self.log.log("driver", "weight_sync_slow", f"an engine did not stop serving in {self.timeout_s:.0f} s")
            return False

    def _join(self) -> None:
        eps = self.learner.weight_endpoints(f"zeda-weights-{time.time_ns()}")
        ranks = ray.get([a.weight_sync_ranks.remote() for a in self.rollouts])
        world, offsets = 1 + sum(ranks), [1 + sum(ranks[:i]) for i in range(len(ranks))]
        groups = [{k: e[k] for k in ("group", "address", "port", "backend")} for e in eps]
        joins = self.learner.join_weight_groups(world, self.timeout_s)
        joins += [a.init_weight_groups.remote(groups, off, world) for a, off in zip(self.rollouts, offsets)]
        ray.get(joins, timeout=self.timeout_s)
        self._buckets = [(e["group"], spec) for e in eps for spec in e["plan"]]


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
    samples arrived. Each gets one push at a time, retried until one reaches the restarted process, 0.5 s
    after a failure at first and twice as long after each failure in a row, up to `max_wait_s`: an engine
    dead for good (its restarts spent) would otherwise log a failure a second for the rest of the run. The
    regular pushes of later versions reach a restarted engine as well."""

    def __init__(self, sync: WeightSync, max_wait_s: float = 60.0):
        self.sync, self.log, self.max_wait_s = sync, sync.log, max_wait_s
        self.owed: set[int] = set()
        self.pending: dict = {}  # ack ref -> engine index
        self.next_try: dict[int, float] = {}
        self.wait_s: dict[int, float] = {}  # engine -> wait after its next failure

    def mark(self, indices) -> None:
        self.owed.update(indices)
        self.sync.engine_lost()

    def poll(self) -> None:
        now = time.time()
        for j in self.owed - set(self.pending.values()):
            if now >= self.next_try.get(j, 0.0):
                self.pending[self.sync.resync(j)] = j
        if self.pending:
            done, _ = ray.wait(list(self.pending), num_returns=len(self.pending), timeout=0)
            for ref in done:
                j = self.pending.pop(ref)
                if settle([ref], self.log):
                    self.owed.discard(j)
                    self.wait_s.pop(j, None)
                else:
                    wait = self.wait_s.get(j, 0.5)
                    self.next_try[j], self.wait_s[j] = time.time() + wait, min(2 * wait, self.max_wait_s)


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


def serve_final(sync: WeightSync, rollouts: list, version: int, log: MetricsLog, tries: int = 3) -> list:
    """The rollout engines that serve `version`, the ones the evaluation may sample from: an engine that restarted
    after the last push it took serves the checkpoint it loaded (the student before OPD), so it gets `version`
    again through Ray's object store. One that still does not serve it (dead for good: its restarts spent) is left
    out, logged and named; with none left this refuses, since the whole run's training is saved but unevaluated."""
    behind: dict[int, str] = {}
    for _ in range(tries):
        behind = {}
        for i, a in enumerate(rollouts):
            try:
                served, synced = ray.get(a.serving.remote())
                if served != version or not synced:
                    behind[i] = f"v{served}" + ("" if synced else " (restarted, not synced)")
            except ray.exceptions.RayError as err:  # restarting: it is owed the weights like the others
                behind[i] = f"unreachable ({str(err)[:80]})"
        if not behind:
            return list(rollouts)
        sync.engine_lost()
        log.log("driver", "final_resync", {str(i): why for i, why in behind.items()}, version)
        settle([sync.resync(i) for i in behind], log)
    if len(behind) == len(rollouts):
        raise RuntimeError(
            f"no rollout engine serves the final weights v{version} ({behind}); the evaluation would sample the "
            "student before OPD"
        )
    log.log("driver", "final_engines_excluded", {str(i): why for i, why in behind.items()}, version)
    from launch.runlog import console

    console.print(
        f"[yellow]rollout engines {sorted(behind)} do not serve v{version} ({behind}): evaluating without them"
    )
    return [a for i, a in enumerate(rollouts) if i not in behind]


def teacher_selftest(teachers: list, sequences: list[list[int]], repeats: int, tol: float, log: MetricsLog) -> float:
    """Score the same sequences `repeats` times on every teacher engine; refuse to train when the logprobs differ
    by more than `tol` nats (max absolute difference over engines, repeats and tokens). Returns the difference.

    OPD's signal is the teacher's logprob minus the student's: a teacher that scores one token differently from
    call to call (a nondeterministic kernel, a batch-dependent reduction, an engine serving other weights) turns
    into noise in every advantage, which no amount of training removes.
    """
    from launch.runlog import console

    seqs = [list(s) for s in sequences if len(s) >= 2]
    if not seqs or repeats < 1:
        return 0.0
    runs = ray.get([t.score.remote(seqs) for t in teachers for _ in range(repeats)])
    ref = runs[0]
    diff = max(float(abs(a - b).max()) if len(a) else 0.0 for run in runs for a, b in zip(run, ref))
    log.log("teacher", "selftest_max_diff", diff)
    msg = (
        f"teacher determinism self-test: {len(seqs)} sequences scored {repeats}x on each of {len(teachers)} teacher "
        f"engine(s): max |logprob difference| {diff:.3g} nats, bound {tol:g} (opd.teacher_selftest_tol)"
    )
    if diff > tol:
        raise RuntimeError(
            msg + ": the teacher's scores are not reproducible, so OPD would train on noise; refusing to train"
        )
    console.print(msg)
    return diff


def engine_kwargs(section) -> dict:
    """An engine section's backend arguments; its dtype reaches every backend (SGLang's server arg has the same name)."""
    return {**section.engine_kwargs, "dtype": section.dtype}


def start_actors(
    cfg: RunConfig, teacher_dir: Path, student_dir: Path, endpoint: str, pad_id: int, run: str | None = None
):
    """Rollout and teacher actors in one placement group (PACK: one node when it fits); the teachers
    stamp their batches with `run`, the id the learner's inbox accepts."""
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from actors.rollout import RolloutActor
    from actors.teacher_pool import TeacherActor, TeacherPool
    from launch.placement import engine_bundles

    pg = placement_group(engine_bundles(cfg), strategy="PACK")
    ray.get(pg.ready(), timeout=600)

    def opts(e, i):
        return dict(
            num_cpus=e.cpus,
            num_gpus=e.gpus,
            scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i),
        )

    rollouts = [
        RolloutActor.options(**opts(cfg.rollout, i)).remote(
            cfg.rollout.backend, str(student_dir), cfg.rollout.threads, engine_kwargs(cfg.rollout)
        )
        for i in range(cfg.rollout.replicas)
    ]
    base = cfg.rollout.replicas
    teachers = [
        TeacherActor.options(**opts(cfg.teacher, base + i)).remote(
            cfg.teacher.backend,
            str(teacher_dir),
            cfg.teacher.threads,
            engine_kwargs(cfg.teacher),
            learner_endpoint=endpoint,
            pad_id=pad_id,
            run=run,
        )
        for i in range(cfg.teacher.replicas)
    ]
    ray.get([a.health.remote() for a in rollouts + teachers])
    return rollouts, TeacherPool(teachers), pg


def connect_ray(cfg: RunConfig) -> None:
    """Join the job's cluster (under `ray job submit`, RAY_ADDRESS names it), the configured
    one, or start a private local Ray sized by cluster.num_cpus, on loopback (`start_local_ray`)."""
    if ray.is_initialized():
        return
    address = cfg.cluster.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:  # "local": never attach to some other Ray that happens to run on this machine
        start_local_ray(num_cpus=cfg.cluster.num_cpus, log_to_driver=True)


def start_local_ray(**kwargs) -> None:
    """A new one-node Ray that listens on loopback only: GCS, raylet, workers, the dashboard, runtime-env
    and metrics agents all bind 127.0.0.1, as its node IP (no dashboard UI; `kwargs` go to ray.init).

    Ray's processes, and the workers they start, also get GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME (unless set) naming the
    loopback interface: gloo's pair sockets (the learner ranks' groups, the weight-sync groups on CPU)
    otherwise bind the address this machine's hostname resolves to, often its LAN one. The cluster's
    auth token (Ray writes ~/.ray/auth_token world-readable) is made the owner's alone first.
    """
    import psutil

    _private_auth_token()
    lo = [name for name, addrs in psutil.net_if_addrs().items() if any(a.address == "127.0.0.1" for a in addrs)]
    # NCCL too, for a one-node run on GPUs: it skips loopback unless named (its data goes over NVLink/SHM anyway)
    env = {k: lo[0] for k in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME") if lo and k not in os.environ}
    os.environ.update(env)  # copied into the raylet's environment, hence the workers'
    try:
        with ray_on_loopback():
            ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, **kwargs)
    finally:
        for k in env:
            os.environ.pop(k, None)
    _private_auth_token()  # whatever wrote it meanwhile


@contextlib.contextmanager
def ray_on_loopback():
    """ray.init inside it may start, or attach to, a Ray whose node IP is 127.0.0.1.

    On Linux ray.init turns 127.0.0.1 (the node IP asked for, or a local GCS address such as 'auto' finds)
    into the LAN address, and a Ray started so listens on every interface (`::`).
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, the macOS/Windows default, is Ray's switch for a cluster of this
    machine alone, on loopback; Ray reads it once, at import, so it is set here for the block only (a later
    ray.init in this process may join a real cluster, which it leaves unchanged: a LAN address stays one).
    """
    from ray._private import ray_constants

    was = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = was


def _private_auth_token() -> None:
    """The token file a new local Ray authenticates with, mode 0600: created so when missing (Ray's own
    format, 64 hex digits), its mode narrowed when it is readable by others. Nothing to do when token
    auth is off (RAY_AUTH_MODE) or the token comes from RAY_AUTH_TOKEN."""
    import secrets

    if os.environ.get("RAY_AUTH_MODE", "token").lower() != "token" or os.environ.get("RAY_AUTH_TOKEN"):
        return
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    try:
        if not path.exists():
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
        elif path.stat().st_mode & 0o077:
            path.chmod(0o600)
    except FileExistsError:  # another run created it just now
        _private_auth_token()
    except OSError as err:  # not ours to change: Ray goes on with it as it is
        import warnings

        warnings.warn(f"Ray's auth token {path} may be readable by others: {err}", stacklevel=2)


def teacher_dir(cfg, log=None) -> Path:
    """The static teacher checkpoint: the configured one, or the embedded build (cached; `log`, a
    MetricsLog, gets the build's progress events for the monitor)."""
    if cfg.model.teacher == "embedded":
        from zeda_rl.teacher import build_teacher

        return Path(
            build_teacher(seed=cfg.model.teacher_seed, log=log, suite=cfg.data.tasks, name=cfg.model.embedded_teacher)
        )
    return Path(cfg.model.teacher)


def start_teachers(cfg, teacher: Path, pad_id: int):
    """Only the teacher engines, in a placement group of their own (the job needs nothing else)."""
    import ray
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from actors.teacher_pool import TeacherActor, TeacherPool

    t = cfg.teacher
    pg = placement_group([{"CPU": t.cpus, **({"GPU": t.gpus} if t.gpus else {})}] * t.replicas, strategy="PACK")
    ray.get(pg.ready(), timeout=600)
    kw = engine_kwargs(t)
    actors = [
        TeacherActor.options(
            num_cpus=t.cpus,
            num_gpus=t.gpus,
            scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i),
        ).remote(t.backend, str(teacher), t.threads, kw, pad_id=pad_id)
        for i in range(t.replicas)
    ]
    ray.get([a.health.remote() for a in actors])
    return TeacherPool(actors), pg
