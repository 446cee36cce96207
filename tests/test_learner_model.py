"""The Megatron learner model against the zeda_rl transformers model, and the HF<->Megatron bridge.

Tolerances (float32, CPU): logits atol 1e-4 (seen: <= 1e-6 on tiny models with
initializer_range 0.1, logits of magnitude ~2); routed expert ids must be identical;
bridge round trips are bit-exact.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from learner import bridge, parallel
from learner.hf_export import export_hf_checkpoint
from learner.hf_names import rules
from learner.megatron_config import load_hf_config, model_info
from learner.model import build_model, forward_logits
from learner.router import last_routing, replay_routing
from learner.testing import load_hf_reference, tiny_checkpoint
from zeda_rl.modeling import record_routing as hf_record
from zeda_rl.modeling import replay_routing as hf_replay

LOGITS_ATOL = 1e-4

VARIANTS = {
    "qwen3": ("qwen3_moe", dict(initializer_range=0.1)),
    "qwen3-dense-mid": ("qwen3_moe", dict(num_hidden_layers=3, mlp_only_layers=[1], initializer_range=0.1)),
    "qwen3-sparse-step": ("qwen3_moe", dict(num_hidden_layers=4, decoder_sparse_step=2, initializer_range=0.1)),
    "glm": ("glm4_moe_lite", dict(initializer_range=0.1)),
    "glm-noninterleaved-qproj-groups": (
        "glm4_moe_lite",
        dict(rope_interleave=False, q_lora_rank=None, n_group=2, topk_group=1, initializer_range=0.1),
    ),
}


@pytest.fixture(scope="module", autouse=True)
def world1():
    parallel.setup(0, 1, 1)
    return parallel


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("learner_ckpts")
    return {k: tiny_checkpoint(fam, root / k, **ov) for k, (fam, ov) in VARIANTS.items()}


def megatron(path):
    m = build_model(model_info(load_hf_config(path)))
    bridge.load_hf(m, path)
    return m.eval()


def tokens_for(info, b=3, s=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, info.vocab_size, (b, s), generator=g)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_and_routing_match_transformers(ckpts, variant):
    m, hf = megatron(ckpts[variant]), load_hf_reference(ckpts[variant])
    info = m.zeda_info
    tokens = tokens_for(info)
    with torch.no_grad(), hf_record(hf) as rec:
        ours = forward_logits(m, tokens)
        ref = hf(tokens).logits
    torch.testing.assert_close(ours, ref, atol=LOGITS_ATOL, rtol=0)
    ids = last_routing(m, *tokens.shape)
    assert ids.shape == (*tokens.shape, len(info.moe_layers), info.router.top_k)
    assert torch.equal(ids, rec())
    assert 0 < float((ids >= info.num_experts).float().mean()) < 1  # both kinds of slots are in use


@pytest.mark.parametrize("variant", ["qwen3", "glm"])
def test_routing_replay_matches_transformers(ckpts, variant):
    m, hf = megatron(ckpts[variant]), load_hf_reference(ckpts[variant])
    info = m.zeda_info
    tokens = tokens_for(info, seed=1)
    g = torch.Generator().manual_seed(2)
    forced = torch.stack(
        [
            torch.randperm(info.router.total, generator=g)[: info.router.top_k]
            for _ in range(tokens.numel() * len(info.moe_layers))
        ]
    )
    forced = forced.reshape(*tokens.shape, len(info.moe_layers), info.router.top_k)
    forced[:, -1] = -1  # last position not recorded: the router chooses
    with torch.no_grad():
        with replay_routing(m, forced):
            ours = forward_logits(m, tokens)
        with hf_replay(hf, forced.clone()):
            ref = hf(tokens).logits
    torch.testing.assert_close(ours, ref, atol=LOGITS_ATOL, rtol=0)
    ids = last_routing(m, *tokens.shape)
    assert torch.equal(ids[:, :-1], forced[:, :-1])
    assert bool((ids[:, -1] >= 0).all())
    # a partly recorded row counts as not recorded (the router chooses) instead of indexing with -1
    forced[0, 0, 0, 1] = -1
    with torch.no_grad(), replay_routing(m, forced):
        forward_logits(m, tokens)
    ids = last_routing(m, *tokens.shape)
    assert bool((ids[0, 0, 0] >= 0).all()) and torch.equal(ids[0, 1:-1, 0], forced[0, 1:-1, 0])


def test_zero_slots_reach_no_expert(ckpts):
    """The dispatcher and expert MLPs see only real (token, expert) pairs; all-zero routing = no expert output."""
    m = megatron(ckpts["glm"])
    info = m.zeda_info
    seen = []
    for layer in m.decoder.layers:
        if hasattr(layer.mlp, "experts"):
            layer.mlp.experts.register_forward_hook(lambda mod, args, out: seen.append(int(args[1].sum())))
    tokens = tokens_for(info)
    with torch.no_grad():
        forward_logits(m, tokens)
    ids = last_routing(m, *tokens.shape)
    assert seen == [int((layer_ids < info.num_experts).sum()) for layer_ids in ids.unbind(2)]

    # every slot a zero expert: the routed experts get no tokens and add nothing (the shared expert still runs)
    zero_ids = torch.full_like(ids, info.num_experts)
    zero_ids[..., 1] = info.num_experts + 1
    moe = m.decoder.layers[info.moe_layers[0]].mlp
    x = torch.randn(tokens.shape[1], tokens.shape[0], info.hf_config.hidden_size)
    seen.clear()
    with torch.no_grad(), replay_routing(m, zero_ids):
        out, _ = moe(x)
        shared = moe.shared_experts(x)
    assert seen == [0]
    torch.testing.assert_close(out, shared, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", ["qwen3_moe", "glm4_moe_lite"])
def test_bridge_round_trip_is_bit_exact(tmp_path, family, dtype):
    path = tiny_checkpoint(family, tmp_path / "ckpt", dtype=dtype)
    on_disk = load_file(path / "model.safetensors")
    m = megatron(path)
    out = dict(bridge.full_hf_state(m))
    assert set(out) == set(on_disk)
    for name, t in on_disk.items():
        assert out[name].dtype == t.dtype and out[name].shape == t.shape, name
        assert torch.equal(
            out[name].contiguous().view(-1).view(torch.uint8), t.contiguous().view(-1).view(torch.uint8)
        ), name
    # and back: Megatron state from the exported tensors equals the loaded model's
    own = dict(m.named_parameters()) | dict(m.named_buffers())
    for r in rules(m.zeda_info):
        assert torch.equal(r.to_megatron([out[h] for h in r.hf]).to(own[r.megatron].dtype), own[r.megatron]), r.megatron


@pytest.mark.parametrize("variant", ["qwen3", "glm"])
def test_published_buckets_apply_to_the_transformers_model(ckpts, variant):
    """What a weight push sends (learner.publish: per-expert checkpoint names, the dense tensors then the experts,
    each in export order, bounded buckets) lands in the transformers model's fused experts through apply_update."""
    from learner.publish import owned_buckets
    from zeda_rl.weights import WeightUpdate, apply_update

    m = megatron(ckpts[variant])
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(1.01)
    upd = WeightUpdate(version=7, buckets=list(owned_buckets(m, 8192)))
    names = [n for n, _ in upd.named_tensors()]
    full = [n for n, _ in bridge.full_hf_state(m)]
    experts = [n for n in full if ".mlp.experts." in n]
    assert names == [n for n in full if ".mlp.experts." not in n] + experts  # the TP-gathered pass first
    assert set(names) == set(load_file(ckpts[variant] / "model.safetensors"))
    for b in upd.buckets:
        assert len(b) == 1 or sum(t.numel() * t.element_size() for _, t in b) <= 8192
    hf = load_hf_reference(ckpts[variant])
    assert apply_update(hf, upd) == 7
    tokens = tokens_for(m.zeda_info, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(forward_logits(m, tokens), hf(tokens).logits, atol=LOGITS_ATOL, rtol=0)


@pytest.mark.parametrize("variant", ["qwen3", "glm"])
def test_export_hf_loads_in_transformers_with_the_same_logits(ckpts, tmp_path, variant):
    src = ckpts[variant]
    m = megatron(src)
    with torch.no_grad():  # stand-in for training: move every weight
        g = torch.Generator().manual_seed(3)
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.01)
    out = export_hf_checkpoint(m, tmp_path / "student")
    assert out == tmp_path / "student"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student"]  # no temporary directory left
    assert json.loads((out / "config.json").read_text()) == json.loads((src / "config.json").read_text())
    assert (out / "tokenizer_config.json").read_text() == (src / "tokenizer_config.json").read_text()
    hf = load_hf_reference(out)
    tokens = tokens_for(m.zeda_info, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(forward_logits(m, tokens), hf(tokens).logits, atol=LOGITS_ATOL, rtol=0)
    # a second export replaces the first atomically
    export_hf_checkpoint(m, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student"]


def test_rejects_unconverted_checkpoint(tmp_path):
    from tests.helpers import save_static

    save_static("qwen3_moe", tmp_path / "static")
    with pytest.raises(ValueError, match="not a converted"):
        model_info(load_hf_config(tmp_path / "static"))


def test_export_hf_passes_through_tensors_the_learner_does_not_hold(tmp_path):
    """E.g. GLM-4.7-Flash's multi-token-prediction layer: not trained here, but the export stays complete."""
    from safetensors.torch import save_file

    src = tiny_checkpoint("glm4_moe_lite", tmp_path / "ckpt")
    tensors = load_file(src / "model.safetensors")
    tensors["model.layers.3.eh_proj.weight"] = torch.randn(32, 64)
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    m = megatron(src)
    out = load_file(export_hf_checkpoint(m, tmp_path / "out") / "model.safetensors")
    assert set(out) == set(tensors)
    assert all(torch.equal(out[k], tensors[k]) for k in tensors)


def test_export_hf_shards_large_checkpoints(ckpts, tmp_path):
    m = megatron(ckpts["qwen3"])
    out = export_hf_checkpoint(m, tmp_path / "sharded", max_shard_bytes=20_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and not (out / "model.safetensors").exists()
    assert not list(out.glob("part-*"))
    hf = load_hf_reference(out)
    tokens = tokens_for(m.zeda_info, seed=6)
    with torch.no_grad():
        torch.testing.assert_close(forward_logits(m, tokens), hf(tokens).logits, atol=LOGITS_ATOL, rtol=0)
