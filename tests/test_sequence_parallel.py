"""Sequence parallelism (engine/sequence_parallel.py): 2 ranks on gloo share each sequence (P = 2); one step's
gradients equal one process's, float64. The reference is full-sequence backprop where the case allows it
(plain causal, sliding window, LoRA, checkpointed layers, offloaded K/V), else the one-process chunk-wise
step, which tests/test_chunkwise.py, test_spaco.py, test_moe.py and test_hybrid.py prove equal to full
backprop (packed rows, a SpaCO draw, the router loss, hybrid models).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from one_rank import free_port
from sp_cases import (
    CASES,
    GATHERED_MIXERS,
    PEAK_LENGTHS,
    PEAKS,
    REFUSALS,
    SCORES,
    SHARDED_MIXERS,
    SWAPPED,
    batch,
    build,
    run_case,
    score_case,
    step_peak,
)
from tiny import reference_grads, rel_error
from tiny_hybrid import HYBRIDS, tiny_hybrid

HERE = os.path.dirname(os.path.abspath(__file__))
EXPECTATIONS = ("spaco_expectation", "spaco_expectation_uncompensated")


def launch(out, cases, nprocs=2) -> None:
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(nprocs))
    env["OMP_NUM_THREADS"] = "1"
    worker = os.path.join(HERE, "workers", "sp_step.py")
    procs = [
        subprocess.Popen(
            [sys.executable, worker, "--out", str(out), "--cases", ",".join(cases)],
            env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(nprocs)
    ]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-4000:]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("sp")
    names = [*CASES, *REFUSALS, *EXPECTATIONS, SWAPPED, *SCORES, *PEAKS]
    launch(out, names)
    return {name: [torch.load(out / f"{name}.{r}.pt") for r in range(2)] for name in names}


def reference(case) -> dict:
    if not case[6]:
        return run_case(case)
    model = build(case)
    ids, labels, mask, _ = batch(case)
    loss, grads = reference_grads(model, ids, labels, mask)
    steps = case[7].get("steps", 1) if len(case) > 7 else 1
    return {"grads": {n: g * steps for n, g in grads.items()}, "loss": loss}


def tolerance(case) -> float:
    """float64: 1e-10; hybrids 1e-6, since HF's torch kernels of their mixers compute in float32 even in float64
    models (tests/test_hybrid.py's tol(); measured 8e-9 .. 4e-8 here)."""
    return 1e-6 if case[0] in HYBRIDS else 1e-10


@pytest.mark.parametrize("name", list(CASES))
def test_gradients_equal_one_process(results, name):
    ref = reference(CASES[name])
    tol = tolerance(CASES[name])
    for got in results[name]:
        assert rel_error(got["grads"], ref["grads"]) <= tol, name
        assert got["loss"] == pytest.approx(ref["loss"], rel=tol)
    # both ranks hold the whole gradient, not their shard's
    assert rel_error(results[name][0]["grads"], results[name][1]["grads"]) == 0.0


def test_kv_bytes_per_rank_halve(results):
    one = run_case(CASES["llama"])
    assert one["kv_bytes"] > 0
    for got in results["llama"]:
        # the sequence is padded to a multiple of P (37 -> 38 tokens): per-token K/V bytes halve
        assert got["kv_bytes"] / 38 == pytest.approx(one["kv_bytes"] / 37 / 2)


def test_step_peak_grows_per_token_at_half_the_rate(results):
    """Rank 0's step peak (engine.memory.MemoryTracker) grows per token at half P = 1's rate: the K/V and K/V
    gradients (2 layers x 2 K/V heads x 16 x 4 bytes x 2 x 2 = 1 KiB per token, float32) are held one K/V head
    per rank, and the chunk's activations are split too. Bound: ratio 0.5 +- 0.1; the rest of the per-token
    growth (token ids, not split; the attention's chunk x prefix scores, which the peak holds or not depending
    on the length) moves it by a few hundredths (measured 0.508 for 128 -> 256 tokens, 0.460 for 256 -> 512).
    K/V not split gives >= 0.98: the K/V alone is that share of P = 1's slope, and one K/V head, replicated on
    both ranks, gives 1.0 (the negative control)."""
    short, long = PEAK_LENGTHS

    def slope(peak) -> float:  # bytes per token
        return (peak[long] - peak[short]) / (long - short)

    measured = {}
    for heads in (2, 1):
        one = {n: step_peak(heads, n) for n in PEAK_LENGTHS}
        two = {n: results[f"peak_kv{heads}_{n}"][0]["peak"] for n in PEAK_LENGTHS}
        p1, p2 = slope({n: r["peak"] for n, r in one.items()}), slope(two)
        kv = slope({n: r["kv_bytes"] for n, r in one.items()})
        measured[heads] = dict(p1=p1, p2=p2, ratio=p2 / p1, kv_share=kv / p1)
    msg = f"bytes per token, P = 1 and P = 2, by K/V heads: {measured}"
    assert abs(measured[2]["ratio"] - 0.5) <= 0.1, msg
    assert measured[2]["kv_share"] > 0.6, msg  # unsplit K/V alone would put P = 2's slope outside the bound
    assert abs(measured[1]["ratio"] - 0.5) > 0.1, msg  # negative control: replicated K/V


@pytest.mark.parametrize("name", [*SHARDED_MIXERS, *GATHERED_MIXERS])
def test_boundary_states_per_rank(results, name):
    """Mixers split by heads hold half the boundary-state bytes per rank (same boundaries: 37 -> 38 tokens
    keeps chunks of 8 at 8, 16, 24, 32); gathered ones all of them, replicated. The state cache's own count."""
    one = run_case(CASES[name])
    assert one["state_bytes"] > 0
    expected = one["state_bytes"] // 2 if name in SHARDED_MIXERS else one["state_bytes"]
    for got in results[name]:
        assert got["state_bytes"] == expected, name


def test_wrong_shard_order_breaks_equality(results):
    """Negative control: each rank's heads run on the other rank's per-head parameters."""
    ref = reference(CASES["qwen3_next"])
    for got in results[SWAPPED]:
        assert rel_error(got["grads"], ref["grads"]) > 1e-3


@pytest.mark.parametrize("name", list(SCORES))
def test_scores_equal_one_process(results, name):
    """Evaluation's chunk-wise scoring with each chunk split over the group: the loss sum, target counts and
    argmax hits of one process, on every rank (each rank scored half of every chunk's tokens)."""
    case = CASES[SCORES[name]]
    ref = score_case(case)
    assert ref["argmax"]["row_correct"].sum() > 0  # hits to count (the tiny random model gets a few right)
    for got in results[name]:
        for kind in ("loss", "argmax"):
            g, r = got[kind], ref[kind]
            assert g["loss_sum"] == pytest.approx(r["loss_sum"], rel=tolerance(case)), (name, kind)
            assert g["num_tokens"] == r["num_tokens"] and torch.equal(g["row_tokens"], r["row_tokens"])
        assert torch.equal(got["argmax"]["row_correct"], ref["argmax"]["row_correct"])


@pytest.mark.parametrize("name", list(REFUSALS))
def test_refused_by_name(results, name):
    for got in results[name]:
        assert got["error"] is not None and REFUSALS[name][1] in got["error"], got["error"]


def test_spaco_draw_is_a_subset(results):
    selected = results["spaco"][0]["selected"]
    assert selected == results["spaco"][1]["selected"] and 0 < len(selected) < 5


# ------------------------------------------------------------------------------------------- the config


def test_parallel_sequence_config_errors():
    from engine.config import DEFAULT_CONFIG_PATH, ConfigError
    from engine.config_load import load_config
    from engine.trainer import check_sequence_parallel

    def error_of(*overrides):
        with pytest.raises(ConfigError) as info:
            load_config(str(DEFAULT_CONFIG_PATH), list(overrides))
        return str(info.value)

    assert "parallel.sequence: must be an int >= 1" in error_of("--parallel.sequence=0")
    assert "must divide chunking.chunk_size (100)" in error_of(
        "--parallel.sequence=8", "--chunking.chunk_size=100"
    )
    cfg = load_config(str(DEFAULT_CONFIG_PATH), ["--parallel.sequence=4"])
    with pytest.raises(ValueError, match="must divide the world size"):
        check_sequence_parallel(cfg, 6)
    with pytest.raises(ValueError, match=r"must divide the attention heads \(4\)"):
        check_sequence_parallel(load_config(str(DEFAULT_CONFIG_PATH), ["--parallel.sequence=8"]), 8)
    check_sequence_parallel(cfg, 8)  # 4 query heads, 2 K/V heads replicated on 4 ranks: accepted


# ------------------------------------------------------------------------------------------- the planner


def test_planner_per_rank_kv_and_activations():
    from engine.plan import longest_sequence, plan

    kw = dict(
        chunk_size=8192, dtype="bfloat16", zero_stage=3, world_size=8, checkpoint_layers=True, fused_loss=True
    )
    one = plan("llama3-8b", seq_len=1 << 20, **kw)
    for p, heads in ((2, 4), (8, 1), (16, 1)):  # 8 K/V heads: 8 / P per rank, one (replicated) beyond 8
        if p > 8:
            kw16 = {**kw, "world_size": 16, "sequence": 16}
            sp, ref = (
                plan("llama3-8b", seq_len=1 << 20, **kw16),
                plan("llama3-8b", seq_len=1 << 20, **{**kw16, "sequence": 1}),
            )
        else:
            sp, ref = plan("llama3-8b", seq_len=1 << 20, **kw, sequence=p), one
        assert sp.kv == ref.kv * heads // 8 and sp.kv_grads == ref.kv_grads * heads // 8
        assert sp.weights == ref.weights and sp.optimizer == ref.optimizer  # ZeRO over all ranks either way
        assert sp.activations < ref.activations
    assert longest_sequence("llama3-8b", device_memory="80GB", sequence=8, **kw) > 6 * longest_sequence(
        "llama3-8b", device_memory="80GB", **kw
    )
    with pytest.raises(ValueError, match="must divide chunk_size"):
        plan("llama3-8b", seq_len=1 << 16, **{**kw, "chunk_size": 1000}, sequence=16)
    # a hybrid: the attention layers' K/V halve, and so do the recurrent layers' boundary states where the
    # mixers are split by heads (16 key heads); with 3 key heads they run gathered and the states stay
    import dataclasses

    from engine.plan import ModelShape

    shape, n = ModelShape.from_config("qwen3-next-80b-a3b"), 1 << 16
    hybrid = {**kw, "offload_optimizer": True}
    sp, ref = plan(shape, seq_len=n, **hybrid, sequence=2), plan(shape, seq_len=n, **hybrid)
    attention_kv = 2 * shape.attn_layers * shape.kv_width * n * 2  # bf16
    states = (n // 8192 - 1) * shape.linear_layers * shape.state_bytes(2)  # 7 inner boundaries, batch 1
    assert shape.linear_layers > 0 and shape.linear_split == 16
    assert ref.kv - sp.kv == attention_kv // 2 + states // 2
    odd = dataclasses.replace(shape, linear_split=3)
    gathered, ref = plan(odd, seq_len=n, **hybrid, sequence=2), plan(odd, seq_len=n, **hybrid)
    assert ref.kv - gathered.kv == attention_kv // 2 and gathered.activations > sp.activations
    assert (
        longest_sequence(shape, device_memory="80GB", sequence=8, **hybrid)
        > longest_sequence(odd, device_memory="80GB", sequence=8, **hybrid)
        > longest_sequence(shape, device_memory="80GB", **hybrid)
    )


def test_planner_knows_the_split_mixers():
    """The planner's families with split mixers are those whose mixer class engine/sharded_mixers.py knows."""
    from engine.plan.memory import SPLIT_FAMILIES
    from engine.sharded_mixers import LAYOUTS

    families = (
        "qwen3_next",
        "qwen3_5_text",
        "qwen3_5_moe_text",
        "nemotron_h",
        "falcon_h1",
        "bamba",
        "kimi_linear",
    )
    for family in families:
        classes = {type(m).__name__ for m in tiny_hybrid(family).modules()}
        assert (family in SPLIT_FAMILIES) == bool(classes & set(LAYOUTS)), family


def test_spaco_is_unbiased_over_a_sequence_group(results):
    """Every selection with its probability (chunk q_c = 1, 0.5, 0.3, 0.8, 1): the expectation of the group's
    SpaCO estimates is the full-sequence gradient; without the 1/q_c weights it is not."""
    case = CASES["llama"]
    model = build(case)
    ids, labels, mask, _ = batch(case)
    _, full = reference_grads(model, ids, labels, mask)
    for got in results["spaco_expectation"]:
        assert rel_error(got["grads"], full) <= 1e-6  # float32 RMSNorm backward (tests/test_spaco.py)
    assert rel_error(results["spaco_expectation_uncompensated"][0]["grads"], full) > 0.1
