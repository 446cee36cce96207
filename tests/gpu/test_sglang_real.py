"""The real SGLang engine and plugin on a GPU (skipped unless CUDA and sglang are present).

SGLang's scheduler SIGKILLs the process that created the Engine when it dies, so every
SGLang call runs in a subprocess: this file is also the worker (`python
tests/gpu/test_sglang_real.py engine|kernel ...`), and pytest only builds checkpoints,
launches it and compares its JSON answer with the transformers reference on CPU.

Checked: the plugin loads a converted checkpoint; generation, routed experts (with zero
slots, ids >= N), scoring at T=1 and T!=1, and a weight update through the real engine
agree with TorchEngine; and the Triton fused MoE kernel really skips id -1 (correct output,
and much faster with every slot at -1 than with every slot on a real expert).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [20, 21], [30, 31, 32, 33]]
VOCAB = 512
HAVE_GPU_SGLANG = torch.cuda.is_available() and importlib.util.find_spec("sglang") is not None
pytestmark = pytest.mark.skipif(not HAVE_GPU_SGLANG, reason="needs a CUDA GPU and sglang")


def _run_worker(*args, timeout=900) -> dict:
    out = Path(args[-1])
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    proc = subprocess.run(
        [sys.executable, __file__, *map(str, args)], cwd=ROOT, env=env, timeout=timeout, capture_output=True, text=True
    )
    if proc.returncode != 0 or not out.exists():
        raise AssertionError(f"worker failed (rc={proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return json.loads(out.read_text())


def _reference(ckpt):
    """TorchEngine on CPU (fp32), with the two loading workarounds of tests/test_sglang_backend.py."""
    from transformers.conversion_mapping import (
        get_checkpoint_conversion_mapping,
        register_checkpoint_conversion_mapping,
    )

    from actors.engine import make_engine

    for src, dst in (("qwen3_moe", "qwen3_moe_plus_plus"), ("glm4_moe_lite", "glm4_moe_lite_plus_plus")):
        if get_checkpoint_conversion_mapping(dst) is None:
            register_checkpoint_conversion_mapping(dst, get_checkpoint_conversion_mapping(src))
    eng = make_engine("torch", str(ckpt))
    return eng


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A small Qwen3-MoE (dimensions SGLang's kernels accept) with decisive routing, converted."""
    from transformers import Qwen3MoeForCausalLM

    from zeda_rl.convert import convert_checkpoint
    from zeda_rl.tiny import tiny_qwen3_moe_config

    d = tmp_path_factory.mktemp("real")
    cfg = tiny_qwen3_moe_config(
        vocab_size=VOCAB,
        hidden_size=256,
        intermediate_size=512,
        moe_intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=1024,
        eos_token_id=1,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.mul_(40.0)  # clear routing margins, so bf16 vs fp32 rarely flips a choice
    model.save_pretrained(d / "static")
    return convert_checkpoint(d / "static", d / "zeda", zero_experts=4, seed=0)


def test_real_engine_matches_reference(checkpoint, tmp_path):
    import numpy as np
    from safetensors.torch import save_file

    from zeda_rl.modeling import record_routing
    from zeda_rl.weights import WeightUpdate, make_buckets

    ref = _reference(checkpoint)
    torch.manual_seed(1)
    new = {
        k: (v + 0.02 * torch.randn_like(v)).contiguous()
        for k, v in ref.model.state_dict().items()
        if v.is_floating_point()
    }
    save_file(new, tmp_path / "update.safetensors")  # transformers (fused) names: the backend must split them
    res = _run_worker("engine", checkpoint, tmp_path / "update.safetensors", tmp_path / "out.json")

    def check(gen, scores, tag):
        for g in gen:
            seq = g["prompt"] + g["out"]
            want = ref.score([seq])[0][len(g["prompt"]) - 1 :]
            np.testing.assert_allclose(g["logprobs"], want, atol=0.15, err_msg=f"{tag}: behaviour logprobs")
            with torch.no_grad(), record_routing(ref.model) as rec:
                ref.model(torch.tensor([seq]))
            hf = rec()[0].numpy()  # [P+O, L, K]
            routed = np.asarray(g["routed"])
            assert routed.shape == (len(seq), 2, 2) and (routed[-1] == -1).all()
            agree = (np.sort(routed[:-1], -1) == np.sort(hf[:-1], -1)).mean()
            assert agree > 0.9, f"{tag}: routed experts agree on {agree:.0%} of slots"
        seqs = [g["prompt"] + g["out"] for g in gen]
        for t, got in scores.items():
            for w, s in zip(ref.score(seqs, temperature=float(t)), got):
                np.testing.assert_allclose(s, w, atol=0.15, err_msg=f"{tag}: score at T={t}")

    check(res["before"]["gen"], res["before"]["scores"], "v0")
    assert any((np.asarray(g["routed"]) >= 8).any() for g in res["before"]["gen"]), "no zero slot was ever chosen"
    assert res["version"] == 3
    ref.update_weights(WeightUpdate(version=3, buckets=make_buckets(new.items(), 1 << 20)))
    check(res["after"]["gen"], res["after"]["scores"], "v3")
    assert [g["out"] for g in res["after"]["gen"]] != [g["out"] for g in res["before"]["gen"]]


def test_triton_kernel_skips_minus_one(tmp_path):
    res = _run_worker("kernel", tmp_path / "out.json", timeout=600)
    if res.get("skipped"):
        pytest.skip(res["skipped"])
    assert res["max_err_mixed"] < 2e-2, res
    assert res["all_skipped_max_abs"] == 0.0, res
    assert res["ms_all_skipped"] < 0.5 * res["ms_all_real"], res


# ---- worker (runs in a subprocess) ---------------------------------------------------------------


def _engine_worker(ckpt: str, update_file: str, out: str) -> None:
    from safetensors.torch import load_file

    from actors.sglang_engine import SGLangEngine
    from zeda_rl.sampling import SamplingParams
    from zeda_rl.weights import WeightUpdate, make_buckets

    eng = SGLangEngine(
        ckpt,
        mem_fraction=0.3,
        score_top_k=VOCAB,
        dtype="bfloat16",
        attention_backend="triton",
        cuda_graph_max_bs=4,
        random_seed=0,
        log_level="error",
    )

    def snapshot():
        gen = eng.generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=8))
        seqs = [s.prompt_ids + s.output_ids for s in gen]
        return {
            "gen": [
                {
                    "prompt": s.prompt_ids,
                    "out": s.output_ids,
                    "logprobs": s.logprobs.tolist(),
                    "routed": s.routed_experts.tolist(),
                }
                for s in gen
            ],
            "scores": {str(t): [x.tolist() for x in eng.score(seqs, temperature=t)] for t in (1.0, 2.0)},
        }

    res = {"before": snapshot()}
    update = WeightUpdate(version=3, buckets=make_buckets(load_file(update_file).items(), 1 << 20))
    res["version"] = eng.update_weights(update)
    res["after"] = snapshot()
    eng.shutdown()
    Path(out).write_text(json.dumps(res))


def _kernel_worker(out: str) -> None:
    """Call SGLang's Triton fused MoE directly: -1 slots must cost nothing and add nothing."""
    import inspect

    try:
        from sglang.srt.layers.moe.fused_moe_triton.fused_moe import fused_experts
        from sglang.srt.layers.moe.moe_runner import MoeRunnerConfig
        from sglang.srt.layers.moe.topk import StandardTopKOutput
    except ImportError as e:
        Path(out).write_text(json.dumps({"skipped": f"SGLang's fused MoE API moved: {e}"}))
        return
    if "topk_output" not in inspect.signature(fused_experts).parameters:
        Path(out).write_text(json.dumps({"skipped": "fused_experts has an older signature"}))
        return
    torch.manual_seed(0)
    t, e, z, h, i, k = 4096, 64, 32, 2048, 768, 8
    dev, dt = "cuda", torch.bfloat16
    x = torch.randn(t, h, device=dev, dtype=dt) / 4
    w1 = torch.randn(e, 2 * i, h, device=dev, dtype=dt) / h**0.5
    w2 = torch.randn(e, h, i, device=dev, dtype=dt) / i**0.5
    # the plugin's setting: global experts N+N_Z != local experts N turns the -1 check on
    cfg = MoeRunnerConfig(num_experts=e + z, num_local_experts=e, top_k=k, inplace=False)
    ids = torch.stack([torch.randperm(e, device=dev)[:k] for _ in range(t)]).to(torch.int32)
    w = torch.rand(t, k, device=dev)
    zero = torch.rand(t, k, device=dev) < 0.5

    def run(ids_, w_):
        return fused_experts(x, w1, w2, StandardTopKOutput(w_, ids_, None), cfg)

    mixed = run(ids.masked_fill(zero, -1), w.masked_fill(zero, 0.0))
    ref = run(ids, w.masked_fill(zero, 0.0))  # same slots on real experts with weight 0
    all_skipped = run(torch.full_like(ids, -1), torch.zeros_like(w))

    def ms(ids_, w_):
        for _ in range(3):
            run(ids_, w_)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10):
            run(ids_, w_)
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 10

    Path(out).write_text(
        json.dumps(
            {
                "max_err_mixed": float((mixed.float() - ref.float()).abs().max() / ref.float().abs().max()),
                "all_skipped_max_abs": float(all_skipped.float().abs().max()),
                "ms_all_real": ms(ids, w),
                "ms_all_skipped": ms(torch.full_like(ids, -1), torch.zeros_like(w)),
            }
        )
    )


if __name__ == "__main__":
    {"engine": _engine_worker, "kernel": _kernel_worker}[sys.argv[1]](*sys.argv[2:])
