"""The `sglang` engine backend: the Engine protocol over SGLang's offline `sglang.Engine`.

Same contract as `actors.torch_engine.TorchEngine` (see `actors.engine`): samples carry
behaviour logprobs at the sampling temperature and the expert slot ids each fed token was
routed to, int16 [P+O, L_moe, K] with -1 for the last token (never fed). Zero slots keep
their ids >= N there, so the learner can replay them.

How each piece maps onto SGLang (read from sglang 0.5.x `srt/entrypoints/engine.py`):
- generate: `Engine.generate(input_ids=..., sampling_params=..., return_logprob=True,
  return_routed_experts=True)` with server arg `enable_return_routed_experts`. Output
  logprobs are taken after temperature scaling (unless SGLANG_RETURN_ORIGINAL_LOGPROB is
  set, which is refused). Routed experts come back as base64 int32
  [P+O-1, num_hidden_layers, K], every decoder layer included; we keep the MoE layers.
- score: a prefill (`max_new_tokens=0`, `logprob_start_len=0`). SGLang computes input-token
  logprobs from the raw logits, i.e. at temperature 1 only. At T=1 the result is exact; at
  T != 1 we request the top `score_top_k` input logprobs per position and renormalise over
  those (plus the scored token): log p_T(y) ~= lp(y)/T - logsumexp(lp(top)/T). That
  overestimates log p_T by the tail mass outside the top k (negligible for T < 1 and a
  large k); `strict_temperature=True` refuses T != 1 instead.
- update_weights: every bucket is fetched first (from Ray's object store: views of shared
  memory, no copy), so a lost bucket leaves the old version whole; then one
  `update_weights_from_tensor` per bucket (flush_cache=False), one `flush_cache`, and the
  version moves, so a request in flight finishes under the old version (never aborted: the
  update waits for the running call, `actors.serving.Serving`) and no cache entry computed
  with the old weights survives: SGLang refuses a flush while requests run, so the flush is
  retried until it lands (`flush_timeout_s`) and a flush that never lands is an error, never
  a silent stale cache. SGLang has no second copy of the weights to stage into: a bucket it
  refuses after others were applied leaves a mix, served as version -1. Transformers'
  fused expert tensors (`experts.gate_up_proj` [E, 2I, H], `experts.down_proj` [E, H, I])
  are split into the checkpoint names SGLang's loaders know.
- the broadcast path: `init_distributed_weight_sync` once per publishing learner rank (a
  group of its own, the rank is its root: SGLang receives with src=0), then
  `update_weights_from_distributed(version, buckets)` with each bucket's group and
  (name, dtype, shape) list, one SGLang call per bucket, in the order the ranks send.
- generate, score and the weight calls are serialised by `actors.serving.Serving`: the rollout
  actor runs weight calls in a thread of their own, and SGLang's offline Engine takes one
  call at a time (it runs each on its own event loop, whatever the calling thread).

Zero-expert checkpoints need the plugin in `actors.sglang_plugin`, registered through
SGLANG_EXTERNAL_MODEL_PACKAGE, and SGLang sees them through a "view" directory: symlinks
to every file plus a config.json whose model_type is the stock one (so the scheduler
processes load it without our config classes) and whose architectures list our class
first and the stock one second (so SGLang's name-keyed special cases, e.g. MLA for
GLM-4.7-Flash, still apply). Options that cannot take expert id -1 are refused up front.

When SGLang's scheduler dies it SIGKILLs the process that created the Engine: create this
class inside a process of its own (a Ray actor, or a subprocess in tests).
"""

from __future__ import annotations

import base64
import importlib
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from actors.serving import Serving
from actors.sglang_plugin import PACKAGE as PLUGIN_PACKAGE
from actors.sglang_plugin.zero_slots import router_spec_from_config
from zeda_rl.arch import ARCHS, TARGETS, ArchSpec, read_config
from zeda_rl.checks import check_routers
from zeda_rl.sampling import Sample, SamplingParams

_FUSED_EXPERTS = re.compile(r"^(?P<prefix>.*\.experts)\.(?P<which>gate_up_proj|down_proj)$")


# ---- the checkpoint as SGLang will see it ------------------------------------------------------


@dataclass(frozen=True)
class CheckpointInfo:
    config: dict
    arch: ArchSpec | None  # None: an architecture the arch table does not know
    moe_layers: list[int] = field(default_factory=list)
    num_hidden_layers: int = 0
    top_k: int = 0

    @property
    def zero_experts(self) -> bool:
        return router_spec_from_config(self.config) is not None

    @property
    def family(self) -> str | None:
        return self.arch.router if self.arch else None


def inspect_checkpoint(checkpoint: str | Path) -> CheckpointInfo:
    """What the engine needs from config.json; first refuses NaN/Inf or non-float routers
    (`zeda_rl.checks`, on CPU from the safetensors files), which SGLang would load silently."""
    check_routers(checkpoint)
    cfg = read_config(checkpoint)
    name = (cfg.get("architectures") or [None])[0]
    arch = TARGETS.get(name) or ARCHS.get(name)
    return CheckpointInfo(
        config=cfg,
        arch=arch,
        moe_layers=arch.moe_layers(cfg) if arch else [],
        num_hidden_layers=int(cfg.get("num_hidden_layers") or 0),
        top_k=int(cfg.get("num_experts_per_tok") or 0),
    )


def sglang_model_dir(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """A view of a converted checkpoint that stock SGLang processes can load (see module doc)."""
    src, out = Path(checkpoint).resolve(), Path(out_dir)
    info = inspect_checkpoint(src)
    if info.arch is None or info.arch.target != (info.config.get("architectures") or [None])[0]:
        raise ValueError(f"{src}: not a converted (zero-expert) checkpoint; serve it directly")
    out.mkdir(parents=True, exist_ok=True)
    for p in src.iterdir():
        if p.name != "config.json":
            (out / p.name).symlink_to(p)
    cfg = dict(info.config)
    cfg["model_type"] = info.arch.source_model_type
    cfg["architectures"] = [info.arch.target, info.arch.source]
    if info.arch.router == "softmax" and "num_experts" not in cfg:  # transformers 5 may save num_local_experts
        cfg["num_experts"] = info.arch.num_experts(cfg)
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return out


def validate_server_options(options: dict, zero_experts: bool, family: str | None) -> dict:
    """Server args with the zero-expert requirements applied; ValueError for what cannot work.

    Only SGLang's Triton fused MoE runner skips expert id -1. DeepEP-style a2a backends
    dispatch by expert id, EPLB and redundant experts remap ids through logical->physical
    tables, expert parallelism maps ids through a local table (where -1 indexes the last
    entry), a fused shared expert takes id N (a zero slot here), and the NextN/MTP draft
    model used by speculative decoding has no zero-expert router.
    """
    opts = dict(options)
    if not zero_experts:
        return opts

    def refuse(what: str, why: str):
        raise ValueError(f"zero-expert checkpoint: {what} is not supported: {why}")

    if opts.get("moe_a2a_backend") not in (None, "none"):
        refuse(f"moe_a2a_backend={opts['moe_a2a_backend']!r}", "the a2a dispatch cannot take expert id -1")
    if opts.get("enable_deepep_moe"):
        refuse("enable_deepep_moe", "DeepEP dispatch cannot take expert id -1")
    if opts.get("enable_eplb"):
        refuse("enable_eplb", "EPLB remaps expert ids through logical->physical tables that have no entry for -1")
    if int(opts.get("ep_num_redundant_experts") or 0) > 0:
        refuse(
            f"ep_num_redundant_experts={opts['ep_num_redundant_experts']}", "redundant experts need EPLB's id remapping"
        )
    if int(opts.get("ep_size") or 1) > 1:
        refuse(f"ep_size={opts['ep_size']}", "the expert-parallel local id table would map -1 to the last expert")
    if opts.get("speculative_algorithm"):
        refuse(
            f"speculative_algorithm={opts['speculative_algorithm']!r}",
            "the draft (MTP) model has no zero-expert router",
        )
    runner = opts.get("moe_runner_backend")
    if runner in (None, "auto"):
        opts["moe_runner_backend"] = "triton"
    elif runner != "triton":
        refuse(f"moe_runner_backend={runner!r}", "only the Triton fused MoE kernel skips expert id -1")
    if family == "sigmoid":
        if opts.get("disable_shared_experts_fusion") is False:
            refuse("disable_shared_experts_fusion=False", "a fused shared expert takes id N, a zero slot here")
        opts["disable_shared_experts_fusion"] = True
    return opts


# ---- format conversions ------------------------------------------------------------------------


def decode_routed_experts(
    value, n_tokens: int, num_hidden_layers: int, top_k: int, moe_layers: list[int]
) -> np.ndarray:
    """SGLang's routed experts ([n_tokens-1, all layers, K], base64 int32) -> int16 [n_tokens, L_moe, K]."""
    if isinstance(value, (str, bytes, bytearray)):
        arr = np.frombuffer(base64.b64decode(value), dtype=np.int32)
    elif isinstance(value, torch.Tensor):
        arr = value.detach().cpu().numpy().astype(np.int32)
    else:
        arr = np.asarray(value, dtype=np.int32)
    rows = n_tokens - 1
    if arr.size != rows * num_hidden_layers * top_k:
        raise ValueError(
            f"routed experts: got {arr.size} ids, expected {rows} fed tokens x {num_hidden_layers} layers x {top_k} slots"
        )
    out = np.full((n_tokens, len(moe_layers), top_k), -1, dtype=np.int16)  # the last token is never fed
    out[:rows] = arr.reshape(rows, num_hidden_layers, top_k)[:, moe_layers]
    return out


def to_checkpoint_layout(named_tensors):
    """(name, tensor) pairs with transformers' fused expert tensors split into per-expert checkpoint names."""
    for name, t in named_tensors:
        t = torch.from_numpy(np.ascontiguousarray(t)) if isinstance(t, np.ndarray) else t
        m = _FUSED_EXPERTS.match(name)
        if m is None:
            yield name, t
            continue
        if t.dim() != 3:
            raise ValueError(f"weight {name!r}: expected a fused [E, ., .] expert tensor, got shape {list(t.shape)}")
        p = m["prefix"]
        for e in range(t.shape[0]):
            if m["which"] == "gate_up_proj":  # [E, 2I, H], gate rows first
                half = t.shape[1] // 2
                yield f"{p}.{e}.gate_proj.weight", t[e, :half]
                yield f"{p}.{e}.up_proj.weight", t[e, half:]
            else:  # [E, H, I]
                yield f"{p}.{e}.down_proj.weight", t[e]


def tempered_logprobs(
    lp: np.ndarray, ids: np.ndarray, top_lp: np.ndarray, top_ids: np.ndarray, temperature: float
) -> np.ndarray:
    """log p_T(y) renormalised over the top-k tokens and y, from temperature-1 logprobs.

    lp, ids: [n] logprob and id of each scored token; top_lp, top_ids: [n, k].
    """
    in_top = (top_ids == ids[:, None]).any(axis=1)
    extra = np.where(in_top, -np.inf, lp / temperature)[:, None]
    z = np.concatenate([top_lp / temperature, extra], axis=1)
    zmax = z.max(axis=1, keepdims=True)
    lse = (zmax + np.log(np.exp(z - zmax).sum(axis=1, keepdims=True)))[:, 0]
    return (lp / temperature - lse).astype(np.float32)


def _result(ret) -> tuple[bool, str]:
    """SGLang's control calls answer (success, message) or an object with .success/.message."""
    if isinstance(ret, tuple):
        return bool(ret[0]), str(ret[1]) if len(ret) > 1 else ""
    if hasattr(ret, "success"):
        return bool(ret.success), str(getattr(ret, "message", ""))
    return True, "" if ret is None else str(ret)


def _launch_sglang(**server_args):
    """The real engine. sglang is imported only here, so this module imports without it."""
    if os.environ.get("SGLANG_RETURN_ORIGINAL_LOGPROB", "").lower() in ("1", "true", "yes"):
        raise ValueError(
            "SGLANG_RETURN_ORIGINAL_LOGPROB is set: behaviour logprobs must be at the sampling temperature"
        )
    current = os.environ.get("SGLANG_EXTERNAL_MODEL_PACKAGE")
    if current and current != PLUGIN_PACKAGE:
        raise ValueError(
            f"SGLANG_EXTERNAL_MODEL_PACKAGE={current!r} is set; the zero-expert models need {PLUGIN_PACKAGE!r}"
        )
    os.environ["SGLANG_EXTERNAL_MODEL_PACKAGE"] = PLUGIN_PACKAGE  # inherited by the scheduler processes
    import sglang

    # SGLang's registry only warns when a model module fails to import; fail loudly here instead.
    importlib.import_module(PLUGIN_PACKAGE + ".models")
    return sglang.Engine(**server_args)


# ---- the engine --------------------------------------------------------------------------------


class SGLangEngine:
    """Engine protocol over `sglang.Engine` (or any object with its API, via `_engine_factory`)."""

    def __init__(
        self,
        checkpoint: str | Path,
        tp_size: int = 1,
        mem_fraction: float = 0.8,
        *,
        score_top_k: int = 64,
        strict_temperature: bool = False,
        return_routed_experts: bool = True,
        flush_timeout_s: float = 60.0,
        _engine_factory=None,
        **engine_kwargs,
    ):
        if "model_path" in engine_kwargs:
            raise ValueError("pass the checkpoint as the first argument, not model_path")
        self.checkpoint = Path(checkpoint)
        self.info = inspect_checkpoint(self.checkpoint)
        self.score_top_k = int(score_top_k)
        self.strict_temperature = strict_temperature
        self.flush_timeout_s = float(flush_timeout_s)
        opts = dict(engine_kwargs, tp_size=tp_size, mem_fraction_static=mem_fraction)
        opts.setdefault("skip_tokenizer_init", True)  # token ids in, token ids out
        opts.setdefault("enable_return_routed_experts", bool(return_routed_experts and self.info.moe_layers))
        self.server_options = validate_server_options(opts, self.info.zero_experts, self.info.family)
        self._routed = bool(self.server_options["enable_return_routed_experts"] and self.info.moe_layers)

        self._view_dir = None
        model_path = self.checkpoint
        if self.info.zero_experts:
            self._view_dir = tempfile.mkdtemp(prefix="zeda-sglang-view-")
            model_path = sglang_model_dir(self.checkpoint, self._view_dir)
        try:
            self._engine = (_engine_factory or _launch_sglang)(model_path=str(model_path), **self.server_options)
        except BaseException:
            self._cleanup_view()
            raise
        self.version = 0
        self._serving = Serving()
        self._groups: set[str] = set()

    # ---- generation -----------------------------------------------------------------------------

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Sample]:
        with self._serving.call():
            return self._generate(prompts, params)

    def _generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Sample]:
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("generate: every prompt needs at least one token")
        sp = {
            "max_new_tokens": int(params.max_new_tokens),
            "temperature": max(float(params.temperature), 0.0),  # SGLang: T < 1e-6 is greedy
            "top_p": float(params.top_p),
        }
        if params.top_k > 0:  # SGLang's "off" is -1 (its default) and it refuses 0, so only a real cut is sent
            sp["top_k"] = int(params.top_k)
        if params.stop_token_ids:  # SGLang also stops at the model's own EOS ids in this mode
            sp["stop_token_ids"] = [int(t) for t in params.stop_token_ids]
        else:  # ignore_eos disables every stop id, which is what an empty stop set means here
            sp["ignore_eos"] = True
        per_request = (
            [dict(sp, sampling_seed=params.seed + i) for i in range(len(prompts))] if params.seed is not None else sp
        )
        outs = self._engine.generate(
            input_ids=[[int(t) for t in p] for p in prompts],
            sampling_params=per_request,
            return_logprob=True,
            return_routed_experts=self._routed,
        )
        outs = [outs] if isinstance(outs, dict) else outs
        return [self._sample(list(p), o) for p, o in zip(prompts, outs)]

    def _sample(self, prompt: list[int], out: dict) -> Sample:
        meta = out["meta_info"]
        token_lps = meta.get("output_token_logprobs") or []
        output_ids = [int(t) for t in (out.get("output_ids") or [e[1] for e in token_lps])]
        if len(token_lps) != len(output_ids):
            raise RuntimeError(f"SGLang returned {len(output_ids)} output tokens but {len(token_lps)} logprobs")
        finish = meta.get("finish_reason") or {}
        kind = finish.get("type") if isinstance(finish, dict) else str(finish)
        if kind == "abort":
            raise RuntimeError(f"SGLang aborted a request: {finish.get('message', finish)}")
        routed = None
        if self._routed:
            routed = decode_routed_experts(
                meta["routed_experts"],
                len(prompt) + len(output_ids),
                self.info.num_hidden_layers,
                self.info.top_k,
                self.info.moe_layers,
            )
        return Sample(
            prompt_ids=prompt,
            output_ids=output_ids,
            logprobs=np.asarray([e[0] for e in token_lps], dtype=np.float32),
            routed_experts=routed,
            finish_reason="stop" if kind == "stop" else "length",
            policy_version=self.version,
        )

    # ---- teacher scoring ------------------------------------------------------------------------

    def score(self, sequences: list[list[int]], temperature: float = 1.0) -> list[np.ndarray]:
        with self._serving.call():
            return self._score(sequences, temperature)

    def _score(self, sequences: list[list[int]], temperature: float) -> list[np.ndarray]:
        if temperature <= 0:
            raise ValueError(f"score: temperature must be positive, got {temperature}")
        exact = abs(temperature - 1.0) < 1e-6
        if not exact and self.strict_temperature:
            raise ValueError(f"score: SGLang gives input logprobs at temperature 1 only (asked {temperature})")
        results: list[np.ndarray] = [np.zeros(0, dtype=np.float32) for _ in sequences]
        for i, entries, tops in self._prefill_logprobs(sequences, None if exact else self.score_top_k):
            lp = np.asarray([e[0] for e in entries], dtype=np.float64)
            if exact:
                results[i] = lp.astype(np.float32)
                continue
            top_lp = np.asarray([[e[0] for e in row] for row in tops], dtype=np.float64)
            top_ids = np.asarray([[int(e[1]) for e in row] for row in tops])
            ids = np.asarray([int(t) for t in sequences[i][1:]])
            results[i] = tempered_logprobs(lp, ids, top_lp, top_ids, temperature)
        return results

    def score_topk(self, sequences: list[list[int]], k: int) -> list[dict]:
        """SGLang's input top logprobs (temperature 1, as it computes every input logprob)."""
        if k < 1:
            raise ValueError(f"score_topk: k must be >= 1, got {k}")
        with self._serving.call():
            results = [
                {
                    "logprobs": np.zeros(0, np.float32),
                    "top_ids": np.zeros((0, k), np.int32),
                    "top_logprobs": np.zeros((0, k), np.float32),
                }
                for _ in sequences
            ]
            for i, entries, tops in self._prefill_logprobs(sequences, int(k)):
                results[i] = {
                    "logprobs": np.asarray([e[0] for e in entries], dtype=np.float32),
                    "top_ids": np.asarray([[int(e[1]) for e in row] for row in tops], dtype=np.int32),
                    "top_logprobs": np.asarray([[e[0] for e in row] for row in tops], dtype=np.float32),
                }
            return results

    def _prefill_logprobs(self, sequences: list[list[int]], top_n: int | None) -> list[tuple[int, list, list | None]]:
        """One prefill (no new token) of every sequence of >= 2 tokens: per sequence, its index, SGLang's input
        logprob entries for tokens 1..len-1 (checked against the tokens) and, with `top_n`, its top entries."""
        todo = [i for i, s in enumerate(sequences) if len(s) >= 2]
        if not todo:
            return []
        outs = self._engine.generate(
            input_ids=[[int(t) for t in sequences[i]] for i in todo],
            sampling_params={"max_new_tokens": 0, "temperature": 1.0},
            return_logprob=True,
            logprob_start_len=0,
            top_logprobs_num=top_n,
        )
        outs = [outs] if isinstance(outs, dict) else outs
        found = []
        for i, out in zip(todo, outs):
            seq, meta = sequences[i], out["meta_info"]
            entries = _align(meta["input_token_logprobs"], len(seq), "input_token_logprobs")
            if any(e[1] is not None and int(e[1]) != int(t) for e, t in zip(entries, seq[1:])):
                raise RuntimeError("score: SGLang's input logprobs do not line up with the sequence")
            tops = _align(meta["input_top_logprobs"], len(seq), "input_top_logprobs") if top_n else None
            found.append((i, entries, tops))
        return found

    # ---- weight sync ----------------------------------------------------------------------------

    def update_weights(self, update) -> int:
        """Apply a `zeda_rl.weights.WeightUpdate`: fetch every bucket, then apply them, flush the cache, move the version."""
        with self._serving.updating():
            buckets = [list(to_checkpoint_layout(b)) for b in update.buckets]
            return self._apply(update.version, buckets)

    def _apply(self, version: int, buckets: list) -> int:
        with self._serving.switching():  # takes over a broadcast push's hold, should one be left
            for n, named in enumerate(buckets):
                ok, msg = _result(self._engine.update_weights_from_tensor(named_tensors=named, flush_cache=False))
                if not ok:
                    refused = RuntimeError(f"SGLang refused bucket {n} of weight update v{version}: {msg}")
                    if n:  # a mix of versions: no cached prefix of either may be reused
                        self._serve_mixed(refused)
                    raise refused
            self._flush(version)
        return self.version

    def _serve_mixed(self, refused: RuntimeError) -> None:
        """After a partly applied update: serve version -1 with an empty cache, and raise `refused` (the
        cause; a flush that fails too comes with it)."""
        try:
            self._flush(-1)
        except RuntimeError as err:
            raise refused from err
        raise refused

    def _flush(self, version: int) -> None:
        """Empty SGLang's prefix cache, then serve `version`. SGLang refuses while requests are queued or
        running (ours have all returned: the caller holds the serving lock), so it is retried until
        `flush_timeout_s`; a cache that cannot be emptied is an error, not stale state served as new."""
        deadline = time.monotonic() + self.flush_timeout_s
        while True:
            ok, msg = _result(self._engine.flush_cache())
            if ok:
                break
            if time.monotonic() > deadline:
                self.version = -1
                raise RuntimeError(
                    f"SGLang could not flush its cache after weight update v{version} within "
                    f"{self.flush_timeout_s:.0f} s (flush_timeout_s): {msg}"
                )
            time.sleep(0.05)
        self.version = int(version)

    @property
    def weight_sync_ranks(self) -> int:
        """Ranks this engine takes in a broadcast group: one per TP worker."""
        return int(self.server_options.get("tp_size", 1))

    def init_distributed_weight_sync(
        self,
        master_address: str,
        master_port: int,
        rank_offset: int,
        world_size: int,
        group_name: str = "zeda_weight_sync",
        backend: str = "nccl",
    ) -> None:
        """Join one learner rank's weight-broadcast group (that rank is 0, this engine's TP workers
        from rank_offset on); blocks until the whole group has joined."""
        ok, msg = _result(
            self._engine.init_weights_update_group(
                master_address=master_address,
                master_port=int(master_port),
                rank_offset=int(rank_offset),
                world_size=int(world_size),
                group_name=group_name,
                backend=backend,
            )
        )
        if not ok:
            raise RuntimeError(f"SGLang could not join weight group {group_name!r}: {msg}")
        self._groups.add(group_name)

    def hold_for_update(self) -> None:
        """Stop serving until the next distributed update (or `release_hold`): returns once the running call ended.
        An engine outside the broadcast groups (restarted since they were set up) refuses: the ranks would wait for
        it in every broadcast."""
        if not self._groups:
            raise RuntimeError(
                "hold for a broadcast push: this engine is in no weight group (restarted since the join)"
            )
        self._serving.hold()

    def release_hold(self) -> None:
        self._serving.release()

    def update_weights_from_distributed(self, version: int, buckets: list[tuple[str, list]]) -> int:
        """Receive `buckets` [(group, [(name, dtype, shape), ...]), ...] as the learner ranks broadcast
        them, in this order, then serve `version`. A bucket SGLang fails on leaves version -1."""
        failed = None
        with self._serving.switching():  # the hold `hold_for_update` took, if it came first; released on any error
            for group, tensors in buckets:
                if group not in self._groups:
                    raise RuntimeError(
                        f"update_weights_from_distributed: group {group!r} not joined (init_distributed_weight_sync)"
                    )
                fused = [n for n, _, _ in tensors if _FUSED_EXPERTS.match(n)]
                if fused:
                    raise ValueError(f"broadcast tensors must use checkpoint names (per-expert), got {fused[:2]}")
            for n, (group, tensors) in enumerate(buckets):  # every bucket is received: a sender never waits forever
                ok, msg = _result(
                    self._engine.update_weights_from_distributed(
                        names=[t[0] for t in tensors],
                        dtypes=[str(t[1]).removeprefix("torch.") for t in tensors],
                        shapes=[list(map(int, t[2])) for t in tensors],
                        group_name=group,
                        flush_cache=False,
                    )
                )
                failed = failed or (None if ok else f"bucket {n}: {msg}")
            if failed:
                self._serve_mixed(RuntimeError(f"SGLang refused distributed weight update v{version}, {failed}"))
            self._flush(version)
        return self.version

    # ---- lifecycle ------------------------------------------------------------------------------

    def shutdown(self) -> None:
        try:
            self._engine.shutdown()
        finally:
            self._cleanup_view()

    def _cleanup_view(self) -> None:
        if self._view_dir:
            shutil.rmtree(self._view_dir, ignore_errors=True)
            self._view_dir = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()
        return False


def _align(entries: list, seq_len: int, what: str) -> list:
    """Per-position entries for tokens 1..len-1 (SGLang leads with a None entry for token 0)."""
    if len(entries) == seq_len:
        entries = entries[1:]
    if len(entries) != seq_len - 1:
        raise RuntimeError(f"score: SGLang returned {len(entries)} {what} for a sequence of {seq_len} tokens")
    return entries
