"""SGLang external model package for converted (zero-expert) checkpoints.

SGLang is pointed at this package with `SGLANG_EXTERNAL_MODEL_PACKAGE=actors.sglang_plugin`
(`actors.sglang_engine` sets it); its model registry then imports every submodule and
collects their `EntryClass` lists. `models` needs SGLang and defines the classes for the
architectures Qwen3MoePlusPlusForCausalLM and Glm4MoeLitePlusPlusForCausalLM;
`zero_slots` holds the routing maths as pure torch so it can be tested without SGLang.

Nothing here may import SGLang: this file runs whenever a submodule is imported.
"""

PACKAGE = __name__
