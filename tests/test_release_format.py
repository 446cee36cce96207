"""Checkpoints in the released ZEDA layout load everywhere, and what we write is that layout.

"The official recipe" (its README): run its converter, which widens the routers and copies
config.json unchanged, then edit config.json by hand: set `architectures` to the
`*PlusPlus` class and add zce_nums / zce_types / use_zce_mask. The stock model_type stays.
Here that copy is made from a static tiny model saved by transformers 5 (so its config has
`num_local_experts` and `rope_parameters`, as a user's would after a transformers-5 save),
with the router rows of our own converted copy, so both must give the same logits exactly.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

import zeda_rl  # noqa: F401
from zeda_rl.chat_tokenizer import save_tiny_chat_checkpoint
from zeda_rl.convert import convert_checkpoint
from zeda_rl.modeling import Glm4MoeLitePlusPlusForCausalLM, Qwen3MoePlusPlusForCausalLM

TARGET = {"qwen3_moe": Qwen3MoePlusPlusForCausalLM, "glm4_moe_lite": Glm4MoeLitePlusPlusForCausalLM}
N_KEY = {"qwen3_moe": "num_experts", "glm4_moe_lite": "n_routed_experts"}
NZ = 4


def official_layout(static, ours, out):
    """The official recipe's output: routers widened, everything else and config.json as they were, then hand-edited."""
    out.mkdir()
    for p in static.iterdir():
        if p.suffix != ".safetensors":
            shutil.copyfile(p, out / p.name)
    tensors = load_file(ours / "model.safetensors")  # the same widened rows as ours: logits must match exactly
    save_file(tensors, out / "model.safetensors")  # the official converter's save_file, no metadata
    cfg = json.loads((static / "config.json").read_text())
    cfg.update(
        architectures=[TARGET[cfg["model_type"]].__name__], use_zce_mask=False, zce_nums=[NZ], zce_types=["zero"]
    )
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


@pytest.fixture(scope="module", params=["qwen3_moe", "glm4_moe_lite"])
def pair(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    static = save_tiny_chat_checkpoint(root / "static", request.param, initializer_range=0.1)
    ours = convert_checkpoint(static, root / "ours", zero_experts=NZ)
    return request.param, static, ours, official_layout(static, ours, root / "official")


def _tokens(vocab, seed=0):
    return torch.randint(0, vocab, (2, 9), generator=torch.Generator().manual_seed(seed))


def test_official_layout_loads_through_auto_classes_with_our_logits(pair):
    family, static, ours, official = pair
    raw = json.loads((official / "config.json").read_text())
    assert raw["model_type"] == family  # stock, as the recipe leaves it
    if family == "qwen3_moe":
        assert "num_local_experts" in raw and "num_experts" not in raw  # a transformers-5 save
    cfg = AutoConfig.from_pretrained(official)
    assert cfg.zce_slots() == ["zero"] * NZ and cfg.use_zce_mask is False
    a = AutoModelForCausalLM.from_pretrained(official, dtype=torch.float32).eval()
    b = AutoModelForCausalLM.from_pretrained(ours, dtype=torch.float32).eval()
    assert type(a) is TARGET[family] and type(b) is TARGET[family]
    tokens = _tokens(a.config.vocab_size)
    with torch.no_grad():
        la, lb = a(tokens).logits, b(tokens).logits
    assert torch.equal(la, lb)
    # and a static checkpoint still gets the stock class
    s = AutoModelForCausalLM.from_pretrained(static, dtype=torch.float32)
    assert type(s).__name__ == {"qwen3_moe": "Qwen3MoeForCausalLM", "glm4_moe_lite": "Glm4MoeLiteForCausalLM"}[family]


def test_converted_config_is_the_released_layout_in_plain_json(pair):
    family, static, ours, _ = pair
    cfg = json.loads((ours / "config.json").read_text())
    src = json.loads((static / "config.json").read_text())
    assert cfg["model_type"] == family
    assert cfg["architectures"] == [TARGET[family].__name__]
    assert (cfg["zce_nums"], cfg["zce_types"], cfg["use_zce_mask"]) == ([NZ], ["zero"], False)
    assert cfg[N_KEY[family]] == 8 and "num_local_experts" not in cfg  # what transformers 4.57 reads
    assert cfg["rope_theta"] == src["rope_parameters"]["rope_theta"]  # 4.57 reads rope_theta, not rope_parameters
    # a save by our model class keeps the layout (the learner's export and the engines' checkpoints)
    m = AutoModelForCausalLM.from_pretrained(ours, dtype=torch.float32)
    m.save_pretrained(ours.parent / "resaved")
    again = json.loads((ours.parent / "resaved" / "config.json").read_text())
    for key in ("model_type", "architectures", "zce_nums", "zce_types", "use_zce_mask", N_KEY[family], "rope_theta"):
        assert again[key] == cfg[key], key
    assert "num_local_experts" not in again


@pytest.mark.parametrize("missing", ["zce_nums", "zce_types", "use_zce_mask"])
def test_plusplus_config_without_a_zce_key_is_refused_by_name(pair, missing, tmp_path):
    family, _, _, official = pair
    bad = tmp_path / "bad"
    shutil.copytree(official, bad)
    cfg = json.loads((bad / "config.json").read_text())
    del cfg[missing]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=missing):
        AutoConfig.from_pretrained(bad)
    with pytest.raises(ValueError, match=missing):
        AutoModelForCausalLM.from_pretrained(bad)
    from actors.sglang_plugin.zero_slots import router_spec_from_config

    with pytest.raises(ValueError, match=missing):
        router_spec_from_config(cfg)


def test_torch_engine_and_sglang_view_serve_the_official_layout(pair, tmp_path):
    from actors.fake_sglang import FakeSGLangEngine
    from actors.sglang_engine import inspect_checkpoint, sglang_model_dir
    from actors.torch_engine import TorchEngine

    family, _, ours, official = pair
    seqs = [_tokens(512, 3)[0].tolist()]
    a, b = TorchEngine(official), TorchEngine(ours)
    assert type(a.model) is TARGET[family]
    assert all((x == y).all() for x, y in zip(a.score(seqs), b.score(seqs)))
    assert inspect_checkpoint(official).zero_experts
    view = sglang_model_dir(official, tmp_path / "view")
    cfg = json.loads((view / "config.json").read_text())
    assert cfg["model_type"] == family and cfg["architectures"][0] == TARGET[family].__name__
    engine = FakeSGLangEngine(model_path=str(view))
    assert type(engine.model) is TARGET[family]


def test_learner_loads_the_official_layout(pair):
    from learner import bridge, parallel
    from learner.megatron_config import load_hf_config, model_info
    from learner.model import build_model, forward_logits

    family, _, ours, official = pair
    parallel.setup(0, 1, 1)
    out = []
    for path in (official, ours):
        m = build_model(model_info(load_hf_config(path)))
        bridge.load_hf(m, path)
        with torch.no_grad():
            out.append(forward_logits(m.eval(), _tokens(512, 5)))
    assert m.zeda_info.num_zero == NZ
    torch.testing.assert_close(out[0], out[1], atol=0, rtol=0)


def test_zeda_eval_runs_on_the_official_layout(pair):
    from zeda_rl.evaluate import evaluate

    _, _, _, official = pair
    result = evaluate(official, n_per_family=2, batch_size=8)
    assert 0.0 < result["zero_ratio"]["overall"] <= 1.0  # untrained zero experts take some slots, mask off
