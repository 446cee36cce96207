"""The training step of both ZEDA stages on the Megatron model: `Learner`.

A learner is built from its `learner:` section and the current stage's section
(`learner.config`: the run config's own types, no renaming) plus the OPD sampling temperature.

One `Learner` lives in each rank's process. `train_step(batch)` takes this rank's share
of the global batch (plain dict of numpy/torch arrays, fields in `learner.batch`) and:
1. cuts it into micro-batches under a token budget (rows x padded length) that every rank
   agrees on (`learner.batch.plan_micro_batches`: the EP collectives need equal shapes);
2. per micro-batch: forward (routing replay when `routed_experts` is given), the stage's
   loss (`learner.objective`) scaled by its share of the global batch, L_GA attached by the
   routers (weight set through Megatron's MoEAuxLossAutoScaler), backward (gradient accumulation);
3. gradient sync (learner.parallel), clipping by the global norm, AdamW with the
   learning rate of the schedule, and metrics (`learner.step_metrics`).
L_GA is the mean over micro-batches of the sum over MoE layers (`aux_reduce="mean"` averages
over layers instead, as Megatron sums); counts from a fresh top-K, no correction bias.

The `learner:` memory knobs: fp32 with `optimizer: local` keeps torch's AdamW on `param.grad`
(steps 2-3 as above); bf16 or `optimizer: distributed` hand gradients, clipping and the update to
Megatron's DDP and optimiser (learner.optim); `recompute` and `attention` shape the model
(learner.model); `logits_chunk_tokens` fuses the output layer into a chunked logprob (learner.logprob).

Under tensor parallelism (`learner.tp`) the TP ranks of one data-parallel rank are handed the
same share (learner.actor gives it to them; a mismatch is refused), run every micro-batch
together and compute the same loss from vocab-parallel logits (learner.tp_logprob); global
counts and metrics are therefore sums over the data-parallel group, not the world.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.distributed as dist

from learner import cpu_shims

cpu_shims.apply()

from learner import bridge, hf_export, optim, parallel  # noqa: E402
from learner.batch import as_tensor, normalise_batch, padding_batch, plan_micro_batches, take_rows, world_lengths  # noqa: E402
from learner.config import LearnerSection, SFTStage, Stage, learner_part, not_implemented  # noqa: E402
from learner.megatron_config import load_hf_config, model_info  # noqa: E402
from learner.model import build_model, forward_logits  # noqa: E402
from learner.objective import opd_loss, student_logprobs  # noqa: E402
from learner.router import last_aux_losses, last_routing, replay_routing, set_aux_loss_scale  # noqa: E402
from learner.step_metrics import SUM_KEYS, routing_counts, step_metrics  # noqa: E402
from zeda_rl.losses import token_weights  # noqa: E402


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
        parallel.setup(
            rank, world_size, c.ep, master_addr, master_port, backend, self.seed, c.collective_timeout_s, c.tp
        )
        self.rank, self.world_size = rank, world_size
        self.source = Path(checkpoint_dir)
        self.info = model_info(load_hf_config(checkpoint_dir))
        if self.info.num_experts % c.ep:
            raise ValueError(f"{self.info.num_experts} experts cannot be split over EP={c.ep} ranks")
        dispatcher = parallel.default_dispatcher() if c.dispatcher == "auto" else c.dispatcher
        self.device = (
            torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        )
        dtype = torch.bfloat16 if c.precision == "bf16" else torch.float32
        self.model = build_model(
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
        self.saved_step: int | None = None  # the step whose state was last saved or loaded: on disk as it is now

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
        """Full state, atomically (collective); see learner.checkpoint. A `step_*` save then leaves only the newest
        `learner.keep_checkpoints` of its siblings (global rank 0 deletes, after every rank has written)."""
        from learner import checkpoint

        path = checkpoint.save(self, path)
        self.saved_step = self.step
        if path.name.startswith("step_") and (not dist.is_initialized() or dist.get_rank() == 0):
            checkpoint.prune(path, self.config.keep_checkpoints)
        return path

    def load(self, path: str | Path) -> dict:
        """Resume from a learner checkpoint written by `save` (collective); returns its meta."""
        from learner import checkpoint

        meta = checkpoint.load(self, path)
        self.saved_step = self.step
        return meta

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
        m = self.metrics(stats, grad_norm, lr, time.perf_counter() - t0)
        every = self.config.checkpoint_every
        if every and self.save_dir and self.step % every == 0:
            self.save(Path(self.save_dir) / f"step_{self.step:08d}")
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
            mb = take_rows(b, groups[i], rows_n, s) if real else padding_batch(rows_n, s, stage)
            mb = {k: v.to(self.device) for k, v in mb.items()}
            set_aux_loss_scale((1.0 / real_mb_total / aux_layer_div) if real else 0.0)
            # the backward stays inside the replay: under full recompute it routes again
            with replay_routing(self.model, mb.get("routed_experts")):
                full = stage == "opd" and self.stage.objective == "full_kl"
                temperature = self.temperature if stage == "opd" else 1.0
                logp, logp_all = student_logprobs(
                    self.model, c, mb["tokens"], ~mb["attention_mask"], temperature, full=full
                )
                m, wt = mb["loss_mask"][:, 1:], mb["loss_weight"][:, 1:]
                sums["nll"] += float(-logp.detach()[m].sum())
                if stage == "sft":
                    loss = -(logp * wt).sum()
                else:
                    loss = (opd_loss(self.stage, logp, logp_all, mb, sums, m, real) * wt).sum()
                if not real:
                    loss = loss * 0.0
                loss.backward()
            sums["main"] += float(loss.detach())
            if real:
                aux += torch.tensor(last_aux_losses(self.model), dtype=torch.float64)
                ids = last_routing(self.model, rows_n, s).cpu()
                z, routed, mb_load = routing_counts(ids, mb["attention_mask"].cpu(), self.info.num_experts)
                zero_slots, routed_slots, load = zero_slots + z, routed_slots + routed, load + mb_load

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

    def metrics(self, stats: dict, grad_norm: float, lr: float, dt: float) -> dict:
        """The step's global metrics from `accumulate`'s stats (collective over the data-parallel group)."""
        return step_metrics(stats, self.info, self.stage, self.step, grad_norm, lr, dt)

    @torch.no_grad()
    def logits(self, tokens, attention_mask=None) -> torch.Tensor:
        """Eval-mode logits [B, S, V] (collective over the EP group: every rank must call it)."""
        self.model.eval()
        t = as_tensor(tokens, torch.long).to(self.device)
        pad = None if attention_mask is None else ~as_tensor(attention_mask).bool().to(self.device)
        return forward_logits(self.model, t, pad).float().cpu()

    # -- weights out --

    def export_hf(self, out_dir: str | Path) -> Path | None:
        """The student as an HF checkpoint in the converted format (collective; rank 0 writes)."""
        return hf_export.export_hf_checkpoint(self.model, out_dir, self.source)

    def barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    def close(self) -> None:
        parallel.teardown()
