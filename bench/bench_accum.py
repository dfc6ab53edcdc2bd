"""Gradient accumulation's cost: an optimizer step over N micro-batches of one row against one batch of N rows
of the same tokens (the same gradient, engine/accumulation.py), on a tiny Llama on the CPU.

    one_batch   one chunkwise_backward over a batch of N rows
    accumulate  N chunkwise_backward calls of 1 row each, divided by the step's token count, in one step
                context (what launch/train.py does with optim.grad_accum_steps N and data.batch_size 1)

Per row: `median_s` (median of --repeats steps after one warm-up; a step is the backward calls + an AdamW
update), `overhead_per_micro_ms` = (accumulate - one_batch) / (N - 1) for the same N (what each extra
micro-batch costs beyond its share of the work), `peak_bytes` (the heap peak of one step beyond what was live
before it: engine.memory.MemoryTracker) and `kv_bytes` (the K/V checkpoints + gradients the largest call
held). One process, no DeepSpeed: what is measured is chunk-wise backprop's per-call cost (a pass 1 and a
pass 2 per micro-batch), not DeepSpeed's. The machine is shared: its load average is recorded.

    python bench/bench_accum.py                     # N = 1, 2, 4, 8 rows of 512 tokens, chunk 128
    python bench/bench_accum.py --seq-len 512 --sizes 2,4 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.accumulation import count_step_tokens, step_context  # noqa: E402
from engine.chunkwise import chunkwise_backward  # noqa: E402
from engine.memory import MemoryTracker  # noqa: E402
from engine.schedule import ChunkSchedule  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def tiny_llama(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=1024, max_position_embeddings=8192, pad_token_id=0,
    )  # fmt: skip
    return transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").float()


def rows(n: int, seq_len: int) -> torch.Tensor:
    return torch.randint(1, 1024, (n, seq_len), generator=torch.Generator().manual_seed(n))


def step(model, opt, ids: torch.Tensor, micro: int, schedule: ChunkSchedule) -> int:
    """One optimizer step over `ids`, as `micro` micro-batches; returns the largest call's K/V bytes."""
    batches = [{"input_ids": part} for part in ids.chunk(micro)]
    tokens = count_step_tokens(model, batches)
    kv = 0
    with step_context(model):
        for i, b in enumerate(batches):
            stats = chunkwise_backward(
                model, b["input_ids"], schedule=schedule, num_items_in_batch=tokens.loss_tokens,
                last_micro_batch=i == micro - 1,
            )  # fmt: skip
            kv = max(kv, stats.kv_bytes)
    opt.step()
    opt.zero_grad(set_to_none=False)
    return kv


def measure(n: int, mode: str, args) -> dict:
    model = tiny_llama()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids, schedule = rows(n, args.seq_len), ChunkSchedule(chunk_size=args.chunk)
    micro = n if mode == "accumulate" else 1
    step(model, opt, ids, micro, schedule)  # warm-up: lazy allocations, .grad buffers
    with MemoryTracker("cpu") as mt:
        kv = step(model, opt, ids, micro, schedule)
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        step(model, opt, ids, micro, schedule)
        times.append(time.perf_counter() - t0)
    row = {"rows": n, "mode": mode, "micro_batches": micro, "tokens": n * args.seq_len}
    row.update(median_s=statistics.median(times), times_s=times, peak_bytes=mt.peak_bytes, kv_bytes=kv)
    row["load_avg"] = os.getloadavg()[0]
    return row


def table(results: list[dict]) -> str:
    lines = [
        f"{'rows':>4} {'mode':>10} {'micro':>5} {'tokens':>7} {'median s':>9} {'tok/s':>7} {'overhead/micro ms':>17} "
        f"{'peak MiB':>8} {'K/V MiB':>7} {'load':>5}"
    ]
    for r in results:
        over = r.get("overhead_per_micro_ms")
        lines.append(
            f"{r['rows']:>4} {r['mode']:>10} {r['micro_batches']:>5} {r['tokens']:>7} {r['median_s']:>9.3f} "
            f"{r['tokens'] / r['median_s']:>7.0f} {'' if over is None else f'{over:.1f}':>17} "
            f"{r['peak_bytes'] / 2**20:>8.1f} {r['kv_bytes'] / 2**20:>7.1f} {r['load_avg']:>5.1f}"
        )
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 4))
    for mode, marker in (("one_batch", "o"), ("accumulate", "s")):
        rs = [r for r in results if r["mode"] == mode]
        ns = [r["rows"] for r in rs]
        ax_t.plot(ns, [r["median_s"] for r in rs], marker=marker, label=mode)
        ax_m.plot(ns, [r["peak_bytes"] / 2**20 for r in rs], marker=marker, label=mode)
    ax_t.set(xlabel="rows per optimizer step (N)", ylabel="step time (s)", title="step time, same tokens")
    ax_m.set(xlabel="rows per optimizer step (N)", ylabel="heap peak (MiB)", title="peak memory of a step")
    for ax in (ax_t, ax_m):
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="1,2,4,8", help="rows per optimizer step (N)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--chunk", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--name", default="accum_cpu", help="bench/results/NAME.json and NAME.png")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # a shared 2-core machine: one thread keeps the two modes comparable
    results = []
    print(table([]), flush=True)  # the header; each row as it is measured
    for n in (int(x) for x in args.sizes.split(",")):
        batch = measure(n, "one_batch", args)
        rows_n = [batch]
        if n > 1:
            accum = measure(n, "accumulate", args)
            accum["overhead_per_micro_ms"] = 1e3 * (accum["median_s"] - batch["median_s"]) / (n - 1)
            rows_n.append(accum)
        results += rows_n
        print("\n".join(table(rows_n).splitlines()[1:]), flush=True)
    print("\n" + table(results))
    RESULTS.mkdir(exist_ok=True)
    meta = {"seq_len": args.seq_len, "chunk": args.chunk, "repeats": args.repeats, "threads": 1}
    meta["torch"], meta["transformers"] = torch.__version__, transformers.__version__
    (RESULTS / f"{args.name}.json").write_text(json.dumps({"config": meta, "results": results}, indent=1))
    plot(results, RESULTS / f"{args.name}.png")
    print(f"wrote {RESULTS / args.name}.json and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
