"""Peak memory and step time of one training step, side by side, for the same model and sequence lengths:

    forward   torch.no_grad() full-sequence forward computing the loss (inference cost, the SpaCO target)
    plain     full-sequence forward + backward
    ckpt      the same with HF activation checkpointing (every decoder layer)
    seco      chunkwise_backward(mode="seco"), chunk --chunk, the whole-chunk loss (fused_loss=False, as planned)
    seco_offload  the same with offload_kv=True (opt-in: --methods ...,seco_offload); its row also reports the
              device-side peak: on CPU, the peak minus the host-resident K/V and K/V grads
    spaco     chunkwise_backward(mode="spaco"), chunk --chunk, t = max(1, round(q k)) of k chunks
    spaco32   the same with the sequence cut into --spaco-chunks (32) chunks: t = round(q 32) = 4 for q = 1/8

What "peak" means: the peak of tensor memory allocated *inside* the step, beyond what was live before it.
Weights and their .grad buffers are allocated before the step (grads zero-filled, so no method allocates
them), hence excluded; anything a method allocates during the step (activations, logits, K/V and their
gradients, the fp32 gradient accumulators chunkwise_backward keeps for 16-bit weights) is included.
CPU: engine.memory.MemoryTracker's dispatch-mode count of live tensor storages (not allocator caching,
not kernel-internal scratch). CUDA: torch.cuda.max_memory_allocated minus memory_allocated at entry.
`--rss` adds a cross-check: each (method, length) runs again in a fresh process, reporting its peak RSS
during the step minus its RSS just before it (Linux VmHWM after resetting it via /proc/self/clear_refs).

SpaCO runs use the fixed t-of-k sampler (the same number of chunks every repeat, the Bernoulli sampler's
expected cost q k); the chunks drawn vary with the repeat's seed.

Time: median over --repeats timed steps that follow one untimed, memory-tracked warm-up step; methods are
interleaved within each repeat so that load from other processes hits them alike. Configurations whose
predicted step time (extrapolated from the method's shorter lengths) exceeds --max-step-s, or whose
predicted peak exceeds --mem-budget-gib, are skipped and marked so in the table, as is everything once the
global --time-budget is spent.

    python bench/bench_memory_time.py                         # CPU default, ~10 min on 2 cores
    python bench/bench_memory_time.py --device cuda --preset 1b
    python bench/bench_memory_time.py --hidden 64 --layers 2 --vocab 512 --lengths 256,512 --chunk 128
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import transformers

from engine.chunkwise import ChunkOptions, ChunkSchedule, chunkwise_backward
from engine.memory import MemoryTracker
from engine.plan import plan

METHODS = ("forward", "plain", "ckpt", "seco", "spaco", "spaco32")
# seco_offload: SeCO with K/V + K/V grads in pinned host memory. Only a GPU run shows its effect (device
# memory stays flat); on CPU host and device are the same memory. Not in the default set: --methods.
OPTIONAL = ("seco_offload",)
TRAINING = ("plain", "ckpt", "seco", "spaco", "spaco32", "seco_offload")
RESULTS = Path(__file__).resolve().parent / "results"
MiB, GiB = 2**20, 2**30

PRESETS = {
    # ~20M parameters (Llama-2 vocabulary), fp32: the CPU default, about ten minutes on two shared cores
    "small": dict(
        hidden=256, layers=4, heads=4, kv_heads=1, intermediate=704, vocab=32000, dtype="float32",
        lengths="1024,2048,4096,8192,16384", chunk=512, fit_budget_gib=1.0, tie=False,
    ),
    # ~55M parameters, fp32: the same study on a CPU with more time or cores
    "55m": dict(
        hidden=512, layers=8, heads=8, kv_heads=2, intermediate=1408, vocab=32000, dtype="float32",
        lengths="1024,2048,4096,8192,16384", chunk=512, fit_budget_gib=1.0, tie=False,
    ),
    # Llama-3.2-1B shape (1.24B parameters, tied embeddings), bf16, for one GPU
    "1b": dict(
        hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=8192, vocab=128256, dtype="bfloat16",
        lengths="2048,4096,8192,16384,32768,65536", chunk=1024, fit_budget_gib=16.0, tie=True,
    ),
}  # fmt: skip

# fmt: off
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--device", default="cpu")
parser.add_argument("--preset", default="small", choices=sorted(PRESETS), help="defaults for the flags below")
parser.add_argument("--hidden", type=int)
parser.add_argument("--layers", type=int)
parser.add_argument("--heads", type=int)
parser.add_argument("--kv-heads", type=int)
parser.add_argument("--intermediate", type=int)
parser.add_argument("--vocab", type=int)
parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"))
parser.add_argument("--lengths", help="comma-separated sequence lengths")
parser.add_argument("--chunk", type=int)
parser.add_argument("--batch", type=int, default=1)
parser.add_argument("--methods", default=",".join(METHODS))
parser.add_argument("--sample-prob", type=float, default=1 / 8, help="SpaCO's q")
parser.add_argument("--spaco-chunks", type=int, default=32, help="number of chunks of the spaco32 method")
parser.add_argument("--repeats", type=int, default=3, help="timed steps per config after a warm-up (0: memory only)")
parser.add_argument("--repeat-budget-s", type=float, default=30, help="fewer repeats (>= 1) past this time")
parser.add_argument("--max-step-s", type=float, default=60, help="skip configs predicted slower than this")
parser.add_argument("--mem-budget-gib", type=float, default=6, help="skip configs predicted above this peak")
parser.add_argument("--time-budget", type=float, default=600, help="stop starting configs after this (s)")
parser.add_argument("--fit-budget-gib", type=float, help="memory for the 'longest trainable sequence' fit")
parser.add_argument("--attn", default="sdpa")
parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
parser.add_argument("--rss", action="store_true", help="cross-check: peak RSS of a fresh process per config")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--out", help="output stem (default bench/results/memory_time_<device>)")
parser.add_argument("--no-plot", action="store_true")
parser.add_argument("--from-json", help="measure nothing: re-summarise, re-print and re-plot a saved result")
parser.add_argument("--child", help=argparse.SUPPRESS)  # "method:length": one step in this process (--rss)
# fmt: on


def parse_args(argv=None):
    args = parser.parse_args(argv)
    for k, v in PRESETS[args.preset].items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    args.lengths = [int(x) for x in str(args.lengths).split(",") if x]
    args.methods = [m for m in args.methods.split(",") if m]
    assert set(args.methods) <= set(METHODS + OPTIONAL), args.methods
    args.out = args.out or str(RESULTS / f"memory_time_{torch.device(args.device).type}")
    return args


# -----------------------------------------------------------------------------------------------------------
# model, steps, the planner's prediction


def model_config(args) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        intermediate_size=args.intermediate,
        vocab_size=args.vocab,
        max_position_embeddings=max(args.lengths),
        tie_word_embeddings=args.tie,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def build_model(args):
    cfg = model_config(args)
    torch.manual_seed(args.seed)
    with torch.device(args.device):
        model = transformers.AutoModelForCausalLM.from_config(
            cfg, attn_implementation=args.attn, dtype=getattr(torch, args.dtype)
        )
    model.train()  # dropout is 0 in Llama configs; train mode is what turns checkpointing on
    for p in model.parameters():  # grads exist before every step: no method is charged for them
        p.grad = torch.zeros_like(p)
    return model


@contextlib.contextmanager
def checkpointing(model):
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
    enable()
    try:
        yield
    finally:
        disable()
        model.disable_input_require_grads()  # enable() hooked the embeddings; disable() leaves the hook


def num_chunks(method: str, seq_len: int, args) -> tuple[int, int]:
    """(chunk size, number of chunks) of a chunk-wise method at this length."""
    chunk = math.ceil(seq_len / args.spaco_chunks) if method == "spaco32" else args.chunk
    return chunk, math.ceil(seq_len / chunk)


def run_step(model, method: str, ids: torch.Tensor, args, repeat: int = 0) -> dict:
    """One step of `method`; gradients are added to the (pre-allocated) .grad buffers."""
    info = {}
    if method == "forward":
        with torch.no_grad():
            model(input_ids=ids, labels=ids, use_cache=False).loss.item()
    elif method in ("plain", "ckpt"):
        ctx = checkpointing(model) if method == "ckpt" else contextlib.nullcontext()
        with ctx:
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    else:
        chunk, k = num_chunks(method, ids.shape[1], args)
        draw = {}
        if method not in ("seco", "seco_offload"):
            draw = dict(mode="spaco", sampler="fixed", budget=max(1, round(args.sample_prob * k)))
        st = chunkwise_backward(
            model,
            ids,
            schedule=ChunkSchedule(chunk_size=chunk, **draw),
            options=ChunkOptions(offload_kv=method == "seco_offload", fused_loss=False),
            generator=torch.Generator().manual_seed(args.seed * 1000 + repeat),
        )
        info = {"chunk": chunk, "num_chunks": k, "selected": len(st.selected), "kv_bytes": st.kv_bytes}
    return info


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(model, method, ids, args, repeat, track: bool) -> dict:
    device = ids.device
    gc.collect()
    sync(device)
    ctx = MemoryTracker(device) if track else contextlib.nullcontext()
    t0 = time.perf_counter()
    with ctx:
        info = run_step(model, method, ids, args, repeat)
        sync(device)
    info["seconds"] = time.perf_counter() - t0
    if track:
        info["peak_bytes"] = ctx.peak_bytes
        if method == "seco_offload":
            # What would stay on an accelerator: on CUDA the tracker never sees the host-resident K/V and K/V
            # grads; on CPU host and "device" are one memory, so take them (allocated for the whole step,
            # hence part of the peak) back out.
            info["device_peak_bytes"] = ctx.peak_bytes - (info["kv_bytes"] if device.type == "cpu" else 0)
    return info


def planned_peak(args, seq_len: int, chunk: int | None = None) -> dict:
    """The step's predicted peak beyond weights + grads, from the planner (engine/plan: the one memory model):
    K/V checkpoints, their gradients, and one chunk's saved activations plus its largest backward transient."""
    cfg = model_config(args)
    chunk = min(chunk or args.chunk, seq_len)
    p = plan(cfg, dtype=args.dtype, chunk_size=chunk, seq_len=seq_len, batch=args.batch, attn=args.attn,
             backend="local", device=torch.device(args.device).type, fused_loss=False)  # fmt: skip
    return {
        "kv_bytes": p.kv, "kv_grad_bytes": p.kv_grads, "chunk_act_bytes": p.activations + p.transient,
        "planned_bytes": p.step_bytes, "formula": "engine.plan.plan(..., backend='local').step_bytes",
    }  # fmt: skip


# -----------------------------------------------------------------------------------------------------------
# --rss: one step in a fresh process


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def child_main(args) -> None:
    method, seq_len = args.child.split(":")
    model = build_model(args)
    ids = torch.randint(3, args.vocab, (args.batch, int(seq_len)), device=args.device)
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM (peak RSS) to the current RSS: the model build does not count
    before = _status_kib("VmRSS")
    run_step(model, method, ids, args)
    peak = _status_kib("VmHWM")
    print(json.dumps({"rss_before_bytes": before * 1024, "rss_peak_delta_bytes": (peak - before) * 1024}))


def rss_of(method: str, seq_len: int, argv: list[str]) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--child", f"{method}:{seq_len}"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# -----------------------------------------------------------------------------------------------------------
# the benchmark


def predict(points: list[tuple[int, float]], seq_len: int, min_exp: float = 1.0) -> float | None:
    """Extrapolate a measured quantity to seq_len with the power law through its last two points (exponent
    clipped to [min_exp, 2]; 1.5 from a single point)."""
    if not points:
        return None
    (l1, v1) = points[-1]
    exp = 1.5
    if len(points) > 1:
        (l0, v0) = points[-2]
        exp = math.log(max(v1, 1e-9) / max(v0, 1e-9)) / math.log(l1 / l0)
    return v1 * (seq_len / l1) ** min(2.0, max(min_exp, exp))


def linear_fit(points: list[tuple[int, float]]) -> tuple[float, float] | None:
    """Least-squares peak(L) = a + b L."""
    if len(points) < 2:
        return None
    n = len(points)
    mx, my = sum(p[0] for p in points) / n, sum(p[1] for p in points) / n
    sxx = sum((p[0] - mx) ** 2 for p in points)
    b = sum((p[0] - mx) * (p[1] - my) for p in points) / sxx
    return my - b * mx, b


def run_benchmark(args, argv) -> dict:
    device = torch.device(args.device)
    model = build_model(args)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"model: Llama h={args.hidden} layers={args.layers} heads={args.heads}/{args.kv_heads} "
        f"I={args.intermediate} V={args.vocab} {args.dtype}, {n_params / 1e6:.1f}M params; device {device}, "
        f"{torch.get_num_threads()} threads; chunk {args.chunk}",
        flush=True,
    )
    t_start = time.perf_counter()
    rows: list[dict] = []
    time_pts = {m: [] for m in args.methods}
    mem_pts = {m: [] for m in args.methods}
    stopped = {}  # method -> reason it is skipped from now on
    for seq_len in args.lengths:
        g = torch.Generator().manual_seed(args.seed + seq_len)
        ids = torch.randint(3, args.vocab, (args.batch, seq_len), generator=g).to(device)
        live = []
        for m in args.methods:
            row = {"method": m, "seq_len": seq_len, "skipped": None}
            rows.append(row)
            t_est, mem_est = predict(time_pts[m], seq_len), predict(mem_pts[m], seq_len, min_exp=0.0)
            elapsed = time.perf_counter() - t_start
            if m in stopped:
                row["skipped"] = stopped[m]
            elif t_est is not None and t_est > args.max_step_s:
                row["skipped"] = f"predicted step {t_est:.0f} s > --max-step-s {args.max_step_s:g}"
            elif mem_est is not None and mem_est > args.mem_budget_gib * GiB:
                row["skipped"] = (
                    f"predicted peak {mem_est / GiB:.1f} GiB > --mem-budget-gib {args.mem_budget_gib:g}"
                )
            elif elapsed + (t_est or 0) > args.time_budget:
                row["skipped"] = f"global --time-budget {args.time_budget:g} s spent"
            if row["skipped"]:
                stopped[m] = row["skipped"]
                continue
            # warm-up step, memory-tracked (tracking slows small ops down: it is not timed)
            row.update(measure(model, m, ids, args, repeat=0, track=True))
            row["warmup_seconds"] = row.pop("seconds")
            t_est = t_est or row["warmup_seconds"]
            row["repeats"] = max(1, min(args.repeats, int(args.repeat_budget_s // max(t_est, 1e-3))))
            row["repeats"] = 0 if args.repeats == 0 else row["repeats"]  # memory only: time = warm-up
            row["times"] = []
            mem_pts[m].append((seq_len, row["peak_bytes"]))
            live.append(row)
            print(f"  L={seq_len:6d} {m:8s} peak {row['peak_bytes'] / MiB:9.1f} MiB", flush=True)
        for r in range(max((row["repeats"] for row in live), default=0)):
            for row in live:
                if r < row["repeats"]:
                    info = measure(model, row["method"], ids, args, repeat=r + 1, track=False)
                    row["times"].append(info["seconds"])
        for row in live:
            row["median_s"] = statistics.median(row["times"]) if row["times"] else row["warmup_seconds"]
            time_pts[row["method"]].append((seq_len, row["median_s"]))
            print(f"  L={seq_len:6d} {row['method']:8s} {row['median_s']:8.2f} s  {row['times']}", flush=True)
        if args.rss and device.type == "cpu":
            for row in live:
                row.update(rss_of(row["method"], seq_len, argv))
    return {"n_params": n_params, "rows": rows, "wall_s": time.perf_counter() - t_start}


def summarize(args, res: dict) -> dict:
    rows = res["rows"]
    at = {(r["method"], r["seq_len"]): r for r in rows if not r["skipped"]}

    def t(m, L):
        return at[(m, L)]["median_s"] if (m, L) in at else None

    ratios = {
        "seco_over_plain": {},
        "spaco32_over_forward": {},
        "seco_over_spaco": {},
        "seco_over_spaco32": {},
    }
    pairs = {
        "seco_over_plain": ("seco", "plain"),
        "spaco32_over_forward": ("spaco32", "forward"),
        "seco_over_spaco": ("seco", "spaco"),
        "seco_over_spaco32": ("seco", "spaco32"),
    }
    for name, (a, b) in pairs.items():
        for L in args.lengths:
            if t(a, L) and t(b, L):
                ratios[name][L] = t(a, L) / t(b, L)

    # measured peak / the planner's, at the longest length SeCO ran
    planned = {}
    seco_lengths = [L for L in args.lengths if ("seco", L) in at]
    if seco_lengths:
        L = max(seco_lengths)
        planned = planned_peak(args, L)
        planned["seq_len"] = L
        planned["seco_peak_bytes"] = at[("seco", L)]["peak_bytes"]
        planned["seco_peak_over_planned"] = planned["seco_peak_bytes"] / planned["planned_bytes"]
        for m in ("spaco", "spaco32"):  # against the prediction with the method's own chunk size
            if (m, L) in at:
                own = planned_peak(args, L, chunk=at[(m, L)]["chunk"])["planned_bytes"]
                planned[f"{m}_planned_bytes"] = own
                planned[f"{m}_peak_over_planned"] = at[(m, L)]["peak_bytes"] / own

    # longest trainable sequence within a memory budget, from a linear fit of the measured peaks
    budget = args.fit_budget_gib * GiB
    longest = {"budget_bytes": budget, "method": "extrapolated from least-squares fits peak(L) = a + b L"}
    for m in ("plain", "ckpt", "seco"):
        pts = [(L, at[(m, L)]["peak_bytes"]) for L in args.lengths if (m, L) in at]
        fit = linear_fit(pts)
        if fit and fit[1] > 0:
            longest[m] = {
                "a_bytes": fit[0],
                "b_bytes_per_token": fit[1],
                "max_len": (budget - fit[0]) / fit[1],
                "measured_lengths": [p[0] for p in pts],
            }
    for a, b in (("seco", "plain"), ("seco", "ckpt")):
        if a in longest and b in longest and longest[b]["max_len"] > 0:
            longest[f"{a}_over_{b}"] = longest[a]["max_len"] / longest[b]["max_len"]
    return {"time_ratios": ratios, "planned": planned, "longest_trainable": longest}


def print_report(args, res, summ) -> None:
    rows = res["rows"]
    print(f"\n{'L':>6} {'method':8} {'peak MiB':>10} {'median s':>9} {'n':>2}  note")
    for r in rows:
        if r["skipped"]:
            print(f"{r['seq_len']:6d} {r['method']:8} {'-':>10} {'-':>9} {'':>2}  skipped: {r['skipped']}")
            continue
        note = ""
        if "num_chunks" in r:
            note = f"{r['selected']}/{r['num_chunks']} chunks of {r['chunk']}"
        if "device_peak_bytes" in r:
            note += f"  device-side peak {r['device_peak_bytes'] / MiB:.1f} MiB (K/V + grads in host memory)"
        if "rss_peak_delta_bytes" in r:
            note += f"  peak RSS delta {r['rss_peak_delta_bytes'] / MiB:.0f} MiB"
        print(
            f"{r['seq_len']:6d} {r['method']:8} {r['peak_bytes'] / MiB:10.1f} {r['median_s']:9.2f} {len(r['times']):2d}  {note}"
        )
    print("\nratios (median step times, same length)")
    goals = {
        "seco_over_plain": "goal <= 1.35",
        "spaco32_over_forward": "goal <= 1.5",
        "seco_over_spaco": "goal >= 2.8",
        "seco_over_spaco32": "goal >= 2.8",
    }
    for name, vals in summ["time_ratios"].items():
        txt = "  ".join(f"{L}: {v:.2f}" for L, v in vals.items()) or "n/a"
        print(f"  {name:22s} {txt}   ({goals[name]})")
    f = summ["planned"]
    if f:
        print(
            f"\nplanned peak (engine.plan) at L={f['seq_len']} (beyond weights+grads): KV {f['kv_bytes'] / MiB:.1f} + KV grads "
            f"{f['kv_grad_bytes'] / MiB:.1f} + chunk act {f['chunk_act_bytes'] / MiB:.1f} = {f['planned_bytes'] / MiB:.1f} MiB"
            f"\n  formula: {f['formula']}"
        )
        for k in ("seco", "spaco", "spaco32"):
            if f"{k}_peak_over_planned" in f:
                print(
                    f"  {k} measured peak / planned = {f[f'{k}_peak_over_planned']:.2f}   (1.00: the planner is exact)"
                )
    lt = summ["longest_trainable"]
    print(
        f"\nlongest trainable sequence within {lt['budget_bytes'] / GiB:g} GiB beyond weights+grads ({lt['method']}):"
    )
    for m in ("plain", "ckpt", "seco"):
        if m in lt:
            v = lt[m]
            print(
                f"  {m:6s} {v['max_len']:10.0f} tokens  (a={v['a_bytes'] / MiB:.0f} MiB, b={v['b_bytes_per_token'] / 1024:.1f} KiB/token)"
            )
    for k, goal in (("seco_over_plain", ">= 16"), ("seco_over_ckpt", ">= 4")):
        if k in lt:
            print(f"  {k}: {lt[k]:.1f}x   (goal {goal})")
    print(f"\ntotal {res['wall_s']:.0f} s")


def plot(args, res, path_stem: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in res["rows"] if not r["skipped"]]
    for key, ylabel, fname in (
        ("peak_bytes", "peak memory beyond weights+grads (MiB)", "memory"),
        ("median_s", "median step time (s)", "time"),
    ):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for m in args.methods:
            pts = [
                (r["seq_len"], r[key] / (MiB if key == "peak_bytes" else 1)) for r in rows if r["method"] == m
            ]
            if pts:
                ax.plot(*zip(*pts, strict=True), "o-", label=m)
        if key == "peak_bytes":
            preds = [(L, planned_peak(args, L)["planned_bytes"] / MiB) for L in args.lengths]
            ax.plot(*zip(*preds, strict=True), "k:", label="planner (engine.plan)")
        ax.set_xscale("log", base=2), ax.set_yscale("log")
        ax.set_xlabel("sequence length (tokens)"), ax.set_ylabel(ylabel)
        ax.set_title(
            f"{fname} vs length ({args.device}, {res['n_params'] / 1e6:.0f}M params, chunk {args.chunk})"
        )
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(f"{path_stem}_{fname}.png", dpi=110)
        plt.close(fig)


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        child_main(args)
        return {}
    if args.from_json:  # the saved run's configuration, its measured rows
        saved = json.loads(Path(args.from_json).read_text())
        args = argparse.Namespace(**{**saved["config"], "out": args.out, "no_plot": args.no_plot})
        res = {k: saved[k] for k in ("n_params", "rows", "wall_s")}
    else:
        res = run_benchmark(args, argv)
    summ = summarize(args, res)
    print_report(args, res, summ)
    out = {
        "config": {k: v for k, v in vars(args).items() if k != "child"},
        "what_is_counted": __doc__.split("What")[1].split("SpaCO runs")[0].strip(),
        "n_params": res["n_params"],
        "rows": res["rows"],
        "planned_per_length": {L: planned_peak(args, L) for L in args.lengths},
        **summ,
        "wall_s": res["wall_s"],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    stem = Path(args.out)
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(out, indent=1))
    if not args.no_plot:
        plot(args, res, str(stem))
    print(f"wrote {stem.with_suffix('.json')}")
    return out


if __name__ == "__main__":
    main()
