"""The ZEDA pipeline as one readable function: teacher -> convert -> SFT -> OPD -> export -> eval.

A token's path: a prompt is tokenized here, sampled by a RolloutActor (policy version
v, behaviour logprobs, routed experts), scored by a TeacherActor, pushed over ZMQ to
this process's learner inbox, trained on by the Megatron learner ranks, and every
`sync_every` steps the new weights go back to the rollout actors in versioned buckets.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import ray
from rich.console import Console

from launch import streams
from launch.config import RunConfig
from launch.streams import RunData
from zeda_rl.metrics import MetricsLog
from zeda_rl.trajectory import concat_batches, num_rows, take_rows

console = Console()


class Phases:
    """Wall time per phase, logged and shown as the run goes."""

    def __init__(self, log: MetricsLog):
        self.log, self.times = log, {}

    @contextmanager
    def __call__(self, name: str):
        console.rule(f"[bold]{name}")
        self.log.log("driver", "phase", name)
        t0 = time.time()
        yield
        self.times[name] = time.time() - t0
        self.log.log("driver", f"phase_seconds/{name}", self.times[name])
        console.print(f"[green]{name} done in {self.times[name]:.1f}s")


def prepare_checkpoints(cfg: RunConfig, phases: Phases) -> tuple[Path, Path]:
    from zeda_rl.convert import convert_checkpoint

    with phases("teacher"):
        from launch.rollouts import teacher_dir

        teacher = teacher_dir(cfg)
        console.print(f"teacher: {teacher}")
    with phases("convert"):
        n = _num_experts(teacher)
        nz = cfg.model.zero_experts or n // 2
        student = convert_checkpoint(
            teacher, cfg.run_dir / "student-init", zero_experts=nz, zero_type=cfg.model.zero_type,
            seed=cfg.model.convert_seed, overwrite=True,
        )
        console.print(f"student: {student} (N={n}, N_Z={nz})")
    return teacher, Path(student)


def _num_experts(checkpoint: Path) -> int:
    from zeda_rl.arch import spec_for

    raw = json.loads((checkpoint / "config.json").read_text())
    return spec_for(raw, str(checkpoint / "config.json")).num_experts(raw)


class Inbox:
    """The learner's end of the ZMQ data plane: a bound PULL socket plus a row buffer."""

    def __init__(self, bind_host: str, log: MetricsLog, port: int = 0):
        from zeda_rl.transport import Puller

        host = ray.util.get_node_ip_address() if bind_host == "auto" else bind_host
        self.puller = Puller(f"tcp://{host}:{port}")
        self.endpoint = self.puller.endpoint
        self.rows: list[dict] = []  # packed batches not yet consumed
        self.log = log

    def drain(self, timeout_s: float = 0.0) -> int:
        """Move every batch waiting on the socket into the buffer; returns rows received."""
        got = 0
        batch = self.puller.recv(timeout_s=timeout_s)
        while batch is not None:
            arrays = {k: np.array(v) for k, v in batch.arrays.items()}
            self.rows.append(arrays)
            got += int(arrays["tokens"].shape[0])
            batch = self.puller.recv(timeout_s=0)
        return got

    def size(self) -> int:
        return sum(int(b["tokens"].shape[0]) for b in self.rows)

    def take_all(self) -> dict[str, np.ndarray] | None:
        if not self.rows:
            return None
        out = concat_batches(self.rows)
        self.rows = []
        return out

    def dropped(self) -> int:
        return int(self.puller.dropped)


def sft_phase(cfg: RunConfig, teachers, learner, teacher: Path, data: RunData, log: MetricsLog, start: int = 0) -> None:
    """Stage 1: the teacher answers the training prompts (or data.sft_rollouts holds its answers); the
    student learns them (NLL + L_GA, loss on the answer tokens only).

    The teacher's answers stay in RUN_DIR/rollouts (reused while the teacher, prompts and sampling
    are the same), so a resumed run trains on the same data in the same shuffled order up to `start`.
    """
    if start >= cfg.sft.steps:
        return
    answers = data.sft_records if data.sft_records is not None else teacher_answers(cfg, teachers, data, teacher, log)
    rng = np.random.default_rng(cfg.seed)
    order = rng.permutation(num_rows(answers))
    cursor = 0
    log.log("driver", "progress_started", time.time())  # the monitor's ETA counts from here
    for step in range(cfg.sft.steps):
        if cursor + cfg.sft.batch_size > len(order):
            order, cursor = rng.permutation(num_rows(answers)), 0
        rows = order[cursor : cursor + cfg.sft.batch_size]
        cursor += cfg.sft.batch_size
        if step < start:  # resumed: this step is already in the learner's state
            continue
        batch = take_rows(answers, rows)
        if step == start:
            _log_first_row(log, "sft", batch)
        metrics = learner.train_step("sft", batch, {"stage": "sft", "step": step + 1})
        _log_step(log, metrics, step + 1, cfg.sft.steps)


def teacher_answers(cfg: RunConfig, teachers, data: RunData, teacher: Path, log: MetricsLog) -> dict[str, np.ndarray]:
    """The teacher engines answer data.sft_count prompts through the rollouts job (`zeda rollouts`'s
    code: RUN_DIR/rollouts, resumable), then SFT reads them back like released rollouts."""
    from launch import rollouts, streams

    out = cfg.run_dir / "rollouts"
    items = rollouts.plan(data.sft, data.sft_count)
    r = rollouts.write_rollouts(cfg, teachers, items, rollouts.sampling_params(cfg, data.format.eos_id), teacher, out, log)
    console.print(f"teacher answered {r['answered']} prompts in {r['seconds']:.1f}s ({r['already_done']} already in {out}, "
                  f"{r['truncated']} cut at max_new_tokens)")
    answers = streams.sft_records(cfg, data.format, data.dropped, source=str(out))
    for key in ("sft_rollouts", "sft_rollouts_cut_at_max_new_tokens"):
        if key in data.dropped:
            log.log("data", f"dropped_too_long/{key}", data.dropped[key])
    return answers


def _log_first_row(log: MetricsLog, stage: str, batch: dict) -> None:
    """The first row a stage trains on, tokens and loss mask (up to 4096 tokens): shows the template and mask at work."""
    n = min(int(batch["attention_mask"][0].sum()), 4096)
    log.log("driver", f"first_row/{stage}/tokens", [int(t) for t in batch["tokens"][0, :n]])
    log.log("driver", f"first_row/{stage}/loss_mask", [int(m) for m in batch["loss_mask"][0, :n]])


def _log_step(log: MetricsLog, metrics: dict, step: int, total: int) -> None:
    log.log_many("learner", metrics, step)
    log.log("learner", "step", step, step)
    log.log("learner", "step_done", 1, step)
    log.log("driver", "progress_done", step, step)
    log.log("driver", "progress_total", total, step)
    if step % 5 == 0 or step == total:
        z = metrics.get("zero_ratio", float("nan"))
        console.print(
            f"step {step}/{total} loss {metrics.get('loss', float('nan')):.4f} zero {100 * z:.1f}% "
            f"tok/s {metrics.get('tokens_per_s', 0):.0f}"
            + (f" rKL {metrics['reverse_kl']:.4f}" if "reverse_kl" in metrics else "")
        )


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


def opd_phase(
    cfg: RunConfig, rollouts: list, teachers, learner, inbox: Inbox, data: RunData, log: MetricsLog,
    version: int = 0, start: int = 0, prompts_at: int = 0,
) -> int:
    """Stage 2: on-policy distillation, asynchronous (or synchronous for comparison).

    The prompt stream's position goes into every step's data cursor (so into the learner's
    checkpoints); a run resumed at `prompts_at` takes the prompts after it. Prompts that were
    in flight when the checkpoint was written are skipped, not repeated.

    Admission control keeps at most `capacity` samples generated-but-untrained, so no
    sample can lag more than `max_staleness` policy versions in steady state (generating
    and then discarding would starve long samples); the few that still do are dropped
    and counted. The advantage is recomputed by the learner under the current student.
    """
    o = cfg.opd
    per_step = o.prompts_per_step * o.samples_per_prompt
    per_call = o.rollout_batch * o.samples_per_prompt
    # a sample admitted now is trained within capacity/per_step steps, which hold at most
    # max_staleness version bumps when that is max_staleness * sync_every + 1 steps
    capacity = per_step * (o.max_staleness * o.sync_every + 1) if o.asynchronous else per_step
    stream = data.opd
    stream.seek(prompts_at)
    params = {"temperature": cfg.sampling.temperature, "top_p": cfg.sampling.top_p,
              "max_new_tokens": cfg.sampling.max_new_tokens, "stop_token_ids": (data.format.eos_id,)}
    inflight: dict = {}  # score ref -> (actor index, samples)
    resync = Resync(rollouts, log)
    busy = [0] * len(rollouts)
    dropped_stale, dropped_backpressure, step, seed = 0, 0, start, cfg.seed * 100_003 + start * 1_000
    acks, frames = push_weights(learner, rollouts, version, log)
    settle(acks, log)
    acks = []
    probe = stream.ids[:4]  # fixed sequences whose logprobs show which weights the engines serve
    probe_rollouts(rollouts, probe, log, version)
    t_phase = time.time()
    log.log("driver", "progress_started", t_phase)

    def admit():
        nonlocal seed
        while sum(n for _, n in inflight.values()) + inbox.size() + per_call <= capacity:
            i = min(range(len(rollouts)), key=lambda j: busy[j])
            if busy[i] >= 2:  # two calls queued per actor keep it busy without hoarding prompts
                return
            prompts, ids = stream.take(o.rollout_batch)
            prompts = [p for p in prompts for _ in range(o.samples_per_prompt)]
            ids = [i2 * o.samples_per_prompt + k for i2 in ids for k in range(o.samples_per_prompt)]
            seed += 1
            gen = rollouts[i].generate.remote(prompts, {**params, "seed": seed}, ids)
            ref = teachers.submit("score_and_push", gen, cfg.sampling.temperature)
            inflight[ref] = (i, len(prompts))
            busy[i] += 1

    while step < o.steps:
        admit()
        # collect finished rollouts (their batches are already on the learner's socket)
        ready, _ = ray.wait(list(inflight), num_returns=len(inflight), timeout=0.05) if inflight else ([], [])
        for ref in ready:
            i, _n = inflight.pop(ref)
            busy[i] -= 1
            try:
                r = ray.get(ref)
                log.log("teacher", "tokens", r["tokens"])
                log.log("rollout", "tokens", r.get("output_tokens", r["tokens"]))
                if not r["sent"]:  # the learner's inbox stayed full past the push timeout
                    dropped_backpressure += r["samples"]
                    log.log("driver", "dropped_backpressure", dropped_backpressure, step)
            except ray.exceptions.RayError as err:  # a dead actor: Ray restarts it; its samples are lost
                log.log("driver", "actor_restart", str(err)[:200])
                console.print(f"[yellow]rollout/teacher failure, actor restarting: {str(err)[:300]}")
                # a restarted engine serves the weights it loaded at start (its samples carry
                # version -1 and are never trained on) until it is given the current ones
                resync.mark([i])
        resync.poll(frames)
        if acks:  # weight pushes the engines have applied (between their generation calls)
            applied, acks = ray.wait(acks, num_returns=len(acks), timeout=0)
            for v in settle(applied, log):
                log.log("rollout", "served_version", v, step)
        inbox.drain(timeout_s=0.0 if len(inbox.rows) else 0.05)
        log.log("driver", "queue_depth", inbox.size(), step)
        log.log("driver", "inflight_samples", sum(n for _, n in inflight.values()), step)
        if inbox.size() < per_step:
            continue
        data = inbox.take_all()
        # too old, or sampled by an engine that has not been given the learner's weights since it (re)started
        unsynced = data["policy_version"] < 0
        stale = (version - data["policy_version"] > o.max_staleness) | unsynced
        if unsynced.any():  # some engine restarted unseen: which one the rows do not say, so resync them all
            resync.mark(range(len(rollouts)))
        if stale.any():
            dropped_stale += int(stale.sum())
            log.log("driver", "dropped_stale", dropped_stale, step)
        keep = np.flatnonzero(~stale)
        if len(keep) < per_step:  # put back what is still fresh and wait for more
            if len(keep):
                inbox.rows.append(take_rows(data, keep))
            continue
        batch, rest = take_rows(data, keep[:per_step]), keep[per_step:]
        if len(rest):
            inbox.rows.append(take_rows(data, rest))
        if not o.routing_replay:
            batch.pop("routed_experts", None)
        lag = version - batch["policy_version"]
        if step == start:
            _log_first_row(log, "opd", batch)
        cursor = {"stage": "opd", "step": step + 1, "version": version + int((step + 1) % o.sync_every == 0), "prompts": stream.position}
        metrics = learner.train_step("opd", batch, cursor)
        metrics.update(staleness_mean=float(lag.mean()), staleness_max=int(lag.max()))
        step += 1
        log.log("driver", "trained_prompts", sorted({int(i) // o.samples_per_prompt for i in batch["sample_ids"]}), step)
        _log_step(log, metrics, step, o.steps)
        log.log("driver", "dropped_malformed", inbox.dropped(), step)
        if step % o.sync_every == 0:
            version += 1
            new_acks, frames = push_weights(learner, rollouts, version, log)
            acks += new_acks
            if not o.asynchronous:
                for v in settle(acks, log):
                    log.log("rollout", "served_version", v, step)
                acks = []
    # let the last rollouts finish so no actor is left mid-call, then make sure every engine serves the final weights
    for ref in list(inflight):
        try:
            ray.get(ref)
        except ray.exceptions.RayError:
            pass
    if step % o.sync_every:
        version += 1
        new_acks, frames = push_weights(learner, rollouts, version, log)
        acks += new_acks
    for v in settle(acks, log):
        log.log("rollout", "served_version", v, step)
    probe_rollouts(rollouts, probe, log, version)
    inbox.drain(timeout_s=0.5)
    inbox.take_all()
    log.log("driver", "dropped_stale", dropped_stale, step)
    return version


def evaluate_phase(cfg: RunConfig, teacher_dir: Path, student_dir: Path, data: RunData, log: MetricsLog,
                   engines: dict | None = None) -> tuple[dict, dict]:
    """Teacher and student on the benchmark suite (eval.suite), else on the built-in tasks, which only
    mean something with the embedded tokenizer.

    A suite runs on the run's own engines (`engines`: the teacher actors for the teacher, the rollout
    actors, which serve the final weights, for the student), so it costs no new GPUs; its Table-1
    report goes to RUN_DIR/eval. With a real tokenizer and no suite the accuracy eval is skipped
    (said in the report); the student's zero-expert share is still measured, teacher-forced over
    the first OPD prompts as the chat template renders them.
    """
    from zeda_rl.evaluate import evaluate, load, routed_zero_ratio

    if cfg.eval.suite:
        return _suite_eval(cfg, teacher_dir, student_dir, log, engines or {})
    if not data.format.templated:
        teacher_eval = evaluate(teacher_dir, n_per_family=cfg.eval.n_per_family)
        student_eval = evaluate(student_dir, n_per_family=cfg.eval.n_per_family)
        log.log("eval", "teacher_accuracy", teacher_eval["accuracy"]["mean"])
        log.log("eval", "student_accuracy", student_eval["accuracy"]["mean"])
    else:
        reason = ("the teacher's tokenizer has a chat template, so the built-in tasks (the embedded tokenizer's plain "
                  "prompts) would not measure it; set eval.suite for benchmark accuracy")
        console.print(f"[yellow]accuracy eval skipped: {reason}")
        log.log("eval", "skipped", reason)
        model, tok = load(student_dir)
        texts = [data.format.prompt_text(r) for r in data.opd.records[: cfg.eval.n_per_family]]
        zr = routed_zero_ratio(model, tok, texts)
        zr["note"] = f"teacher-forced over {len(texts)} OPD prompts (no completions)"
        teacher_eval = {"checkpoint": str(teacher_dir), "accuracy": {}, "skipped": reason,
                        "zero_ratio": {"overall": 0.0, "per_layer": [0.0] * len(zr["per_layer"]), "note": "static model"}}
        student_eval = {"checkpoint": str(student_dir), "accuracy": {}, "skipped": reason, "zero_ratio": zr}
    log.log("eval", "student_zero_ratio", student_eval["zero_ratio"]["overall"])
    return teacher_eval, student_eval


def _suite_eval(cfg: RunConfig, teacher_dir: Path, student_dir: Path, log: MetricsLog, engines: dict) -> tuple[dict, dict]:
    """eval.suite on the run's engines; returned in the report's shape (accuracy per benchmark, mean, r_ZE)."""
    from actors.eval_pool import EvalEngines
    from zeda_rl.suites import load_suite, run_suite, write_outputs

    suite = load_suite(cfg.eval.suite)
    runs = {}
    for who, ckpt in (("teacher", teacher_dir), ("student", student_dir)):
        with EvalEngines.over(engines[who], batch_size=suite.batch_size) as gen:
            runs[who] = run_suite(ckpt, suite, gen, progress=lambda m, who=who: console.print(f"eval {who}: {m}"))
    files = write_outputs(cfg.run_dir / "eval", runs["student"], runs["teacher"])
    console.print(f"benchmark report: {files['markdown']}")
    out = []
    for who in ("teacher", "student"):
        r = runs[who]
        per_layer = [sum(b["r_ze"]["per_layer"][i] for b in r["benchmarks"]) / len(r["benchmarks"])
                     for i in range(len(r["benchmarks"][0]["r_ze"]["per_layer"]))]
        acc = {b["name"]: b["accuracy"] for b in r["benchmarks"]} | {"mean": r["average"]["accuracy"]}
        log.log("eval", f"{who}_accuracy", acc["mean"])
        out.append({"checkpoint": str(r["checkpoint"]), "accuracy": acc, "suite": suite.name,
                    "zero_ratio": {"overall": r["average"]["r_ze"], "per_layer": per_layer, "note": "per request, over the suite"}})
    log.log("eval", "student_zero_ratio", out[1]["zero_ratio"]["overall"])
    return out[0], out[1]


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

    def kwargs(e):
        kw = dict(e.engine_kwargs)
        if e.backend == "torch":
            kw["dtype"] = e.dtype
        return kw

    rollouts = [
        RolloutActor.options(**opts(cfg.rollout, i)).remote(cfg.rollout.backend, str(student_dir), cfg.rollout.threads, kwargs(cfg.rollout))
        for i in range(cfg.rollout.replicas)
    ]
    base = cfg.rollout.replicas
    teachers = [
        TeacherActor.options(**opts(cfg.teacher, base + i)).remote(
            cfg.teacher.backend, str(teacher_dir), cfg.teacher.threads, kwargs(cfg.teacher), learner_endpoint=endpoint, pad_id=pad_id
        )
        for i in range(cfg.teacher.replicas)
    ]
    ray.get([a.health.remote() for a in rollouts + teachers])
    return rollouts, TeacherPool(teachers), pg


def _resume_point(cfg: RunConfig) -> Path:
    from learner.checkpoint import latest

    ckpt = latest(cfg.run_dir / "learner")
    if ckpt is None:
        raise FileNotFoundError(f"--resume: no learner checkpoint under {cfg.run_dir / 'learner'}")
    console.print(f"resuming from {ckpt}")
    return ckpt


def _save(cfg: RunConfig, learner) -> None:
    """A learner checkpoint at each phase end (and every learner.checkpoint_every steps, by the learner)."""
    step = learner.state()["step"]
    learner.save(cfg.run_dir / "learner" / f"step_{step:08d}")


def connect_ray(cfg: RunConfig) -> None:
    """Join the job's cluster (under `ray job submit`, RAY_ADDRESS names it), the configured
    one, or start a private local Ray sized by cluster.num_cpus."""
    if ray.is_initialized():
        return
    address = cfg.cluster.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:  # "local": never attach to some other Ray that happens to run on this machine
        ray.init(address="local", num_cpus=cfg.cluster.num_cpus, include_dashboard=False, log_to_driver=True)


def run(cfg: RunConfig, resume: bool = False) -> dict:
    """The whole pipeline; returns the report's numbers.

    Whatever ends it (an error, Ctrl-C, `ray job stop`'s SIGTERM), the learner ranks and
    sockets are closed and the run's last phase event says how it ended.
    """
    from transformers import AutoTokenizer

    from launch.health import Health
    from launch.metrics_hub import start_hub
    from launch.report import write_report
    from learner.group import LearnerGroup

    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    (cfg.run_dir / "config.json").write_text(cfg.model_dump_json(indent=2))
    if not resume:  # a fresh run of the same name: its report must not count the last one's events
        (cfg.run_dir / "metrics.jsonl").unlink(missing_ok=True)
    log = MetricsLog(cfg.run_dir / "metrics.jsonl")
    phases = Phases(log)
    t_start = time.time()
    console.print(f"run directory: {cfg.run_dir.resolve()}")
    learner = inbox = hub = health = None
    ending = "failed"
    try:
        teacher_dir, student_dir = prepare_checkpoints(cfg, phases)
        tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
        data = streams.build(cfg, tokenizer, log)  # before anything starts: bad data fails in seconds
        if cfg.eval.suite:  # and a bad benchmark suite too
            from zeda_rl.suites import load_suite

            load_suite(cfg.eval.suite)
        console.print(f"data: {len(data.opd.ids)} OPD prompts, SFT "
                      + (f"{num_rows(data.sft_records)} given answers" if data.sft_records is not None else f"{data.sft_count} prompts")
                      + f", chat template {'on' if data.format.templated else 'off'}; dropped as too long: {data.dropped}")

        with phases("start"):
            connect_ray(cfg)
            hub = start_hub(cfg.name, log)
            inbox = Inbox(cfg.cluster.bind_host, log, cfg.cluster.inbox_port)
            ckpt = _resume_point(cfg) if resume else None
            learner = LearnerGroup.from_run_config(cfg, student_dir, resume=ckpt)
            cursor = (learner.state().get("data_cursor") or {}) if ckpt else {}
            rollouts, teachers, _pg = start_actors(cfg, teacher_dir, student_dir, inbox.endpoint, tokenizer.pad_token_id or 0)
            health = Health({"rollout": rollouts, "teacher": teachers.actors, "learner": learner.actors}, log).start()

        in_opd = cursor.get("stage") == "opd"
        with phases("sft"):
            sft_phase(cfg, teachers, learner, teacher_dir, data, log, start=cfg.sft.steps if in_opd else cursor.get("step", 0))
            _save(cfg, learner)
        with phases("opd"):
            version = opd_phase(cfg, rollouts, teachers, learner, inbox, data, log, version=cursor.get("version", 0) if in_opd else 0,
                                start=cursor.get("step", 0) if in_opd else 0, prompts_at=cursor.get("prompts", 0) if in_opd else 0)
            _save(cfg, learner)
        with phases("export"):
            final = learner.export_hf(cfg.run_dir / "student")
        with phases("eval"):
            teacher_eval, student_eval = evaluate_phase(cfg, teacher_dir, final, data, log,
                                                        engines={"teacher": teachers.actors, "student": rollouts})
        phases.times["total"] = time.time() - t_start
        result = write_report(cfg, teacher_eval, student_eval, phases.times, cfg.run_dir / "metrics.jsonl", final_version=version)
        ending = "finished"
        return result
    except (KeyboardInterrupt, SystemExit):
        ending = "stopped"
        console.print("[yellow]stopped: shutting the learner and actors down")
        raise
    finally:  # the ending first: `ray job stop` allows a few seconds before SIGKILL
        log.log("driver", "phase", ending)
        if hub is not None:
            hub.close(timeout_s=1.0 if ending == "stopped" else 5.0)
        if health is not None:
            health.stop()
        if learner is not None:
            learner.shutdown()
        if inbox is not None:
            inbox.puller.close()
        log.close()
