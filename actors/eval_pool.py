"""Benchmark generation over N engine actors, each taking a share of the requests.

`zeda_rl.suites` asks for samples through one callable; this is it. Requests are cut into
chunks of `batch_size` and handed to whichever actor is free next, so a slow chunk (long
answers) does not hold the others back; results come back in request order. `engines=0`
runs one engine in this process instead (torch only: SGLang's scheduler SIGKILLs the
process that created its Engine when it dies, so it always gets an actor of its own).
The actors send each sample's per-layer zero share, not its expert ids (`EngineActor.generate`).
"""

from __future__ import annotations

import dataclasses

from actors.engine import make_engine
from actors.rollout import EngineActor
from zeda_rl.sampling import Sample, SamplingParams

ROUTING = "zero_shares"  # what an actor sends of a sample's routing: an evaluation needs no more


class EvalEngines:
    def __init__(
        self,
        backend: str,
        checkpoint: str,
        engines: int = 1,
        batch_size: int = 32,
        threads: int = 1,
        engine_kwargs: dict | None = None,
    ):
        if engines < 0:
            raise ValueError(f"engines must be >= 0, got {engines}")
        if engines == 0 and backend != "torch":
            raise ValueError(f"engines=0 (in process) is for the torch backend only, not {backend!r}")
        self.batch_size, self.owned = int(batch_size), True
        self.local = make_engine(backend, str(checkpoint), **(engine_kwargs or {})) if engines == 0 else None
        self.actors = []
        if engines:
            import ray

            opts = {"num_cpus": threads, "num_gpus": 0} if backend == "torch" else {"num_cpus": 1, "num_gpus": 1}
            cls = ray.remote(max_restarts=0, concurrency_groups={"health": 1})(EngineActor).options(**opts)
            self.actors = [cls.remote(backend, str(checkpoint), threads, engine_kwargs) for _ in range(engines)]

    @classmethod
    def over(cls, actors: list, batch_size: int = 32) -> "EvalEngines":
        """Generation over engine actors that already exist (a run's own): used, never killed."""
        pool = cls.__new__(cls)
        pool.batch_size, pool.local, pool.actors, pool.owned = int(batch_size), None, list(actors), False
        return pool

    def __call__(self, prompts: list[list[int]], params: SamplingParams) -> list[Sample]:
        seed = params.seed
        chunks = [
            (
                start,
                prompts[start : start + self.batch_size],
                params.model_copy(update={"seed": None if seed is None else seed + start}),
            )  # distinct draws per chunk
            for start in range(0, len(prompts), self.batch_size)
        ]
        if self.local is not None:
            return [s for _, ps, p in chunks for s in self.local.generate(ps, p)]
        import ray

        out: dict[int, list[Sample]] = {}
        pending, free, queue, lost = {}, list(self.actors), list(chunks), []
        while queue or pending:
            while queue and free:
                chunk = queue.pop(0)
                start, ps, p = chunk
                actor = free.pop(0)
                pending[actor.generate.remote(ps, p, list(range(start, start + len(ps))), routing=ROUTING)] = (
                    chunk,
                    actor,
                )
            if not pending:
                raise RuntimeError(
                    f"evaluation: no engine left of {len(self.actors)} ({'; '.join(lost)}); "
                    f"{len(queue)} chunks of requests unanswered"
                )
            done, _ = ray.wait(list(pending), num_returns=1)
            chunk, actor = pending.pop(done[0])
            try:
                got = ray.get(done[0])
            except ray.exceptions.RayActorError as err:
                got, why = None, f"died: {str(err)[:120]}"
            else:
                why = "restarted: serves the checkpoint it loaded, not the weights under evaluation"
            if got is None or any(d.get("policy_version") == -1 for d in got):
                queue.append(chunk)  # answered again by another engine; this one takes no more requests
                lost.append(f"engine {self.actors.index(actor)} {why}")
                continue
            out[chunk[0]] = [_sample(d) for d in got]
            free.append(actor)
        return [s for start in sorted(out) for s in out[start]]

    def close(self) -> None:
        if not self.actors or not self.owned:
            return
        import ray

        for a in self.actors:
            ray.kill(a)
        self.actors = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def _sample(d: dict) -> Sample:
    names = {f.name for f in dataclasses.fields(Sample)}
    return Sample(**{k: v for k, v in d.items() if k in names})
