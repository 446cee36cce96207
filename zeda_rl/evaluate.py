"""Held-out evaluation of any checkpoint (teacher or converted student).

Accuracy is exact match on the built-in tasks with greedy decoding; the zero-expert
ratio is measured on a teacher-forced pass over each prompt + its own completion, so
it counts exactly the tokens the model processed, per MoE layer.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import zeda_rl  # noqa: F401  (registers the zero-expert Auto classes)
from zeda_rl.arch import read_config
from zeda_rl.checks import check_routers
from zeda_rl.generate import greedy_complete
from zeda_rl.modeling import moe_blocks, record_routing
from zeda_rl.progress import Progress
from zeda_rl.routing import zero_ratio
from zeda_rl.tasks import families, make_split, score

# What a checkpoint must hold for AutoTokenizer to load its own tokenizer (one of them; tokenizer_config.json
# names the class, tokenizer.json is the fast tokenizer). Without either, transformers builds an empty
# tokenizer that encodes every prompt to nothing, and `generate` fails deep inside.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def check_checkpoint(checkpoint: str | Path) -> dict:
    """What `zeda eval` checks of a checkpoint before loading anything: its config.json (present, a JSON
    object, experts per token within 1..N: `zeda_rl.arch.read_config`) and its tokenizer files.
    Returns the config."""
    path = Path(checkpoint)
    cfg = read_config(path)
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise FileNotFoundError(
            f"{path}: no tokenizer files; expected {' or '.join(TOKENIZER_FILES)} (with the vocabulary files it "
            "names) beside config.json. Copy them from the model this checkpoint came from (`zeda convert` "
            "copies whatever its input holds)"
        )
    return cfg


def load(checkpoint: str | Path, dtype=torch.float32):
    path = Path(checkpoint)
    check_checkpoint(path)  # config.json and tokenizer files, before anything loads
    check_routers(path)  # a NaN/Inf or non-float router is refused before the weights load
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    return model, AutoTokenizer.from_pretrained(path)


@torch.no_grad()
def routed_zero_ratio(model, tokenizer, texts: list[str], batch_size: int = 64) -> dict:
    """Zero-expert share over every non-pad token of `texts`, overall and per MoE layer."""
    blocks = moe_blocks(model)
    if not blocks:  # a static checkpoint (the teacher): every routed slot is a real expert
        moe = [m for m in model.modules() if hasattr(m, "gate") and hasattr(m, "experts")]
        count = sum(
            int(tokenizer(texts[i : i + batch_size], padding=True, return_tensors="pt").attention_mask.sum())
            for i in range(0, len(texts), batch_size)
        )
        return {"overall": 0.0, "per_layer": [0.0] * len(moe), "tokens": count, "note": "static model: no zero experts"}
    n = blocks[0].spec.num_experts
    zero = torch.zeros(len(blocks))
    count = 0
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i : i + batch_size], return_tensors="pt", padding=True)
        with record_routing(model) as rec:
            model(input_ids=enc.input_ids, attention_mask=enc.attention_mask)
        mask = enc.attention_mask.bool()
        r = zero_ratio(rec(), n, token_mask=mask)
        zero += torch.tensor(r["per_layer"]) * int(mask.sum())
        count += int(mask.sum())
    per_layer = (zero / max(count, 1)).tolist()
    return {"overall": sum(per_layer) / len(per_layer), "per_layer": per_layer, "tokens": count}


def evaluate(
    checkpoint: str | Path,
    n_per_family: int = 100,
    batch_size: int = 64,
    model=None,
    tokenizer=None,
    progress: bool = True,
    log=None,
    label: str | None = None,
    tasks: str = "basic",
) -> dict:
    """Accuracy per family of the `tasks` suite and zero-expert ratio. At n_per_family=500 this is minutes per
    checkpoint, so it shows progress per batch (`zeda_rl.progress`; `log`, a MetricsLog, gets the monitor's
    progress events)."""
    if isinstance(n_per_family, bool) or not isinstance(n_per_family, int) or n_per_family < 1:
        raise ValueError(f"n_per_family (zeda eval --n) must be an integer >= 1, got {n_per_family!r}")
    if model is None:
        model, tokenizer = load(checkpoint)
    examples = make_split("heldout", n_per_family, suite=tasks)
    max_new = max(len(tokenizer(e.answer).input_ids) for e in examples) + 4
    prompts = [e.prompt for e in examples]
    completions = []
    with Progress(label or f"eval {Path(checkpoint).name}", len(prompts), "prompts", log=log, enabled=progress) as bar:
        for i in range(0, len(prompts), batch_size):
            completions += greedy_complete(
                model, tokenizer, prompts[i : i + batch_size], max_new_tokens=max_new, batch_size=batch_size
            )
            bar.update(len(completions))
    hits = [int(score(e, c)) for e, c in zip(examples, completions)]
    per_family = {}
    for fam in families(tasks):
        fam_hits = [h for e, h in zip(examples, hits) if e.family == fam]
        per_family[fam] = sum(fam_hits) / max(len(fam_hits), 1)
    texts = [e.prompt + c for e, c in zip(examples, completions)]
    return {
        "checkpoint": str(checkpoint),
        "accuracy": {**per_family, "mean": sum(per_family.values()) / len(per_family)},
        "hits": hits,  # 1/0 per held-out prompt, in make_split's order: what paired comparisons resample
        "zero_ratio": routed_zero_ratio(model, tokenizer, texts, batch_size),
        "n_per_family": n_per_family,
        "tasks": tasks,
    }


def render(result: dict):
    """A rich table of an evaluate() result."""
    from rich.table import Table

    t = Table(title=f"held-out evaluation: {result['checkpoint']}")
    t.add_column("metric")
    t.add_column("value", justify="right")
    for fam, acc in result["accuracy"].items():
        t.add_row(f"accuracy/{fam}", f"{100 * acc:.1f}%")
    z = result["zero_ratio"]
    t.add_row("zero-expert ratio (overall)", f"{100 * z['overall']:.1f}%")
    for i, r in enumerate(z["per_layer"]):
        t.add_row(f"zero-expert ratio / MoE layer {i}", f"{100 * r:.1f}%")
    return t


# ---- benchmark suites (zeda_rl.suites): r_ZE from the routing the engines return ----------------


def moe_shape(checkpoint: str | Path) -> tuple[int, int]:
    """(N real experts, number of MoE layers) from a checkpoint's config.json, static or converted."""
    from zeda_rl.arch import ARCHS, TARGETS

    path = Path(checkpoint) / "config.json"
    cfg = read_config(checkpoint)
    name = (cfg.get("architectures") or [None])[0]
    spec = TARGETS.get(name) or ARCHS.get(name)
    if spec is None:
        raise ValueError(f"{path}: architecture {name!r} unknown; expected one of {sorted(ARCHS) + sorted(TARGETS)}")
    return spec.num_experts(cfg), len(spec.moe_layers(cfg))


def request_zero_shares(routed, num_experts: int, n_layers: int):
    """Per-layer zero-slot share of one request over every token it routed (prompt and output).

    `routed` is a Sample's int [P+O, L_moe, K] expert ids, -1 where nothing was recorded;
    a zero slot is an id >= N. None (a static model, which records no routing) is 0 everywhere.
    """
    import numpy as np

    if routed is None:
        return np.zeros(n_layers)
    routed = np.asarray(routed)
    if routed.ndim != 3 or routed.shape[1] != n_layers:
        raise ValueError(f"routed experts of shape {list(routed.shape)}; expected [tokens, {n_layers} MoE layers, K]")
    seen = (routed >= 0).sum(axis=(0, 2))
    return (routed >= num_experts).sum(axis=(0, 2)) / np.maximum(seen, 1)


def reduce_routing(sample, num_experts: int, n_layers: int):
    """`sample` with its expert ids replaced by its per-layer zero-slot share (`extra["zero_shares"]`), what an
    evaluation keeps of them: an engine actor sends this instead of the ids (`EngineActor.generate`)."""
    import dataclasses

    shares = request_zero_shares(sample.routed_experts, num_experts, n_layers)
    return dataclasses.replace(sample, routed_experts=None, extra={**sample.extra, "zero_shares": shares.tolist()})


def sample_zero_shares(sample, num_experts: int, n_layers: int):
    """A sample's per-layer zero-slot share: the one its engine reduced it to, or from its expert ids."""
    import numpy as np

    shares = sample.extra.get("zero_shares")
    if shares is None:
        return request_zero_shares(sample.routed_experts, num_experts, n_layers)
    if len(shares) != n_layers:
        raise ValueError(f"zero shares of {len(shares)} layers from the engine; expected {n_layers} MoE layers")
    return np.asarray(shares, dtype=float)


def mean_zero_ratio(per_request: list) -> dict:
    """r_ZE as the official ZEDA evaluation reports it: each request's share, averaged over requests."""
    import numpy as np

    if not per_request:
        return {"overall": 0.0, "per_layer": [], "requests": 0}
    per_layer = np.mean(np.stack(per_request), axis=0)
    return {
        "overall": float(per_layer.mean()) if per_layer.size else 0.0,
        "per_layer": per_layer.tolist(),
        "requests": len(per_request),
    }


def builtin_report(result: dict) -> dict:
    """An `evaluate()` result in the suite report's shape, so the built-in tasks compare side by side too.

    Its r_ZE is the token-weighted share over all prompts and completions (what `evaluate`
    measures), not the per-request mean a suite reports.
    """
    z = result["zero_ratio"]
    rze = {"overall": z["overall"], "per_layer": z["per_layer"]}
    rows = [
        {
            "name": fam,
            "grader": "builtin exact match",
            "problems": result["n_per_family"],
            "samples": 1,
            "accuracy": acc,
            "r_ze": rze,
        }
        for fam, acc in result["accuracy"].items()
        if fam != "mean"
    ]
    return {
        "suite": "builtin",
        "checkpoint": result["checkpoint"],
        "decoding": {"temperature": 0.0, "samples": 1},
        "benchmarks": rows,
        "average": {"accuracy": result["accuracy"]["mean"], "r_ze": z["overall"]},
    }
