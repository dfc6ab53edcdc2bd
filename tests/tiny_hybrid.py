"""Tiny random hybrid linear-attention / SSM models from their config classes (nothing is downloaded).

Hybrids get 4 layers, 3 recurrent : 1 full attention (HF's own forward needs an attention layer among the
linear ones); Mamba-2 style mixers need mamba_n_heads * mamba_d_head == hidden * expand (4 * 16 = 32 * 2).
"""

from __future__ import annotations

import torch
import transformers
from tiny import BASE as ATTENTION_BASE

# The attention tests' tiny shape, narrower and with 4 layers (3 recurrent : 1 full attention).
BASE = dict(ATTENTION_BASE, hidden_size=32, intermediate_size=64, num_hidden_layers=4)
LINEAR_3_1 = ["linear_attention", "linear_attention", "linear_attention", "full_attention"]
DELTA = dict(  # gated delta-net heads (Qwen3-Next / Qwen3.5 / OLMo-hybrid)
    layer_types=LINEAR_3_1,
    linear_key_head_dim=8,
    linear_value_head_dim=8,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
)
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=16)
MAMBA2 = dict(
    mamba_n_heads=4, mamba_d_head=16, mamba_n_groups=1, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2
)

HYBRIDS = {
    "qwen3_next": ("Qwen3NextConfig", dict(DELTA, head_dim=8, **MOE)),
    "qwen3_5_text": ("Qwen3_5TextConfig", dict(DELTA, head_dim=8)),
    "qwen3_5_moe_text": ("Qwen3_5MoeTextConfig", dict(DELTA, head_dim=8, **MOE)),
    "olmo_hybrid": ("OlmoHybridConfig", DELTA),
    "kimi_linear": (
        "KimiLinearConfig",
        dict(
            layer_types=LINEAR_3_1,
            linear_head_dim=8,
            linear_num_heads=4,
            q_lora_rank=None,
            kv_lora_rank=16,
            qk_rope_head_dim=4,
            qk_nope_head_dim=8,
            v_head_dim=8,
            num_key_value_heads=4,
            num_local_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            mlp_layer_types=["dense"] * 4,
        ),
    ),
    # attention and a Mamba-2 mixer side by side in every layer ("hybrid" cache layers)
    "falcon_h1": ("FalconH1Config", dict(MAMBA2, head_dim=8, mamba_d_ssm=64, mamba_chunk_size=8)),
    "bamba": ("BambaConfig", dict(MAMBA2, attn_layer_indices=[3], mamba_chunk_size=8)),
    "granitemoehybrid": (
        "GraniteMoeHybridConfig",
        dict(
            MAMBA2,
            layer_types=["mamba", "mamba", "mamba", "attention"],
            mamba_chunk_size=8,
            num_local_experts=4,
            num_experts_per_tok=2,
            shared_intermediate_size=32,
        ),
    ),
    "nemotron_h": (
        "NemotronHConfig",
        dict(
            layers_block_type=["mamba", "attention", "mamba", "mlp"],
            head_dim=8,
            ssm_state_size=8,
            mamba_num_heads=4,
            mamba_head_dim=16,
            n_groups=1,
            conv_kernel=4,
            expand=2,
            chunk_size=8,
        ),
    ),
    "zamba2": (
        "Zamba2Config",
        dict(
            layers_block_type=["mamba", "mamba", "hybrid", "mamba"],
            mamba_d_state=8,
            mamba_d_conv=4,
            mamba_expand=2,
            mamba_ngroups=1,
            n_mamba_heads=4,
            chunk_size=8,
            num_mem_blocks=1,
            adapter_rank=4,
        ),
    ),
    "lfm2": ("Lfm2Config", dict(layer_types=["conv", "conv", "conv", "full_attention"])),
    # pure recurrent: no attention layer at all
    "mamba2": (
        "Mamba2Config",
        dict(num_heads=4, head_dim=16, expand=2, state_size=8, conv_kernel=4, n_groups=1, chunk_size=8),
    ),
    # refused (engine/state_cache.py says why)
    "jamba": (
        "JambaConfig",
        dict(
            attn_layer_period=4,
            attn_layer_offset=3,
            expert_layer_period=2,
            expert_layer_offset=1,
            num_experts=4,
            num_experts_per_tok=2,
            mamba_d_state=8,
            mamba_d_conv=4,
            mamba_expand=2,
        ),
    ),
    "mamba": ("MambaConfig", dict(state_size=8, expand=2, conv_kernel=4)),
    "falcon_mamba": ("FalconMambaConfig", dict(state_size=8, expand=2, conv_kernel=4)),
    "minimax": (
        "MiniMaxConfig",
        dict(layer_types=LINEAR_3_1, head_dim=8, num_local_experts=4, num_experts_per_tok=2, block_size=8),
    ),
}
NO_SDPA = ("mamba2", "mamba", "falcon_mamba")  # HF has no attention implementation switch for these


def tiny_hybrid(family: str, dtype=torch.float64, seed: int = 0, **overrides):
    config_cls, kw = HYBRIDS[family]
    torch.manual_seed(seed)
    cfg = getattr(transformers, config_cls)(**{**BASE, **kw, **overrides})
    cfg._experts_implementation = "eager"  # grouped-mm expert kernels reject float64
    attn = {} if family in NO_SDPA else {"attn_implementation": "sdpa"}
    return transformers.AutoModelForCausalLM.from_config(cfg, **attn).to(dtype)
