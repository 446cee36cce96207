"""The engine interface shared by the `torch` (CPU) and `sglang` (GPU) backends.

Rollout actors and the teacher pool talk only to this interface, so a backend is a
config switch. Everything crossing it is plain Python / numpy, ready for Ray.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from zeda_rl.sampling import Sample, SamplingParams  # noqa: F401  (the interface's types, re-exported)


class Engine(Protocol):
    version: int

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Sample]:
        """Sample one response per prompt, with behaviour logprobs and routed experts."""

    def score(self, sequences: list[list[int]], temperature: float = 1.0) -> list[np.ndarray]:
        """Prefill only: log p(seq[t] | seq[:t]) for t >= 1 (float32 [len-1]) at `temperature`."""

    def score_topk(self, sequences: list[list[int]], k: int) -> list[dict]:
        """Prefill only, at temperature 1: per sequence {"logprobs" [len-1], "top_ids" int32 [len-1, k],
        "top_logprobs" float32 [len-1, k]}: the k most likely next tokens at every position (the whole
        vocabulary when k >= its size), what `opd.objective: full_kl` distils towards."""

    def update_weights(self, update) -> int:
        """Apply a versioned `zeda_rl.weights.WeightUpdate` (its buckets may be a one-pass iterable,
        fetched as they are applied); returns the version now served. Safe to call while another
        thread generates: a generate call sees one complete version."""


def make_engine(backend: str, checkpoint: str, **kwargs) -> Engine:
    if backend == "torch":
        from actors.torch_engine import TorchEngine

        return TorchEngine(checkpoint, **kwargs)
    if backend == "sglang":
        from actors.sglang_engine import SGLangEngine

        return SGLangEngine(checkpoint, **kwargs)
    raise ValueError(f"engine backend {backend!r} unknown; expected 'torch' or 'sglang'")
