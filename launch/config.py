"""One typed config describes a run; a YAML file is a serialized `RunConfig`.

Each component owns its section: the learner `learner:` and the optimisation part of `sft:` and
`opd:` (`learner.config`), the engines `sampling:` (`zeda_rl.sampling.SamplingParams`, the one sampling
type from the YAML to the engines, the teacher and the learner); this module composes them.

Unknown keys are errors (a typo must not silently fall back to a default), and every
validation error names the key path and what was expected.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from learner.config import LearnerSection, OPDStage, SFTStage, Strict
from zeda_rl.sampling import SamplingParams

_Strict = Strict  # one rule for every section: unknown keys and booleans given as numbers are refused


class ModelSection(_Strict):
    teacher: str = Field("embedded", description="HF checkpoint dir of the static teacher, or 'embedded'")
    zero_experts: int | None = Field(None, ge=1, description="N_Z per MoE layer; default N/2 (ZEDA)")
    zero_type: Literal["zero", "copy"] = "zero"
    convert_seed: int = 0
    student: str | None = Field(
        None,
        description="start the student from this zero-expert checkpoint (e.g. a run's "
        "probe/step_00000, the student after SFT) instead of converting the teacher: OPD "
        "studies from one SFT student set sft.steps: 0",
    )
    teacher_seed: int = Field(
        0,
        ge=0,
        description="seed of the embedded teacher's build ('embedded' only). A key of its "
        "own: the run's `seed` varies the student's training (data order, sampling) with one teacher",
    )
    embedded_teacher: str | None = Field(
        None,
        description="which embedded teacher ('embedded' only): a name of zeda_rl.teacher.TEACHERS that learns "
        "data.tasks (e.g. 'hard-lean'); default the one named after data.tasks",
    )


class EngineSection(_Strict):
    backend: Literal["torch", "sglang"] = "torch"
    replicas: int = Field(1, ge=1)
    cpus: float = Field(0.5, gt=0)
    gpus: float = Field(0, ge=0)
    threads: int = Field(1, ge=1)
    dtype: Literal["float32", "bfloat16"] = "float32"
    engine_kwargs: dict = Field(default_factory=dict)


def _positive_lr(v: float) -> float:
    if v <= 0:
        raise ValueError(f"expected a learning rate > 0, got {v} (a stage that should not train takes steps: 0)")
    return v


class SFTSection(SFTStage):
    """The learner's SFT stage (steps, lr, schedule, warmup_frac) plus what the driver feeds it."""

    batch_size: int = Field(32, ge=1)
    prompts: int | None = Field(
        2000, ge=1, description="training prompts the teacher answers (None: every prompt of data.sft_prompts once)"
    )
    teacher_temperature: float = Field(0.0, ge=0)
    rollout_chunk: int = Field(
        64,
        ge=1,
        description=(
            "teacher rollouts: prompts per engine call and per shard. An SGLang call returns when its longest answer "
            "ends, so at 32k-token answers a call of 64 leaves the engine near idle for much of its tail; bigger "
            "chunks keep its batch full longer, at the cost of more answers redone when a job is killed"
        ),
    )

    @field_validator("lr")
    @classmethod
    def _lr(cls, v: float) -> float:
        return _positive_lr(v)

    @model_validator(mode="after")
    def _min_lr(self):
        if self.min_lr > self.lr:
            raise ValueError(f"sft.min_lr ({self.min_lr}) must be <= sft.lr ({self.lr}): the cosine would climb")
        return self


class OPDSection(OPDStage):
    """The learner's OPD stage (steps, lr, clip_eps, ratio, tis_cap, loss_agg) plus the rollout loop's settings."""

    prompts_per_step: int = Field(16, ge=1)
    samples_per_prompt: int = Field(2, ge=1)
    sync_every: int = Field(1, ge=1, description="learner steps between weight pushes")
    max_staleness: int = Field(1, ge=0, description="max policy versions a sample may lag")
    asynchronous: bool = True
    routing_replay: bool = True
    rollout_batch: int = Field(8, ge=1, description="prompts per generation call")
    weight_sync: Literal["ray", "nccl"] = Field(
        "ray",
        description="how weight pushes reach the engines: Ray's object "
        "store, or a broadcast group per learner rank (nccl on GPU, gloo on CPU; "
        "SGLang engines)",
    )
    weight_sync_timeout_s: float = Field(
        1800.0,
        gt=0,
        description="how long a weight push (a broadcast group's collectives included) and a generation call waiting "
        "for a pushed version may take: an engine applies a push after the generation it is running, and a call of "
        "16 answers of 32k tokens takes minutes",
    )
    call_timeout_s: float = Field(
        7200.0,
        gt=0,
        description="how long one generation-and-scoring call may run before its engine counts as wedged (alive, never "
        "answering): the call is given up, its samples dropped (`timeout`), and the engine that holds it killed, "
        "so Ray restarts it and it gets the weights again. Above weight_sync_timeout_s (a call may wait that long "
        "for a version) plus the longest generation",
    )
    teacher_temperature: float = Field(
        1.0,
        description="temperature the teacher scores the samples at: 1.0 only (SGLang "
        "computes input-token logprobs at temperature 1 whatever a request says)",
    )
    teacher_selftest_repeats: int = Field(
        3, ge=0, description="times each teacher engine scores the same sequences before OPD starts (0: no self-test)"
    )
    teacher_selftest_tol: float = Field(
        1e-2,
        ge=0,
        description="max |logprob difference| (nats) the self-test allows "
        "between repeats and engines before it refuses to train",
    )
    probe_every: int = Field(
        0,
        ge=0,
        description="OPD steps between held-out probes of the student (built-in tasks "
        "only; 0: off): greedy and T=1 accuracy, held-out reverse KL, zero share (launch/probe.py)",
    )
    probe_per_family: int = Field(200, ge=1, description="held-out prompts per family of each probe")

    @field_validator("teacher_temperature")
    @classmethod
    def _teacher_t(cls, v: float) -> float:
        if v != 1.0:
            raise ValueError(
                f"opd.teacher_temperature ({v}): the teacher scores at 1.0 only. SGLang computes input-token "
                "logprobs at temperature 1 whatever the request says, so any other value would be silently ignored "
                "on GPU and obeyed on CPU"
            )
        return v

    @field_validator("lr")
    @classmethod
    def _lr(cls, v: float) -> float:
        return _positive_lr(v)


class FieldsSection(_Strict):
    """Keys of a data row (post-training sets name them differently)."""

    prompt: str = "prompt"
    messages: str = "messages"
    response: str = "response"
    id: str = "id"


class DataSection(_Strict):
    sft_prompts: str = Field(
        "embedded",
        description="'embedded' (the built-in tasks) or a .jsonl/.parquet file, shard dir or saved dataset: the prompts the teacher answers for SFT",
    )
    sft_rollouts: str | None = Field(
        None,
        description="file/dir of teacher answers (prompt/response or messages ending with the assistant turn): SFT trains on them, no generation",
    )
    opd_prompts: str = Field("embedded", description="'embedded' or a file/dir: the OPD prompts")
    tasks: Literal["basic", "hard"] = Field(
        "basic",
        description="the built-in task suite (zeda_rl.tasks.SUITES) behind "
        "every 'embedded': the embedded teacher's, the embedded prompts' and the built-in eval's",
    )
    fields: FieldsSection = Field(default_factory=FieldsSection)
    enable_thinking: bool = Field(True, description="passed to the chat template (ZEDA ran with thinking on)")
    max_prompt_tokens: int = Field(1024, ge=1, description="longer prompts are dropped and counted, never cut")
    max_response_tokens: int = Field(32768, ge=1, description="longer SFT answers are dropped and counted, never cut")


class EvalSection(_Strict):
    n_per_family: int = Field(100, ge=1)
    suite: str | None = Field(
        None,
        description="benchmark suite to evaluate on (zeda_rl.suites); None: the built-in tasks, "
        "run only when the tokenizer is the embedded one",
    )


ALL_INTERFACES = ("0.0.0.0", "*")


class ClusterSection(_Strict):
    address: str | None = Field(None, description="Ray address; None starts a local Ray")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of the local Ray (None: this machine's)")
    bind_host: str = Field(
        "127.0.0.1",
        description="IPv4 address of this machine the learner's ZMQ inbox binds to, and its rendezvous when every "
        "learner rank shares a node; 'auto': the learner node's address (127.0.0.1 for a local run's private Ray); "
        "0.0.0.0 only with allow_all_interfaces",
    )
    inbox_port: int = Field(0, ge=0, le=65535, description="port of the learner's ZMQ inbox (0: any free port)")
    allow_all_interfaces: bool = Field(
        False,
        description="let bind_host be 0.0.0.0: the inbox then listens on every "
        "network, public ones included (it has no authentication)",
    )

    @field_validator("bind_host")
    @classmethod
    def _host(cls, v: str) -> str:
        if v in ("auto", "localhost", *ALL_INTERFACES):
            return v
        try:
            ipaddress.IPv4Address(v)
        except ValueError:
            raise ValueError(
                "expected 'auto', 'localhost' or an IPv4 address of this machine (the inbox binds tcp://HOST:PORT)"
            ) from None
        return v

    @model_validator(mode="after")
    def _all_interfaces(self):
        if self.bind_host in ALL_INTERFACES and not self.allow_all_interfaces:
            raise ValueError(
                f"cluster.bind_host: {self.bind_host} listens on every interface, public ones included; "
                "set cluster.allow_all_interfaces: true to mean it, or use 'auto' (the node's cluster address)"
            )
        return self


class RunConfig(_Strict):
    name: str = Field(
        "tiny-cpu",
        description="the run's directory under output_dir and its metrics hub's name: one plain path component",
    )
    seed: int = 0
    output_dir: str = "runs"
    model: ModelSection = Field(default_factory=ModelSection)
    rollout: EngineSection = Field(default_factory=EngineSection)
    teacher: EngineSection = Field(default_factory=EngineSection)
    sampling: SamplingParams = Field(
        default_factory=SamplingParams,
        description="OPD sampling (the teacher and "
        "learner score at its temperature); stop ids and seeds are set per call",
    )
    learner: LearnerSection = Field(default_factory=LearnerSection)
    sft: SFTSection = Field(default_factory=SFTSection)
    opd: OPDSection = Field(default_factory=OPDSection)
    data: DataSection = Field(default_factory=DataSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    cluster: ClusterSection = Field(default_factory=ClusterSection)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not v or v in (".", "..") or not all(c.isalnum() or c in "._-+" for c in v) or v.startswith("-"):
            raise ValueError(
                "expected one plain path component (letters, digits, '.', '_', '-', '+'; not '.' or '..' "
                "and no '/'): the run writes under output_dir/name"
            )
        return v

    @model_validator(mode="after")
    def _check(self):
        world, tp = self.learner.ep * self.learner.dp, self.learner.tp
        if world % tp:
            raise ValueError(
                f"learner.tp ({tp}) must divide the learner ranks, learner.ep x learner.dp = "
                f"{self.learner.ep} x {self.learner.dp} = {world}: tensor-parallel groups are carved out of them"
            )
        if self.model.teacher != "embedded" and not self.model.teacher:
            raise ValueError("model.teacher: expected 'embedded' or a checkpoint directory")
        if self.model.embedded_teacher is not None:
            from zeda_rl.teacher import teacher_spec

            if self.model.teacher != "embedded":
                raise ValueError(
                    f"model.embedded_teacher ({self.model.embedded_teacher!r}) names an embedded teacher, but "
                    f"model.teacher is {self.model.teacher!r}: set model.teacher: embedded or drop the key"
                )
            try:
                teacher_spec(self.data.tasks, self.model.embedded_teacher)
            except ValueError as err:
                raise ValueError(f"model.embedded_teacher: {err}") from None
        if self.opd.rollout_batch > self.opd.prompts_per_step:
            raise ValueError(
                f"opd.rollout_batch ({self.opd.rollout_batch}) must be <= opd.prompts_per_step ({self.opd.prompts_per_step}): "
                "admission control could never start a generation call"
            )
        if self.sft.prompts is None and self.data.sft_prompts == "embedded" and not self.data.sft_rollouts:
            raise ValueError(
                "sft.prompts: a number is needed with data.sft_prompts: embedded (the built-in tasks are generated)"
            )
        if self.eval.suite is not None and not Path(self.eval.suite).is_file():
            raise ValueError(
                f"eval.suite ({self.eval.suite!r}): no such suite file (a YAML naming benchmark files and graders, "
                "e.g. launch/suites/paper.yaml)"
            )
        if self.opd.objective == "full_kl" and (self.learner.tp > 1 or self.learner.logits_chunk_tokens is not None):
            raise ValueError(
                "opd.objective: full_kl needs the whole micro-batch's logits on one rank: it is not implemented "
                "with learner.tp > 1 or learner.logits_chunk_tokens yet (use opd.objective: sampled_token)"
            )
        if self.model.student is not None and not (Path(self.model.student) / "config.json").is_file():
            raise ValueError(
                f"model.student ({self.model.student}): no config.json there (expected a zero-expert checkpoint "
                "directory, e.g. RUN_DIR/probe/step_00000, or null to convert the teacher)"
            )
        if self.opd.probe_every and self.data.opd_prompts != "embedded":
            raise ValueError(
                "opd.probe_every: the probe grades the built-in tasks (data.opd_prompts: embedded); for other "
                "data set it to 0 and use eval.suite"
            )
        if self.sampling.temperature <= 0:
            raise ValueError(
                f"sampling.temperature ({self.sampling.temperature}) must be > 0: the teacher and the "
                "learner score the rollouts at it"
            )
        if self.learner.attention == "flash" and self.learner.gpus_per_rank <= 0:
            raise ValueError(
                "learner.attention: flash is TransformerEngine's GPU kernel: it needs learner.gpus_per_rank > 0 "
                "(a learner on CPUs runs learner.attention: local)"
            )
        if self.opd.weight_sync == "nccl" and self.rollout.backend != "sglang":
            raise ValueError(
                f"opd.weight_sync: nccl broadcasts into SGLang engines; rollout.backend: {self.rollout.backend} "
                "engines receive pushes through Ray only (use opd.weight_sync: ray)"
            )
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


def _merge(base: dict, over: dict) -> dict:
    """`over` on top of `base`: sections merge key by key, any other value replaces."""
    merged = dict(base)
    for key, value in over.items():
        merged[key] = (
            _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
        )
    return merged


def _read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> tuple[dict, list[str]]:
    """A config file's mapping, with `extends: OTHER.yaml` (relative to the file) resolved, and the files it
    extends, nearest first (error messages name them).

    A variant of a recipe names the file it derives from and the keys it changes, so a change to the
    shared recipe is made once (the lean hard config is the hard config with another teacher)."""
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found" + (f" (extended by {chain[-1]})" if chain else ""))
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    parent = raw.pop("extends", None)
    if parent is None:
        return raw, []
    if not isinstance(parent, str) or not parent:
        raise ConfigError(f"{path}: extends: expected the path of another config file, got {parent!r}")
    base_path = (path.parent / parent).resolve()
    if base_path in chain or base_path == path.resolve():
        loop = " -> ".join(str(p) for p in (*chain, path.resolve(), base_path))
        raise ConfigError(f"{path}: extends: {parent} makes a loop ({loop})")
    base, bases = _read_yaml(base_path, (*chain, path.resolve()))
    return _merge(base, raw), [str(base_path), *bases]


def load_config(path: str | Path, overrides: dict | None = None) -> RunConfig:
    path = Path(path)
    raw, bases = _read_yaml(path)
    where_from = f"{path}" + (f" (extending {' -> '.join(bases)})" if bases else "")
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, leaf = dotted.split(".")
        for depth, key in enumerate(parents):
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                where = ".".join(parents[: depth + 1])
                raise ConfigError(f"--set {dotted}: {where} is {node!r} in {where_from}, not a section with keys")
        node[leaf] = value
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        lines = [f"{where_from}: invalid config"]
        for e in err.errors():
            key = ".".join(str(p) for p in e["loc"]) or "<top>"
            got = f" (got {e['input']!r})" if "input" in e and not isinstance(e["input"], dict) else ""
            lines.append(f"  {key}: {e['msg']}{got}")
        raise ConfigError("\n".join(lines)) from None


def preflight(cfg: RunConfig, hf_config: dict | None = None, hf_source: str | None = None) -> list[str]:
    """What the config asks of this machine and of the teacher's HF config, one message per problem ([]: none).

    The validators above see only the YAML; these need the file system, the network interfaces, the installed
    packages (`package_problems`) or the teacher's config.json (read, no weights), which tests and `zeda plan`
    elsewhere do not have, so only `zeda train` (before any actor starts) and `zeda doctor` run them. `hf_config` stands in for the
    teacher's (as `zeda plan --hf-config` does); the embedded teacher is built on demand, so its figures
    come from its recipe and no directory is needed.
    """
    problems = _paths(cfg) + _bind_host(cfg) + package_problems(cfg)
    if cfg.eval.suite:  # every benchmark file present and parsed before anything trains
        from zeda_rl.suites import suite_problems

        problems += suite_problems(cfg.eval.suite)
    teacher, source, missing = _teacher_config(cfg)
    problems += missing
    if hf_config is None:
        hf_config, hf_source = teacher, source
    if hf_config is not None:
        problems += _against_teacher(cfg, hf_config, hf_source or "the given HF config")
    return problems


# What `learner.attention: flash` imports in the learner ranks (Megatron's TransformerEngine core attention), and
# how it is installed: the gpu extra's core, then the PyTorch extension against the installed torch (pyproject.toml,
# launch/cluster-h200.yaml; tests/test_gpu_stack.py holds this pin to theirs).
FLASH_MODULE = "transformer_engine.pytorch"
TE_REQUIREMENT = "transformer-engine[core_cu13,pytorch]==2.11.0"
TE_INSTALL = f"pip install -e '.[gpu]' && pip install --no-build-isolation '{TE_REQUIREMENT}'"


def package_problems(cfg: RunConfig) -> list[str]:
    """The packages the config's knobs import where they run, missing from this environment: one message each.

    Checked in the driver's environment, in a fresh interpreter (`import_problem`). That is the learner's own
    where a run is started as documented: a local run's learner is this machine, and a cluster run's driver runs
    on a cluster node (`ray job submit`, or a shell from `ray attach` with cluster.address: auto) that the cluster
    YAML's setup_commands installed exactly as the learner's nodes. A Ray Client driver (a ray:// address) runs
    off the cluster, where this machine's packages say nothing about the learner's: it is not checked here
    (`zeda doctor` warns), and the learner refuses when it builds its layers (its `core_attention`).
    """
    if cfg.learner.attention != "flash" or ray_client(cfg):
        return []
    why = import_problem(FLASH_MODULE)
    if not why:
        return []
    return [
        f"learner.attention: flash needs the package transformer_engine (TransformerEngine's PyTorch extension, "
        f"{FLASH_MODULE}), which is not importable here ({why}); install it ({TE_INSTALL}; "
        "launch/cluster-h200.yaml does on every node) or set learner.attention: local"
    ]


def ray_client(cfg: RunConfig) -> bool:
    """Whether the driver would join its cluster through Ray Client (ray://), i.e. from off the cluster."""
    return (cfg.cluster.address or os.environ.get("RAY_ADDRESS") or "").startswith("ray://")


_IMPORTS: dict[str, str] = {}


def import_problem(module: str, timeout_s: float = 300.0) -> str:
    """'' when `module` imports in a fresh interpreter of this environment, else why not (cached per process).

    A subprocess: importing TransformerEngine loads CUDA libraries, which the driver must not keep (a CUDA
    context on a GPU a learner rank of this node is about to take), and a broken install can raise anything.
    """
    if module not in _IMPORTS:
        import importlib.util
        import subprocess
        import sys

        top = module.split(".")[0]
        try:
            found = importlib.util.find_spec(top) is not None
        except (ImportError, ValueError):  # a half-imported or broken package: the subprocess says why
            found = True
        if not found:
            why = f"no module named {top!r}"
        else:
            try:
                out = subprocess.run(
                    [sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=timeout_s
                )
                lines = out.stderr.strip().splitlines()
                why = "" if out.returncode == 0 else f"import {module}: {lines[-1] if lines else out.returncode}"
            except subprocess.TimeoutExpired:
                why = f"import {module} took more than {timeout_s:.0f} s"
        _IMPORTS[module] = why
    return _IMPORTS[module]


def _paths(cfg: RunConfig) -> list[str]:
    d = cfg.data
    given = [("data.sft_rollouts", d.sft_rollouts)] if d.sft_rollouts else [("data.sft_prompts", d.sft_prompts)]
    given.append(("data.opd_prompts", d.opd_prompts))
    return [
        f"{key} ({value}): no such file or directory (expected 'embedded' or a .jsonl/.parquet file, shard dir "
        "or saved dataset)"
        for key, value in given
        if value != "embedded" and not Path(value).exists()
    ]


def _bind_host(cfg: RunConfig) -> list[str]:
    host = cfg.cluster.bind_host
    if host in ("auto", "localhost", *ALL_INTERFACES):
        return []
    mine = local_addresses()
    if host in mine:
        return []
    return [
        f"cluster.bind_host ({host}): not an address of this machine (its IPv4 addresses: {', '.join(sorted(mine))}); "
        "use one of them, or 'auto' for the learner node's cluster address"
    ]


def local_addresses() -> set[str]:
    import socket

    import psutil

    return {a.address for addrs in psutil.net_if_addrs().values() for a in addrs if a.family == socket.AF_INET}


def _teacher_config(cfg: RunConfig) -> tuple[dict | None, str, list[str]]:
    import json

    if cfg.model.teacher == "embedded":
        from launch.plan import load_hf_config

        name = cfg.model.embedded_teacher or cfg.data.tasks
        return load_hf_config(cfg), f"the embedded teacher's recipe (zeda_rl.teacher.TEACHERS[{name!r}])", []
    path = Path(cfg.model.teacher)
    if not path.is_dir():
        return (
            None,
            "",
            [f"model.teacher ({path}): no such directory (expected 'embedded' or a Hugging Face checkpoint directory)"],
        )
    file = path / "config.json"
    if not file.is_file():
        return (
            None,
            "",
            [f"model.teacher ({path}): no config.json in it (expected a Hugging Face checkpoint directory)"],
        )
    try:
        return json.loads(file.read_text()), str(file), []
    except (OSError, ValueError) as err:
        return None, "", [f"{file}: not readable JSON: {err}"]


def _against_teacher(cfg: RunConfig, hf: dict, source: str) -> list[str]:
    """The learner layout and the sequence lengths against the teacher's shape."""
    from launch.plan import arch_from_hf

    try:
        a = arch_from_hf(hf, cfg.model.zero_experts)
    except KeyError as err:
        return [f"{source}: no {err.args[0]!r} (expected a complete Hugging Face MoE config)"]
    except ValueError as err:
        return [f"{source}: {err}"]
    lc, out = cfg.learner, []
    if a.experts % lc.ep:
        divisors = [d for d in range(1, a.experts + 1) if a.experts % d == 0]
        out.append(
            f"learner.ep ({lc.ep}) does not divide the teacher's {a.experts} experts ({source}): expected one of {divisors}"
        )
    heads = [("num_attention_heads", a.heads)] + ([] if a.mla else [("num_key_value_heads", a.kv_heads)])
    for key, n in heads:
        if n % lc.tp:
            out.append(
                f"learner.tp ({lc.tp}) does not divide the teacher's {key} ({n}, {source}): each tensor-parallel "
                "rank holds whole heads"
            )
    budget = cfg.sampling.max_new_tokens
    what = f"sampling.max_new_tokens ({budget})"
    if (
        "max_prompt_tokens" in cfg.data.model_fields_set
    ):  # the config names its prompt budget: the two must fit together
        budget += cfg.data.max_prompt_tokens
        what += f" + data.max_prompt_tokens ({cfg.data.max_prompt_tokens}) = {budget}"
    else:
        budget += 1  # at least one prompt token
        what += " + a 1-token prompt"
    if budget > a.max_positions:
        out.append(
            f"{what} exceeds the teacher's max_position_embeddings ({a.max_positions}, {source}): the "
            "rollouts could not be scored"
        )
    return out


def runs_base() -> Path | None:
    """Base for a relative output_dir, or None for the current directory."""
    if os.environ.get("ZEDA_RUNS_DIR"):
        return Path(os.environ["ZEDA_RUNS_DIR"]).expanduser()
    if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):  # set by Ray for a submitted job's entrypoint
        return Path.home() / "zeda-runs"
    return None


def load_run_config(path: str, sets: list[str]):
    """The run config from its YAML and `KEY=VALUE` overrides (values parsed as YAML), with the
    relative output_dir placed as the module docstring says. Raises ConfigError."""
    overrides = {}
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        overrides[key] = yaml.safe_load(value)
    cfg = load_config(path, overrides)
    base = runs_base()
    if base is not None and not Path(cfg.output_dir).is_absolute():
        cfg = cfg.model_copy(update={"output_dir": str(base / cfg.output_dir)})
    return cfg
