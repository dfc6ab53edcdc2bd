"""DeepSpeed ZeRO 0-3 (+ CPU offload), 2 CPU ranks under the real launcher: one chunk-wise step updates the
weights as one process doing plain full-sequence backprop on the same global batch (sequences of uneven
length on the two ranks)."""

from __future__ import annotations

import glob
import json
import os
import subprocess

import pytest
import torch
from ds_reference import (
    PACKED_DOCS,
    accum_batch,
    build,
    global_batch,
    lora_wrap,
    make_optimizer,
    moe_reference,
)
from one_rank import free_port
from tiny import per_document_grads, reference_grads, rel_error
from tiny_hybrid import HYBRIDS

from engine.chunkwise import ChunkSchedule, chunkwise_backward

HERE = os.path.dirname(os.path.abspath(__file__))
pytestmark = pytest.mark.distributed

CASES = {
    # ... then an accumulated step (2 micro-batches per rank) on the same engine: ZeRO-0's accumulation
    "zero0": ["--zero", "0", "--and-accum", "2"],
    "zero1": ["--zero", "1"],
    "zero1-offload": ["--zero", "1", "--offload-optimizer"],
    "zero2": ["--zero", "2"],
    "zero2-offload": ["--zero", "2", "--offload-optimizer"],
    "zero3": ["--zero", "3"],
    "zero3-offload": ["--zero", "3", "--offload-optimizer"],
    "zero3-offload-param": ["--zero", "3", "--offload-optimizer", "--offload-param"],
    "zero2-lora": ["--zero", "2", "--lora"],
    "zero3-lora": ["--zero", "3", "--lora"],
    "zero2-spaco-q1": ["--zero", "2", "--mode", "spaco"],
    "zero2-offload-adamw": ["--zero", "2", "--offload-optimizer", "--optim", "adamw"],
    "zero3-adamw": ["--zero", "3", "--optim", "adamw"],
    # Packed documents (position_ids restarting per document) against the documents run one by one; the
    # SFT SpaCO policy ORs the loss-chunk flags over ranks (q = 1 here: exact).
    "zero2-packed": ["--zero", "2", "--packed"],
    # checkpointed chunks + fused loss (ZeRO-3: the head's weight gathered once per chunk, engine/loss.py;
    # the test also checks that the fused loss ran, not its whole-chunk fallback)
    "zero2-memory": ["--zero", "2", "--memory"],
    "zero3-memory": ["--zero", "3", "--memory"],
    "zero3-offload-param-memory": ["--zero", "3", "--offload-optimizer", "--offload-param", "--memory"],
    # MoE with the router load-balancing loss: CE over the global batch + coef x the mean of each rank's aux
    # (tests/ds_reference.py's moe_reference); and a hybrid (Mamba-2 + attention) through its state cache.
    "zero2-moe-aux": ["--zero", "2", "--model", "moe"],
    "zero2-hybrid": ["--zero", "2", "--model", "nemotron_h"],
    # ZeRO-3 with MoE blocks that run only their tokens' experts: the blocks are fetched whole (leaf
    # modules, engine/zero3_leaves.py), else the ranks' all-gathers go out of step
    "zero3-moe-aux": ["--zero", "3", "--model", "moe"],
    "zero3-hybrid-moe": ["--zero", "3", "--model", "qwen3_next"],
    "zero3-hybrid-moe-qwen3_5": ["--zero", "3", "--model", "qwen3_5_moe_text"],
    # Sequence parallelism: both ranks share both rows (P = 2, one data-parallel group), each chunk split
    # over them (engine/sequence_parallel.py); DeepSpeed reduces over data x sequence ranks.
    "zero0-sp2": ["--zero", "0", "--sp", "2"],
    "zero2-sp2": ["--zero", "2", "--sp", "2", "--and-accum", "2"],  # ... and accumulation under P = 2
    "zero3-sp2-offload-param": ["--zero", "3", "--sp", "2", "--offload-optimizer", "--offload-param"],
    "zero3-sp2": ["--zero", "3", "--sp", "2"],
    "zero3-sp2-lora-packed": ["--zero", "3", "--sp", "2", "--lora", "--packed"],
    "zero3-sp2-moe-aux": ["--zero", "3", "--sp", "2", "--model", "moe"],
    # a hybrid whose gated-delta-rule mixers are split by heads (engine/sharded_mixers.py)
    "zero2-sp2-hybrid": ["--zero", "2", "--sp", "2", "--model", "qwen3_next"],
    # ... under ZeRO-3 its mixers run gathered (partitioned weights cannot be sliced by heads), its MoE
    # blocks fetched whole
    "zero3-sp2-hybrid-moe": ["--zero", "3", "--sp", "2", "--model", "qwen3_next"],
    "zero3-packed-spaco-loss-chunks": [
        "--zero",
        "3",
        "--packed",
        "--mode",
        "spaco",
        "--loss-chunks",
        "always",
    ],
}


# One launcher start per group of cases (tests/workers/ds_step.py runs a group's cases one after another in one
# process group): a start costs more than a tiny model's step. A case of a failed group fails with its log.
GROUPS = {
    "sp2": [n for n, a in CASES.items() if "--sp" in a],
    # one launch with every --memory case: its log must not say the fused loss fell back (logged once a process)
    "memory": [n for n, a in CASES.items() if "--memory" in a],
    "zero3": [n for n, a in CASES.items() if a[1] == "3" and "--sp" not in a and "--memory" not in a],
    "zero0-2": [n for n, a in CASES.items() if a[1] != "3" and "--sp" not in a and "--memory" not in a],
}


def launch(cases: dict[str, list[str]], out_dir, nprocs=2) -> dict[str, dict]:
    """Run `cases` ({name: ds_step arguments}) in one launch; each case's result by name."""
    port = free_port()
    spec = out_dir / "cases.json"
    spec.write_text(json.dumps(cases))
    cmd = ["deepspeed", "--num_gpus", str(nprocs), "--master_port", str(port)]
    cmd += [os.path.join(HERE, "workers", "ds_step.py"), "--cases", str(spec), "--out-dir", str(out_dir)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=os.path.dirname(HERE))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    # DeepSpeed's CPU all-reduce leaves a 64 MiB /dev/shm file per rank unless we unlink it
    assert not glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*")
    if any("--memory" in a for a in cases.values()):
        assert "using the whole-chunk loss" not in r.stdout + r.stderr, r.stderr[-3000:]
    return {name: torch.load(out_dir / f"{name}.pt") for name in cases}


@pytest.fixture(scope="module")
def group_results(tmp_path_factory):
    """The launch of a group of cases, run once for the module when its first case asks for it."""
    done: dict[str, dict] = {}

    def of(group: str, cases: dict[str, list[str]]) -> dict:
        if group not in done:
            done[group] = launch(cases, tmp_path_factory.mktemp(group))
        return done[group]

    return of


def initial(lora: bool, model: str = "llama"):
    return lora_wrap(build(model)) if lora else build(model)


def reference_step(lora: bool, optim: str, packed: bool = False, model_name: str = "llama", sp: int = 1):
    model = initial(lora, model_name)
    ids, labels, mask = global_batch()
    reference = packed_reference if packed else moe_reference if model_name == "moe" else reference_grads
    # sequence parallelism: one group of 2 ranks holds both rows, so the router loss is the 2-row batch's
    kw = {"rows_per_rank": ids.shape[0] // (2 // sp)} if model_name == "moe" else {}
    loss, grads = reference(model, ids, labels, mask, **kw)
    params = dict(model.named_parameters())
    for n, g in grads.items():
        params[n].grad = g
    make_optimizer(optim, [p for p in params.values() if p.requires_grad]).step()
    return loss, {n: p.detach().clone() for n, p in params.items()}


def one_process_state_bytes(model_name: str) -> int:
    """The boundary-state bytes of one process's chunk-wise step on the group's rows (the same boundaries:
    37 tokens and 38, padded for P = 2, both cut at 8, 16, 24, 32)."""
    ids, labels, mask = global_batch()
    stats = chunkwise_backward(
        build(model_name), ids, labels=labels, attention_mask=mask, schedule=ChunkSchedule(chunk_size=8)
    )
    return stats.state_bytes


def packed_reference(model, ids, labels, mask):
    loss, _, grads = per_document_grads(model, ids, labels, PACKED_DOCS)
    return loss, grads


def test_every_case_is_in_one_group():
    grouped = [n for names in GROUPS.values() for n in names]
    assert sorted(grouped) == sorted(CASES)


@pytest.mark.parametrize("name", list(CASES))
def test_one_step_matches_single_process(group_results, name):
    group = next(g for g, names in GROUPS.items() if name in names)
    got = group_results(group, {n: CASES[n] for n in GROUPS[group]})[name]
    check_step(CASES[name], got)
    if "--and-accum" in CASES[name]:  # the accumulated step that followed, from the weights the first left
        sp = int(CASES[name][CASES[name].index("--sp") + 1]) if "--sp" in CASES[name] else 1
        check_accumulation(got["accum"], data_parallel=2 // sp, start=got["params"])


@pytest.mark.slow
def test_data_times_sequence_zero3(tmp_path):
    """4 ranks: 2 data-parallel groups of 2 sequence ranks (one row each, uneven lengths), ZeRO-3."""
    args = ["--zero", "3", "--sp", "2"]
    check_step(args, launch({"dp2-sp2": args}, tmp_path, nprocs=4)["dp2-sp2"], rows=1)


@pytest.mark.parametrize("family", ["moe", "qwen3_next", "qwen3_5_moe_text", "granitemoehybrid", "llama"])
def test_zero3_leaves_are_the_moe_blocks(family):
    """Every layer's MoE block is found by structure (one per layer of an MoE family), and nothing in a
    dense model."""
    from engine.zero3_leaves import moe_blocks

    model = build(family)
    blocks = moe_blocks(model)
    dense = family in ("llama",)
    assert len(blocks) == (0 if dense else model.config.num_hidden_layers)
    assert all("experts" in dict(b.named_children()) for b in blocks)


def check_step(args, got, rows=2):
    """One step's update and loss against one process's on the global batch; `rows` per sequence group."""
    lora, optim = "--lora" in args, "adamw" if "adamw" in args else "sgd"
    model_name = args[args.index("--model") + 1] if "--model" in args else "llama"
    sp = int(args[args.index("--sp") + 1]) if "--sp" in args else 1
    ref_loss, ref = reference_step(lora, optim, packed="--packed" in args, model_name=model_name, sp=sp)
    assert got["loss"] == pytest.approx(ref_loss, rel=1e-5)
    _, labels, _ = global_batch()
    cut = (
        len(PACKED_DOCS[0]) - 1 + len(PACKED_DOCS[1]) - 1 if "--packed" in args else 0
    )  # no cross-doc target
    assert got["tokens"] == int((labels[:, 1:] != -100).sum()) - cut
    init = {n: p.detach() for n, p in initial(lora, model_name).named_parameters()}
    ref_update = {n: ref[n] - init[n] for n in ref if not torch.equal(ref[n], init[n])}
    got_update = {n: got["params"][n] - init[n] for n in ref_update}
    assert ref_update and all(torch.equal(got["params"][n], init[n]) for n in init if n not in ref_update)
    # SGD's update is the gradient (fp32 rounding: ~1e-7). Adam's first step is g / (|g| + eps), which
    # amplifies rounding on the few elements whose gradient is near eps: compare the update as a whole.
    assert rel_error(got_update, ref_update) <= (1e-5 if optim == "sgd" else 1e-3)
    if sp > 1 and model_name in HYBRIDS and args[1] == "3":  # ZeRO-3: the mixers ran gathered, whole states
        assert 0 < got["state_bytes"] == one_process_state_bytes(model_name)
    elif sp > 1 and model_name in HYBRIDS:  # the mixers really were split: half the boundary states per rank
        assert 0 < got["state_bytes"] and got["state_bytes"] * 2 == one_process_state_bytes(model_name)
    elif sp > 1:  # the chunks really were split: each rank held half of the K/V heads
        cfg = build(model_name).config
        head_dim = cfg.hidden_size // cfg.num_attention_heads
        padded = -(-global_batch()[0].shape[1] // sp) * sp  # rank 0's rows: row 0 (37 tokens) is the longest
        # K, V and their float32 gradients, rank 0's rows, every layer, this rank's K/V heads
        kv_heads = cfg.num_key_value_heads // sp
        assert got["kv_bytes"] == cfg.num_hidden_layers * rows * kv_heads * padded * head_dim * 2 * (4 + 4)


# ------------------------------------------------------------------------------------ gradient accumulation

ACCUM_CASES = {
    "zero2-accum2": ["--zero", "2"],
    "zero3-accum2": ["--zero", "3"],
    "zero2-offload-accum2": ["--zero", "2", "--offload-optimizer"],
    "zero1-accum2": ["--zero", "1"],
    "zero3-offload-accum2": ["--zero", "3", "--offload-optimizer", "--offload-param"],
}


ACCUM_LAUNCH = {
    **{name: [*args, "--accum", "2"] for name, args in ACCUM_CASES.items()},
    # negative controls of the reduction count: each micro-batch a step of its own reduces twice
    **{f"zero{z}-no-span": ["--zero", z, "--accum", "2", "--no-span"] for z in ("0", "2")},
}


@pytest.mark.parametrize("name", list(ACCUM_CASES))
def test_accumulation_matches_single_process_on_the_global_batch(group_results, name):
    """2 ranks x 2 micro-batches (sequences of four lengths) in one optimizer step: SGD's update is one
    process's full backprop on all four sequences, and the gradients were reduced over the ranks once."""
    check_accumulation(group_results("accum", ACCUM_LAUNCH)[name], data_parallel=2)


def check_accumulation(got, data_parallel: int, start=None, accum: int = 2):
    """An accumulated step's loss and SGD update against one process's full backprop on its effective batch
    (the first data_parallel x accum rows of accum_batch), from the initial weights or `start`."""
    model = initial(lora=False)
    if start is not None:
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(start[n])
    ids, labels, mask = (t[: data_parallel * accum] for t in accum_batch())
    ref_loss, grads = reference_grads(model, ids, labels, mask)
    assert got["loss"] == pytest.approx(ref_loss, rel=1e-5)
    assert got["tokens"] == int((labels[:, 1:] != -100).sum())
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.grad = grads[n]
    make_optimizer("sgd", list(model.parameters())).step()  # float32 rounding as the ranks' SGD step has
    ref_update = {n: p.detach() - init[n] for n, p in model.named_parameters()}
    got_update = {n: got["params"][n] - init[n] for n in ref_update}
    assert rel_error(got_update, ref_update) <= 1e-5
    assert len(got["reductions"]) == 1, got["reductions"]  # one reduction pass for the whole step


@pytest.mark.parametrize("zero", ["0", "2"])
def test_accumulation_without_the_spanning_step_context_reduces_per_micro_batch(group_results, zero):
    """Negative control of the reduction count: each micro-batch a step of its own reduces twice."""
    got = group_results("accum", ACCUM_LAUNCH)[f"zero{zero}-no-span"]
    assert len(got["reductions"]) == 2, got["reductions"]
