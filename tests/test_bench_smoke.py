"""The benchmark scripts run end to end on tiny settings and write their JSON (seconds, not a measurement)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


TINY_MODEL = ["--hidden", "32", "--layers", "1", "--heads", "2", "--kv-heads", "1", "--threads", "1"]


def test_bench_memory_time(tmp_path):
    pytest.importorskip("matplotlib")
    bench = _load("bench_memory_time")
    stem = tmp_path / "mt"
    argv = [*TINY_MODEL, "--intermediate", "64", "--vocab", "128", "--lengths", "64,128", "--chunk", "32"]
    argv += ["--spaco-chunks", "4", "--repeats", "1", "--out", str(stem)]
    bench.main(argv)
    out = json.loads(stem.with_suffix(".json").read_text())
    ran = {(r["method"], r["seq_len"]) for r in out["rows"] if not r["skipped"]}
    assert ran == {(m, L) for m in bench.METHODS for L in (64, 128)}
    assert all(r["peak_bytes"] > 0 and r["median_s"] > 0 for r in out["rows"])
    assert out["planned"]["seq_len"] == 128 and 0.85 < out["planned"]["seco_peak_over_planned"] < 1.15
    assert set(out["time_ratios"]) >= {"seco_over_plain", "spaco32_over_forward", "seco_over_spaco"}
    assert "seco" in out["longest_trainable"]
    assert Path(f"{stem}_memory.png").exists() and Path(f"{stem}_time.png").exists()


def test_bench_kv_offload_reports_the_device_side_peak(tmp_path):
    bench = _load("bench_memory_time")
    stem = tmp_path / "off"
    argv = [*TINY_MODEL, "--intermediate", "64", "--vocab", "128", "--lengths", "64,256", "--chunk", "32"]
    bench.main([*argv, "--methods", "seco,seco_offload", "--repeats", "0", "--no-plot", "--out", str(stem)])
    rows = {(r["method"], r["seq_len"]): r for r in json.loads(stem.with_suffix(".json").read_text())["rows"]}
    for L in (64, 256):
        off = rows[("seco_offload", L)]
        assert off["device_peak_bytes"] == off["peak_bytes"] - off["kv_bytes"] > 0
        assert "device_peak_bytes" not in rows[("seco", L)]
    # K/V grow 4x from 64 to 256 tokens; what offloading leaves on the device grows by less than they do
    grow = rows[("seco_offload", 256)]["device_peak_bytes"] - rows[("seco_offload", 64)]["device_peak_bytes"]
    assert grow < rows[("seco_offload", 256)]["kv_bytes"] - rows[("seco_offload", 64)]["kv_bytes"]


def test_bench_memory_time_skips_over_budget(tmp_path):
    bench = _load("bench_memory_time")
    stem = tmp_path / "mt"
    argv = [*TINY_MODEL, "--intermediate", "64", "--vocab", "128", "--lengths", "64,128", "--chunk", "32"]
    argv += ["--methods", "forward,plain", "--repeats", "1", "--mem-budget-gib", "1e-9", "--no-plot"]
    bench.main([*argv, "--out", str(stem)])
    rows = json.loads(stem.with_suffix(".json").read_text())["rows"]
    assert [r["skipped"] is None for r in rows] == [True, True, False, False]  # 128 predicted over budget
    assert "mem-budget" in rows[-1]["skipped"]


def test_learning_curves(tmp_path):
    lc = _load("learning_curves")
    stem = tmp_path / "lc"
    argv = [*TINY_MODEL, "--steps", "3", "--batch", "2", "--seq-len", "128", "--chunk", "32"]
    argv += ["--eval-every", "2", "--eval-samples", "2", "--no-plot", "--out", str(stem)]
    lc.main(argv)
    out = json.loads(stem.with_suffix(".json").read_text())
    assert set(out["runs"]) == set(lc.DEFAULT_METHODS)
    assert all(len(r["train_loss"]) == 3 for r in out["runs"].values())
    # SeCO is exact: same init, same data, same updates as plain backprop
    assert out["summary"]["seco_vs_plain_max_abs_train_loss_diff"] < 1e-4


def test_learning_curves_float64_and_merge(tmp_path):
    """Methods run as separate processes merge into one result; float64 plain and SeCO agree to rounding."""
    pytest.importorskip("matplotlib")
    lc = _load("learning_curves")
    argv = [*TINY_MODEL, *"--steps 3 --batch 2 --seq-len 64 --chunk 16 --dtype float64".split()]
    argv += [*"--eval-every 2 --eval-samples 2 --no-plot".split()]
    a, b, c, m = (str(tmp_path / x) for x in "abcm")
    lc.main([*argv, "--methods", "seco,plain_split", "--out", a])
    lc.main([*argv, "--methods", "plain", "--threads", "2", "--steps", "4", "--out", b])  # may run longer
    merged = lc.main(["--merge", f"{a}.json", f"{b}.json", "--out", m])
    assert list(merged["runs"]) == ["plain", "seco", "plain_split"]  # canonical order, whatever the files'
    assert merged["summary"]["seco_vs_plain_max_abs_train_loss_diff"] < 1e-12
    assert merged["summary"]["plain_split_vs_plain_max_abs_train_loss_diff"] < 1e-12
    assert merged["config"]["steps_per_method"] == {"plain": 4, "seco": 3, "plain_split": 3}
    assert Path(f"{m}.png").exists()
    lc.main([*argv, "--methods", "spaco", "--sample-prob", "0.5", "--out", c])
    lc.main([*argv, "--methods", "spaco", "--sample-prob", "0.75", "--out", f"{c}2"])
    both = lc.main(["--merge", f"{c}.json", f"{c}2.json", f"{b}.json", "--out", f"{m}2"])
    assert list(both["runs"]) == ["plain", "spaco q=0.5", "spaco q=0.75"]
    assert both["config"]["sample_prob"] == [0.5, 0.75] and Path(f"{m}2.png").exists()
    lc.main([*argv, "--methods", "truncated", "--lr", "2e-3", "--out", c])
    with pytest.raises(ValueError, match=r"differs in \['lr'\]"):
        lc.merge([f"{a}.json", f"{c}.json"])


def test_alst_stack_computes_plain_gradients():
    """The bench's ALST stack (non-reentrant checkpointing + DeepSpeed's TiledMLP + TiledFusedLogitsLoss) and
    SeCO give plain backprop's gradients, in float64: the comparison is between equal computations."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("deepspeed")
    bench = _load("bench_vs_alst")
    args = bench.parser.parse_args(
        [
            *TINY_MODEL,
            "--heads",
            "4",
            "--kv-heads",
            "2",
            "--layers",
            "2",
            "--intermediate",
            "64",
            "--vocab",
            "97",
        ]
    )
    args.lengths, args.chunk = [100], 16  # 100 tokens: TiledMLP's 4 shards and the loss's 7 slices are uneven
    ids = torch.randint(3, 97, (1, 100), generator=torch.Generator().manual_seed(0))
    grads = {}
    for method in ("plain", "alst", "seco"):
        model = bench.build_model(args).double()
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        bench.prepare(model, method)
        bench.step(model, method, ids, args, seed=0)
        grads[method] = torch.cat([p.grad.flatten() for p in model.parameters()])
    scale = grads["plain"].abs().max()
    assert (grads["alst"] - grads["plain"]).abs().max() <= 1e-12 * scale
    assert (grads["seco"] - grads["plain"]).abs().max() <= 1e-6 * scale


def test_bench_vs_alst(tmp_path):
    bench = _load("bench_vs_alst")
    stem = tmp_path / "va"
    argv = [*TINY_MODEL, "--intermediate", "64", "--vocab", "128", "--lengths", "64", "--chunk", "32"]
    argv += ["--methods", "alst,seco", "--repeats", "0", "--same-process", "--no-plot", "--out", str(stem)]
    out = bench.main(argv)  # the fresh process per row is the default; the same code runs in this one
    rows = {r["method"]: r for r in out["rows"]}
    assert rows["alst"]["peak_bytes"] > 0 and rows["seco"]["kv_bytes"] > 0
    # device-side: SeCO's K/V + grads, ALST's checkpointed hidden states (1 layer x 64 tokens x 32 x fp32)
    assert rows["seco"]["device_peak_bytes"] == rows["seco"]["peak_bytes"] - rows["seco"]["kv_bytes"]
    assert rows["alst"]["device_peak_bytes"] == rows["alst"]["peak_bytes"] - 64 * 32 * 4
    assert 0.85 < rows["seco"]["peak_bytes"] / rows["seco"]["predicted_peak_bytes"] < 1.15
    assert set(out["ratios"]) >= {"seco_device_peak_over_alst", "seco_time_over_alst"}
    assert json.loads(stem.with_suffix(".json").read_text())["machine"]["cpus"] >= 1


def test_gpu_check_dry_run_on_cpu(tmp_path):
    """bench/gpu_check.py's CPU-independent parts (exactness, offload, the table) on tiny sizes: the GPU
    acceptance command itself needs CUDA, which CI never has."""
    gpu = _load("gpu_check")
    stem = tmp_path / "gc"
    assert gpu.main(["--device", "cpu", "--dry-run", "--parts", "exactness,offload", "--out", str(stem)]) == 0
    out = json.loads(stem.with_suffix(".json").read_text())
    assert out["device"] == "cpu" and out["passed"]
    assert {(r["attn"], r["dtype"]) for r in out["exactness"]} == {
        (a, d) for a in ("sdpa", "eager") for d in ("float32", "bfloat16")
    }
    growth = out["offload"]["device_peak_growth"]
    assert growth["offload"] < growth["on_device"] / 2 and out["offload"]["kv_growth"] > 0
    if not torch_cuda():
        assert gpu.main(["--device", "cuda"]) == 2  # says there is no GPU, writes nothing


def torch_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def test_bench_sequence_parallel(tmp_path):
    """Two ranks share a 64-token sequence: rank 0 holds half of the K/V heads."""
    cmd = [
        sys.executable,
        str(BENCH / "bench_sequence_parallel.py"),
        "--lengths",
        "64",
        "--chunk",
        "32",
        "--ranks",
        "2",
        "--repeats",
        "1",
    ]
    subprocess.run([*cmd, "--results", str(tmp_path)], check=True, timeout=600, capture_output=True)
    (row,) = json.loads((tmp_path / "sequence_parallel_cpu.json").read_text())["rows"]
    # 4 layers x 2 of 4 K/V heads x 64 tokens x 32 (head_dim) x K and V x float32 value + gradient
    assert row["P"] == 2 and row["kv"] == 4 * 2 * 64 * 32 * 2 * 8
    assert (tmp_path / "sequence_parallel_cpu.png").is_file()


def test_gpu_check_sequence_part_on_cpu(tmp_path):
    """The GPU acceptance command's sequence-parallel part (2 ranks; gloo processes here): exact and half
    the K/V bytes per rank."""
    gpu = _load("gpu_check")
    stem = tmp_path / "gc"
    assert gpu.main(["--device", "cpu", "--dry-run", "--parts", "sequence", "--out", str(stem)]) == 0
    out = json.loads(stem.with_suffix(".json").read_text())["sequence"]
    assert out["passed"] and out["kv_ratio"] == 0.5 and out["rel_err"] <= 1e-4
