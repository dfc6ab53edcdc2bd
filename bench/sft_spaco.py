"""SpaCO for SFT: the "answer chunks at q = 1" policy against uniform q at the same expected cost.

Task: bench/learning_curves.py's kv_recall, an SFT task in effect: only the answer at the very end carries
labels, and it depends on the header at the very start. With k chunks of which n hold loss tokens, the
policy (chunking.loss_chunks: always) back-propagates n + q (k - n) chunks on average; uniform SpaCO at
q_u = (n + q (k - n)) / k costs the same.

    variance  exact, no sampling: every selection S with its probability p(S); reports the estimator's total
              variance  sum_S p(S) |g_S - g|^2 / |g|^2  (g: SeCO's gradient) and its bias (~0, a check),
              for the policy and for uniform q_u, after --warm-steps SeCO steps.
    learn     training curves: SeCO, truncated backprop (no gradient across chunks), uniform SpaCO at q_u and
              the policy at q, same init, data and AdamW; held-out answer accuracy against step.

    python bench/sft_spaco.py variance --q 0.25 0.5          # bench/results/sft_variance.{json,png}
    python bench/sft_spaco.py learn --q 0.25 --steps 400     # bench/results/sft_learn.{json,png}
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from learning_curves import IGNORE, batches, build_model, evaluate, truncated_backward  # noqa: E402

from engine.chunkwise import chunkwise_backward  # noqa: E402
from engine.schedule import ChunkSchedule  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

# fmt: off
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("what", choices=["variance", "learn"])
parser.add_argument("--q", type=float, nargs="+", default=[0.25, 0.5], help="the policy's q on context chunks")
parser.add_argument("--steps", type=int, default=400, help="learn: optimizer steps per method")
parser.add_argument("--warm-steps", type=int, default=50, help="variance: SeCO steps before measuring")
parser.add_argument("--batch", type=int, default=8)
parser.add_argument("--seq-len", type=int, default=256)
parser.add_argument("--chunk", type=int, default=32)
parser.add_argument("--num-pairs", type=int, default=1)
parser.add_argument("--hidden", type=int, default=64)
parser.add_argument("--layers", type=int, default=2)
parser.add_argument("--heads", type=int, default=4)
parser.add_argument("--kv-heads", type=int, default=2)
parser.add_argument("--lr", type=float, default=1e-3)
parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
parser.add_argument("--eval-every", type=int, default=25)
parser.add_argument("--eval-samples", type=int, default=32)
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--threads", type=int, default=1)
parser.add_argument("--methods", default="seco,uniform,policy,truncated", help="learn: a subset of seco,uniform,policy,truncated")
parser.add_argument("--out", default=None, help="OUT.json and OUT.png (default: bench/results/sft_<what>)")
# fmt: on


def loss_flags(labels: torch.Tensor, k: int, chunk: int) -> list[bool]:
    targets = torch.full_like(labels, IGNORE)
    targets[:, :-1] = labels[:, 1:]
    return [bool((targets[:, c * chunk : (c + 1) * chunk] != IGNORE).any()) for c in range(k)]


def grad_of(model, batch, schedule: ChunkSchedule) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    chunkwise_backward(model, batch["input_ids"], labels=batch["labels"], schedule=schedule)
    grads = [
        p.grad.flatten() if p.grad is not None else torch.zeros(p.numel(), dtype=p.dtype)
        for p in model.parameters()
    ]
    return torch.cat(grads).double()


def exact_moments(model, batch, probs: list[float], chunk: int) -> dict:
    """Bias and variance of the Bernoulli estimator with chunk probabilities `probs`, over every selection."""
    seco = grad_of(model, batch, ChunkSchedule(chunk))
    free = [c for c, q in enumerate(probs) if q < 1]
    mean, second = torch.zeros_like(seco), 0.0
    for bits in itertools.product([0, 1], repeat=len(free)):
        dropped = {c for c, b in zip(free, bits) if not b}
        sel = tuple(c for c in range(len(probs)) if c not in dropped)
        p = math.prod(probs[c] if c in sel else 1 - probs[c] for c in free)
        g = grad_of(model, batch, ChunkSchedule(chunk, mode="spaco", chunk_probs=tuple(probs), selected=sel))
        mean += p * g
        second += p * float(((g - seco) ** 2).sum())
    norm2 = float((seco**2).sum())
    return {
        "expected_chunks": sum(probs),
        "relative_variance": second / norm2,
        "relative_bias": float(((mean - seco) ** 2).sum().sqrt()) / math.sqrt(norm2),
        "selections": 2 ** len(free),
    }


def variance(args) -> dict:
    model = build_model(args)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    for b in batches(args, args.seed, args.warm_steps):  # a little training: the long-range signal exists
        chunkwise_backward(
            model, b["input_ids"], labels=b["labels"], schedule=ChunkSchedule(chunk_size=args.chunk)
        )
        opt.step()
        opt.zero_grad(set_to_none=True)
    batch = next(iter(batches(args, args.seed + 2000, 1)))
    k = math.ceil(args.seq_len / args.chunk)
    flags = loss_flags(batch["labels"], k, args.chunk)
    rows = []
    for q in args.q:
        policy = [1.0 if f else q for f in flags]
        qu = sum(policy) / k
        row = {"q": q, "loss_chunks": sum(flags), "chunks": k, "uniform_q": qu}
        row["policy"] = exact_moments(model, batch, policy, args.chunk)
        row["uniform"] = exact_moments(model, batch, [qu] * k, args.chunk)
        row["variance_ratio_uniform_over_policy"] = (
            row["uniform"]["relative_variance"] / row["policy"]["relative_variance"]
        )
        print(json.dumps(row), flush=True)
        rows.append(row)
    return {"config": vars(args), "rows": rows}


def learn(args) -> dict:
    k = math.ceil(args.seq_len / args.chunk)
    probe = next(iter(batches(args, args.seed, 1)))
    n = sum(loss_flags(probe["labels"], k, args.chunk))
    q = args.q[0]
    qu = (n + q * (k - n)) / k
    methods = {
        "seco": ("seco", ChunkSchedule(args.chunk)),
        "uniform": (f"spaco uniform q={qu:.3g}", ChunkSchedule(args.chunk, mode="spaco", sample_prob=qu)),
        "policy": (
            f"spaco answer q=1, context q={q:g}",
            ChunkSchedule(args.chunk, mode="spaco", sample_prob=q, loss_chunks="always"),
        ),
        "truncated": ("truncated", None),
    }
    methods = dict(methods[m] for m in args.methods.split(","))
    eval_batches = list(batches(args, args.seed + 1000, max(1, args.eval_samples // args.batch)))
    runs = {}
    for name, schedule in methods.items():
        model = build_model(args)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
        gen = torch.Generator().manual_seed(args.seed + 1)
        log = {"eval_step": [], "eval_acc": [], "eval_loss": [], "selected": []}
        t0 = time.perf_counter()
        for step, b in enumerate(batches(args, args.seed, args.steps)):
            if step % args.eval_every == 0:
                el, ea = evaluate(model, eval_batches)
                log["eval_step"].append(step), log["eval_loss"].append(el), log["eval_acc"].append(ea)
            opt.zero_grad(set_to_none=True)
            if schedule is None:
                truncated_backward(model, b["input_ids"], b["labels"], args.chunk)
                log["selected"].append(k)
            else:
                st = chunkwise_backward(
                    model, b["input_ids"], labels=b["labels"], schedule=schedule, generator=gen
                )
                log["selected"].append(len(st.selected))
            opt.step()
        el, ea = evaluate(model, eval_batches)
        log["eval_step"].append(args.steps), log["eval_loss"].append(el), log["eval_acc"].append(ea)
        log["seconds"] = time.perf_counter() - t0
        log["mean_selected_chunks"] = sum(log["selected"]) / len(log["selected"])
        hits = [s for s, a in zip(log["eval_step"], log["eval_acc"]) if a >= 0.5]
        log["first_step_acc_ge_0.5"] = hits[0] if hits else None
        print(
            f"{name}: final acc {ea:.3f}, acc >= 0.5 at step {log['first_step_acc_ge_0.5']}, "
            f"{log['mean_selected_chunks']:.2f} chunks/step, {log['seconds']:.0f} s",
            flush=True,
        )
        runs[name] = log
    return {"config": vars(args), "loss_chunks": n, "chunks": k, "runs": runs}


def plot(result: dict, what: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4))
    if what == "variance":
        rows = result["rows"]
        xs = range(len(rows))
        ax.bar(
            [x - 0.2 for x in xs], [r["uniform"]["relative_variance"] for r in rows], 0.4, label="uniform q_u"
        )
        ax.bar(
            [x + 0.2 for x in xs], [r["policy"]["relative_variance"] for r in rows], 0.4, label="answer q=1"
        )
        ax.set_xticks(
            list(xs),
            [
                f"q={r['q']:g}\n(q_u={r['uniform_q']:.3f},\n{r['policy']['expected_chunks']:.2f} chunks)"
                for r in rows
            ],
        )
        ax.set_yscale("log")
        ax.set_ylabel("E|g_S - g|^2 / |g|^2 (exact)")
        ax.set_title("SpaCO gradient variance at equal expected cost")
    else:
        for name, log in result["runs"].items():
            ax.plot(
                log["eval_step"], log["eval_acc"], label=f"{name} ({log['mean_selected_chunks']:.2f} chunks)"
            )
        ax.set_xlabel("step")
        ax.set_ylabel("held-out answer accuracy")
        ax.set_title(f"kv_recall SFT, {result['chunks']} chunks, answer in {result['loss_chunks']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> dict:
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = variance(args) if args.what == "variance" else learn(args)
    out = str(args.out or RESULTS / f"sft_{args.what}")  # not Path.with_suffix: "q0.5" is no suffix
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out + ".json").write_text(json.dumps(result, indent=1))
    plot(result, args.what, Path(out + ".png"))
    print(f"wrote {out}.json and {out}.png")
    return result


if __name__ == "__main__":
    main()
