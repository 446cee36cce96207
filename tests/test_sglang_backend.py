"""The `sglang` backend on CPU, through FakeSGLangEngine (a stand-in for sglang.Engine, not SGLang).

What is checked here: the zero-slot transform against zeda_rl.routing.route, the decoding of
SGLang-shaped outputs into the Engine contract (same samples, logprobs, routed experts and
scores as TorchEngine), weight updates and versions, and the refusal of options that cannot
take expert id -1. What only a GPU can check is in tests/gpu/test_sglang_real.py.
"""

import json

import numpy as np
import pytest
import torch

import zeda_rl  # noqa: F401
from actors.engine import make_engine
from actors.fake_sglang import FakeSGLangEngine
from actors.sglang_engine import (
    SGLangEngine,
    decode_routed_experts,
    sglang_model_dir,
    tempered_logprobs,
    to_checkpoint_layout,
    validate_server_options,
)
from actors.sglang_plugin.zero_slots import mask_padded_rows, router_spec_from_config, select, to_kernel_slots
from tests.helpers import save_static
from zeda_rl.convert import convert_checkpoint
from zeda_rl.modeling import router_spec
from zeda_rl.routing import RouterSpec, route
from zeda_rl.sampling import SamplingParams
from zeda_rl.weights import WeightUpdate, make_buckets

PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]


@pytest.fixture(scope="module", params=["qwen3_moe", "glm4_moe_lite"])
def student(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    save_static(request.param, d / "static", eos_token_id=1, pad_token_id=0)
    return convert_checkpoint(d / "static", d / "zeda", zero_experts=4, seed=0)


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen")
    save_static("qwen3_moe", d / "static", eos_token_id=1, pad_token_id=0)
    return d / "static", convert_checkpoint(d / "static", d / "zeda", zero_experts=4, seed=0)


def torch_ref(ckpt):
    eng = make_engine("torch", str(ckpt))
    return eng


def fake(ckpt, **kw):
    return make_engine("sglang", str(ckpt), _engine_factory=FakeSGLangEngine, **kw)


# ---- zero-slot transform (what the plugin hands to the fused MoE kernel) -------------------------


@pytest.mark.parametrize("family", ["softmax", "sigmoid"])
def test_zero_slots_become_skip_ids_and_keep_real_weights(family):
    torch.manual_seed(0)
    spec = RouterSpec(
        family=family,
        num_experts=8,
        num_zero=4,
        top_k=4,
        norm_topk_prob=True,
        scaling=1.8 if family == "sigmoid" else 1.0,
    )
    logits = torch.randn(64, 12) * 2
    bias = torch.randn(12) * 0.1 if family == "sigmoid" else None
    ref = route(logits, spec, bias)
    weights, ids = select(logits, spec, bias)
    assert torch.equal(ids, ref.ids) and torch.equal(weights, ref.weights)
    w, i = to_kernel_slots(weights, ids, spec.num_experts)
    zero = ref.ids >= spec.num_experts
    assert zero.any() and (~zero).any()
    assert i.dtype == torch.int32 and w.dtype == torch.float32
    assert (i[zero] == -1).all() and (w[zero] == 0).all()
    assert torch.equal(i[~zero].long(), ref.ids[~zero]) and torch.equal(
        w[~zero], ref.weights[~zero]
    )  # not renormalised
    if family == "sigmoid":  # the stock SGLang contract when the scaling is applied after the experts
        w_unscaled, _ = select(logits, spec, bias, scaling_in_weights=False)
        torch.testing.assert_close(w_unscaled * spec.scaling, ref.weights)
    wp, ip = mask_padded_rows(w, i, torch.tensor(60))
    assert (ip[60:] == -1).all() and (wp[60:] == 0).all() and torch.equal(ip[:60], i[:60])


def test_router_spec_from_config_matches_the_model(student):
    cfg = json.loads((student / "config.json").read_text())
    from transformers import AutoConfig

    expected = router_spec(AutoConfig.from_pretrained(student))
    assert router_spec_from_config(cfg) == expected  # a raw dict, as in the SGLang view
    static = {k: v for k, v in cfg.items() if not k.startswith("zce_") and k != "use_zce_mask"}
    assert (
        router_spec_from_config({**static, "architectures": [cfg["architectures"][0].replace("PlusPlus", "")]}) is None
    )
    with pytest.raises(ValueError, match="zce_nums"):  # a *PlusPlus config never falls back to a default
        router_spec_from_config({**cfg, "zce_nums": None})
    with pytest.raises(ValueError, match="zero"):
        router_spec_from_config({**cfg, "zce_types": ["copy"]})


# ---- generation, scoring -------------------------------------------------------------------------


def test_generate_matches_torch_engine(student):
    ref, eng = torch_ref(student), fake(student)
    params = SamplingParams(temperature=0, max_new_tokens=6, stop_token_ids=(1,))
    want, got = ref.generate(PROMPTS, params), eng.generate(PROMPTS, params)
    n = router_spec_from_config(json.loads((student / "config.json").read_text())).num_experts
    for w, g in zip(want, got):
        assert g.prompt_ids == w.prompt_ids and g.output_ids == w.output_ids
        assert g.finish_reason == w.finish_reason and g.policy_version == 0
        np.testing.assert_allclose(g.logprobs, w.logprobs, atol=1e-5)
        assert g.logprobs.dtype == np.float32
        assert g.routed_experts.dtype == np.int16
        assert g.routed_experts.shape == w.routed_experts.shape == (len(g.prompt_ids) + len(g.output_ids), 2, 2)
        assert (g.routed_experts == w.routed_experts).all() and (g.routed_experts[-1] == -1).all()
    assert any((g.routed_experts >= n).any() for g in got)  # zero slots keep their ids for routing replay


def test_sampling_seed_stop_and_length(qwen):
    _, ckpt = qwen
    eng = fake(ckpt)
    params = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=8, stop_token_ids=(1,), seed=3)
    a, b = eng.generate(PROMPTS * 2, params), eng.generate(PROMPTS * 2, params)
    assert [s.output_ids for s in a] == [s.output_ids for s in b]
    for s in a:
        assert len(s.output_ids) == len(s.logprobs) <= 8 and (s.logprobs <= 0).all()
        assert (s.finish_reason == "stop") == (s.output_ids[-1] == 1) and 1 not in s.output_ids[:-1]
    free = eng.generate(PROMPTS, SamplingParams(temperature=1.0, max_new_tokens=5, seed=1))  # no stop ids: ignore EOS
    assert all(len(s.output_ids) == 5 and s.finish_reason == "length" for s in free)
    with pytest.raises(ValueError):
        eng.generate([[]], params)


def test_score_matches_torch_engine(student):
    ref = torch_ref(student)
    seqs = [
        p + s.output_ids
        for p, s in zip(PROMPTS, ref.generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=5)))
    ]
    seqs.append([7])  # nothing to score
    exact = fake(student, score_top_k=64)  # 64 = the tiny vocabulary: the renormalisation is exact
    for t in (1.0, 2.0, 0.5):
        for w, g in zip(ref.score(seqs, temperature=t), exact.score(seqs, temperature=t)):
            assert g.shape == w.shape and g.dtype == np.float32
            np.testing.assert_allclose(g, w, atol=1e-5)
    approx = fake(student, score_top_k=4)  # truncated normaliser: never below the exact value
    for w, g in zip(ref.score(seqs, temperature=0.5), approx.score(seqs, temperature=0.5)):
        assert (g >= w - 1e-5).all() and (g <= 1e-6).all()
    with pytest.raises(ValueError, match="temperature 1"):
        fake(student, strict_temperature=True).score(seqs, temperature=2.0)


# ---- weight sync ---------------------------------------------------------------------------------


def test_weight_update_buckets_flush_and_version(qwen):
    _, ckpt = qwen
    ref, eng = torch_ref(ckpt), fake(ckpt)
    params = SamplingParams(temperature=0, max_new_tokens=5)
    before = [s.output_ids for s in eng.generate(PROMPTS, params)]
    torch.manual_seed(1)
    new = {k: v + 0.05 * torch.randn_like(v) for k, v in ref.model.state_dict().items() if v.is_floating_point()}
    upd = WeightUpdate(version=7, buckets=make_buckets(new.items(), bucket_bytes=4096))  # transformers (fused) names
    assert ref.update_weights(upd) == 7
    assert eng.update_weights(upd) == 7 and eng.version == 7
    sent = eng._engine.calls["update_weights_from_tensor"]
    assert len(sent) == len(upd.buckets) and not any(c["flush_cache"] for c in sent)
    assert eng._engine.flushes == 1
    assert "model.layers.0.mlp.experts.3.up_proj.weight" in sum((c["names"] for c in sent), [])
    after = eng.generate(PROMPTS, params)
    assert all(s.policy_version == 7 for s in after) and [s.output_ids for s in after] != before
    for w, g in zip(ref.generate(PROMPTS, params), after):
        assert g.output_ids == w.output_ids and (g.routed_experts == w.routed_experts).all()
    for k, v in new.items():
        assert torch.equal(eng._engine.model.state_dict()[k], v), k


def test_tempered_logprobs_from_top_k():
    torch.manual_seed(0)
    logits = torch.randn(6, 50) * 3
    ids = torch.randint(0, 50, (6,))
    lp1 = torch.log_softmax(logits, -1)
    for t in (0.5, 2.0):
        exact = torch.log_softmax(logits / t, -1).gather(1, ids[:, None])[:, 0]
        top_lp, top_ids = lp1.topk(8, -1)
        got = tempered_logprobs(
            lp1.gather(1, ids[:, None])[:, 0].numpy(), ids.numpy(), top_lp.numpy(), top_ids.numpy(), t
        )
        kept = torch.zeros_like(lp1, dtype=torch.bool).scatter(1, top_ids, True).scatter(1, ids[:, None], True)
        mass = (torch.softmax(logits / t, -1) * kept).sum(-1)  # share of p_T the truncated normaliser sees
        np.testing.assert_allclose(got, (exact - mass.log()).numpy(), atol=1e-5)
        full = tempered_logprobs(
            lp1.gather(1, ids[:, None])[:, 0].numpy(), ids.numpy(), *[x.numpy() for x in lp1.topk(50, -1)], t
        )
        np.testing.assert_allclose(full, exact.numpy(), atol=1e-5)


def test_checkpoint_layout_split():
    gu, down = torch.randn(3, 8, 5), torch.randn(3, 5, 4)
    out = dict(
        to_checkpoint_layout(
            [
                ("m.layers.0.mlp.experts.gate_up_proj", gu),
                ("m.layers.0.mlp.experts.down_proj", down),
                ("m.norm.weight", np.ones(5, np.float32)),
            ]
        )
    )
    assert torch.equal(out["m.layers.0.mlp.experts.2.gate_proj.weight"], gu[2, :4])
    assert torch.equal(out["m.layers.0.mlp.experts.2.up_proj.weight"], gu[2, 4:])
    assert torch.equal(out["m.layers.0.mlp.experts.1.down_proj.weight"], down[1])
    assert isinstance(out["m.norm.weight"], torch.Tensor) and len(out) == 3 * 3 + 1


def test_refused_weight_update(qwen):
    _, ckpt = qwen
    eng = fake(ckpt)
    good = [("model.norm.weight", torch.ones(32))]
    with pytest.raises(RuntimeError, match="bucket 0"):
        eng.update_weights(WeightUpdate(version=3, buckets=[[("model.nope", torch.ones(2))], good]))
    assert eng.version == 0  # nothing applied
    with pytest.raises(RuntimeError, match="bucket 1"):
        eng.update_weights(WeightUpdate(version=4, buckets=[good, [("model.nope", torch.ones(2))]]))
    assert eng.version == -1  # partly applied: unknown until a complete update
    assert eng.update_weights(WeightUpdate(version=5, buckets=[good])) == 5


def _learner_rank(port: int, tensors: list) -> None:
    """Rank 0 of a weight group, as a learner rank is: broadcasts `tensors` in order (own process: a
    process can hold only one member of a group)."""
    from zeda_rl.weights import join_group

    pg = join_group("gloo", "127.0.0.1", port, 2, 0, "g0", timeout_s=60)
    for t in tensors:
        torch.distributed.broadcast(t, src=0, group=pg)


def test_distributed_weight_sync(qwen):
    """A real gloo group: rank 0 (a learner rank, another process here) broadcasts, the engine receives bucket by bucket."""
    import multiprocessing
    import socket

    _, ckpt = qwen
    eng = fake(ckpt)
    sent = {
        "model.norm.weight": torch.full((32,), 0.5),
        "model.layers.0.mlp.experts.0.down_proj.weight": torch.randn(32, 16),
    }
    buckets = [
        ("g0", [("model.norm.weight", "torch.float32", [32])]),
        ("g0", [("model.layers.0.mlp.experts.0.down_proj.weight", "float32", [32, 16])]),
    ]
    with pytest.raises(RuntimeError, match="not joined"):
        eng.update_weights_from_distributed(1, buckets)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    sender = multiprocessing.get_context("spawn").Process(
        target=_learner_rank, args=(port, list(sent.values())), daemon=True
    )
    sender.start()
    eng.init_distributed_weight_sync("127.0.0.1", port, rank_offset=1, world_size=2, group_name="g0", backend="gloo")
    assert eng.update_weights_from_distributed(9, buckets) == 9
    sender.join(timeout=60)
    assert sender.exitcode == 0
    calls = eng._engine.calls["update_weights_from_distributed"]
    assert [c["dtypes"] for c in calls] == [["float32"], ["float32"]] and calls[1]["shapes"] == [[32, 16]]
    state = eng._engine.model.state_dict()
    assert torch.equal(state["model.norm.weight"], sent["model.norm.weight"])
    assert torch.equal(
        state["model.layers.0.mlp.experts.down_proj"][0], sent["model.layers.0.mlp.experts.0.down_proj.weight"]
    )
    with pytest.raises(ValueError, match="checkpoint names"):
        eng.update_weights_from_distributed(
            10, [("g0", [("model.layers.0.mlp.experts.gate_up_proj", "float32", [8, 32, 32])])]
        )


# ---- options, view, formats ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "option",
    [
        {"moe_a2a_backend": "deepep"},
        {"enable_deepep_moe": True},
        {"enable_eplb": True},
        {"ep_num_redundant_experts": 2},
        {"ep_size": 2},
        {"moe_runner_backend": "flashinfer_cutlass"},
        {"speculative_algorithm": "EAGLE"},
    ],
)
def test_options_that_cannot_skip_are_refused(qwen, option):
    static, ckpt = qwen
    launched = []

    def factory(**kw):  # no model needed: only what reaches the engine matters
        launched.append(kw)
        return type("Stub", (), {"shutdown": lambda self: None})()

    with pytest.raises(ValueError, match="zero-expert checkpoint"):
        SGLangEngine(ckpt, _engine_factory=factory, **option)
    assert not launched
    SGLangEngine(static, _engine_factory=factory, **option).shutdown()  # a static model may use them
    assert launched


def test_option_defaults_for_each_family():
    q = validate_server_options({}, zero_experts=True, family="softmax")
    assert q == {"moe_runner_backend": "triton"}
    g = validate_server_options({"moe_runner_backend": "auto"}, zero_experts=True, family="sigmoid")
    assert g == {"moe_runner_backend": "triton", "disable_shared_experts_fusion": True}
    with pytest.raises(ValueError, match="shared"):
        validate_server_options({"disable_shared_experts_fusion": False}, zero_experts=True, family="sigmoid")


def test_sglang_view_of_a_converted_checkpoint(student, tmp_path):
    view = sglang_model_dir(student, tmp_path / "view")
    cfg = json.loads((view / "config.json").read_text())
    own = json.loads((student / "config.json").read_text())
    assert cfg["architectures"] == [own["architectures"][0], own["architectures"][0].replace("PlusPlus", "")]
    assert cfg["model_type"] == own["model_type"].removesuffix("_plus_plus")
    assert cfg["zce_nums"] == own["zce_nums"] and cfg["use_zce_mask"] is False
    for p in student.iterdir():
        if p.name != "config.json":
            assert (view / p.name).is_symlink() and (view / p.name).resolve() == p.resolve()
    with pytest.raises(ValueError, match="not a converted"):
        sglang_model_dir(student.parent / "static", tmp_path / "v2")


def test_shutdown_removes_the_view(qwen):
    _, ckpt = qwen
    eng = fake(ckpt)
    view = eng._view_dir
    assert view and (eng._engine.server_args.model_path.startswith(view))
    eng.shutdown()
    assert eng._engine.is_shutdown and not __import__("os").path.exists(view)


def test_decode_routed_experts_checks_the_size():
    ids = np.arange(4 * 3 * 2, dtype=np.int32).reshape(4, 3, 2)
    import base64

    out = decode_routed_experts(base64.b64encode(ids.tobytes()).decode(), 5, 3, 2, [1, 2])
    assert out.shape == (5, 2, 2) and (out[:4] == ids[:, [1, 2]]).all() and (out[4] == -1).all()
    assert (
        decode_routed_experts(ids, 5, 3, 2, [0]) == decode_routed_experts(torch.from_numpy(ids), 5, 3, 2, [0])
    ).all()
    with pytest.raises(ValueError, match="fed tokens"):
        decode_routed_experts(ids, 6, 3, 2, [1, 2])


# ---- the plugin's patching, against stand-in sglang modules ---------------------------------------
# SGLang cannot be installed here, so `actors.sglang_plugin.models` is imported against minimal
# stand-ins with the structure read from sglang 0.5.x: MoE blocks holding `topk` (a TopK, built
# first), `experts` (with moe_runner_config) and `gate` (Qwen: ReplicatedLinear returning a tuple;
# GLM: fp32 weight + e_score_correction_bias returning logits). Only the patching is tested here.


class _StubTopK(torch.nn.Module):
    def __init__(self, top_k, layer_id=None, **cfg):
        super().__init__()
        self.layer_id = layer_id
        self.topk_config = __import__("types").SimpleNamespace(top_k=top_k, **cfg)


class _StubExperts(torch.nn.Module):
    def __init__(self, n):
        super().__init__()
        from types import SimpleNamespace

        self.moe_runner_config = SimpleNamespace(num_experts=n, num_local_experts=n)
        self.quant_method = SimpleNamespace(runner=SimpleNamespace(config=self.moe_runner_config))
        self.w13_weight = torch.nn.Parameter(torch.zeros(n, 2, 2), requires_grad=False)


class _StubReplicatedLinear(torch.nn.Module):
    def __init__(self, h, n):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(n, h, dtype=torch.bfloat16), requires_grad=False)

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight), None


class _StubGlmGate(torch.nn.Module):
    def __init__(self, h, n):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(n, h))
        self.e_score_correction_bias = torch.nn.Parameter(torch.zeros(n))
        self.e_score_correction_bias.weight_loader = "bias-loader"

    def forward(self, x):
        return torch.nn.functional.linear(x.float(), self.weight)


def _stub_model_class(family):
    class Block(torch.nn.Module):
        def __init__(self, cfg, layer_id):
            super().__init__()
            n = cfg.num_experts if family == "softmax" else cfg.n_routed_experts
            self.layer_id = layer_id
            self.topk = _StubTopK(
                cfg.num_experts_per_tok, layer_id=layer_id, apply_routed_scaling_factor_on_output=False
            )
            self.experts = _StubExperts(n)
            self.gate = (
                _StubReplicatedLinear(cfg.hidden_size, n) if family == "softmax" else _StubGlmGate(cfg.hidden_size, n)
            )
            self.num_fused_shared_experts = getattr(cfg, "fused_shared", 0)

    class Model(torch.nn.Module):
        def __init__(self, config, quant_config=None, prefix=""):
            super().__init__()
            self.config = config
            self.model = torch.nn.Module()
            self.model.layers = torch.nn.ModuleList(torch.nn.Module() for _ in range(2))
            for i, layer in enumerate(self.model.layers):
                layer.mlp = Block(config, i)

    return Model


@pytest.fixture
def plugin(monkeypatch):
    import sys
    import types
    from collections import namedtuple

    captured = []

    class Capturer:
        def capture(self, layer_id, topk_ids):
            captured.append((layer_id, topk_ids.clone()))

    def module(name, **attrs):
        m = types.ModuleType(name)
        m.__dict__.update(attrs)
        monkeypatch.setitem(sys.modules, name, m)

    for name in (
        "sglang",
        "sglang.srt",
        "sglang.srt.layers",
        "sglang.srt.layers.moe",
        "sglang.srt.models",
        "sglang.srt.model_loader",
        "sglang.srt.state_capturer",
    ):
        module(name)
    module(
        "sglang.srt.layers.moe.topk",
        TopK=_StubTopK,
        StandardTopKOutput=namedtuple("StandardTopKOutput", "topk_weights topk_ids router_logits"),
    )
    module("sglang.srt.model_loader.weight_utils", default_weight_loader=lambda p, w: p.data.copy_(w))
    module("sglang.srt.models.qwen3_moe", Qwen3MoeForCausalLM=_stub_model_class("softmax"))
    module("sglang.srt.models.glm4_moe_lite", Glm4MoeLiteForCausalLM=_stub_model_class("sigmoid"))
    module("sglang.srt.state_capturer.routed_experts", get_global_experts_capturer=lambda: Capturer())
    monkeypatch.delitem(sys.modules, "actors.sglang_plugin.models", raising=False)
    import actors.sglang_plugin.models as models

    yield models, captured
    sys.modules.pop("actors.sglang_plugin.models", None)
    monkeypatch.delattr(sys.modules["actors.sglang_plugin"], "models", raising=False)


def test_plugin_patches_qwen_blocks(plugin, qwen):
    from safetensors.torch import load_file
    from transformers import Qwen3MoeConfig

    models, captured = plugin
    _, ckpt = qwen
    assert [c.__name__ for c in models.EntryClass] == ["Qwen3MoePlusPlusForCausalLM", "Glm4MoeLitePlusPlusForCausalLM"]
    cfg = Qwen3MoeConfig(
        **{k: v for k, v in json.loads((ckpt / "config.json").read_text()).items() if k != "model_type"}
    )
    model = models.Qwen3MoePlusPlusForCausalLM(config=cfg)
    params = dict(model.named_parameters())
    assert not any(".topk." in n for n in params)  # the gate keeps its checkpoint name
    gate = params["model.layers.0.mlp.gate.weight"]
    assert gate.shape == (12, 32) and gate.dtype == torch.float32
    weights = load_file(ckpt / "model.safetensors")
    gate.weight_loader(gate, weights["model.layers.0.mlp.gate.weight"])
    blk = model.model.layers[0].mlp
    assert blk.experts.moe_runner_config.num_experts == 12 and blk.experts.moe_runner_config.num_local_experts == 8
    h = torch.randn(16, 32)
    logits, _ = blk.gate(h)
    out = blk.topk(h, logits)
    spec = router_spec_from_config(cfg)
    w, i = to_kernel_slots(*select(logits, spec), spec.num_experts)
    assert torch.equal(out.topk_ids, i) and torch.equal(out.topk_weights, w)
    layer, ids = captured[-1]
    assert layer == 0 and torch.equal(ids.long(), route(logits, spec).ids)  # zero slots recorded as ids >= N
    padded = blk.topk(hidden_states=h, router_logits=logits, num_token_non_padded=torch.tensor(10))
    assert (padded.topk_ids[10:] == -1).all()
    empty = blk.topk.empty_topk_output("cpu")
    assert empty.topk_ids.shape == (0, 2) and empty.router_logits.shape == (0, 12)


def test_plugin_patches_glm_blocks(plugin, tmp_path):
    from transformers import Glm4MoeLiteConfig

    models, _ = plugin
    save_static("glm4_moe_lite", tmp_path / "static")
    ckpt = convert_checkpoint(tmp_path / "static", tmp_path / "zeda", zero_experts=4)
    raw = {k: v for k, v in json.loads((ckpt / "config.json").read_text()).items() if k != "model_type"}
    model = models.Glm4MoeLitePlusPlusForCausalLM(config=Glm4MoeLiteConfig(**raw))
    blk = model.model.layers[1].mlp
    assert blk.gate.weight.shape == (12, 32) and blk.gate.e_score_correction_bias.shape == (12,)
    assert blk.gate.e_score_correction_bias.weight_loader == "bias-loader"  # loader attributes survive the widening
    assert blk.topk.scaling_in_weights is False  # the stock model scales after the experts
    with pytest.raises(ValueError, match="disable_shared_experts_fusion"):
        models.Glm4MoeLitePlusPlusForCausalLM(config=Glm4MoeLiteConfig(**raw, fused_shared=1))


def test_an_engine_sections_dtype_reaches_the_sglang_server(student):
    """`rollout.dtype: bfloat16` in a run config must reach SGLang's server args (it used to be dropped)."""
    from launch.config import EngineSection
    from launch.fleet import engine_kwargs

    kw = engine_kwargs(EngineSection(backend="sglang", dtype="bfloat16", engine_kwargs={"tp_size": 1}))
    eng = make_engine("sglang", str(student), _engine_factory=FakeSGLangEngine, **kw)
    assert eng.server_options["dtype"] == "bfloat16" and eng._engine.server_args.dtype == "bfloat16"
    eng.shutdown()


def test_a_teacher_engine_does_not_capture_routed_experts(qwen):
    """The teacher's routing is never used; a rollout engine's is (routing replay). A config may still ask for it."""
    from actors.teacher_pool import teacher_engine_kwargs

    static, student = qwen
    teacher = fake(static, **teacher_engine_kwargs("sglang", {"dtype": "float32"}))
    rollout = fake(student)
    params = SamplingParams(temperature=0, max_new_tokens=3)
    assert teacher.server_options["enable_return_routed_experts"] is False
    assert all(s.routed_experts is None for s in teacher.generate(PROMPTS, params))
    assert rollout.server_options["enable_return_routed_experts"] is True
    assert all(s.routed_experts is not None for s in rollout.generate(PROMPTS, params))
    asked = teacher_engine_kwargs("sglang", {"return_routed_experts": True})
    assert asked["return_routed_experts"] is True and teacher_engine_kwargs("torch", None) == {}
    for e in (teacher, rollout):
        e.shutdown()
