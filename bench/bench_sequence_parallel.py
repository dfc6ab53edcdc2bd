"""Sequence parallelism on CPU: per-rank peak memory, K/V bytes and step time for P = 1, 2 at equal lengths.

Each configuration runs P processes on gloo (RANK / WORLD_SIZE / MASTER_* set, as torchrun would), each one
SeCO step of a small random Llama (float32; `--model hybrid`: a Qwen3.5-shaped hybrid, 3 gated-delta-rule
layers to 1 attention layer, its mixers split by heads for P = 2) through chunkwise_backward with a
SequenceGroup of all P ranks:

    peak      rank 0's tensor memory allocated inside the step, beyond what was live before it
              (engine.memory.MemoryTracker: live tensor storages; weights and zeroed .grad excluded)
    kv        rank 0's K/V checkpoints + K/V gradients (ChunkStats.kv_bytes, recurrent states included)
    state     of which recurrent layers' boundary states and their gradients (ChunkStats.state_bytes)
    step      wall time of the step (median of --repeats after one warm-up)
    a2a       the share of the step spent inside all-to-alls (torch.profiler's CPU time of the collective
              ops, forward and backward, on rank 0)

The P ranks share this machine's cores, so times say little about a real interconnect: the all-to-all share
is what gloo on shared CPUs costs, and P = 2 has half the cores per rank. Memory is the point here.

    python bench/bench_sequence_parallel.py                 # ~3 min on 2 cores
    python bench/bench_sequence_parallel.py --lengths 1024,2048 --repeats 1
    python bench/bench_sequence_parallel.py --model hybrid  # -> sequence_parallel_hybrid_cpu.*
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
MODEL = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=4, vocab_size=1024, max_position_embeddings=1 << 16)  # fmt: skip
HYBRID = dict(MODEL, head_dim=32, linear_num_key_heads=4, linear_num_value_heads=8, linear_key_head_dim=32,
              linear_value_head_dim=32,
              layer_types=["linear_attention"] * 3 + ["full_attention"])  # fmt: skip
MODELS = {"llama": ("LlamaConfig", MODEL), "hybrid": ("Qwen3_5TextConfig", HYBRID)}


def worker(args) -> None:
    import torch.distributed as dist
    import transformers

    from engine.chunkwise import ChunkOptions, ChunkSchedule, chunkwise_backward
    from engine.memory import MemoryTracker
    from engine.sequence_parallel import SequenceGroup

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    group = SequenceGroup() if dist.get_world_size() > 1 else None
    torch.manual_seed(0)
    config_cls, fields = MODELS[args.model]
    cfg = getattr(transformers, config_cls)(**fields)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").float()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    ids = torch.randint(0, cfg.vocab_size, (1, args.length), generator=torch.Generator().manual_seed(1))

    def step():
        return chunkwise_backward(
            model,
            ids,
            schedule=ChunkSchedule(chunk_size=args.chunk),
            options=ChunkOptions(fused_loss=True),
            sequence_group=group,
        )

    with MemoryTracker("cpu") as mt:
        stats = step()
    times, a2a = [], []
    for _ in range(args.repeats):
        dist.barrier()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        names = ("all_to_all", "alltoall")  # the op's name, and gloo's c10d op
        comm = sum(
            e.self_cpu_time_total for e in prof.key_averages() if any(n in e.key.lower() for n in names)
        )
        a2a.append(comm / 1e6 / times[-1])
    if dist.get_rank() == 0:
        out = {"peak": mt.peak_bytes, "kv": stats.kv_bytes, "state": stats.state_bytes,
               "step_s": statistics.median(times), "a2a_share": statistics.median(a2a)}  # fmt: skip
        Path(args.out).write_text(json.dumps(out))
    dist.barrier()
    dist.destroy_process_group()


def run(p: int, length: int, args) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = Path(args.results) / f".sp_{p}_{length}.json"
    env = dict(
        os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(p), OMP_NUM_THREADS="1"
    )
    cmd = [sys.executable, __file__, "--worker", "--length", str(length), "--chunk", str(args.chunk)]
    cmd += ["--repeats", str(args.repeats), "--model", args.model, "--out", str(out)]
    procs = [subprocess.Popen(cmd, env=dict(env, RANK=str(r))) for r in range(p)]
    if any(proc.wait(timeout=1800) for proc in procs):
        raise RuntimeError(f"P={p} L={length} failed")
    result = json.loads(out.read_text())
    out.unlink()
    return result


def main() -> None:
    a = argparse.ArgumentParser()
    a.add_argument("--worker", action="store_true")
    a.add_argument("--lengths", default="1024,2048,4096")
    a.add_argument("--length", type=int)
    a.add_argument("--chunk", type=int, default=256)
    a.add_argument("--ranks", default="1,2")
    a.add_argument("--repeats", type=int, default=2)
    a.add_argument("--model", default="llama", choices=sorted(MODELS))
    a.add_argument("--out")
    a.add_argument("--results", default=str(RESULTS), help="where the JSON and PNG go")
    args = a.parse_args()
    if args.worker:
        return worker(args)
    results = Path(args.results)
    results.mkdir(exist_ok=True)
    rows = []
    for length in [int(x) for x in args.lengths.split(",")]:
        for p in [int(x) for x in args.ranks.split(",")]:
            r = {"P": p, "length": length, **run(p, length, args)}
            rows.append(r)
            print(f"P={p} L={length:6d}  peak {r['peak'] / 2**20:8.1f} MiB  kv {r['kv'] / 2**20:7.1f} MiB  "
                  f"(states {r['state'] / 2**20:5.2f} MiB)  step {r['step_s']:6.2f} s  "
                  f"all-to-all {r['a2a_share']:.0%}", flush=True)  # fmt: skip
    config_cls, fields = MODELS[args.model]
    meta = {"model": {"class": config_cls, **fields}, "chunk": args.chunk, "dtype": "float32", "device": "cpu",
            "repeats": args.repeats}  # fmt: skip
    name = "sequence_parallel_cpu" if args.model == "llama" else f"sequence_parallel_{args.model}_cpu"
    (results / f"{name}.json").write_text(json.dumps({"config": meta, "rows": rows}, indent=1))
    plot(rows, results / f"{name}.png")


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for p in sorted({r["P"] for r in rows}):
        mine = [r for r in rows if r["P"] == p]
        xs = [r["length"] for r in mine]
        axes[0].plot(xs, [r["peak"] / 2**20 for r in mine], "o-", label=f"P={p}")
        axes[1].plot(xs, [r["kv"] / 2**20 for r in mine], "o-", label=f"P={p}")
    for ax, title in zip(axes, ("per-rank step peak (MiB)", "per-rank K/V + K/V grads (MiB)")):
        ax.set_xlabel("sequence length")
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
