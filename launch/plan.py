"""The memory model of a run: what each learner rank, engine and weight push needs, before anything starts.

From the static teacher's HF config (no weights) and the run config alone, so a config that cannot fit
is refused in seconds instead of after an hour of engine start-up and an out-of-memory crash.

Parameters are counted exactly from the config (the converted student: router of N+N_Z rows), in three
groups by how Megatron shards them: experts (split over EP), tensor-parallel weights (attention and dense
projections, shared expert, embedding and output layer: split over TP) and replicated ones (norms, routers,
MLA's down projections). Per learner rank, with P its parameters:
- weights: 4P (fp32) or 2P + 4 x router (bf16, fp32 router); gradients: 4P (fp32 main grads either way);
- master weights: 0 (fp32: the weights are the master) or 4P (bf16); Adam: 8P;
  `optimizer: distributed` divides master + Adam by the parameter's data-parallel size (world/TP for the
  dense part, world/EP for experts); `cpu_offload` moves them, plus a 4P fp32 gradient copy, to host memory;
- activations for the largest micro-batch (micro_batch_tokens tokens, or one whole row when a row is longer;
  per token, per layer: the tensors autograd saves, divided by TP under sequence parallelism; local attention
  adds its S x S scores, flash attention does not), none / selective (scores recomputed) / full (only layer
  inputs kept, one layer rebuilt at a time, with its activation gradients) recompute;
- the logits chunk: chunk tokens x V/TP x (logits + fp32 log-softmax, its gradient, the logits' gradient);
- a fixed runtime reserve (CUDA context, NCCL and cuBLAS buffers, fragmentation: RUNTIME_GPU_BYTES).
Per engine: weights in its dtype over its TP size, and the KV cache for its concurrency (`concurrency`)
at full context (GQA: 2 L x KV heads x head dim; MLA: L x (kv_lora + rope dim)). Per push: the student's
weights in the engine dtype to every rollout replica, and the time on the configured path (`opd.weight_sync`)
at that path's bandwidth (PUSH_BANDWIDTH: measured for Ray's object store, stated for NCCL), named in the output.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

GIB = 1 << 30
RUNTIME_GPU_BYTES = 4 * GIB  # CUDA context ~0.6 GiB, NCCL/cuBLAS buffers, allocator fragmentation: not measured here
RUNTIME_CPU_BYTES = 16 << 20  # a CPU learner step beyond the model (checkpoint load, buffers): tests/test_plan.py
CPU_PROCESS_BYTES = 448 << 20  # resident size of a process after importing torch and Megatron (measured ~420 MB)
MARGIN = 0.10

# Weight-push bandwidth per `opd.weight_sync` path (bytes/s), and where the figure comes from. `push` says which.
PUSH_BANDWIDTH = {
    "ray": (
        0.53e9,
        "measured: bench/weight_sync.py's Ray push on a 2-core AMD EPYC CPU (315 MB fp32 Qwen3-MoE, learner EP=2 "
        "-> 1 engine, 32 MB buckets; README), the object-store path's only measurement; not re-measured on GPUs",
    ),
    "nccl": (
        20e9,
        "stated, not measured: 40% of a GPU's 50 GB/s share of p5en.48xlarge's 3200 Gbps EFA (the H200 configs' "
        "engines sit on another node than the learner), near the ~24 GB/s SGLang's bucketed NCCL update reaches "
        "for a Qwen3-30B-A3B-class model (~60 GB in ~2.5 s; bench/weight_sync.py's anchors)",
    ),
}
# Bytes a push may move through Ray's object store on a GPU cluster before `zeda doctor` warns: ~10 s a step at the
# measured Ray bandwidth. The H200 students are 57-61 GB an engine, 4 engines: ~240 GB, minutes a step.
OBJECT_STORE_PUSH_BOUND = 5e9


@dataclass(frozen=True)
class Gpu:
    name: str
    usable: int  # bytes a process can allocate
    note: str


GPUS = {
    "H200": Gpu(
        "H200", 139 * GIB, "141 GB nominal, 143771 MiB (140.4 GiB) in nvidia-smi; planned against 139 GiB usable"
    ),
    "H100": Gpu("H100", 78 * GIB, "80 GB nominal, 81559 MiB (79.6 GiB) in nvidia-smi; planned against 78 GiB usable"),
}
# instance type -> (GPU, GPUs per node, host memory)
INSTANCES = {"p5en.48xlarge": ("H200", 8, 2048 * GIB), "p5.48xlarge": ("H100", 8, 2048 * GIB)}


# ---- architecture and parameters ------------------------------------------------------------


@dataclass(frozen=True)
class Arch:
    """The figures of an HF MoE config the memory model needs (one of the two supported families)."""

    family: str  # "qwen3_moe" | "glm4_moe_lite"
    hidden: int
    layers: int
    moe_layers: tuple[int, ...]
    experts: int
    zero: int  # N_Z of the converted student (0: the static teacher)
    top_k: int
    moe_ffn: int
    ffn: int
    shared_ffn: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    max_positions: int
    tied: bool
    q_lora: int | None = None
    kv_lora: int = 0
    qk_nope: int = 0
    qk_rope: int = 0
    v_head: int = 0

    @property
    def mla(self) -> bool:
        return self.family == "glm4_moe_lite"


def arch_from_hf(cfg: dict, zero_experts: int | None = None) -> Arch:
    """The static config's figures, with the student's N_Z (None: N/2, as ZEDA; 0: the teacher itself)."""
    from zeda_rl.arch import spec_for

    spec = spec_for(cfg)
    n = spec.num_experts(cfg)
    common = dict(
        hidden=int(cfg["hidden_size"]),
        layers=int(cfg["num_hidden_layers"]),
        moe_layers=tuple(spec.moe_layers(cfg)),
        experts=n,
        zero=n // 2 if zero_experts is None else int(zero_experts),
        top_k=int(cfg["num_experts_per_tok"]),
        moe_ffn=int(cfg["moe_intermediate_size"]),
        ffn=int(cfg["intermediate_size"]),
        heads=int(cfg["num_attention_heads"]),
        vocab=int(cfg["vocab_size"]),
        max_positions=int(cfg["max_position_embeddings"]),
        tied=bool(cfg.get("tie_word_embeddings", False)),
    )
    if spec.source_model_type == "qwen3_moe":
        hd = cfg.get("head_dim") or common["hidden"] // common["heads"]
        return Arch("qwen3_moe", shared_ffn=0, kv_heads=int(cfg["num_key_value_heads"]), head_dim=int(hd), **common)
    return Arch(
        "glm4_moe_lite",
        shared_ffn=common["moe_ffn"] * int(cfg.get("n_shared_experts") or 0),
        kv_heads=common["heads"],
        head_dim=int(cfg["qk_nope_head_dim"]) + int(cfg["qk_rope_head_dim"]),
        q_lora=cfg.get("q_lora_rank"),
        kv_lora=int(cfg["kv_lora_rank"]),
        qk_nope=int(cfg["qk_nope_head_dim"]),
        qk_rope=int(cfg["qk_rope_head_dim"]),
        v_head=int(cfg["v_head_dim"]),
        **common,
    )


def param_groups(a: Arch) -> dict[str, int]:
    """Parameter counts by sharding: expert (over EP), tp (over TP), replicated (of which `router`)."""
    h = a.hidden
    g = dict(expert=0, tp=a.vocab * h * (1 if a.tied else 2), replicated=h, router=0)  # embeddings, output, final norm
    for i in range(a.layers):
        g["replicated"] += 2 * h  # input and pre-MLP norms
        if a.mla:
            nope_rope = a.heads * (a.qk_nope + a.qk_rope)
            if a.q_lora:
                g["replicated"] += h * a.q_lora + a.q_lora
                g["tp"] += a.q_lora * nope_rope
            else:
                g["tp"] += h * nope_rope
            g["replicated"] += h * (a.kv_lora + a.qk_rope) + a.kv_lora
            g["tp"] += a.kv_lora * a.heads * (a.qk_nope + a.v_head) + a.heads * a.v_head * h
        else:
            g["tp"] += 2 * h * a.heads * a.head_dim + 2 * h * a.kv_heads * a.head_dim
            g["replicated"] += 2 * a.head_dim  # q/k norms
        if i in a.moe_layers:
            router = (a.experts + a.zero) * h
            g["router"] += router
            g["replicated"] += router
            g["expert"] += a.experts * 3 * h * a.moe_ffn
            g["tp"] += 3 * h * a.shared_ffn
        else:
            g["tp"] += 3 * h * a.ffn
    return g


def param_count(a: Arch) -> int:
    g = param_groups(a)
    return g["expert"] + g["tp"] + g["replicated"]


# ---- learner ranks --------------------------------------------------------------------------


@dataclass(frozen=True)
class Knobs:
    """A learner layout: the `learner:` section's memory knobs plus the token shapes of the run."""

    ep: int
    dp: int
    tp: int
    precision: str
    recompute: str
    optimizer: str
    attention: str
    logits_chunk: int | None
    micro_tokens: int  # tokens of the largest micro-batch
    seq: int  # its padded row length

    @property
    def world(self) -> int:
        return self.ep * self.dp


def knobs(cfg, arch: Arch) -> Knobs:
    """The run config's learner layout; the longest row (prompt + response cap) sets the attention length and,
    when longer than micro_batch_tokens, the micro-batch (a row is never cut: learner.batch.plan_micro_batches)."""
    lc = cfg.learner
    seq = min(cfg.data.max_prompt_tokens + cfg.data.max_response_tokens, arch.max_positions)
    return Knobs(
        ep=lc.ep,
        dp=lc.dp,
        tp=lc.tp,
        precision=lc.precision,
        recompute=lc.recompute,
        optimizer=lc.optimizer,
        attention=lc.attention,
        logits_chunk=lc.logits_chunk_tokens,
        micro_tokens=max(lc.micro_batch_tokens, seq),
        seq=seq,
    )


def _layer_elems(a: Arch, k: Knobs, moe: bool, act: int) -> tuple[float, float]:
    """Activation elements saved per token in one layer: (everything, of which the attention scores)."""
    h = a.hidden
    e = 4 * h  # two norms' inputs and outputs (an output is the next projection's saved input)
    if a.mla:
        q = a.heads * (a.qk_nope + a.qk_rope)
        e += 2 * (a.q_lora or 0) + q + (a.kv_lora + a.qk_rope) + a.kv_lora + a.heads * (a.qk_nope + a.v_head)
        e += 2 * q + 2 * a.heads * a.v_head  # rotated q and k, v, the context
    else:
        qkv = (a.heads + 2 * a.kv_heads) * a.head_dim
        e += 2 * qkv + a.heads * a.head_dim  # projections, normed and rotated, the context
    scores = 2 * a.heads * k.seq if k.attention == "local" else 0  # scores and probabilities, S per token and head
    if moe:
        e += 3 * (a.experts + a.zero) * 4 / act  # fp32 router logits, probabilities, top-k
        e += a.top_k * (3 * h + 3 * a.moe_ffn)  # permuted input, fc1 (gate, up), activation, fc2 out, unpermuted
        e += 3 * a.shared_ffn + (h if a.shared_ffn else 0)
    else:
        e += 3 * a.ffn
    return e + scores, scores


def activations(a: Arch, k: Knobs, recompute: str | None = None) -> int:
    """Activation bytes of the largest micro-batch on one rank under `recompute` (default: the knob's)."""
    mode = recompute or k.recompute
    act = 4 if k.precision == "fp32" else 2
    tokens = k.micro_tokens / k.tp  # sequence parallelism splits every activation over TP
    per = [_layer_elems(a, k, i in a.moe_layers, act) for i in range(a.layers)]
    worst = max(e for e, _ in per)
    if mode == "full":  # layer inputs, one layer rebuilt and its activation gradients
        kept = a.layers * a.hidden + 2 * worst
    elif mode == "selective":  # one layer's scores rebuilt at a time
        kept = sum(e - s for e, s in per) + max(s for _, s in per)
    else:
        kept = sum(e for e, _ in per)
    return int((kept + a.hidden) * tokens * act)  # + the final norm


def logits_bytes(a: Arch, k: Knobs) -> int:
    chunk = min(k.logits_chunk or k.micro_tokens, k.micro_tokens)
    act = 4 if k.precision == "fp32" else 2
    return int(chunk * math.ceil(a.vocab / k.tp) * (act + 4 * 3))


def learner_rank(a: Arch, k: Knobs) -> dict[str, int]:
    """Bytes on one learner rank's device (weights .. runtime) and in host memory (`host`)."""
    g = param_groups(a)
    local = g["expert"] / k.ep + g["tp"] / k.tp + g["replicated"]
    router = g["router"]
    weights = 4 * local if k.precision == "fp32" else 2 * (local - router) + 4 * router
    master = 0 if k.precision == "fp32" else 4 * local
    adam = 8 * local
    if k.optimizer == "distributed":
        dense_dp, expert_dp = max(1, k.world // k.tp), max(1, k.world // k.ep)
        dense_share = (g["tp"] / k.tp + g["replicated"]) / local
        shrink = dense_share / dense_dp + (1 - dense_share) / expert_dp
        master, adam = master * shrink, adam * shrink
    host = 0
    if k.optimizer == "cpu_offload":
        host, master, adam = master + adam + 4 * local, 0, 0
    out = dict(
        params=local,
        weights=weights,
        grads=4 * local,
        master=master,
        optimizer=adam,
        activations=activations(a, k),
        activations_no_recompute=activations(a, k, "none"),
        logits=logits_bytes(a, k),
    )
    out = {key: int(v) for key, v in out.items()}
    out["total"] = sum(out[key] for key in ("weights", "grads", "master", "optimizer", "activations", "logits"))
    out["host"] = int(host)
    return out


def checkpoint_disk(rank: dict, k: Knobs, keep: int) -> dict:
    """Disk a learner checkpoint takes (every rank writes its weights, fp32 masters and AdamW state) and what the
    run's learner/ directory peaks at: `keep` of them plus the one being written before the oldest is deleted."""
    each = k.world * (rank["weights"] + rank["master"] + rank["optimizer"])
    return dict(bytes_each=int(each), keep=keep, bytes_peak=int(each * (keep + 1)))


# knob changes tried, in this order, when a rank does not fit (field, value); not optimizer: cpu_offload, which the
# learner refuses (learner.config.not_implemented) although its memory is budgeted here
KNOB_STEPS = [
    ("precision", "bf16"),
    ("optimizer", "distributed"),
    ("recompute", "full"),
    ("recompute", "selective"),
    ("attention", "flash"),
    ("tp", 2),
    ("tp", 4),
    ("tp", 8),
    ("logits_chunk", 4096),
]
_YAML = {"logits_chunk": "logits_chunk_tokens"}


def knobs_to_fit(a: Arch, k: Knobs, capacity: int, overhead: int) -> list[tuple[str, int]]:
    """Greedy: the knob change that saves most, repeated until the rank fits; [(\"learner.X: v\", bytes after)]."""
    steps, cur = [], k
    while learner_rank(a, cur)["total"] + overhead > capacity:
        options = []
        for name, value in KNOB_STEPS:
            if getattr(cur, name) == value or (
                name == "tp" and (cur.world % value or a.heads % value or value < cur.tp)
            ):
                continue
            nxt = replace(cur, **{name: value})
            options.append((learner_rank(a, nxt)["total"], name, value, nxt))
        if not options or min(options)[0] >= learner_rank(a, cur)["total"]:
            break
        total, name, value, cur = min(options, key=lambda o: o[0])
        steps.append((f"learner.{_YAML.get(name, name)}: {value}", total + overhead))
    return steps


# ---- engines and pushes ---------------------------------------------------------------------


def concurrency(cfg) -> int:
    """Sequences one rollout engine holds at once: two queued calls of `call_prompts` prompts x samples
    (launch.admission sizes calls so the staleness window spreads over every engine)."""
    o = cfg.opd
    window = o.max_staleness * o.sync_every + 1 if o.asynchronous else 1
    call = max(1, min(o.rollout_batch, math.ceil(o.prompts_per_step * window / cfg.rollout.replicas)))
    return 2 * call * o.samples_per_prompt


def kv_bytes_per_token(a: Arch, dtype_bytes: int, tp: int) -> int:
    if a.mla:  # the compressed latent and the rotary key, the same on every TP rank
        return a.layers * (a.kv_lora + a.qk_rope) * dtype_bytes
    return 2 * a.layers * math.ceil(a.kv_heads / tp) * a.head_dim * dtype_bytes


def engine(a: Arch, section, seqs: int, context: int) -> dict[str, int | float]:
    """One engine's bytes per GPU: weights, the KV cache for `seqs` full-length sequences, and (GPU engines,
    whose KV pool is what mem_fraction leaves after the weights) how many full sequences the pool holds."""
    dtype = 2 if section.dtype == "bfloat16" else 4
    tp = int(section.engine_kwargs.get("tp_size", 1))
    weights = param_count(a) * dtype / tp
    kv = kv_bytes_per_token(a, dtype, tp) * context * seqs
    return dict(
        tp=tp,
        weights=int(weights),
        kv=int(kv),
        kv_per_seq=kv_bytes_per_token(a, dtype, tp) * context,
        seqs=seqs,
        context=context,
        mem_fraction=float(section.engine_kwargs.get("mem_fraction", 0.8)),
    )


def push(a: Arch, cfg, bandwidth: float | None = None) -> dict:
    """One weight push of the student, in the rollout engines' dtype, to every rollout replica, on the configured
    path (`opd.weight_sync`) at its PUSH_BANDWIDTH (or `bandwidth` B/s, given).

    ray: every engine fetches its own copy of each bucket from the object store, so the whole `bytes_total` goes
    through the store at the bandwidth bench/weight_sync.py measures (bytes delivered to all engines a second).
    nccl: each learner rank broadcasts its buckets to every engine in one group, the ranks at once, so an engine
    receives its copy while the others receive theirs: the time is one engine's bytes at one engine's bandwidth.
    An engine restart sends the rest of the run through Ray (launch.fleet.WeightSync): `ray_seconds`.
    """
    path = cfg.opd.weight_sync
    per = param_count(a) * (2 if cfg.rollout.dtype == "bfloat16" else 4)
    total = per * cfg.rollout.replicas
    bw, source = (bandwidth, "given (zeda plan --bandwidth)") if bandwidth else PUSH_BANDWIDTH[path]
    serial = total if path == "ray" else per
    return dict(
        path=path,
        bytes_per_engine=per,
        bytes_total=total,
        object_store_bytes=total if path == "ray" else 0,
        bandwidth=bw,
        bandwidth_source=source,
        seconds=serial / bw,
        ray_seconds=total / PUSH_BANDWIDTH["ray"][0],
    )


# ---- the plan of a run ----------------------------------------------------------------------


def _verdict(name: str, need: float, capacity: float, knob: str = "", note: str = "") -> dict:
    return dict(
        placement=name,
        need=int(need),
        capacity=int(capacity),
        fits=need <= capacity,
        knob="" if need <= capacity else knob,
        note=note,
    )


def make_plan(
    cfg,
    hf_config: dict,
    *,
    gpu: str = "H200",
    cluster: dict | None = None,
    host_memory: int | None = None,
    margin: float = MARGIN,
    bandwidth: float | None = None,
) -> dict:
    """Every figure and a verdict per placement (JSON-able). A GPU run is checked against `gpu` (or the GPU of the
    cluster YAML's instance type); a CPU run (no GPUs asked) against `host_memory` (default: this machine's)."""
    student, teacher = arch_from_hf(hf_config, cfg.model.zero_experts), arch_from_hf(hf_config, 0)
    k = knobs(cfg, student)
    rank = learner_rank(student, k)
    context = min(cfg.data.max_prompt_tokens + cfg.sampling.max_new_tokens, student.max_positions)
    seqs = concurrency(cfg)
    eng = {
        "rollout": engine(student, cfg.rollout, seqs, context),
        "teacher": engine(teacher, cfg.teacher, seqs, context),
    }
    out = dict(
        arch=asdict(student),
        params=param_count(student),
        teacher_params=param_count(teacher),
        knobs=asdict(k),
        learner=rank,
        engines=eng,
        push=push(student, cfg, bandwidth),
        checkpoint=checkpoint_disk(rank, k, cfg.learner.keep_checkpoints),
        margin=margin,
        verdicts=[],
    )
    gpu_run = cfg.learner.gpus_per_rank > 0 or cfg.rollout.gpus > 0 or cfg.teacher.gpus > 0
    per_node_host = None
    if cluster is not None:
        gpu, per_node_host = _cluster_hardware(cluster, gpu)
        from launch import placement

        try:
            placement.pack(placement.plan(cfg), placement.cluster_nodes(cluster))
        except placement.Unplaceable as err:
            out["verdicts"].append(_verdict("cluster", 1, 0, "more nodes (min_workers) or fewer replicas", str(err)))
    if gpu_run:
        g = GPUS[gpu]
        out["device"] = dict(kind="gpu", name=g.name, usable=g.usable, note=g.note)
        out["verdicts"] += _gpu_verdicts(cfg, student, k, rank, eng, g, margin, per_node_host)
    else:
        import psutil

        total = host_memory or psutil.virtual_memory().total
        out["device"] = dict(kind="cpu", name="host memory", usable=total, note="this machine's memory (psutil)")
        procs = k.world + cfg.rollout.replicas + cfg.teacher.replicas
        need = (
            k.world * (rank["total"] + rank["host"] + RUNTIME_CPU_BYTES)
            + procs * CPU_PROCESS_BYTES
            + sum(
                cfg_e.replicas * (e["weights"] + e["kv"])
                for cfg_e, e in ((cfg.rollout, eng["rollout"]), (cfg.teacher, eng["teacher"]))
            )
        )
        out["verdicts"].append(
            _verdict(
                f"host ({procs} processes)",
                need,
                total * (1 - margin),
                "learner.micro_batch_tokens (or fewer replicas)",
            )
        )
    out["fits"] = all(v["fits"] for v in out["verdicts"])
    return out


def _cluster_hardware(cluster: dict, default: str) -> tuple[str, int | None]:
    head = (cluster.get("available_node_types") or {}).get(cluster.get("head_node_type"), {})
    itype = (head.get("node_config") or {}).get("InstanceType")
    if itype in INSTANCES:
        return INSTANCES[itype][0], INSTANCES[itype][2]
    return default, None


def _gpu_verdicts(
    cfg, a: Arch, k: Knobs, rank: dict, eng: dict, g: Gpu, margin: float, node_host: int | None
) -> list[dict]:
    cap = g.usable * max(1.0, cfg.learner.gpus_per_rank) * (1 - margin)
    steps = knobs_to_fit(a, k, cap, RUNTIME_GPU_BYTES)
    knob = ", then ".join(f"{s} ({s_b / GIB:.0f} GiB)" for s, s_b in steps) or "no single knob is enough: more EP ranks"
    out = [_verdict("learner rank", rank["total"] + RUNTIME_GPU_BYTES, cap, knob)]
    if rank["host"]:
        per_node = min(k.world, 8)  # 8 GPUs a node
        host = node_host or 2048 * GIB
        out.append(
            _verdict(
                f"learner host ({per_node} ranks a node)",
                per_node * rank["host"],
                host * (1 - margin),
                "learner.optimizer: distributed (keeps the state on the GPUs)",
            )
        )
    for role, section in (("rollout", cfg.rollout), ("teacher", cfg.teacher)):
        e = eng[role]
        pool = e["mem_fraction"] * g.usable * max(1.0, section.gpus) / e["tp"] - e["weights"]
        holds = max(0, int(pool // e["kv_per_seq"]))
        e["pool"], e["pool_seqs"] = int(pool), holds
        note = (
            ""
            if holds >= e["seqs"]
            else (
                f"KV pool holds {holds} of {e['seqs']} full-length sequences: the rest queue "
                f"(more: {role}.engine_kwargs.tp_size with as many gpus, or mem_fraction)"
            )
        )
        out.append(
            _verdict(
                f"{role} engine",
                e["weights"] + e["kv_per_seq"],
                e["mem_fraction"] * g.usable * max(1.0, section.gpus) / e["tp"],
                f"{role}.engine_kwargs.tp_size: 2 with {role}.gpus: 2",
                note,
            )
        )
    return out


def load_hf_config(cfg, override: str | None = None) -> dict:
    """The static teacher's config.json (`override`: another file or checkpoint dir, e.g. to plan away from the cluster)."""
    from pathlib import Path

    if override is None and cfg.model.teacher == "embedded":
        from zeda_rl.teacher import hf_config

        return hf_config(cfg.data.tasks, cfg.model.embedded_teacher).to_dict()
    path = Path(override or cfg.model.teacher)
    path = path / "config.json" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(2, "no HF config.json (plan elsewhere with --hf-config FILE)", str(path))
    from zeda_rl.arch import read_config_file

    return read_config_file(path)


def refusal(p: dict) -> str:
    """One line naming every placement that does not fit and the knob to turn ('' when all fit)."""
    bad = [v for v in p["verdicts"] if not v["fits"]]
    return "; ".join(
        f"{v['placement']} needs {v['need'] / GIB:.1f} GiB of {v['capacity'] / GIB:.1f} GiB "
        f"({p['device']['name']}, {p['margin']:.0%} margin){': ' + v['note'] if v['note'] else ''}; turn {v['knob']}"
        for v in bad
    )


def render(p: dict):
    """Rich tables: the learner rank, the engines, the push, the verdicts."""
    from rich.console import Group
    from rich.table import Table

    def gib(b):
        return f"{b / GIB:.2f}"

    k, r = p["knobs"], p["learner"]
    t1 = Table(
        title=f"learner rank (of {k['ep'] * k['dp']}: EP {k['ep']} x DP {k['dp']}, TP {k['tp']}; {k['precision']}, "
        f"recompute {k['recompute']}, optimizer {k['optimizer']}, attention {k['attention']}; "
        f"{k['micro_tokens']} tokens a micro-batch, rows of {k['seq']})"
    )
    t1.add_column("item"), t1.add_column("GiB", justify="right")
    t1.add_row("parameters on the rank", f"{r['params'] / 1e9:.3f} B ({p['params'] / 1e9:.3f} B in all)")
    for key in ("weights", "grads", "master", "optimizer", "activations", "logits", "total"):
        t1.add_row(key, gib(r[key]))
    t1.add_row("activations without recompute", gib(r["activations_no_recompute"]))
    t1.add_row("host (offloaded optimizer)", gib(r["host"]))
    t2 = Table(title="engines (per GPU)")
    for c in ("engine", "TP", "weights GiB", "KV GiB (sequences x context)", "KV pool GiB (sequences)"):
        t2.add_column(c, justify="right")
    for role, e in p["engines"].items():
        pool = f"{gib(e['pool'])} ({e['pool_seqs']})" if "pool" in e else "-"
        t2.add_row(role, str(e["tp"]), gib(e["weights"]), f"{gib(e['kv'])} ({e['seqs']} x {e['context']})", pool)
    q = p["push"]
    t3 = Table(title=f"weight push (opd.weight_sync: {q['path']})")
    for c in ("GiB per engine", "GiB in all", "seconds", "at GB/s", "bandwidth source"):
        t3.add_column(c, overflow="fold")
    t3.add_row(
        gib(q["bytes_per_engine"]),
        gib(q["bytes_total"]),
        f"{q['seconds']:.1f}",
        f"{q['bandwidth'] / 1e9:g}",
        q["bandwidth_source"],
    )
    if q["path"] != "ray":
        t3.add_row(
            "",
            "",
            f"{q['ray_seconds']:.1f}",
            f"{PUSH_BANDWIDTH['ray'][0] / 1e9:g}",
            "Ray fallback after an engine restart",
        )
    c = p["checkpoint"]
    t3.caption = (
        f"learner checkpoints: {gib(c['bytes_each'])} GiB each; learner.keep_checkpoints {c['keep']}: "
        f"{gib(c['bytes_peak'])} GiB of shared disk at peak"
    )
    d = p["device"]
    t4 = Table(title=f"fit: {d['name']} {gib(d['usable'])} GiB ({d['note']}), margin {p['margin']:.0%}")
    for c in ("placement", "need GiB", "capacity GiB", "verdict", "knob / note"):
        t4.add_column(c)
    for v in p["verdicts"]:
        t4.add_row(
            v["placement"],
            gib(v["need"]),
            gib(v["capacity"]),
            "[green]fits" if v["fits"] else "[red]does not fit",
            " ".join(x for x in (v["knob"], v["note"]) if x),
        )
    return Group(t1, t2, t3, t4)
