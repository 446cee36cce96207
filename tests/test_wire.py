"""The wire contracts: trajectory batches and weight updates, encoded and decoded without pickle."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
import torch

from zeda_rl import wire
from zeda_rl.weights import (
    WeightUpdate,
    WeightUpdateError,
    apply_update,
    decode_update,
    encode_update,
    make_buckets,
)
from zeda_rl.wire import (
    SCHEMA_VERSION,
    BadDtype,
    BadMeta,
    ByteLengthMismatch,
    ForeignMessage,
    FrameCountMismatch,
    MissingField,
    SchemaMismatch,
    ShapeMismatch,
    TrajectoryBatch,
    WireError,
    decode,
    encode,
    validate,
)


def make_arrays(b=3, s=7, layers=2, k=4, seed=0, mask_dtype=np.uint8, routed_dtype=np.int16, optional=True):
    rng = np.random.default_rng(seed)
    out = {
        "tokens": rng.integers(0, 50_000, (b, s), dtype=np.int32),
        "loss_mask": (rng.random((b, s)) > 0.5).astype(mask_dtype),
        "behaviour_logprobs": -rng.random((b, s), dtype=np.float32),
        "teacher_logprobs": -rng.random((b, s), dtype=np.float32),
        "policy_version": np.full(b, 3, dtype=np.int64),
        "sample_ids": np.arange(100, 100 + b, dtype=np.int64),
    }
    if optional:
        out["routed_experts"] = rng.integers(-1, 64, (b, s, layers, k)).astype(routed_dtype)
        out["attention_mask"] = np.ones((b, s), dtype=mask_dtype)
    return out


def make_batch(**kw) -> TrajectoryBatch:
    return TrajectoryBatch.from_arrays(
        make_arrays(**kw), meta={"temperature": 1.0, "actor": "t0", "tags": [1, None, {"a": True}]}
    )


def assert_same(a: TrajectoryBatch, b: TrajectoryBatch) -> None:
    assert list(a.arrays) == list(b.arrays)
    for name in a.arrays:
        assert a[name].dtype == b[name].dtype, name
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert a.meta == b.meta


def rewrite_header(frames, fn):
    """Frames with the header passed through fn (to forge wrong messages)."""
    header = msgpack.unpackb(frames[0])
    fn(header)
    return [msgpack.packb(header), *frames[1:]]


def as_bytes(frames):
    return [bytes(f) for f in frames]


# ---- trajectory round trips ---------------------------------------------------------------------


@pytest.mark.parametrize("mask_dtype", [np.uint8, np.bool_])
@pytest.mark.parametrize("routed_dtype", [np.int16, np.int32])
def test_round_trip_all_dtypes(mask_dtype, routed_dtype):
    batch = make_batch(mask_dtype=mask_dtype, routed_dtype=routed_dtype)
    batch.arrays["advantages"] = np.linspace(0, 1, 21, dtype=np.float64).reshape(3, 7)  # extra field, passed through
    out = decode(as_bytes(encode(batch)))
    assert_same(batch, out)
    assert out.routed_experts.dtype == routed_dtype and out.loss_mask.dtype == mask_dtype
    assert (out.batch_size, out.seq_len) == (3, 7)


def test_round_trip_without_optional_fields():
    batch = make_batch(optional=False)
    out = decode(encode(batch))
    assert_same(batch, out)
    assert out.routed_experts is None and out.attention_mask is None


def test_non_contiguous_and_big_endian_arrays_are_encoded_correctly():
    arrays = make_arrays()
    arrays["tokens"] = np.asfortranarray(arrays["tokens"])
    arrays["teacher_logprobs"] = arrays["teacher_logprobs"].astype(">f4")
    out = decode(as_bytes(encode(TrajectoryBatch.from_arrays(arrays))))
    np.testing.assert_array_equal(out.tokens, arrays["tokens"])
    np.testing.assert_array_equal(out.teacher_logprobs, arrays["teacher_logprobs"])
    assert out.teacher_logprobs.dtype == np.dtype("<f4")


def test_encode_and_decode_do_not_copy_arrays():
    batch = make_batch()
    frames = encode(batch)
    for name, frame in zip(batch.arrays, frames[1:]):
        assert isinstance(frame, memoryview)
        assert np.shares_memory(np.asarray(frame), batch[name]), name
    received = [bytearray(f) for f in frames]  # a writable buffer, standing in for a received frame
    out = decode(received)
    for name, buf in zip(out.arrays, received[1:]):
        arr = out[name]
        assert not arr.flags.owndata, name
        assert np.shares_memory(arr, np.frombuffer(buf, dtype=np.uint8)), name
    received[1][:4] = np.int32(-7).tobytes()  # writing the frame is seen through the array
    assert out.tokens[0, 0] == -7
    assert not decode(as_bytes(frames)).tokens.flags.writeable  # immutable frames give read-only arrays


def test_misaligned_frames_are_copied_into_aligned_arrays():
    batch = make_batch()
    frames = []
    for f in encode(batch):
        raw = bytearray(1 + len(bytes(f)))
        raw[1:] = bytes(f)
        frames.append(memoryview(raw)[1:])  # every frame at an odd address
    out = decode(frames)
    assert_same(batch, out)
    assert all(a.flags.aligned for a in out.arrays.values())
    upd = WeightUpdate(1, [[("w", torch.arange(5, dtype=torch.float32))]])
    wf = []
    for f in encode_update(upd):
        raw = bytearray(1 + len(bytes(f)))
        raw[1:] = bytes(f)
        wf.append(memoryview(raw)[1:])
    w = decode_update(wf).buckets[0][0][1]
    assert w.data_ptr() % 4 == 0 and torch.equal(w, torch.arange(5, dtype=torch.float32))


# ---- trajectory validation errors -----------------------------------------------------------------


@pytest.mark.parametrize(
    "frames",
    [
        [b"\x00\x01 definitely not msgpack \xc1"],
        [msgpack.packb({"hello": "world"})],
        [msgpack.packb([1, 2, 3])],
        [msgpack.packb({"magic": "someone-else", "kind": "trajectory", "schema": 1})],
    ],
    ids=["garbage", "foreign-dict", "foreign-list", "wrong-magic"],
)
def test_foreign_messages_are_rejected(frames):
    with pytest.raises(ForeignMessage, match="not a zeda-rl message"):
        decode(frames)


def test_empty_message_and_wrong_kind_are_rejected():
    with pytest.raises(ForeignMessage, match="empty message"):
        decode([])
    weights = encode_update(WeightUpdate(1, [[("w", torch.zeros(2))]]))
    with pytest.raises(ForeignMessage, match="kind is 'weights', expected 'trajectory'"):
        decode(weights)
    with pytest.raises(ForeignMessage, match="kind is 'trajectory', expected 'weights'"):
        decode_update(encode(make_batch()))


def test_schema_version_mismatch():
    frames = rewrite_header(encode(make_batch()), lambda h: h.update(schema=SCHEMA_VERSION + 1))
    with pytest.raises(
        SchemaMismatch, match=f"schema version is {SCHEMA_VERSION + 1}, this reader speaks {SCHEMA_VERSION}"
    ):
        decode(frames)


def test_missing_required_field_producer_and_consumer_side():
    arrays = make_arrays()
    del arrays["teacher_logprobs"]
    with pytest.raises(MissingField, match="'teacher_logprobs' is missing"):
        TrajectoryBatch.from_arrays(arrays)
    frames = encode(make_batch())
    idx = 1 + list(make_batch().arrays).index("sample_ids")

    def drop(h):
        del h["fields"][idx - 1]

    forged = rewrite_header(frames, drop)
    del forged[idx]
    with pytest.raises(MissingField, match="'sample_ids' is missing"):
        decode(forged)


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("tokens", np.zeros((3, 7), dtype=np.int64), "'tokens': dtype int64, expected int32"),
        (
            "behaviour_logprobs",
            np.zeros((3, 7), dtype=np.float16),
            "'behaviour_logprobs': dtype float16, expected float32",
        ),
        (
            "routed_experts",
            np.zeros((2, 3, 7, 4), dtype=np.uint8),
            "'routed_experts': dtype uint8, expected int16 or int32",
        ),
        ("extra", np.array([object()] * 3, dtype=object), "'extra': dtype object is not allowed"),
        ("extra", np.zeros(3, dtype=np.complex64), "'extra': dtype complex64 is not allowed"),
    ],
)
def test_bad_dtype_producer_side(field, value, match):
    arrays = make_arrays()
    arrays[field] = value
    with pytest.raises(BadDtype, match=match):
        TrajectoryBatch.from_arrays(arrays)


@pytest.mark.parametrize("dtype", ["object", "pickle", "<i4", "complex64"])
def test_unknown_dtype_consumer_side(dtype):
    frames = rewrite_header(encode(make_batch()), lambda h: h["fields"][0].__setitem__(1, dtype))
    with pytest.raises(BadDtype, match=f"'tokens': dtype '{dtype}' is not allowed"):
        decode(frames)


def test_frame_count_mismatch():
    frames = encode(make_batch())
    n = len(frames) - 1
    with pytest.raises(FrameCountMismatch, match=f"has {n} frames, header announces 1 \\+ {n}"):
        decode(frames[:-1])
    with pytest.raises(FrameCountMismatch, match=f"has {n + 2} frames"):
        decode([*frames, b"extra"])


def test_truncated_frame_byte_length_mismatch():
    frames = as_bytes(encode(make_batch()))
    frames[3] = frames[3][:-5]  # behaviour_logprobs, 3x7 float32 = 84 bytes
    with pytest.raises(
        ByteLengthMismatch, match="'behaviour_logprobs': frame has 79 bytes, shape \\[3, 7\\] x 4 B needs 84"
    ):
        decode(frames)


@pytest.mark.parametrize(
    "field,shape,match",
    [
        ("policy_version", (4,), "'policy_version': shape \\[4\\] has B=4, but 'tokens' has B=3"),
        ("teacher_logprobs", (3, 8), "'teacher_logprobs': shape \\[3, 8\\] has S=8, but 'tokens' has S=7"),
        ("routed_experts", (3, 6, 2, 4), "'routed_experts': shape \\[3, 6, 2, 4\\] has S=6"),
        ("routed_experts", (3, 7, 4), "'routed_experts': shape \\[3, 7, 4\\] has 3 dims, expected \\[B,S,L,K\\]"),
        ("loss_mask", (21,), "'loss_mask': shape \\[21\\] has 1 dims, expected \\[B,S\\]"),
    ],
)
def test_shape_inconsistencies_producer_side(field, shape, match):
    arrays = make_arrays()
    arrays[field] = np.zeros(shape, dtype=arrays[field].dtype)
    with pytest.raises(ShapeMismatch, match=match):
        TrajectoryBatch.from_arrays(arrays)


def test_shape_inconsistency_consumer_side():
    # tokens announced as [7, 3] (same byte count, so the frame length check passes): B and S disagree
    frames = rewrite_header(encode(make_batch()), lambda h: h["fields"][0].__setitem__(2, [7, 3]))
    with pytest.raises(ShapeMismatch, match="has B=3, but 'tokens' has B=7"):
        decode(frames)
    frames = rewrite_header(encode(make_batch()), lambda h: h["fields"][0].__setitem__(2, [3, -7]))
    with pytest.raises(ShapeMismatch, match="'tokens': shape \\[3, -7\\]"):
        decode(frames)


@pytest.mark.parametrize("meta", [{"x": np.float32(1.0)}, {"x": {1, 2}}, {1: "int key"}, {"x": b"bytes"}])
def test_meta_must_be_plain_json(meta):
    with pytest.raises(BadMeta, match="meta"):
        TrajectoryBatch.from_arrays(make_arrays(), meta=meta)


def test_validate_rejects_non_arrays_and_all_errors_are_value_errors():
    arrays = make_arrays()
    arrays["tokens"] = arrays["tokens"].tolist()
    with pytest.raises(WireError, match="'tokens': expected a numpy array, got list"):
        validate(TrajectoryBatch(arrays))
    for cls in (
        ForeignMessage,
        SchemaMismatch,
        MissingField,
        BadDtype,
        FrameCountMismatch,
        ByteLengthMismatch,
        ShapeMismatch,
        BadMeta,
    ):
        assert issubclass(cls, WireError) and issubclass(cls, ValueError)


# ---- weight updates -----------------------------------------------------------------------------------


def test_make_buckets_preserves_order_and_respects_the_size_limit():
    named = [(f"t{i}", torch.zeros(n, dtype=torch.float32)) for i, n in enumerate([10, 20, 5, 100, 1, 1, 30, 0, 7])]
    limit = 40 * 4
    buckets = make_buckets(iter(named), bucket_bytes=limit)
    assert [n for b in buckets for n, _ in b] == [n for n, _ in named]
    for b in buckets:
        size = sum(t.nbytes for _, t in b)
        assert size <= limit or len(b) == 1  # only a lone oversized tensor may exceed it
    assert [[n for n, _ in b] for b in buckets] == [["t0", "t1", "t2"], ["t3"], ["t4", "t5", "t6", "t7", "t8"]]
    assert make_buckets([], 100) == []
    with pytest.raises(ValueError, match="bucket_bytes must be positive"):
        make_buckets(named, 0)
    with pytest.raises(ValueError, match="'t0' appears twice"):
        make_buckets(named + named[:1], 1000)


def test_weight_update_round_trip_bf16_and_friends():
    g = torch.Generator().manual_seed(0)
    named = [
        ("layers.0.w", torch.randn(16, 8, generator=g).to(torch.bfloat16)),
        ("layers.0.b", torch.randn(8, generator=g).to(torch.float16)),
        ("layers.0.f8", torch.randn(4, 4, generator=g).to(torch.float8_e4m3fn)),
        ("layers.1.w", torch.randn(3, 5, generator=g)[:, ::2]),  # non-contiguous
        ("scalar", torch.tensor(2.5, dtype=torch.float64)),
        ("mask", torch.tensor([True, False, True])),
        ("ids", np.arange(6, dtype=np.int64).reshape(2, 3)),
        ("empty", torch.zeros(0, 4)),
    ]
    update = WeightUpdate(version=11, buckets=make_buckets(named, bucket_bytes=256))
    frames = encode_update(update)
    header = msgpack.unpackb(frames[0])
    assert header["buckets"][0][0] == ["layers.0.w", "bfloat16", [16, 8]]
    out = decode_update(as_bytes(frames))
    assert out.version == 11
    assert [[n for n, _ in b] for b in out.buckets] == [[n for n, _ in b] for b in update.buckets]
    for (name, want), (name2, got) in zip(named, out.named_tensors()):
        assert name == name2
        want = torch.as_tensor(want)
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert torch.equal(
            got.view(torch.uint8) if got.dtype == torch.float8_e4m3fn else got,
            want.view(torch.uint8) if want.dtype == torch.float8_e4m3fn else want,
        ), name


def test_decode_update_is_zero_copy_unless_asked():
    update = WeightUpdate(1, [[("w", torch.arange(8, dtype=torch.bfloat16))]])
    received = [bytearray(f) for f in encode_update(update)]
    view = decode_update(received).buckets[0][0][1]
    owned = decode_update(received, copy=True).buckets[0][0][1]
    received[1][:2] = torch.tensor([5.0], dtype=torch.bfloat16).view(torch.uint8).numpy().tobytes()
    assert view[0].item() == 5.0 and owned[0].item() == 0.0


def test_weight_update_decode_errors():
    frames = encode_update(WeightUpdate(2, [[("w", torch.zeros(4, 4, dtype=torch.bfloat16))]]))
    with pytest.raises(ByteLengthMismatch, match="'w': frame has 31 bytes"):
        decode_update([frames[0], bytes(frames[1])[:-1]])
    with pytest.raises(FrameCountMismatch):
        decode_update(frames[:1])
    with pytest.raises(BadDtype, match="'w': dtype 'object' is not allowed"):
        decode_update(rewrite_header(frames, lambda h: h["buckets"][0][0].__setitem__(1, "object")))
    with pytest.raises(SchemaMismatch):
        decode_update(rewrite_header(frames, lambda h: h.update(schema=99)))
    with pytest.raises(BadDtype, match="'c': dtype torch.complex64 is not allowed"):
        encode_update(WeightUpdate(2, [[("c", torch.zeros(2, dtype=torch.complex64))]]))


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.proj = torch.nn.Linear(4, 4)
        self.head = torch.nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight  # tied, like tie_word_embeddings
        self.register_buffer("bias_correction", torch.zeros(4))


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_apply_update_copies_by_name_and_returns_version():
    torch.manual_seed(0)
    model = Tiny()
    new = {k: torch.randn_like(v) for k, v in model.state_dict().items() if k != "head.weight"}
    update = decode_update(encode_update(WeightUpdate(5, make_buckets(new.items(), 64))))
    assert apply_update(model, update) == 5
    for k, v in new.items():
        assert torch.equal(model.state_dict()[k], v), k
    assert torch.equal(model.head.weight, new["embed.weight"])  # the tied name follows
    apply_update(model, WeightUpdate(6, [[("head.weight", torch.ones(10, 4))]]))  # the tied alias is addressable too
    assert torch.equal(model.embed.weight, torch.ones(10, 4))


@pytest.mark.parametrize(
    "bad,match",
    [
        (("nope.weight", torch.zeros(3)), "'nope.weight' is not a parameter or buffer of Tiny"),
        (("proj.weight", torch.zeros(4, 5)), "'proj.weight' has shape \\[4, 5\\], model expects \\[4, 4\\]"),
        (
            ("bias_correction", torch.zeros(4, dtype=torch.bfloat16)),
            "'bias_correction' has dtype torch.bfloat16, model expects torch.float32",
        ),
    ],
)
def test_apply_update_strict_errors_leave_the_model_unchanged(bad, match):
    model = Tiny()
    before = snapshot(model)
    good = [("embed.weight", torch.ones(10, 4)), ("proj.bias", torch.ones(4))]
    update = WeightUpdate(9, make_buckets([*good, bad], 1 << 20))  # the bad tensor comes last
    with pytest.raises(WeightUpdateError, match=match):
        apply_update(model, update)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_apply_update_non_strict_skips_unknown_and_casts():
    model = Tiny()
    update = WeightUpdate(3, [[("nope", torch.zeros(1)), ("proj.bias", torch.ones(4, dtype=torch.bfloat16))]])
    assert apply_update(model, update, strict=False) == 3
    assert model.proj.bias.dtype == torch.float32 and torch.equal(model.proj.bias, torch.ones(4))
    with pytest.raises(WeightUpdateError, match="shape"):  # shapes are never negotiable
        apply_update(model, WeightUpdate(4, [[("proj.bias", torch.ones(5))]]), strict=False)
    with pytest.raises(WeightUpdateError, match="appears twice"):
        apply_update(model, WeightUpdate(4, [[("proj.bias", torch.ones(4))], [("proj.bias", torch.ones(4))]]))


def test_wire_module_has_no_pickle():
    import inspect

    import zeda_rl.transport
    import zeda_rl.weights

    for mod in (wire, zeda_rl.weights, zeda_rl.transport):
        src = inspect.getsource(mod)
        assert "import pickle" not in src and "allow_pickle" not in src, mod.__name__
