"""The teacher-scoring pool: Ray actors that score student samples and push them to the learner.

The teacher scores each sampled token with a prefill (no new tokens) at temperature 1
(`check_score_temperature`), tokens aligned one to one, then the trajectory goes straight to
the learner over ZMQ (msgpack header + raw frames): the driver never touches it. For SFT
the same engines answer prompts into rollout shards (`launch.rollouts`). The pool sends
each request to the least-loaded actor.
"""

from __future__ import annotations

import time

import ray

from actors.rollout import EngineActor
from zeda_rl.trajectory import pack_samples


def check_score_temperature(temperature: float) -> None:
    """The teacher scores at temperature 1 only: SGLang computes input-token logprobs at 1 whatever a request
    asks, so another value would mean one thing on GPU and another on CPU."""
    if temperature != 1.0:
        raise ValueError(
            f"teacher scoring temperature {temperature}: expected 1.0 (opd.teacher_temperature); SGLang "
            "computes input-token logprobs at temperature 1 whatever the request says"
        )


def teacher_engine_kwargs(backend: str, engine_kwargs: dict | None) -> dict:
    """A teacher's routing is never used (it is the static model, and the student routes over other experts), so an
    SGLang teacher does not capture it: for a 32k-token answer of a 48-layer top-8 model that is 75 MB of base64."""
    kw = dict(engine_kwargs or {})
    if backend == "sglang":
        kw.setdefault("return_routed_experts", False)
    return kw


@ray.remote(max_restarts=3, max_task_retries=0, concurrency_groups={"health": 1})
class TeacherActor(EngineActor):
    def __init__(
        self,
        backend: str,
        checkpoint: str,
        threads: int = 1,
        engine_kwargs: dict | None = None,
        *,
        learner_endpoint: str | None = None,
        pad_id: int = 0,
        run: str | None = None,
    ):
        super().__init__(backend, checkpoint, threads, teacher_engine_kwargs(backend, engine_kwargs))
        self.endpoint, self.run = learner_endpoint, run  # the inbox drops batches stamped with another run
        self.pad_id = pad_id
        self.pusher = None
        self.scored_tokens = 0

    def score_and_push(
        self, samples: list[dict], temperature: float = 1.0, push_timeout_s: float = 60.0, top_k: int = 0
    ) -> dict:
        """Teacher logprobs for every sampled token (and, with `top_k`, its top-k next tokens at every position,
        for opd.objective full_kl), then PUSH the packed batch to the learner."""
        from zeda_rl.transport import Pusher
        from zeda_rl.wire import TrajectoryBatch

        check_score_temperature(temperature)
        t0 = time.time()
        seqs = [list(s["prompt_ids"]) + list(s["output_ids"]) for s in samples]
        top = self.engine.score_topk(seqs, top_k) if top_k else None
        teacher = [t["logprobs"] for t in top] if top else self.engine.score(seqs, temperature=temperature)
        arrays = pack_samples(samples, teacher, pad_id=self.pad_id, teacher_top=top)
        if self.pusher is None:
            self.pusher = Pusher(self.endpoint)
        batch = TrajectoryBatch.from_arrays(
            arrays, meta={"temperature": temperature, **({"run": self.run} if self.run else {})}
        )
        sent = self.pusher.send(batch, timeout_s=push_timeout_s)
        n_tokens = sum(len(x) for x in seqs)
        self.scored_tokens += n_tokens
        out_tokens = sum(len(s["output_ids"]) for s in samples)
        return {
            "samples": len(samples),
            "tokens": n_tokens,
            "output_tokens": out_tokens,
            "seconds": time.time() - t0,
            "sent": bool(sent),
        }

    def answer_to_shard(self, items: list[dict], params, path: str) -> dict:
        """Rollouts job: answer `items` ({id, messages, prompt_ids}) and write them as one JSONL shard.

        The shard appears under its name only once complete (temporary name, fsync, rename), so
        a job killed mid-write leaves no partial shard. The answer text is decoded with special
        tokens kept (a thinking block stays visible) and without the end-of-turn token, which
        the chat template adds back when SFT renders the conversation.
        """
        import json
        import os
        from pathlib import Path

        samples = self.generate([it["prompt_ids"] for it in items], params, list(range(len(items))))
        tok = self._tokenizer()
        recorded = {k: v for k, v in params.recorded().items() if k != "stop_token_ids"}
        lines, tokens, truncated = [], 0, 0
        for it, s in zip(items, samples):
            out = list(s["output_ids"])
            if s["finish_reason"] == "stop":
                out = out[:-1]
            truncated += s["finish_reason"] != "stop"
            tokens += len(s["output_ids"])
            lines.append(
                json.dumps(
                    {
                        "id": it["id"],
                        "messages": [
                            *it["messages"],
                            {"role": "assistant", "content": tok.decode(out, skip_special_tokens=False)},
                        ],
                        "finish_reason": s["finish_reason"],
                        "prompt_tokens": len(it["prompt_ids"]),
                        "response_tokens": len(s["output_ids"]),
                        "sampling": recorded,
                    },
                    ensure_ascii=False,
                )
            )
        final = Path(path)
        tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
        with tmp.open("w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
            f.flush()
            os.fsync(f.fileno())
        tmp.rename(final)
        return {
            "records": len(lines),
            "tokens": tokens,
            "truncated": truncated,
            "shard": final.name,
            "pid": os.getpid(),
        }

    def _tokenizer(self):
        if getattr(self, "tokenizer", None) is None:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(self.checkpoint)
        return self.tokenizer


class TeacherPool:
    """Least-loaded dispatch over TeacherActors (driver side), around actors that are restarting.

    Ray restarts a teacher that dies, and reloading a large checkpoint takes minutes; with `max_task_retries=0`
    every call sent to it meanwhile fails at once (ActorUnavailableError), and least-loaded dispatch sends it the
    most, since it has nothing in flight. So a teacher whose call failed is left out until a health ping answers
    (pinged `retry_s` after each failed ping, twice as long after each, up to `max_retry_s`); with every teacher
    out, a submit waits up to `wait_s` for one to come back, then raises naming them."""

    def __init__(self, actors: list, retry_s: float = 0.5, max_retry_s: float = 10.0, wait_s: float = 1800.0):
        if not actors:
            raise ValueError("TeacherPool needs at least one teacher actor")
        self.actors = actors
        self.inflight = {i: set() for i in range(len(actors))}
        self.retry_s, self.max_retry_s, self.wait_s = retry_s, max_retry_s, wait_s
        self.down: dict[int, tuple] = {}  # actor -> (pending health ping or None, next ping at, wait after a failure)

    def _refresh(self) -> None:
        """Forget finished requests, mark actors whose request died with them, and bring back those that answer."""
        for i, refs in self.inflight.items():
            done, _ = ray.wait(list(refs), num_returns=len(refs), timeout=0) if refs else ([], [])
            refs.difference_update(done)
            if i not in self.down and any(_actor_failed(r, self.actors[i]) for r in done):
                self.down[i] = (None, 0.0, self.retry_s)
        now = time.monotonic()
        for i, (ping, at, wait) in list(self.down.items()):
            if ping is None:
                if now >= at:
                    self.down[i] = (self.actors[i].health.remote(), at, wait)
                continue
            if not ray.wait([ping], timeout=0)[0]:
                continue
            if _actor_failed(ping, self.actors[i]):
                self.down[i] = (None, now + wait, min(2 * wait, self.max_retry_s))
            else:
                del self.down[i]

    def _least_loaded(self) -> int:
        deadline = time.monotonic() + self.wait_s
        while True:
            self._refresh()
            up = [i for i in self.inflight if i not in self.down]
            if up:
                return min(up, key=lambda i: len(self.inflight[i]))
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"no teacher engine answered for {self.wait_s:.0f} s: all {len(self.actors)} are dead or "
                    "restarting (see the actors' logs)"
                )
            time.sleep(0.2)

    def available(self) -> bool:
        """Whether some teacher is up now (the OPD loop admits no call otherwise, and goes on collecting)."""
        self._refresh()
        return len(self.down) < len(self.actors)

    def submit(self, method: str, *args, **kwargs):
        i = self._least_loaded()
        ref = getattr(self.actors[i], method).remote(*args, **kwargs)
        self.inflight[i].add(ref)
        return ref

    def holder(self, ref):
        """The actor a call went to (None once the call is forgotten)."""
        return next((self.actors[i] for i, refs in self.inflight.items() if ref in refs), None)

    def load(self) -> list[int]:
        self._refresh()
        return [len(v) for v in self.inflight.values()]


def _actor_failed(ref, actor) -> bool:
    """Whether a finished call failed because `actor` died or is restarting: not an error the call raised, nor the
    death of another actor whose result it took as an argument (a rollout engine's, for `score_and_push`)."""
    try:
        ray.get(ref, timeout=0)
    except ray.exceptions.RayActorError as err:
        return err.actor_id is None or err.actor_id == actor._actor_id.hex()
    except Exception:  # noqa: BLE001 - the call's own error: its caller sees it; the actor is fine
        return False
    return False
