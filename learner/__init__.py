"""The Megatron-core learner: zero-expert GPTModel, HF<->Megatron bridge, training step, Ray actors.

Modules (one idea each):
- `cpu_shims`   what megatron-core needs to run without CUDA (applied only then).
- `model`       GPTModel built from a converted HF config, with the zero-expert router.
- `parallel`    process groups (EP inside DP, Megatron's layout) and gradient synchronisation.
- `bridge`      HF safetensors <-> Megatron state, experts sharded over EP ranks; weight export.
- `config`      the `learner:` section and the stages' optimisation sections of the run config.
- `train`       `Learner`: the SFT / OPD training step.
- `checkpoint`  full learner state saved atomically, exact resume.
- `actor`       one Ray actor per rank and the `LearnerGroup` driving them (`group` re-exports it).
- `sft`         `python -m learner.sft`: a few SFT steps on a tiny checkpoint, for users.
- `testing`     tiny converted checkpoints and a checked transformers reference loader.

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
