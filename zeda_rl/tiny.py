"""Tiny random configs of the two supported families, for tests and benchmarks.

They keep every structural feature that matters for ZEDA (grouped-query attention and
q/k norm for Qwen3-MoE; MLA attention, a leading dense layer, a shared expert and
sigmoid routing with a correction bias for GLM-4.7-Flash) at a size that runs in
milliseconds on a CPU.
"""

from __future__ import annotations

from transformers import Glm4MoeLiteConfig, Qwen3MoeConfig


def tiny_qwen3_moe_config(**overrides) -> Qwen3MoeConfig:
    kw = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=True,  # the real Qwen3-30B-A3B config sets it; transformers defaults to False
        max_position_embeddings=128,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        architectures=["Qwen3MoeForCausalLM"],
    )
    kw.update(overrides)
    return Qwen3MoeConfig(**kw)


def tiny_glm4_moe_lite_config(**overrides) -> Glm4MoeLiteConfig:
    kw = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_shared_experts=1,
        n_routed_experts=8,
        num_experts_per_tok=2,
        routed_scaling_factor=1.8,
        kv_lora_rank=16,
        q_lora_rank=24,
        qk_rope_head_dim=8,
        v_head_dim=8,
        qk_nope_head_dim=8,
        n_group=1,
        topk_group=1,
        norm_topk_prob=True,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        architectures=["Glm4MoeLiteForCausalLM"],
    )
    kw.update(overrides)
    return Glm4MoeLiteConfig(**kw)
