"""The ZEDA pipeline, the whole story in one function: teacher -> convert -> SFT -> OPD -> export -> eval.

A token's path: a prompt from the run's data (`launch.streams`, through the chat template) is
sampled by a rollout actor (policy version v, behaviour logprobs, routed experts), scored by a
teacher actor, pushed over ZMQ to the learner's inbox on rank 0, trained on by the Megatron
learner ranks, and every `sync_every` steps the new weights go back to the rollout actors in
versioned buckets. The stages live in `launch.sft`, `launch.opd` and `launch.evaluation`, the
engines in `launch.fleet`, admission control in `launch.admission`.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

from launch import streams
from launch.checkpoints import prepare_checkpoints
from launch.config import RunConfig
from launch.evaluation import evaluate_phase
from launch.fleet import connect_ray, start_actors
from launch.opd import opd_phase
from launch.probe import probe_phase
from launch.runlog import Phases, console
from launch.sft import sft_phase
from learner.ranks import RankLost
from zeda_rl.metrics import MetricsLog


def run(cfg: RunConfig, resume: bool = False) -> dict:
    """The whole pipeline; returns the report's numbers.

    Whatever ends it (an error, Ctrl-C, `ray job stop`'s SIGTERM), the learner ranks and
    sockets are closed and the run's last phase event says how it ended.
    """

    from launch.health import Health
    from launch.metrics_hub import start_hub
    from launch.report import write_report
    from learner.actor import LearnerGroup

    # before anything starts or is written: a missing checkpoint is known now, not hours later
    ckpt = _resume_point(cfg) if resume else None
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    (cfg.run_dir / "config.json").write_text(cfg.model_dump_json(indent=2))
    if not resume:  # a fresh run of the same name: its report must not count the last one's events
        (cfg.run_dir / "metrics.jsonl").unlink(missing_ok=True)
    log = MetricsLog(cfg.run_dir / "metrics.jsonl")
    log.log("driver", "driver_started", {"resume": bool(ckpt)})  # where this driver's events begin (the report)
    phases = Phases(log)
    t_start = time.time()
    console.print(f"run directory: {cfg.run_dir.resolve()}")
    learner = hub = health = None
    ending = "failed"
    try:
        teacher_dir, student_dir = prepare_checkpoints(cfg, phases)
        data = prepare_data(cfg, teacher_dir, log)

        with phases("start"):
            connect_ray(cfg)
            hub = start_hub(cfg.name, log)
            from learner.checkpoint import clean_partial

            left = clean_partial(cfg.run_dir / "learner")  # a killed run's half-written saves
            if left:
                console.print(
                    f"removed {len(left)} unfinished checkpoint write(s) of an earlier run: {', '.join(left)}"
                )
            learner = LearnerGroup.from_run_config(cfg, student_dir, resume=ckpt)
            run_id = f"{cfg.name}-{uuid.uuid4().hex[:12]}"  # new for each driver: a killed one's batches are refused
            endpoint = learner.open_inbox(cfg.cluster.bind_host, cfg.cluster.inbox_port, run=run_id)
            cursor = (learner.state().get("data_cursor") or {}) if ckpt else {}
            if ckpt:
                log.log("driver", "resumed", {"from": str(ckpt), "learner_step": learner.state()["step"], **cursor})
            pad = data.format.tokenizer.pad_token_id or 0
            rollouts, teachers, _pg = start_actors(cfg, teacher_dir, student_dir, endpoint, pad, run=run_id)
            health = Health(
                {"rollout": rollouts, "teacher": teachers.actors, "learner": learner.actors},
                log,
                no_restarts=("learner",),
            ).start()

        in_opd = cursor.get("stage") == "opd"
        with phases("sft"):
            sft_phase(
                cfg, teachers, learner, teacher_dir, data, log, start=cfg.sft.steps if in_opd else cursor.get("step", 0)
            )
            _save(cfg, learner)
        with phases("opd"):
            at = cursor if in_opd else {}
            version, serving = opd_phase(
                cfg,
                rollouts,
                teachers,
                learner,
                data,
                log,
                version=at.get("version", 0),
                start=at.get("step", 0),
                prompts_at=at.get("prompts", 0),
                reissue=at.get("reissue"),
                skipped=0 if "reissue" in at else at.get("inflight", 0),  # a cursor of an earlier version
            )
            _save(cfg, learner)
        if cfg.opd.probe_every:
            with phases("probe"):
                probe_phase(cfg, teacher_dir, log)
        with phases("export"):
            final = learner.export_hf(cfg.run_dir / "student")
        with phases("eval"):
            teacher_eval, student_eval = evaluate_phase(
                cfg, teacher_dir, final, data, log, engines={"teacher": teachers.actors, "student": serving}
            )
        phases.times["total"] = time.time() - t_start
        result = write_report(
            cfg, teacher_eval, student_eval, phases.times, cfg.run_dir / "metrics.jsonl", final_version=version
        )
        ending = "finished"
        return result
    except (KeyboardInterrupt, SystemExit):
        ending = "stopped"
        console.print("[yellow]stopped: shutting the learner and actors down")
        raise
    except RankLost as err:
        raise RankLost(err.ranks, err.world_size, err.what, f"{err.cause}. {_resume_hint(cfg, log, err)}") from err
    finally:  # the ending first: `ray job stop` allows a few seconds before SIGKILL
        log.log("driver", "phase", ending)
        if hub is not None:
            hub.close(timeout_s=1.0 if ending == "stopped" else 5.0)
        if health is not None:
            health.stop()
        if learner is not None:
            learner.shutdown()
        log.close()


def prepare_data(cfg: RunConfig, teacher: Path, log: MetricsLog) -> streams.RunData:
    """The run's data, checked and tokenized before anything starts: bad data (or suite) fails in seconds."""
    from transformers import AutoTokenizer

    data = streams.build(cfg, AutoTokenizer.from_pretrained(teacher), log)
    if cfg.eval.suite:
        from zeda_rl.suites import load_suite

        load_suite(cfg.eval.suite)
    console.print(
        f"data: {len(data.opd.ids)} OPD prompts, SFT "
        + (f"{len(data.sft_records)} given answers" if data.sft_records is not None else f"{data.sft_count} prompts")
        + f", chat template {'on' if data.format.templated else 'off'}; dropped as too long: {data.dropped}"
    )
    return data


def _resume_hint(cfg: RunConfig, log: MetricsLog, err) -> str:
    """Where a run that lost a learner rank can go on from: its last complete checkpoint."""
    from learner.checkpoint import latest, read_meta

    ckpt = latest(cfg.run_dir / "learner")
    step = read_meta(ckpt)["step"] if ckpt is not None else None
    log.log(
        "driver",
        "learner_lost",
        {"ranks": err.ranks, "during": err.what, "resume_from": str(ckpt) if ckpt else None, "resume_step": step},
    )
    if ckpt is None:
        return "The run stopped with no learner checkpoint to resume from (learner.checkpoint_every saves them during a phase)"
    return f"The run stopped; `zeda train --resume` goes on from {ckpt} (learner step {step})"


def _resume_point(cfg: RunConfig) -> Path:
    from learner.checkpoint import latest, read_meta

    ckpt = latest(cfg.run_dir / "learner")
    if ckpt is None:
        raise FileNotFoundError(
            f"--resume: no learner checkpoint under {cfg.run_dir / 'learner'} (a run writes one at each phase end and "
            "every learner.checkpoint_every steps); start without --resume"
        )
    meta = read_meta(ckpt)  # a checkpoint this version cannot resume is refused now, saying how to go on
    for key, saved in (("ep", meta.get("ep_size", 1)), ("tp", meta.get("tp_size", 1))):
        if getattr(cfg.learner, key) != saved:
            raise ValueError(
                f"--resume: {ckpt} was saved with learner.{key}={saved}, the config has {getattr(cfg.learner, key)}; "
                "resume with the same layout (or start a new run from an HF export, model.student)"
            )
    console.print(f"resuming from {ckpt}")
    return ckpt


def _save(cfg: RunConfig, learner) -> None:
    """A learner checkpoint at each phase end (and every learner.checkpoint_every steps, by the learner), unless
    the learner's state is on disk as it is: saved at this step by `checkpoint_every`, or resumed from and not
    trained since (a resumed run rewrote the same 430 GB of Qwen3-30B-A3B state after each phase)."""
    state = learner.state()
    if state["saved_step"] != state["step"]:
        learner.save(cfg.run_dir / "learner" / f"step_{state['step']:08d}")
