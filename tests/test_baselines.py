"""The paper's baselines as inference options of the zero-expert model, NET's checkpoint, and the
where-tokens-skip analysis (tiny models; `zeda baselines` end to end takes minutes, so its pieces)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from helpers import save_static
from transformers import AutoModelForCausalLM

from zeda_rl.convert import convert_checkpoint
from zeda_rl.modeling import moe_blocks, record_routing, set_baseline_options, set_zce_mask
from zeda_rl.routing import RouterSpec, dynamic_skip, route


def _converted(tmp_path, family="qwen3_moe", **overrides):
    save_static(family, tmp_path / "static", num_experts_per_tok=4, initializer_range=0.2, **overrides)
    convert_checkpoint(tmp_path / "static", tmp_path / "zero", zero_experts=4)
    return tmp_path / "static", tmp_path / "zero"


def _load(path):
    return AutoModelForCausalLM.from_pretrained(path).eval()


def test_dynamic_skip_rule_on_a_hand_made_gate():
    w = torch.tensor([[0.60, 0.25, 0.15], [0.40, 0.35, 0.25], [0.10, 0.80, 0.10]])
    # threshold 0.5: row 0 keeps >= 0.30, row 1 keeps >= 0.20, row 2 keeps >= 0.40 (and always its top slot)
    assert dynamic_skip(w, 0.5).tolist() == [[False, True, True], [False, False, False], [True, False, True]]
    assert not dynamic_skip(w, 5.0)[torch.arange(3), w.argmax(-1)].any()  # the top slot survives any threshold

    # through route(): softmax weights of these logits are renormalised over the top 3 of 4 real experts
    logits = torch.log(torch.tensor([[0.60, 0.25, 0.15, 1e-6, 1e-6, 1e-6]]))
    spec = RouterSpec("softmax", num_experts=4, num_zero=2, top_k=3, mask_zero=True, skip_threshold=0.5)
    r = route(logits, spec)
    assert r.ids.tolist() == [[0, 4, 4]]  # experts 1 and 2 skipped onto the sentinel N = 4
    torch.testing.assert_close(r.weights[0, 0], torch.tensor(0.6), atol=1e-5, rtol=0)  # not renormalised


def test_baseline_options_replay_and_refusals():
    spec = RouterSpec("softmax", num_experts=4, num_zero=0, top_k=2, static_top_k=1)
    logits = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    chosen = route(logits, spec).ids
    assert (chosen[:, 1] == 4).all()
    replayed = route(logits, spec, replay_ids=torch.tensor([[2, 4], [1, 4], [-1, -1]]))  # NET's k' slots replay
    assert replayed.ids.tolist() == [[2, 4], [1, 4], chosen[2].tolist()]
    with pytest.raises(ValueError, match="inference option"):
        route(
            logits,
            RouterSpec("softmax", num_experts=4, num_zero=0, top_k=2, skip_threshold=0.5),
            replay_ids=torch.zeros(3, 2, dtype=torch.long),
        )
    with pytest.raises(ValueError, match="static_top_k"):
        route(torch.zeros(3, 4), RouterSpec("softmax", num_experts=4, num_zero=0, top_k=2, static_top_k=3))


@pytest.mark.parametrize("family", ["qwen3_moe", "glm4_moe_lite"])
def test_static_top_k_equals_a_config_with_top_k_halved(tmp_path, family):
    static, zero = _converted(tmp_path, family)
    m = _load(zero)
    set_zce_mask(m, True)
    set_baseline_options(m, static_top_k=2)
    halved = tmp_path / "halved"
    shutil.copytree(static, halved)
    cfg = json.loads((static / "config.json").read_text())
    (halved / "config.json").write_text(json.dumps({**cfg, "num_experts_per_tok": 2}))
    x = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), record_routing(m) as rec:
        ours = m(x).logits
    torch.testing.assert_close(ours, _load(halved)(x).logits, atol=1e-5, rtol=0)
    assert float((rec() >= moe_blocks(m)[0].spec.num_experts).float().mean()) == 0.5
    set_baseline_options(m)  # off again: the original model
    torch.testing.assert_close(m(x).logits, _load(static)(x).logits, atol=1e-5, rtol=0)
    assert "static_top_k" not in m.config.to_dict()


def test_calibration_reaches_the_target_share(tmp_path):
    from zeda_rl.analysis import calibrate_skip_threshold, skipped_share
    from zeda_rl.tokenizer import build_tokenizer

    _, zero = _converted(tmp_path, vocab_size=64)
    m = _load(zero)
    set_zce_mask(m, True)
    tok = build_tokenizer()
    texts = [f"{a}+{b}={a + b}" for a in range(0, 40, 3) for b in range(0, 30, 7)]
    got = calibrate_skip_threshold(m, tok, texts, target=0.3, tol=0.01)
    assert got["reached"] and abs(got["share"] - 0.3) <= 0.01
    tok.padding_side = "right"
    assert (
        abs(skipped_share(m, [dict(tok(texts, return_tensors="pt", padding=True))]) - got["share"]) < 1e-9
    )  # left set
    far = calibrate_skip_threshold(m, tok, texts, target=0.9)
    assert not far["reached"] and far["share"] == pytest.approx(0.75) and far["reachable"] == 0.75


def test_net_checkpoint_trains_as_a_top_k_half_moe(tmp_path):
    from launch.baselines import net_checkpoint
    from learner import bridge, parallel
    from learner.megatron_config import load_hf_config, model_info
    from learner.model import build_model, forward_logits
    from learner.router import last_routing, replay_routing

    static, _ = _converted(tmp_path)
    net = net_checkpoint(static, tmp_path / "net")
    cfg = json.loads((net / "config.json").read_text())
    assert (cfg["zce_nums"], cfg["num_experts_per_tok"], cfg["static_top_k"]) == ([0], 4, 2)
    x = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    hf = _load(net)
    with torch.no_grad(), record_routing(hf) as rec:
        ref = hf(x).logits
    ids = rec()
    assert float((ids >= 8).float().mean()) == 0.5  # half of the K slots on the sentinel
    halved = tmp_path / "halved"  # the teacher with top_k halved: the same model
    shutil.copytree(static, halved)
    (halved / "config.json").write_text(
        json.dumps({**json.loads((static / "config.json").read_text()), "num_experts_per_tok": 2})
    )
    torch.testing.assert_close(ref, _load(halved)(x).logits, atol=1e-5, rtol=0)
    # the learner builds the same router from the same config: same logits, same ids, and it replays them
    parallel.setup(0, 1, 1)
    info = model_info(load_hf_config(net))
    assert (info.num_experts, info.num_zero, info.router.top_k, info.router.static_top_k) == (8, 0, 4, 2)
    meg = build_model(info)
    bridge.load_hf(meg, net)
    meg.eval()
    with torch.no_grad():
        torch.testing.assert_close(forward_logits(meg, x), ref, atol=1e-4, rtol=0)
        assert torch.equal(last_routing(meg, *x.shape), ids)
        with replay_routing(meg, ids):
            torch.testing.assert_close(forward_logits(meg, x), ref, atol=1e-4, rtol=0)


def test_binning_on_synthetic_input():
    from zeda_rl.analysis import binned, summarize

    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, 4000)
    y = (x > 0.5).astype(float)
    pts = binned(x, y, bins=4)
    assert [p["count"] for p in pts] == [1000] * 4
    assert [round(p["y"]) for p in pts] == [0, 0, 1, 1]
    assert all(p["lo"] <= p["x"] <= p["hi"] for p in pts)
    ties = binned(np.zeros(10), np.arange(10.0), bins=5)  # coinciding edges: one bin, no NaN
    assert len(ties) == 1 and ties[0]["y"] == 4.5 and ties[0]["count"] == 10
    stats = {
        "prompt": np.array([0, 0, 1, 2]),
        "zero_share": np.array([0.0, 0.5, 1.0, 0.25]),
        "entropy": np.array([0.1, 0.2, 0.3, 0.4]),
        "teacher_gap": np.array([0.0, 0.1, 0.2, 0.3]),
    }
    s = summarize(stats, ["a", "b", "b"], bins=2)
    assert s["zero_share_per_family"] == {"a": 0.25, "b": 0.625}
    assert s["tokens"] == 4 and s["spearman_zero_entropy"] == pytest.approx(0.4)


def test_token_stats_line_up_with_the_generation(tmp_path):
    from zeda_rl.analysis import token_stats
    from zeda_rl.tokenizer import build_tokenizer

    _, zero = _converted(tmp_path, vocab_size=64)
    student, teacher = _load(zero), _load(tmp_path / "static")
    tok = build_tokenizer()
    stats = token_stats(student, teacher, tok, ["1+2=", "rev:abc=", "33+4="], max_new_tokens=5, batch_size=2)
    n = len(stats["zero_share"])
    per_prompt = stats.pop("prompt_zero_share")
    assert len(per_prompt) == 3 and ((per_prompt >= 0) & (per_prompt <= 1)).all()
    assert 3 <= n <= 15 and all(len(v) == n for v in stats.values())
    assert ((stats["zero_share"] >= 0) & (stats["zero_share"] <= 1)).all() and (stats["entropy"] >= 0).all()
    np.testing.assert_allclose(stats["teacher_gap"], np.abs(stats["teacher_logprob"] - stats["student_logprob"]))
    set_zce_mask(student, True)  # the student is then the teacher: no gap, no zero slot
    same = token_stats(student, teacher, tok, ["1+2=", "rev:abc="], max_new_tokens=5)
    assert same["teacher_gap"].max() < 1e-4 and same["zero_share"].max() == 0
