"""The zero-expert router in Megatron: `ZeroExpertRouter`, and routing replay / recording.

`ZeroExpertRouter` is a subclass of Megatron's `TopKRouter`, put in the MoE layer spec
(`learner.layer_specs`). Its gate has N+N_Z rows and keeps Megatron's fp32 gating GEMM; the
choice of slots is `zeda_rl.routing.route` (the same definition the transformers model and
the rollout engines use). Zero slots are then removed before the token dispatcher: the
(probs, routing_map) pair handed to Megatron covers only the N real experts, so a zero slot
is dispatched nowhere and costs nothing, and a token uses 0..K real experts.

The group auxiliary loss (`zeda_rl.losses.group_aux_loss`, counts from a fresh top-K of the
probabilities: neither the correction bias nor replayed ids) is attached to the router output
with Megatron's `MoEAuxLossAutoScaler`, as Megatron attaches its own aux losses;
`set_aux_loss_scale` therefore sets its weight in the backward pass.

Under tensor parallelism with sequence parallelism each TP rank holds a contiguous 1/TP of the
sequence, so a router sees only its shard's tokens: it takes its rows of replayed ids,
all-gathers the ids it chose (records and metrics are of the whole sequence), and L_GA sums its
statistics over the TP group (counts without gradient, the probability sums with an all-reduce
whose backward is the identity), so every TP rank attaches the loss of the whole micro-batch
and its gradient reaches each token's router row once.

Token order inside Megatron is [S, B] (sequence first); `replay_routing`, `record_routing` and
`last_routing` take and give ids batch-first, [B, S, L_moe, K], like the rest of zeda_rl
(`to_megatron_order` / `from_megatron_order` are the one transpose).
"""

from __future__ import annotations

import functools
from contextlib import contextmanager

import torch

from learner import cpu_shims

cpu_shims.apply()

from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region  # noqa: E402
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler  # noqa: E402
from megatron.core.transformer.moe.router import TopKRouter  # noqa: E402
from megatron.core.utils import get_pg_rank, get_pg_size  # noqa: E402

from zeda_rl.losses import group_aux_loss  # noqa: E402
from zeda_rl.routing import RouterSpec, route  # noqa: E402


def _in_backward() -> bool:
    """True while autograd runs a backward: under full recompute the router's forward then runs a second time."""
    return torch._C._current_graph_task_id() != -1


class ZeroExpertRouter(TopKRouter):
    """TopKRouter over N+N_Z slots whose zero slots never reach the dispatcher.

    Forward: Megatron's fp32 gating GEMM -> `zeda_rl.routing.route` (optionally with
    replayed ids) -> L_GA attached with MoEAuxLossAutoScaler -> (probs, routing_map) over
    the N real experts only. The last chosen ids (all K slots, zero ones included) and
    the last L_GA value are kept for metrics. Under full recompute the forward runs twice
    (without grad, then again inside the backward): ids are recorded in the first pass only,
    L_GA exists only in the second (the graph the backward uses), so neither is counted twice.
    """

    def __init__(self, config, pg_collection=None, *, spec: RouterSpec, alpha: float = 0.1, w: float = 2.0):
        super().__init__(config=config, pg_collection=pg_collection)
        if spec.num_experts != config.num_moe_experts or spec.top_k != config.moe_router_topk:
            raise ValueError(
                f"router spec {spec} does not match Megatron's {config.num_moe_experts} experts / top-{config.moe_router_topk}"
            )
        self.spec = spec
        self.alpha, self.w = float(alpha), float(w)
        # N+N_Z gate rows, always fp32 (the router runs in fp32 whatever the model dtype).
        self.weight = torch.nn.Parameter(torch.empty(spec.total, config.hidden_size, dtype=torch.float32))
        if config.perform_initialization:
            config.init_method(self.weight)
        # it sees a sequence shard under sequence parallelism: its grad is summed over TP (learner.parallel)
        setattr(self.weight, "sequence_parallel", bool(config.sequence_parallel))
        if spec.family == "sigmoid":
            # Fixed during adaptation (bias update rate 0), so a buffer, as in the HF model.
            self.register_buffer("e_score_correction_bias", torch.zeros(spec.total, dtype=torch.float32))
        else:
            self.e_score_correction_bias = None
        self.replay_ids: torch.Tensor | None = None  # [S*B, K] for the next forward (Megatron token order)
        self.record: list[torch.Tensor] | None = None
        self.last_ids: torch.Tensor | None = None
        self.last_aux_loss: torch.Tensor | None = None

    def _maintain_float32_expert_bias(self):
        if self.e_score_correction_bias is not None and self.e_score_correction_bias.dtype != torch.float32:
            self.e_score_correction_bias.data = self.e_score_correction_bias.data.float()

    def _sp_size(self) -> int:
        """TP ranks sharing this router's sequence (1 without sequence parallelism)."""
        return get_pg_size(self.tp_group) if self.config.sequence_parallel else 1

    def _local_replay(self, replay: torch.Tensor, rows: int) -> torch.Tensor:
        """This rank's rows of the whole sequence's replayed ids ([S*B, K], Megatron order).

        Ids for the sequence padding `forward_logits` added (rows past the end) are -1: the router chooses.
        """
        sp = self._sp_size()
        full = rows * sp
        if replay.shape[0] > full or (sp == 1 and replay.shape[0] != full):
            raise ValueError(f"routing replay: {replay.shape[0]} rows of ids for {full} tokens")
        if replay.shape[0] < full:
            replay = torch.cat([replay, replay.new_full((full - replay.shape[0], replay.shape[1]), -1)])
        return replay.narrow(0, get_pg_rank(self.tp_group) * rows, rows) if sp > 1 else replay

    def forward(self, input: torch.Tensor, padding_mask: torch.Tensor | None = None):
        self._maintain_float32_expert_bias()
        logits = self.gating(input)  # Megatron's gating GEMM in fp32 (moe_router_dtype="fp32")
        logits = logits.reshape(-1, self.spec.total)
        replay = self.replay_ids
        if replay is not None:
            replay = self._local_replay(replay.to(logits.device), logits.shape[0])
            # a row with any id < 0 was not recorded (padding, the last sampled token): the router chooses
            replay = torch.where((replay < 0).any(-1, keepdim=True), torch.full_like(replay, -1), replay)
        r = route(logits, self.spec, self.e_score_correction_bias, replay)
        n = self.spec.num_experts
        ids = r.ids
        sp = self._sp_size()
        if not _in_backward():  # a recompute pass repeats the ids of its forward: record them once
            if sp > 1:  # records and metrics are of the whole sequence, in Megatron order
                gathered = ids.new_empty((ids.shape[0] * sp, ids.shape[1]))
                torch.distributed.all_gather_into_tensor(gathered, ids.detach().contiguous(), group=self.tp_group)
                self.last_ids = gathered
            else:
                self.last_ids = ids.detach()
            if self.record is not None:
                self.record.append(self.last_ids)

        # Drop zero slots: they map to an extra column N that is cut off, so they dispatch nowhere.
        real = ids < n
        col = ids.masked_fill(~real, n)
        rows = logits.shape[0]
        routing_map = torch.zeros(rows, n + 1, dtype=torch.bool, device=logits.device).scatter(1, col, True)[:, :n]
        probs = torch.zeros(rows, n + 1, dtype=r.weights.dtype, device=logits.device)
        probs = probs.scatter(1, col, r.weights.masked_fill(~real, 0.0))[:, :n]

        # Under full recompute the first forward runs without grad and the recompute pass (in the backward)
        # with it, so L_GA is attached, and kept for metrics, exactly once: in the pass whose graph is used.
        if not _in_backward():
            self.last_aux_loss = None
        if self.training and torch.is_grad_enabled() and self.spec.num_zero > 0 and self.alpha > 0:
            token_mask = None if padding_mask is None else ~padding_mask.reshape(-1)
            reduce = None
            if sp > 1:  # the statistics of the whole micro-batch, every TP rank seeing its shard
                reduce = functools.partial(reduce_from_tensor_model_parallel_region, group=self.tp_group)
            aux = group_aux_loss(
                r.probs,
                n,
                self.spec.num_zero,
                self.spec.top_k,
                alpha=self.alpha,
                w=self.w,
                token_mask=token_mask,
                reduce=reduce,
            )
            self.last_aux_loss = aux.detach()
            probs = MoEAuxLossAutoScaler.apply(probs, aux)
        return probs.contiguous(), routing_map.contiguous()


# ---- replay, records and metrics over a whole model -------------------------------------------


def routers(model: torch.nn.Module) -> list[ZeroExpertRouter]:
    """The zero-expert routers in layer order (one per MoE layer)."""
    return [m for m in model.modules() if isinstance(m, ZeroExpertRouter)]


def to_megatron_order(ids: torch.Tensor) -> torch.Tensor:
    """Batch-first ids [B, S, L, K] -> per layer in Megatron's token order, [L, S*B, K].

    Everything outside the routers holds expert ids row-first, as every other per-token field
    (engines' samples [P+O, L, K], batches [B, S, L, K]); this and `from_megatron_order` are
    the one place their layout changes, for Megatron's sequence-first tokens.
    """
    b, s, n_layers, k = ids.shape
    return ids.permute(2, 1, 0, 3).reshape(n_layers, s * b, k)


def from_megatron_order(per_layer: list[torch.Tensor], b: int, s: int) -> torch.Tensor:
    """Each layer's ids in Megatron's token order ([S*B, K]; rows past S*B are the sequence padding
    `forward_logits` adds under TP) -> batch-first [B, S, L, K]."""
    return torch.stack([ids[: s * b].reshape(s, b, -1) for ids in per_layer], 2).transpose(0, 1)


@contextmanager
def replay_routing(model: torch.nn.Module, ids: torch.Tensor | None):
    """Force slot ids [B, S, L_moe, K] (rows of -1: let the router choose) for forwards inside.

    Under full recompute the backward runs the routers again: keep the backward inside too, so
    the recompute pass routes with the same ids.
    """
    rs = routers(model)
    if ids is None:
        yield
        return
    ids = torch.as_tensor(ids)
    if ids.dim() != 4 or ids.shape[2] != len(rs):
        raise ValueError(f"routing replay: ids of shape {list(ids.shape)}, expected [B, S, {len(rs)} MoE layers, K]")
    for r, layer_ids in zip(rs, to_megatron_order(ids.long())):
        r.replay_ids = layer_ids
    try:
        yield
    finally:
        for r in rs:
            r.replay_ids = None


@contextmanager
def record_routing(model: torch.nn.Module, batch: int, seq: int):
    """Record chosen slot ids; `ids()` gives [B, S, L_moe, K] of the (single) forward inside."""
    rs = routers(model)
    for r in rs:
        r.record = []

    def ids() -> torch.Tensor:
        return from_megatron_order([torch.cat(r.record) for r in rs], batch, seq)

    try:
        yield ids
    finally:
        for r in rs:
            r.record = None


def last_routing(model: torch.nn.Module, batch: int, seq: int) -> torch.Tensor:
    """Slot ids [B, S, L_moe, K] chosen in the last forward."""
    return from_megatron_order([r.last_ids for r in routers(model)], batch, seq)


def last_aux_losses(model: torch.nn.Module) -> list[float]:
    """L_GA per MoE layer of the last training forward (0.0 where none was computed)."""
    return [float(r.last_aux_loss) if r.last_aux_loss is not None else 0.0 for r in routers(model)]


def set_aux_loss_scale(scale: float) -> None:
    """Weight of the attached L_GA in the next backward passes (Megatron's aux-loss mechanism)."""
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(float(scale)))
