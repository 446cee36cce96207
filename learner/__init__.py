"""The Megatron-core learner: zero-expert GPTModel, HF<->Megatron bridge, training step, Ray actors.

Modules (one idea each):
- `cpu_shims`   what megatron-core needs to run without CUDA (applied only then).
- `model`       GPTModel built from a converted HF config, with the zero-expert router.
- `parallel`    process groups (EP inside DP, Megatron's layout) and gradient synchronisation.
- `bridge`      HF safetensors <-> Megatron state, experts sharded over EP ranks; weight export.
- `train`       `LearnerConfig` and the SFT / OPD training step.
- `checkpoint`  full learner state saved atomically, exact resume.
- `actor`       one Ray actor per rank and the `LearnerGroup` driving them (`group` re-exports it).
- `sft`         `python -m learner.sft`: a few SFT steps on a tiny checkpoint, for users.
- `testing`     tiny converted checkpoints and a checked transformers reference loader.

Importing this package imports neither Megatron nor Ray; the modules do, when used.
Importing `learner.model` (or anything that uses it) applies `cpu_shims` in a CUDA-less
process: they patch torch.cuda's RNG/stream/device helpers process-wide (see there).
"""
