"""Stage 1, SFT: the student learns the teacher's answers (NLL on the answer tokens + L_GA)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from launch.config import RunConfig
from launch.runlog import console, log_first_row, log_step
from launch.streams import RunData
from zeda_rl.metrics import MetricsLog
from zeda_rl.sft_data import SftSet


def sft_phase(cfg: RunConfig, teachers, learner, teacher: Path, data: RunData, log: MetricsLog, start: int = 0) -> None:
    """Stage 1: the teacher answers the training prompts (or data.sft_rollouts holds its answers); the
    student learns them (NLL + L_GA, loss on the answer tokens only).

    The teacher's answers stay in RUN_DIR/rollouts (reused while the teacher, prompts and sampling
    are the same), so a resumed run trains on the same data in the same shuffled order up to `start`.
    """
    if start >= cfg.sft.steps:
        return
    answers = data.sft_records if data.sft_records is not None else teacher_answers(cfg, teachers, data, teacher, log)
    passes = cfg.sft.steps * cfg.sft.batch_size / max(len(answers), 1)
    log.log("data", "sft_passes", passes)  # over 1: some answers are trained twice (the paper's SFT is one epoch)
    console.print(
        f"SFT: {cfg.sft.steps} steps x {cfg.sft.batch_size} rows over {len(answers)} usable answers "
        f"({passes:.2f} passes over them)"
    )
    log.log("driver", "progress_started", time.time())  # the monitor's ETA counts from here ...
    log.log("driver", "progress_base", start)  # ... and from this step (a resumed run's first)
    for step, batch in sft_batches(answers, cfg.sft.steps, cfg.sft.batch_size, cfg.seed, start):
        if step == start:
            n = int(batch["attention_mask"][0].sum())
            log_first_row(log, "sft", batch["tokens"][0, :n], batch["loss_mask"][0, :n])
        metrics = learner.train_step(cfg.sft, batch, {"stage": "sft", "step": step + 1})
        log_step(log, metrics, step + 1, cfg.sft.steps)


def sft_batches(
    answers: SftSet, steps: int, batch_size: int, seed: int, start: int = 0
) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """(step, batch) for steps `start`..`steps`-1: rows in seeded random passes over the records (a new
    permutation when a pass has fewer rows left than a batch), each batch read from the token file
    and padded to its own longest row. The order depends on the seed alone, so a resumed run
    (`start` > 0) skips the steps it already trained and goes on with the same rows."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(answers))
    cursor = 0
    for step in range(steps):
        if cursor + batch_size > len(order):
            order, cursor = rng.permutation(len(answers)), 0
        rows = order[cursor : cursor + batch_size]
        cursor += batch_size
        if step >= start:  # before it, resumed: the step is already in the learner's state
            yield step, answers.take(rows)


def teacher_answers(cfg: RunConfig, teachers, data: RunData, teacher: Path, log: MetricsLog) -> SftSet:
    """The teacher engines answer data.sft_count prompts through the rollouts job (`zeda rollouts`'s
    code: RUN_DIR/rollouts, resumable), then SFT reads them back like released rollouts."""
    from launch import rollouts, streams

    out = cfg.run_dir / "rollouts"
    from zeda_rl.progress import Progress

    items = rollouts.plan(data.sft, data.sft_count)
    with Progress("teacher rollouts", len(items), "prompts", log=log) as bar:
        r = rollouts.write_rollouts(
            cfg,
            teachers,
            items,
            rollouts.sampling_params(cfg, data.format.stop_ids),
            teacher,
            out,
            log,
            progress=lambda done, total, rate: bar.update(done),
        )
    console.print(
        f"teacher answered {r['answered']} prompts in {r['seconds']:.1f}s ({r['already_done']} already in {out}, "
        f"{r['truncated']} cut at max_new_tokens)"
    )
    answers = streams.sft_records(cfg, data.format, data.dropped, source=str(out))
    for key in ("sft_rollouts", "sft_rollouts_cut_at_max_new_tokens"):
        if key in data.dropped:
            log.log("data", f"dropped_too_long/{key}", data.dropped[key])
    return answers
