"""FakeSGLangEngine: a CPU stand-in for `sglang.Engine`, for tests only. It is NOT SGLang.

It answers the part of `sglang.Engine`'s offline API that `actors.sglang_engine` uses, in
SGLang's own shapes, so the backend's decoding, layout and weight-sync logic can be tested
end to end without a GPU: `SGLangEngine(ckpt, _engine_factory=FakeSGLangEngine)`.
What it copies from SGLang 0.5.x (and what a change there would have to be copied here):
- generate returns {"output_ids", "meta_info"} per request; meta_info holds finish_reason
  {"type": "stop"|"length", ...}, output_token_logprobs [(logprob, id, None)] at the
  sampling temperature, input_token_logprobs / input_top_logprobs from the raw logits
  (temperature 1, as SGLang computes them) led by a None entry for token 0, and
  routed_experts as base64 int32 [P+O-1, num_hidden_layers, K] with every decoder layer
  present (dense layers hold zeros, as SGLang's zero-initialised host buffer does);
- top_k is -1 (off) or >= 1 (SGLang refuses 0), applied with the torch engine's sampler;
- ignore_eos disables stop_token_ids too; without it the config's eos ids also stop;
- update_weights_from_tensor takes checkpoint names only (per-expert, like SGLang's loaders)
  and answers (success, message); unknown names fail rather than raise;
- init_weights_update_group really joins the group (`zeda_rl.weights.join_group`, SGLang's
  recipe; gloo here) and update_weights_from_distributed really receives each tensor by a
  broadcast from rank 0 of the named group, all of them before it checks any (as SGLang's
  model runner receives, then loads);
- it routes with the zeda_rl transformers model (`zeda_rl.modeling`), not with the plugin;
- a prompt prefilled before is answered from the logits cached at its first prefill (what a
  radix-cache hit computed with old weights would give) until `flush_cache`, and `flush_cache`
  refuses (success False, SGLang's message) while a request is running, as SGLang's scheduler
  does: a weight update that skips or ignores the flush serves stale state, visibly.
It keeps a log of control calls in `calls` so tests can check what was sent.
"""

from __future__ import annotations

import base64
import threading
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from transformers import AutoModelForCausalLM, DynamicCache

import zeda_rl.modeling as modeling
from actors.torch_engine import _sample
from zeda_rl.arch import ARCHS, TARGETS, read_config
from zeda_rl.weights import TORCH_DTYPES, join_group, model_tensors, tensor_target

_SAMPLING_KEYS = {"max_new_tokens", "temperature", "top_p", "top_k", "stop_token_ids", "ignore_eos", "sampling_seed"}


@dataclass
class FlushCacheReqOutput:
    success: bool = True
    message: str = ""


class FakeSGLangEngine:
    """Fake of `sglang.Engine` backed by the zeda_rl transformers model (see module docstring)."""

    def __init__(self, **server_args):
        self.server_args = SimpleNamespace(**server_args)
        path = Path(server_args["model_path"])
        cfg = read_config(path)
        self.model = _load(path, cfg).eval()
        self._tensors = model_tensors(self.model)
        arch = TARGETS.get(cfg["architectures"][0]) or ARCHS.get(cfg["architectures"][0])
        self.moe_layers = arch.moe_layers(cfg) if arch else []
        self.num_hidden_layers = int(cfg["num_hidden_layers"])
        self.top_k = int(cfg.get("num_experts_per_tok") or 0)
        eos = cfg.get("eos_token_id")
        self.eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self.calls: dict[str, list[dict]] = defaultdict(list)
        self.groups: dict = {}
        self.flushes = 0
        self.is_shutdown = False
        self._prefix: dict[tuple[int, ...], torch.Tensor] = {}  # prompt -> its prefill logits (the "radix cache")
        self._running = 0
        self._state = threading.Lock()

    # ---- generate ---------------------------------------------------------------------------------

    def generate(
        self,
        prompt=None,
        sampling_params=None,
        input_ids=None,
        return_logprob=False,
        logprob_start_len=None,
        top_logprobs_num=None,
        return_routed_experts=False,
    ):
        if prompt is not None or input_ids is None:
            raise ValueError("FakeSGLangEngine takes input_ids only (skip_tokenizer_init)")
        if return_routed_experts and not getattr(self.server_args, "enable_return_routed_experts", False):
            raise ValueError("return_routed_experts needs the server arg enable_return_routed_experts")
        single = bool(input_ids) and isinstance(input_ids[0], int)
        batch = [input_ids] if single else input_ids
        sps = sampling_params if isinstance(sampling_params, list) else [sampling_params or {}] * len(batch)
        with self._state:
            self._running += 1
        try:
            outs = [
                self._one(
                    list(ids), dict(sp), return_logprob, logprob_start_len, top_logprobs_num, return_routed_experts
                )
                for ids, sp in zip(batch, sps)
            ]
        finally:
            with self._state:
                self._running -= 1
        return outs[0] if single else outs

    @torch.no_grad()
    def _one(self, ids, sp, return_logprob, logprob_start_len, top_n, return_routed):
        unknown = set(sp) - _SAMPLING_KEYS
        if unknown:
            raise TypeError(f"unexpected sampling params {sorted(unknown)}")
        max_new = int(sp.get("max_new_tokens", 128))
        temperature = float(sp.get("temperature", 1.0))
        top_k = int(sp.get("top_k", -1))
        if top_k == 0 or top_k < -1:  # as SGLang's SamplingParams.verify
            raise ValueError(f"top_k must be -1 (disable), or at least 1, got {top_k}")
        stops = set() if sp.get("ignore_eos") else set(sp.get("stop_token_ids") or []) | self.eos_ids
        gen = torch.Generator().manual_seed(int(sp["sampling_seed"])) if sp.get("sampling_seed") is not None else None
        meta: dict = {"prompt_tokens": len(ids)}
        out_ids, out_lps, finish = [], [], {"type": "length", "length": max_new}
        with modeling.record_routing(self.model) as routed:
            cache = DynamicCache(config=self.model.config)
            logits = self.model(input_ids=torch.tensor([ids]), cache=cache, use_cache=True).logits[0].float()
            with self._state:  # a prompt seen since the last flush: the cached prefill, whatever the weights now
                logits = self._prefix.setdefault(tuple(ids), logits)
            if return_logprob and logprob_start_len == 0:
                self._input_logprobs(meta, ids, logits, top_n)
            for step in range(max_new):
                tok, lp = _sample(
                    logits[-1:], temperature if temperature >= 1e-6 else 0.0, float(sp.get("top_p", 1.0)), gen, top_k
                )
                out_ids.append(int(tok))
                out_lps.append(float(lp))
                if int(tok) in stops:
                    finish = {"type": "stop", "matched": int(tok)}
                    break
                if step + 1 < max_new:
                    logits = self.model(input_ids=tok[:, None], cache=cache, use_cache=True).logits[0].float()
            fed = routed() if self.moe_layers and return_routed else None  # [1, P+O-1, L_moe, K]
        meta.update(completion_tokens=len(out_ids), finish_reason=finish)
        if return_logprob:
            meta["output_token_logprobs"] = [(lp, t, None) for lp, t in zip(out_lps, out_ids)]
        if return_routed and fed is not None:
            n_fed = len(ids) + len(out_ids) - 1
            full = np.zeros((n_fed, self.num_hidden_layers, self.top_k), dtype=np.int32)
            full[:, self.moe_layers] = fed[0, :n_fed].numpy()
            meta["routed_experts"] = base64.b64encode(full.tobytes()).decode("ascii")
        return {"output_ids": out_ids, "meta_info": meta}

    @staticmethod
    def _input_logprobs(meta, ids, logits, top_n):
        logp = torch.log_softmax(logits[:-1], dim=-1)  # temperature 1: SGLang does not scale input logprobs
        target = torch.tensor(ids[1:])
        lp = logp.gather(1, target[:, None])[:, 0]
        meta["input_token_logprobs"] = [(None, ids[0], None)] + [(float(v), int(t), None) for v, t in zip(lp, target)]
        if top_n:
            vals, idx = logp.topk(min(int(top_n), logp.shape[-1]), dim=-1)
            meta["input_top_logprobs"] = [None] + [
                [(float(v), int(i), None) for v, i in zip(vr, ir)] for vr, ir in zip(vals, idx)
            ]

    # ---- weight sync ------------------------------------------------------------------------------

    def update_weights_from_tensor(self, named_tensors, load_format=None, flush_cache=True):
        self.calls["update_weights_from_tensor"].append(
            {"names": [n for n, _ in named_tensors], "flush_cache": flush_cache}
        )
        if load_format is not None:
            return False, f"load_format {load_format!r} is not supported by the fake"
        plan = []
        for name, t in named_tensors:
            dst = self._target(name)
            if dst is None:
                return False, f"Failed to update weights: unknown parameter {name!r}"
            if tuple(dst.shape) != tuple(t.shape):
                return (
                    False,
                    f"Failed to update weights: {name!r} has shape {list(t.shape)}, expected {list(dst.shape)}",
                )
            plan.append((dst, t))
        with torch.no_grad():
            for dst, t in plan:
                dst.copy_(t)
        if flush_cache and not self.flush_cache().success:
            return False, "Cache not flushed because there are pending requests."
        return True, "Succeeded to update parameter online."

    def _target(self, name: str) -> torch.Tensor | None:
        """The tensor (or slice of a fused expert tensor) a checkpoint name loads into; None for
        transformers' fused in-memory names, which are not checkpoint names."""
        if name.endswith((".gate_up_proj", ".down_proj")) and ".experts." in name + ".":
            return None
        return tensor_target(self._tensors, name)

    def flush_cache(self):
        with self._state:
            if self._running:
                return FlushCacheReqOutput(False, "Cache not flushed because there are pending requests.")
            self._prefix.clear()
            self.flushes += 1
        return FlushCacheReqOutput()

    def init_weights_update_group(
        self, master_address, master_port, rank_offset, world_size, group_name, backend="nccl"
    ):
        self.calls["init_weights_update_group"].append(
            dict(
                master_address=master_address,
                master_port=master_port,
                rank_offset=rank_offset,
                world_size=world_size,
                group_name=group_name,
                backend=backend,
            )
        )
        self.groups[group_name] = join_group(backend, master_address, master_port, world_size, rank_offset, group_name)
        return True, "Succeeded to initialize custom process group."

    def update_weights_from_distributed(
        self, names, dtypes, shapes, group_name="weight_update_group", flush_cache=True, load_format=None
    ):
        self.calls["update_weights_from_distributed"].append(
            dict(names=names, dtypes=dtypes, shapes=shapes, group_name=group_name)
        )
        received = []
        for name, dtype, shape in zip(names, dtypes, shapes):
            t = torch.empty(shape, dtype=TORCH_DTYPES[dtype])
            torch.distributed.broadcast(t, src=0, group=self.groups[group_name])
            received.append((name, t))
        for name, t in received:
            dst = self._target(name)
            if dst is None or dst.shape != t.shape:
                return False, f"Failed to update weights: {name!r} unknown or of another shape"
        with torch.no_grad():
            for name, t in received:
                self._target(name).copy_(t)
        if flush_cache and not self.flush_cache().success:
            return False, "Cache not flushed because there are pending requests."
        return True, "Succeeded to update parameter online."

    def shutdown(self):
        self.is_shutdown = True


def _load(path: Path, cfg: dict):
    """The model class SGLang would resolve: our zero-expert class first, else the stock one."""
    for name in cfg.get("architectures") or []:
        cls = getattr(modeling, name, None)
        if cls is not None:
            config = cls.config_class.from_dict({k: v for k, v in cfg.items() if k != "model_type"})
            return cls.from_pretrained(path, config=config, dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
