"""The training step of both ZEDA stages on the Megatron model: `Learner`.

A learner is built from its `learner:` section and the current stage's section
(`learner.config`: the run config's own types, no renaming) plus the OPD sampling temperature.

One `Learner` lives in each rank's process. `train_step(batch)` takes this rank's share
of the global batch (plain dict of numpy/torch arrays, see `Batch fields` below) and:
1. cuts it into micro-batches under a token budget (rows x padded length);
2. agrees with the other ranks on the number and shapes of micro-batches (expert
   parallelism makes every forward/backward collective over the EP group, and the
   allgather dispatcher needs equal shapes), padding with rows/columns that carry no
   loss and dummy micro-batches of weight 0;
3. per micro-batch: forward (routing replay when `routed_experts` is given), the stage's
   loss scaled by its share of the global batch, L_GA attached by the routers (weight set
   through Megatron's MoEAuxLossAutoScaler), backward (gradient accumulation);
4. gradient sync (learner.parallel), clipping by the global norm, AdamW with the
   learning rate of the schedule, and metrics.
The `learner:` memory knobs: fp32 with `optimizer: local` keeps torch's AdamW on `param.grad`
(steps 3-4 as above); bf16 or `optimizer: distributed` hand gradients, clipping and the update to
Megatron's DDP and optimiser (learner.optim); `recompute` and `attention` shape the model
(learner.model); `logits_chunk_tokens` fuses the output layer into a chunked logprob (learner.logprob).

Under tensor parallelism (`learner.tp`) the TP ranks of one data-parallel rank are handed the
same share (learner.actor gives it to them; a mismatch is refused), run every micro-batch
together and compute the same loss from vocab-parallel logits (learner.tp_logprob); global
counts and metrics are therefore sums over the data-parallel group, not the world.

Loss definitions (global batch over all DP ranks; a `loss_weight` per token, see
zeda_rl.losses.token_weights):
- SFT:  per-token mean NLL over the response tokens (the official SFT), plus L_GA.
- OPD:  clipped policy loss with A_t = log p_teacher - log p_student(fresh, detached); each
        sample's token mean, then the mean over samples (`loss_agg: sample_mean`, the
        official OPD scripts), or the per-token mean (`token_mean`); plus the same L_GA.
        The ratio exp(logp - logp_old) is taken against the policy before this update
        (`ratio: recomputed`, official). A step is one optimiser update on its batch, so
        that policy is the very weights of this forward (replayed experts included), and
        logp_old, recomputed without grad, is logp.detach(): no second forward is needed,
        the ratio is 1 and the clip never acts, whatever precision the engine sampled in.
        (A learner that took several updates per batch would have to compute logp_old once,
        before the first.) `ratio: behaviour` takes it against the engine's logprobs.
        Stale samples may get a truncated importance weight min(exp(logp_old -
        logp_behaviour), tis_cap) on their loss (`tis_cap`; off by default, as officially);
        otherwise the behaviour logprobs only feed the staleness statistics
        (behaviour_ratio_mean, behaviour_clip_frac).
- L_GA: mean over micro-batches of the sum over MoE layers (`aux_reduce="mean"` averages
        over layers instead, as Megatron sums); counts from a fresh top-K, no correction bias.

Batch fields, all [B, S] unless said (column t describes token t, predicted from t-1;
column 0 is never trained): `tokens` int, `loss_mask` 0/1, optional `attention_mask`
(1 = real token; right padding only), OPD: `behaviour_logprobs`, `teacher_logprobs`;
optional `routed_experts` [L_moe, B, S, K] (-1 = not recorded) for routing replay.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from learner import cpu_shims

cpu_shims.apply()

from learner import bridge, optim, parallel, tp_logprob  # noqa: E402
from learner import logprob as chunked  # noqa: E402
from learner import model as mdl  # noqa: E402
from learner.config import LearnerSection, SFTStage, Stage, learner_part, not_implemented  # noqa: E402
from zeda_rl.losses import opd_token_loss, token_logprobs, token_weights, topk_reverse_kl  # noqa: E402

# ---- batches --------------------------------------------------------------------------------------


def _tensor(x, dtype=None) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        a = np.ascontiguousarray(x)
        if not a.flags.writeable:  # e.g. arrays Ray hands over zero-copy
            a = a.copy()
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(a)
    return t.to(dtype) if dtype is not None else t


def normalise_batch(batch: dict, stage: str) -> dict[str, torch.Tensor]:
    """Checked torch tensors: tokens (int64), loss_mask/attention_mask (bool), logprobs (fp32), routed ids."""
    if "tokens" not in batch or "loss_mask" not in batch:
        raise ValueError("batch needs 'tokens' and 'loss_mask' ([B, S] each)")
    tokens = _tensor(batch["tokens"], torch.long)
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be [B, S], got {tuple(tokens.shape)}")
    out = {"tokens": tokens, "loss_mask": _tensor(batch["loss_mask"]).bool()}
    am = batch.get("attention_mask")
    out["attention_mask"] = _tensor(am).bool() if am is not None else torch.ones_like(tokens, dtype=torch.bool)
    if stage == "opd":
        for k in ("behaviour_logprobs", "teacher_logprobs"):
            if k not in batch:
                raise ValueError(f"an OPD batch needs {k!r} [B, S]")
            out[k] = _tensor(batch[k], torch.float32)
        if batch.get("teacher_top_ids") is not None:  # opd.objective full_kl
            out["teacher_top_ids"] = _tensor(batch["teacher_top_ids"], torch.long)
            out["teacher_top_logprobs"] = _tensor(batch["teacher_top_logprobs"], torch.float32)
            if out["teacher_top_ids"].shape != out["teacher_top_logprobs"].shape or out["teacher_top_ids"].dim() != 3:
                raise ValueError(
                    f"teacher_top_ids {tuple(out['teacher_top_ids'].shape)} and teacher_top_logprobs "
                    f"{tuple(out['teacher_top_logprobs'].shape)}: expected the same [B, S, k]"
                )
    if batch.get("routed_experts") is not None:
        out["routed_experts"] = _tensor(batch["routed_experts"], torch.long)
    for k, v in out.items():
        shape = v.shape[1:3] if k == "routed_experts" else v.shape[:2] if k.startswith("teacher_top") else v.shape
        if tuple(shape) != tuple(tokens.shape):
            raise ValueError(f"batch field {k!r} has shape {tuple(v.shape)}, expected [B, S] = {tuple(tokens.shape)}")
    out["loss_mask"] = out["loss_mask"] & out["attention_mask"]
    out["loss_mask"][:, 0] = False  # column 0 has no prediction
    return out


def plan_micro_batches(
    lengths: list[list[int]], rank: int, token_budget: int
) -> tuple[list[list[int]], list[tuple[int, int]]]:
    """One micro-batch plan for the whole world, from every rank's row lengths.

    Every rank runs the same sequence of forward shapes (EP collectives need it), so the
    budget must hold for the padded common shape, not per rank: micro-batch i takes the
    next `rows` consecutive rows of every rank, with `rows` the most for which rows x (the
    longest of those rows on any rank) stays within the budget (one row at least). Returns
    this rank's row groups and the common (rows, length) of every micro-batch; a rank that
    runs out early pads the remaining ones.
    """
    pos = [0] * len(lengths)
    groups, common = [], []
    while any(p < len(rows) for p, rows in zip(pos, lengths)):
        take, longest = 0, 0
        while True:
            nxt = [rows[p + take] for p, rows in zip(pos, lengths) if p + take < len(rows)]
            if not nxt:
                break
            m = max(longest, *nxt)
            if take and (take + 1) * m > token_budget:
                break
            take, longest = take + 1, m
        mine = list(range(pos[rank], min(pos[rank] + take, len(lengths[rank]))))
        if mine:
            groups.append(mine)
        common.append((take, max(longest, 1)))
        pos = [p + take for p in pos]
    return groups, common


def world_lengths(batch: dict[str, torch.Tensor]) -> tuple[list[list[int]], int]:
    """Every rank's row lengths (one all-reduce of a world x rows table) and this rank's index."""
    mine = batch["attention_mask"].sum(1).clamp_min(1).tolist()
    if not dist.is_initialized():
        return [mine], 0
    world, rank = dist.get_world_size(), dist.get_rank()
    n = parallel.all_reduce_max([len(mine)])[0]
    table = [0] * (world * n)
    table[rank * n : rank * n + len(mine)] = mine
    table = parallel.all_reduce_max(table)
    return [[x for x in table[r * n : (r + 1) * n] if x > 0] for r in range(world)], rank


def _take(batch: dict[str, torch.Tensor], rows: list[int], b: int, s: int) -> dict[str, torch.Tensor]:
    """Rows of the batch padded/trimmed to [b, s] (padding: token 0, no loss, not attended)."""
    idx = torch.tensor(rows, dtype=torch.long)
    out = {}
    for k, v in batch.items():
        x = v[:, idx] if k == "routed_experts" else v[idx]
        seq_dim = 2 if k == "routed_experts" else 1
        row_dim = 1 if k == "routed_experts" else 0
        cur = x.shape[seq_dim]
        if cur >= s:
            x = x.narrow(seq_dim, 0, s)
        else:
            pad_shape = list(x.shape)
            pad_shape[seq_dim] = s - cur
            fill = -1 if k == "routed_experts" else 0
            x = torch.cat([x, torch.full(pad_shape, fill, dtype=x.dtype)], seq_dim)
        if x.shape[row_dim] < b:
            pad_shape = list(x.shape)
            pad_shape[row_dim] = b - x.shape[row_dim]
            fill = -1 if k == "routed_experts" else 0
            x = torch.cat([x, torch.full(pad_shape, fill, dtype=x.dtype)], row_dim)
        out[k] = x
    return out


def _padding_batch(rows: int, seq: int, stage: str) -> dict[str, torch.Tensor]:
    """Rows of pure padding: they run through the model (collectives match) and carry no loss."""
    out = {
        "tokens": torch.zeros(rows, seq, dtype=torch.long),
        "loss_mask": torch.zeros(rows, seq, dtype=torch.bool),
        "attention_mask": torch.zeros(rows, seq, dtype=torch.bool),
        "loss_weight": torch.zeros(rows, seq),
    }
    if stage == "opd":
        out["behaviour_logprobs"] = torch.zeros(rows, seq)
        out["teacher_logprobs"] = torch.zeros(rows, seq)
    return out


SUM_KEYS = (
    "main",
    "nll",
    "reverse_kl",
    "clip_frac",
    "ratio_sum",
    "beh_ratio_sum",
    "beh_clip",
    "adv_sq",
    "adv_pos",
    "full_kl",
)


def expert_load(ids: torch.Tensor, valid: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Slots routed to each real expert, per MoE layer: [L, N] from ids [L, B, S, K] (zero slots and -1 left out)."""
    keep = valid & (ids >= 0) & (ids < num_experts)
    flat = torch.where(keep, ids, num_experts).flatten(1)  # the dropped ones land in an extra bin
    return torch.stack([torch.bincount(row, minlength=num_experts + 1)[:num_experts] for row in flat]).double()


def load_violation(load: torch.Tensor) -> dict[str, list[float]]:
    """Per layer, how far the real experts' loads [L, N] are from uniform, relative to the uniform load:
    max_e (load_e - mean) / mean and mean_e |load_e - mean| / mean (0: perfectly balanced; a layer that
    routed nothing to real experts reports 0)."""
    mean = load.mean(dim=1, keepdim=True)
    rel = torch.where(mean > 0, (load - mean) / mean.clamp_min(1e-12), torch.zeros_like(load))
    return {"max": rel.max(dim=1).values.tolist(), "mean": rel.abs().mean(dim=1).tolist()}


# ---- the learner --------------------------------------------------------------------------------


class Learner:
    """One rank's model, optimiser and step counter; see the module docstring."""

    def __init__(
        self,
        checkpoint_dir: str | Path,
        config: LearnerSection | None = None,
        stage: Stage | None = None,
        *,
        temperature: float = 1.0,
        seed: int = 0,
        save_dir: str | Path | None = None,
        rank: int = 0,
        world_size: int = 1,
        master_addr: str = "127.0.0.1",
        master_port: int | None = None,
        backend: str | None = None,
    ):
        """`temperature`: the rollouts' sampling temperature (OPD takes the student's logprobs at it, as the
        behaviour and teacher logprobs are); `save_dir`: where `checkpoint_every` checkpoints go."""
        self.config = c = config or LearnerSection()
        refused = not_implemented(c)  # the driver refuses these first; a learner must never run another layout
        if refused:
            raise NotImplementedError("; ".join(refused))
        self.stage = learner_part(stage or SFTStage())
        self.temperature, self.seed, self.save_dir = float(temperature), int(seed), save_dir
        if world_size > 1 and not master_port:  # each rank would pick its own free port and wait forever
            raise ValueError(
                "Learner: world_size > 1 needs the master_port every rank rendezvous on (LearnerGroup passes it)"
            )
        parallel.setup(rank, world_size, c.ep, master_addr, master_port, backend, seed=self.seed, tp_size=c.tp)
        self.rank, self.world_size = rank, world_size
        self.source = Path(checkpoint_dir)
        self.info = mdl.model_info(mdl.load_hf_config(checkpoint_dir))
        if self.info.num_experts % c.ep:
            raise ValueError(f"{self.info.num_experts} experts cannot be split over EP={c.ep} ranks")
        dispatcher = parallel.default_dispatcher() if c.dispatcher == "auto" else c.dispatcher
        self.device = (
            torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        )
        dtype = torch.bfloat16 if c.precision == "bf16" else torch.float32
        self.model = mdl.build_model(
            self.info,
            ep_size=c.ep,
            dispatcher=dispatcher,
            params_dtype=dtype,
            alpha=c.alpha,
            w=c.w,
            recompute=c.recompute,
            attention=c.attention,
            tp_size=c.tp,
        )
        self.model.to(self.device)
        bridge.load_hf(self.model, checkpoint_dir)
        # Megatron's DDP + optimiser for bf16 / sharded / offloaded layouts (learner.optim), else torch AdamW
        self.ddp = None
        if optim.uses_megatron(c):
            self.ddp, self.optimizer = optim.wrap(self.model, c, self.stage.lr_at(0))
        else:
            self.optimizer = self._make_optimizer()
        self.step = 0  # completed optimiser steps
        self.stage_start = 0  # step at which the current stage (and its lr schedule) began
        self.data_cursor: object = None  # opaque JSON-able position of the data stream, saved with the state

    def set_stage(self, stage: Stage, reset_optimizer: bool = True) -> Stage:
        """Switch to the next stage's section (e.g. SFT -> OPD); its schedule starts at 0."""
        self.stage = learner_part(stage)
        self.stage_start = self.step
        if reset_optimizer:
            if self.ddp is not None:  # a second DDP would hook the parameters twice: keep it, clear Adam's state
                optim.reset_state(self.optimizer)
            else:
                self.optimizer = self._make_optimizer()
        return self.stage

    def settings(self) -> dict:
        """What this learner runs with, as plain data (saved with every checkpoint)."""
        return {
            "config": self.config.model_dump(mode="json"),
            "stage": {"name": self.stage.name, **self.stage.model_dump(mode="json")},
            "temperature": self.temperature,
            "seed": self.seed,
        }

    def save(self, path: str | Path) -> Path:
        """Full state, atomically (collective); see learner.checkpoint."""
        from learner import checkpoint

        return checkpoint.save(self, path)

    def load(self, path: str | Path) -> dict:
        """Resume from a learner checkpoint written by `save` (collective); returns its meta."""
        from learner import checkpoint

        return checkpoint.load(self, path)

    def _make_optimizer(self) -> torch.optim.Optimizer:
        c = self.config
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.dim() < 2 or name.endswith(".bias") else decay).append(p)
        groups = [{"params": decay, "weight_decay": c.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=self.stage.lr_at(0), betas=tuple(c.betas), eps=c.eps)

    # -- one step --

    def train_step(self, batch: dict, data_cursor: object = None) -> dict:
        """One optimiser step on this rank's share of the global batch; returns global metrics.

        Collective: every rank of the world calls it once per step (with its own share).
        """
        t0 = time.perf_counter()
        stats = self.accumulate(batch)
        grad_norm, lr = self.update()
        if data_cursor is not None:
            self.data_cursor = data_cursor
        m = self._metrics(stats, grad_norm, lr, time.perf_counter() - t0)
        every = self.config.checkpoint_every
        if every and self.save_dir and self.step % every == 0:
            from learner import checkpoint

            checkpoint.save(self, Path(self.save_dir) / f"step_{self.step:08d}")
            m["checkpoint"] = self.step
        return m

    def accumulate(self, batch: dict) -> dict:
        """Forward/backward of every micro-batch and gradient sync; grads are left in `param.grad`."""
        c, stage = self.config, self.stage.name
        self.model.train()
        b = normalise_batch(batch, stage)
        if c.tp > 1:
            parallel.check_tp_peers_agree(b)
        groups, common = plan_micro_batches(*world_lengths(b), token_budget=c.micro_batch_tokens)
        n_mb = len(common)
        if n_mb == 0:
            raise ValueError("train_step: the global batch has no rows")
        mask = b["loss_mask"]
        local = [float(mask.sum()), float(mask.any(1).sum()), float(len(groups)), float(b["attention_mask"].sum())]
        resp_total, samples_total, real_mb_total, valid_total = parallel.all_reduce_sum(
            local, group=parallel.dp_group()
        )
        resp_total = max(resp_total, 1.0)
        agg = self.stage.loss_agg if stage == "opd" else "token_mean"  # the official SFT is a per-token mean
        b["loss_weight"] = token_weights(mask, agg, n_tokens=resp_total, n_samples=samples_total)
        n_layers = len(self.info.moe_layers)
        aux_layer_div = n_layers if c.aux_reduce == "mean" else 1

        sums = dict.fromkeys(SUM_KEYS, 0.0)
        aux = torch.zeros(n_layers, dtype=torch.float64)
        zero_slots = torch.zeros(n_layers, dtype=torch.float64)
        load = torch.zeros(n_layers, self.info.num_experts, dtype=torch.float64)  # slots per real expert
        routed_slots = 0.0
        if self.ddp is not None:
            self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad(set_to_none=False)
        for i in range(n_mb):
            rows_n, s = common[i]
            real = i < len(groups)
            # a dummy micro-batch (this rank has fewer): same collectives, no loss, no aux
            mb = _take(b, groups[i], rows_n, s) if real else _padding_batch(rows_n, s, stage)
            mb = {k: v.to(self.device) for k, v in mb.items()}
            mdl.set_aux_loss_scale((1.0 / real_mb_total / aux_layer_div) if real else 0.0)
            # the backward stays inside the replay: under full recompute it routes again
            with mdl.replay_routing(self.model, mb.get("routed_experts")):
                full = stage == "opd" and self.stage.objective == "full_kl"
                logp, logp_all = self._logprobs(
                    mb["tokens"], ~mb["attention_mask"], self.temperature if stage == "opd" else 1.0, full=full
                )
                m, wt = mb["loss_mask"][:, 1:], mb["loss_weight"][:, 1:]
                sums["nll"] += float(-logp.detach()[m].sum())
                if stage == "sft":
                    loss = -(logp * wt).sum()
                else:
                    loss = (self._opd_token_loss(logp, logp_all, mb, sums, m, real) * wt).sum()
                if not real:
                    loss = loss * 0.0
                loss.backward()
            sums["main"] += float(loss.detach())
            if real:
                aux += torch.tensor(mdl.last_aux_losses(self.model), dtype=torch.float64)
                ids = mdl.last_routing(self.model, mb["tokens"].shape[0], s).cpu()  # [L, B, S, K]
                valid = mb["attention_mask"].cpu()[None, :, :, None].expand_as(ids)
                zero_slots += ((ids >= self.info.num_experts) & valid).flatten(1).sum(1).double()
                routed_slots += float(valid[0].sum())
                load += expert_load(ids, valid, self.info.num_experts)

        if self.ddp is not None:
            self.ddp.finish_grad_sync()
            optim.sum_tp_partial_grads(self.ddp)
        else:
            parallel.sync_grads(self.model)
        return dict(
            sums=sums,
            aux=aux,
            zero_slots=zero_slots,
            load=load,
            routed_slots=routed_slots,
            n_mb=n_mb,
            real_mb_total=real_mb_total,
            resp_total=resp_total,
            valid_total=valid_total,
            aux_layer_div=aux_layer_div,
        )

    def _logprobs(
        self, tokens: torch.Tensor, padding: torch.Tensor, temperature: float, full: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Training logprobs [B, S-1] (fp32) of the next tokens at `temperature`, and with `full` the whole
        next-token log-softmax [B, S-1, V] (opd.objective full_kl; refused with TP or chunking by the config).

        `logits_chunk_tokens` set: the output layer is fused into a chunked logprob (learner.logprob),
        so neither the micro-batch's logits nor their fp32 log-softmax exist in full.
        """
        chunk = self.config.logits_chunk_tokens
        if full and (chunk or self.config.tp > 1):
            raise NotImplementedError("opd.objective full_kl with learner.logits_chunk_tokens or learner.tp > 1")
        if chunk:
            with chunked.hidden_states(self.model) as out:
                hidden = mdl.forward_logits(self.model, tokens, padding)
            return chunked.token_logprobs(hidden, out["weight"], tokens, chunk, temperature), None
        tp = self.config.tp
        logits = mdl.forward_logits(self.model, tokens, padding, gather=tp == 1)
        if temperature != 1.0:
            logits = logits / temperature
        if tp > 1:  # this rank's vocab-parallel slice: the log-softmax reduces over the TP group
            return tp_logprob.token_logprobs(logits, tokens, self.info.vocab_size), None
        if full:
            logp_all = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            return logp_all.gather(-1, tokens[:, 1:, None]).squeeze(-1), logp_all
        return token_logprobs(logits, tokens), None

    def _opd_token_loss(
        self,
        logp: torch.Tensor,
        logp_all: torch.Tensor | None,
        mb: dict,
        sums: dict,
        m: torch.Tensor,
        real: bool = True,
    ) -> torch.Tensor:
        """OPD per-token loss of one micro-batch (see the module docstring); adds its token sums to `sums`."""
        c = self.stage
        behaviour, teacher = mb["behaviour_logprobs"][:, 1:], mb["teacher_logprobs"][:, 1:]
        old = logp.detach() if c.ratio == "recomputed" else behaviour
        with torch.no_grad():
            beh_ratio = torch.exp(logp - behaviour)  # the engine-vs-learner mismatch: staleness and precision
        is_weight = beh_ratio.clamp(max=c.tis_cap) if c.tis_cap is not None else None
        loss_t, ratio, adv = opd_token_loss(logp, old, teacher, c.clip_eps, is_weight)
        if logp_all is not None and "teacher_top_ids" in mb:
            kl = topk_reverse_kl(logp_all, mb["teacher_top_ids"][:, 1:], mb["teacher_top_logprobs"][:, 1:])
            sums["full_kl"] += float(kl.detach()[m].sum())
            loss_t = kl if is_weight is None else kl * is_weight.detach()
        elif logp_all is not None and real:
            raise ValueError(
                "opd.objective full_kl: the batch carries no teacher_top_ids / teacher_top_logprobs "
                "(the teacher pool sends them when the run's opd.objective is full_kl)"
            )
        sums["reverse_kl"] += float(-adv[m].sum())
        sums["adv_sq"] += float((adv[m] ** 2).sum())
        sums["adv_pos"] += float((adv[m] > 0).sum())
        sums["clip_frac"] += float(((ratio - 1.0).abs() > c.clip_eps)[m].sum())
        sums["ratio_sum"] += float(ratio[m].sum())
        sums["beh_ratio_sum"] += float(beh_ratio[m].sum())
        sums["beh_clip"] += float(((beh_ratio - 1.0).abs() > c.clip_eps)[m].sum())
        return loss_t

    def update(self) -> tuple[float, float]:
        """Clip by the global norm, AdamW step at the schedule's lr; returns (grad norm before clip, lr).

        With Megatron's optimiser the norm, the clip and the master-weight update are its `step()`.
        """
        lr = self.stage.lr_at(self.step - self.stage_start)
        if self.ddp is not None:
            optim.set_schedule(self.optimizer, lr, self.config.weight_decay)
            ok, grad_norm, _ = self.optimizer.step()
            if not ok:
                raise RuntimeError("Megatron's optimizer skipped the update (non-finite gradients)")
            grad_norm = float(grad_norm)
        else:
            for g in self.optimizer.param_groups:
                g["lr"] = lr
            grad_norm = parallel.clip_grads(self.model, self.config.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return grad_norm, lr

    def _metrics(self, st: dict, grad_norm: float, lr: float, dt: float) -> dict:
        sums, aux, zero_slots, routed_slots = st["sums"], st["aux"], st["zero_slots"], st["routed_slots"]
        real_mb_total, resp_total, valid_total = st["real_mb_total"], st["resp_total"], st["valid_total"]
        n_layers = len(self.info.moe_layers)
        keys = SUM_KEYS
        red = parallel.all_reduce_sum(
            [sums[k] for k in keys]
            + [routed_slots]
            + aux.tolist()
            + zero_slots.tolist()
            + st["load"].flatten().tolist(),
            group=parallel.dp_group(),
        )
        tot = dict(zip(keys, red))
        main, slots, red = tot["main"], red[len(keys)], red[len(keys) + 1 :]
        aux_l = [a / max(real_mb_total, 1.0) for a in red[:n_layers]]
        zr = [z / max(slots, 1.0) for z in red[n_layers : 2 * n_layers]]
        vio = load_violation(torch.tensor(red[2 * n_layers :], dtype=torch.float64).reshape(n_layers, -1))
        aux_total = sum(aux_l) / st["aux_layer_div"]
        m = {
            "step": self.step,
            "lr": lr,
            "loss": main + aux_total,
            "aux_loss": aux_total,
            "aux_loss_per_layer": aux_l,
            "zero_ratio": float(sum(zr) / len(zr)) if zr else 0.0,
            "zero_ratio_per_layer": zr,
            "grad_norm": grad_norm,
            "tokens": valid_total,
            "response_tokens": resp_total,
            "tokens_per_s": valid_total / dt if dt > 0 else 0.0,
            "step_time_s": dt,
            "micro_batches": st["n_mb"],
            "nll": tot["nll"] / resp_total,
            # how unevenly the real experts are loaded (0: uniform): L_GA must leave their routing healthy
            "expert_load_max_violation": max(vio["max"], default=0.0),
            "expert_load_max_violation_per_layer": vio["max"],
            "expert_load_mean_violation_per_layer": vio["mean"],
        }
        if self.stage.name == "sft":
            m["sft_loss"] = main
        else:  # per-token means over the response tokens
            m.update(
                policy_loss=main,
                **{
                    k: tot[src] / resp_total
                    for k, src in (
                        ("reverse_kl", "reverse_kl"),
                        ("clip_frac", "clip_frac"),
                        ("ratio_mean", "ratio_sum"),
                        ("behaviour_ratio_mean", "beh_ratio_sum"),
                        ("behaviour_clip_frac", "beh_clip"),
                    )
                },
            )
            # the advantage A_t = log p_T - log p_S (fresh) of the response tokens: its mean is -reverse_kl
            adv_mean = -tot["reverse_kl"] / resp_total
            m.update(
                adv_mean=adv_mean,
                adv_std=max(tot["adv_sq"] / resp_total - adv_mean**2, 0.0) ** 0.5,
                adv_pos_frac=tot["adv_pos"] / resp_total,
            )
            if self.stage.objective == "full_kl":
                m["full_kl"] = tot["full_kl"] / resp_total
        return m

    # -- evaluation helpers --

    @torch.no_grad()
    def logits(self, tokens, attention_mask=None) -> torch.Tensor:
        """Eval-mode logits [B, S, V] (collective over the EP group: every rank must call it)."""
        self.model.eval()
        t = _tensor(tokens, torch.long).to(self.device)
        pad = None if attention_mask is None else ~_tensor(attention_mask).bool().to(self.device)
        return mdl.forward_logits(self.model, t, pad).float().cpu()

    # -- weights out --

    def export_buckets(self, version: int, bucket_bytes: int = 256 << 20, layout: str = "fused", keep: bool = True):
        """WeightUpdate(version, buckets of (HF name, tensor)) gathered from the EP ranks (collective).

        layout "fused": the transformers model's names (what engines apply); "checkpoint": per-expert names.
        keep=False: take part in the gathers only (an empty update, nothing held).
        """
        return bridge.export_buckets(self.model, version, bucket_bytes, layout=layout, keep=keep)

    def export_hf(self, out_dir: str | Path) -> Path | None:
        """The student as an HF checkpoint in the converted format (collective; rank 0 writes)."""
        return bridge.export_hf_checkpoint(self.model, out_dir, self.source)

    def barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    def close(self) -> None:
        parallel.teardown()
