"""Fuzzed and hostile frames against the trajectory and weight decoders: whatever the bytes, a decoder
returns a clean result or raises the project's `WireError` (so the learner's inbox counts it by class),
never another exception; and the shapes that once escaped as RecursionError, numpy ValueError or torch
TypeError, or got through (schema version True / 1.0, out-of-vocabulary ids, NaN log-probs), are refused."""

from __future__ import annotations

import math
import time
from collections import Counter

import msgpack
import numpy as np
import pytest
import torch

from learner.inbox import LearnerInbox
from zeda_rl import wire
from zeda_rl.transport import Pusher
from zeda_rl.weights import (
    WEIGHTS_SCHEMA_VERSION,
    WeightUpdate,
    WeightUpdateError,
    decode_update,
    encode_update,
    pack_bucket,
    unpack_bucket,
)
from zeda_rl.wire import (
    FINITE_FIELDS,
    BadMeta,
    BadValue,
    ByteLengthMismatch,
    ForeignMessage,
    SchemaMismatch,
    ShapeMismatch,
    TrajectoryBatch,
    WireError,
    decode,
    encode,
)

VOCAB = 64
B, S, K = 2, 5, 3


def batch_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "tokens": rng.integers(0, VOCAB, (B, S), dtype=np.int32),
        "loss_mask": np.ones((B, S), np.uint8),
        "behaviour_logprobs": -rng.random((B, S), dtype=np.float32),
        "teacher_logprobs": -rng.random((B, S), dtype=np.float32),
        "policy_version": np.zeros(B, np.int64),
        "sample_ids": np.arange(B, dtype=np.int64),
        "attention_mask": np.ones((B, S), np.uint8),
        "routed_experts": rng.integers(-1, 8, (B, S, 2, 2)).astype(np.int16),
        "teacher_top_ids": rng.integers(0, VOCAB, (B, S, K), dtype=np.int32),
        "teacher_top_logprobs": -rng.random((B, S, K), dtype=np.float32),
        "advantages": rng.standard_normal((B, S)).astype(np.float32),
    }


def batch_frames(seed: int = 0, meta=None, **replace) -> list[bytes]:
    arrays = {**batch_arrays(seed), **replace}
    return [bytes(f) for f in encode(TrajectoryBatch(arrays, meta if meta is not None else {"temperature": 1.0}))]


def weight_frames() -> list[bytes]:
    named = [
        ("w", torch.arange(12, dtype=torch.float32).reshape(3, 4).to(torch.bfloat16)),
        ("b", torch.ones(4)),
        ("ids", torch.arange(3, dtype=torch.int64)),
        ("empty", torch.zeros(0, 2)),
    ]
    return [bytes(f) for f in encode_update(WeightUpdate(3, [named[:2], named[2:]]))]


def with_header(frames: list[bytes], fn) -> list[bytes]:
    header = msgpack.unpackb(frames[0])
    fn(header)
    return [msgpack.packb(header), *frames[1:]]


DEEP = "\x00deep-nesting\x00"  # a placeholder string, replaced in the packed bytes


def deep_bytes(depth: int) -> bytes:
    """`depth` nested one-element msgpack arrays (msgpack.packb itself refuses to nest past 512)."""
    return b"\x91" * (depth - 1) + b"\x90"


def pack_with_deep(header: dict, depth: int) -> bytes:
    packed = msgpack.packb(header)
    placeholder = msgpack.packb(DEEP)
    assert packed.count(placeholder) == 1
    return packed.replace(placeholder, deep_bytes(depth))


def check_decoded(batch: TrajectoryBatch) -> None:
    """What an accepted batch must satisfy: what reaches the loss is finite, every token id in the vocabulary."""
    for name in FINITE_FIELDS:
        if name in batch and batch[name].dtype.kind == "f":
            assert np.isfinite(batch[name]).all(), name
    for name in ("tokens", "teacher_top_ids"):
        if name in batch and batch[name].size:
            assert 0 <= batch[name].min() and batch[name].max() < VOCAB, name


# ---- the fuzz ---------------------------------------------------------------------------------------

HOSTILE = [
    -1, 0, 1, 7, 2**31 - 1, 2**31, 2**32, 2**63 - 1, 2**64 - 1, -(2**63),
    True, False, None, 1.0, 0.5, float("nan"), float("inf"), "", "x" * 2000, "float32", "bfloat16", b"\x00\xff",
    [], {}, [0], [0, 2**64 - 1], [2**31], [0, 2**31], [0, 2**31 - 1, 2**31 - 1, 2**31 - 1], [True, 5], [3.0, 5],
    [1] * 9, [-3, 5], ["a", "b"], {"k": [1, {"x": None}]}, msgpack.ExtType(1, b"ext"), DEEP,
]  # fmt: skip


SHAPES = [
    [0, 2**64 - 1], [0, 2**63 - 1], [0, 2**31], [2**31], [2**31, 0], [0, 2**31 - 1, 2**31 - 1, 2**31 - 1],
    [0, -1], [-1, -1], [True, 4], [1.0, 4], [0] * 9, [2**32 + 1], [5, 1, 1, 1, 1, 1, 1, 1], [], [0], [1, 0, 2**20],
]  # fmt: skip


def _containers(obj, path=()):
    """(path, container) for every list/dict in a header, the header itself first."""
    yield path, obj
    items = obj.items() if isinstance(obj, dict) else enumerate(obj)
    for k, v in items:
        if isinstance(v, (list, dict)):
            yield from _containers(v, (*path, k))


def _at(obj, path):
    for k in path:
        obj = obj[k]
    return obj


def mutate(frames: list[bytes], rng: np.random.Generator) -> tuple[str, list[bytes]]:
    """One random mutation of a valid message: (its kind, the frames)."""
    frames = list(frames)
    kinds = ["bitflip_header", "bitflip_data", "truncate", "extend", "header_value", "shape", "named", "frames"]
    kind = [*kinds, "poison", "garbage"][int(rng.integers(len(kinds) + 2))]
    if kind in ("bitflip_header", "bitflip_data"):
        i = 0 if kind == "bitflip_header" else int(rng.integers(1, len(frames)))
        raw = bytearray(frames[i])
        for _ in range(int(rng.integers(1, 9))):
            if raw:
                pos = int(rng.integers(len(raw)))
                raw[pos] ^= 1 << int(rng.integers(8))
        frames[i] = bytes(raw)
    elif kind in ("truncate", "extend"):
        i = int(rng.integers(len(frames)))
        n = int(rng.integers(1, 9))
        frames[i] = frames[i][: max(0, len(frames[i]) - n)] if kind == "truncate" else frames[i] + bytes(n)
    elif kind == "header_value":
        header = msgpack.unpackb(frames[0])
        path, box = list(_containers(header))[int(rng.integers(len(list(_containers(header)))))]
        value = HOSTILE[int(rng.integers(len(HOSTILE)))]
        if isinstance(box, dict):
            key = list(box)[int(rng.integers(len(box)))] if box and rng.random() < 0.9 else "extra"
            box[key] = value
        elif box:
            box[int(rng.integers(len(box)))] = value
        else:
            box.append(value)
        frames[0] = pack_with_deep(header, 1000) if value == DEEP else msgpack.packb(header)
    elif kind == "shape":  # a hostile shape, with a frame of the length it announces where that is small
        header = msgpack.unpackb(frames[0])
        specs = [s for b in header["buckets"] for s in b] if "buckets" in header else header["fields"]
        i = int(rng.integers(len(specs)))
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        specs[i][2] = shape
        frames[0] = msgpack.packb(header)
        n = math.prod(shape) if all(type(d) is int for d in shape) else 0
        frames[1 + i] = bytes(max(0, n) * 4) if n <= 4096 else b""
    elif kind == "named":  # the other shapes the issue names, on the header's own keys
        header = msgpack.unpackb(frames[0])
        which = int(rng.integers(4))
        if which < 2:
            header["schema"] = [True, 1.0][which]
        else:
            header["meta" if "meta" in header else "extra"] = {"x": DEEP} if which == 2 else DEEP
        frames[0] = pack_with_deep(header, int(rng.integers(33, 1000))) if which >= 2 else msgpack.packb(header)
    elif kind == "frames":
        i = int(rng.integers(len(frames)))
        frames = frames[:i] + frames[i + 1 :] if rng.random() < 0.5 else frames[: i + 1] + frames[i:]
    elif kind == "poison":  # a value the loss must not see, in a frame of the right length
        header = msgpack.unpackb(frames[0])
        specs = [s for b in header["buckets"] for s in b] if "buckets" in header else header["fields"]
        i = int(rng.integers(len(specs)))
        dt = wire.DTYPES.get(specs[i][1])
        if dt is not None and len(frames[1 + i]):
            arr = np.frombuffer(frames[1 + i], dtype=dt).copy()
            if dt.kind == "f":
                bad = [np.nan, np.inf, -np.inf]
            else:
                info = np.iinfo(dt) if dt.kind in "iu" else None
                bad = [v for v in (-1, VOCAB, VOCAB + 1000, -(2**31)) if info and info.min <= v <= info.max]
            if bad:
                arr[int(rng.integers(arr.size))] = bad[int(rng.integers(len(bad)))]
            frames[1 + i] = arr.tobytes()
    else:
        frames = [rng.bytes(int(rng.integers(0, 200))) for _ in range(int(rng.integers(1, 4)))]
    return kind, frames


def test_fuzzed_frames_raise_only_wire_errors():
    """A few thousand mutated messages, each through both decoders: a clean result or a WireError."""
    rng = np.random.default_rng(20250825)
    bases = [batch_frames(0), batch_frames(1, meta={"run": "r", "tags": [1, None, {"a": [True]}]}), weight_frames()]
    escaped: list[str] = []
    outcomes: Counter = Counter()
    t0 = time.monotonic()
    for n in range(3000):
        kind, frames = mutate(bases[n % len(bases)], rng)
        for name, fn in (("decode", lambda f: decode(f, vocab_size=VOCAB)), ("decode_update", decode_update)):
            try:
                out = fn(frames)
            except WireError as e:
                outcomes[type(e).__name__] += 1
                continue
            except Exception as e:  # noqa: BLE001 - what this test is for
                escaped.append(f"#{n} {kind} -> {name}: {type(e).__name__}: {str(e)[:200]}")
                continue
            outcomes["accepted"] += 1
            if isinstance(out, TrajectoryBatch):
                check_decoded(out)
    assert not escaped, f"{len(escaped)} of 6000 decodes raised something other than a WireError:\n" + "\n".join(
        escaped[:20]
    )
    # the fuzz reaches the checks that matter (not just "not msgpack")
    for reason in ("ForeignMessage", "SchemaMismatch", "BadMeta", "ShapeMismatch", "ByteLengthMismatch", "BadValue"):
        assert outcomes[reason] > 0, (reason, outcomes)
    assert outcomes["accepted"] > 0
    assert time.monotonic() - t0 < 30


# ---- the named shapes, one by one -----------------------------------------------------------------------


@pytest.mark.parametrize("depth", [40, 1000])
def test_deeply_nested_metadata_is_refused_not_a_recursion_error(depth):
    frames = batch_frames()
    header = msgpack.unpackb(frames[0])
    header["meta"]["tags"] = DEEP
    with pytest.raises(BadMeta, match="header\\['meta'\\] is nested deeper than 32 levels"):
        decode([pack_with_deep(header, depth), *frames[1:]])
    wframes = weight_frames()
    wheader = msgpack.unpackb(wframes[0])
    wheader["extra"] = DEEP
    with pytest.raises(BadMeta, match="header\\['extra'\\] is nested deeper"):
        decode_update([pack_with_deep(wheader, depth), *wframes[1:]])
    # deeper than msgpack's own stack: not msgpack we read
    with pytest.raises(ForeignMessage, match="not msgpack"):
        decode([pack_with_deep(header, 5000), *frames[1:]])


def test_nesting_within_the_bound_is_accepted():
    meta = {"a": [[[[{"b": [1, 2]}]]]]}
    assert decode(batch_frames(meta=meta)).meta == meta


def _with_shape(frames, i, shape, frame=b""):
    out = with_header(frames, lambda h: h["fields"][i].__setitem__(2, shape))
    out[1 + i] = frame
    return out


@pytest.mark.parametrize(
    "shape,err,match",
    [
        ([0, 2**31], ShapeMismatch, "has a dim above 2147483647"),
        ([0, 2**64 - 1], ShapeMismatch, "has a dim above 2147483647"),
        ([0, 2**63 - 1], ShapeMismatch, "has a dim above"),
        ([0, 2**31 - 1, 2**31 - 1, 2**31 - 1], ShapeMismatch, "is over 1099511627776 bytes counting its non-zero"),
        ([2**31, 2], ByteLengthMismatch, "frame has 0 bytes"),
        ([2, -5], ShapeMismatch, "is not a list of at most 8 non-negative ints"),
        ([2, True], ShapeMismatch, "non-negative ints"),
        ([2.0, 5], ShapeMismatch, "non-negative ints"),
        ([0] * 9, ShapeMismatch, "at most 8"),
        ("25", ShapeMismatch, "non-negative ints"),
    ],
)
def test_impossible_dims_are_refused_by_both_decoders(shape, err, match):
    frames = batch_frames()
    with pytest.raises(err, match=match):
        decode(_with_shape(frames, 0, shape))
    wframes = weight_frames()
    forged = with_header(wframes, lambda h: h["buckets"][0][0].__setitem__(2, shape))
    forged[1] = b""
    with pytest.raises(err, match=match):
        decode_update(forged)


def test_empty_arrays_with_sane_dims_still_decode():
    upd = decode_update(weight_frames())
    assert dict(upd.named_tensors())["empty"].shape == (0, 2)
    forged = with_header(weight_frames(), lambda h: h["buckets"][0][0].__setitem__(2, [0, 2**31 - 1]))
    forged[1] = b""
    assert dict(decode_update(forged).named_tensors())["w"].shape == (0, 2**31 - 1)


@pytest.mark.parametrize("forge", [bool, float, str, lambda v: [v], lambda v: None, lambda v: v + 1])
def test_schema_version_must_be_exactly_the_int(forge):
    for dec, frames, version in (
        (decode, batch_frames(), wire.SCHEMA_VERSION),
        (decode_update, weight_frames(), WEIGHTS_SCHEMA_VERSION),
    ):
        schema = forge(version)  # equal to the version (True == 1, 2.0 == 2), spelled like it, or another one
        if type(schema) is int:
            match = f"this reader speaks {version}"
        else:
            match = f"of type {type(schema).__name__}, expected the int {version}"
        with pytest.raises(SchemaMismatch, match=match):
            dec(with_header(frames, lambda h: h.update(schema=schema)))


@pytest.mark.parametrize("version", [True, 3.0, None, "3"])
def test_weights_version_must_be_an_int(version):
    with pytest.raises(ForeignMessage, match="weights header version is .*, expected an int"):
        decode_update(with_header(weight_frames(), lambda h: h.update(version=version)))


@pytest.mark.parametrize("field", ["tokens", "teacher_top_ids"])
def test_token_ids_outside_the_vocabulary_are_refused(field):
    arrays = batch_arrays()
    ok = batch_frames()
    assert decode(ok, vocab_size=VOCAB).tokens.max() < VOCAB
    high = arrays[field].copy()
    high.flat[3] = VOCAB
    frames = batch_frames(**{field: high})
    with pytest.raises(BadValue, match=f"field '{field}': token id {VOCAB} at .*, expected \\[0, {VOCAB}\\)"):
        decode(frames, vocab_size=VOCAB)
    assert decode(frames).arrays[field].max() == VOCAB  # a receiver that does not know the vocabulary lets it be
    low = arrays[field].copy()
    low.flat[-1] = -1
    with pytest.raises(BadValue, match=f"field '{field}': token id -1 at .*, expected non-negative ids"):
        decode(batch_frames(**{field: low}))  # a negative id is never one


@pytest.mark.parametrize("field", ["behaviour_logprobs", "teacher_logprobs", "teacher_top_logprobs", "advantages"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_that_reach_the_loss_are_refused(field, bad):
    arr = batch_arrays()[field].copy()
    arr.flat[0] = bad  # column 0 is masked out of the loss; refused all the same (0 * nan is nan)
    arr.flat[-1] = bad
    with pytest.raises(BadValue, match=f"field '{field}': 2 non-finite values \\(first {bad} at \\[0, 0"):
        decode(batch_frames(**{field: arr}))


def test_finite_check_passes_large_finite_float64_and_ignores_other_fields():
    big = np.full((B, S), 1e308, np.float64)  # its float64 sum overflows; every value is finite
    assert decode(batch_frames(advantages=big)).arrays["advantages"][0, 0] == 1e308
    weird = np.full((B, S), np.nan, np.float32)  # a field readers do not use: not ours to judge
    assert np.isnan(decode(batch_frames(extra_field=weird)).arrays["extra_field"]).all()


def test_unpack_bucket_refuses_malformed_buckets():
    good = pack_bucket(4, [("w", torch.ones(2, dtype=torch.bfloat16))])
    assert torch.equal(unpack_bucket(good, 4)[0][1], torch.ones(2, dtype=torch.bfloat16))
    for obj, match in [
        ({**good, "version": True}, "a bucket of version True"),
        ({**good, "version": 4.0}, "a bucket of version 4.0"),
        ({"version": 4}, "'tensors' is NoneType, expected a list"),
        ({"version": 4, "tensors": [("w", np.ones(2))]}, "entry 0 is not \\(name, array, dtype name\\)"),
        ({"version": 4, "tensors": [("w", [1, 2], "float32")]}, "not a str name and a numeric numpy array"),
        ({"version": 4, "tensors": [("w", np.array([object()]), "float32")]}, "numeric numpy array"),
        ({"version": 4, "tensors": [("w", np.ones(2, np.float32), "complex")]}, "dtype name 'complex'"),
        ({"version": 4, "tensors": [("w", np.ones(2, np.float32), "bfloat16")]}, "of the same width"),
    ]:
        with pytest.raises(WeightUpdateError, match=match):
            unpack_bucket(obj, 4)


def test_the_inbox_counts_every_refusal_by_class():
    """Through a learner inbox that knows its vocabulary: each hostile batch is dropped and counted, the good one kept."""
    deep = msgpack.unpackb(batch_frames()[0])
    deep["meta"]["x"] = DEEP
    nan = batch_arrays()["behaviour_logprobs"].copy()
    nan[1, 2] = np.nan
    oov = batch_arrays()["tokens"].copy()
    oov[0, 1] = VOCAB
    hostile = {
        "BadMeta": [pack_with_deep(deep, 1000), *batch_frames()[1:]],
        "SchemaMismatch": with_header(batch_frames(), lambda h: h.update(schema=True)),
        "ShapeMismatch": _with_shape(batch_frames(), 0, [0, 2**64 - 1]),
        "BadValue": batch_frames(behaviour_logprobs=nan),
    }
    inbox = LearnerInbox("tcp://127.0.0.1:0", vocab_size=VOCAB)
    try:
        import zmq

        sock = zmq.Context.instance().socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 5000)
        sock.connect(inbox.endpoint)
        for frames in hostile.values():
            sock.send_multipart(frames)
        sock.close()
        with Pusher(inbox.endpoint) as pusher:
            bad_ids = batch_arrays()
            bad_ids["tokens"], bad_ids["sample_ids"] = oov, np.array([7, 8], np.int64)
            assert pusher.send(TrajectoryBatch.from_arrays(bad_ids), timeout_s=30)  # valid on the wire, not here
            good = batch_arrays()
            good["sample_ids"] = np.array([100, 101], np.int64)
            assert pusher.send(TrajectoryBatch.from_arrays(good), timeout_s=30)
            got, report = inbox.take([100, 101], version=0, max_staleness=1, timeout_s=30)
        assert report["trained"] == [100, 101] and got is not None
        t0 = time.monotonic()  # refused here with known ids: reported at once, not waited for
        assert inbox.take([7, 8], version=0, max_staleness=1, timeout_s=60)[1]["missing"] == [7, 8]
        assert time.monotonic() - t0 < 10
        deadline = time.monotonic() + 30  # the hostile frames came on another socket: they may land after the rest
        while (stats := inbox.stats())["dropped_malformed"] < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert inbox.thread.is_alive()
    finally:
        inbox.close()
    want = Counter(hostile.keys())
    want["BadValue"] += 1  # the out-of-vocabulary batch
    assert stats["dropped_malformed"] == sum(want.values()) == 5
    assert Counter(stats["malformed_reasons"]) == want
    assert inbox.puller.received == 1
