"""Student rollout engines as Ray actors.

Each actor owns one engine. Ray runs one method at a time per actor, so a weight
update queued behind a generation call is applied between generation batches: no
request in flight is ever aborted, and every sample carries the policy version it was
sampled with. Weight updates arrive as our own encoded frames (msgpack header + raw
buffers), never as pickled tensors.
"""

from __future__ import annotations

import dataclasses
import os
import time

import ray

from actors.engine import SamplingParams, make_engine


class EngineActor:
    """Shared body of rollout and teacher actors: one engine, plain-data methods."""

    def __init__(self, backend: str, checkpoint: str, threads: int = 1, engine_kwargs: dict | None = None):
        if backend == "torch":
            import torch

            torch.set_num_threads(threads)
        self.engine = make_engine(backend, checkpoint, **(engine_kwargs or {}))
        self.checkpoint = checkpoint
        self.started = time.time()
        self.tokens_out = 0

    def health(self) -> dict:
        return {"pid": os.getpid(), "version": self.engine.version, "uptime_s": time.time() - self.started, "tokens": self.tokens_out}

    def generate(self, prompts: list[list[int]], params: SamplingParams, sample_ids: list[int]) -> list[dict]:
        samples = self.engine.generate(prompts, params)
        out = []
        for sid, s in zip(sample_ids, samples):
            d = dataclasses.asdict(s)
            d["sample_id"] = sid
            out.append(d)
            self.tokens_out += len(s.output_ids)
        return out

    def update_weights(self, frames: list[bytes]) -> int:
        from zeda_rl.weights import decode_update

        return self.engine.update_weights(decode_update(frames))

    def version(self) -> int:
        return self.engine.version

    def score(self, seqs: list[list[int]], temperature: float = 1.0) -> list:
        """Prefill logprobs of given tokens under the weights this engine serves now."""
        return self.engine.score(seqs, temperature=temperature)


@ray.remote(max_restarts=3, max_task_retries=0)
class RolloutActor(EngineActor):
    """A student engine: samples responses with behaviour logprobs and routed experts.

    Until the learner's weights reach it, an engine serves the checkpoint it loaded, which
    after a restart is not the policy of any version: its samples carry version -1 so the
    learner never trains on them (the driver re-pushes the current weights on a failure).
    """

    synced = False

    def update_weights(self, frames: list[bytes]) -> int:
        version = super().update_weights(frames)
        self.synced = True
        return version

    def generate(self, prompts: list[list[int]], params: SamplingParams, sample_ids: list[int]) -> list[dict]:
        out = super().generate(prompts, params, sample_ids)
        if not self.synced:
            for d in out:
                d["policy_version"] = -1
        return out

