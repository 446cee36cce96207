"""Stage 2, on-policy distillation: the student samples, the teacher scores, the learner trains.

A sample's path: `launch.admission` picks the prompts and the engine; the rollout actor samples
(behaviour logprobs, routed expert ids, the policy version it served); a teacher actor scores
the sampled tokens and PUSHes the packed batch straight to the learner's inbox on rank 0
(`learner.inbox`); when every sample of a step is back, the driver names their ids and the
learner trains on them, the advantage recomputed under the current student (AsyncOPD). Every
`sync_every` steps the new weights go to the engines (`launch.fleet.WeightSync`): the learner
ranks publish them and the engines switch between generation calls. The driver handles ids,
versions and references, never trajectories or weights.
"""

from __future__ import annotations

import time

import ray

from actors.rollout import VersionWaitTimeout
from launch.admission import Admission
from launch.config import RunConfig
from launch.fleet import Resync, WeightSync, probe_rollouts, serve_final, settle, teacher_selftest
from launch.probe import snapshot_dir
from launch.runlog import console, log_first_row, log_step
from launch.streams import RunData
from zeda_rl.metrics import MetricsLog


def opd_phase(
    cfg: RunConfig,
    rollouts: list,
    teachers,
    learner,
    data: RunData,
    log: MetricsLog,
    version: int = 0,
    start: int = 0,
    prompts_at: int = 0,
    reissue: list[int] | None = None,
    skipped: int = 0,
) -> tuple[int, list]:
    """Train opd.steps steps from step `start` (prompt stream at `prompts_at`); returns the final policy version
    and the rollout engines that serve it (`launch.fleet.serve_final`: the ones the evaluation may sample from).

    The checkpoint's cursor is the training frontier: the prompts admitted for later steps and in flight
    when it was written (`reissue`, stream positions) are admitted again first, under their own sample ids,
    so each prompt is trained once in the model's lineage, long answers as much as short ones. A cursor
    from before it recorded them (`skipped` samples in flight, no positions) skips them, counted as dropped
    (resume_skipped), so every sample id stays accounted for.
    """
    o = cfg.opd
    window = o.max_staleness * o.sync_every + 1 if o.asynchronous else 1
    adm = Admission(o.prompts_per_step, o.samples_per_prompt, window, len(rollouts), o.rollout_batch, start, o.steps)
    if skipped:  # admitted by the run that wrote the checkpoint, never trained in this lineage
        adm.admitted += skipped
        adm.dropped["resume_skipped"] += skipped
    data.opd.seek(prompts_at)
    data.opd.reissue(reissue or [])
    params = cfg.sampling.model_copy(update={"stop_token_ids": data.format.stop_ids})
    sync = WeightSync(learner, rollouts, log, o.weight_sync, o.weight_sync_timeout_s)
    resync = Resync(sync)
    acks, probe = {}, data.opd.ids[:4]  # acks: ref -> engine; probe: fixed sequences showing the weights served
    _push(sync, version, acks)
    _applied(acks, log, start, resync, wait=True)
    if start == 0:
        teacher_selftest(teachers.actors, probe, o.teacher_selftest_repeats, o.teacher_selftest_tol, log)
    probe_rollouts(rollouts, probe, log, version)
    if o.probe_every and start == 0:  # the student as SFT left it: the probe's step 0
        learner.export_hf(snapshot_dir(cfg.run_dir, 0))
    log.log("driver", "progress_started", time.time())  # the monitor's ETA: steps done since `start`, over time
    log.log("driver", "progress_base", start)
    step, seed, gauges = start, cfg.seed * 100_003 + start * 1_000, None
    while step < o.steps:
        seed = _admit(adm, step, data, rollouts, teachers, params, seed, resync, version, o)
        _collect(adm, log, resync, learner, rollouts)
        _expire(adm, log, resync, learner, rollouts, teachers, o.call_timeout_s)
        learner.check()  # a dead learner rank ends the run now, not when the next step needs it
        resync.poll()
        _applied(acks, log, step, resync)
        now = (adm.waiting(), len(adm.pending))
        if now != gauges:  # logged on change: the loop turns about 20 times a second, for days on a real run
            gauges = now
            log.log("driver", "queue_depth", now[0], step)
            log.log("driver", "inflight_samples", now[1], step)
        ids = adm.ready(step)
        if ids is None:
            continue
        bump = int((step + 1) % o.sync_every == 0)
        owed = {i // o.samples_per_prompt for i in adm.outstanding()} - {i // o.samples_per_prompt for i in ids}
        owed |= set(data.opd.pending())  # given back by an earlier resume and not admitted yet
        cursor = {
            "stage": "opd",
            "step": step + 1,
            "version": version + bump,
            "prompts": data.opd.position,
            "inflight": len(owed) * o.samples_per_prompt,
            "reissue": sorted(owed),
        }  # admitted for later steps, or still owed from a resume: admitted again if resumed here
        metrics, report = learner.train_from_inbox(
            o, ids, version, o.max_staleness, cursor, replay=o.routing_replay, first_row=step == start
        )
        adm.trained_step(step, report)
        _log_inbox(log, adm, report, step, resync, len(rollouts))
        if metrics is None:  # none of the step's samples could be trained: admit the step again (a few times)
            adm.refill(step, report)
            continue
        metrics.update(staleness_mean=report["staleness_mean"], staleness_max=report["staleness_max"])
        step += 1
        log.log("driver", "trained_prompts", sorted({i // o.samples_per_prompt for i in report["trained"]}), step)
        log.log("driver", "trained_ids", sorted(report["trained"]), step)
        log.log("driver", "trained_response_tokens", dict(zip(report["trained"], report["response_tokens"])), step)
        log_step(log, metrics, step, o.steps)
        if o.probe_every and (step % o.probe_every == 0 or step == o.steps):
            learner.export_hf(snapshot_dir(cfg.run_dir, step))
        if bump:
            version += 1
            _push(sync, version, acks)
            if not o.asynchronous:
                _applied(acks, log, step, resync, wait=True)
    return _finish(cfg, adm, learner, rollouts, sync, acks, probe, log, version, step, owed=data.opd.pending())


def _admit(adm: Admission, step, data, rollouts, teachers, params, seed, resync, version: int, o) -> int:
    """Start every generation call the window and the engines have room for; returns the last seed used. Nothing is
    started while every teacher is down (restarting): the loop goes on collecting what returns instead of waiting in a
    submit. The teachers are looked at only when a call is due (the loop turns about 20 times a second).

    Each call waits in its engine for `version`, the last one pushed: with the window, that is
    what keeps every sample within `max_staleness` versions of the step that trains it."""
    while (nxt := adm.next_call(step, usable=lambda i: i not in resync.owed)) is not None and teachers.available():
        engine, n = nxt
        prompts, positions = data.opd.take(n)
        seed += 1
        ids = adm.sample_ids(positions)
        gen = rollouts[engine].generate.remote(
            [p for p in prompts for _ in range(adm.spp)],
            params.model_copy(update={"seed": seed}),
            ids,
            version,
            o.weight_sync_timeout_s,
        )
        adm.submitted(
            teachers.submit(
                "score_and_push", gen, o.teacher_temperature, top_k=o.teacher_top_k if o.objective == "full_kl" else 0
            ),
            engine,
            step,
            positions,
            source=gen,
        )
    return seed


def _collect(adm: Admission, log: MetricsLog, resync: Resync, learner, rollouts, timeout_s: float = 0.05) -> None:
    """Account for the calls that returned: their samples are on the learner's socket, or lost (and then dropped by
    the inbox should they come after all: a teacher may have sent them before it died). Only a failure of the rollout
    engine itself makes it owed the weights (`_engine_at_fault`): a resync is a full push through Ray, and after one
    the weights go through Ray for the rest of the run (`WeightSync.engine_lost`)."""
    calls = list(adm.calls)
    if not calls:  # nothing to wait on (every engine owed a resync, say): the loop must not spin
        time.sleep(timeout_s)
        return
    ready, _ = ray.wait(calls, num_returns=len(calls), timeout=timeout_s)
    for ref in ready:
        try:
            r = ray.get(ref)
        except ray.exceptions.RayError as err:
            call = adm.failed(ref, "engine_failure")
            learner.inbox_discard(call.sample_ids)
            if _engine_at_fault(err, rollouts[call.engine]):  # dead (Ray restarts it) or never served the push
                resync.mark([call.engine])
                where = f"rollout engine {call.engine}"
            else:
                where = "teacher or task"
            log.log("driver", "actor_restart", f"{where}: {str(err)[:200]}")
            console.print(f"[yellow]OPD call failed ({where}), its samples dropped: {str(err)[:300]}")
            continue
        if not r["sent"]:  # the learner's inbox stayed full past the push timeout
            learner.inbox_discard(adm.failed(ref, "backpressure").sample_ids)
            log.log("driver", "dropped_backpressure", adm.dropped["backpressure"])
            continue
        adm.finished(ref)
        log.log("teacher", "tokens", r["tokens"])
        log.log("rollout", "tokens", r.get("output_tokens", r["tokens"]))


def _engine_at_fault(err: Exception, engine) -> bool:
    """Whether a failed call may have lost its rollout engine the weights: the engine died or was restarting (the error
    names its actor, also when it reaches the driver through the teacher call that took the generation as its
    argument), its generation waited in vain for the version pushed last, or an actor or object was lost and the error
    names no actor (assumed the engine's: a needless resync costs one push, a missed one serves stale weights). A
    teacher's death (the error names the teacher) or a task error leaves the engine serving the current weights."""
    if isinstance(err, VersionWaitTimeout):
        return True
    named = getattr(err, "actor_id", None)
    if named is not None:
        return named == engine._actor_id.hex()
    return isinstance(err, (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError))


def _expire(adm: Admission, log: MetricsLog, resync: Resync, learner, rollouts, teachers, timeout_s: float) -> None:
    """Give up the calls older than `timeout_s` (`opd.call_timeout_s`): an engine alive but never answering (a wedged
    request) held its step forever with every health check green. The engine holding the call is killed, the
    rollout engine if its generation has not returned, else the teacher scoring it: Ray restarts either, a
    rollout engine then owed the weights. The call's samples are dropped (`timeout`) and its step admits others."""
    for ref in adm.overdue(timeout_s):
        call = adm.calls[ref]
        gen_done = call.source is None or bool(ray.wait([call.source], timeout=0)[0])
        culprit = teachers.holder(ref) if gen_done else rollouts[call.engine]
        learner.inbox_discard(adm.failed(ref, "timeout").sample_ids)
        where = "teacher" if gen_done else f"rollout engine {call.engine}"
        log.log("driver", "call_timeout", f"{where}: no answer in {timeout_s:.0f} s, killed (Ray restarts it)")
        console.print(f"[yellow]OPD: a call on {where} ran past opd.call_timeout_s ({timeout_s:.0f} s); restarting it")
        if culprit is not None:
            ray.kill(culprit, no_restart=False)
        if not gen_done:
            resync.mark([call.engine])


def _push(sync: WeightSync, version: int, acks: dict) -> None:
    """Push `version` to every engine, its acks recorded in `acks` (ref -> engine index) for `_applied`."""
    acks.update(zip(sync.push(version), range(len(sync.rollouts))))


def _applied(acks: dict, log: MetricsLog, step: int, resync: Resync | None = None, wait: bool = False) -> None:
    """Log the weight pushes the engines have applied, taking them out of `acks` (ref -> engine). An engine whose
    push failed (it died, or refused a bucket) is owed the weights now, rather than after its next call has waited
    `opd.weight_sync_timeout_s` for a version it will never serve."""
    if not acks:
        return
    done = list(acks) if wait else ray.wait(list(acks), num_returns=len(acks), timeout=0)[0]
    results = [(acks.pop(ack), settle([ack], log)) for ack in done]
    for engine, served in results:
        if served:
            log.log("rollout", "served_version", served[0], step)
    later = set(acks.values()) | {e for e, served in results if served}  # a newer push still coming, or applied
    owed = {e for e, served in results if not served} - later
    if owed and resync is not None:
        resync.mark(owed)


def _log_inbox(log: MetricsLog, adm: Admission, report: dict, step: int, resync: Resync, engines: int) -> None:
    if report["unsynced"]:  # an engine restarted unseen: the rows do not say which, so resync them all
        resync.mark(range(engines))
    if report["stale"]:
        log.log("driver", "dropped_stale", adm.dropped["stale"], step)
    if report["missing"]:  # not back after the inbox's wait: lost on the way, or the inbox is stuck
        log.log("driver", "dropped_missing", adm.dropped["missing"], step)
    if "first_row" in report:
        log_first_row(log, "opd", report["first_row"]["tokens"], report["first_row"]["loss_mask"])


def _finish(
    cfg,
    adm: Admission,
    learner,
    rollouts,
    sync: WeightSync,
    acks,
    probe,
    log: MetricsLog,
    version: int,
    step: int,
    owed: list[int] = (),
) -> tuple[int, list]:
    """Let the last calls finish (no actor left mid-call), give every engine the final weights, account for every sample;
    returns the final version and the engines that serve it."""
    for ref in list(adm.calls):
        try:
            ray.get(ref, timeout=cfg.opd.call_timeout_s)  # a wedged call must not hold the run's end forever
            adm.finished(ref)
        except ray.exceptions.RayError:  # GetTimeoutError included
            adm.failed(ref, "engine_failure")
    if step % cfg.opd.sync_every:
        version += 1
        _push(sync, version, acks)
    _applied(acks, log, step, wait=True)
    serving = serve_final(sync, rollouts, version, log)  # the evaluation samples from these engines next
    probe_rollouts(serving, probe, log, version)
    left = adm.outstanding()  # only if the phase ended early: admitted, never trained
    if left:
        learner.inbox_discard(left)
        adm.dropped["phase_ended"] += len(left)
    if owed:  # prompts given back by a resume and never admitted again (opd.steps lowered since)
        adm.admitted += len(owed) * cfg.opd.samples_per_prompt
        adm.dropped["phase_ended"] += len(owed) * cfg.opd.samples_per_prompt
    summary = adm.summary()
    log.log("driver", "dropped_stale", adm.dropped["stale"], step)
    inbox = learner.inbox_stats()
    log.log("driver", "dropped_malformed", inbox["dropped_malformed"], step)
    log.log("driver", "malformed_reasons", inbox.get("malformed_reasons", {}), step)
    log.log("driver", "admission", summary, step)
    console.print(
        f"OPD samples: {summary['admitted']} admitted, {summary['trained']} trained, dropped {summary['dropped']}; "
        f"engine utilisation {', '.join(f'{100 * u:.0f}%' for u in summary['engine_utilisation'])}"
    )
    return version, serving
