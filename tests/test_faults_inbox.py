"""10,000 malformed messages on the learner's inbox while real batches arrive: none crashes the
inbox's thread, each is counted by reason and logged, and the batches a step takes are exactly
what they are without them (the pipeline test shows the same inside a run)."""

from __future__ import annotations

import logging
import threading
from collections import Counter

import numpy as np

from learner.inbox import LearnerInbox
from tests.faults import push_malformed, valid_batch
from zeda_rl.transport import Pusher

RUN = "run-under-test"


def _fill(pusher: Pusher, n_batches: int) -> None:
    """(The pusher stays open until the batches are taken: a closed Pusher drops what it still queues.)"""
    for k in range(n_batches):
        assert pusher.send(valid_batch(RUN, seed=k, ids=(2 * k, 2 * k + 1)), timeout_s=30)


def _take_all(inbox: LearnerInbox, n: int) -> tuple[dict, dict]:
    return inbox.take(list(range(n)), version=0, max_staleness=1, timeout_s=60)


def test_malformed_messages_change_nothing_and_are_each_counted(caplog):
    clean = LearnerInbox("tcp://127.0.0.1:0", run=RUN)
    try:
        with Pusher(clean.endpoint, hwm=64) as pusher:
            _fill(pusher, 20)
            want, want_report = _take_all(clean, 40)
    finally:
        clean.close()

    inbox = LearnerInbox("tcp://127.0.0.1:0", run=RUN)
    expected: Counter = Counter()
    try:
        with caplog.at_level(logging.WARNING, logger="zeda_rl.transport"):
            last = valid_batch(RUN, ids=(10**6,))  # sent after the garbage on its connection
            garbage = threading.Thread(
                target=lambda: expected.update(push_malformed(inbox.endpoint, 10_000, last=last))
            )
            garbage.start()

            with Pusher(inbox.endpoint, hwm=64) as pusher:
                _fill(pusher, 20)
                # another run's valid batch with the same sample ids: it must not replace ours
                assert pusher.send(valid_batch("another-run", seed=99, ids=tuple(range(40))), timeout_s=30)
                expected["ForeignRun"] += 1
                assert pusher.send(valid_batch(RUN, ids=(10**6 + 1,)), timeout_s=30)  # after it on its connection
                garbage.join()
                _, after = inbox.take([10**6, 10**6 + 1], version=0, max_staleness=1, timeout_s=60)
                assert after["trained"] == [10**6, 10**6 + 1]  # so every message sent before them has been read
                got, report = _take_all(inbox, 40)
        stats = inbox.stats()
        assert inbox.thread.is_alive()  # no crash
    finally:
        inbox.close()
    assert report == want_report and report["trained"] == list(range(40)) and not report["missing"]
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)
    assert stats["dropped_malformed"] == 10_001 and Counter(stats["malformed_reasons"]) == expected
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert all(reason in logged for reason in expected)  # the first of each kind, then every 1000th


def test_samples_that_come_after_a_step_gave_up_on_them_are_not_kept():
    """A step reports late samples missing and trains without them; when they come later (a slow teacher, or one
    that sent and then died), nothing will ever take them: a real message of 16 rows is ~0.45 GB on rank 0."""
    inbox = LearnerInbox("tcp://127.0.0.1:0", run=RUN)
    try:
        assert inbox.take([0, 1], version=0, max_staleness=1, timeout_s=0.2)[1]["missing"] == [0, 1]
        assert inbox.discard([4, 5]) == 0  # discarded before they came (the phase ended)
        with Pusher(inbox.endpoint, hwm=64) as pusher:
            for k, ids in enumerate(((0, 1), (4, 5), (2, 3))):
                assert pusher.send(valid_batch(RUN, seed=k, ids=ids), timeout_s=30)
            _, report = inbox.take([2, 3], version=0, max_staleness=1, timeout_s=60)  # sent after the others
        assert report["trained"] == [2, 3]
        assert inbox.stats()["waiting"] == 0 and inbox.stats()["abandoned"] == 0  # the late ones were dropped
    finally:
        inbox.close()


def test_a_drain_thread_that_dies_is_raised_not_waited_on(monkeypatch):
    """An error in the drain thread (a MemoryError copying a 0.45 GB message, say) used to end it silently: the
    socket filled, every push timed out as backpressure and each step reported its samples missing, forever."""
    import pytest

    inbox = LearnerInbox("tcp://127.0.0.1:0", run=RUN)
    monkeypatch.setattr(threading, "excepthook", lambda args: None)  # the thread's traceback is expected here

    def boom(*a, **kw):
        raise MemoryError("copying a message")

    try:
        batch = valid_batch(RUN, seed=0, ids=(0, 1))
        monkeypatch.setattr(np, "array", boom)  # the drain's copy of every array of a message
        with Pusher(inbox.endpoint, hwm=64) as pusher:
            assert pusher.send(batch, timeout_s=30)
            inbox.thread.join(timeout=30)
        monkeypatch.undo()
        assert not inbox.thread.is_alive()
        with pytest.raises(RuntimeError, match=r"drain thread died \(MemoryError: copying a message\)"):
            inbox.take([0, 1], version=0, max_staleness=1, timeout_s=60)
        with pytest.raises(RuntimeError, match="drain thread died"):
            inbox.stats()
    finally:
        inbox.close()
