"""Weight sync without a detour: each learner rank sends the tensors it owns straight to the engines.

Nothing gathers the model: a rank's tensors come out of `bridge.local_hf_state` one at a
time (HF names, per-expert checkpoint layout, the on-disk dtype), are cut into buckets by a
generator, and each bucket leaves the rank before the next is made. Two transports:
- `ray`: the rank puts each bucket in Ray's object store itself (`zeda_rl.weights.pack_bucket`)
  and returns only the references; the driver hands references and the version to the engines,
  which fetch one bucket at a time (`actors.rollout`);
- `nccl` (gloo on CPU): the rank is rank 0 of a broadcast group of its own with every engine
  (`WeightGroup`) and broadcasts its buckets tensor by tensor into SGLang's
  `update_weights_from_distributed`; the driver tells the engines the names, dtypes and
  shapes, fixed for a run, from the rank's `plan` (its bucket specs, computed once).

Ownership, so that every tensor is sent exactly once: the experts by the ranks of
expert-data-parallel rank 0 (one EP group holds every expert once: EP rank r holds experts
r*N/EP..), the dense tensors by global rank 0 (DP rank 0, a member of that EP group). With
tensor parallelism a TP-sharded dense tensor is first gathered inside the TP group of global
rank 0 (its TP peers take part in the gathers and publish nothing dense); experts are never
TP-split (expert TP 1), so expert owners gather nothing. `owned_tensors` is the one place that
decides. The broadcast transport needs every rank of that TP group to be a sender (learner.tp
<= learner.ep, so they all own experts), else `WeightGroup` refuses.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist

from learner import bridge, parallel
from zeda_rl.weights import bucket_spec, iter_buckets, join_group


def ownership() -> tuple[bool, bool]:
    """(publishes its experts, publishes the dense tensors) for this rank."""
    if not dist.is_initialized():
        return True, True
    return dist.get_rank(parallel.expert_dp_group()) == 0, dist.get_rank() == 0


def gathers_dense() -> bool:
    """Whether this rank takes part in building the dense stream: global rank 0, and under TP its TP peers."""
    if not dist.is_initialized():
        return True
    return (
        dist.get_rank() < parallel.tp_size()
    )  # Megatron's order: TP peers are consecutive, TP group 0 = ranks 0..TP-1


def owned_tensors(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) of what this rank publishes: the dense tensors first, then its experts, each in export order.

    Under TP the dense pass is collective over the TP group of global rank 0, whose ranks must all iterate it
    together; the expert pass has no collective. Dense first, and all of it, because under the broadcast transport
    the engines receive rank 0's group to its end before rank 1's: a TP peer that sent an expert bucket between two
    TP gathers would wait in its broadcast for engines that wait for rank 0, which waits for that peer's gather.
    """
    experts, dense = ownership()
    if gathers_dense():
        for name, t in bridge.local_hf_state(model, experts=False):
            if dense:  # TP peers of rank 0 take part in the gathers and drop what they gathered
                yield name, t
    if experts:
        yield from bridge.local_hf_state(model, dense=False)


def owned_buckets(model: torch.nn.Module, bucket_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    return iter_buckets(owned_tensors(model), bucket_bytes)


def plan(model: torch.nn.Module, bucket_bytes: int) -> list[list[tuple[str, str, list[int]]]]:
    """This rank's bucket specs: what a broadcast receiver must allocate, bucket by bucket."""
    return [bucket_spec(b) for b in owned_buckets(model, bucket_bytes)]


class WeightGroup:
    """This rank's broadcast group with the engines: the rank is its root (rank 0), engine i's TP
    workers follow at the offsets the driver gave them. nccl when the learner is on GPUs, gloo on CPU."""

    def __init__(self, model: torch.nn.Module, bucket_bytes: int, name: str, address: str, port: int):
        if gathers_dense() and not any(ownership()):
            raise NotImplementedError(
                f"weight broadcast with learner.tp {parallel.tp_size()} > learner.ep {parallel.ep_size()}: rank "
                f"{dist.get_rank()} helps gather the dense tensors but sends nothing, so it would not be driven; "
                "use learner.tp <= learner.ep or the ray weight transport"
            )
        self.model, self.bucket_bytes, self.name, self.address, self.port = model, bucket_bytes, name, address, port
        self.backend = parallel.default_backend()
        self.plan = plan(model, bucket_bytes)
        self.group = None

    def endpoint(self) -> dict:
        return {
            "group": self.name,
            "address": self.address,
            "port": self.port,
            "backend": self.backend,
            "plan": self.plan,
        }

    def join(self, world_size: int, timeout_s: float) -> None:
        self.group = join_group(self.backend, self.address, self.port, world_size, 0, self.name, timeout_s)

    def broadcast(self) -> int:
        """Send every owned bucket in plan order; returns the bytes sent. A bucket that does not match
        the plan the engines were told (names, dtypes, shapes) stops it with an error before it is sent."""
        sent = 0
        buckets = owned_buckets(self.model, self.bucket_bytes)
        for k, (bucket, spec) in enumerate(zip(buckets, self.plan, strict=True)):
            if bucket_spec(bucket) != spec:
                raise RuntimeError(f"weight group {self.name}: bucket {k} differs from the plan the engines hold")
            for _, t in bucket:
                dist.broadcast(t, src=0, group=self.group)
                sent += t.numel() * t.element_size()
        return sent

    def close(self) -> None:
        if self.group is not None:
            dist.destroy_process_group(self.group)
            self.group = None
