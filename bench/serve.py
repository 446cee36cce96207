"""Serving under concurrent load: the teacher and ZEDA each behind an engine actor, tokens/s and request latency.

`bench/decode.py` times one batch at a time, so it says how fast a model decodes, not what a user
of a served model sees: requests arrive on their own, wait for the engine, and are answered
together with whoever else was waiting. This bench puts each model in an engine actor (the
project's `actors.rollout.EngineActor`, the body of the rollout and teacher actors: `torch`
backend on CPU, `--backend sglang` on a GPU) and drives it with a closed-loop client: N
requests, C of them in flight at any time, a new one sent as soon as one is answered. Per model
it reports requests, output tokens, wall seconds, output tokens/s, requests/s, the p50 and p99
of request latency (client send to answer received, queueing included), the mean batch the
engine ran and the mean wait in its queue, and (torch) output tokens per CPU second of the
engine's process, steadier than wall time on a shared machine; then ZEDA's tokens/s and p50 /
p99 latency over the teacher's.

Batching: a plain engine actor runs one generate call at a time, so C concurrent requests would
be served one by one and concurrency would mean nothing. Here the actor holds a small dynamic
batcher (`Batcher`): requests that arrive are queued, and a serving thread takes everything
waiting (up to `--max-batch`, first come first served) into one `engine.generate` call. After
the first waiting request it holds the batch open `--batch-wait-ms` for the others the client
is sending at that moment. This approximates what a continuous-batching server (SGLang, vLLM)
does, from below: such a server adds arrivals to the running batch at every decode step, while
here a request that arrives during a generate call waits for that call to end (with SGLang
itself underneath, its scheduler batches within each call). Time to first token is not
reported: the engines return whole responses, not a stream.

Requests: the embedded held-out task prompts (`zeda_rl.data.embedded_records`, of the teacher's
task suite: its teacher.json, or `--tasks`) rendered by `zeda_rl.chat.ChatFormat.prompt_ids`,
exactly as the pipeline feeds them to its engines, shuffled with a fixed seed and cycled to N;
every model gets the same N requests in the same order. Generation is greedy to exactly
`--max-new-tokens` tokens (no stop token), so every model produces the same number of tokens and
the ratios compare speed, not answer lengths; `--stop` stops at the model's stop ids instead.

Same machine, same settings, one run: with the torch backend every model's actor is up for
the whole run and the load runs in `--rounds` rounds, each model once per round, the order
reversed every round (teacher, zeda, zeda, teacher, ...) so machine noise hits them alike; every
actor first serves one untimed warm-up batch. The torch models all run one experts
implementation (`--experts`, default `zeda_skip` as in bench/decode.py: the ratios compare
routing, not kernels). With sglang one engine holds the GPU at a time, so the models run back to
back in one round (an actor per model, given back before the next starts).

    python bench/serve.py [--baselines runs/tiny-cpu-baselines | --teacher DIR --student DIR]
                          [--requests 256] [--concurrency 8] [--max-batch C] [--max-new-tokens 32]
                          [--rounds 4] [--threads 1] [--backend torch|sglang] [--json OUT]

Models are found as bench/decode.py finds them (`--baselines`: a `zeda baselines` output
directory; or --teacher / --student / --net). `--models teacher zeda net` adds NET. The
default run takes about a minute on a 2-core CPU, Ray's start and model loading included.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import threading
import time
from collections import deque
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/serve.py`: bench.decode is imported from the repository
    sys.path.insert(0, str(ROOT))


# ---- the pure parts: statistics and the batcher ---------------------------------------------------


def percentile(values, q: float) -> float:
    """The q-th percentile (0..100) of `values`, linearly interpolated between order statistics
    (numpy's default method): [1, 2, 3, 4] has p50 2.5."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} outside 0..100")
    xs = sorted(float(v) for v in values)
    if not xs:
        raise ValueError("percentile of no values")
    rank = q / 100 * (len(xs) - 1)
    lo = math.floor(rank)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (rank - lo)


def summarize(
    latencies: list[float],
    tokens: int,
    wall_s: float,
    batches: list[int],
    queued: list[float] = (),
    cpu_s: float | None = None,
) -> dict:
    """One model's numbers: `latencies` (s, one per request), the output tokens of all of them, the
    wall seconds the load took, the batch each request was served in, how long it waited in the
    engine's queue before its generate call started (s), and the engine process's CPU seconds over
    the load (torch backend; None where they say nothing, as with SGLang's scheduler processes)."""
    if not latencies or wall_s <= 0:
        raise ValueError("summarize: needs at least one request and a positive wall time")
    if len(batches) != len(latencies) or (queued and len(queued) != len(latencies)):
        raise ValueError("summarize: one batch size and one queue wait per request")
    return {
        "requests": len(latencies),
        "output_tokens": int(tokens),
        "wall_s": wall_s,
        "tok_s": tokens / wall_s,
        "req_s": len(latencies) / wall_s,
        "p50_s": percentile(latencies, 50),
        "p99_s": percentile(latencies, 99),
        "mean_s": sum(latencies) / len(latencies),
        "mean_batch": sum(batches) / len(batches) if batches else float("nan"),
        "mean_queue_s": sum(queued) / len(queued) if queued else float("nan"),
        "cpu_s": cpu_s,
        "tok_per_cpu_s": tokens / cpu_s if cpu_s else None,
    }


def ratios(summaries: dict[str, dict], base: str = "teacher") -> dict[str, dict]:
    """Every other model's tokens/s, tokens per CPU second (when measured) and p50 / p99 latency over
    `base`'s (tokens > 1: more throughput; latency < 1: answered sooner)."""
    b = summaries[base]
    return {
        name: {
            "tok_s_x": s["tok_s"] / b["tok_s"],
            "tok_per_cpu_s_x": s["tok_per_cpu_s"] / b["tok_per_cpu_s"]
            if s.get("tok_per_cpu_s") and b.get("tok_per_cpu_s")
            else None,
            "p50_x": s["p50_s"] / b["p50_s"],
            "p99_x": s["p99_s"] / b["p99_s"],
        }
        for name, s in summaries.items()
        if name != base
    }


def schedule(models: list[str], rounds: int) -> list[tuple[int, str]]:
    """(round, model) in run order: the models in order, reversed every other round (ABBA...)."""
    return [(r, m) for r in range(rounds) for m in (models if r % 2 == 0 else models[::-1])]


def split_rounds(n: int, rounds: int) -> list[int]:
    """`n` requests over `rounds` rounds, the remainder to the first ones: 10 over 3 -> [4, 3, 3]."""
    return [n // rounds + (1 if r < n % rounds else 0) for r in range(rounds)]


class Pending:
    """One queued request: its prompt and sampling params; the serving thread resolves it."""

    def __init__(self, prompt: list[int], params, submitted: float):
        self.prompt, self.params, self.submitted = prompt, params, submitted
        self._done = threading.Event()
        self.result = self.error = None

    def resolve(self, result=None, error: BaseException | None = None) -> None:
        self.result, self.error = result, error
        self._done.set()

    def wait(self, timeout: float | None = None):
        if not self._done.wait(timeout):
            raise TimeoutError(f"request not served within {timeout} s")
        if self.error is not None:
            raise self.error
        return self.result


class Batcher:
    """Requests waiting for one engine, handed out as batches for one generate call each.

    `take` blocks until a request waits, then holds the batch open up to `max_wait_s` (or until
    `max_batch` wait) so requests sent at the same moment are served together; a batch is the
    oldest waiting request and the next ones with the same sampling params (an engine call takes
    one SamplingParams), at most `max_batch`, in arrival order. Requests with other params keep
    their place for a later batch.
    """

    def __init__(self, max_batch: int, max_wait_s: float = 0.0, clock=time.perf_counter):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s}")
        self.max_batch, self.max_wait_s, self.clock = max_batch, max_wait_s, clock
        self._waiting: deque[Pending] = deque()
        self._cond = threading.Condition()
        self.closed = False

    def submit(self, prompt: list[int], params) -> Pending:
        p = Pending(prompt, params, self.clock())
        with self._cond:
            if self.closed:
                raise RuntimeError("the batcher is closed")
            self._waiting.append(p)
            self._cond.notify_all()
        return p

    def waiting(self) -> int:
        with self._cond:
            return len(self._waiting)

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()

    def take(self, timeout: float | None = None) -> list[Pending]:
        """The next batch; [] once closed with nothing waiting, or after `timeout` s with nothing."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._waiting or self.closed, timeout):
                return []
            if self.max_wait_s > 0 and not self.closed:
                end = self.clock() + self.max_wait_s
                while self._matching() < self.max_batch and not self.closed:
                    left = end - self.clock()
                    if left <= 0:
                        break
                    self._cond.wait(left)
            return self._pop_batch()

    def _matching(self) -> int:
        if not self._waiting:
            return 0
        first = self._waiting[0].params
        return sum(1 for p in self._waiting if p.params == first)

    def _pop_batch(self) -> list[Pending]:
        if not self._waiting:
            return []
        first = self._waiting[0].params
        batch, others = [], deque()
        while self._waiting and len(batch) < self.max_batch:
            p = self._waiting.popleft()
            (batch if p.params == first else others).append(p)
        self._waiting.extendleft(reversed(others))
        return batch


# ---- the engine actor and the client --------------------------------------------------------------


def _serving_actor_class():
    """The Ray actor class (built on first use, so the pure parts import without Ray)."""
    import ray

    from actors.rollout import EngineActor

    @ray.remote(max_restarts=0, concurrency_groups={"health": 1})
    class BatchingEngineActor(EngineActor):
        """An engine actor whose requests a serving thread batches into generate calls (`Batcher`).
        Run it with max_concurrency above the client's concurrency: every request call waits in a
        thread of its own while the serving thread runs the engine."""

        def __init__(self, backend, checkpoint, threads, engine_kwargs, max_batch, max_wait_s, experts=None):
            super().__init__(backend, checkpoint, threads, engine_kwargs)
            self.threads = threads if backend == "torch" else None
            if backend == "torch" and experts:
                self.engine.model.set_experts_implementation(experts)
            self.batcher = Batcher(max_batch, max_wait_s)
            threading.Thread(target=self._serve, daemon=True, name="serve").start()

        def _serve(self) -> None:
            if self.threads:
                import torch

                torch.set_num_threads(self.threads)
            while True:
                batch = self.batcher.take()
                if not batch:
                    return
                t0 = time.perf_counter()
                try:
                    samples = self.engine.generate([p.prompt for p in batch], batch[0].params)
                except Exception as err:  # noqa: BLE001 - every request of the batch gets the engine's error
                    for p in batch:
                        p.resolve(error=err)
                    continue
                for p, s in zip(batch, samples):
                    self.tokens_out += len(s.output_ids)
                    p.resolve({"tokens": len(s.output_ids), "batch": len(batch), "queue_s": t0 - p.submitted})

        def cpu_s(self) -> float:
            """CPU seconds of this process so far (every thread: the engine's, Ray's, the requests')."""
            return time.process_time()

        def request(self, prompt: list[int], params) -> dict:
            return self.batcher.submit(prompt, params).wait()

    return BatchingEngineActor


def run_load(actor, prompts: list[list[int]], params, concurrency: int, progress=None, note: str = "") -> dict:
    """Closed loop: `concurrency` requests in flight until every prompt is answered. Returns the
    latencies (client send to answer seen), output tokens, batch sizes, queue waits and wall seconds."""
    import ray

    todo = iter(prompts)
    pending: dict = {}  # ref -> send time
    latencies, batches, queued, tokens = [], [], [], 0

    def send() -> None:
        p = next(todo, None)
        if p is not None:
            pending[actor.request.remote(p, params)] = time.perf_counter()

    t0 = time.perf_counter()
    for _ in range(min(concurrency, len(prompts))):
        send()
    while pending:
        first, _ = ray.wait(list(pending), num_returns=1)
        rest = [r for r in pending if r not in first]
        more, _ = ray.wait(rest, num_returns=len(rest), timeout=0) if rest else ([], [])
        now = time.perf_counter()
        done = first + more
        for ref, res in zip(done, ray.get(done)):
            latencies.append(now - pending.pop(ref))
            batches.append(res["batch"])
            queued.append(res["queue_s"])
            tokens += res["tokens"]
        for _ in done:
            send()
        if progress is not None:
            progress.advance(len(done), note=note)
    wall = time.perf_counter() - t0
    return {"latencies": latencies, "batches": batches, "queued": queued, "tokens": tokens, "wall_s": wall}


# ---- requests, models, arguments ------------------------------------------------------------------


def request_prompts(teacher: Path, suite: str, n: int, seed: int = 0) -> list[list[int]]:
    """`n` prompts: the suite's held-out task prompts through the chat format, shuffled, cycled."""
    from transformers import AutoTokenizer

    from zeda_rl.chat import ChatFormat
    from zeda_rl.data import embedded_records
    from zeda_rl.tasks import families

    fmt = ChatFormat(AutoTokenizer.from_pretrained(teacher))
    per_family = max(1, min(64, math.ceil(n / len(families(suite)))))
    ids = [fmt.prompt_ids(r) for r in embedded_records("heldout", per_family, seed, suite)]
    random.Random(seed).shuffle(ids)
    return [ids[i % len(ids)] for i in range(n)]


def _suite(teacher: Path, tasks: str | None) -> str:
    if tasks:
        return tasks
    meta = teacher / "teacher.json"  # the embedded teacher records the suite it learned
    if meta.is_file():
        return json.loads(meta.read_text()).get("suite", "basic")
    return "basic"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baselines", default="runs/tiny-cpu-baselines", help="a `zeda baselines` output directory")
    ap.add_argument("--teacher", help="teacher checkpoint (with --student, instead of --baselines)")
    ap.add_argument("--student", help="ZEDA checkpoint")
    ap.add_argument("--net", help="NET checkpoint (for --models ... net)")
    ap.add_argument("--models", nargs="+", default=["teacher", "zeda"], choices=["teacher", "zeda", "net"])
    ap.add_argument("--requests", type=int, default=256, help="requests per model (N)")
    ap.add_argument("--concurrency", type=int, default=8, help="requests in flight (C, closed loop)")
    ap.add_argument("--max-batch", type=int, default=None, help="most requests per generate call (default: C)")
    ap.add_argument("--batch-wait-ms", type=float, default=20.0, help="how long a batch stays open for arrivals")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--stop", action="store_true", help="stop at the model's stop ids (default: fixed length)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default: 4 torch, 1 sglang)")
    ap.add_argument("--backend", default="torch", choices=["torch", "sglang"])
    ap.add_argument("--threads", type=int, default=1, help="torch threads per engine")
    ap.add_argument(
        "--experts",
        default="zeda_skip",
        choices=["zeda_skip", "grouped_mm", "eager"],
        help="experts implementation of every torch model (as bench/decode.py)",
    )
    ap.add_argument("--tasks", help="task suite of the prompts (default: the teacher's, from its teacher.json)")
    ap.add_argument("--engine-kwargs", default="{}", help="JSON object of backend arguments (sglang: mem_fraction)")
    ap.add_argument("--json", metavar="OUT", help="also write the settings and numbers to this JSON file")
    a = ap.parse_args(argv)
    if a.max_batch is None:
        a.max_batch = a.concurrency
    if a.rounds is None:
        a.rounds = 1 if a.backend == "sglang" else 4
    for flag in ("requests", "concurrency", "max_batch", "max_new_tokens", "rounds", "threads"):
        if getattr(a, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(a, flag)}")
    if a.batch_wait_ms < 0:
        ap.error(f"--batch-wait-ms must be >= 0, got {a.batch_wait_ms}")
    if "teacher" not in a.models:
        ap.error("--models must include teacher: every ratio is over the teacher's numbers")
    if len(set(a.models)) != len(a.models):
        ap.error(f"--models names a model twice: {a.models}")
    if a.backend == "sglang" and a.rounds != 1:
        ap.error("--rounds needs every engine up at once; with --backend sglang one engine holds the GPU: --rounds 1")
    if a.rounds > a.requests:
        ap.error(f"--rounds {a.rounds} is more than --requests {a.requests}: a round would have no request")
    per_round = a.requests // a.rounds
    if a.concurrency > per_round:
        ap.error(
            f"--concurrency {a.concurrency} exceeds the {per_round} requests of a round (--requests {a.requests} / "
            f"--rounds {a.rounds}): the load would never reach it"
        )
    try:
        a.engine_kwargs = json.loads(a.engine_kwargs)
    except ValueError as err:
        ap.error(f"--engine-kwargs is not JSON: {err}")
    if not isinstance(a.engine_kwargs, dict):
        ap.error("--engine-kwargs must be a JSON object")
    if a.teacher or a.student:
        if not (a.teacher and a.student):
            ap.error("--teacher and --student go together")
        a.baselines = None
    elif not (Path(a.baselines) / "baselines.json").is_file():
        ap.error(
            f"--baselines {a.baselines}: no baselines.json there (run `zeda baselines --config ...` first, or name "
            "--teacher and --student)"
        )
    if "net" in a.models and not (a.net or a.baselines):
        ap.error("--models net needs --net (or --baselines)")
    return a


def _print(summaries: dict, rel: dict, a) -> None:
    length = "up to" if a.stop else "exactly"
    print(
        f"\n{a.requests} requests per model, concurrency {a.concurrency}, max batch {a.max_batch} "
        f"(batch wait {a.batch_wait_ms:g} ms), {length} {a.max_new_tokens} new tokens, greedy, {a.backend} backend"
        + (f", {a.threads} thread(s) per engine, experts {a.experts}" if a.backend == "torch" else "")
        + (f", {a.rounds} rounds interleaved" if a.rounds > 1 else ", the models back to back")
    )
    cpu = a.backend == "torch"
    print(
        f"{'model':<8} {'requests':>8} {'out tok':>8} {'wall s':>7} {'tok/s':>8} {'req/s':>7} "
        f"{'p50 s':>7} {'p99 s':>7} {'batch':>6} {'queue s':>7}" + (f" {'tok/cpu-s':>9}" if cpu else "")
    )
    for name, s in summaries.items():
        print(
            f"{name:<8} {s['requests']:8d} {s['output_tokens']:8d} {s['wall_s']:7.2f} {s['tok_s']:8.1f} "
            f"{s['req_s']:7.2f} {s['p50_s']:7.3f} {s['p99_s']:7.3f} {s['mean_batch']:6.2f} {s['mean_queue_s']:7.3f}"
            + (f" {s['tok_per_cpu_s']:9.1f}" if cpu else "")
        )
    print(
        "latency: client send to answer received; batch: mean requests per generate call; queue s: mean wait "
        "in the engine's queue before the call that served it started"
        + (
            "; tok/cpu-s: output tokens per CPU second of the engine's process (steadier on a busy machine)"
            if cpu
            else ""
        )
    )
    for name, r in rel.items():
        print(
            f"{name} / teacher: tokens/s x{r['tok_s_x']:.2f}"
            + (f" (per CPU second x{r['tok_per_cpu_s_x']:.2f})" if r["tok_per_cpu_s_x"] else "")
            + f", p50 latency x{r['p50_x']:.2f}, p99 latency x{r['p99_x']:.2f} "
            "(tokens > 1: more throughput; latency < 1: answered sooner)"
        )


def main(argv: list[str] | None = None) -> None:
    t_all = time.perf_counter()
    a = parse_args(argv)
    import ray

    from bench.decode import _paths
    from launch.config import ClusterSection, RunConfig
    from launch.fleet import connect_ray
    from zeda_rl.chat import stop_ids
    from zeda_rl.progress import Progress
    from zeda_rl.sampling import SamplingParams

    paths = _paths(a)
    missing = [m for m in a.models if m not in paths]
    if missing:
        raise SystemExit(f"no checkpoint for {missing}: name it (--net)")
    paths = {m: paths[m] for m in a.models}
    prompts = request_prompts(paths["teacher"], _suite(paths["teacher"], a.tasks), a.requests)
    stops = stop_ids(paths["teacher"]) if a.stop else ()
    params = SamplingParams(temperature=0.0, max_new_tokens=a.max_new_tokens, stop_token_ids=stops)
    per_round = split_rounds(a.requests, a.rounds)
    starts = [sum(per_round[:r]) for r in range(a.rounds)]

    cpus = max(os.cpu_count() or 1, len(a.models) * a.threads)
    connect_ray(RunConfig(cluster=ClusterSection(num_cpus=cpus)))
    if a.backend == "sglang" and ray.cluster_resources().get("GPU", 0) < 1:
        ray.shutdown()
        raise SystemExit("--backend sglang needs a GPU and this Ray cluster has none: use --backend torch on CPU")
    Actor = _serving_actor_class()
    resources = {"num_cpus": a.threads} if a.backend == "torch" else {"num_cpus": 1, "num_gpus": 1}

    def start(name: str):
        actor = Actor.options(max_concurrency=a.concurrency + a.max_batch + 4, **resources).remote(
            a.backend,
            str(paths[name]),
            a.threads,
            a.engine_kwargs,
            a.max_batch,
            a.batch_wait_ms / 1000,
            a.experts,
        )
        warm = prompts[: a.max_batch]
        run_load(actor, warm, params, len(warm))  # untimed: first-call allocations and lazy init
        return actor

    loads = {m: [] for m in a.models}
    actors = {m: start(m) for m in a.models} if a.backend == "torch" else {}
    with Progress("serve", a.requests * len(a.models), "requests") as bar:
        for r, name in schedule(a.models, a.rounds):
            if name not in actors:  # sglang: one engine on the GPU at a time
                for other in list(actors):
                    ray.kill(actors.pop(other))
                actors[name] = start(name)
            chunk = prompts[starts[r] : starts[r] + per_round[r]]
            c0 = ray.get(actors[name].cpu_s.remote())
            load = run_load(actors[name], chunk, params, a.concurrency, bar, note=f"{name} round {r + 1}/{a.rounds}")
            load["cpu_s"] = ray.get(actors[name].cpu_s.remote()) - c0
            loads[name].append(load)
    for actor in actors.values():
        ray.kill(actor)
    summaries = {
        m: summarize(
            [x for ld in loads[m] for x in ld["latencies"]],
            sum(ld["tokens"] for ld in loads[m]),
            sum(ld["wall_s"] for ld in loads[m]),
            [x for ld in loads[m] for x in ld["batches"]],
            [x for ld in loads[m] for x in ld["queued"]],
            sum(ld["cpu_s"] for ld in loads[m]) if a.backend == "torch" else None,
        )
        for m in a.models
    }
    rel = ratios(summaries)
    _print(summaries, rel, a)
    print(f"(whole run, Ray's start, model loading and warm-up included: {time.perf_counter() - t_all:.0f} s)")
    if a.json:
        out = {
            "settings": {k: v for k, v in vars(a).items() if k != "json"},
            "checkpoints": {m: str(p) for m, p in paths.items()},
            "results": summaries,
            "ratios_vs_teacher": rel,
        }
        Path(a.json).write_text(json.dumps(out, indent=2, default=str) + "\n")
        print(f"wrote {a.json}")
    ray.shutdown()


if __name__ == "__main__":
    main()
