"""Teacher rollouts as a job of their own: the teacher engines answer the SFT prompts into sharded JSONL.

At ZEDA's scale this is a third of the adaptation (8.2 of 30.1 hours for Qwen3-30B-A3B), so
it keeps every teacher engine busy (two chunks of `sft.rollout_chunk` prompts queued per engine) and it
survives being killed: each chunk is written by the engine that answered it as one shard,
under a temporary name renamed when complete, so the directory only ever holds whole shards,
and a restarted job reads the ids already answered and submits only the rest (no prompt
answered twice, none lost). Records take the released rollout shape (`messages` ending with
the assistant turn) plus the sampling parameters and finish reason, so SFT reads the
directory like any released rollout file (`data.sft_rollouts`); answers cut by the token
cap keep `finish_reason: length` and are dropped (and counted) by SFT, never trained on.

`zeda rollouts --config FILE` runs it alone; the pipeline's SFT phase calls `write_rollouts`
when the config gives no ready rollouts.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

MANIFEST = "manifest.json"
MAX_TRIES = 3  # engine deaths one chunk may cause before the job gives up on it


def shard_name(attempt: int, index: int) -> str:
    """Names are unique per attempt: engines of a killed job can still finish a chunk or two
    after their driver died, and must not overwrite a shard of the job that resumed."""
    return f"rollouts-{attempt:03d}-{index:05d}.jsonl"


def sampling_params(cfg, stops):
    """What the teacher samples with for SFT data (recorded in every record and the manifest): the
    run's sampling at sft.teacher_temperature, stopping at the end of turn.

    `stops`: the teacher's stop ids (`ChatFormat.stop_ids`, from `zeda_rl.chat.stop_ids`), or one id;
    `write_rollouts` adds any of the teacher's stop ids missing here, so GLM's `<|user|>` always stops it.
    """
    ids = (stops,) if isinstance(stops, int) else tuple(stops)
    return cfg.sampling.model_copy(
        update={"temperature": cfg.sft.teacher_temperature, "stop_token_ids": tuple(sorted({int(i) for i in ids}))}
    )


def with_teacher_stops(params, teacher: Path):
    """`params` stopping on every stop id of the teacher checkpoint too (`zeda_rl.chat.stop_ids`)."""
    from zeda_rl.chat import stop_ids

    ids = set(params.stop_token_ids) | set(stop_ids(teacher))
    return params.model_copy(update={"stop_token_ids": tuple(sorted(ids))})


def plan(stream, n: int) -> list[dict]:
    """The first `n` prompts of the SFT stream (`launch.streams.sft_prompts`): id, conversation, token ids.

    The same prompts, in the same order, as SFT trains on. A prompt drawn a second time (the
    built-in tasks cycle) gets its occurrence in its id, so every answer has its own id.
    """
    items, seen = [], {}
    for _ in range(n):
        i = stream.next_index()
        rec = stream.records[i]
        k = seen.get(rec.id, 0)
        seen[rec.id] = k + 1
        items.append(
            {"id": rec.id if k == 0 else f"{rec.id}#{k}", "messages": list(rec.messages), "prompt_ids": stream.ids[i]}
        )
    return items


def _shard_ids(shard: Path) -> list[str]:
    out = []
    with shard.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            try:
                out.append(json.loads(line)["id"])
            except (ValueError, KeyError, TypeError) as err:
                raise ValueError(
                    f"{shard}:{n}: not a rollout record ({err!r}); the directory holds something "
                    "other than this job's shards"
                ) from None
    return out


def done_ids(out: Path) -> set[str]:
    """Ids answered in the complete shards of `out` (temporary leftovers of a killed job are ignored)."""
    return {i for shard in sorted(out.glob("rollouts-*.jsonl")) for i in _shard_ids(shard)}


def dedupe(out: Path) -> int:
    """Keep each id in its first shard only (a killed job's engines may have answered a chunk the
    resumed job answered again); rewrites the later shards atomically; returns records removed."""
    seen, removed = set(), 0
    for shard in sorted(out.glob("rollouts-*.jsonl")):
        ids = _shard_ids(shard)
        if not seen.intersection(ids):
            seen.update(ids)
            continue
        # "\n" only: answers keep U+2028, U+2029 and U+0085 unescaped (ensure_ascii=False), and splitlines() cuts there
        lines = shard.read_text(encoding="utf-8").split("\n")[:-1]
        if len(lines) != len(ids):
            raise ValueError(f"{shard}: {len(lines)} lines but {len(ids)} records; not rewriting it")
        keep = [line for i, line in zip(ids, lines) if i not in seen]
        removed += len(lines) - len(keep)
        seen.update(ids)
        tmp = out / f".{shard.name}.tmp-dedupe"
        if keep:
            tmp.write_text("\n".join(keep) + "\n", encoding="utf-8")
            tmp.rename(shard)
        else:
            shard.unlink()
    return removed


def fingerprint(teacher: Path) -> str:
    """The teacher checkpoint's identity without reading its weights: config, names, sizes, mtimes.
    Answers of a teacher rebuilt in the same place must not be reused."""
    import hashlib

    h = hashlib.sha256((teacher / "config.json").read_bytes())
    for p in sorted(teacher.glob("*.safetensors")):
        st = p.stat()
        h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _manifest(cfg, teacher: Path, params, total: int) -> dict:
    return {
        "teacher": str(teacher),
        "teacher_fingerprint": fingerprint(teacher),
        "sft_prompts": cfg.data.sft_prompts,
        "prompts": total,
        "enable_thinking": cfg.data.enable_thinking,
        "sampling": params.recorded(),
        "seed": cfg.seed,
    }


def _check_manifest(out: Path, want: dict) -> int:
    """Record what the rollouts are made with, or check a resumed job makes them the same way; returns this attempt's number."""
    path = out / MANIFEST
    if path.is_file():
        have = json.loads(path.read_text())
        diff = {k: (have.get(k), v) for k, v in want.items() if have.get(k) != v}
        if diff:
            raise ValueError(
                f"{path}: these rollouts were made differently ({diff}, as (there, now)); "
                "resume with the same config, or choose another output directory"
            )
    elif any(out.glob("rollouts-*.jsonl")):
        raise ValueError(f"{out}: holds rollout shards but no {MANIFEST}; not this job's directory")
    else:
        have = dict(want)
    have["attempts"] = int(have.get("attempts", 0)) + 1
    tmp = out / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(have, indent=2) + "\n")
    tmp.rename(path)
    return have["attempts"]


def write_rollouts(cfg, teachers, items: list[dict], params, teacher: Path, out: Path, log=None, progress=None) -> dict:
    """Answer every item of `plan` not yet in `out`; returns counts. `teachers`: a TeacherPool.

    The teacher stops on every one of its stop ids whatever `params` names (`with_teacher_stops`):
    an answer that ran past GLM's `<|user|>` would be a cut answer, not a finished one."""
    import ray

    params = with_teacher_stops(params, teacher)
    out.mkdir(parents=True, exist_ok=True)
    for leftover in out.glob(".rollouts-*.tmp*"):  # a shard a killed job was writing: its prompts are redone
        leftover.unlink()
    attempt = _check_manifest(out, _manifest(cfg, teacher, params, len(items)))
    dedupe(out)
    done = done_ids(out)
    todo = [it for it in items if it["id"] not in done]
    next_shard, chunk = 0, cfg.sft.rollout_chunk
    chunks = [todo[i : i + chunk] for i in range(0, len(todo), chunk)]
    inflight: dict = {}
    tries: dict[str, int] = {}  # engine deaths per chunk (by its first id)
    per_engine = 2 * len(teachers.actors)
    t0, answered, tokens, truncated, engines = time.time(), 0, 0, 0, {}
    while chunks or inflight:
        while chunks and len(inflight) < per_engine:
            part = chunks.pop(0)
            seed = cfg.seed * 1_000_003 + attempt * 100_003 + next_shard
            path = out / shard_name(attempt, next_shard)
            ref = teachers.submit("answer_to_shard", part, params.model_copy(update={"seed": seed}), str(path))
            inflight[ref] = (part, path)
            next_shard += 1
        ready, _ = ray.wait(list(inflight), num_returns=1, timeout=1.0)
        for ref in ready:
            part, path = inflight.pop(ref)
            try:
                r = ray.get(ref)
            except ray.exceptions.RayActorError as err:
                # the engine died (Ray restarts it): answer the chunk again. An error the call raised itself (a full
                # disk, a refused request) is not caught here: it ends the job, named
                key = part[0]["id"]
                tries[key] = tries.get(key, 0) + 1
                if tries[key] >= MAX_TRIES:  # an engine that dies on it each time, or no engine left alive
                    raise RuntimeError(
                        f"rollouts: the chunk of {len(part)} prompts from id {key!r} failed {MAX_TRIES} times, its "
                        f"engine dying each time; last: {str(err)[:300]}"
                    ) from err
                if log is not None:
                    log.log("driver", "actor_restart", f"rollouts: {str(err)[:200]}")
                chunks.append(part)
                continue
            answered += r["records"]
            tokens += r["tokens"]
            truncated += r["truncated"]
            engines[r["pid"]] = engines.get(r["pid"], 0) + r["records"]
            if log is not None:
                log.log("teacher", "tokens", r["tokens"])
            if progress is not None:
                progress(answered + len(done), len(items), tokens / max(time.time() - t0, 1e-9))
    duplicates = dedupe(out)  # what engines of a killed attempt wrote after this one had started
    result = {
        "out": str(out),
        "duplicates_removed": duplicates,
        "prompts": len(items),
        "already_done": len(done),
        "answered": answered,
        "truncated": truncated,
        "tokens": tokens,
        "seconds": time.time() - t0,
        "per_engine": sorted(engines.values()),
    }
    if log is not None:
        log.log("data", "rollouts_truncated", truncated)
    return result


def main(argv: list[str] | None = None) -> int:
    """`zeda rollouts --config FILE [--set KEY=VALUE] [--out DIR]`."""
    import argparse

    ap = argparse.ArgumentParser(
        prog="zeda rollouts", description="the teacher engines answer the SFT prompts into sharded JSONL"
    )
    ap.add_argument("--config", required=True)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", default=None, help="output directory (default: RUN_DIR/rollouts); rerun to resume")
    a = ap.parse_args(argv)

    import ray
    from rich.console import Console
    from transformers import AutoTokenizer

    from launch.config import ConfigError, load_run_config
    from launch.fleet import connect_ray, start_teachers, teacher_dir

    try:
        cfg = load_run_config(a.config, a.set)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2
    console = Console()
    teacher = teacher_dir(cfg)
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    out = Path(a.out) if a.out else cfg.run_dir / "rollouts"
    connect_ray(cfg)
    try:
        pool, _pg = start_teachers(cfg, teacher, tokenizer.pad_token_id or 0)
        from launch import streams
        from zeda_rl.progress import Progress

        fmt = streams.chat_format(cfg, tokenizer)
        stream, n = streams.sft_prompts(cfg, fmt)
        params = sampling_params(cfg, fmt.stop_ids)
        items = plan(stream, n)
        ids = {it["id"] for it in items}
        before = len(ids & done_ids(out)) if out.is_dir() else 0  # a resumed job: its rate counts only new answers
        with Progress("rollouts", len(items), "prompts", done=before) as bar:
            r = write_rollouts(
                cfg,
                pool,
                items,
                params,
                teacher,
                out,
                progress=lambda done, total, rate: bar.update(done, note=f"{rate:.0f} tokens/s"),
            )
    finally:
        ray.shutdown()
    console.print(
        f"rollouts: {r['answered']} answered now, {r['already_done']} already done, "
        f"{r['truncated']} cut at max_new_tokens (SFT drops them); {out}"
    )
    return 0
