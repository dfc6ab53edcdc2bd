"""The GPU acceptance command: one GPU, under 8 minutes, one JSON under bench/results/ naming the device.

    python bench/gpu_check.py                      # on a machine with one CUDA GPU
    python bench/gpu_check.py --device cpu --dry-run --out /tmp/gpu_check   # the same code, tiny, on CPU

What it runs (each part records its own pass/fail and numbers; the exit status is 1 if any part failed):
  exactness   SeCO's gradient (chunkwise_backward) against plain full-sequence backprop of the same model, on
              the device, batch 2 with right padding and a -100 span, a length not divisible by the chunk,
              chunk sizes 7, 16 and one chunk; for each attention: sdpa (the engine runs its own mask-free
              GQA attention for it, engine/attention.py), eager, flash_attention_2 when flash-attn is
              installed; in float32 and bfloat16. Reference: the same weights in float64 with sdpa (float64 on
              the device; flash-attn cannot). float32 passes when SeCO's error is <= 1e-4 of the gradient's
              scale; bfloat16 when it is at most 2x plain bfloat16 backprop's own error (+1e-3 of the scale).
  offload     chunkwise_backward(offload_kv=True) (pinned host memory, copies on CUDA side streams): the
              same gradient as without offload, and a device peak that grows with L by less than half of what
              it grows by without offload (8 layers: one layer's K/V is on the device at a time, and on CUDA
              the next one's prefetch and the staged deposit); offload_kv="auto" too when the engine has it.
  table       a Llama-3.2-1B-shaped model (bfloat16) at several lengths: plain, ALST's stack, SeCO (and the
              variants the engine has: checkpointed chunks, fused loss, K/V offload) and SpaCO q=1/8: peak,
              device-side peak and median step time (bench/bench_vs_alst.py's rows, in this process).
  sequence    with 2+ GPUs visible (or --device cpu, as gloo processes): 2 ranks share each sequence
              (parallel.sequence 2, bench/sp_check.py): the group's gradient against float64 full backprop
              (<= 1e-4 of the gradient's scale) and half the K/V bytes per rank; skipped on one GPU.
CI never runs the CUDA part; tests/test_bench_smoke.py runs --device cpu --dry-run.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch
import transformers

from engine.chunkwise import ChunkOptions, ChunkSchedule, chunkwise_backward

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
IGNORE = -100


def _bench_vs_alst():
    spec = importlib.util.spec_from_file_location("bench_vs_alst", HERE / "bench_vs_alst.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ------------------------------------------------------------------------------------------- exactness


def tiny_model(device, dtype, attn: str, seed: int = 0, **over):
    fields = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=97, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                  max_position_embeddings=4096)  # fmt: skip
    cfg = transformers.LlamaConfig(**{**fields, **over})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=attn)
    return model.to(device=device, dtype=dtype).train()


def tiny_batch(device, seq: int = 37):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 97, (2, seq), generator=g)
    mask = torch.ones(2, seq, dtype=torch.long)
    mask[1, seq - 7 :], ids[1, seq - 7 :] = 0, 0
    labels = ids.masked_fill(mask == 0, IGNORE)
    labels[0, 5:9] = IGNORE
    return ids.to(device), labels.to(device), mask.to(device)


def flat_grads(model) -> torch.Tensor:
    return torch.cat([p.grad.detach().double().flatten() for p in model.parameters() if p.requires_grad])


def _zero(model) -> None:
    for p in model.parameters():
        p.grad = None


def gradient_of(model, batch, chunk: int | None, **kw) -> torch.Tensor:
    ids, labels, mask = batch
    _zero(model)
    if chunk is None:
        model(input_ids=ids, labels=labels, attention_mask=mask, use_cache=False).loss.backward()
    else:
        chunkwise_backward(
            model, ids, labels=labels, attention_mask=mask, schedule=ChunkSchedule(chunk_size=chunk), **kw
        )
    return flat_grads(model)


def exactness(device: torch.device, attns: list[str]) -> list[dict]:
    batch = tiny_batch(device)
    ref_model = tiny_model(device, torch.float64, "sdpa")
    ref = gradient_of(ref_model, batch, None)
    scale = float(ref.abs().max())
    rows = []
    for attn in attns:
        for dtype in (torch.float32, torch.bfloat16):
            model = tiny_model(device, dtype, attn)
            plain = float((gradient_of(model, batch, None) - ref).abs().max()) / scale
            for chunk in (7, 16, batch[0].shape[1]):
                err = float((gradient_of(model, batch, chunk) - ref).abs().max()) / scale
                ok = err <= 1e-4 if dtype == torch.float32 else err <= 2 * plain + 1e-3
                rows.append(dict(attn=attn, dtype=str(dtype)[6:], chunk=chunk, seco_rel_err=err,
                                 plain_rel_err=plain, passed=bool(ok)))  # fmt: skip
                print(f"  exactness {attn:18s} {str(dtype)[6:]:9s} chunk {chunk:3d}: SeCO {err:.2e}, "
                      f"plain {plain:.2e} {'ok' if ok else 'FAIL'}", flush=True)  # fmt: skip
    return rows


# --------------------------------------------------------------------------------------------- offload


def offload(device: torch.device, lengths: tuple[int, int], chunk: int, over: dict) -> dict:
    from engine.memory import MemoryTracker

    model = tiny_model(device, torch.float32, "sdpa", **over)
    out: dict = {"lengths": list(lengths), "chunk": chunk, "rows": []}
    variants = [("on_device", {}), ("offload", {"offload_kv": True})]
    variants.append(("auto", {"offload_kv": "auto", "kv_device_budget": 1 << 20}))
    grads = {}
    for L in lengths:
        g = torch.Generator().manual_seed(L)
        ids = torch.randint(3, model.config.vocab_size, (1, L), generator=g).to(device)
        for name, kw in variants:
            _zero(model)
            gc.collect()
            with MemoryTracker(device) as mt:
                st = chunkwise_backward(
                    model,
                    ids,
                    schedule=ChunkSchedule(chunk_size=chunk),
                    options=ChunkOptions(fused_loss=False, **kw),
                )
            grads[(name, L)] = flat_grads(model)
            on_host = st.kv_bytes if (name != "on_device" and device.type == "cpu") else 0
            out["rows"].append(dict(variant=name, seq_len=L, peak_bytes=mt.peak_bytes, kv_bytes=st.kv_bytes,
                                    device_peak_bytes=mt.peak_bytes - on_host))  # fmt: skip
    at = {(r["variant"], r["seq_len"]): r for r in out["rows"]}
    a, b = lengths
    diffs = {n: float((grads[(n, b)] - grads[("on_device", b)]).abs().max()) for n, _ in variants[1:]}
    growth = {n: at[(n, b)]["device_peak_bytes"] - at[(n, a)]["device_peak_bytes"] for n, _ in variants}
    kv_growth = at[("on_device", b)]["kv_bytes"] - at[("on_device", a)]["kv_bytes"]
    scale = float(grads[("on_device", b)].abs().max())
    out.update(grad_max_abs_diff=diffs, device_peak_growth=growth, kv_growth=kv_growth)
    out["passed"] = (
        all(d <= 1e-6 * scale for d in diffs.values()) and growth["offload"] < growth["on_device"] / 2
    )
    print(f"  offload: grad diffs {diffs}, device-peak growth {growth} vs K/V growth {kv_growth}: "
          f"{'ok' if out['passed'] else 'FAIL'}", flush=True)  # fmt: skip
    return out


# ----------------------------------------------------------------------------------------------- table


def table(device: torch.device, dry_run: bool, lengths: list[int]) -> dict:
    bench = _bench_vs_alst()
    if dry_run:
        dims = "--hidden 32 --layers 1 --heads 2 --kv-heads 1 --intermediate 64 --vocab 128 --chunk 32 --dtype float32"
    else:  # Llama-3.2-1B's shape (its head untied here: 1.5B parameters)
        dims = "--hidden 2048 --layers 16 --heads 32 --kv-heads 8 --intermediate 8192 --vocab 128256 --chunk 1024"
        dims += " --dtype bfloat16"
    args = bench.parser.parse_args(
        [*dims.split(), "--device", str(device), "--threads", "0", "--repeats", "1"]
    )
    args.lengths = lengths
    methods = ["plain", "alst", "seco", "seco_ckpt", "seco_fused", "seco_ckpt_fused", "spaco"]
    methods += [] if device.type == "cpu" else ["seco_offload"]
    rows = []
    for L in lengths:
        for m in methods:
            row = {"method": m, "seq_len": L, "skipped": bench.supported(m)}
            if not row["skipped"]:
                try:
                    row.update(bench.one_row(args, m, L))
                except torch.OutOfMemoryError:
                    row["skipped"] = "out of memory"
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            rows.append(row)
            done = "" if row["skipped"] else f"{row['peak_bytes'] / 2**20:.0f} MiB, {row['median_s']:.2f} s"
            print(f"  table L={L:6d} {m:16s} {row['skipped'] or done}", flush=True)
    return {"config": {k: v for k, v in vars(args).items() if k != "child"}, "rows": rows,
            **bench.summarize(rows)}  # fmt: skip


# ------------------------------------------------------------------------------------------------ main


def stem_of(out: str | None, name: str) -> Path:
    slug = "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")
    stem = Path(out or RESULTS / f"gpu_check_{slug}")
    stem.parent.mkdir(parents=True, exist_ok=True)
    return stem


def sequence(device: torch.device, stem: Path) -> dict:
    """bench/sp_check.py on 2 ranks: one GPU each, or gloo processes on CPU; skipped with fewer GPUs."""
    if device.type == "cuda" and torch.cuda.device_count() < 2:
        return {"skipped": f"needs 2 GPUs, {torch.cuda.device_count()} visible", "passed": True}
    spec = importlib.util.spec_from_file_location("sp_check", HERE / "sp_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    res = mod.run(device.type, 2, stem.with_suffix(".sequence.json"))
    print(f"  sequence parallel (2 ranks): {'ok' if res['passed'] else 'FAIL'} {res}", flush=True)
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes (the CPU test of this script)")
    p.add_argument("--lengths", default="8192,32768,65536", help="the table's lengths (default for one GPU)")
    p.add_argument("--parts", default="exactness,offload,table,sequence")
    p.add_argument("--out", help="output stem (default bench/results/gpu_check_<device name>)")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device here (use --device cpu --dry-run for the CPU check of this script)")
        return 2
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    parts = a.parts.split(",")
    t0 = time.perf_counter()
    res: dict = {"device": name, "dry_run": a.dry_run, "torch": torch.__version__,
                 "transformers": transformers.__version__, "cuda": torch.version.cuda}  # fmt: skip
    attns = ["sdpa", "eager"]
    if importlib.util.find_spec("flash_attn") is not None and device.type == "cuda":
        attns.append("flash_attention_2")
    if "exactness" in parts:
        res["exactness"] = exactness(device, attns)
    if "offload" in parts:
        if a.dry_run:
            res["offload"] = offload(device, (128, 512), 32, {})
        else:
            big = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=8, vocab_size=1000)
            res["offload"] = offload(device, (4096, 16384), 512, big)
    if "table" in parts:
        lengths = [64, 128] if a.dry_run else [int(x) for x in a.lengths.split(",")]
        res["table"] = table(device, a.dry_run, lengths)
    if "sequence" in parts:
        res["sequence"] = sequence(device, stem_of(a.out, name))
    res["passed"] = (
        all(r["passed"] for r in res.get("exactness", []))
        and res.get("offload", {}).get("passed", True)
        and res.get("sequence", {}).get("passed", True)
    )
    res["wall_s"] = time.perf_counter() - t0
    stem = stem_of(a.out, name)
    stem.with_suffix(".json").write_text(json.dumps(res, indent=1))
    print(
        f"{'passed' if res['passed'] else 'FAILED'} in {res['wall_s']:.0f} s; wrote {stem.with_suffix('.json')}"
    )
    return 0 if res["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
