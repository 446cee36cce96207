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
update leaves the model exactly as it was.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable
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
_NUMPY_NAME = {np.dtype(str(v).removeprefix("torch.")): k for k, v in TORCH_DTYPES.items() if "8_e" not in k and k != "bfloat16"}

Tensor = torch.Tensor | np.ndarray


@dataclass
class WeightUpdate:
    """Policy `version` and ordered buckets of (HF parameter/buffer name, tensor)."""

    version: int
    buckets: list[list[tuple[str, Tensor]]]

    def named_tensors(self) -> Iterable[tuple[str, Tensor]]:
        for bucket in self.buckets:
            yield from bucket

    @property
    def nbytes(self) -> int:
        return sum(int(t.nbytes) for _, t in self.named_tensors())


def _nbytes(t: Tensor) -> int:
    return int(t.nbytes) if isinstance(t, np.ndarray) else t.numel() * t.element_size()


def make_buckets(named_tensors: Iterable[tuple[str, Tensor]], bucket_bytes: int) -> list[list[tuple[str, Tensor]]]:
    """Greedy, order-preserving groups of at most `bucket_bytes` bytes each.

    A single tensor larger than `bucket_bytes` gets a bucket of its own (tensors are
    never split, so a receiver always sees whole tensors).
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    buckets: list[list[tuple[str, Tensor]]] = []
    cur: list[tuple[str, Tensor]] = []
    size = 0
    seen: set[str] = set()
    for name, t in named_tensors:
        if name in seen:
            raise ValueError(f"tensor {name!r} appears twice")
        seen.add(name)
        n = _nbytes(t)
        if cur and size + n > bucket_bytes:
            buckets.append(cur)
            cur, size = [], 0
        cur.append((name, t))
        size += n
    if cur:
        buckets.append(cur)
    return buckets


def _to_wire(name: str, t: Tensor) -> tuple[str, list[int], memoryview]:
    """(dtype name, shape, zero-copy byte view) of one tensor; CPU tensors are not copied."""
    if isinstance(t, np.ndarray):
        wname = _NUMPY_NAME.get(t.dtype.newbyteorder("="))
        if wname is None:
            raise BadDtype(f"tensor {name!r}: numpy dtype {t.dtype} is not allowed (allowed: {', '.join(_NUMPY_NAME.values())})")
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
    header = {"magic": MAGIC, "kind": KIND, "schema": WEIGHTS_SCHEMA_VERSION, "version": update.version, "buckets": specs}
    return [pack_header(header), *frames]


def decode_update(frames: list, copy: bool = False) -> WeightUpdate:
    """Frames back to a WeightUpdate of torch tensors.

    With copy=False the tensors are views of the frames: read-only in fact (torch cannot
    mark them so), fine for `apply_update`, which only reads. copy=True gives owned tensors.
    """
    header = unpack_header(frames, KIND, WEIGHTS_SCHEMA_VERSION)
    version, bspecs = header.get("version"), header.get("buckets")
    if not isinstance(version, int) or isinstance(version, bool):
        raise ForeignMessage(f"weights header version is {version!r}, expected an int")
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
                raise WireError(f"tensor {name!r} appears twice in the header")
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


def apply_update(model: torch.nn.Module, update: WeightUpdate, strict: bool = True) -> int:
    """Copy the update into the model's parameters/buffers by name; returns update.version.

    strict=True: an unknown name or a dtype mismatch is an error. strict=False: unknown
    names are skipped (logged) and dtypes are cast. A shape mismatch is always an error.
    All checks run before any copy, so on error the model is unchanged. Names the model
    has but the update lacks are left as they are (partial updates are allowed).
    """
    targets: dict[str, torch.Tensor] = dict(model.named_parameters(remove_duplicate=False))
    targets.update(model.named_buffers(remove_duplicate=False))
    plan: list[tuple[torch.Tensor, torch.Tensor]] = []
    seen, skipped = set(), []
    for name, t in update.named_tensors():
        if name in seen:
            raise WeightUpdateError(f"weight update v{update.version}: tensor {name!r} appears twice")
        seen.add(name)
        src = _as_tensor(t)
        dst = targets.get(name)
        if dst is None:
            if strict:
                raise WeightUpdateError(f"weight update v{update.version}: tensor {name!r} is not a parameter or buffer of {type(model).__name__}")
            skipped.append(name)
            continue
        if tuple(src.shape) != tuple(dst.shape):
            raise WeightUpdateError(f"weight update v{update.version}: tensor {name!r} has shape {list(src.shape)}, model expects {list(dst.shape)}")
        if strict and src.dtype != dst.dtype:
            raise WeightUpdateError(f"weight update v{update.version}: tensor {name!r} has dtype {src.dtype}, model expects {dst.dtype}")
        plan.append((dst, src))
    if skipped:
        log.warning("weight update v%d: skipped %d unknown tensors, e.g. %s", update.version, len(skipped), skipped[:3])
    with torch.no_grad():
        for dst, src in plan:
            dst.copy_(src)
    return int(update.version)
