"""One typed config describes a run; a YAML file is a serialized `RunConfig`.

Each component owns its section: the learner `learner:` and the optimisation part of `sft:` and
`opd:` (`learner.config`), the engines `sampling:` (`actors.engine.SamplingParams`, the one sampling
type from the YAML to the engines, the teacher and the learner); this module composes them.

Unknown keys are errors (a typo must not silently fall back to a default), and every
validation error names the key path and what was expected.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from actors.engine import SamplingParams
from learner.config import LearnerSection, OPDStage, SFTStage


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSection(_Strict):
    teacher: str = Field("embedded", description="HF checkpoint dir of the static teacher, or 'embedded'")
    zero_experts: int | None = Field(None, ge=1, description="N_Z per MoE layer; default N/2 (ZEDA)")
    zero_type: Literal["zero", "copy"] = "zero"
    convert_seed: int = 0


class EngineSection(_Strict):
    backend: Literal["torch", "sglang"] = "torch"
    replicas: int = Field(1, ge=1)
    cpus: float = Field(0.5, gt=0)
    gpus: float = Field(0, ge=0)
    threads: int = Field(1, ge=1)
    dtype: Literal["float32", "bfloat16"] = "float32"
    engine_kwargs: dict = Field(default_factory=dict)


class SFTSection(SFTStage):
    """The learner's SFT stage (steps, lr, schedule, warmup_frac) plus what the driver feeds it."""

    batch_size: int = Field(32, ge=1)
    prompts: int | None = Field(2000, ge=1, description="training prompts the teacher answers (None: every prompt of data.sft_prompts once)")
    teacher_temperature: float = Field(0.0, ge=0)


class OPDSection(OPDStage):
    """The learner's OPD stage (steps, lr, clip_eps, ratio, tis_cap, loss_agg) plus the rollout loop's settings."""

    prompts_per_step: int = Field(16, ge=1)
    samples_per_prompt: int = Field(2, ge=1)
    sync_every: int = Field(1, ge=1, description="learner steps between weight pushes")
    max_staleness: int = Field(1, ge=0, description="max policy versions a sample may lag")
    asynchronous: bool = True
    routing_replay: bool = True
    rollout_batch: int = Field(8, ge=1, description="prompts per generation call")


class FieldsSection(_Strict):
    """Keys of a data row (post-training sets name them differently)."""

    prompt: str = "prompt"
    messages: str = "messages"
    response: str = "response"
    id: str = "id"


class DataSection(_Strict):
    sft_prompts: str = Field("embedded", description="'embedded' (the built-in tasks) or a .jsonl/.parquet file, shard dir or saved dataset: the prompts the teacher answers for SFT")
    sft_rollouts: str | None = Field(None, description="file/dir of teacher answers (prompt/response or messages ending with the assistant turn): SFT trains on them, no generation")
    opd_prompts: str = Field("embedded", description="'embedded' or a file/dir: the OPD prompts")
    fields: FieldsSection = Field(default_factory=FieldsSection)
    enable_thinking: bool = Field(True, description="passed to the chat template (ZEDA ran with thinking on)")
    max_prompt_tokens: int = Field(1024, ge=1, description="longer prompts are dropped and counted, never cut")
    max_response_tokens: int = Field(32768, ge=1, description="longer SFT answers are dropped and counted, never cut")


class EvalSection(_Strict):
    n_per_family: int = Field(100, ge=1)
    suite: str | None = Field(None, description="benchmark suite to evaluate on (zeda_rl.suites); None: the built-in tasks, "
                              "run only when the tokenizer is the embedded one")


class ClusterSection(_Strict):
    address: str | None = Field(None, description="Ray address; None starts a local Ray")
    num_cpus: int | None = None
    bind_host: str = Field("127.0.0.1", description="host the learner's ZMQ inbox binds to; 'auto': this node's cluster address")
    inbox_port: int = Field(0, ge=0, le=65535, description="port of the learner's ZMQ inbox (0: any free port)")


class RunConfig(_Strict):
    name: str = "tiny-cpu"
    seed: int = 0
    output_dir: str = "runs"
    model: ModelSection = Field(default_factory=ModelSection)
    rollout: EngineSection = Field(default_factory=EngineSection)
    teacher: EngineSection = Field(default_factory=EngineSection)
    sampling: SamplingParams = Field(default_factory=SamplingParams, description="OPD sampling (the teacher and "
                                     "learner score at its temperature); stop ids and seeds are set per call")
    learner: LearnerSection = Field(default_factory=LearnerSection)
    sft: SFTSection = Field(default_factory=SFTSection)
    opd: OPDSection = Field(default_factory=OPDSection)
    data: DataSection = Field(default_factory=DataSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    cluster: ClusterSection = Field(default_factory=ClusterSection)

    @model_validator(mode="after")
    def _check(self):
        if self.model.teacher != "embedded" and not self.model.teacher:
            raise ValueError("model.teacher: expected 'embedded' or a checkpoint directory")
        if self.opd.rollout_batch > self.opd.prompts_per_step:
            raise ValueError(
                f"opd.rollout_batch ({self.opd.rollout_batch}) must be <= opd.prompts_per_step ({self.opd.prompts_per_step}): "
                "admission control could never start a generation call"
            )
        if self.sft.prompts is None and self.data.sft_prompts == "embedded" and not self.data.sft_rollouts:
            raise ValueError("sft.prompts: a number is needed with data.sft_prompts: embedded (the built-in tasks are generated)")
        if self.eval.suite is not None and not Path(self.eval.suite).is_file():
            raise ValueError(f"eval.suite ({self.eval.suite!r}): no such suite file (a YAML naming benchmark files and graders, "
                             "e.g. launch/suites/paper.yaml)")
        if self.sampling.temperature <= 0:
            raise ValueError(f"sampling.temperature ({self.sampling.temperature}) must be > 0: the teacher and the "
                             "learner score the rollouts at it")
        if self.sampling.max_new_tokens > self.data.max_response_tokens:
            raise ValueError(
                f"sampling.max_new_tokens ({self.sampling.max_new_tokens}) must be <= data.max_response_tokens "
                f"({self.data.max_response_tokens}): rollouts longer than the response cap could not be trained on"
            )
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


class ConfigError(ValueError):
    pass


def load_config(path: str | Path, overrides: dict | None = None) -> RunConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        lines = [f"{path}: invalid config"]
        for e in err.errors():
            key = ".".join(str(p) for p in e["loc"]) or "<top>"
            got = f" (got {e['input']!r})" if "input" in e and not isinstance(e["input"], dict) else ""
            lines.append(f"  {key}: {e['msg']}{got}")
        raise ConfigError("\n".join(lines)) from None
