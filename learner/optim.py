"""Megatron's DDP and optimiser for the learner's bf16 and sharded-optimiser layouts.

The learner's default layout (fp32, `optimizer: local`) keeps torch's AdamW on `param.grad`
with learner.parallel's explicit gradient sums. Any other layout needs what Megatron already
has, so it is configured here rather than rewritten:
- `precision: bf16`: Float16Module casts the model to bf16 (the zero-expert routers are put
  back to fp32: their gating GEMM runs in fp32 and their weights stay fp32 params); DDP
  accumulates fp32 main grads (`grad_reduce_in_fp32`); the mixed-precision optimiser
  (Float16OptimizerWithFloat16Params) keeps fp32 master weights and fp32 Adam state and casts
  the update back into the bf16 weights.
- `optimizer: distributed`: DistributedOptimizer shards master weights and Adam state over the
  data-parallel ranks (experts over the expert-data-parallel ranks), gradients reduce-scattered.
- `optimizer: cpu_offload` (Megatron's HybridDeviceOptimizer under the distributed optimiser)
  is refused by learner.config.not_implemented: megatron-core 0.16.1 cannot run it with the
  learner's fp32 routers (it says why).
On CPU these run through the shims of learner.cpu_shims (gloo has the reduce-scatter and
all-gather the distributed optimiser needs).

Losses are already scaled by their share of the global batch, so DDP must SUM gradients:
`calculate_per_token_loss` (on DDP's copy of the config only) makes its scaling factor 1 for
dense and expert parameters alike, as learner.parallel.sync_grads does. Clipping and the grad
norm (experts summed over EP) are Megatron's, inside `optimizer.step()`.
"""

from __future__ import annotations

import copy

import torch

from learner import cpu_shims

cpu_shims.apply()

from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig  # noqa: E402
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer, get_standard_config_overrides  # noqa: E402
from megatron.core.transformer.module import Float16Module  # noqa: E402

from learner.router import routers  # noqa: E402


def uses_megatron(section) -> bool:
    """Whether this `learner:` section needs Megatron's DDP and optimiser (else torch AdamW)."""
    return section.precision != "fp32" or section.optimizer != "local"


def wrap(model: torch.nn.Module, section, lr: float) -> tuple[DistributedDataParallel, object]:
    """Cast `model` in place for its precision, wrap it in DDP and build Megatron's optimiser.

    The caller keeps using the bare GPTModel for forwards (the bridge reads its parameter
    names); DDP's hooks sit on the parameters, so its backward fills the fp32 main grads.
    """
    bf16 = section.precision == "bf16"
    sharded = section.optimizer == "distributed"
    chunk = model
    if bf16:
        fp32 = routers(model)
        keep = [(r.weight.data, r.e_score_correction_bias) for r in fp32]
        chunk = Float16Module(model.config, model)  # model.bfloat16() in place (new tensors: `keep` is untouched)
        for r, (weight, bias) in zip(fp32, keep):
            r.weight.data = weight
            if bias is not None:
                r.e_score_correction_bias = bias
    ddp_model_config = copy.copy(model.config)
    ddp_model_config.calculate_per_token_loss = True
    ddp = DistributedDataParallel(
        config=ddp_model_config,
        ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=sharded),
        module=chunk,
    )
    oc = OptimizerConfig(
        optimizer="adam",
        lr=lr,
        weight_decay=section.weight_decay,
        adam_beta1=section.betas[0],
        adam_beta2=section.betas[1],
        adam_eps=section.eps,
        clip_grad=section.grad_clip,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=sharded,
    )
    # Megatron's usual groups: no weight decay on biases and 1-D parameters (wd_mult 0), as the torch path
    opt = get_megatron_optimizer(
        oc, [ddp], config_overrides=get_standard_config_overrides(oc), use_gloo_process_groups=False
    )
    set_schedule(opt, lr, section.weight_decay)
    return ddp, opt


def sum_tp_partial_grads(ddp: DistributedDataParallel) -> None:
    """Under TP, after DDP's sync: sum over TP the main grads of TP-replicated parameters that see part
    of the work (sequence-parallel norms and routers, q/k norms), as Megatron's finalize_model_grads does
    (the same step as learner.parallel.sync_grads on the torch path). A no-op without TP."""
    from megatron.core.distributed.finalize_model_grads import _allreduce_non_tensor_model_parallel_grads

    _allreduce_non_tensor_model_parallel_grads([ddp], ddp.config)


def set_schedule(optimizer, lr: float, weight_decay: float) -> None:
    """What Megatron's OptimizerParamScheduler would set per group: the learner has its own schedule."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_mult", 1.0)
        g["weight_decay"] = weight_decay * g.get("wd_mult", 1.0)


def _inner(optimizer) -> list:
    return [o.optimizer for o in optimizer.chained_optimizers]


def state_dict(optimizer) -> list[dict]:
    """Per sub-optimiser: the torch optimiser's state and the tensors it updates (the fp32 master
    weights, or this rank's shard of them), enough for an exact resume in the same layout.

    Megatron's own state_dict leaves the distributed optimiser's parameter state to separate
    gathered files (gloo groups, DP rank 0); a per-rank checkpoint wants this rank's part as is.
    """
    out = []
    for inner in _inner(optimizer):
        out.append(
            {
                "optimizer": inner.state_dict(),
                "main": [p.detach().clone() for g in inner.param_groups for p in g["params"]],
            }
        )
    return out


def reset_state(optimizer) -> None:
    """Forget the Adam moments and step counts (a new stage), keeping the fp32 master weights."""
    for inner in _inner(optimizer):
        inner.state.clear()  # torch's AdamW starts a parameter's moments afresh at its next step


def load_state_dict(optimizer, state: list[dict]) -> None:
    """Inverse of `state_dict` (the model's own weights are restored by the caller)."""
    inner_all = _inner(optimizer)
    if len(state) != len(inner_all):
        raise ValueError(f"optimizer state has {len(state)} parts, this optimizer {len(inner_all)}")
    for inner, st in zip(inner_all, state):
        params = [p for g in inner.param_groups for p in g["params"]]
        if len(params) != len(st["main"]):
            raise ValueError(f"optimizer state covers {len(st['main'])} tensors, this optimizer {len(params)}")
        with torch.no_grad():
            for p, v in zip(params, st["main"]):
                p.copy_(v)
        inner.load_state_dict(st["optimizer"])
