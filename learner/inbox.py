"""The learner's inbox: where scored trajectories land, on learner rank 0, and how a step's batch is made.

The teacher actors PUSH packed, scored samples straight here over ZMQ (msgpack header + raw
frames); the driver only says which samples make a step (their ids) and at which policy
version, so no trajectory ever passes through the driver. A thread drains the socket the
whole time, also while a long training step runs, so the teachers' pushes never block on a
busy learner. The staleness check lives here too: a sample sampled more than `max_staleness`
versions before the step, or by an engine that had not yet been given the learner's weights
(version -1), is not trained, and the reason is counted.

Every message the wire decoder refuses (malformed, foreign, non-finite log-probs, negative token ids:
`zeda_rl.wire`) is counted in `stats()["malformed_reasons"]` by its `WireError` class; given the
model's `vocab_size`, a batch holding a token id at or above it is refused and counted there too (BadValue).
"""

from __future__ import annotations

import threading
import time

import numpy as np

from zeda_rl.trajectory import concat_batches, take_rows
from zeda_rl.wire import WireError, check_token_ids


class LearnerInbox:
    def __init__(self, bind_endpoint: str, run: str | None = None, vocab_size: int | None = None):
        from zeda_rl.transport import Puller

        self.puller = Puller(bind_endpoint, run=run)
        self.vocab_size = vocab_size  # the model's; token ids at or above it are refused
        self.endpoint = self.puller.endpoint
        self.rows: dict[int, tuple[dict, int]] = {}  # sample id -> (its packed batch, row in it)
        self.refused: set[int] = set()  # ids of decoded batches refused here (vocab): reported missing, not awaited
        # ids given up on (reported missing by a step, or discarded before they came): dropped if they come later.
        # Sample ids are never reused within a run, and a real message holds ~0.45 GB of routed experts.
        self.abandoned: set[int] = set()
        self.cond = threading.Condition()
        self.closed = False
        self.received = 0
        self.error: str | None = None  # why the drain thread died, if it did: every later take or stats raises it
        self.thread = threading.Thread(target=self._drain, name="learner-inbox", daemon=True)
        self.thread.start()

    def _drain(self) -> None:
        """Drain the socket until closed. An error that kills the thread (a MemoryError copying a 0.45 GB
        message, a bug) is kept: without it the socket fills, every push times out as backpressure, and the
        run re-admits steps that can never train, with every actor alive."""
        try:
            self._drain_loop()
        except BaseException as err:
            with self.cond:
                self.error = f"{type(err).__name__}: {err}"
                self.cond.notify_all()
            raise

    def _check(self) -> None:
        if self.error is not None:
            raise RuntimeError(
                f"learner inbox on {self.endpoint}: its drain thread died ({self.error}); restart the run"
            )

    def _drain_loop(self) -> None:
        while not self.closed:
            batch = self.puller.recv(timeout_s=0.2)
            if batch is None:
                continue
            if self.vocab_size is not None:
                try:
                    check_token_ids(batch.arrays, self.vocab_size)
                except WireError as e:  # counted with the decoder's refusals, as the Puller counts them
                    self.puller.received -= 1
                    self.puller._drop(e, [None] * (1 + len(batch.arrays)))
                    with self.cond:  # its ids are known: a step naming them need not wait for them
                        self.refused.update(int(i) for i in np.asarray(batch.arrays["sample_ids"]).reshape(-1))
                        self.cond.notify_all()
                    continue
            arrays = {k: np.array(v) for k, v in batch.arrays.items()}
            with self.cond:
                for row, sid in enumerate(arrays["sample_ids"].tolist()):
                    if int(sid) in self.abandoned:
                        self.abandoned.discard(int(sid))
                    else:
                        self.rows[int(sid)] = (arrays, row)
                self.received += len(arrays["sample_ids"])
                self.cond.notify_all()

    def take(
        self, ids: list[int], version: int, max_staleness: int, timeout_s: float = 120.0
    ) -> tuple[dict | None, dict]:
        """The batch of samples `ids` (in that order) for a step at `version`, and what happened to each id.

        Waits up to `timeout_s` for ids not yet here (the driver asks only once their calls returned,
        so they are at most in flight on the socket); ids still missing then are reported, not waited for.
        """
        deadline = time.monotonic() + timeout_s
        with self.cond:
            self._check()
            while any(i not in self.rows and i not in self.refused for i in ids) and time.monotonic() < deadline:
                self.cond.wait(timeout=max(0.0, min(1.0, deadline - time.monotonic())))
                self._check()
            found = [(i, self.rows.pop(i)) for i in ids if i in self.rows]
            missing = sorted(set(ids) - {i for i, _ in found})
            self.abandoned.update(i for i in missing if i not in self.refused)  # refused ones came already
            self.refused.difference_update(ids)
        kept, stale, unsynced, lags = [], [], [], []
        for sid, (arrays, row) in found:
            v = int(arrays["policy_version"][row])
            if v < 0:
                unsynced.append(sid)
            elif version - v > max_staleness:
                stale.append(sid)
            else:
                kept.append(take_rows(arrays, [row]))
                lags.append(version - v)
        dropped = set(stale) | set(unsynced)
        report = {
            "trained": [sid for sid, _ in found if sid not in dropped],
            "response_tokens": [int(a["loss_mask"][r].sum()) for sid, (a, r) in found if sid not in dropped],
            "stale": stale,
            "unsynced": unsynced,
            "missing": missing,
            "staleness_mean": float(np.mean(lags)) if lags else 0.0,
            "staleness_max": int(max(lags, default=0)),
        }
        return (concat_batches(kept) if kept else None), report

    def discard(self, ids) -> int:
        """Forget samples that will never be trained (e.g. the last in-flight ones when a phase ends); those not here
        yet are dropped when they come. Returns how many were here."""
        with self.cond:
            gone = {int(i) for i in ids}
            here = {i for i in gone if self.rows.pop(i, None) is not None}
            self.abandoned |= gone - here
            return len(here)

    def stats(self) -> dict:
        with self.cond:
            self._check()
            return {
                "received": self.received,
                "waiting": len(self.rows),
                "abandoned": len(self.abandoned),
                "dropped_malformed": int(self.puller.dropped),
                "malformed_reasons": dict(self.puller.drop_reasons),
            }

    def close(self) -> None:
        self.closed = True
        self.thread.join(timeout=2.0)
        self.puller.close()
