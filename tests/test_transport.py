"""Pusher -> Puller over real ZMQ sockets on 127.0.0.1: order, drops of bad messages, backpressure."""

from __future__ import annotations

import logging
import time

import msgpack
import numpy as np
import pytest
import zmq
from test_wire import assert_same, make_batch

from zeda_rl.transport import Puller, Pusher
from zeda_rl.wire import SCHEMA_VERSION, TrajectoryBatch, encode


@pytest.fixture
def puller():
    p = Puller(hwm=64)
    yield p
    p.close()


def raw_push(endpoint: str) -> zmq.Socket:
    """A bare PUSH socket, to send what a well-behaved Pusher never would."""
    s = zmq.Context.instance().socket(zmq.PUSH)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(endpoint)
    return s


def test_binds_loopback_on_a_free_port(puller):
    host, port = puller.endpoint.rsplit(":", 1)
    assert host == "tcp://127.0.0.1" and int(port) > 0
    with Puller() as other:
        assert other.endpoint != puller.endpoint


def test_many_batches_arrive_in_order_and_equal(puller):
    sent = [make_batch(seed=i, b=2 + i % 3, s=5 + i % 4) for i in range(40)]
    for i, b in enumerate(sent):
        b.meta["i"] = i
    with Pusher(puller.endpoint) as pusher:
        for b in sent:
            assert pusher.send(b, timeout_s=5.0)
        got = [puller.recv(timeout_s=5.0) for _ in sent]
    for want, have in zip(sent, got):
        assert have is not None
        assert_same(want, have)
        assert all(a.flags.aligned for a in have.arrays.values())
    assert puller.recv(timeout_s=0.05) is None
    assert puller.stats() == {"received": 40, "bytes_received": puller.bytes_received, "dropped": 0, "drop_reasons": {}}
    assert pusher.sent == 40 and pusher.bytes_sent == puller.bytes_received


def test_large_fields_arrive_without_a_copy(puller):
    batch = make_batch(b=8, s=512, layers=4, k=8)  # every frame above libzmq's 8 KiB shared receive buffer
    with Pusher(puller.endpoint) as pusher:
        assert pusher.send(batch, timeout_s=5.0)
        got = puller.recv(timeout_s=5.0)
    assert_same(batch, got)
    for name in ("tokens", "behaviour_logprobs", "teacher_logprobs", "routed_experts"):
        assert not got[name].flags.owndata and got[name].flags.aligned, name


def test_bad_messages_are_dropped_and_counted_while_valid_ones_arrive(puller, caplog):
    good = [make_batch(seed=i) for i in range(5)]
    frames = encode(good[0])
    wrong_schema = msgpack.unpackb(frames[0])
    wrong_schema["schema"] = SCHEMA_VERSION + 1
    truncated = [bytes(f) for f in frames]
    truncated[-1] = truncated[-1][:-3]
    bad = [
        [b"\xde\xad\xbe\xef garbage"],
        [msgpack.packb({"jsonrpc": "2.0", "method": "hello"}), b"payload"],
        [msgpack.packb(wrong_schema), *frames[1:]],
        truncated,
    ]
    sock = raw_push(puller.endpoint)
    try:
        for g, b in zip(good, bad):
            sock.send_multipart(encode(g))
            sock.send_multipart(b)
        sock.send_multipart(encode(good[-1]))
        with caplog.at_level(logging.WARNING, logger="zeda_rl.transport"):
            got = [puller.recv(timeout_s=5.0) for _ in good]
            assert puller.recv(timeout_s=0.05) is None
    finally:
        sock.close()
    for want, have in zip(good, got):
        assert_same(want, have)
    assert puller.dropped == 4
    assert puller.drop_reasons == {"ForeignMessage": 2, "SchemaMismatch": 1, "ByteLengthMismatch": 1}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 4 and "SchemaMismatch" in warnings[2] and "ByteLengthMismatch" in warnings[3]


def test_send_times_out_under_backpressure_then_recovers():
    big = TrajectoryBatch.from_arrays(
        {**make_batch(b=4, s=4).arrays, "payload": np.zeros(1 << 20, dtype=np.uint8)}  # ~1 MiB per message
    )
    with Puller(hwm=1) as puller, Pusher(puller.endpoint, hwm=1) as pusher:
        assert pusher.send(big, timeout_s=5.0)  # the first one waits for the connection
        t0 = time.monotonic()
        n = 1
        while pusher.send(big, timeout_s=0.2):  # nobody calls recv: queues and TCP buffers fill up
            n += 1
            assert n < 200, "send never pushed back"
        assert pusher.timeouts == 1
        assert time.monotonic() - t0 < 10
        for _ in range(n):  # the consumer catches up; everything that was accepted arrives
            assert puller.recv(timeout_s=5.0) is not None
        assert pusher.send(big, timeout_s=5.0)
        assert puller.recv(timeout_s=5.0) is not None


def test_send_without_a_learner_times_out_instead_of_queueing():
    import socket

    # a port held, bound but not listening, for the whole test: connections to it are refused, and
    # neither another process nor the kernel (a TCP self-connect from that same port) can take it
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        endpoint = f"tcp://127.0.0.1:{held.getsockname()[1]}"
        with Pusher(endpoint, hwm=2) as pusher:
            t0 = time.monotonic()
            assert pusher.send(make_batch(), timeout_s=0.2) is False
            assert 0.15 < time.monotonic() - t0 < 2.0


def test_recv_timeout_returns_none(puller):
    t0 = time.monotonic()
    assert puller.recv(timeout_s=0.1) is None
    assert puller.recv(timeout_s=0) is None
    assert time.monotonic() - t0 < 1.0
