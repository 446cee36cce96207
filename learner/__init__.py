"""The Megatron-core learner: zero-expert GPTModel, HF<->Megatron bridge, training step, Ray actors.

Modules (one idea each):
- `cpu_shims`        what megatron-core needs to run without CUDA (applied only then).
- `megatron_config`  a converted HF config in Megatron's terms: `ModelInfo`, TransformerConfig.
- `router`           the zero-expert router in Megatron; routing replay and records.
- `layer_specs`      the local layer specs with our norms, router and core attention.
- `model`            GPTModel of a converted checkpoint (`build_model`) and its forward.
- `parallel`         process groups (EP inside DP, Megatron's layout) and gradient synchronisation.
- `hf_names`         Megatron tensor names <-> HF names, with the transform each way.
- `bridge`           HF safetensors <-> the model's state, experts sharded over EP, dense over TP.
- `hf_export`        the student written as an HF checkpoint.
- `publish`          weight sync: each rank sends the tensors it owns to the engines.
- `config`           the `learner:` section and the stages' optimisation sections of the run config.
- `batch`            a rank's batch checked and cut into micro-batches all ranks agree on.
- `objective`        the stages' token losses (student logprobs, the OPD policy loss).
- `step_metrics`     a step's sums and routing counts reduced into its metrics.
- `optim`            Megatron's DDP and optimiser for bf16 / sharded layouts.
- `train`            `Learner`: the SFT / OPD training step.
- `checkpoint`       full learner state saved atomically, exact resume.
- `actor`            one Ray actor per rank and the `LearnerGroup` driving them.
- `inbox`            the learner's ZMQ inbox of OPD batches.
- `testing`          tiny converted checkpoints and a checked transformers reference loader.

Importing this package imports neither Megatron nor Ray; the modules do, when used.
Importing `learner.model` (or anything that uses it) applies `cpu_shims` in a CUDA-less
process: they patch torch.cuda's RNG/stream/device helpers process-wide (see there).
"""

import warnings as _warnings

# Megatron-core announces, per process and module, that TransformerEngine and Apex are absent and
# that its own default cuda_graph_scope is deprecated: about 14 lines per learner rank, which Ray
# forwards again after a run's result line. The fallbacks are the ones this learner is built on
# (local layer specs, torch norm and optimizers), so these exact messages are dropped here, before
# any Megatron import, in the driver and in every Ray actor that imports a learner module.
for _message in (
    r"Transformer Engine and Apex are not installed\. Falling back to ",
    r"Apex is not installed\. Falling back to Torch Norm",
    r"full scope is deprecated\. Use empty cuda_graph_scope to capture the whole layer",
):
    _warnings.filterwarnings("ignore", message=_message, category=UserWarning, module=r"megatron")
