"""The streaming converter: router widening, exact copies, layout, config, errors, memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tests.helpers import save_static
from zeda_rl.convert import convert_checkpoint
from zeda_rl.tiny import tiny_glm4_moe_lite_config, tiny_qwen3_moe_config

ROOT = Path(__file__).resolve().parents[1]
ROUTER = "model.layers.{}.mlp.gate.weight"
BIAS = "model.layers.{}.mlp.gate.e_score_correction_bias"
ROUTER_LAYERS = {"qwen3_moe": [0, 1], "glm4_moe_lite": [1, 2]}
EXTRA_FILES = {
    "tokenizer.json": "{}",
    "tokenizer_config.json": "{}",
    "special_tokens_map.json": "{}",
    "vocab.json": "{}",
    "merges.txt": "#v\n",
    "chat_template.jinja": "{{ messages }}",
}


def write_raw(d: Path, config, tensors: dict[str, torch.Tensor], shards: int = 1, **cfg_changes) -> Path:
    """A synthetic checkpoint: a config (transformers config object) and raw tensors in `shards` files."""
    d.mkdir(parents=True, exist_ok=True)
    cfg = {**json.loads(config.to_json_string(use_diff=False)), **cfg_changes}
    (d / "config.json").write_text(json.dumps(cfg))
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
        return d
    weight_map = {}
    for i in range(shards):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[i::shards]}
        save_file(part, d / fname, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, fname))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (d / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    return d


def tensors_of(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor, for bit-exact comparison (NaN-safe, any dtype)."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def assert_no_leftovers(parent: Path, name: str) -> None:
    assert not (parent / name).exists()
    assert [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")] == []


# ---- what the converter writes --------------------------------------------------------------


@pytest.mark.parametrize("family", ["qwen3_moe", "glm4_moe_lite"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_routers_widened_everything_else_copied(tmp_path, family, dtype):
    model = save_static(family, tmp_path / "fp32")
    model.to(dtype).save_pretrained(tmp_path / "static")
    for name, text in EXTRA_FILES.items():
        (tmp_path / "static" / name).write_text(text)
    (tmp_path / "static" / "pytorch_model.bin").write_bytes(b"stale weights")
    out = convert_checkpoint(tmp_path / "static", tmp_path / "zeda", zero_experts=3, progress=True)
    assert out == tmp_path / "zeda"

    before, after = tensors_of(tmp_path / "static"), tensors_of(out)
    assert before.keys() == after.keys()
    widened = {ROUTER.format(i) for i in ROUTER_LAYERS[family]}
    if family == "glm4_moe_lite":
        widened |= {BIAS.format(i) for i in ROUTER_LAYERS[family]}
    for name, old in before.items():
        new = after[name]
        assert new.dtype == old.dtype == dtype, name
        if name in widened:
            assert new.shape == (old.shape[0] + 3, *old.shape[1:]), name
            assert torch.equal(bits(new[: old.shape[0]]), bits(old)), name
            assert torch.isfinite(new).all() and not torch.equal(new[-1], new[-2]), name
        else:
            assert torch.equal(bits(new), bits(old)), name
    with safe_open(out / "model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
    assert not (out / "model.safetensors.index.json").exists()  # single file in, single file out

    cfg, src_cfg = (json.loads((d / "config.json").read_text()) for d in (out, tmp_path / "static"))
    target = {"qwen3_moe": "Qwen3MoePlusPlusForCausalLM", "glm4_moe_lite": "Glm4MoeLitePlusPlusForCausalLM"}[family]
    # the released layout: stock model_type, the *PlusPlus class, the three zce keys, v4 field names
    assert cfg["architectures"] == [target] and cfg["model_type"] == family
    assert cfg["zce_nums"] == [3] and cfg["zce_types"] == ["zero"] and cfg["use_zce_mask"] is False
    assert cfg["rope_theta"] == src_cfg["rope_parameters"]["rope_theta"]
    n_key = {"qwen3_moe": "num_experts", "glm4_moe_lite": "n_routed_experts"}[family]
    assert cfg[n_key] == 8 and "num_local_experts" not in cfg
    changed = {
        "architectures",
        "zce_nums",
        "zce_types",
        "use_zce_mask",
        "rope_theta",
        "num_experts",
        "num_local_experts",
    }
    assert {k: v for k, v in cfg.items() if k not in changed} == {k: v for k, v in src_cfg.items() if k not in changed}
    for name in [*EXTRA_FILES, "generation_config.json"]:
        assert (out / name).read_bytes() == (tmp_path / "static" / name).read_bytes()
    assert not (out / "pytorch_model.bin").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_new_rows_follow_the_old_rows_distribution(tmp_path):
    torch.manual_seed(0)
    n, h, nz = 1024, 256, 4096  # nz: many samples per hidden dim, within the converter's bound of 4 x N
    mu, sigma = torch.linspace(-1, 1, h), torch.linspace(0.1, 1.0, h)
    cfg = tiny_glm4_moe_lite_config(hidden_size=h, n_routed_experts=n)
    tensors = {}
    for layer in (1, 2, 3):  # 3 == num_hidden_layers: the multi-token-prediction layer, widened too
        tensors[ROUTER.format(layer)] = mu + sigma * torch.randn(n, h)
        tensors[BIAS.format(layer)] = 0.5 + 0.2 * torch.randn(n)
    tensors["model.embed_tokens.weight"] = torch.randn(8, h)
    write_raw(tmp_path / "static", cfg, tensors)
    after = tensors_of(convert_checkpoint(tmp_path / "static", tmp_path / "zeda", zero_experts=nz))
    for layer in (1, 2, 3):
        old_w, new_w = tensors[ROUTER.format(layer)], after[ROUTER.format(layer)][n:]
        assert new_w.shape == (nz, h)
        tol = 5 * old_w.std(0) / nz**0.5  # five standard errors of the mean, per hidden dim
        assert ((new_w.mean(0) - old_w.mean(0)).abs() < tol).all()
        assert ((new_w.std(0) / old_w.std(0) - 1).abs() < 0.1).all()
        old_b, new_b = tensors[BIAS.format(layer)], after[BIAS.format(layer)][n:]
        assert new_b.shape == (nz,)
        assert abs(new_b.mean() - old_b.mean()) < 5 * old_b.std() / nz**0.5
        assert abs(new_b.std() / old_b.std() - 1) < 0.1
    assert torch.equal(after["model.embed_tokens.weight"], tensors["model.embed_tokens.weight"])


def test_seed_determinism_and_layout_independence(tmp_path):
    model = save_static("glm4_moe_lite", tmp_path / "static")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    a = convert_checkpoint(tmp_path / "static", tmp_path / "a", zero_experts=4, seed=7)
    b = convert_checkpoint(tmp_path / "static", tmp_path / "b", zero_experts=4, seed=7)
    c = convert_checkpoint(tmp_path / "static", tmp_path / "c", zero_experts=4, seed=8)
    s = convert_checkpoint(tmp_path / "sharded", tmp_path / "s", zero_experts=4, seed=7)
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    for p in a.iterdir():
        assert p.read_bytes() == (b / p.name).read_bytes(), p.name
    ta, tc, ts = tensors_of(a), tensors_of(c), tensors_of(s)
    for layer in ROUTER_LAYERS["glm4_moe_lite"]:
        for name in (ROUTER.format(layer), BIAS.format(layer)):
            assert torch.equal(ta[name][:8], tc[name][:8]) and not torch.equal(ta[name][8:], tc[name][8:])
    assert ta.keys() == ts.keys() and all(torch.equal(ta[k], ts[k]) for k in ta)  # same seed, other layout


def test_multi_shard_layout_and_index(tmp_path):
    model = save_static("qwen3_moe", tmp_path / "single")
    model.save_pretrained(tmp_path / "static", max_shard_size="20KB")
    src_index = json.loads((tmp_path / "static" / "model.safetensors.index.json").read_text())
    in_shards = sorted(p.name for p in (tmp_path / "static").glob("*.safetensors"))
    assert len(in_shards) > 3
    out = convert_checkpoint(tmp_path / "static", tmp_path / "zeda", zero_experts=4)
    assert sorted(p.name for p in out.glob("*.safetensors")) == in_shards
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["weight_map"].keys() == src_index["weight_map"].keys()
    total = 0
    for shard in in_shards:
        with safe_open(out / shard, "pt") as f, safe_open(tmp_path / "static" / shard, "pt") as g:
            assert set(f.keys()) == set(g.keys()) == {k for k, v in index["weight_map"].items() if v == shard}
            assert f.metadata() == g.metadata()
            total += sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())
    assert index["metadata"]["total_size"] == total
    assert total == src_index["metadata"]["total_size"] + 2 * 4 * 32 * 4  # two routers, 4 new fp32 rows of 32
    if "total_parameters" in src_index["metadata"]:
        assert index["metadata"]["total_parameters"] == src_index["metadata"]["total_parameters"] + 2 * 4 * 32
    single = convert_checkpoint(tmp_path / "single", tmp_path / "zeda1", zero_experts=4)
    t1, ts = tensors_of(single), tensors_of(out)
    assert t1.keys() == ts.keys() and all(torch.equal(t1[k], ts[k]) for k in t1)


def test_copy_zero_type_and_canonical_num_experts_key(tmp_path):
    """Real Qwen3 configs say num_experts (transformers 5 saves num_local_experts): both work."""
    cfg = tiny_qwen3_moe_config()
    tensors = {ROUTER.format(i): torch.randn(8, 32) for i in (0, 1)}
    src = write_raw(tmp_path / "static", cfg, tensors, num_experts=8)
    raw = json.loads((src / "config.json").read_text())
    raw.pop("num_local_experts", None)
    (src / "config.json").write_text(json.dumps(raw))
    out = convert_checkpoint(src, tmp_path / "zeda", zero_experts=2, zero_type="copy")
    assert json.loads((out / "config.json").read_text())["zce_types"] == ["copy"]
    assert tensors_of(out)[ROUTER.format(0)].shape == (10, 32)


# ---- errors: clear, naming the thing, nothing left behind -------------------------------------


def _qwen(tmp_path, **kw):
    save_static("qwen3_moe", tmp_path / "static", **kw)
    return tmp_path / "static"


def _sharded(tmp_path):
    save_static("qwen3_moe", tmp_path / "single").save_pretrained(tmp_path / "static", max_shard_size="20KB")
    return tmp_path / "static"


def _edit_config(src: Path, **changes) -> Path:
    raw = json.loads((src / "config.json").read_text())
    raw.update(changes)
    (src / "config.json").write_text(json.dumps(raw))
    return src


def _no_config(tmp_path):
    src = _qwen(tmp_path)
    (src / "config.json").unlink()
    return src, FileNotFoundError, ["config.json"]


def _no_moe_dense(tmp_path):
    return _qwen(tmp_path, mlp_only_layers=[0, 1]), ValueError, ["config.json", "no MoE layers"]


def _no_moe_zero_experts(tmp_path):
    return _edit_config(_qwen(tmp_path), num_local_experts=0), ValueError, ["no MoE layers"]


def _already_converted(tmp_path):
    out = convert_checkpoint(_qwen(tmp_path), tmp_path / "first", zero_experts=2)
    return out, ValueError, ["already a converted", "config.json"]


def _zce_nums_present(tmp_path):
    return _edit_config(_qwen(tmp_path), zce_nums=[4]), ValueError, ["already a converted", "zce_nums"]


def _missing_shard(tmp_path):
    src = _sharded(tmp_path)
    victim = sorted(src.glob("*.safetensors"))[1]
    victim.unlink()
    return src, FileNotFoundError, [victim.name, "model.safetensors.index.json"]


def _truncated(tmp_path):
    src = _qwen(tmp_path)
    f = src / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    return src, ValueError, ["model.safetensors", "not a valid safetensors file"]


def _garbage_shard(tmp_path):
    src = _sharded(tmp_path)
    victim = sorted(src.glob("*.safetensors"))[-1]
    victim.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00this is no json")
    return src, ValueError, [victim.name, "not a valid safetensors file"]


def _unsupported_arch(tmp_path):
    src = _edit_config(_qwen(tmp_path), architectures=["MixtralForCausalLM"])
    return src, ValueError, ["MixtralForCausalLM", "Qwen3MoeForCausalLM", "Glm4MoeLiteForCausalLM"]


def _router_shape(tmp_path):
    src = _edit_config(_qwen(tmp_path), num_local_experts=6)
    return src, ValueError, ["model.layers.0.mlp.gate.weight", "[8, 32]", "[6, 32]"]


def _missing_router(tmp_path):
    src = write_raw(tmp_path / "static", tiny_qwen3_moe_config(), {ROUTER.format(0): torch.randn(8, 32)})
    return src, ValueError, ["MoE layer 1", "router"]


def _missing_bias(tmp_path):
    tensors = {ROUTER.format(i): torch.randn(8, 32) for i in (1, 2)} | {BIAS.format(1): torch.zeros(8)}
    src = write_raw(tmp_path / "static", tiny_glm4_moe_lite_config(), tensors)
    return src, ValueError, ["MoE layer 2", "bias"]


def _output_exists(tmp_path):
    (tmp_path / "zeda").mkdir()
    (tmp_path / "zeda" / "keep.txt").write_text("mine")
    return _qwen(tmp_path), FileExistsError, [str(tmp_path / "zeda"), "--overwrite"]


@pytest.mark.parametrize(
    "make",
    [
        _no_config,
        _no_moe_dense,
        _no_moe_zero_experts,
        _already_converted,
        _zce_nums_present,
        _missing_shard,
        _truncated,
        _garbage_shard,
        _unsupported_arch,
        _router_shape,
        _missing_router,
        _missing_bias,
        _output_exists,
    ],
)
def test_errors_are_clear_and_leave_nothing(tmp_path, make):
    src, exc, words = make(tmp_path)
    with pytest.raises(exc) as info:
        convert_checkpoint(src, tmp_path / "zeda", zero_experts=4)
    for word in words:
        assert word in str(info.value), (word, str(info.value))
    if make is _output_exists:
        assert [p.name for p in (tmp_path / "zeda").iterdir()] == ["keep.txt"]  # untouched
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".zeda.")] == []
    else:
        assert_no_leftovers(tmp_path, "zeda")


@pytest.mark.parametrize(
    "kw,words",
    [({"zero_type": "constant"}, ["'constant'", "zero", "copy"]), ({"zero_experts": 0}, ["zero_experts", "0"])],
)
def test_bad_arguments(tmp_path, kw, words):
    with pytest.raises(ValueError) as info:
        convert_checkpoint(_qwen(tmp_path), tmp_path / "zeda", **{"zero_experts": 4, **kw})
    assert all(w in str(info.value) for w in words), str(info.value)
    assert_no_leftovers(tmp_path, "zeda")


def test_overwrite(tmp_path):
    src = _qwen(tmp_path)
    (tmp_path / "empty").mkdir()
    convert_checkpoint(src, tmp_path / "empty", zero_experts=2)  # an existing empty dir is fine
    out = tmp_path / "zeda"
    out.mkdir()
    (out / "junk.txt").write_text("old")
    convert_checkpoint(src, out, zero_experts=2, overwrite=True)
    assert not (out / "junk.txt").exists() and (out / "model.safetensors").exists()
    assert tensors_of(out)[ROUTER.format(0)].shape == (10, 32)
    # A failing conversion with overwrite leaves the previous output intact.
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (src / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="model.safetensors"):
        convert_checkpoint(src, out, zero_experts=3, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".zeda.")] == []


# ---- memory: streaming, not loading ----------------------------------------------------------

_CHILD = """
import json, sys
from zeda_rl.convert import convert_checkpoint

def status(key):  # kB figures of this process (this mm: new at exec, unlike ru_maxrss)
    line = next(l for l in open("/proc/self/status") if l.startswith(key + ":"))
    return int(line.split()[1]) * 1024

before = status("VmRSS")
convert_checkpoint(sys.argv[1], sys.argv[2], zero_experts=4)
print(json.dumps({"increase": status("VmHWM") - before}))
"""


def test_peak_memory_is_bounded_by_a_tensor_not_the_model(tmp_path):
    """~400 MB in 4 shards, largest tensor 20 MB: the converting process grows by far less than 400 MB.

    Peak RSS is read from /proc/self/status (VmHWM) in a fresh child: ru_maxrss would not do,
    since Linux carries the parent's high-water mark across fork/exec into the child's.
    """
    src = tmp_path / "static"
    src.mkdir()
    cfg = json.loads(tiny_qwen3_moe_config().to_json_string(use_diff=False))
    (src / "config.json").write_text(json.dumps(cfg))
    weight_map, total, big = {}, 0, 5_000_000  # 20 MB of float32
    for s in range(4):
        fname = f"model-{s + 1:05d}-of-00004.safetensors"
        part = {
            f"model.layers.{s % 2}.mlp.experts.{s}{j}.filler": torch.full((big,), float(s * 10 + j)) for j in range(5)
        }
        if s < 2:
            part[ROUTER.format(s)] = torch.randn(8, 32)
        save_file(part, src / fname, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, fname))
        total += sum(t.numel() * 4 for t in part.values())
        del part
    (src / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    assert total > 400e6

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run(
        [sys.executable, "-c", _CHILD, str(src), str(tmp_path / "zeda")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    increase = json.loads(run.stdout.strip().splitlines()[-1])["increase"]
    # One tensor at a time needs ~20 MB here; a shard at a time (~100 MB) or the whole model (400 MB) fails.
    assert increase < 80e6, f"peak RSS grew by {increase / 1e6:.0f} MB converting {total / 1e6:.0f} MB"
    index = json.loads((tmp_path / "zeda" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == total + 2 * 4 * 32 * 4
    with safe_open(tmp_path / "zeda" / "model-00004-of-00004.safetensors", "pt") as f:
        assert f.get_tensor("model.layers.1.mlp.experts.34.filler")[-1].item() == 34.0


def test_a_run_reuses_its_student_init_and_clears_what_killed_conversions_left(tmp_path):
    """Every start, resumes included, converted the teacher again (61 GB read and written for a 30B model), and a
    conversion killed midway left its `.student-init.tmp-PID` (up to 61 GB) for good."""
    import subprocess
    import sys

    from launch.checkpoints import prepare_checkpoints
    from launch.config import load_config
    from launch.runlog import Phases
    from tests.helpers import save_static
    from zeda_rl.metrics import MetricsLog

    save_static("qwen3_moe", tmp_path / "teacher")
    over = {"output_dir": str(tmp_path / "runs"), "model.teacher": str(tmp_path / "teacher")}
    cfg = load_config("launch/configs/tiny-cpu.yaml", over)
    phases = Phases(MetricsLog(tmp_path / "m.jsonl"))
    _, student = prepare_checkpoints(cfg, phases)
    weights = {p.name: p.stat().st_mtime_ns for p in student.iterdir()}
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = cfg.run_dir / f".student-init.tmp-{int(dead.stdout)}"  # a pid that has exited
    stale.mkdir()
    assert prepare_checkpoints(cfg, phases)[1] == student  # the same conversion: reused, not written again
    assert {p.name: p.stat().st_mtime_ns for p in student.iterdir()} == weights and not stale.exists()
    other = load_config("launch/configs/tiny-cpu.yaml", {**over, "model.zero_experts": 2})
    prepare_checkpoints(other, phases)  # another one: converted again
    assert {p.name: p.stat().st_mtime_ns for p in student.iterdir()} != weights
