"""The trajectory batch contract and its wire encoding.

A `TrajectoryBatch` is what crosses the network from the teacher pool to the learner:
named numpy arrays plus a small JSON-able `meta` dict. On the wire it is one ZMQ
multipart message:

    frame 0     msgpack header {magic, kind, schema, fields: [[name, dtype, shape], ...], meta}
    frame 1..n  the raw bytes of each array, in header order, C order, little-endian

Why this shape and not pickle: pickle executes code on load (a stray or hostile
message would run arbitrary code in the learner) and copies every array twice. Here the
header is plain data, dtypes come from an allow-list (never `object`), and each array
travels as its own buffer: `encode` hands out memoryviews of the producer's arrays and
`decode` wraps the received frames with `np.frombuffer`, so neither side copies array
data. Decoded arrays are therefore views of the received frames: read-only when the
frames are immutable (bytes), writable when they are ZMQ frames the receiver owns.

Every check fails with a `WireError` subclass whose message names the field and what
was expected, so the receiving side can count drops by class (see `zeda_rl.transport`).
No other exception class escapes a decoder, whatever the bytes (tests/test_wire_fuzz.py):
headers nested deeper than `MAX_DEPTH`, dims that are not plain ints in [0, 2^31), shapes
too big even for an empty array and schema versions that are not exactly the int are all
refused. `decode` also reads the data that reaches the loss once: a non-finite log-prob
(or advantage) or a token id outside [0, vocab_size) is refused as `BadValue`.
Bump `SCHEMA_VERSION` on any change that an old reader would misread.
"""

from __future__ import annotations

import math
import reprlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

SCHEMA_VERSION = 2  # 2: routed_experts row-first, [B, S, L, K] (1 had [L, B, S, K])
MAGIC = "zeda-rl"
KIND = "trajectory"
MAX_HEADER_BYTES = 1 << 20  # a header is a few hundred bytes; anything huge is not ours
MAX_NDIM = 8
MAX_DIM = 2**31 - 1  # one dimension of an array; no field of ours comes near it
MAX_ARRAY_BYTES = 1 << 40  # an array's size counting its non-zero dims only (numpy and torch check that product)
MAX_DEPTH = 32  # nesting of the header (the header dict is level 1, so meta may nest 30 deep)

# Wire dtype name -> numpy dtype. Explicitly little-endian, so the bytes mean the same on any host.
DTYPES: dict[str, np.dtype] = {
    name: np.dtype(code)
    for name, code in {
        "bool": "?",
        "uint8": "u1",
        "int8": "i1",
        "uint16": "<u2",
        "int16": "<i2",
        "uint32": "<u4",
        "int32": "<i4",
        "int64": "<i8",
        "float16": "<f2",
        "float32": "<f4",
        "float64": "<f8",
    }.items()
}

# Field name -> (allowed dtype names, symbolic shape). "B"/"S"/"V" must agree across fields;
# "L"/"K" are free (routed experts: layers x top-k). Every per-sample field is row-first ([B, ...]).
REQUIRED: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "tokens": (("int32",), ("B", "S")),
    "loss_mask": (("uint8", "bool"), ("B", "S")),
    "behaviour_logprobs": (("float32",), ("B", "S")),
    "teacher_logprobs": (("float32",), ("B", "S")),
    "policy_version": (("int64",), ("B",)),
    "sample_ids": (("int64",), ("B",)),
}
OPTIONAL: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "routed_experts": (("int16", "int32"), ("B", "S", "L", "K")),
    "attention_mask": (("uint8", "bool"), ("B", "S")),
    # opd.objective full_kl: the teacher's top-k next tokens at every position (k = the vocabulary: exact KL)
    "teacher_top_ids": (("int32",), ("B", "S", "V")),
    "teacher_top_logprobs": (("float32",), ("B", "S", "V")),
}
# Fields not named above are allowed (forward room for e.g. advantages), with any
# allow-listed dtype and any shape; readers that do not know them ignore them.

# Float fields that reach the loss: every value must be finite (a NaN or inf would poison the step).
FINITE_FIELDS = ("behaviour_logprobs", "teacher_logprobs", "teacher_top_logprobs", "advantages")
# Token id fields: every value in [0, vocab_size) (just >= 0 where the receiver does not know the vocabulary).
TOKEN_FIELDS = ("tokens", "teacher_top_ids")


class WireError(ValueError):
    """A message that does not meet the wire contract. Subclasses name the kind of failure."""


class ForeignMessage(WireError):
    """Not a zeda-rl message of the expected kind (bad msgpack, wrong magic or kind)."""


class SchemaMismatch(WireError):
    """A zeda-rl message written with another schema version."""


class MissingField(WireError):
    """A required field is absent."""


class BadDtype(WireError):
    """A dtype outside the allow-list, or not the one the field requires."""


class FrameCountMismatch(WireError):
    """The number of frames differs from what the header announces."""


class ByteLengthMismatch(WireError):
    """A frame's length is not prod(shape) * itemsize (e.g. a truncated frame)."""


class ShapeMismatch(WireError):
    """A field has the wrong rank, or B/S disagree between fields."""


class BadMeta(WireError):
    """`meta` (or a header entry) is not plain JSON-able data."""


class BadValue(WireError):
    """Array data the loss must not see: a non-finite log-prob, or a token id outside the vocabulary."""


class ForeignRun(WireError):
    """A valid batch stamped with another run's id (a stale producer of an earlier run, or another run's)."""


# ---- shared header / frame helpers (also used by zeda_rl.weights) ------------------------------

_repr = reprlib.Repr()
_repr.maxlevel, _repr.maxstring, _repr.maxother, _repr.maxlist, _repr.maxdict = 3, 60, 60, 10, 6


def short(value: Any) -> str:
    """A bounded repr of a received value for an error message (a header may be 1 MiB, or nested 1,000 deep)."""
    try:
        return _repr.repr(value)
    except Exception:  # a repr that fails must not turn a WireError into something else
        return f"<{type(value).__name__}>"


def as_buffer(frame: Any) -> memoryview:
    """A flat byte view of one received frame: bytes, bytearray, memoryview or zmq.Frame."""
    buf = getattr(frame, "buffer", frame)  # zmq.Frame exposes its memory as .buffer
    try:
        mv = memoryview(buf)
    except TypeError as e:
        raise ForeignMessage(f"frame of type {type(frame).__name__} is not a byte buffer") from e
    if mv.ndim != 1 or mv.itemsize != 1:
        try:
            mv = mv.cast("B")
        except TypeError as e:  # a non-contiguous buffer
            raise ForeignMessage(f"frame of type {type(frame).__name__} is not a contiguous byte buffer") from e
    return mv


def array_frame(arr: np.ndarray) -> memoryview:
    """The bytes of a C-contiguous array, as a memoryview sharing its memory (no copy)."""
    return memoryview(arr.reshape(-1).view(np.uint8))


def pack_header(header: dict) -> bytes:
    return msgpack.packb(header, use_bin_type=True)


def unpack_header(frames: list, kind: str, schema: int) -> dict:
    """Frame 0 as a header dict of the expected kind and schema version, or a WireError."""
    if not isinstance(frames, (list, tuple)) or not frames:
        raise ForeignMessage("empty message: expected at least a header frame")
    buf = as_buffer(frames[0])
    if len(buf) > MAX_HEADER_BYTES:
        raise ForeignMessage(f"header frame is {len(buf)} bytes, larger than {MAX_HEADER_BYTES}: not a {MAGIC} message")
    try:
        header = msgpack.unpackb(buf, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises several unrelated classes on garbage
        raise ForeignMessage(f"frame 0 is not msgpack ({type(e).__name__}: {e}): not a {MAGIC} message") from e
    if not isinstance(header, dict) or header.get("magic") != MAGIC:
        got = short(header.get("magic")) if isinstance(header, dict) else type(header).__name__
        raise ForeignMessage(f"header magic is {got}, expected {MAGIC!r}: not a {MAGIC} message")
    check_depth(header)
    if header.get("kind") != kind:
        raise ForeignMessage(f"message kind is {short(header.get('kind'))}, expected {kind!r}")
    got = header.get("schema")
    if type(got) is not int:  # True == 1 and 1.0 == 1 in Python; neither is a schema version
        raise SchemaMismatch(
            f"{kind} schema version is {short(got)} of type {type(got).__name__}, expected the int {schema}"
        )
    if got != schema:
        raise SchemaMismatch(f"{kind} schema version is {got}, this reader speaks {schema}")
    return header


def check_depth(header: dict, limit: int = MAX_DEPTH) -> None:
    """BadMeta if the header nests lists/dicts deeper than `limit` levels (checkers that recurse, repr
    included, would otherwise hit Python's recursion limit on a header nested ~1,000 deep). Iterative."""
    nested = (list, tuple, dict)
    stack: list[tuple[Any, int, Any]] = [(v, 2, k) for k, v in header.items() if isinstance(v, nested)]
    while stack:
        value, depth, top = stack.pop()
        if depth > limit:
            raise BadMeta(f"header[{short(top)}] is nested deeper than {limit} levels, at most {limit} allowed")
        children = value.values() if isinstance(value, dict) else value
        stack.extend((v, depth + 1, top) for v in children if isinstance(v, nested))


def parse_spec(spec: Any, where: str, dtypes: Mapping[str, Any]) -> tuple[str, str, tuple[int, ...]]:
    """One header entry [name, dtype, shape], checked: allow-listed dtype, sane shape."""
    if not (
        isinstance(spec, (list, tuple)) and len(spec) == 3 and isinstance(spec[0], str) and isinstance(spec[1], str)
    ):
        raise ForeignMessage(f"{where}: header entry {short(spec)} is not [name, dtype, shape]")
    name, dtype, shape = spec
    if dtype not in dtypes:
        raise BadDtype(f"{where} {short(name)}: dtype {short(dtype)} is not allowed (allowed: {', '.join(dtypes)})")
    if not (
        isinstance(shape, (list, tuple))
        and len(shape) <= MAX_NDIM
        and all(type(d) is int and d >= 0 for d in shape)  # type(): bool is an int subclass, and not a dim
    ):
        raise ShapeMismatch(
            f"{where} {short(name)}: shape {short(shape)} is not a list of at most {MAX_NDIM} non-negative ints"
        )
    return name, dtype, tuple(shape)


def check_frame_count(frames: list, n_arrays: int, kind: str) -> None:
    if len(frames) != n_arrays + 1:
        raise FrameCountMismatch(f"{kind} message has {len(frames)} frames, header announces 1 + {n_arrays}")


def check_length(buf: memoryview, name: str, shape: tuple[int, ...], itemsize: int, where: str) -> None:
    """The frame holds exactly prod(shape) items (ByteLengthMismatch), and the shape is one numpy and
    torch can build (ShapeMismatch): every dim below 2^31, and not too big even when a zero dim empties it."""
    expected = math.prod(shape) * itemsize
    if len(buf) != expected:
        raise ByteLengthMismatch(
            f"{where} {short(name)}: frame has {len(buf)} bytes, shape {short(list(shape))} x {itemsize} B needs"
            f" {short(expected)}"
        )
    if any(d > MAX_DIM for d in shape):
        raise ShapeMismatch(f"{where} {short(name)}: shape {short(list(shape))} has a dim above {MAX_DIM} (2^31 - 1)")
    if math.prod(d for d in shape if d) * itemsize > MAX_ARRAY_BYTES:
        raise ShapeMismatch(
            f"{where} {short(name)}: shape {short(list(shape))} x {itemsize} B is over {MAX_ARRAY_BYTES} bytes"
            " counting its non-zero dims"
        )


def check_meta(meta: Any, where: str = "meta") -> None:
    """Plain JSON-able data only: None, bool, int, float, str, lists and str-keyed dicts."""
    if meta is None or isinstance(meta, (bool, int, float, str)):
        return
    if isinstance(meta, (list, tuple)):
        for i, v in enumerate(meta):
            check_meta(v, f"{where}[{i}]")
        return
    if isinstance(meta, dict):
        for k, v in meta.items():
            if not isinstance(k, str):
                raise BadMeta(f"{where}: key {k!r} is {type(k).__name__}, expected str")
            check_meta(v, f"{where}[{k!r}]")
        return
    raise BadMeta(f"{where}: value of type {type(meta).__name__} is not plain JSON-able data")


# ---- the batch ---------------------------------------------------------------------------------


def wire_dtype(arr: np.ndarray, name: str) -> str:
    """The allow-listed wire name of an array's dtype, or BadDtype naming the field."""
    dt = arr.dtype
    for wname, wdt in DTYPES.items():
        if dt.kind == wdt.kind and dt.itemsize == wdt.itemsize:
            return wname
    raise BadDtype(f"field {name!r}: dtype {dt} is not allowed on the wire (allowed: {', '.join(DTYPES)})")


@dataclass
class TrajectoryBatch:
    """Named arrays of one training batch (see REQUIRED/OPTIONAL for fields) plus JSON-able meta.

    Build it with `from_arrays`, which validates; the alignment convention of the arrays
    is the one of `zeda_rl.trajectory.pack_samples`.
    """

    arrays: dict[str, np.ndarray]
    meta: dict = field(default_factory=dict)

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], meta: Mapping | None = None) -> "TrajectoryBatch":
        batch = cls(dict(arrays), dict(meta or {}))
        validate(batch)
        return batch

    def __getitem__(self, name: str) -> np.ndarray:
        return self.arrays[name]

    def __contains__(self, name: str) -> bool:
        return name in self.arrays

    def get(self, name: str, default=None):
        return self.arrays.get(name, default)

    @property
    def tokens(self) -> np.ndarray:
        return self.arrays["tokens"]

    @property
    def loss_mask(self) -> np.ndarray:
        return self.arrays["loss_mask"]

    @property
    def behaviour_logprobs(self) -> np.ndarray:
        return self.arrays["behaviour_logprobs"]

    @property
    def teacher_logprobs(self) -> np.ndarray:
        return self.arrays["teacher_logprobs"]

    @property
    def policy_version(self) -> np.ndarray:
        return self.arrays["policy_version"]

    @property
    def sample_ids(self) -> np.ndarray:
        return self.arrays["sample_ids"]

    @property
    def routed_experts(self) -> np.ndarray | None:
        return self.arrays.get("routed_experts")

    @property
    def attention_mask(self) -> np.ndarray | None:
        return self.arrays.get("attention_mask")

    @property
    def batch_size(self) -> int:
        return int(self.arrays["tokens"].shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.arrays["tokens"].shape[1])

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in self.arrays.values())


def validate(batch: TrajectoryBatch) -> None:
    """Producer-side check of the contract: fields, dtypes, ranks, B/S agreement, meta.

    Structural only (no pass over the data), so it is cheap enough to run on every send
    and again on every receive.
    """
    if not isinstance(batch, TrajectoryBatch):
        raise WireError(f"expected a TrajectoryBatch, got {type(batch).__name__}")
    arrays = batch.arrays
    for name in REQUIRED:
        if name not in arrays:
            raise MissingField(f"required field {short(name)} is missing (have: {', '.join(arrays) or 'none'})")
    dims: dict[str, tuple[int, str]] = {}  # "B"/"S" -> (size, field that set it)
    for name, arr in arrays.items():
        if not isinstance(name, str):
            raise WireError(f"field name {short(name)} is not a str")
        if not isinstance(arr, np.ndarray):
            raise WireError(f"field {short(name)}: expected a numpy array, got {type(arr).__name__}")
        if arr.ndim > MAX_NDIM:
            raise ShapeMismatch(f"field {short(name)}: {arr.ndim} dims, at most {MAX_NDIM} allowed")
        wname = wire_dtype(arr, name)
        spec = REQUIRED.get(name) or OPTIONAL.get(name)
        if spec is None:
            continue
        allowed, sym = spec
        if wname not in allowed:
            raise BadDtype(f"field {short(name)}: dtype {wname}, expected {' or '.join(allowed)}")
        if arr.ndim != len(sym):
            raise ShapeMismatch(
                f"field {short(name)}: shape {list(arr.shape)} has {arr.ndim} dims, expected [{','.join(sym)}]"
            )
        for d, size in zip(sym, arr.shape):
            if d not in ("B", "S", "V"):
                continue
            if d in dims and dims[d][0] != size:
                raise ShapeMismatch(
                    f"field {short(name)}: shape {list(arr.shape)} has {d}={size}, but {dims[d][1]!r} has {d}={dims[d][0]}"
                )
            dims.setdefault(d, (size, name))
    if not isinstance(batch.meta, dict):
        raise BadMeta(f"meta is {type(batch.meta).__name__}, expected a dict")
    check_meta(batch.meta)


def encode(batch: TrajectoryBatch) -> list[bytes | memoryview]:
    """Header frame + one zero-copy frame per array (validated first).

    Frames are memoryviews of the batch's own arrays (a non-contiguous or big-endian
    array is copied once): do not write into the arrays until the send has completed.
    """
    validate(batch)
    specs, frames = [], []
    for name, arr in batch.arrays.items():
        wname = wire_dtype(arr, name)
        want = DTYPES[wname]
        if arr.dtype != want or not arr.flags.c_contiguous:
            arr = np.ascontiguousarray(arr, dtype=want)
        specs.append([name, wname, list(arr.shape)])
        frames.append(array_frame(arr))
    header = {"magic": MAGIC, "kind": KIND, "schema": SCHEMA_VERSION, "fields": specs, "meta": batch.meta}
    return [pack_header(header), *frames]


def check_token_ids(arrays: Mapping[str, np.ndarray], vocab_size: int | None = None) -> None:
    """BadValue unless every id in TOKEN_FIELDS is in [0, vocab_size) (>= 0 when vocab_size is None)."""
    for name in TOKEN_FIELDS:
        a = arrays.get(name)
        if a is None or a.size == 0 or a.dtype.kind not in "iu":
            continue
        lo, hi = int(a.min()), int(a.max())
        if lo < 0 or (vocab_size is not None and hi >= vocab_size):
            bad = lo if lo < 0 else hi
            where = tuple(int(i) for i in np.unravel_index(int(np.argmax(a == bad)), a.shape))
            want = f"[0, {vocab_size})" if vocab_size is not None else "non-negative ids"
            raise BadValue(f"field {name!r}: token id {bad} at {list(where)}, expected {want}")


def check_finite(arrays: Mapping[str, np.ndarray]) -> None:
    """BadValue if a float field of FINITE_FIELDS holds a NaN or an inf, naming the field and the first one."""
    for name in FINITE_FIELDS:
        a = arrays.get(name)
        if a is None or a.size == 0 or a.dtype.kind != "f":
            continue
        # One pass, no temporary of the array's size: a float64 sum of float16/32 values is finite
        # exactly when every value is (float64 sums of float64 can overflow, so confirm before refusing).
        with np.errstate(invalid="ignore", over="ignore"):
            if np.isfinite(np.sum(a, dtype=np.float64)):
                continue
        bad = ~np.isfinite(a)
        if not bad.any():
            continue
        first = tuple(int(i) for i in np.unravel_index(int(np.argmax(bad)), a.shape))
        raise BadValue(
            f"field {name!r}: {int(bad.sum())} non-finite values (first {a[first]} at {list(first)}), expected finite"
        )


def check_values(batch: TrajectoryBatch, vocab_size: int | None = None) -> None:
    """The data checks `decode` runs (one pass over the checked fields): finite log-probs and advantages,
    token ids in [0, vocab_size)."""
    check_finite(batch.arrays)
    check_token_ids(batch.arrays, vocab_size)


def decode(frames: list, vocab_size: int | None = None) -> TrajectoryBatch:
    """Frames (bytes, memoryviews or zmq.Frames) back to a validated TrajectoryBatch.

    Arrays are views of the frames (no copy) and keep them alive; they are read-only
    when a frame is immutable (bytes). A frame whose address is not aligned for its dtype
    (small ZMQ frames can be) is copied once, so every array is aligned. `vocab_size`: the
    receiver's vocabulary, when it knows it (token ids at or above it are refused).
    """
    header = unpack_header(frames, KIND, SCHEMA_VERSION)
    fields_ = header.get("fields")
    if not isinstance(fields_, list):
        raise ForeignMessage(f"{KIND} header has no 'fields' list")
    check_frame_count(frames, len(fields_), KIND)
    meta = header.get("meta", {})
    if not isinstance(meta, dict):
        raise BadMeta(f"meta is {type(meta).__name__}, expected a dict")
    arrays: dict[str, np.ndarray] = {}
    for spec, frame in zip(fields_, frames[1:]):
        name, dtype, shape = parse_spec(spec, "field", DTYPES)
        if name in arrays:
            raise WireError(f"field {short(name)} appears twice in the header")
        dt = DTYPES[dtype]
        buf = as_buffer(frame)
        check_length(buf, name, shape, dt.itemsize, "field")
        arr = np.frombuffer(buf, dtype=dt).reshape(shape)
        if not arr.flags.aligned:
            # libzmq receives small messages into a shared buffer at arbitrary offsets; torch
            # and vectorised kernels want aligned data, and copying a few KB costs nothing.
            arr = arr.copy()
        arrays[name] = arr
    batch = TrajectoryBatch(arrays, meta)
    validate(batch)
    check_values(batch, vocab_size)
    return batch
