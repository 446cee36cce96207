"""The engine interface shared by the `torch` (CPU) and `sglang` (GPU) backends.

Rollout actors and the teacher pool talk only to this interface, so a backend is a
config switch. Everything crossing it is plain Python / numpy, ready for Ray.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # keep the k most likely tokens; -1 or 0 = off
    max_new_tokens: int = 32
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None

    def __post_init__(self):
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise ValueError(f"SamplingParams.top_k must be -1 or 0 (off) or a positive count, got {self.top_k!r}")


@dataclass
class Sample:
    """One generated response. Arrays are per output token unless said otherwise."""

    prompt_ids: list[int]
    output_ids: list[int]
    logprobs: np.ndarray  # float32 [O]: log p(output token) at the sampling temperature
    routed_experts: np.ndarray | None  # int16 [L_moe, P+O, K]; -1 where not recorded (the last token)
    finish_reason: str  # "stop" | "length"
    policy_version: int = 0
    extra: dict = field(default_factory=dict)


class Engine(Protocol):
    version: int

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Sample]:
        """Sample one response per prompt, with behaviour logprobs and routed experts."""

    def score(self, sequences: list[list[int]], temperature: float = 1.0) -> list[np.ndarray]:
        """Prefill only: log p(seq[t] | seq[:t]) for t >= 1 (float32 [len-1]) at `temperature`."""

    def update_weights(self, update) -> int:
        """Apply a versioned `zeda_rl.weights.WeightUpdate`; returns the version now served."""


def make_engine(backend: str, checkpoint: str, **kwargs) -> Engine:
    if backend == "torch":
        from actors.torch_engine import TorchEngine

        return TorchEngine(checkpoint, **kwargs)
    if backend == "sglang":
        from actors.sglang_engine import SGLangEngine

        return SGLangEngine(checkpoint, **kwargs)
    raise ValueError(f"engine backend {backend!r} unknown; expected 'torch' or 'sglang'")
