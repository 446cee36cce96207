"""Weight push without a detour: seconds per GB and bandwidth against the transport's own ceiling.

A real 2-rank EP learner (Megatron, a Qwen3-MoE checkpoint of a few hundred MB built with the
project's builders) pushes its weights to real rollout actors, interleaved in one run with the
ceilings of the same bytes, so machine noise hits them alike:

- memcpy:      one copy of the bytes into a preallocated buffer (the floor of any path);
- ray put/get: one actor puts the bytes in buckets of the same size, another gets each and
               copies it into a buffer (the least the object-store path must do: a copy in, a copy out);
- ray push:    `launch.fleet.WeightSync.push` + acks: the ranks cut their tensors out of Megatron
               (HF names, per-expert layout), put them, the engine fetches, stages and switches;
- gloo push:   the broadcast path (nccl on GPUs) into the fake SGLang engine, one group per rank.

Qwen3-30B-A3B's bytes (bf16, from launch.plan) are extrapolated from the measured bandwidths, beside
the published anchors (all on GPUs, so the comparison is of shape, not of hardware).

    python bench/weight_sync.py [--layers 6] [--experts 32] [--engines 1] [--repeats 3] [--no-gloo]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import ray

ANCHORS = [
    ("slime, colocated, bucketed (Qwen3-30B-A3B)", "7 s (16 s before bucketing)"),
    ("SGLang update_weights_from_distributed, bucketed NCCL", "~2.5 s"),
    ("NeMo-RL (refit)", "0.74-1.0 s"),
]


@ray.remote
class _Bytes:
    """The ceiling's two ends: put the bytes in buckets, or get them and copy each into a buffer."""

    def __init__(self, total: int):
        self.src = np.random.default_rng(0).integers(0, 255, total, dtype=np.uint8)
        self.dst = np.empty(total, np.uint8)

    def put(self, bucket: int) -> list:
        return [ray.put(self.src[i : i + bucket]) for i in range(0, self.src.size, bucket)]

    def get(self, refs: list) -> None:
        off = 0
        for r in refs:
            a = ray.get(r)
            self.dst[off : off + a.size] = a
            off += a.size


def _model_bytes(ckpt: Path) -> int:
    from safetensors.torch import load_file

    return sum(t.numel() * t.element_size() for t in load_file(ckpt / "model.safetensors").values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--engines", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--bucket-mb", type=int, default=32)
    ap.add_argument("--no-gloo", action="store_true")
    args = ap.parse_args()

    import torch

    from actors.rollout import RolloutActor
    from launch.fleet import WeightSync
    from launch.plan import arch_from_hf, param_count
    from learner.actor import LearnerGroup
    from learner.config import LearnerSection, SFTStage
    from learner.testing import tiny_checkpoint
    from zeda_rl.metrics import MetricsLog

    work = Path(tempfile.mkdtemp(prefix="zeda-ws-bench-"))
    ckpt = tiny_checkpoint(
        "qwen3_moe",
        work / "ckpt",
        num_hidden_layers=args.layers,
        num_experts=args.experts,
        hidden_size=256,
        moe_intermediate_size=512,
        intermediate_size=512,
        vocab_size=4096,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=32,
    )
    nbytes = _model_bytes(ckpt)
    bucket = args.bucket_mb << 20
    from launch.fleet import start_local_ray

    start_local_ray(num_cpus=4, log_to_driver=False)  # loopback only, as a local run
    log = MetricsLog(work / "metrics.jsonl")
    group = LearnerGroup(ckpt, LearnerSection(ep=2, bucket_bytes=bucket), SFTStage())
    engines = [RolloutActor.options(num_cpus=0.25).remote("torch", str(ckpt)) for _ in range(args.engines)]
    fakes = []
    if not args.no_gloo:
        from actors.fake_sglang import FakeSGLangEngine

        fakes = [
            RolloutActor.options(num_cpus=0.25).remote("sglang", str(ckpt), 1, {"_engine_factory": FakeSGLangEngine})
            for _ in range(args.engines)
        ]
    ends = [_Bytes.options(num_cpus=0.25).remote(nbytes) for _ in range(2)]
    ray.get([e.health.remote() for e in engines + fakes])
    ray_sync = WeightSync(group, engines, log)
    gloo_sync = WeightSync(group, fakes, log, transport="nccl") if fakes else None
    if gloo_sync:
        ray.get(gloo_sync.push(0))  # the groups are set up on the first push: not timed

    src, dst = torch.empty(nbytes, dtype=torch.uint8).random_(0, 255), torch.empty(nbytes, dtype=torch.uint8)
    times: dict[str, list[float]] = {"memcpy": [], "ray put/get": [], "ray push": [], "ray push: publish": []}
    if gloo_sync:
        times["gloo push"] = []
    for r in range(args.repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        times["memcpy"].append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        refs = ray.get(ends[0].put.remote(bucket))
        ray.get([ends[1].get.remote(refs) for _ in engines])
        times["ray put/get"].append(time.perf_counter() - t0)
        del refs

        t0 = time.perf_counter()
        acks = ray_sync.push(1 + r)
        times["ray push: publish"].append(time.perf_counter() - t0)
        ray.get(acks)
        times["ray push"].append(time.perf_counter() - t0)

        if gloo_sync:
            t0 = time.perf_counter()
            ray.get(gloo_sync.push(1 + r))
            times["gloo push"].append(time.perf_counter() - t0)

    gb = nbytes * len(engines) / 1e9  # bytes delivered per push (every engine gets the whole model)
    qwen = (
        param_count(
            arch_from_hf(
                json.loads((Path(__file__).parents[1] / "tests/fixtures/configs/qwen3-30b-a3b.json").read_text())
            )
        )
        * 2
    )
    best = {k: min(v) for k, v in times.items()}
    print(
        f"model: {nbytes / 1e6:.0f} MB (fp32, {args.layers} layers x {args.experts} experts), learner EP=2, "
        f"{len(engines)} engine(s), buckets of {args.bucket_mb} MB, best of {args.repeats}"
    )
    print(
        f"{'path':<20} {'s/push':>8} {'s/GB':>7} {'GB/s':>7} {'vs memcpy':>10} {'vs put/get':>11} {'Qwen3-30B-A3B':>14}"
    )
    for k, t in best.items():
        bw = gb / t
        print(
            f"{k:<20} {t:8.3f} {t / gb:7.3f} {bw:7.2f} {best['memcpy'] / t:10.2f} {best['ray put/get'] / t:11.2f} "
            f"{qwen / 1e9 / bw:12.1f} s"
        )
    print(
        f"(Qwen3-30B-A3B: {qwen / 1e9:.1f} GB in bf16, launch.plan; spread of the repeats: "
        + ", ".join(f"{k} {statistics.pstdev(v):.3f} s" for k, v in times.items())
        + ")"
    )
    print("anchors (GPU clusters, Qwen3-30B-A3B-class):")
    for name, value in ANCHORS:
        print(f"  {name:<55} {value}")
    group.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
