"""Fault injection shared by the fault tests: malformed inbox messages, killing processes by title."""

from __future__ import annotations

import signal
from collections import Counter

import msgpack
import numpy as np
import psutil
import zmq

from zeda_rl.wire import SCHEMA_VERSION, TrajectoryBatch, encode

# kind -> the Puller's drop reason (the WireError class name) for it
KINDS = {
    "garbage": "ForeignMessage",
    "truncated_msgpack": "ForeignMessage",
    "wrong_array_size": "ByteLengthMismatch",
    "huge_declared_length": "ByteLengthMismatch",
    "huge_msgpack_array": "ForeignMessage",
    "foreign_schema": "SchemaMismatch",
    "wrong_run": "ForeignRun",
}


def valid_batch(run: str | None, seed: int = 0, ids=(10**9, 10**9 + 1)) -> TrajectoryBatch:
    """A batch that meets the wire contract (ids far above any a test run admits)."""
    rng = np.random.default_rng(seed)
    b, s = len(ids), 6
    arrays = {
        "tokens": rng.integers(0, 50, (b, s), dtype=np.int32),
        "loss_mask": np.ones((b, s), np.uint8),
        "behaviour_logprobs": -rng.random((b, s), dtype=np.float32),
        "teacher_logprobs": -rng.random((b, s), dtype=np.float32),
        "policy_version": np.zeros(b, np.int64),
        "sample_ids": np.asarray(ids, np.int64),
    }
    return TrajectoryBatch.from_arrays(arrays, meta={"temperature": 1.0, **({"run": run} if run else {})})


def malformed(i: int, foreign_run: str = "another-run") -> tuple[str, list[bytes]]:
    """The i-th malformed message, cycling through KINDS: (kind, frames)."""
    kind = list(KINDS)[i % len(KINDS)]
    frames = [bytes(f) for f in encode(valid_batch(foreign_run if kind == "wrong_run" else None, seed=i))]
    header = msgpack.unpackb(frames[0])
    if kind == "garbage":
        frames = [np.random.default_rng(i).bytes(1 + i % 300)]
    elif kind == "truncated_msgpack":
        frames = [frames[0][: max(1, (i * 7) % len(frames[0]))], *frames[1:]]
    elif kind == "wrong_array_size":
        frames[1 + i % (len(frames) - 1)] = frames[1 + i % (len(frames) - 1)][:-1]
    elif kind == "huge_declared_length":
        header["fields"][0][2] = [2**40, 2**40]
        frames[0] = msgpack.packb(header)
    elif kind == "huge_msgpack_array":  # array32 announcing 4 billion entries, then nothing
        frames = [b"\xdd\xff\xff\xff\xff" + frames[0][:8], *frames[1:]]
    elif kind == "foreign_schema":
        header["schema"] = SCHEMA_VERSION + 1 + i % 5
        frames[0] = msgpack.packb(header)
    return kind, frames


def push_malformed(
    endpoint: str, n: int, foreign_run: str = "another-run", last: TrajectoryBatch | None = None
) -> Counter:
    """Send n malformed messages to a learner inbox from a bare PUSH socket, then `last` (a valid batch:
    once it has arrived, so has everything before it); returns the expected drop reasons."""
    sock = zmq.Context.instance().socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 5000)
    sock.connect(endpoint)
    expected: Counter = Counter()
    try:
        for i in range(n):
            kind, frames = malformed(i, foreign_run)
            sock.send_multipart(frames)
            expected[KINDS[kind]] += 1
        if last is not None:
            sock.send_multipart(encode(last))
    finally:
        sock.close()  # lingers until every message is handed over
    return expected


def kill_by_title(prefix: str, exclude=()) -> int | None:
    """SIGKILL one process whose command line starts with `prefix` (Ray's actor titles: 'ray::RolloutActor'); its pid."""
    for p in psutil.process_iter(["pid", "cmdline"]):
        if p.info["pid"] in exclude:
            continue
        if any(part.startswith(prefix) for part in (p.info["cmdline"] or [])):
            p.send_signal(signal.SIGKILL)
            return p.info["pid"]
    return None
