"""The learner's sections of the run config: `learner:` and the optimisation part of each stage.

`launch.config.RunConfig` composes the run from them (its `sft:` and `opd:` sections add the
driver's data fields to `SFTStage` and `OPDStage`), so a YAML key reaches the learner under its
own name. A `Learner` is built from a `LearnerSection` and the current stage's section; switching
stages hands it the next one. Only pydantic here: the driver imports it without torch.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class Strict(BaseModel):
    """Unknown keys are errors, and a boolean is not a count: YAML's `steps: true` would otherwise pass as 1."""

    model_config = ConfigDict(extra="forbid")

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, v, info):
        field = cls.model_fields.get(info.field_name)
        if isinstance(v, bool) and field is not None and _numeric(field.annotation):
            raise ValueError(f"{info.field_name}: expected a number, got the boolean {v}")
        return v


def _numeric(annotation) -> bool:
    """int or float, alone or with None (the count and rate fields of the config)."""
    args = getattr(annotation, "__args__", None)
    if args:
        return any(a in (int, float) for a in args) and not any(a is bool for a in args)
    return annotation in (int, float)


_Strict = Strict


class LearnerSection(_Strict):
    """What stays fixed for the learner's life: layout, model shape, optimiser, L_GA."""

    ep: int = Field(1, ge=1, description="expert-parallel size")
    dp: int = Field(1, ge=1, description="data-parallel size")
    cpus_per_rank: float = Field(0.5, gt=0)
    gpus_per_rank: float = Field(0, ge=0)
    micro_batch_tokens: int = Field(4096, ge=1, description="max rows x padded length per micro-batch")
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon")
    grad_clip: float = Field(1.0, ge=0, description="global gradient-norm clip (0: off)")
    alpha: float = Field(0.1, ge=0, description="group auxiliary loss (L_GA) weight")
    w: float = Field(2.0, gt=0, description="zero-expert group weight: r* = wN_Z/(N+wN_Z)")
    aux_reduce: Literal["sum", "mean"] = Field("sum", description="L_GA over MoE layers (Megatron sums)")
    dispatcher: Literal["auto", "allgather", "alltoall"] = "auto"
    checkpoint_every: int = Field(0, ge=0, description="steps between learner checkpoints (0: only at phase ends)")
    keep_checkpoints: int = Field(
        2,
        ge=1,
        description="newest learner checkpoints kept under RUN_DIR/learner: each save deletes the older step_* ones "
        "(a Qwen3-30B-A3B checkpoint with its fp32 masters and AdamW state is about 430 GB over 8 ranks)",
    )
    bucket_bytes: int = Field(32 << 20, ge=1024)
    collective_timeout_s: float = Field(
        7200.0,
        gt=0,
        description="how long a learner rank waits in a collective for the others before failing the run. torch's "
        "10-minute default is shorter than a save of 54 GB per rank can differ between ranks on a shared file system, "
        "or rank 0 exporting the 61 GB student while the others wait; a dead rank is caught by Ray first",
    )
    # Memory knobs `zeda plan` (launch.plan) budgets with; the defaults are the CPU learner's layout.
    # Values the learner cannot run yet are refused by `not_implemented`.
    precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="bf16: bf16 weights, fp32 router, fp32 grads, master weights and Adam state"
    )
    tp: int = Field(
        1,
        ge=1,
        description="tensor-parallel size (with sequence parallelism), carved out of the ep x dp ranks: "
        "TP peers are consecutive ranks sharing rows, experts stay whole (expert TP 1)",
    )
    recompute: Literal["none", "selective", "full"] = Field(
        "none", description="activation recompute: none, core attention, every layer"
    )
    optimizer: Literal["local", "distributed", "cpu_offload"] = Field(
        "local",
        description="where master weights and Adam state live: each rank, sharded over data-parallel ranks, host memory",
    )
    attention: Literal["local", "flash"] = Field(
        "local",
        description="core attention: local (materialises S x S scores) or "
        "flash (TransformerEngine's, needs it on a GPU: refused by the learner otherwise)",
    )
    logits_chunk_tokens: int | None = Field(
        None, ge=1, description="tokens per log-softmax chunk (None: the whole micro-batch)"
    )


# knob -> the only value the learner runs (knobs not listed run every value they accept)
_IMPLEMENTED: dict[str, object] = {}


# knob -> (value, why the learner cannot run it)
_UNSUPPORTED = {
    "optimizer": (
        "cpu_offload",
        "megatron-core 0.16.1's HybridDeviceOptimizer cannot take the distributed optimizer's "
        "shard views of fp32 parameters (the fp32 zero-expert routers) and, without CUDA, host parameters; "
        "use optimizer: distributed",
    ),
}


def not_implemented(section: LearnerSection) -> list[str]:
    """The memory knobs set to a value the learner cannot run yet, one message each (empty: all runnable).

    They are typed config fields so that `zeda plan` can budget the settings a large run needs before the
    learner has them; the driver refuses to start a run that sets one, rather than train with another layout.
    """
    out = [
        f"learner.{k}: {getattr(section, k)} is planned but not implemented yet (the learner runs {v})"
        for k, v in _IMPLEMENTED.items()
        if getattr(section, k) != v
    ]
    out += [
        f"learner.{k}: {v} is planned but not runnable: {why}"
        for k, (v, why) in _UNSUPPORTED.items()
        if getattr(section, k) == v
    ]
    if section.tp > 1 and section.logits_chunk_tokens is not None:
        out.append(
            f"learner.logits_chunk_tokens: {section.logits_chunk_tokens} with learner.tp: {section.tp} is not "
            "implemented yet (the chunked logprob is not vocab-parallel; TP already splits the logits by TP): "
            "unset one of them"
        )
    return out


class SFTStage(_Strict):
    """Stage 1's optimisation: per-token NLL (+ L_GA), linear warmup then cosine (or constant)."""

    name: ClassVar[str] = "sft"
    steps: int = Field(50, ge=0)
    lr: float = Field(2e-5, ge=0)
    min_lr: float = Field(0.0, ge=0, description="where the cosine ends")
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_frac: float = Field(0.1, ge=0, lt=1)

    @property
    def warmup(self) -> int:
        return int(round(self.warmup_frac * max(1, self.steps)))

    def lr_at(self, step: int) -> float:
        """Learning rate of update number `step` (0-based) of this stage."""
        if self.warmup and step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        if self.schedule == "constant":
            return self.lr
        progress = min(1.0, (step - self.warmup) / max(1, max(1, self.steps) - self.warmup))
        return self.min_lr + (self.lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


class OPDStage(_Strict):
    """Stage 2's optimisation: the clipped OPD policy loss (+ L_GA) at a constant learning rate."""

    name: ClassVar[str] = "opd"
    steps: int = Field(20, ge=0)
    lr: float = Field(5e-6, ge=0)
    clip_eps: float = Field(0.2, gt=0)
    ratio: Literal["recomputed", "behaviour"] = Field(
        "recomputed",
        description="importance ratio against the learner's own logprobs before its update (official: "
        "1 for one update per rollout, the clip never acts) or the rollout engine's (a bf16 engine then clips fp32 "
        "gradients)",
    )
    tis_cap: float | None = Field(
        None,
        gt=0,
        description="truncated importance weight min(exp(learner - engine "
        "logprob), cap) on each token's loss, for stale samples; null: off (official)",
    )
    loss_agg: Literal["sample_mean", "token_mean"] = Field(
        "sample_mean", description="per-sample token mean averaged over samples (official OPD) or per-token mean"
    )
    objective: Literal["sampled_token", "full_kl"] = Field(
        "sampled_token",
        description="sampled_token (official): clipped policy loss with A_t = log p_T(y_t) - log p_S(y_t) "
        "at the sampled token; full_kl: the reverse KL(p_S || p_T) over the teacher's top-k next tokens at every "
        "student prefix, differentiated directly (GKD-style; exact when teacher_top_k covers the vocabulary)",
    )
    teacher_top_k: int = Field(
        64,
        ge=1,
        description="full_kl: next tokens the teacher sends per position (both "
        "distributions renormalised over them); >= the vocabulary size is the exact KL",
    )

    @model_validator(mode="after")
    def _check(self):
        if self.tis_cap is not None and self.ratio == "behaviour":
            raise ValueError(
                "opd.tis_cap needs opd.ratio: recomputed (with the engine's ratio the weight would "
                "correct for the engine twice)"
            )
        return self

    def lr_at(self, step: int) -> float:
        return self.lr


Stage = SFTStage | OPDStage
STAGES = {s.name: s for s in (SFTStage, OPDStage)}


def learner_part(stage: Stage) -> Stage:
    """The learner's own part of a stage section (launch's sections subclass these with data fields)."""
    base = STAGES[stage.name]
    return stage if type(stage) is base else base.model_validate(stage.model_dump(include=set(base.model_fields)))
