"""Trajectory transport throughput: ZMQ Pusher->Puller on loopback vs a memory copy vs pickle.

All three move the same realistic batch (B x S tokens with mask, behaviour and teacher
logprobs, versions, ids, and routed experts [B, S, L, K] int16), interleaved in one run
so machine noise hits them alike:

- zmq:    Pusher.send -> tcp://127.0.0.1 -> Puller.recv (decoded, zero-copy) in a thread;
          the Pusher has its own ZMQ context (own I/O thread), as a separate process would
- zmq+pickle: pickle.dumps -> one frame over the same kind of socket pair -> pickle.loads
- copy:   np.copy of every array (one in-process copy of the same bytes: the floor)
- join:   b"".join of the encoded frames (one copy into a single bytes object)
- pickle: pickle.loads(pickle.dumps(arrays dict, protocol 5)) (what we refuse to do on the wire)

Messages above glibc's largest mmap threshold (32 MB, e.g. 48 layers of routed experts)
are received into freshly mapped memory, page-faulted 4 KiB at a time: on this project's
2-core machine GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (glibc >= 2.35, transparent huge
pages in madvise mode) took the 51 MB case from ~2.1 to ~3.8 GB/s. Try it on the learner.

    python bench/transport.py [--batch 32] [--seq 2048] [--layers 4 48] [--top-k 8] [--batches 10] [--repeats 3]
"""

from __future__ import annotations

import argparse
import pickle
import statistics
import threading
import time

import numpy as np
import zmq

from zeda_rl.transport import Puller, Pusher
from zeda_rl.wire import TrajectoryBatch, encode


def make_batch(b: int, s: int, layers: int, k: int) -> TrajectoryBatch:
    rng = np.random.default_rng(0)
    return TrajectoryBatch.from_arrays(
        {
            "tokens": rng.integers(0, 150_000, (b, s), dtype=np.int32),
            "attention_mask": np.ones((b, s), dtype=np.uint8),
            "loss_mask": (rng.random((b, s)) > 0.3).astype(np.uint8),
            "behaviour_logprobs": -rng.random((b, s), dtype=np.float32),
            "teacher_logprobs": -rng.random((b, s), dtype=np.float32),
            "policy_version": np.full(b, 7, dtype=np.int64),
            "sample_ids": np.arange(b, dtype=np.int64),
            "routed_experts": rng.integers(-1, 128, (b, s, layers, k), dtype=np.int16),
        },
        meta={"temperature": 1.0},
    )


def run_zmq(batch: TrajectoryBatch, n: int, puller: Puller, pusher: Pusher) -> float:
    got = []

    def consume():  # like the learner: hold a batch only until the next one (kept batches pin their frames)
        for _ in range(n):
            b = puller.recv(timeout_s=60)
            got.append(b is not None and b.batch_size == batch.batch_size)

    t = threading.Thread(target=consume)
    t0 = time.perf_counter()
    t.start()
    for _ in range(n):
        if not pusher.send(batch, timeout_s=60):
            raise RuntimeError("send timed out")
    t.join()
    dt = time.perf_counter() - t0
    if len(got) != n or not all(got):
        raise RuntimeError("batches lost")
    return dt


def run_zmq_pickle(batch: TrajectoryBatch, n: int, pull: zmq.Socket, push: zmq.Socket) -> float:
    """What pickle on the wire would cost: dumps -> one frame over the same loopback -> loads."""
    ok = []

    def consume():
        for _ in range(n):
            d = pickle.loads(pull.recv(copy=False).buffer)
            ok.append(d["arrays"]["tokens"].shape == batch.tokens.shape)

    t = threading.Thread(target=consume)
    t0 = time.perf_counter()
    t.start()
    for _ in range(n):
        push.send(pickle.dumps({"arrays": batch.arrays, "meta": batch.meta}, protocol=5), copy=False)
    t.join()
    dt = time.perf_counter() - t0
    if len(ok) != n or not all(ok):
        raise RuntimeError("batches lost")
    return dt


def run_copy(batch: TrajectoryBatch, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        out = {k: np.copy(v) for k, v in batch.arrays.items()}
    del out
    return time.perf_counter() - t0


def run_join(batch: TrajectoryBatch, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        out = b"".join(encode(batch))
    del out
    return time.perf_counter() - t0


def run_pickle(batch: TrajectoryBatch, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        out = pickle.loads(pickle.dumps({"arrays": batch.arrays, "meta": batch.meta}, protocol=5))
    del out
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--layers", type=int, nargs="+", default=[4, 48])
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--batches", type=int, default=10, help="batches per timed round")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds; the median is reported")
    ap.add_argument("--hwm", type=int, default=4)
    a = ap.parse_args()

    producer_ctx = zmq.Context(io_threads=1)
    pull = zmq.Context.instance().socket(zmq.PULL)
    pull.setsockopt(zmq.RCVHWM, a.hwm)
    pull.bind("tcp://127.0.0.1:0")
    push = producer_ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.SNDHWM, a.hwm)
    push.connect(pull.getsockopt_string(zmq.LAST_ENDPOINT))
    with Puller(hwm=a.hwm) as puller, Pusher(puller.endpoint, hwm=a.hwm, ctx=producer_ctx) as pusher:
        for layers in a.layers:
            batch = make_batch(a.batch, a.seq, layers, a.top_k)
            gb = batch.nbytes * a.batches / 1e9
            print(
                f"\nbatch {a.batch}x{a.seq}, routed experts [{a.batch},{a.seq},{layers},{a.top_k}] int16: "
                f"{batch.nbytes / 1e6:.1f} MB/batch, {a.batches} batches per round, {a.repeats} rounds"
            )
            run_zmq(batch, 2, puller, pusher)  # warm up: connection, page faults
            run_zmq_pickle(batch, 2, pull, push)
            runs = {"zmq": [], "zmq+pickle": [], "copy": [], "join": [], "pickle": []}
            for _ in range(a.repeats):
                runs["zmq"].append(run_zmq(batch, a.batches, puller, pusher))
                runs["zmq+pickle"].append(run_zmq_pickle(batch, a.batches, pull, push))
                runs["copy"].append(run_copy(batch, a.batches))
                runs["join"].append(run_join(batch, a.batches))
                runs["pickle"].append(run_pickle(batch, a.batches))
            rate = {k: gb / statistics.median(v) for k, v in runs.items()}
            best = {k: gb / min(v) for k, v in runs.items()}
            for k in runs:
                print(f"  {k:10s} {rate[k]:6.2f} GB/s (median)  {best[k]:6.2f} GB/s (best)")
            print(
                f"  ratios (median): zmq/copy {rate['zmq'] / rate['copy']:.2f}  zmq/join {rate['zmq'] / rate['join']:.2f}  "
                f"zmq/pickle {rate['zmq'] / rate['pickle']:.2f}  zmq/(zmq+pickle) {rate['zmq'] / rate['zmq+pickle']:.2f}  "
                f"pickle/copy {rate['pickle'] / rate['copy']:.2f}"
            )
        print(f"\npuller: {puller.stats()}")
    push.close(linger=0)
    pull.close(linger=0)
    producer_ctx.term()


if __name__ == "__main__":
    main()
