"""Process groups and gradient synchronisation for the learner (Megatron's layout, TP x DP, EP inside).

The layout is Megatron's with pipeline parallelism at 1 and `expert_tensor_parallel_size=1`
(what the official runs use): the world of W ranks (the `learner:` section's ep x dp) is
- for dense parameters, TP x DP: groups of TP consecutive ranks hold one copy of the dense
  model split by tensor parallelism (with sequence parallelism: activations between the
  TP regions are split along the sequence), and DP = W / TP such groups see different rows;
- for experts, EP x expert-DP: groups of EP consecutive ranks share one copy of the experts
  (N/EP whole experts per rank, never split by TP), so an EP group spans TP ranks and DP
  ranks alike (with W = TP = EP = 2 the same two ranks are both); expert-DP = W / EP.
Megatron's own order ("tp-cp-ep-dp-pp") decides which ranks those are: TP peers are
consecutive, data-parallel rank = global rank // TP (`layout` states it for the driver).

Gradients: the training step scales each micro-batch's loss by its share of the global
batch (tokens over all DP ranks; TP peers compute the same loss on the same rows), so the
global gradient is a plain SUM:
- dense parameters: all-reduce SUM over the data-parallel group (W / TP ranks);
- dense parameters replicated over TP that see only part of the work on each TP rank
  (norms and routers on a sequence shard: Megatron marks them `sequence_parallel`; Qwen's
  q/k norms on the rank's heads): all-reduce SUM over the TP group first, as Megatron's
  finalize_model_grads does;
- expert parameters: their gradient already holds the contributions of every token of
  the EP group (the dispatcher's backward brings them home), so all-reduce SUM over the
  expert-data-parallel group only.
This is done explicitly here (not with Megatron's DDP wrapper) because it is a few lines
that run the same on gloo and nccl and keep grads in `param.grad` for torch's optimizer.
"""

from __future__ import annotations

import datetime
import math
import os
import socket
import warnings
import zlib

import torch
import torch.distributed as dist

from learner import cpu_shims

cpu_shims.apply()

from megatron.core import parallel_state  # noqa: E402
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed  # noqa: E402

from learner.model import is_expert_param  # noqa: E402
from zeda_rl.transport import rendezvous_store  # noqa: E402


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on `host` now (OSError: `host` is not an address of this machine)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def default_dispatcher() -> str:
    """`alltoall` on GPU (EP=8, nccl), `allgather` on CPU (gloo; simplest, and equal shapes anyway)."""
    return "alltoall" if torch.cuda.is_available() else "allgather"


def check_layout(world_size: int, ep_size: int = 1, tp_size: int = 1) -> None:
    """Refuse a layout Megatron cannot build, saying which knob to change (before any process group exists)."""
    if world_size % ep_size:
        raise ValueError(
            f"world size {world_size} is not a multiple of the expert-parallel size {ep_size} "
            "(learner.ep must divide learner.ep x learner.dp)"
        )
    if world_size % tp_size:
        raise ValueError(
            f"world size {world_size} (learner.ep x learner.dp) is not a multiple of the "
            f"tensor-parallel size {tp_size} (learner.tp): TP groups are carved out of the ranks"
        )


def layout(rank: int, world_size: int, tp_size: int = 1) -> dict[str, int]:
    """Where global rank `rank` sits in Megatron's order with PP=CP=1: its data-parallel and TP rank.

    The driver needs it without process groups to give TP peers the same rows.
    """
    return {"dp_rank": rank // tp_size, "dp_size": world_size // tp_size, "tp_rank": rank % tp_size}


def setup(
    rank: int = 0,
    world_size: int = 1,
    ep_size: int = 1,
    master_addr: str = "127.0.0.1",
    master_port: int | None = None,
    backend: str | None = None,
    seed: int = 0,
    timeout_s: float = 600.0,
    tp_size: int = 1,
) -> None:
    """Initialise torch.distributed and Megatron's parallel state (TP=tp_size, EP=ep_size, ETP=PP=1)."""
    check_layout(world_size, ep_size, tp_size)
    backend = backend or default_backend()
    # Megatron's dispatchers still call the *_tensor collectives torch 2.13 marks deprecated.
    warnings.filterwarnings(
        "ignore", message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated"
    )
    # Under TP the experts' linears (expert TP 1) are told sequence_parallel and say they ignore it: as meant.
    warnings.filterwarnings(
        "ignore", message=r"`sequence_parallel` is set to `True`, but tensor model parallel size is 1"
    )
    if not dist.is_initialized():
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank % max(torch.cuda.device_count(), 1))))
        timeout = datetime.timedelta(seconds=timeout_s)
        store = rendezvous_store(master_addr, master_port or 0, rank, world_size, timeout)
        dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp_size,
        pipeline_model_parallel_size=1,
        expert_model_parallel_size=ep_size,
        expert_tensor_parallel_size=1,
        create_gloo_process_groups=False,
        distributed_timeout_minutes=max(1, math.ceil(timeout_s / 60)),  # the TP/EP/DP groups wait as long as WORLD
    )
    model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)


def teardown() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def dp_group():
    return parallel_state.get_data_parallel_group()


def ep_group():
    return parallel_state.get_expert_model_parallel_group()


def expert_dp_group():
    return parallel_state.get_expert_data_parallel_group()


def tp_group():
    return parallel_state.get_tensor_model_parallel_group()


def tp_size() -> int:
    return (
        parallel_state.get_tensor_model_parallel_world_size() if parallel_state.model_parallel_is_initialized() else 1
    )


def tp_rank() -> int:
    return parallel_state.get_tensor_model_parallel_rank() if parallel_state.model_parallel_is_initialized() else 0


def is_tp_sharded(p: torch.Tensor) -> bool:
    """Split over the TP ranks (Megatron's column/row/vocab-parallel weights), as opposed to replicated."""
    return bool(getattr(p, "tensor_model_parallel", False)) and tp_size() > 1


def needs_tp_grad_sum(name: str, p: torch.Tensor) -> bool:
    """A TP-replicated parameter whose gradient on each TP rank covers only part of the work.

    Megatron's rule (finalize_model_grads): `sequence_parallel` parameters (norms, routers:
    each TP rank sees a sequence shard) and the q/k norms (each TP rank normalises its own heads).
    """
    if is_tp_sharded(p) or is_expert_param(name):
        return False
    return bool(getattr(p, "sequence_parallel", False)) or "q_layernorm" in name or "k_layernorm" in name


def ep_rank() -> int:
    return parallel_state.get_expert_model_parallel_rank()


def ep_size() -> int:
    return parallel_state.get_expert_model_parallel_world_size()


def dp_size() -> int:
    return parallel_state.get_data_parallel_world_size()


def dp_rank() -> int:
    return parallel_state.get_data_parallel_rank()


def _all_reduce_flat(grads: list[torch.Tensor], group) -> None:
    if not grads or dist.get_world_size(group) == 1:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    off = 0
    for g in grads:
        g.copy_(flat[off : off + g.numel()].view_as(g))
        off += g.numel()


def sync_grads(model: torch.nn.Module) -> None:
    """All-reduce SUM of grads: partial TP-replicated ones over TP, then dense over DP, experts over expert-DP.

    Parameters without a grad get zeros first, so every rank makes the same collectives.
    """
    dense, expert, tp_partial = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        (expert if is_expert_param(name) else dense).append(p.grad)
        if needs_tp_grad_sum(name, p):
            tp_partial.append(p.grad)
    if tp_size() > 1:
        _all_reduce_flat(tp_partial, tp_group())
    _all_reduce_flat(dense, dp_group())
    _all_reduce_flat(expert, expert_dp_group())


def comm_device() -> torch.device:
    """Where small control tensors must live for collectives (nccl: the current GPU; gloo: CPU)."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def grad_norm(model: torch.nn.Module) -> float:
    """Global L2 norm of the (synchronised) gradient: replicated dense counted once, TP shards summed
    over TP, experts summed over EP."""
    dev = comm_device()
    dense = torch.zeros((), dtype=torch.float64, device=dev)
    sharded = torch.zeros((), dtype=torch.float64, device=dev)
    expert = torch.zeros((), dtype=torch.float64, device=dev)
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        sq = p.grad.detach().double().pow(2).sum().to(dev)
        if is_expert_param(name):
            expert += sq
        elif is_tp_sharded(p):
            sharded += sq
        else:
            dense += sq
    if dist.is_initialized() and dist.get_world_size(ep_group()) > 1:
        dist.all_reduce(expert, op=dist.ReduceOp.SUM, group=ep_group())
    if tp_size() > 1:
        dist.all_reduce(sharded, op=dist.ReduceOp.SUM, group=tp_group())
    return float((dense + sharded + expert).sqrt())


def clip_grads(model: torch.nn.Module, max_norm: float) -> float:
    """Clip by the global norm (ourselves: Megatron's clip asserts CUDA tensors); returns the norm before."""
    norm = grad_norm(model)
    if max_norm and max_norm > 0 and norm > max_norm:
        coeff = max_norm / (norm + 1e-6)
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(coeff)
    return norm


def check_tp_peers_agree(batch: dict[str, torch.Tensor]) -> None:
    """Refuse a step whose TP peers were handed different rows (they must run the same sequences).

    A fingerprint per rank (size and CRC-32 of every field's bytes, read in place: a real batch's routed experts
    alone are hundreds of MB, too many for a float64 copy a step) is compared over the TP group with one small
    all-reduce of (x, -x) under MAX.
    """
    if tp_size() == 1:
        return
    fp = []
    for k in sorted(batch):
        v = batch[k].detach().cpu().contiguous()
        fp += [float(v.numel()), float(zlib.crc32(v.reshape(-1).view(torch.uint8).numpy()))]
    t = torch.tensor(fp + [-x for x in fp], dtype=torch.float64, device=comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=tp_group())
    n = len(fp)
    if not torch.equal(t[:n], -t[n:]):
        raise ValueError(
            f"tensor parallelism: the {tp_size()} TP ranks of one data-parallel rank got different batch "
            "shares; give every TP peer the same rows (learner.actor.shard_rows with tp)"
        )


def all_reduce_max(values: list[int], group=None) -> list[int]:
    if not dist.is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.int64, device=comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return [int(x) for x in t.cpu()]


def all_reduce_sum(values: list[float], group=None) -> list[float]:
    if not dist.is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return [float(x) for x in t.cpu()]
