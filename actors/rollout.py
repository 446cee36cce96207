"""Student rollout engines as Ray actors.

Each actor owns one engine. Generation calls run one at a time; weight updates run in a
concurrency group of their own, so an update is received (staged) while the engine
generates and switched in by the engine between two generation calls: no request in
flight is ever aborted, a call sees one complete version, and every sample carries the
policy version it was sampled with.

An update arrives as the version and the references of its buckets in Ray's object store
(put there by the learner ranks, `learner.publish`): the actor fetches one bucket at a time
as the engine takes it, so the driver never touches a tensor. The references stay alive
while this call runs (Ray pins a pending task's arguments) and are released when it ends.
The broadcast path (SGLang only) joins the learner ranks' groups once, then receives each
version's buckets as the ranks send them.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time

import ray

from actors.engine import make_engine
from zeda_rl.sampling import SamplingParams


class VersionWaitTimeout(TimeoutError):
    """A rollout call waited for a version that never switched in: its engine is owed the weights."""


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

    @ray.method(concurrency_group="health")  # answered while a long generation runs (`launch.health`)
    def health(self) -> dict:
        return {
            "pid": os.getpid(),
            "version": self.engine.version,
            "uptime_s": time.time() - self.started,
            "tokens": self.tokens_out,
        }

    def generate(
        self, prompts: list[list[int]], params: SamplingParams, sample_ids: list[int], routing: str = "full"
    ) -> list[dict]:
        """Sample `prompts`. `routing="zero_shares"` (the evaluation's) sends each sample's per-layer zero-slot
        share (`extra["zero_shares"]`) instead of its expert ids: an evaluation needs no more, and the ids of a
        32k-token answer are 24 MB at 48 layers x top-8 (AIME's 16 samples of 30 problems: about 12 GB on the driver)."""
        if routing not in ("full", "zero_shares"):
            raise ValueError(f"routing {routing!r} unknown; expected 'full' or 'zero_shares'")
        samples = self.engine.generate(prompts, params)
        if routing == "zero_shares":
            from zeda_rl.evaluate import moe_shape, reduce_routing

            if not hasattr(self, "moe_shape"):  # weight updates keep the architecture it loaded
                self.moe_shape = moe_shape(self.checkpoint)
            samples = [reduce_routing(s, *self.moe_shape) for s in samples]
        out = []
        for sid, s in zip(sample_ids, samples):
            d = dataclasses.asdict(s)
            d["sample_id"] = sid
            out.append(d)
            self.tokens_out += len(s.output_ids)
        return out

    def version(self) -> int:
        return self.engine.version

    def score(self, seqs: list[list[int]], temperature: float = 1.0) -> list:
        """Prefill logprobs of given tokens under the weights this engine serves now."""
        return self.engine.score(seqs, temperature=temperature)


@ray.remote(max_restarts=3, max_task_retries=0, concurrency_groups={"weights": 1, "health": 1})
class RolloutActor(EngineActor):
    """A student engine: samples responses with behaviour logprobs and routed experts.

    Until the learner's weights reach it, an engine serves the checkpoint it loaded, which
    after a restart is not the policy of any version: its samples carry version -1 so the
    learner never trains on them (the driver re-pushes the current weights on a failure).
    """

    synced = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.served = threading.Condition()  # notified on every weight switch

    def serving(self) -> tuple[int, bool]:
        """(version served, whether the learner's weights reached this engine since it (re)started)."""
        return self.engine.version, self.synced

    def _switched(self) -> None:
        self.synced = True
        with self.served:
            self.served.notify_all()

    @ray.method(concurrency_group="weights")
    def update_weights(self, version: int, refs: list) -> int:
        """Serve weights v`version`, its buckets fetched one at a time from their references."""
        from zeda_rl.weights import WeightUpdate, unpack_bucket

        buckets = (unpack_bucket(ray.get(r), version) for r in refs)
        version = self.engine.update_weights(WeightUpdate(version, buckets))
        self._switched()
        return version

    def weight_sync_ranks(self) -> int:
        return getattr(self.engine, "weight_sync_ranks", 1)

    @ray.method(concurrency_group="weights")
    def init_weight_groups(self, groups: list[dict], rank_offset: int, world_size: int) -> None:
        """Join every publishing learner rank's broadcast group, in the given order (the same on every engine)."""
        for g in groups:
            self.engine.init_distributed_weight_sync(
                g["address"], g["port"], rank_offset, world_size, g["group"], g["backend"]
            )

    @ray.method(concurrency_group="weights")
    def hold_for_update(self) -> bool:
        """Broadcast pushes, first phase: stop serving (the running call ends first) until the update comes."""
        self.engine.hold_for_update()
        return True

    @ray.method(concurrency_group="weights")
    def release_hold(self) -> None:
        self.engine.release_hold()

    @ray.method(concurrency_group="weights")
    def update_weights_from_distributed(self, version: int, buckets: list) -> int:
        version = self.engine.update_weights_from_distributed(version, buckets)
        self._switched()
        return version

    def generate(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        sample_ids: list[int],
        min_version: int | None = None,
        wait_s: float = 600.0,
        routing: str = "full",
    ) -> list[dict]:
        """Sample `prompts`; with `min_version`, first wait until that version is served.

        Updates run in a concurrency group of their own, so a call submitted after a push may
        reach the engine before the push has switched in; the driver names the version it pushed
        last, and waiting for it here is what bounds a sample's staleness. An engine that has not
        been given the learner's weights since it (re)started does not wait: its samples carry
        version -1 and are never trained.
        """
        if min_version is not None and self.synced:
            with self.served:
                if not self.served.wait_for(lambda: self.engine.version >= min_version, timeout=wait_s):
                    raise VersionWaitTimeout(
                        f"rollout engine still serves v{self.engine.version} after {wait_s:.0f} s; "
                        f"the call needs v{min_version} (a weight push that never switched in)"
                    )
        out = super().generate(prompts, params, sample_ids, routing)
        if not self.synced:
            for d in out:
                d["policy_version"] = -1
        return out
