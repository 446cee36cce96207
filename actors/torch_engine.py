"""The `torch` engine: batched KV-cache generation over the zeda_rl model, on CPU.

It is the embedded default and the reference for the SGLang backend: same sampling
(temperature, top-p, top-k, stop tokens), behaviour logprobs at the sampling temperature,
and the expert ids each token was routed to (for routing replay in the learner).

Weight updates are staged while the engine keeps generating (the rollout actor runs them in
a thread of their own) and switched in between two calls (`actors.serving.Serving`), so a
call sees one complete version from start to end, and an update that fails before its last
bucket leaves the old version serving.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, DynamicCache
from transformers.utils import logging as hf_logging

import zeda_rl  # noqa: F401  (registers the zero-expert Auto classes)
from actors.serving import Serving
from zeda_rl.checks import check_routers
from zeda_rl.modeling import moe_blocks, record_routing
from zeda_rl.sampling import Sample, SamplingParams


class TorchEngine:
    def __init__(
        self,
        checkpoint: str | Path,
        dtype: str = "float32",
        threads: int | None = None,
        pad_token_id: int | None = None,
    ):
        if threads:
            torch.set_num_threads(threads)
        hf_logging.disable_progress_bar()
        check_routers(checkpoint)  # NaN/Inf or non-float routers are refused before the weights load
        self.model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=getattr(torch, dtype)).eval()
        cfg = self.model.config
        self.pad_id = pad_token_id if pad_token_id is not None else (cfg.pad_token_id or 0)
        self.version = 0
        self._serving = Serving()

    # ---- generation ---------------------------------------------------------------------------

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Sample]:
        with self._serving.call():
            return self._generate(prompts, params)

    @torch.no_grad()
    def _generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Sample]:
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("generate: every prompt needs at least one token")
        gen = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        b, plen = len(prompts), max(len(p) for p in prompts)
        ids = torch.full((b, plen), self.pad_id, dtype=torch.long)
        mask = torch.zeros((b, plen), dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding keeps every row's next token at the end
            ids[i, plen - len(p) :] = torch.tensor(p)
            mask[i, plen - len(p) :] = 1
        stop = torch.tensor(list(params.stop_token_ids) or [-1])
        done = torch.zeros(b, dtype=torch.bool)
        out_ids, out_lp = [], []
        cache = DynamicCache(config=self.model.config)
        step_ids, step_mask = ids, mask
        has_moe = bool(moe_blocks(self.model))
        with record_routing(self.model) as routed:
            for _ in range(params.max_new_tokens):
                pos = (step_mask.cumsum(-1) - 1).clamp_min(0)[:, -step_ids.shape[1] :]
                logits = (
                    self.model(
                        input_ids=step_ids, attention_mask=step_mask, position_ids=pos, cache=cache, use_cache=True
                    )
                    .logits[:, -1]
                    .float()
                )
                tok, lp = _sample(logits, params.temperature, params.top_p, gen, params.top_k)
                tok = torch.where(done, torch.full_like(tok, self.pad_id), tok)
                out_ids.append(tok)
                out_lp.append(lp)
                fed = (~done).long()  # a finished row's padding is never attended
                done = done | torch.isin(tok, stop)
                if bool(done.all()):
                    break
                step_ids = tok[:, None]
                step_mask = torch.cat([step_mask, fed[:, None]], dim=1)
            experts = routed() if has_moe else None  # [B, plen + steps - 1, L, K]

        toks = torch.stack(out_ids, 1)
        lps = torch.stack(out_lp, 1)
        samples = []
        for i, p in enumerate(prompts):
            row = toks[i].tolist()
            n_out = next((j + 1 for j, t in enumerate(row) if t in params.stop_token_ids), len(row))
            finish = "stop" if n_out <= len(row) and row[n_out - 1] in params.stop_token_ids else "length"
            routed_i = None
            if experts is not None:
                # tokens fed to the model: the prompt and every output token but the last
                fed = experts[i, plen - len(p) : plen + n_out - 1]
                last = torch.full_like(fed[:1], -1)
                routed_i = torch.cat([fed, last]).to(torch.int16).numpy()
            samples.append(
                Sample(
                    prompt_ids=list(p),
                    output_ids=row[:n_out],
                    logprobs=lps[i, :n_out].numpy().astype(np.float32),
                    routed_experts=routed_i,
                    finish_reason=finish,
                    policy_version=self.version,
                )
            )
        return samples

    # ---- teacher scoring ----------------------------------------------------------------------

    def score(self, sequences: list[list[int]], temperature: float = 1.0, batch_size: int = 64) -> list[np.ndarray]:
        with self._serving.call():
            return self._score(sequences, temperature, batch_size)

    def score_topk(self, sequences: list[list[int]], k: int, batch_size: int = 64) -> list[dict]:
        if k < 1:
            raise ValueError(f"score_topk: k must be >= 1, got {k}")
        with self._serving.call():
            out = []
            for chunk, ids, logp in self._log_softmax(sequences, 1.0, batch_size):
                lp = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
                top_lp, top_ids = logp.topk(min(k, logp.shape[-1]), dim=-1)
                out.extend(
                    {
                        "logprobs": lp[i, : len(x) - 1].numpy().astype(np.float32),
                        "top_ids": top_ids[i, : len(x) - 1].numpy().astype(np.int32),
                        "top_logprobs": top_lp[i, : len(x) - 1].numpy().astype(np.float32),
                    }
                    for i, x in enumerate(chunk)
                )
            return out

    def _score(self, sequences: list[list[int]], temperature: float, batch_size: int) -> list[np.ndarray]:
        out = []
        for chunk, ids, logp in self._log_softmax(sequences, temperature, batch_size):
            lp = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
            out.extend(lp[i, : len(x) - 1].numpy().astype(np.float32) for i, x in enumerate(chunk))
        return out

    @torch.no_grad()
    def _log_softmax(self, sequences: list[list[int]], temperature: float, batch_size: int):
        """(chunk, ids [b, n], next-token log-softmax [b, n-1, V] in fp32) per right-padded batch of `sequences`."""
        for s in range(0, len(sequences), batch_size):
            chunk = sequences[s : s + batch_size]
            n = max(len(x) for x in chunk)
            ids = torch.full((len(chunk), n), self.pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, x in enumerate(chunk):  # right padding: position t is the same for every row
                ids[i, : len(x)] = torch.tensor(x)
                mask[i, : len(x)] = 1
            logits = self.model(input_ids=ids, attention_mask=mask).logits[:, :-1].float() / temperature
            yield chunk, ids, torch.log_softmax(logits, -1)

    # ---- weight sync --------------------------------------------------------------------------

    def update_weights(self, update) -> int:
        """Stage `update`'s buckets as they come (fused or per-expert names, cast to the engine's
        dtype), then switch to them between two calls."""
        from zeda_rl.weights import Staging

        with self._serving.updating():
            staged = Staging(self.model, update.version, cast=True)
            for bucket in update.buckets:
                staged.add(bucket)
            with self._serving.lock:
                self.version = staged.commit()
        return self.version


def _sample(
    logits: torch.Tensor, temperature: float, top_p: float, gen, top_k: int = -1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next token and its logprob under the temperature-scaled distribution (greedy at T=0).

    Truncation follows SGLang's sampler, which this engine is the reference for: the top-p
    nucleus is measured on the untruncated sorted probabilities, the top-k cut is applied to
    the same sorted order, and the token is drawn from what both keep. The logprob returned
    is that of the untruncated temperature-scaled distribution (as SGLang returns it), not
    of the renormalised truncated one: the learner's importance ratio compares it with its
    own untruncated log-softmax, so the two must be of the same distribution.
    """
    if temperature <= 0:
        tok = logits.argmax(-1)
        return tok, torch.log_softmax(logits, -1).gather(-1, tok[:, None]).squeeze(-1)
    logp = torch.log_softmax(logits / temperature, -1)
    probs = logp.exp()
    k_on = 0 < top_k < probs.shape[-1]
    if top_p < 1.0 or k_on:
        sorted_p, order = probs.sort(-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p if top_p < 1.0 else torch.ones_like(sorted_p, dtype=torch.bool)
        if k_on:
            keep[:, top_k:] = False  # the top token is always kept by both cuts
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p * keep)
    tok = torch.multinomial(probs, 1, generator=gen).squeeze(-1)
    return tok, logp.gather(-1, tok[:, None]).squeeze(-1)
