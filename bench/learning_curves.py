"""Does chunk-wise training learn what plain backprop learns, and does the gradient across chunks matter?

Trains the same tiny Llama (same init, same data order, AdamW) on the synthetic kv_recall task, whose answer
sits at the end of the sequence and depends only on the header at its start, four ways:

    plain      full-sequence backprop (the reference)
    plain_split  the same gradient computed as two half-batches summed: differs from plain only by rounding
               (the control: how far rounding alone moves a curve on this task; opt-in via --methods)
    seco       chunkwise_backward(mode="seco"): exact, so its curve must equal plain's up to rounding
    spaco      chunkwise_backward(mode="spaco", sample_prob=q): unbiased but noisy
    truncated  chunk by chunk against the *detached* K/V of earlier chunks (Transformer-XL style): the
               forward still sees the whole prefix, but no gradient crosses a chunk boundary

Loss and accuracy are measured on the answer tokens only (the only labelled tokens), on a held-out set.

    python bench/learning_curves.py     # docs/results.md's run, one process: about 40 min on 2 free cores
    # the same on two cores as two processes, then one result (what bench/results/learning_curves.* is):
    python bench/learning_curves.py --threads 1 --methods plain,seco --no-plot --out /tmp/lc_a &
    python bench/learning_curves.py --threads 1 --methods spaco,truncated,plain_split --no-plot --out /tmp/lc_b
    wait; python bench/learning_curves.py --merge /tmp/lc_a.json /tmp/lc_b.json
    python bench/learning_curves.py --steps 5 --seq-len 256 --chunk 64 --hidden 32 --eval-every 5   # smoke
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from transformers.cache_utils import DynamicCache

from engine.chunkwise import ChunkSchedule, chunkwise_backward
from engine.data import ByteTokenizer, SyntheticDataset
from engine.kv_cache import cache_argument

IGNORE = -100
METHODS = ("plain", "seco", "spaco", "truncated", "plain_split")
DEFAULT_METHODS = METHODS[:4]
RESULTS = Path(__file__).resolve().parent / "results"

# fmt: off
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="comma-separated subset of " + ",".join(METHODS))
parser.add_argument("--steps", type=int, default=600)
parser.add_argument("--batch", type=int, default=16)
parser.add_argument("--seq-len", type=int, default=256)
parser.add_argument("--chunk", type=int, default=32)
parser.add_argument("--num-pairs", type=int, default=1, help="kv_recall pairs in the header (1 = pure copy)")
parser.add_argument("--hidden", type=int, default=128)
parser.add_argument("--layers", type=int, default=2)
parser.add_argument("--heads", type=int, default=4)
parser.add_argument("--kv-heads", type=int, default=2)
parser.add_argument("--lr", type=float, default=1e-3, help="3e-3 is past the edge of stability here")
parser.add_argument("--warmup", type=int, default=20, help="linear LR warmup steps")
parser.add_argument("--sample-prob", type=float, default=0.5, help="SpaCO's q")
parser.add_argument("--dtype", default="float64", choices=["float32", "float64"],
                    help="float64 (norms and loss too) keeps plain and SeCO together far longer")
parser.add_argument("--eval-every", type=int, default=50)
parser.add_argument("--eval-samples", type=int, default=32)
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
parser.add_argument("--out", default=str(RESULTS / "learning_curves"), help="writes OUT.json and OUT.png")
parser.add_argument("--no-plot", action="store_true")
parser.add_argument("--merge", nargs="+", metavar="JSON",
                    help="train nothing: combine the runs of these result files (same settings) into --out")
# fmt: on


def build_model(args) -> torch.nn.Module:
    tok = ByteTokenizer()
    cfg = transformers.LlamaConfig(
        vocab_size=tok.vocab_size,
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.seq_len,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(args.seed)  # same init for every method
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    model = model.to(getattr(torch, args.dtype))
    if args.dtype == "float64":
        # HF's RMSNorm rounds to float32 even in a float64 model; a float64 run is meant to have no float32
        # step anywhere (the loss is float64 too, see `loss_in_dtype`), so its norms compute in float64.
        for m in model.modules():
            if type(m).__name__ == "LlamaRMSNorm":
                m.forward = _rmsnorm_in_dtype.__get__(m)
    return model


def _rmsnorm_in_dtype(self, x: torch.Tensor) -> torch.Tensor:
    return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


def loss_in_dtype(model, input_ids, labels, num_tokens: int | None = None) -> torch.Tensor:
    """Full-sequence loss as HF computes it, but in the model's dtype (float32 at least): HF's own loss
    upcasts float64 logits *down* to float32, which would make the float64 reference less exact than SeCO.
    Divided by num_tokens (default: this batch's target count), so that parts of a batch can be summed."""
    logits = model(input_ids=input_ids, use_cache=False).logits
    targets = shifted(labels)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum")
    return ce / (num_tokens or int((targets != IGNORE).sum()))


def shifted(labels: torch.Tensor) -> torch.Tensor:
    """Position t's target is labels[t + 1] (HF's causal-LM convention); the last position has none."""
    targets = torch.full_like(labels, IGNORE)
    targets[:, :-1] = labels[:, 1:]
    return targets


def batches(args, seed: int, n: int):
    ds = SyntheticDataset("kv_recall", args.seq_len, n * args.batch, seed=seed, num_pairs=args.num_pairs)
    for i in range(n):
        rows = [ds[i * args.batch + j] for j in range(args.batch)]
        yield {k: torch.stack([r[k] for r in rows]) for k in ("input_ids", "labels")}


def truncated_backward(model, input_ids, labels, chunk_size: int) -> float:
    """Chunk-wise backprop with no gradient across chunks: each chunk runs with grad against the detached K/V
    of the chunks before it. Loss is divided by the global target count, as for the other methods."""
    targets = shifted(labels)
    num_tokens = int((targets != IGNORE).sum())
    seq_len = input_ids.shape[1]
    cache, total = DynamicCache(), 0.0
    for s in range(0, seq_len, chunk_size):
        e = min(s + chunk_size, seq_len)
        pos = torch.arange(s, e).unsqueeze(0).expand(input_ids.shape[0], -1)
        out = model(
            input_ids=input_ids[:, s:e], position_ids=pos, use_cache=True, **{cache_argument(model): cache}
        )
        loss = F.cross_entropy(out.logits.flatten(0, 1), targets[:, s:e].flatten(), reduction="sum")
        loss = loss / num_tokens
        if loss.requires_grad and (targets[:, s:e] != IGNORE).any():
            loss.backward()
        total += loss.item()
        for layer in cache.layers:  # the cut: later chunks read this chunk's K/V but cannot backprop into it
            layer.keys, layer.values = layer.keys.detach(), layer.values.detach()
    return total


@torch.no_grad()
def evaluate(model, eval_batches) -> tuple[float, float]:
    """Answer-token loss and accuracy (argmax), full-sequence forward."""
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for b in eval_batches:
        logits = model(input_ids=b["input_ids"], use_cache=False).logits[:, :-1]
        targets = b["labels"][:, 1:]
        keep = targets != IGNORE
        loss_sum += float(F.cross_entropy(logits[keep], targets[keep], reduction="sum"))
        correct += int((logits[keep].argmax(-1) == targets[keep]).sum())
        count += int(keep.sum())
    model.train()
    return loss_sum / count, correct / count


def train(method: str, args, eval_batches) -> dict:
    model = build_model(args)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, args.warmup)))
    gen = torch.Generator().manual_seed(args.seed + 1)  # SpaCO's draws
    log = {"step": [], "train_loss": [], "eval_step": [], "eval_loss": [], "eval_acc": [], "selected": []}
    t0 = time.perf_counter()
    for step, b in enumerate(batches(args, args.seed, args.steps)):
        if step % args.eval_every == 0:
            el, ea = evaluate(model, eval_batches)
            log["eval_step"].append(step), log["eval_loss"].append(el), log["eval_acc"].append(ea)
            print(f"  {method} step {step:4d}: answer loss {el:.3f} acc {ea:.3f}", flush=True)
        opt.zero_grad(set_to_none=True)
        ids, labels = b["input_ids"], b["labels"]
        if method == "plain_split":
            num_tokens, half, loss = int((labels[:, 1:] != IGNORE).sum()), ids.shape[0] // 2, 0.0
            for part in (slice(0, half), slice(half, None)):
                part_loss = loss_in_dtype(model, ids[part], labels[part], num_tokens)
                part_loss.backward()
                loss += part_loss.item()
            nsel = math.ceil(args.seq_len / args.chunk)
        elif method == "plain":
            loss = loss_in_dtype(model, ids, labels)
            loss.backward()
            loss, nsel = loss.item(), math.ceil(args.seq_len / args.chunk)
        elif method in ("seco", "spaco"):
            q = args.sample_prob if method == "spaco" else None
            schedule = ChunkSchedule(chunk_size=args.chunk, mode=method, sample_prob=q)
            st = chunkwise_backward(model, ids, labels=labels, schedule=schedule, generator=gen)
            loss, nsel = st.loss, len(st.selected)
        else:
            loss, nsel = (
                truncated_backward(model, ids, labels, args.chunk),
                math.ceil(args.seq_len / args.chunk),
            )
        opt.step()
        sched.step()
        log["step"].append(step), log["train_loss"].append(loss), log["selected"].append(nsel)
    el, ea = evaluate(model, eval_batches)
    log["eval_step"].append(args.steps), log["eval_loss"].append(el), log["eval_acc"].append(ea)
    log["seconds"] = time.perf_counter() - t0
    print(f"{method:>9}: final answer loss {el:.3f}  acc {ea:.3f}  ({log['seconds']:.0f} s)", flush=True)
    return log


def plot(results: dict, args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    fig, axes = plt.subplots(1, 4, figsize=(20, 4))
    for i, (m, log) in enumerate(runs.items()):
        style, kw = "--" if m in ("seco", "plain_split") else "-", {"label": m, "color": f"C{i}"}
        axes[0].plot(log["step"], log["train_loss"], style, alpha=0.8, **kw)
        axes[1].plot(log["eval_step"], log["eval_loss"], style + "o", ms=3, **kw)
        axes[2].plot(log["eval_step"], log["eval_acc"], style + "o", ms=3, **kw)
        if m != "plain" and "plain" in runs:
            n = min(len(log["train_loss"]), len(runs["plain"]["train_loss"]))
            d = [
                max(abs(x - y), 1e-17) for x, y in zip(log["train_loss"][:n], runs["plain"]["train_loss"][:n])
            ]
            axes[3].semilogy(log["step"][:n], d, style, alpha=0.8, **kw)
    axes[2].axhline(results["chance_acc"], color="gray", lw=0.8, ls=":", label="chance")
    titles = (
        "train loss (answer tokens)",
        "held-out answer loss",
        "held-out answer accuracy",
        "|train loss - plain's| (1e-17 = equal)",
    )
    for ax, t in zip(axes, titles, strict=True):
        ax.set_title(t), ax.set_xlabel("step"), ax.legend()
    fig.suptitle(
        f"kv_recall, seq {args.seq_len}, chunk {args.chunk}, {args.layers}x{args.hidden} Llama, "
        f"{args.num_pairs} pair(s), {args.dtype}, AdamW lr {args.lr:g}, batch {args.batch}"
        + ("" if isinstance(args.sample_prob, list) else f", SpaCO q={args.sample_prob:g}")
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summarize(runs: dict) -> dict:
    summary = {}
    for other in ("seco", "plain_split"):  # how far each stays from plain backprop's curve
        if "plain" not in runs or other not in runs:
            continue
        a, b = (torch.tensor(runs[m]["train_loss"], dtype=torch.float64) for m in ("plain", other))
        n = min(len(a), len(b))
        diff = (a[:n] - b[:n]).abs()
        summary[f"{other}_vs_plain_max_abs_train_loss_diff"] = float(diff.max())
        ref = dict(zip(runs["plain"]["eval_step"], runs["plain"]["eval_loss"]))
        ev = [abs(x - ref[s]) for s, x in zip(runs[other]["eval_step"], runs[other]["eval_loss"]) if s in ref]
        summary[f"{other}_vs_plain_max_abs_eval_loss_diff"] = max(ev)  # at the steps both evaluated
        for tol in (1e-12, 1e-3):
            over = (diff > tol).nonzero()
            summary[f"{other}_vs_plain_first_step_diff_gt_{tol:g}"] = int(over[0]) if len(over) else None
    for m, log in runs.items():
        summary[f"{m}_final_eval_loss"] = log["eval_loss"][-1]
        summary[f"{m}_final_eval_acc"] = log["eval_acc"][-1]
        summary[f"{m}_best_eval_acc"] = max(log["eval_acc"])
        # first evaluation at >= 0.5 held-out accuracy (chance is 1/36): when the dependency was learned
        hit = [s for s, acc in zip(log["eval_step"], log["eval_acc"]) if acc >= 0.5]
        summary[f"{m}_first_step_acc_ge_0.5"] = hit[0] if hit else None
        summary[f"{m}_seconds"] = log["seconds"]
    for m, log in runs.items():
        if m.startswith("spaco"):
            summary[f"{m}_mean_selected_chunks"] = sum(log["selected"]) / len(log["selected"])
    return summary


def merge(paths: list[str]) -> dict:
    """Runs of one experiment made by separate processes (e.g. --methods plain,seco next to --methods
    spaco,truncated, one core each), combined as if made by one; their settings must agree, except the
    number of steps and SpaCO's q: SpaCO runs are then named "spaco q=<q>", so several q can be compared."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    volatile = {"methods", "out", "threads", "no_plot", "merge", "steps", "sample_prob"}
    base = {k: v for k, v in parts[0]["config"].items() if k not in volatile}
    runs = {}
    for p, part in zip(paths, parts, strict=True):
        cfg = {k: v for k, v in part["config"].items() if k not in volatile}
        if cfg != base:
            diff = sorted(k for k in cfg.keys() | base.keys() if cfg.get(k) != base.get(k))
            raise ValueError(f"{p}: not the same experiment as {paths[0]} (differs in {diff})")
        for m, log in part["runs"].items():
            name = f"spaco q={part['config']['sample_prob']:g}" if m == "spaco" else m
            if name in runs:
                raise ValueError(f"{p}: {name} already merged from an earlier file")
            runs[name] = log
    order = {m: i for i, m in enumerate(METHODS)}
    runs = dict(sorted(runs.items(), key=lambda kv: (order[kv[0].split()[0]], kv[0])))
    steps = {m: len(log["step"]) for m, log in runs.items()}
    config = dict(parts[0]["config"], methods=",".join(runs), merged_from=[str(p) for p in paths])
    config.update(steps=max(steps.values()), steps_per_method=steps)
    config["sample_prob"] = sorted(
        {part["config"]["sample_prob"] for part in parts if "spaco" in part["runs"]}
    )
    return {"config": config, "chance_acc": parts[0]["chance_acc"], "runs": runs}


def main(argv=None) -> dict:
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.merge:
        results = merge(args.merge)
        results["config"]["out"] = args.out
        for k, v in results["config"].items():  # the plot's title reads the experiment's settings
            if k in vars(args) and k not in ("out", "no_plot", "merge"):
                setattr(args, k, v)
    else:
        methods = [m for m in args.methods.split(",") if m]
        assert set(methods) <= set(METHODS), methods
        n_eval = max(1, args.eval_samples // args.batch)
        eval_batches = list(batches(args, args.seed + 1000, n_eval))  # held out: a different data seed
        results = {
            "config": vars(args),
            "chance_acc": 1 / 36,  # kv_recall values are drawn from 36 characters
            "runs": {m: train(m, args, eval_batches) for m in methods},
        }
    results["summary"] = summary = summarize(results["runs"])
    print("\nsummary")
    for k, v in summary.items():
        print(f"  {k:45s} {v:.6g}" if isinstance(v, float) else f"  {k:45s} {v}")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    if not args.no_plot:
        plot(results, args, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.json')}" + ("" if args.no_plot else f" and {out.with_suffix('.png')}"))
    return results


if __name__ == "__main__":
    main()
