"""The weight-update contract: a policy version plus ordered buckets of named tensors.

The learner publishes weights v+1 as a `WeightUpdate`; rollout engines apply it between
generation batches and report the version they now serve. Buckets exist because real
engines (SGLang's update_weights_from_tensor, NCCL broadcasts) take weights in chunks of
bounded size: `make_buckets` cuts an ordered stream of (HF name, tensor) pairs into
groups of at most `bucket_bytes` without reordering, so a receiver can apply them as they
come and memory stays bounded.

On the wire it is the same scheme as `zeda_rl.wire`: one msgpack header frame
{magic, kind="weights", schema, version, buckets: [[[name, dtype, shape], ...], ...]}
then one raw frame per tensor in bucket order. numpy has no bfloat16 (nor float8), so
those tensors travel as same-width unsigned integer views with the true dtype recorded
in the header; decoding reinterprets the bytes, it never converts.

`apply_update` is all-or-nothing for everything that can be checked up front: every
name, shape and dtype is validated before the first parameter is touched, so a bad
update leaves the model exactly as it was. `Staging` is the same thing spread over time:
an engine adds buckets as they arrive (while it keeps serving the old version) and
commits once the version is complete. Names may be the transformers model's (fused
experts) or the checkpoint's per-expert ones, which land in slices of the fused tensors.

Two transports carry buckets without a detour through the driver (`learner.publish`):
- Ray's object store: a bucket is `pack_bucket`'s dict of numpy arrays (zero-copy on a
  same-node `ray.get`; bf16/fp8 as same-width unsigned views, the true dtype beside them);
- a broadcast group per publishing learner rank (`join_group`: the process-group recipe
  SGLang's `init_weights_update_group` uses, so a learner rank and SGLang's TP workers
  can meet in it; nccl on GPU, gloo on CPU), fed in the order of `bucket_spec`s.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from zeda_rl.wire import (
    MAGIC,
    BadDtype,
    ForeignMessage,
    WireError,
    array_frame,
    as_buffer,
    check_frame_count,
    check_length,
    pack_header,
    parse_spec,
    short,
    unpack_header,
)

WEIGHTS_SCHEMA_VERSION = 1
KIND = "weights"
log = logging.getLogger(__name__)


class WeightUpdateError(ValueError):
    """An update that does not fit the model: unknown name, wrong shape or dtype, duplicate."""


# Wire dtype name -> torch dtype. The bytes of each are sent as-is (little-endian hosts).
TORCH_DTYPES: dict[str, torch.dtype] = {
    "bool": torch.bool,
    "uint8": torch.uint8,
    "int8": torch.int8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
}
_NAME_OF = {v: k for k, v in TORCH_DTYPES.items()}
_NUMPY_NAME = {
    np.dtype(str(v).removeprefix("torch.")): k for k, v in TORCH_DTYPES.items() if "8_e" not in k and k != "bfloat16"
}

Tensor = torch.Tensor | np.ndarray


@dataclass
class WeightUpdate:
    """Policy `version` and ordered buckets of (HF parameter/buffer name, tensor); `buckets` may be a
    one-pass iterable, so an engine can fetch each bucket only when it applies it."""

    version: int
    buckets: Iterable[list[tuple[str, Tensor]]]

    def named_tensors(self) -> Iterable[tuple[str, Tensor]]:
        for bucket in self.buckets:
            yield from bucket

    @property
    def nbytes(self) -> int:
        return sum(int(t.nbytes) for _, t in self.named_tensors())


@dataclass(frozen=True)
class WeightPush:
    """A version in Ray's object store: the buckets' references (rank order, then bucket order),
    put there by the learner ranks; whoever holds this holds no tensor."""

    version: int
    refs: tuple


def _nbytes(t: Tensor) -> int:
    return int(t.nbytes) if isinstance(t, np.ndarray) else t.numel() * t.element_size()


def iter_buckets(named_tensors: Iterable[tuple[str, Tensor]], bucket_bytes: int) -> Iterator[list[tuple[str, Tensor]]]:
    """Greedy, order-preserving groups of at most `bucket_bytes` bytes each, yielded as they fill,
    so a producer holds one bucket at a time.

    A single tensor larger than `bucket_bytes` gets a bucket of its own (tensors are
    never split, so a receiver always sees whole tensors).
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    cur: list[tuple[str, Tensor]] = []
    size = 0
    seen: set[str] = set()
    for name, t in named_tensors:
        if name in seen:
            raise ValueError(f"tensor {name!r} appears twice")
        seen.add(name)
        n = _nbytes(t)
        if cur and size + n > bucket_bytes:
            yield cur
            cur, size = [], 0
        cur.append((name, t))
        size += n
    if cur:
        yield cur


def make_buckets(named_tensors: Iterable[tuple[str, Tensor]], bucket_bytes: int) -> list[list[tuple[str, Tensor]]]:
    return list(iter_buckets(named_tensors, bucket_bytes))


def _to_wire(name: str, t: Tensor) -> tuple[str, list[int], memoryview]:
    """(dtype name, shape, zero-copy byte view) of one tensor; CPU tensors are not copied."""
    if isinstance(t, np.ndarray):
        wname = _NUMPY_NAME.get(t.dtype.newbyteorder("="))
        if wname is None:
            raise BadDtype(
                f"tensor {name!r}: numpy dtype {t.dtype} is not allowed (allowed: {', '.join(_NUMPY_NAME.values())})"
            )
        arr = np.ascontiguousarray(t, dtype=np.dtype(wname).newbyteorder("<"))
        return wname, list(arr.shape), array_frame(arr)
    if not isinstance(t, torch.Tensor):
        raise WireError(f"tensor {name!r}: expected a torch.Tensor or numpy array, got {type(t).__name__}")
    wname = _NAME_OF.get(t.dtype)
    if wname is None:
        raise BadDtype(f"tensor {name!r}: dtype {t.dtype} is not allowed (allowed: {', '.join(TORCH_DTYPES)})")
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    raw = flat.view(torch.uint8) if flat.numel() else torch.empty(0, dtype=torch.uint8)
    return wname, list(t.shape), memoryview(raw.numpy())


def encode_update(update: WeightUpdate) -> list[bytes | memoryview]:
    """Header frame + one raw frame per tensor, in bucket order (CPU tensors: no copy)."""
    if not isinstance(update.version, int) or isinstance(update.version, bool):
        raise WireError(f"version must be an int, got {update.version!r}")
    specs, frames, seen = [], [], set()
    for bucket in update.buckets:
        bspecs = []
        for name, t in bucket:
            if not isinstance(name, str) or name in seen:
                raise WireError(f"tensor name {name!r} is not a str or appears twice")
            seen.add(name)
            wname, shape, buf = _to_wire(name, t)
            bspecs.append([name, wname, shape])
            frames.append(buf)
        specs.append(bspecs)
    header = {
        "magic": MAGIC,
        "kind": KIND,
        "schema": WEIGHTS_SCHEMA_VERSION,
        "version": update.version,
        "buckets": specs,
    }
    return [pack_header(header), *frames]


def decode_update(frames: list, copy: bool = False) -> WeightUpdate:
    """Frames back to a WeightUpdate of torch tensors.

    With copy=False the tensors are views of the frames: read-only in fact (torch cannot
    mark them so), fine for `apply_update`, which only reads. copy=True gives owned tensors.
    """
    header = unpack_header(frames, KIND, WEIGHTS_SCHEMA_VERSION)
    version, bspecs = header.get("version"), header.get("buckets")
    if type(version) is not int:  # not a bool, not a float
        raise ForeignMessage(f"weights header version is {short(version)}, expected an int")
    if not (isinstance(bspecs, list) and all(isinstance(b, list) for b in bspecs)):
        raise ForeignMessage("weights header has no 'buckets' list of lists")
    check_frame_count(frames, sum(len(b) for b in bspecs), KIND)
    it = iter(frames[1:])
    buckets, seen = [], set()
    for b in bspecs:
        bucket = []
        for spec in b:
            name, dtype, shape = parse_spec(spec, "tensor", TORCH_DTYPES)
            if name in seen:
                raise WireError(f"tensor {short(name)} appears twice in the header")
            seen.add(name)
            dt = TORCH_DTYPES[dtype]
            buf = as_buffer(next(it))
            check_length(buf, name, shape, dt.itemsize, "tensor")
            if len(buf) == 0:
                t = torch.empty(shape, dtype=dt)
            else:
                with warnings.catch_warnings():  # "buffer is not writable": known, documented above
                    warnings.simplefilter("ignore", UserWarning)
                    t = torch.frombuffer(buf, dtype=dt).reshape(shape)
                if copy or t.data_ptr() % dt.itemsize:  # small ZMQ frames can sit at odd offsets
                    t = t.clone()
            bucket.append((name, t))
        buckets.append(bucket)
    return WeightUpdate(version=version, buckets=buckets)


def _as_tensor(t: Tensor) -> torch.Tensor:
    if isinstance(t, torch.Tensor):
        return t
    with warnings.catch_warnings():  # read-only numpy views are only read here
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.ascontiguousarray(t))


_PER_EXPERT = re.compile(r"^(?P<prefix>.*\.experts)\.(?P<e>\d+)\.(?P<which>gate_proj|up_proj|down_proj)\.weight$")


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    targets: dict[str, torch.Tensor] = dict(model.named_parameters(remove_duplicate=False))
    targets.update(model.named_buffers(remove_duplicate=False))
    return targets


def tensor_target(targets: dict[str, torch.Tensor], name: str) -> torch.Tensor | None:
    """The tensor a name loads into: a parameter/buffer, or for a per-expert checkpoint name the
    slice of transformers' fused expert tensor it is (`gate_up_proj` [E, 2I, H] gate rows first,
    `down_proj` [E, H, I]); None if the model has no such tensor."""
    if name in targets:
        return targets[name]
    m = _PER_EXPERT.match(name)
    if m is None:
        return None
    e, which = int(m["e"]), m["which"]
    fused = targets.get(f"{m['prefix']}.{'down_proj' if which == 'down_proj' else 'gate_up_proj'}")
    if fused is None or fused.dim() != 3 or e >= fused.shape[0]:
        return None
    if which == "down_proj":
        return fused[e]
    half = fused.shape[1] // 2
    return fused[e, :half] if which == "gate_proj" else fused[e, half:]


class Staging:
    """One version on its way into a model: every tensor checked as its bucket arrives, nothing
    copied until `commit`, so a failure before the commit leaves the model serving the old version.

    The staged tensors are kept as they came (for Ray's object store: read-only views of shared
    memory, no copy); `commit` is one copy per tensor. strict: unknown names and dtype mismatches
    are errors (else unknown names are skipped, logged); cast: other dtypes are converted by the copy.
    """

    def __init__(self, model: torch.nn.Module, version: int, strict: bool = True, cast: bool = False):
        self.version, self.strict, self.cast = int(version), strict, cast
        self.targets, self.model_name = model_tensors(model), type(model).__name__
        self.plan: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.seen: set[str] = set()
        self.skipped: list[str] = []

    def add(self, named: Iterable[tuple[str, Tensor]]) -> None:
        v = self.version
        for name, t in named:
            if name in self.seen:
                raise WeightUpdateError(f"weight update v{v}: tensor {name!r} appears twice")
            self.seen.add(name)
            src = _as_tensor(t)
            dst = tensor_target(self.targets, name)
            if dst is None:
                if self.strict:
                    raise WeightUpdateError(
                        f"weight update v{v}: tensor {name!r} is not a parameter or buffer of {self.model_name}"
                    )
                self.skipped.append(name)
                continue
            if tuple(src.shape) != tuple(dst.shape):
                raise WeightUpdateError(
                    f"weight update v{v}: tensor {name!r} has shape {list(src.shape)}, model expects {list(dst.shape)}"
                )
            if src.dtype != dst.dtype and not self.cast:
                raise WeightUpdateError(
                    f"weight update v{v}: tensor {name!r} has dtype {src.dtype}, model expects {dst.dtype}"
                )
            self.plan.append((dst, src))

    def commit(self) -> int:
        if self.skipped:
            log.warning(
                "weight update v%d: skipped %d unknown tensors, e.g. %s",
                self.version,
                len(self.skipped),
                self.skipped[:3],
            )
        with torch.no_grad():
            for dst, src in self.plan:
                dst.copy_(src)
        self.plan = []
        return self.version


def apply_update(model: torch.nn.Module, update: WeightUpdate, strict: bool = True) -> int:
    """Copy the update into the model's parameters/buffers by name; returns update.version.

    strict=True: an unknown name or a dtype mismatch is an error. strict=False: unknown
    names are skipped (logged) and dtypes are cast. A shape mismatch is always an error.
    All checks run before any copy, so on error the model is unchanged. Names the model
    has but the update lacks are left as they are (partial updates are allowed).
    """
    staged = Staging(model, update.version, strict=strict, cast=not strict)
    for bucket in update.buckets:
        staged.add(bucket)
    return staged.commit()


# ---- buckets in Ray's object store and over a broadcast group ------------------------------------


def to_numpy(t: torch.Tensor) -> tuple[np.ndarray, str]:
    """(host array, dtype name): numpy has no bf16/fp8, so those travel as same-width unsigned views."""
    name = _NAME_OF.get(t.dtype)
    if name is None:
        raise BadDtype(f"dtype {t.dtype} is not allowed (allowed: {', '.join(TORCH_DTYPES)})")
    t = t.detach().to("cpu").contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.uint16)
    elif t.dtype.itemsize == 1 and t.dtype.is_floating_point:
        t = t.view(torch.uint8)
    return t.numpy(), name


def from_numpy(a: np.ndarray, dtype: str) -> torch.Tensor:
    """The inverse of `to_numpy`, without a copy (read-only arrays give tensors that must only be read)."""
    t = _as_tensor(a)
    dt = TORCH_DTYPES[dtype]
    return t.view(dt) if t.dtype != dt else t


def pack_bucket(version: int, bucket: Iterable[tuple[str, torch.Tensor]]) -> dict:
    """What a learner rank puts in Ray's object store for one bucket: plain numpy, no pickled tensors."""
    return {"version": int(version), "tensors": [(name, *to_numpy(t)) for name, t in bucket]}


def unpack_bucket(obj: dict, version: int) -> list[tuple[str, torch.Tensor]]:
    """A fetched bucket as (name, tensor); a bucket of another version is refused (it would mix versions),
    and so is anything that is not `pack_bucket`'s shape, naming the entry and what was expected."""
    got = obj.get("version") if isinstance(obj, dict) else type(obj).__name__
    if not isinstance(obj, dict) or type(got) is not int or got != version:
        raise WeightUpdateError(f"weight update v{version}: a bucket of version {short(got)} arrived")
    tensors = obj.get("tensors")
    if not isinstance(tensors, (list, tuple)):
        raise WeightUpdateError(
            f"weight update v{version}: bucket 'tensors' is {type(tensors).__name__}, expected a list"
        )
    out = []
    for i, entry in enumerate(tensors):
        if not (isinstance(entry, (list, tuple)) and len(entry) == 3):
            raise WeightUpdateError(f"weight update v{version}: bucket entry {i} is not (name, array, dtype name)")
        name, a, dtype = entry
        if not isinstance(name, str) or not isinstance(a, np.ndarray) or a.dtype.kind not in "biuf":
            raise WeightUpdateError(
                f"weight update v{version}: bucket entry {i} ({short(name)}) is not a str name and a numeric numpy array"
            )
        dt = TORCH_DTYPES.get(dtype) if isinstance(dtype, str) else None
        if dt is None or dt.itemsize != a.dtype.itemsize:
            raise WeightUpdateError(
                f"weight update v{version}: tensor {name!r} has dtype name {short(dtype)} for a {a.dtype} array,"
                f" expected one of {', '.join(TORCH_DTYPES)} of the same width"
            )
        out.append((name, from_numpy(a, dtype)))
    return out


def bucket_spec(bucket: Iterable[tuple[str, torch.Tensor]]) -> list[tuple[str, str, list[int]]]:
    """(name, dtype name, shape) per tensor: what a broadcast receiver allocates before the data comes."""
    return [(name, _NAME_OF[t.dtype], list(t.shape)) for name, t in bucket]


def join_group(
    backend: str, address: str, port: int, world_size: int, rank: int, group_name: str, timeout_s: float = 600.0
):
    """A process group of its own (not the caller's default world), the way SGLang's
    `init_weights_update_group` builds the one it joins: a TCP rendezvous at address:port
    (rank 0 hosts it, on `address` only: `zeda_rl.transport.rendezvous_store`), a store prefixed by the
    group name. Blocks until all `world_size` joined.

    No `device_id`: NCCL then creates its communicator lazily, at the first broadcast, as stock SGLang's side
    does (its `init_weights_update_group` passes none either). A sender that initialised eagerly would block
    in the join, waiting for communicators the engines create only when the first bucket comes."""
    import datetime

    from torch.distributed.distributed_c10d import Backend, PrefixStore, _new_process_group_helper, _world

    from zeda_rl.transport import rendezvous_store

    timeout = datetime.timedelta(seconds=timeout_s)
    store = rendezvous_store(address, port, rank, world_size, timeout)
    pg, _ = _new_process_group_helper(
        world_size, rank, [], Backend(backend), PrefixStore(group_name, store), group_name=group_name, timeout=timeout
    )
    _world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    return pg
