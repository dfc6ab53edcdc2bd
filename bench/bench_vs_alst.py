"""SeCO / SpaCO against ALST's single-device stack, side by side: same model, same lengths, one fresh process
per (method, length) so that each heap peak is the method's own.

    plain        full-sequence forward + backward (HF loss)
    ckpt         the same with HF activation checkpointing, non-reentrant, every decoder layer
    alst         ALST's single-device stack, built from DeepSpeed's own pieces: ckpt + TiledMLP on every
                 decoder MLP (shards = ceil(L / hidden), the recipe in TiledMLP's docstring) +
                 TiledFusedLogitsLoss over the final hidden states (shards of --chunk tokens, so that its
                 logits slice is as large as SeCO's chunk)
    seco         chunkwise_backward, chunk --chunk, the whole-chunk loss (ChunkOptions(fused_loss=False))
    seco_ckpt    + checkpointed chunks (ChunkOptions(checkpoint_layers=True))
    seco_fused   + the fused chunked loss (ChunkOptions(fused_loss=True), the engine's default)
    seco_ckpt_fused  both
    seco_offload ChunkOptions(offload_kv=True) (on CUDA: K/V and their gradients in pinned host memory)
    spaco        ChunkSchedule(mode="spaco", sampler="fixed"), max(1, round(q k)) of the k chunks

A variant whose option the installed engine's ChunkOptions does not have is skipped, and its row says so.

What is measured (per row): `peak_bytes`, the heap peak of one step beyond what was live before it (CPU:
engine.memory.MemoryTracker's count of live tensor storages; CUDA: max_memory_allocated), after one short
untracked warm-up step (lazy one-time allocations are not the step's); weights and their zero-filled .grad
exist before the step. `device_peak_bytes`: the peak minus what the method can keep in host memory instead
(ALST: the checkpointed hidden state of every decoder layer, layers x L x hidden x dtype, which DeepSpeed's
checkpoint offload moves to the host; SeCO/SpaCO: K/V + K/V grads, which chunking.offload_kv moves; plain and
ckpt: nothing). `median_s`: the median of --repeats untracked steps (the tracked step's time when --repeats 0).
`predicted_peak_bytes` (chunk-wise rows): engine.plan's prediction for the same step. The machine's load
average is recorded before and after every row: on a shared machine the times are noisy.

Goals (the JSON's `goals`, reported, never asserted): SeCO device-side peak <= 0.25x ALST's at 32K, SeCO step time
<= 0.9x ALST's, SpaCO (q = 1/8) step time <= 0.3x ALST's.

    nice -n 10 python bench/bench_vs_alst.py                       # CPU, 4K..32K, the 19M Llama
    python bench/bench_vs_alst.py --lengths 4096,8192 --methods alst,seco,spaco --repeats 1
    python bench/bench_vs_alst.py --from-json bench/results/vs_alst_cpu.json   # re-summarise and re-plot
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers

from engine.chunkwise import ChunkOptions, ChunkSchedule, chunkwise_backward
from engine.memory import MemoryTracker
from engine.plan import Setup, plan

RESULTS = Path(__file__).resolve().parent / "results"
MiB, GiB = 2**20, 2**30
# method -> its ChunkOptions fields (methods not here are not chunk-wise; spaco also draws, see `step`)
CHUNKWISE = {
    "seco": {"fused_loss": False},
    "seco_ckpt": {"checkpoint_layers": True, "fused_loss": False},
    "seco_fused": {"fused_loss": True},
    "seco_ckpt_fused": {"checkpoint_layers": True, "fused_loss": True},
    "spaco": {"fused_loss": False},
    # K/V + K/V grads in pinned host memory: on CUDA the measured peak is the device's (bench/gpu_check.py)
    "seco_offload": {"offload_kv": True, "fused_loss": False},
}
METHODS = ("plain", "ckpt", "alst", *CHUNKWISE)

# fmt: off
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--device", default="cpu")
parser.add_argument("--hidden", type=int, default=256)
parser.add_argument("--layers", type=int, default=4)
parser.add_argument("--heads", type=int, default=4)
parser.add_argument("--kv-heads", type=int, default=1)
parser.add_argument("--intermediate", type=int, default=704)
parser.add_argument("--vocab", type=int, default=32000)
parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
parser.add_argument("--lengths", default="4096,8192,16384,32768")
parser.add_argument("--chunk", type=int, default=512)
parser.add_argument("--methods", default=",".join(m for m in METHODS if m != "seco_offload"))
parser.add_argument("--sample-prob", type=float, default=1 / 8, help="SpaCO's q")
parser.add_argument("--repeats", type=int, default=1, help="timed steps after the tracked one (0: none)")
parser.add_argument("--threads", type=int, default=1, help="torch threads per process (0: torch's default)")
parser.add_argument("--max-step-s", type=float, default=400, help="skip rows predicted slower than this")
parser.add_argument("--mem-budget-gib", type=float, default=6, help="skip rows predicted above this peak")
parser.add_argument("--time-budget", type=float, default=3600, help="start no row after this (s)")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--out", help="output stem (default bench/results/vs_alst_<device>)")
parser.add_argument("--update", action="store_true", help="keep the saved rows of (method, length) not run now")
parser.add_argument("--label", default="", help="recorded in the JSON, e.g. the engine commit measured")
parser.add_argument("--no-plot", action="store_true")
parser.add_argument("--from-json", help="measure nothing: re-summarise and re-plot a saved result")
parser.add_argument("--same-process", action="store_true", help="rows in this process (quick checks: each row's "
                    "peak still counts only what its step allocates, but the model build is shared by none)")
parser.add_argument("--child", help=argparse.SUPPRESS)  # "method:length": one row, in this process
# fmt: on


def model_config(args) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, intermediate_size=args.intermediate, vocab_size=args.vocab,
        max_position_embeddings=max(args.lengths), tie_word_embeddings=False, pad_token_id=0, bos_token_id=1,
        eos_token_id=2,
    )  # fmt: skip


def build_model(args):
    torch.manual_seed(args.seed)
    with torch.device(args.device):
        model = transformers.AutoModelForCausalLM.from_config(
            model_config(args), attn_implementation="sdpa", dtype=getattr(torch, args.dtype)
        )
    model.train()
    for p in model.parameters():  # grads exist before every step: no method is charged for them
        p.grad = torch.zeros_like(p)
    return model


# ----------------------------------------------------------------------------------------- the methods


def _mlp(mlp, x):
    return mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))


def _tile_mlps(model) -> None:
    """TiledMLP on every decoder MLP of this model instance (not the class: nothing else in the process)."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

    for layer in model.model.layers:
        mlp = layer.mlp
        weights = [mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight]

        def forward(self, x, weights=weights):
            shards = max(1, math.ceil(x.shape[-2] / x.shape[-1]))
            return TiledMLP.apply(_mlp, self, x, shards, weights)

        mlp.forward = types.MethodType(forward, mlp)


def _alst_loss(model, ids: torch.Tensor, chunk: int) -> torch.Tensor:
    """HF's mean causal-LM loss through TiledFusedLogitsLoss: no more than a slice's logits ever exist.
    Its backward runs inside its forward with an incoming gradient of 1, so each slice returns its share of
    the mean (sum / all targets) and the slices are summed."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledFusedLogitsLoss

    hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state[:, :-1]
    targets = ids[:, 1:]
    count = targets.numel()

    def loss_fn(head, x, y):
        return F.cross_entropy(head(x).float(), y, reduction="sum") / count

    shards = max(1, math.ceil(hidden.shape[1] / chunk))
    return TiledFusedLogitsLoss.apply(
        loss_fn, model.lm_head, hidden, targets, None, shards, [model.lm_head.weight], "sum"
    )


def prepare(model, method: str) -> None:
    if method in ("ckpt", "alst"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if method == "alst":
        _tile_mlps(model)


def supported(method: str) -> str | None:
    """None, or why the installed engine cannot run this method."""
    missing = [k for k in CHUNKWISE.get(method, {}) if k not in ChunkOptions.__dataclass_fields__]
    return f"ChunkOptions has no {', '.join(missing)} here" if missing else None


def step(model, method: str, ids: torch.Tensor, args, seed: int) -> dict:
    if method == "plain" or method == "ckpt":
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        return {}
    if method == "alst":
        _alst_loss(model, ids, args.chunk).backward()
        return {}
    k = math.ceil(ids.shape[1] / args.chunk)
    draw = {}
    if method == "spaco":
        draw = dict(mode="spaco", sampler="fixed", budget=max(1, round(args.sample_prob * k)))
    st = chunkwise_backward(
        model,
        ids,
        schedule=ChunkSchedule(chunk_size=args.chunk, **draw),
        options=ChunkOptions(**CHUNKWISE[method]),
        generator=torch.Generator().manual_seed(seed),
    )
    return {"num_chunks": k, "selected": len(st.selected), "kv_bytes": st.kv_bytes}


def host_movable(method: str, seq_len: int, info: dict, args) -> int:
    """Bytes of the peak the method can keep in host memory instead (see the module docstring)."""
    if method == "alst":
        return (
            args.layers
            * seq_len
            * args.hidden
            * torch.empty(0, dtype=getattr(torch, args.dtype)).element_size()
        )
    if method == "seco_offload" and args.device != "cpu":
        return 0  # already in host memory, where the CUDA allocator does not count it
    return info.get("kv_bytes", 0)


def predicted_peak(method: str, seq_len: int, args) -> int | None:
    """engine.plan's prediction of a chunk-wise row's peak (None for the others, or when the planner does not
    know the variant's option)."""
    if method not in CHUNKWISE:
        return None
    kw = dict(dtype=args.dtype, chunk_size=args.chunk, seq_len=seq_len, backend="local", device=args.device)
    kw.update({k: v for k, v in CHUNKWISE[method].items() if k in Setup.__dataclass_fields__})
    return plan(model_config(args), **kw).step_bytes


def child_main(args) -> None:
    method, seq_len = args.child.split(":")
    print(json.dumps(one_row(args, method, int(seq_len))))


def one_row(args, method: str, seq_len: int) -> dict:
    device = torch.device(args.device)
    model = build_model(args)
    prepare(model, method)
    g = torch.Generator().manual_seed(args.seed + seq_len)
    ids = torch.randint(3, args.vocab, (1, seq_len), generator=g).to(device)
    step(model, method, ids[:, : min(seq_len, 2 * args.chunk)], args, seed=-1)  # warm-up, untracked
    for p in model.parameters():
        p.grad.zero_()
    gc.collect()
    with MemoryTracker(device) as mt:
        t0 = time.perf_counter()
        info = step(model, method, ids, args, seed=args.seed)
        _sync(device)
        tracked_s = time.perf_counter() - t0
    times = []
    for r in range(args.repeats):
        gc.collect()
        t0 = time.perf_counter()
        step(model, method, ids, args, seed=args.seed + 1 + r)
        _sync(device)
        times.append(time.perf_counter() - t0)
    info.update(peak_bytes=mt.peak_bytes, tracked_s=tracked_s, times=times)
    info["device_peak_bytes"] = mt.peak_bytes - host_movable(method, seq_len, info, args)
    info["median_s"] = statistics.median(times) if times else tracked_s
    return info


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------- the parent


def _extrapolate(points: list[tuple[int, float]], seq_len: int, exp: float = 1.5) -> float | None:
    """Power law through the last two measured points (exponent in [1, 2]; `exp` from one point)."""
    if not points:
        return None
    (l1, v1) = points[-1]
    if len(points) > 1:
        (l0, v0) = points[-2]
        exp = min(2.0, max(1.0, math.log(max(v1, 1e-9) / max(v0, 1e-9)) / math.log(l1 / l0)))
    return v1 * (seq_len / l1) ** exp


def run(args, argv: list[str], out_path: Path) -> dict:
    res = {"config": _config(args), "machine": _machine(args.label), "rows": []}
    if args.update and out_path.exists():  # e.g. re-run the SeCO variants only, into the same table
        saved = json.loads(out_path.read_text())
        same = ("hidden", "layers", "heads", "kv_heads", "intermediate", "vocab", "dtype", "chunk", "device")
        differ = [k for k in same if saved["config"][k] != res["config"][k]]
        if differ:
            raise ValueError(f"--update: {out_path} was measured with other {differ}")
        res["rows"] = [
            r for r in saved["rows"] if r["method"] not in args.methods or r["seq_len"] not in args.lengths
        ]
        res["machine"]["earlier_runs"] = [saved["machine"], *saved["machine"].get("earlier_runs", [])]
        res["config"]["methods"] = [*dict.fromkeys([*saved["config"]["methods"], *args.methods])]
    t_start = time.perf_counter()
    done: dict[str, list[tuple[int, dict]]] = {m: [] for m in args.methods}
    for seq_len in args.lengths:
        for m in args.methods:
            row = {"method": m, "seq_len": seq_len, "skipped": supported(m)}
            res["rows"].append(row)
            times = [(L, r["median_s"]) for L, r in done[m]]
            peaks = [(L, r["peak_bytes"]) for L, r in done[m]]
            t_est, mem_est = _extrapolate(times, seq_len), _extrapolate(peaks, seq_len, exp=1.0)
            pred = predicted_peak(m, seq_len, args)
            mem_est = pred if pred is not None else mem_est
            if row["skipped"]:
                pass
            elif any(
                r["method"] == m and str(r["skipped"]).startswith("predicted") for r in res["rows"][:-1]
            ):
                row["skipped"] = "skipped at a shorter length"
            elif t_est is not None and t_est * (1 + args.repeats) > args.max_step_s:
                row["skipped"] = f"predicted {t_est:.0f} s a step x {1 + args.repeats} > --max-step-s"
            elif mem_est is not None and mem_est > args.mem_budget_gib * GiB:
                row["skipped"] = f"predicted peak {mem_est / GiB:.1f} GiB > --mem-budget-gib"
            elif time.perf_counter() - t_start > args.time_budget:
                row["skipped"] = "global --time-budget spent"
            if row["skipped"]:
                print(f"  L={seq_len:6d} {m:16s} skipped: {row['skipped']}", flush=True)
                continue
            row["load_before"] = os.getloadavg()
            if args.same_process:
                row.update(one_row(args, m, seq_len))
            else:
                cmd = [sys.executable, os.path.abspath(__file__), *argv, "--child", f"{m}:{seq_len}"]
                out = subprocess.run(cmd, capture_output=True, text=True)
                if out.returncode != 0:
                    row["skipped"] = f"failed: {out.stderr.strip().splitlines()[-1:]}"
                    print(f"  L={seq_len:6d} {m:16s} {row['skipped']}", flush=True)
                    continue
                row.update(json.loads(out.stdout.strip().splitlines()[-1]))
            row["load_after"] = os.getloadavg()
            if pred is not None:
                row["predicted_peak_bytes"] = pred
            done[m].append((seq_len, row))
            print(
                f"  L={seq_len:6d} {m:16s} peak {row['peak_bytes'] / MiB:8.1f} MiB  device-side "
                f"{row['device_peak_bytes'] / MiB:8.1f} MiB  {row['median_s']:7.1f} s  load "
                f"{row['load_before'][0]:.1f}->{row['load_after'][0]:.1f}",
                flush=True,
            )
            res["wall_s"] = time.perf_counter() - t_start
            _write(out_path, {**res, **summarize(res["rows"])})  # partial results survive an interruption
    return res


def _config(args) -> dict:
    return {k: v for k, v in vars(args).items() if k not in ("child", "from_json", "out")}


def _machine(label: str) -> dict:
    return {
        "cpus": os.cpu_count(), "load_at_start": os.getloadavg(), "label": label, "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device_name": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }  # fmt: skip


def summarize(rows: list[dict]) -> dict:
    """Ratios against ALST's stack at each length where both ran (the goals beside them)."""
    at = {(r["method"], r["seq_len"]): r for r in rows if not r.get("skipped")}
    ratios: dict[str, dict[int, float]] = {}
    for m in CHUNKWISE:
        for L in sorted({r["seq_len"] for r in rows}):
            a, b = at.get((m, L)), at.get(("alst", L))
            if a and b:
                ratios.setdefault(f"{m}_device_peak_over_alst", {})[L] = (
                    a["device_peak_bytes"] / b["device_peak_bytes"]
                )
                ratios.setdefault(f"{m}_peak_over_alst", {})[L] = a["peak_bytes"] / b["peak_bytes"]
                ratios.setdefault(f"{m}_time_over_alst", {})[L] = a["median_s"] / b["median_s"]
    goals = {
        "seco_device_peak_over_alst": "<= 0.25 at 32K",
        "seco_time_over_alst": "<= 0.9",
        "spaco_time_over_alst": "<= 0.3",
    }
    return {"ratios": ratios, "goals": goals}


def _write(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1))


def report(res: dict) -> None:
    print(
        f"\n{'L':>6} {'method':16} {'peak MiB':>9} {'device MiB':>10} {'plan MiB':>9} {'median s':>9}  note"
    )
    for r in res["rows"]:
        if r.get("skipped"):
            print(f"{r['seq_len']:6d} {r['method']:16} {'-':>9} {'-':>10} {'-':>9} {'-':>9}  {r['skipped']}")
            continue
        plan_mib = f"{r['predicted_peak_bytes'] / MiB:9.1f}" if "predicted_peak_bytes" in r else f"{'-':>9}"
        note = f"{r['selected']}/{r['num_chunks']} chunks" if "num_chunks" in r else ""
        print(
            f"{r['seq_len']:6d} {r['method']:16} {r['peak_bytes'] / MiB:9.1f} {r['device_peak_bytes'] / MiB:10.1f} "
            f"{plan_mib} {r['median_s']:9.1f}  {note} load {r['load_before'][0]:.1f}->{r['load_after'][0]:.1f}"
        )
    for name, vals in res["ratios"].items():
        goal = res["goals"].get(name, "")
        print(
            f"  {name:36s} "
            + "  ".join(f"{L}: {v:.2f}" for L, v in vals.items())
            + (f"  (goal {goal})" if goal else "")
        )


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in res["rows"] if not r.get("skipped")]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, label in (
        (axes[0], "device_peak_bytes", "device-side peak (MiB; peak minus what moves to the host)"),
        (axes[1], "median_s", "median step time (s)"),
    ):
        for m in res["config"]["methods"]:
            pts = [
                (r["seq_len"], r[key] / (MiB if key.endswith("bytes") else 1))
                for r in rows
                if r["method"] == m
            ]
            if pts:
                ax.plot(*zip(*pts, strict=True), "o-", label=m)
        ax.set_xscale("log", base=2), ax.set_yscale("log")
        ax.set_xlabel("sequence length (tokens)"), ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    cfg = res["config"]
    fig.suptitle(
        f"vs ALST's single-device stack: Llama h={cfg['hidden']} x{cfg['layers']}, vocab {cfg['vocab']}, "
        f"{cfg['dtype']}, chunk {cfg['chunk']}, {res['machine']['device_name']} (shared machine: noisy times)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.lengths = [int(x) for x in str(args.lengths).split(",") if x]
    args.methods = [m for m in args.methods.split(",") if m]
    bad = sorted(set(args.methods) - set(METHODS))
    if bad:
        raise ValueError(f"--methods: unknown {bad}; known: {', '.join(METHODS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        child_main(args)
        return {}
    stem = Path(args.out or RESULTS / f"vs_alst_{torch.device(args.device).type}")
    if args.from_json:
        res = json.loads(Path(args.from_json).read_text())
    else:
        res = run(args, argv, stem.with_suffix(".json"))
    res["rows"].sort(key=lambda r: (r["seq_len"], METHODS.index(r["method"])))
    res.update(summarize(res["rows"]))
    report(res)
    _write(stem.with_suffix(".json"), res)
    if not args.no_plot:
        plot(res, stem.with_suffix(".png"))
    print(f"wrote {stem.with_suffix('.json')}")
    return res


if __name__ == "__main__":
    main()
