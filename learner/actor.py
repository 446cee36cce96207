"""The learner as Ray actors: one `LearnerActor` per rank, driven by a `LearnerGroup`.

The ranks live in one placement group (PACK: one node when it fits) and form one
torch.distributed world (gloo on CPU, nccl on GPU) of `learner.ep` x `learner.dp` ranks: expert
parallelism of `learner.ep` and tensor parallelism of `learner.tp` are carved out of them
(learner.parallel); the rows of a batch go to the world / TP data-parallel ranks, each TP
peer getting its data-parallel rank's share. Rank 0 hosts the rendezvous (a TCPStore) on
cluster.bind_host when all ranks share its node (loopback by default), on its node's address when
they span nodes, at a free port there; every rank then builds its `Learner`
concurrently (init_process_group blocks until all have joined).

The driver talks to the group only with plain data: batches go in as dicts of numpy
arrays (split by rows across the DP ranks), metrics come back as dicts of floats/lists,
and weights never come back at all: each rank publishes the tensors it owns itself
(`learner.publish`), into Ray's object store (the driver gets references) or over a
broadcast group to the engines.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import ray

# Fields the learner reads; others (sample ids, versions...) stay on the driver.
_BATCH_KEYS = (
    "tokens",
    "loss_mask",
    "attention_mask",
    "behaviour_logprobs",
    "teacher_logprobs",
    "routed_experts",
    "teacher_top_ids",
    "teacher_top_logprobs",
)


def shard_rows(batch: dict, world_size: int, tp: int = 1) -> list[dict]:
    """Contiguous row shards of a batch, one per rank (learner fields only; every rank gets one, maybe empty).

    With tensor parallelism the rows are split over the world / tp data-parallel ranks and
    the TP peers of one (consecutive ranks, Megatron's order) get the same share.
    """
    from learner.parallel import layout

    b = {k: np.asarray(batch[k]) for k in _BATCH_KEYS if batch.get(k) is not None}
    rows = np.array_split(np.arange(b["tokens"].shape[0]), world_size // tp)
    shards = [{k: v[r] for k, v in b.items()} for r in rows]  # every field is row-first
    return [shards[layout(rank, world_size, tp)["dp_rank"]] for rank in range(world_size)]


@ray.remote
class LearnerActor:
    """One learner rank. Methods are collective: call them on every rank of the group together."""

    def __init__(self, rank: int, world_size: int, threads: int = 1):
        self.rank, self.world_size = rank, world_size
        self.learner = None
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
        import torch

        torch.set_num_threads(max(1, int(threads)))

    def health(self) -> dict:
        return {"pid": os.getpid(), "rank": self.rank}

    def rendezvous(self, bind_host: str | None = None) -> tuple[str, int]:
        """(address, free port there) for rank 0 to host the process group's TCPStore on.

        `bind_host` (cluster.bind_host) when every rank runs on this node: 'auto' is the node's
        address, and loopback stands in for 'localhost', every interface (the store needs no
        more than this node) and an address this node does not have (the driver's, when the
        learner runs on another node). None, the ranks spanning nodes: the node's address.
        """
        from learner.parallel import free_port

        node = ray.util.get_node_ip_address()
        if bind_host is None:
            return node, free_port(node)
        host = {"auto": node, "localhost": "127.0.0.1", "0.0.0.0": "127.0.0.1", "*": "127.0.0.1"}.get(
            bind_host, bind_host
        )
        try:
            return host, free_port(host)
        except OSError:  # not an address of this node
            return "127.0.0.1", free_port()

    def init(self, checkpoint_dir: str, config, stage, options: dict, master_addr: str, master_port: int) -> dict:
        from learner.train import Learner

        self.learner = Learner(
            checkpoint_dir,
            config,
            stage,
            **options,
            rank=self.rank,
            world_size=self.world_size,
            master_addr=master_addr,
            master_port=master_port,
        )
        self.tp = self.learner.config.tp
        info = self.learner.info
        return {
            "rank": self.rank,
            "family": info.family,
            "moe_layers": len(info.moe_layers),
            "num_experts": info.num_experts,
        }

    def set_stage(self, stage, reset_optimizer: bool) -> dict:
        return self.learner.set_stage(stage, reset_optimizer).model_dump(mode="json")

    def train_step(self, batch: dict, data_cursor=None) -> dict:
        return self.learner.train_step(batch, data_cursor)

    def logits(self, tokens: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
        return self.learner.logits(tokens, attention_mask).numpy()

    # -- the inbox (rank 0 only; learner.inbox) --

    def open_inbox(self, bind_host: str, port: int, run: str | None = None) -> str:
        from learner.inbox import LearnerInbox

        host = ray.util.get_node_ip_address() if bind_host == "auto" else bind_host
        self.inbox = LearnerInbox(f"tcp://{host}:{port}", run=run, vocab_size=self.learner.info.vocab_size)
        return self.inbox.endpoint

    def inbox_take(
        self, ids: list[int], version: int, max_staleness: int, replay: bool = True, first_row: bool = False
    ) -> tuple[dict, list]:
        """A step's batch from the inbox, cut into one shard per rank, each put in the object store
        here: the driver gets the report and references, never the trajectories."""
        batch, report = self.inbox.take(ids, version, max_staleness)
        if batch is None:
            return report, []
        if not replay:
            batch.pop("routed_experts", None)
        if first_row:
            n = int(batch["attention_mask"][0].sum()) if "attention_mask" in batch else batch["tokens"].shape[1]
            report["first_row"] = {k: batch[k][0][:n][:4096].tolist() for k in ("tokens", "loss_mask")}
        refs: dict[int, object] = {}  # TP peers share one object
        return report, [refs.setdefault(id(s), ray.put(s)) for s in shard_rows(batch, self.world_size, self.tp)]

    def inbox_discard(self, ids: list[int]) -> int:
        return self.inbox.discard(ids)

    def inbox_stats(self) -> dict:
        return self.inbox.stats()

    # -- weights out (learner.publish): each rank sends what it owns, nothing is gathered --

    def publish(self, version: int, bucket_bytes: int) -> list:
        """This rank's buckets put in the object store here, one at a time; the references (none if it owns nothing)."""
        from learner.publish import owned_buckets
        from zeda_rl.weights import pack_bucket

        return [ray.put(pack_bucket(version, b)) for b in owned_buckets(self.learner.model, bucket_bytes)]

    def weight_endpoint(self, bucket_bytes: int, group_prefix: str) -> dict | None:
        """If this rank owns tensors: its broadcast group's rendezvous and bucket plan (for the engines)."""
        from learner.parallel import free_port
        from learner.publish import WeightGroup, gathers_dense, ownership

        if not (any(ownership()) or gathers_dense()):  # a TP peer of rank 0 that owns nothing: WeightGroup refuses
            return None
        if getattr(self, "weight_group", None) is not None:
            self.weight_group.close()
        self.weight_group = WeightGroup(
            self.learner.model, bucket_bytes, f"{group_prefix}-{self.rank}", ray.util.get_node_ip_address(), free_port()
        )
        return self.weight_group.endpoint()

    def join_weight_group(self, world_size: int, timeout_s: float) -> None:
        self.weight_group.join(world_size, timeout_s)

    def broadcast_weights(self) -> int:
        return self.weight_group.broadcast()

    def export_hf(self, out_dir: str) -> str | None:
        out = self.learner.export_hf(out_dir)
        return str(out) if out is not None else None

    def save(self, path: str) -> str:
        return str(self.learner.save(path))

    def load(self, path: str) -> dict:
        meta = self.learner.load(path)
        return {"step": meta["step"], "data_cursor": meta.get("data_cursor")}

    def settings(self) -> dict:
        return self.learner.settings()

    def state(self) -> dict:
        return {
            "step": self.learner.step,
            "stage": self.learner.stage.name,
            "data_cursor": self.learner.data_cursor,
            "saved_step": self.learner.saved_step,
        }

    def close(self) -> None:
        if getattr(self, "weight_group", None) is not None:
            self.weight_group.close()
            self.weight_group = None
        if getattr(self, "inbox", None) is not None:
            self.inbox.close()
            self.inbox = None
        if self.learner is not None:
            self.learner.close()
            self.learner = None


class LearnerGroup:
    """Drives ep x dp LearnerActors (the `learner:` section's layout) in one placement group.

    Built from the `learner:` section and the first stage's section (`learner.config`); a call
    with another stage's section switches every rank to it. `train_step(stage, batch)` splits the
    rows of the global batch over the ranks; every rank gets at least an empty share, so collectives
    always match.
    """

    def __init__(
        self,
        checkpoint_dir: str | Path,
        config=None,
        stage=None,
        *,
        temperature: float = 1.0,
        seed: int = 0,
        save_dir: str | Path | None = None,
        resume: str | Path | None = None,
        bind_host: str = "127.0.0.1",
    ):
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from learner.config import LearnerSection, SFTStage, learner_part

        self.config = c = config or LearnerSection()
        stage = learner_part(stage or SFTStage())
        self.world_size, self.stage, self.bucket_bytes = c.ep * c.dp, stage.name, c.bucket_bytes
        bundle = {"CPU": c.cpus_per_rank, **({"GPU": c.gpus_per_rank} if c.gpus_per_rank else {})}
        self.pg = placement_group([dict(bundle) for _ in range(self.world_size)], strategy="PACK")
        ray.get(self.pg.ready(), timeout=600)
        self.actors = [
            LearnerActor.options(
                num_cpus=c.cpus_per_rank,
                num_gpus=c.gpus_per_rank,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i),
            ).remote(i, self.world_size, max(1, int(c.cpus_per_rank)))
            for i in range(self.world_size)
        ]
        # the TCPStore on cluster.bind_host when the ranks share a node (a local run: loopback), else rank 0's node address
        one_node = len(set(ray.util.placement_group_table(self.pg)["bundles_to_node_id"].values())) == 1
        self.master = addr, port = ray.get(self.actors[0].rendezvous.remote(bind_host if one_node else None))
        # paths are resolved here: the actors' working directory need not be the driver's
        options = {
            "temperature": temperature,
            "seed": seed,
            "save_dir": str(Path(save_dir).resolve()) if save_dir else None,
        }
        ckpt = str(Path(checkpoint_dir).resolve())
        self.info = self._all([a.init.remote(ckpt, c, stage, options, addr, port) for a in self.actors], "start")[0]
        if resume is not None:
            self.load(resume)

    @classmethod
    def from_run_config(cls, cfg, checkpoint_dir: str | Path, resume: str | Path | None = None) -> "LearnerGroup":
        """The learner of a `launch.config.RunConfig`: its `learner:` section, SFT first, at the sampling temperature."""
        return cls(
            checkpoint_dir,
            cfg.learner,
            cfg.sft,
            temperature=cfg.sampling.temperature,
            seed=cfg.seed,
            save_dir=cfg.run_dir / "learner",
            resume=resume,
            bind_host=cfg.cluster.bind_host,
        )

    # -- training --

    def set_stage(self, stage, reset_optimizer: bool = True) -> dict:
        """Switch every rank to the next stage's section (`learner.config.SFTStage` / `OPDStage` or a subclass)."""
        from learner.config import learner_part

        part = learner_part(stage)
        cfgs = self._all([a.set_stage.remote(part, reset_optimizer) for a in self.actors], "a stage switch")
        self.stage = part.name
        return cfgs[0]

    def split(self, batch: dict) -> list[dict]:
        return shard_rows(batch, self.world_size, self.config.tp)

    def train_step(self, stage, batch: dict, data_cursor=None) -> dict:
        """One step of `stage` (its section; switched to first if it is not the current one) on the
        global batch. `data_cursor`: the data stream's position, saved with the learner's state."""
        if stage.name != self.stage:
            self.set_stage(stage)
        shards = self.split(batch)
        out = self._all([a.train_step.remote(s, data_cursor) for a, s in zip(self.actors, shards)], "a training step")
        return out[0]

    # -- the inbox: OPD batches that never pass through the driver --

    def open_inbox(self, bind_host: str = "127.0.0.1", port: int = 0, run: str | None = None) -> str:
        """Bind the learner's ZMQ inbox on rank 0 ('auto': its node's cluster address); returns the endpoint.
        With `run`, batches whose meta names another run are dropped (zeda_rl.transport.Puller)."""
        return ray.get(self.actors[0].open_inbox.remote(bind_host, port, run))

    def train_from_inbox(
        self,
        stage,
        ids: list[int],
        version: int,
        max_staleness: int,
        data_cursor=None,
        replay: bool = True,
        first_row: bool = False,
    ) -> tuple[dict | None, dict]:
        """One step of `stage` (its section) on the samples `ids` from rank 0's inbox: (metrics or None if
        none was trainable, inbox report)."""
        if stage.name != self.stage:
            self.set_stage(stage)
        report, refs = self._all(
            [self.actors[0].inbox_take.remote(ids, version, max_staleness, replay, first_row)], "an inbox take"
        )[0]
        if not refs:
            return None, report
        out = self._all([a.train_step.remote(r, data_cursor) for a, r in zip(self.actors, refs)], "a training step")
        return out[0], report

    def inbox_discard(self, ids: list[int]) -> int:
        return ray.get(self.actors[0].inbox_discard.remote(ids))

    def inbox_stats(self) -> dict:
        return ray.get(self.actors[0].inbox_stats.remote())

    def logits(self, tokens, attention_mask=None) -> np.ndarray:
        """Eval logits of the same tokens on every rank (they must agree); rank 0's are returned."""
        return self._all([a.logits.remote(np.asarray(tokens), attention_mask) for a in self.actors], "logits")[0]

    # -- weights --

    def publish(self, version: int):
        """Weights v`version` into Ray's object store, put by the ranks that own them: a
        `zeda_rl.weights.WeightPush` of references, which is all the caller ever holds."""
        from zeda_rl.weights import WeightPush

        refs = self._all([a.publish.remote(version, self.bucket_bytes) for a in self.actors], "a weight publish")
        return WeightPush(version=int(version), refs=tuple(r for rank in refs for r in rank))

    def weight_endpoints(self, group_prefix: str) -> list[dict]:
        """The broadcast groups of the ranks that own tensors (rendezvous, backend, bucket plan)."""
        eps = ray.get([a.weight_endpoint.remote(self.bucket_bytes, group_prefix) for a in self.actors])
        self._senders = [a for a, e in zip(self.actors, eps) if e is not None]
        return [e for e in eps if e is not None]

    def join_weight_groups(self, world_size: int, timeout_s: float = 600.0) -> list:
        """The owning ranks join their groups; returns the calls' refs (the engines must join at the same time)."""
        return [a.join_weight_group.remote(world_size, timeout_s) for a in self._senders]

    def broadcast(self) -> list:
        """The owning ranks broadcast their buckets; returns the calls' refs (bytes sent per rank)."""
        return [a.broadcast_weights.remote() for a in self._senders]

    def export_hf(self, out_dir: str | Path) -> Path:
        return Path(
            self._all([a.export_hf.remote(str(Path(out_dir).resolve())) for a in self.actors], "the HF export")[0]
        )

    # -- state --

    def save(self, path: str | Path) -> Path:
        return Path(self._all([a.save.remote(str(Path(path).resolve())) for a in self.actors], "a checkpoint save")[0])

    def load(self, path: str | Path) -> dict:
        out = self._all([a.load.remote(str(Path(path).resolve())) for a in self.actors], "a checkpoint load")[0]
        self.stage = ray.get(self.actors[0].state.remote())["stage"]
        return out

    def state(self) -> dict:
        return ray.get(self.actors[0].state.remote())

    def settings(self) -> dict:
        """Every rank's learner section, stage section, temperature and seed (they must agree); rank 0's."""
        out = ray.get([a.settings.remote() for a in self.actors])
        if any(s != out[0] for s in out):
            raise RuntimeError(f"learner ranks run with different settings: {out}")
        return out[0]

    def _all(self, refs: list, what: str) -> list:
        """Every rank's result; a dead rank ends the call at once (learner.ranks.RankLost), never a hang."""
        from learner.ranks import RankLost, collect

        try:
            return collect(refs, what, self.world_size)
        except RankLost:
            self.lost = True
            raise

    def check(self) -> None:
        """RankLost if a rank has died since the last check; never blocks. Between steps the driver may
        wait on engines for a long time (a teacher's push to a dead rank 0 times out only after a minute):
        a ping per rank, kept in flight and looked at here, notices the death within a call or two."""
        import time

        from learner.ranks import RankLost, cause

        if time.monotonic() - getattr(self, "_checked", 0.0) < 0.5:  # the loop spins; the pings need not
            return
        self._checked = time.monotonic()
        pings = getattr(self, "_pings", None) or {a.health.remote(): i for i, a in enumerate(self.actors)}
        done, _ = ray.wait(list(pings), num_returns=len(pings), timeout=0)
        for ref in done:
            i = pings.pop(ref)
            try:
                ray.get(ref)
            except ray.exceptions.RayActorError as err:
                self.lost = True
                raise RankLost([i], self.world_size, "the wait between steps", cause(err)) from err
            pings[self.actors[i].health.remote()] = i
        self._pings = pings

    def shutdown(self) -> None:
        from ray.util.placement_group import remove_placement_group

        try:  # after a lost rank the others may sit in a collective: a close would queue behind it
            if not getattr(self, "lost", False):
                ray.get([a.close.remote() for a in self.actors], timeout=60)
        except Exception:  # noqa: BLE001 - best effort: the actors are killed next anyway
            pass
        for a in self.actors:
            ray.kill(a)
        remove_placement_group(self.pg)
        self.actors = []
