"""The engine interface shared by the `torch` (CPU) and `sglang` (GPU) backends.

Rollout actors and the teacher pool talk only to this interface, so a backend is a
config switch. Everything crossing it is plain Python / numpy, ready for Ray.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field


class SamplingParams(BaseModel):
    """How an engine samples: the run config's `sampling:` section, what the engines take, and the
    temperature the teacher and the learner score at. Stop ids and the seed are per call, set on a
    copy: `params.model_copy(update={"seed": ...})`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    temperature: float = Field(1.0, ge=0, description="0: greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(-1, ge=-1, description="keep the k most likely tokens; -1 or 0: off")
    max_new_tokens: int = Field(16, ge=1)
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None

    def recorded(self) -> dict:
        """What a rollout record keeps: every setting but the per-call seed (top_k only when on)."""
        return self.model_dump(mode="json", exclude={"seed"} | ({"top_k"} if self.top_k in (-1, 0) else set()))


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

    def score_topk(self, sequences: list[list[int]], k: int) -> list[dict]:
        """Prefill only, at temperature 1: per sequence {"logprobs" [len-1], "top_ids" int32 [len-1, k],
        "top_logprobs" float32 [len-1, k]}: the k most likely next tokens at every position (the whole
        vocabulary when k >= its size), what `opd.objective: full_kl` distils towards."""

    def update_weights(self, update) -> int:
        """Apply a versioned `zeda_rl.weights.WeightUpdate` (its buckets may be a one-pass iterable,
        fetched as they are applied); returns the version now served. Safe to call while another
        thread generates: a generate call sees one complete version."""


class Serving:
    """Generation calls vs weight switches in one engine, when updates run in a thread of their own.

    A call holds `lock` from start to end, and a switch takes it, so a call sees one version.
    While an update is under way, calls that have not started yet wait for it: a call made after
    an update sees it (as when calls and updates ran one at a time), while the call already
    running overlaps the update's transfer.
    """

    def __init__(self):
        self.lock = threading.Lock()
        self._open = threading.Event()
        self._open.set()

    @contextmanager
    def call(self):
        self._open.wait()
        with self.lock:
            yield

    @contextmanager
    def updating(self):
        self._open.clear()
        try:
            yield
        finally:
            self._open.set()


def make_engine(backend: str, checkpoint: str, **kwargs) -> Engine:
    if backend == "torch":
        from actors.torch_engine import TorchEngine

        return TorchEngine(checkpoint, **kwargs)
    if backend == "sglang":
        from actors.sglang_engine import SGLangEngine

        return SGLangEngine(checkpoint, **kwargs)
    raise ValueError(f"engine backend {backend!r} unknown; expected 'torch' or 'sglang'")
