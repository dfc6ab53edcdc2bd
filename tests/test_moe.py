"""MoE with the router's load-balancing loss (output_router_logits=True): chunk-wise gradients equal those of
HF's own `model(...).loss` (CE + router_aux_loss_coef * aux), padding mask included; PhiMoE's stochastic
routing in train mode is replayed; Llama-4's chunked local attention is exact."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from tiny import grads_of, live_lora, rel_error, tiny_batch, tiny_model
from transformers import DynamicCache
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from engine.chunkwise import ChunkOptions, ChunkSchedule, chunkwise_backward
from engine.unwrap import base_model

# 4 experts, top-2, and a large coefficient so the aux term is a sizeable part of every router gradient: a
# wrong f_e or normalisation shows up as ~1e-2, far above the tolerances below.
MOE = dict(
    num_local_experts=4,
    num_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    output_router_logits=True,
    router_aux_loss_coef=0.5,
    aux_loss_coef=0.5,  # JetMoE's name for it
)
FAMILIES = {  # config class: (overrides, attention kernel)
    "MixtralConfig": ({}, "sdpa"),
    "Qwen2MoeConfig": ({}, "sdpa"),
    "Qwen3MoeConfig": ({"head_dim": 16}, "sdpa"),
    "OlmoeConfig": ({}, "sdpa"),
    "GptOssConfig": ({"head_dim": 16}, "eager"),  # HF has no sdpa path for gpt-oss (attention sinks)
    "PhimoeConfig": ({}, "sdpa"),  # eval mode here; train mode (Gumbel routing) below
    "GraniteMoeConfig": ({}, "sdpa"),
    "JetMoeConfig": ({}, "sdpa"),
    "FlexOlmoConfig": ({}, "sdpa"),
    "MiniMaxM2Config": ({"head_dim": 16}, "sdpa"),
    "Ernie4_5_MoeConfig": ({}, "sdpa"),
}
SEQ = 37  # batch 2, right padding from 30 in row 1, a -100 span in row 0 (tests/tiny.py)


def moe_model(family: str, dtype=torch.float64, **kw):
    overrides, attn = FAMILIES[family]
    model = tiny_model(family, dtype, attn=attn, **{**MOE, **overrides, **kw})
    if dtype == torch.float64:  # grouped-mm expert kernels reject float64
        model.config._experts_implementation = "eager"
    return model.eval()


def coef_of(model) -> float:
    base = base_model(model)
    return getattr(base, "router_aux_loss_coef", getattr(base, "aux_loss_coef", None))


def ce_of(logits, labels):
    targets = torch.full_like(labels, -100)
    targets[:, :-1] = labels[:, 1:]
    logits = logits.flatten(0, 1).to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits, targets.flatten(), ignore_index=-100)


def hf_reference(model, ids, labels, mask):
    """HF's own forward with output_router_logits (config): its `.loss`, its `aux_loss`, and the gradient of
    CE + coef * aux, with the CE taken from the logits in the model's dtype (HF's CE upcasts only to float32)."""
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    (ce_of(out.logits, labels) + coef_of(model) * out.aux_loss).backward()
    grads = grads_of(model)
    model.zero_grad(set_to_none=True)
    return out.loss.item(), out.aux_loss.item(), grads


def run(model, ids, labels, mask, **kw):
    model.zero_grad(set_to_none=True)
    stats = chunkwise_backward(model, ids, labels=labels, attention_mask=mask, **kw)
    grads = grads_of(model)
    model.zero_grad(set_to_none=True)
    return stats, grads


# float64: HF's load_balancing_loss_func sums the router probabilities in float32 (`routing_weights.float()`)
# even in float64 models, so HF's aux and its gradient carry float32 rounding (measured 2e-8 .. 7e-8 against
# the engine's float64 sums, the same for every chunk size, one chunk included): 1e-6. That the split into
# chunks itself loses nothing is checked against the engine's own one-chunk run at 1e-10.
TOL = {torch.float64: 1e-6, torch.float32: 1e-5}


# Families whose modeling code computes pieces in float32 even in float64 models: there chunks of 7 and one
# chunk round differently (measured 1e-8 .. 7e-8), as float32 would.
SPLIT_TOL = {
    "MiniMaxM2Config": 1e-6,  # sigmoid router on .float() logits
    "Ernie4_5_MoeConfig": 1e-6,  # router logits F.linear(hidden.float(), weight.float()), RoPE in float32
}
SHORT = dict(seq=13, pad_from=10, ignore=(3, 6))  # chunk size 1 on a shorter batch: 13 chunks, not 37


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_aux_loss_matches_hf(family, dtype):
    model = moe_model(family, dtype)
    ids, labels, mask = tiny_batch(seq=SEQ)
    hf_loss, hf_aux, ref = hf_reference(model, ids, labels, mask)
    whole, whole_grads = run(model, ids, labels, mask, schedule=ChunkSchedule(chunk_size=SEQ))  # one chunk
    stats, got = run(model, ids, labels, mask, schedule=ChunkSchedule(chunk_size=7))
    for s, g in ((whole, whole_grads), (stats, got)):
        assert rel_error(g, ref) <= TOL[dtype]
        assert s.aux_loss == pytest.approx(hf_aux, rel=1e-6)
        assert s.loss == pytest.approx(hf_loss, rel=1e-6)  # HF's .loss: CE + coef * aux
    if dtype == torch.float64:
        assert rel_error(got, whole_grads) <= SPLIT_TOL.get(family, 1e-10)
    batch = tiny_batch(**SHORT)
    _, short_aux, short_ref = hf_reference(model, *batch)
    stats, got = run(model, *batch, schedule=ChunkSchedule(chunk_size=1))
    assert rel_error(got, short_ref) <= TOL[dtype] and stats.aux_loss == pytest.approx(short_aux, rel=1e-6)


def test_aux_term_is_in_the_gradient():
    """The reference without its aux term is far from the chunk-wise gradient: the test above can fail."""
    model = moe_model("MixtralConfig")
    ids, labels, mask = tiny_batch(seq=SEQ)
    _, _, ref = hf_reference(model, ids, labels, mask)
    model.zero_grad(set_to_none=True)
    ce_of(model(input_ids=ids, attention_mask=mask).logits, labels).backward()
    ce_only = grads_of(model)
    assert rel_error(ce_only, ref) > 1e-3
    model.config.output_router_logits = False  # the user's switch, as for HF's own loss
    stats, got = run(model, ids, labels, mask, schedule=ChunkSchedule(chunk_size=7))
    assert stats.aux_loss is None and rel_error(got, ce_only) <= 1e-12


@pytest.mark.parametrize("family", ["MixtralConfig", "Qwen3MoeConfig", "GptOssConfig"])
def test_aux_loss_with_lora(family):
    model = live_lora(moe_model(family), ["q_proj", "v_proj", "o_proj"])
    for batch, sizes in ((tiny_batch(seq=SEQ), (7, SEQ)), (tiny_batch(**SHORT), (1,))):
        _, hf_aux, ref = hf_reference(model, *batch)
        assert ref and all("lora_" in n for n in ref)
        for chunk_size in sizes:
            stats, got = run(model, *batch, schedule=ChunkSchedule(chunk_size=chunk_size))
            assert rel_error(got, ref) <= TOL[torch.float64], chunk_size
            assert stats.aux_loss == pytest.approx(hf_aux, rel=1e-6)


@pytest.mark.parametrize(
    "options",
    [{"checkpoint_layers": True, "fused_loss": True, "loss_slice": 4}, {"offload_kv": True}],
    ids=["checkpointed-fused", "offload"],
)
def test_aux_loss_with_memory_options(options):
    """The router logits are taken in the chunk's forward (its graph, not a recompute's): layer
    checkpointing, the fused loss and K/V offload leave the aux gradient intact."""
    model = moe_model("MixtralConfig")
    ids, labels, mask = tiny_batch(seq=SEQ)
    _, hf_aux, ref = hf_reference(model, ids, labels, mask)
    stats, got = run(
        model, ids, labels, mask, schedule=ChunkSchedule(chunk_size=7), options=ChunkOptions(**options)
    )
    assert rel_error(got, ref) <= TOL[torch.float64] and stats.aux_loss == pytest.approx(hf_aux, rel=1e-6)


def _chunk_by_chunk_reference(model, ids, labels, mask, chunk_size):
    """One autograd graph built chunk by chunk with HF's DynamicCache (the RNG consumed in the same order as
    the engine's pass 1), and HF's own load_balancing_loss_func on the router logits of all chunks."""
    inner, batch, n = model.model, ids.shape[0], ids.shape[1]
    cache, logits, routers = DynamicCache(config=model.config), [], []
    for s in range(0, n, chunk_size):
        e = min(s + chunk_size, n)
        out = inner(
            input_ids=ids[:, s:e],
            attention_mask=mask[:, :e],
            position_ids=torch.arange(s, e).expand(batch, -1),
            past_key_values=cache,
            use_cache=True,
            output_router_logits=True,
        )
        logits.append(model.lm_head(out.last_hidden_state))
        routers.append([r.reshape(batch, e - s, -1) for r in out.router_logits])
    per_layer = tuple(torch.cat(layer, dim=1).flatten(0, 1) for layer in zip(*routers))  # HF's [b * seq] rows
    aux = load_balancing_loss_func(per_layer, model.num_experts, model.num_experts_per_tok, mask)
    (ce_of(torch.cat(logits, dim=1), labels) + model.router_aux_loss_coef * aux).backward()
    grads = grads_of(model)
    model.zero_grad(set_to_none=True)
    return aux.item(), grads


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_phimoe_train_mode_replays_its_random_routing(dtype):
    """PhiMoE routes by Gumbel sampling (sparsemixer) in train mode, randomness no dropout attribute reveals:
    the engine replays pass 1's RNG for the recompute, so the gradient is exactly that of one graph under the
    same seed (HF's own full forward for one chunk; chunk by chunk with HF's cache for chunks of 7)."""
    model = moe_model("PhimoeConfig", dtype).train()
    ids, labels, mask = tiny_batch(seq=SEQ)
    torch.manual_seed(11)
    hf_loss, hf_aux, ref_whole = hf_reference(model, ids, labels, mask)
    after = torch.rand(1)
    torch.manual_seed(11)
    stats, got = run(model, ids, labels, mask, schedule=ChunkSchedule(chunk_size=SEQ))
    assert torch.equal(torch.rand(1), after)  # the RNG stream continues as after one forward
    assert rel_error(got, ref_whole) <= TOL[dtype]
    assert stats.loss == pytest.approx(hf_loss, rel=1e-6) and stats.aux_loss == pytest.approx(
        hf_aux, rel=1e-6
    )

    torch.manual_seed(12)
    aux, ref = _chunk_by_chunk_reference(model, ids, labels, mask, 7)
    torch.manual_seed(12)
    stats, got = run(model, ids, labels, mask, schedule=ChunkSchedule(chunk_size=7))
    assert rel_error(got, ref) <= TOL[dtype] and stats.aux_loss == pytest.approx(aux, rel=1e-6)
    assert rel_error(got, ref_whole) > 1e-3  # other draws, other routes: the routing really is random


def test_spaco_with_aux_loss_is_unbiased():
    """All 2^3 Bernoulli(1/2) selections of 3 chunks, weighted by their probability, average to SeCO's
    gradient: each chunk's aux share is weighted 1/q like its CE and travels the same K/V paths. Not 1e-12:
    HF's RMSNorm backprops in float32 even in float64 models (as in tests/test_spaco.py); measured 2e-8."""
    model = moe_model("MixtralConfig")
    ids, labels, mask = tiny_batch(**SHORT)
    _, exact = run(model, ids, labels, mask, schedule=ChunkSchedule(chunk_size=5))
    mean = {n: torch.zeros_like(g) for n, g in exact.items()}
    for r in range(4):
        for sel in itertools.combinations(range(3), r):
            stats, got = run(
                model,
                ids,
                labels,
                mask,
                schedule=ChunkSchedule(chunk_size=5, mode="spaco", selected=sel, sample_prob=0.5),
            )
            assert stats.aux_loss is not None
            for n in mean:
                mean[n] += got.get(n, torch.zeros_like(mean[n])) / 8
    assert rel_error(mean, exact) <= 1e-6


def test_foreign_router_loss_is_refused():
    """doge's load-balancing loss (product-key routing, counts normalised by top_k) is other code: refused."""
    model = tiny_model(
        "DogeConfig", is_moe=True, num_experts=16, num_experts_per_tok=2, output_router_logits=True
    )
    ids, labels, mask = tiny_batch(seq=SEQ)
    with pytest.raises(ValueError, match="doge: output_router_logits=True adds a router loss"):
        chunkwise_backward(
            model, ids, labels=labels, attention_mask=mask, schedule=ChunkSchedule(chunk_size=7)
        )
    model.config.output_router_logits = False  # without its router loss doge trains (no aux in HF's loss)
    run(model, ids, labels, mask, schedule=ChunkSchedule(chunk_size=7))


def test_logit_z_loss_is_refused():
    """bamba's z_loss_coefficient adds a z-loss on the LM logits to HF's loss: refused, not dropped."""
    from tiny_hybrid import tiny_hybrid

    model = tiny_hybrid("bamba", z_loss_coefficient=0.1)
    ids, labels, mask = tiny_batch(**SHORT)
    with pytest.raises(ValueError, match="bamba: z_loss_coefficient=0.1"):
        chunkwise_backward(
            model, ids, labels=labels, attention_mask=mask, schedule=ChunkSchedule(chunk_size=7)
        )


LLAMA4 = dict(
    head_dim=16,
    attention_chunk_size=8,
    num_hidden_layers=4,
    no_rope_layers=[1, 1, 1, 0],  # 3 chunked-attention RoPE layers : 1 global NoPE layer
    num_local_experts=4,
    num_experts_per_tok=1,
    intermediate_size_mlp=128,
    interleave_moe_layer_step=1,
)


def test_llama4_chunked_attention_is_exact():
    """Llama-4's chunked local attention (queries see keys of their own attention chunk of 8 tokens) goes
    through the model's own mask construction: engine chunks of 5 and 7 straddle the attention chunks.
    Llama-4 computes its norms, RoPE and router sigmoid in float32 even in float64 models: 1e-6 (measured
    6e-8; the engine's chunks of 8 match the attention chunks and give 2e-16)."""
    model = tiny_model("Llama4TextConfig", **LLAMA4)
    assert set(model.config.layer_types) == {"chunked_attention", "full_attention"}
    ids, labels, mask = tiny_batch(seq=SEQ)
    _, _, ref = hf_reference_plain(model, ids, labels, mask)
    for chunk_size in (1, 5, 7, SEQ):
        _, got = run(model, ids, labels, mask, schedule=ChunkSchedule(chunk_size=chunk_size))
        assert rel_error(got, ref) <= 1e-6, chunk_size
    wide = tiny_model("Llama4TextConfig", **{**LLAMA4, "attention_chunk_size": 64})
    _, _, wide_ref = hf_reference_plain(wide, ids, labels, mask)
    assert rel_error(wide_ref, ref) > 1e-3  # the chunked mask really changes the model


def hf_reference_plain(model, ids, labels, mask):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, attention_mask=mask)
    loss = ce_of(out.logits, labels)
    loss.backward()
    grads = grads_of(model)
    model.zero_grad(set_to_none=True)
    return loss.item(), None, grads


def test_router_aux_loss_config_key_switches_hf_output_router_logits():
    from engine.config import ModelConfig
    from engine.model import build_model

    hf = dict(model_type="mixtral", **{k: v for k, v in MOE.items() if k != "output_router_logits"})
    hf.update(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    hf.update(num_key_value_heads=2, vocab_size=97, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = build_model(ModelConfig(hf_config=hf, dtype="float32", router_aux_loss=True), seed=0)
    assert model.config.output_router_logits
    ids, labels, mask = tiny_batch(seq=SEQ)
    stats, _ = run(model, ids, labels, mask, schedule=ChunkSchedule(chunk_size=7))
    assert stats.aux_loss == pytest.approx(
        model(input_ids=ids, attention_mask=mask).aux_loss.item(), rel=1e-5
    )
    off = build_model(ModelConfig(hf_config=hf, dtype="float32", router_aux_loss=False), seed=0)
    assert not off.config.output_router_logits
