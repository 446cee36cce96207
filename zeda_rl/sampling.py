"""What an engine is asked for and what it returns: `SamplingParams` and `Sample`.

They live in the library, not beside the engines, because the run config, the benchmark suites and the
engines all speak them: `launch.config`'s `sampling:` section is a SamplingParams, `zeda_rl.suites` builds
one per benchmark, and `actors.engine`'s backends take one and return Samples.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
    routed_experts: np.ndarray | None  # int16 [P+O, L_moe, K]; -1 where not recorded (the last token)
    finish_reason: str  # "stop" | "length"
    policy_version: int = 0
    extra: dict = field(default_factory=dict)
