"""Router checks (zeda_rl.checks): NaN/Inf and non-float routers are refused, naming file and tensor,
by the converter (writing nothing) and by every loader (eval, learner, torch and SGLang engines)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from actors.fake_sglang import FakeSGLangEngine
from actors.sglang_engine import SGLangEngine, inspect_checkpoint
from actors.torch_engine import TorchEngine
from learner import bridge, parallel
from learner.megatron_config import load_hf_config, model_info
from learner.model import build_model
from learner.testing import tiny_checkpoint
from tests.helpers import save_static
from zeda_rl.checks import check_routers
from zeda_rl.convert import convert_checkpoint
from zeda_rl.evaluate import load as eval_load

FAMILIES = ["qwen3_moe", "glm4_moe_lite"]
# One router tensor per case: the first MoE layer's weight, and GLM's correction bias.
TARGETS = {
    "qwen3_moe/weight": ("qwen3_moe", "model.layers.0.mlp.gate.weight"),
    "glm4_moe_lite/weight": ("glm4_moe_lite", "model.layers.1.mlp.gate.weight"),
    "glm4_moe_lite/bias": ("glm4_moe_lite", "model.layers.1.mlp.gate.e_score_correction_bias"),
}


def _nan(t):
    t = t.clone()
    t.view(-1)[-1] = float("nan")  # in a converted router: the last zero-expert row
    return t


def _inf(t):
    t = t.clone()
    t.view(-1)[1] = float("-inf")
    return t


CORRUPT = {
    "nan": (_nan, "NaN"),
    "inf": (_inf, "Inf"),
    "int32": (lambda t: t.to(torch.int32), "stored as I32"),
    "bool": (lambda t: t > 0, "stored as BOOL"),
    "float8_e4m3fn": (lambda t: t.to(torch.float8_e4m3fn), "stored as F8_E4M3"),
}
EXPECTED = {"nan": "expected finite values", "inf": "expected finite values"}


def rewrite(ckpt: Path, key: str, fn) -> Path:
    """Replace tensor `key` of a single-file checkpoint with fn(tensor); returns the file."""
    f = ckpt / "model.safetensors"
    tensors = load_file(f)
    tensors[key] = fn(tensors[key])
    save_file(tensors, f, metadata={"format": "pt"})
    return f


@pytest.fixture(scope="module")
def statics(tmp_path_factory):
    root = tmp_path_factory.mktemp("static")
    for fam in FAMILIES:
        save_static(fam, root / fam)
    return root


@pytest.mark.parametrize("corrupt", list(CORRUPT))
@pytest.mark.parametrize("target", list(TARGETS))
def test_convert_refuses_bad_router_and_writes_nothing(statics, tmp_path, target, corrupt):
    fam, key = TARGETS[target]
    src = tmp_path / "static"
    shutil.copytree(statics / fam, src)
    fn, what = CORRUPT[corrupt]
    bad_file = rewrite(src, key, fn)
    out = tmp_path / "out" / "zeda"
    out.parent.mkdir()
    with pytest.raises(ValueError) as err:
        convert_checkpoint(src, out, zero_experts=4)
    msg = str(err.value)
    assert str(bad_file) in msg and repr(key) in msg and what in msg, msg
    assert EXPECTED.get(corrupt, "expected one of F16, BF16, F32, F64") in msg, msg
    assert not out.exists()
    assert list((tmp_path / "out").iterdir()) == []  # no temporary directory left either


@pytest.mark.parametrize("fam", FAMILIES)
def test_clean_checkpoints_pass(statics, tmp_path, fam):
    """The control: an untouched checkpoint converts, and every router of both is checked."""
    out = convert_checkpoint(statics / fam, tmp_path / "zeda", zero_experts=4)
    n_routers = {"qwen3_moe": 2, "glm4_moe_lite": 4}[fam]  # Qwen: 2 MoE layers; GLM: 2 x (weight, bias)
    assert check_routers(statics / fam) == check_routers(out) == n_routers


@pytest.fixture(scope="module")
def nan_converted(tmp_path_factory):
    """Per family: a converted checkpoint whose first router has a NaN in a zero-expert row."""
    root = tmp_path_factory.mktemp("converted")
    out = {}
    for fam in FAMILIES:
        ckpt = tiny_checkpoint(fam, root / fam)
        key = TARGETS[f"{fam}/weight"][1]
        out[fam] = (ckpt, rewrite(ckpt, key, _nan), key)
    return out


def _refused(call, bad_file, key):
    with pytest.raises(ValueError) as err:
        call()
    msg = str(err.value)
    assert str(bad_file) in msg and repr(key) in msg and "NaN" in msg and "expected finite values" in msg, msg


@pytest.mark.parametrize("fam", FAMILIES)
def test_eval_and_torch_engine_refuse(nan_converted, fam):
    ckpt, bad_file, key = nan_converted[fam]
    _refused(lambda: eval_load(ckpt), bad_file, key)
    _refused(lambda: TorchEngine(ckpt), bad_file, key)


@pytest.mark.parametrize("fam", FAMILIES)
def test_learner_loader_refuses_before_copying(nan_converted, fam):
    parallel.setup(0, 1, 1)
    ckpt, bad_file, key = nan_converted[fam]
    model = build_model(model_info(load_hf_config(ckpt)))
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    before = {k: v.clone() for k, v in tensors.items()}
    _refused(lambda: bridge.load_hf(model, ckpt), bad_file, key)
    assert all(torch.equal(before[k], v) for k, v in tensors.items())  # not one weight copied


@pytest.mark.parametrize("fam", FAMILIES)
def test_sglang_backend_refuses_before_the_engine_starts(nan_converted, fam):
    ckpt, bad_file, key = nan_converted[fam]
    started = []

    def factory(**kw):
        started.append(kw)
        return FakeSGLangEngine(**kw)

    _refused(lambda: inspect_checkpoint(ckpt), bad_file, key)
    _refused(lambda: SGLangEngine(ckpt, _engine_factory=factory), bad_file, key)
    assert started == []


def test_sharded_checkpoint_names_the_shard(nan_converted, tmp_path):
    """Through an index, the refusal names the shard that holds the bad router."""
    ckpt, bad_file, key = nan_converted["qwen3_moe"]
    d = tmp_path / "sharded"
    shutil.copytree(ckpt, d)
    tensors = load_file(d / "model.safetensors")
    (d / "model.safetensors").unlink()
    names = sorted(tensors)
    weight_map = {}
    for i, part in enumerate([[n for n in names if n != key], [key]]):
        fname = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, d / fname, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, fname))
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    _refused(lambda: check_routers(d), d / "model-00002-of-00002.safetensors", key)
