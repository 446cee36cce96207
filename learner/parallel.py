"""Process groups and gradient synchronisation for the learner (Megatron's layout, EP inside DP).

With tensor and pipeline parallelism at 1, every rank is a data-parallel rank for the
dense parameters, and expert parallelism is carved out of those ranks: each group of EP
consecutive ranks shares one copy of the experts (N/EP per rank) and exchanges tokens
through the MoE dispatcher; ranks holding the same experts form the expert-data-parallel
group. World size W = DP; expert-DP = W / EP.

Gradients: the training step scales each micro-batch's loss by its share of the global
batch (tokens over the whole DP world), so the global gradient is a plain SUM:
- dense parameters: all-reduce SUM over the data-parallel group;
- expert parameters: their gradient already holds the contributions of every token of
  the EP group (the dispatcher's backward brings them home), so all-reduce SUM over the
  expert-data-parallel group only.
This is done explicitly here (not with Megatron's DDP wrapper) because it is a few lines
that run the same on gloo and nccl and keep grads in `param.grad` for torch's optimizer.
"""

from __future__ import annotations

import datetime
import os
import socket
import warnings

import torch
import torch.distributed as dist

from learner import cpu_shims

cpu_shims.apply()

from megatron.core import parallel_state  # noqa: E402
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed  # noqa: E402

from learner.model import is_expert_param  # noqa: E402
from zeda_rl.transport import rendezvous_store  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def default_dispatcher() -> str:
    """`alltoall` on GPU (EP=8, nccl), `allgather` on CPU (gloo; simplest, and equal shapes anyway)."""
    return "alltoall" if torch.cuda.is_available() else "allgather"


def setup(
    rank: int = 0,
    world_size: int = 1,
    ep_size: int = 1,
    master_addr: str = "127.0.0.1",
    master_port: int | None = None,
    backend: str | None = None,
    seed: int = 0,
    timeout_s: float = 600.0,
) -> None:
    """Initialise torch.distributed and Megatron's parallel state (TP=PP=1, EP=ep_size, DP=world)."""
    if world_size % ep_size:
        raise ValueError(f"world size {world_size} is not a multiple of the expert-parallel size {ep_size}")
    backend = backend or default_backend()
    # Megatron's dispatchers still call the *_tensor collectives torch 2.13 marks deprecated.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated")
    if not dist.is_initialized():
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank % max(torch.cuda.device_count(), 1))))
        timeout = datetime.timedelta(seconds=timeout_s)
        store = rendezvous_store(master_addr, master_port or 0, rank, world_size, timeout)
        dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=1,
        pipeline_model_parallel_size=1,
        expert_model_parallel_size=ep_size,
        create_gloo_process_groups=False,
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


def ep_rank() -> int:
    return parallel_state.get_expert_model_parallel_rank()


def ep_size() -> int:
    return parallel_state.get_expert_model_parallel_world_size()


def dp_size() -> int:
    return parallel_state.get_data_parallel_world_size()


def dp_rank() -> int:
    return parallel_state.get_data_parallel_rank()


def sync_grads(model: torch.nn.Module) -> None:
    """All-reduce SUM of grads: dense over DP, experts over expert-DP (see the module docstring).

    Parameters without a grad get zeros first, so every rank makes the same collectives.
    """
    dense, expert = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        (expert if is_expert_param(name) else dense).append(p.grad)
    for grads, group in ((dense, dp_group()), (expert, expert_dp_group())):
        if not grads or dist.get_world_size(group) == 1:
            continue
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        off = 0
        for g in grads:
            g.copy_(flat[off : off + g.numel()].view_as(g))
            off += g.numel()


def comm_device() -> torch.device:
    """Where small control tensors must live for collectives (nccl: the current GPU; gloo: CPU)."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def grad_norm(model: torch.nn.Module) -> float:
    """Global L2 norm of the (synchronised) gradient: dense counted once, experts summed over EP."""
    dev = comm_device()
    dense = torch.zeros((), dtype=torch.float64, device=dev)
    expert = torch.zeros((), dtype=torch.float64, device=dev)
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        sq = p.grad.detach().double().pow(2).sum().to(dev)
        if is_expert_param(name):
            expert += sq
        else:
            dense += sq
    if dist.is_initialized() and dist.get_world_size(ep_group()) > 1:
        dist.all_reduce(expert, op=dist.ReduceOp.SUM, group=ep_group())
    return float((dense + expert).sqrt())


def clip_grads(model: torch.nn.Module, max_norm: float) -> float:
    """Clip by the global norm (ourselves: Megatron's clip asserts CUDA tensors); returns the norm before."""
    norm = grad_norm(model)
    if max_norm and max_norm > 0 and norm > max_norm:
        coeff = max_norm / (norm + 1e-6)
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(coeff)
    return norm


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
