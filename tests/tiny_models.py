"""Tiny transformers MoE decoders (random weights, no download) shared by the sharding workers."""

from __future__ import annotations

import torch


def tiny_moe(family: str, device: str = "cpu", **overrides: object) -> torch.nn.Module:
    """A 2-layer ``family`` ("qwen3_moe" or "deepseek_v3") decoder with 8 experts of I = 128, top-3,
    seeded, in eval mode, built on ``device`` ("meta" for a model that a loader fills). Qwen3-MoE:
    hidden 256 (2 heads of 128); DeepSeek-V3: MLA attention, one shared expert, a dense first layer,
    hidden 128. ``overrides``: config fields to change (e.g. hidden_size=512 for 4-way attention)."""
    import transformers

    if family == "qwen3_moe":
        fields = dict(
            vocab_size=128, hidden_size=256, intermediate_size=256, moe_intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, head_dim=128,
            num_experts=8, num_experts_per_tok=3, max_position_embeddings=64, tie_word_embeddings=False,
        )  # fmt: skip
        make = transformers.Qwen3MoeConfig
    elif family == "deepseek_v3":
        fields = dict(
            vocab_size=128, hidden_size=128, intermediate_size=256, moe_intermediate_size=128,
            num_hidden_layers=2, first_k_dense_replace=1, n_shared_experts=1, n_routed_experts=8,
            num_experts_per_tok=3, n_group=2, topk_group=1, num_attention_heads=2, num_key_value_heads=2,
            q_lora_rank=64, kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16,
            max_position_embeddings=64,
        )  # fmt: skip
        make = transformers.DeepseekV3Config
    else:
        raise ValueError(f"family: expected 'qwen3_moe' or 'deepseek_v3', got {family!r}")
    cfg = make(**{**fields, **overrides})
    torch.manual_seed(0)
    with torch.device(device):
        return transformers.AutoModelForCausalLM.from_config(cfg).eval()
