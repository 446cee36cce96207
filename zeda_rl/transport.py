"""ZMQ PUSH/PULL between the trajectory producers (teacher pool) and the learner.

Topology: the learner's `Puller` BINDS one PULL socket and every producer's `Pusher`
CONNECTS a PUSH socket to it, so producers can come and go (restarted Ray actors) while
the learner's address stays fixed. Binding defaults to 127.0.0.1 with a free port;
listening on all interfaces (0.0.0.0 / *) happens only when a caller asks for it.

Bounded everywhere, so a slow learner slows producers down instead of growing memory:
each socket holds at most `hwm` messages (SNDHWM/RCVHWM, plus what the kernel's TCP
buffers hold), and `Pusher.send` gives up after `timeout_s` and returns False. That
is the backpressure signal; the producer decides whether to retry or drop. No extra
in-process queue is needed: ZMQ's I/O thread already receives in the background into
the bounded RCVHWM pipe, and decoding is zero-copy, so `recv` is cheap.

The Puller never raises on bad input: a malformed, truncated, foreign or wrong-schema
message is counted in `dropped` / `drop_reasons` (keyed by the `WireError` class name)
and logged, and `recv` moves on to the next message. One bad producer must not be able
to stop training.

Like the ZMQ sockets under them, a Pusher or Puller belongs to one thread at a time.

The torch.distributed rendezvous of a process group (`rendezvous_store`) lives here too, for the
same rule: torch's own TCPStore server (what a tcp:// init_method makes) listens on every
interface, so rank 0 hands it a socket bound to the group's address instead.
"""

from __future__ import annotations

import logging
import time
from collections import Counter

import zmq

from zeda_rl.wire import ForeignRun, TrajectoryBatch, decode, encode

log = logging.getLogger(__name__)

DEFAULT_BIND = "tcp://127.0.0.1:0"


def rendezvous_store(address: str, port: int, rank: int, world_size: int, timeout):
    """A process group's TCPStore (`timeout`: a timedelta), served by rank 0 on `address` only (port 0: any free one)."""
    import socket

    import torch.distributed as dist

    if rank:
        return dist.TCPStore(address, port, world_size, False, timeout=timeout)
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind((address, port))
    s.listen(128)
    return dist.TCPStore(address, s.getsockname()[1], world_size, True, timeout=timeout, master_listen_fd=s.detach())


def _timeout_ms(timeout_s: float | None) -> int:
    return -1 if timeout_s is None else max(0, int(timeout_s * 1000))


class Pusher:
    """Producer side: CONNECTs a PUSH socket to the learner and sends trajectory batches."""

    def __init__(self, endpoint: str, hwm: int = 4, ctx: zmq.Context | None = None):
        if not endpoint:
            raise ValueError("Pusher needs the learner's endpoint, e.g. tcp://127.0.0.1:5555")
        self.endpoint = endpoint
        self.sent = 0
        self.timeouts = 0
        self.bytes_sent = 0
        self._sock = (ctx or zmq.Context.instance()).socket(zmq.PUSH)
        self._sock.setsockopt(zmq.SNDHWM, hwm)
        self._sock.setsockopt(zmq.LINGER, 0)
        # Queue only on live connections: before the learner is up a send waits (and can
        # time out) rather than piling messages into a pipe to nobody.
        self._sock.setsockopt(zmq.IMMEDIATE, 1)
        self._sock.connect(endpoint)

    def send(self, batch: TrajectoryBatch, timeout_s: float | None = 60.0) -> bool:
        """Validate, encode and send one batch; False if the queue stayed full for `timeout_s`.

        timeout_s=None blocks until there is room. The batch's arrays are sent without a
        copy: do not modify them after a successful send (ZMQ may still be reading them).
        """
        frames = encode(batch)
        self._sock.setsockopt(zmq.SNDTIMEO, _timeout_ms(timeout_s))
        try:
            self._sock.send_multipart(frames, copy=False)
        except zmq.Again:
            self.timeouts += 1
            return False
        self.sent += 1
        self.bytes_sent += sum(len(f) if isinstance(f, bytes) else f.nbytes for f in frames)
        return True

    def close(self) -> None:
        self._sock.close(linger=0)

    def __enter__(self) -> "Pusher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Puller:
    """Learner side: BINDs a PULL socket; `recv` returns decoded batches, drops bad ones."""

    LOG_FIRST = 10  # per reason; afterwards one warning per 1000 drops, to keep logs readable

    def __init__(
        self, bind_endpoint: str = DEFAULT_BIND, hwm: int = 8, ctx: zmq.Context | None = None, run: str | None = None
    ):
        self.run = run  # when set, only batches whose meta["run"] is this are accepted
        self.received = 0
        self.bytes_received = 0
        self.dropped = 0
        self.drop_reasons: Counter[str] = Counter()
        self._sock = (ctx or zmq.Context.instance()).socket(zmq.PULL)
        self._sock.setsockopt(zmq.RCVHWM, hwm)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind(bind_endpoint)
        # The address actually bound (resolves port 0 / "*" to the chosen port): give this to producers.
        self.endpoint: str = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)

    def recv(self, timeout_s: float | None = None) -> TrajectoryBatch | None:
        """The next valid batch, or None if none arrived within `timeout_s` (None: wait forever).

        Invalid messages met on the way are dropped and counted, never raised.
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not self._sock.poll(_timeout_ms(wait), zmq.POLLIN):
                return None
            try:
                frames = self._sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:  # raced with nothing; poll again
                continue
            try:
                batch = decode(frames)
                if self.run is not None and batch.meta.get("run") != self.run:
                    raise ForeignRun(f"batch of run {batch.meta.get('run')!r}, this learner trains run {self.run!r}")
            except Exception as e:  # WireError subclasses expected; anything else is also the sender's fault
                self._drop(e, frames)
                if deadline is not None and time.monotonic() >= deadline:
                    return None
                continue
            self.received += 1
            self.bytes_received += sum(len(f.buffer) for f in frames)
            return batch

    def _drop(self, err: Exception, frames: list) -> None:
        reason = type(err).__name__
        self.dropped += 1
        self.drop_reasons[reason] += 1
        n = self.drop_reasons[reason]
        if n <= self.LOG_FIRST or n % 1000 == 0:
            log.warning(
                "dropped message #%d on %s (%d frames, %s, %d of this kind so far): %s",
                self.dropped,
                self.endpoint,
                len(frames),
                reason,
                n,
                err,
            )

    def stats(self) -> dict:
        return {
            "received": self.received,
            "bytes_received": self.bytes_received,
            "dropped": self.dropped,
            "drop_reasons": dict(self.drop_reasons),
        }

    def close(self) -> None:
        self._sock.close(linger=0)

    def __enter__(self) -> "Puller":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
