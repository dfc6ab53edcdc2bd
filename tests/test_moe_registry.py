"""Every causal LM of the installed transformers whose loss can carry a router load-balancing term
(`output_router_logits=True`): chunk-wise training with that term on is exact against HF's own loss, or is
refused with a ValueError that names the family and the reason. Never a crash, never silently wrong."""

from __future__ import annotations

import importlib

import pytest
import torch
import transformers
from test_moe import MOE, hf_reference, run
from tiny import BASE, rel_error, tiny_batch
from tiny_hybrid import HYBRIDS, tiny_hybrid
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from engine.chunkwise import ChunkSchedule

ROUTER_LOSS_FAMILIES = sorted(
    mt
    for mt, cls in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items()
    if hasattr(transformers, cls)
    and hasattr(importlib.import_module(getattr(transformers, cls).__module__), "load_balancing_loss_func")
)

# Tiny-config fixes per family (names of the config keys differ; every layer an MoE layer).
EXTRA = {
    "dbrx": dict(
        d_model=64,
        n_heads=4,
        n_layers=2,
        max_seq_len=512,
        attn_config={"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
        ffn_config={"ffn_hidden_size": 64, "moe_num_experts": 4, "moe_top_k": 2},
    ),
    "doge": dict(is_moe=True, num_experts=16, num_experts_per_tok=2),
    "flint": dict(mlp_only_layers=[], sliding_window=8),
    "deepseek_v4": dict(
        n_routed_experts=4,
        head_dim=32,
        qk_rope_head_dim=16,
        index_n_heads=2,
        index_head_dim=16,
        sliding_window=8,
        mlp_layer_types=["moe", "moe"],
        layer_types=["compressed_sparse_attention", "heavily_compressed_attention"],
    ),
    "granitemoe_swa": dict(sliding_window=8),
    "qwen4_exp_text": dict(  # 3 gated delta-net layers : 1 indexed (sparse) attention layer
        num_hidden_layers=4,
        layer_types=["linear_attention"] * 3 + ["indexed_attention"],
        head_dim=8,
        linear_key_head_dim=8,
        linear_value_head_dim=8,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        indexer_n_heads=2,
        indexer_kv_heads=1,
        indexer_head_dim=8,
        indexer_budget=8,
        indexer_compress_ratio=2,
    ),
}
EAGER = {"gpt_oss", "flint", "granitemoe_swa", "deepseek_v4", "doge"}  # HF has no sdpa path for these
# Composite (multimodal) configs: the same causal LM is walked through its text config's model type.
COMPOSITE = {"qwen3_5_moe": "qwen3_5_moe_text", "qwen4_exp": "qwen4_exp_text"}
REFUSED = {  # family: what its ValueError says (engine/moe.py, engine/state_cache.py, engine/chunkwise.py)
    "doge": "not the Switch/Mixtral load-balancing formula",
    "deepseek_v4": "compressed",
    "jamba": "jamba",
    "minimax": "minimax",
    "lara_mini": "not verified exact",
    "qwen4_exp_text": "not verified exact",
}


def build(family: str):
    if family in HYBRIDS:
        model = tiny_hybrid(family, **{**MOE, "output_router_logits": True})
    else:
        torch.manual_seed(0)
        cfg = AutoConfig.for_model(family, **{**BASE, **MOE, "head_dim": 16, **EXTRA.get(family, {})})
        cfg._experts_implementation = "eager"  # grouped-mm expert kernels reject float64
        attn = "eager" if family in EAGER else "sdpa"
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn).to(torch.float64)
    return model.eval()


def test_registry_is_walked():
    assert {"mixtral", "qwen3_moe", "olmoe", "gpt_oss", "phimoe", "jetmoe"} <= set(ROUTER_LOSS_FAMILIES)
    assert all(COMPOSITE[f] in ROUTER_LOSS_FAMILIES for f in COMPOSITE if f in ROUTER_LOSS_FAMILIES)


@pytest.mark.parametrize("family", [f for f in ROUTER_LOSS_FAMILIES if f not in COMPOSITE])
def test_family_with_router_loss_is_exact_or_refused(family):
    model = build(family)
    assert getattr(model.config, "output_router_logits", False)
    ids, labels, mask = tiny_batch(seq=23, pad_from=18, ignore=(3, 6))
    if family in REFUSED:
        with pytest.raises(ValueError, match=family) as err:
            run(model, ids, labels, mask, schedule=ChunkSchedule(chunk_size=7))
        assert REFUSED[family] in str(err.value)
        return
    hf_loss, hf_aux, ref = hf_reference(model, ids, labels, mask)
    stats, got = run(model, ids, labels, mask, schedule=ChunkSchedule(chunk_size=7))
    # HF sums the router probabilities in float32 (and several families compute norms, RoPE or routers in
    # float32) even in float64 models: 1e-6, as in tests/test_moe.py.
    assert rel_error(got, ref) <= 1e-6
    assert stats.aux_loss == pytest.approx(hf_aux, rel=1e-6) and stats.loss == pytest.approx(
        hf_loss, rel=1e-6
    )
