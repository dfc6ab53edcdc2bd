"""Evaluation during training and of any checkpoint or exported model: eval/loss and retrieval.

    python -m engine.evaluate --config X [--checkpoint DIR | --model DIR] [--section.key=value ...]

eval/loss is HF's `.loss` over the whole held-out set: the cross-entropy summed over every target token of
every row, divided by their number (token-weighted, not an average of per-batch means). Each rank scores
its shard (rows r, r + W, ...) chunk-wise without a graph (engine/chunk_eval.py), and the sums are reduced
over ranks. Under ZeRO-3 every chunk's forward gathers parameters, so all ranks run the same number of
batches of the same length: a rank whose shard is used up scores a row with no targets instead. Under
sequence parallelism the shards are the data-parallel groups', each scored by its P ranks together with
every chunk split over them (`EvalShard`): evaluation takes the memory of training's pass 1 there too.

The held-out set is eval.path (read like data.path) or eval.split, a fraction of the training rows drawn
from data.seed and taken out of the training set before the data stream sees it. Retrieval (needle /
passkey) lives in engine/retrieval.py; this module runs it beside the loss at every evaluation.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Dataset, Subset

from engine.chunk_eval import score
from engine.config import Config, EvalConfig
from engine.options import ChunkOptions

SPLIT_SEED = 0x5EC0E7  # mixed with data.seed: the held-out rows are not the first rows of an epoch's draw


# ------------------------------------------------------------------------------------------- held-out data


def split_rows(num_rows: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(training rows, held-out rows) of a dataset of `num_rows`: round(fraction x rows), at least one,
    drawn from `seed`; both sorted. The same arguments always give the same split."""
    held = max(1, round(fraction * num_rows))
    if held >= num_rows:
        raise ValueError(
            f"eval.split: {fraction} of {num_rows} training rows holds out {held}, leaving none to train on"
        )
    order = np.random.default_rng((seed, SPLIT_SEED)).permutation(num_rows)
    return sorted(int(i) for i in order[held:]), sorted(int(i) for i in order[:held])


def held_out(
    cfg: Config, tokenizer, dataset: Dataset, vocab_size: int | None
) -> tuple[Dataset, Dataset | None]:
    """(training set, eval set): the training set minus eval.split's rows, or unchanged with eval.path
    (then read like data.path, rows of eval.seq_len) or without an eval loss."""
    ev = cfg.eval
    if ev.split is not None:
        train, held = split_rows(len(dataset), ev.split, cfg.data.seed)
        return Subset(dataset, train), Subset(dataset, held)
    if ev.path is None:
        return dataset, None
    from engine.data.host_cache import build_dataset_once_per_host

    # One source, read with data's kind, format and fields (a training mixture's weights do not apply).
    data = dataclasses.replace(cfg.data, path=ev.path, mixture=None, seq_len=ev.seq_len or cfg.data.seq_len)
    try:
        return dataset, build_dataset_once_per_host(data, tokenizer, vocab_size, cfg.model.trust_remote_code)
    except ValueError as e:
        raise ValueError(f"eval.path: {e}") from None


def prepare_eval(
    cfg: Config, tokenizer, dataset: Dataset, vocab_size: int | None
) -> tuple[Dataset, Evaluator | None]:
    """(training set, the loop's Evaluator or None): the held-out rows and the retrieval items, built
    before any process group exists (a bad eval.path or a retrieval length too short is a user error)."""
    if not cfg.eval.enabled:
        return dataset, None
    train, eval_set = held_out(cfg, tokenizer, dataset, vocab_size)
    items = None
    if cfg.eval.retrieval.lengths:
        from engine.retrieval import build_items, filler_text

        want = 4 * max(cfg.eval.retrieval.lengths)
        text = filler_text(eval_set, tokenizer, want) if eval_set is not None else None
        if text is None:
            text = filler_text(train, tokenizer, want)
        items = build_items(cfg.eval.retrieval, tokenizer, text)
    return train, Evaluator(cfg, eval_set, items)


# ------------------------------------------------------------------------------------------------ sharding


def shard_batches(rows: Sequence[int], rank: int, world: int, batch_size: int) -> Iterator[list[int]]:
    """This rank's batches of `rows` (rows r, r + W, ...), as many on every rank: a rank whose shard is
    used up gets empty lists (the caller then scores a row without targets, see the module docstring)."""
    mine = list(rows[rank::world])
    per_rank = -(-len(rows) // world)
    for b in range(-(-per_rank // batch_size)):
        yield mine[b * batch_size : (b + 1) * batch_size]


def reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum over ranks (float64); the values themselves without a process group."""
    if rank_world()[1] == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def trim_padding(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch without the right padding all its rows share, cut to the longest row of any rank's batch
    (ranks agree: under ZeRO-3 every rank runs as many chunks). What is cut is padding: never a target,
    never attended, so the scores do not change; unpacked rows of mostly padding then cost their length."""
    used = batch["attention_mask"].any(dim=0).nonzero()
    length = int(used[-1]) + 1 if used.numel() else 2
    if rank_world()[1] > 1:
        t = torch.tensor([length], device=batch["input_ids"].device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        length = int(t)
    return {k: v[:, : max(2, length)] for k, v in batch.items()}


def rank_world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without a process group (python -m engine.evaluate)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@dataclasses.dataclass(frozen=True)
class EvalShard:
    """Which rows this rank evaluates: the shard `index` of `count` data-parallel groups. Under sequence
    parallelism the P ranks of a `group` (engine/sequence_parallel.py's SequenceGroup) score the same rows
    together, each chunk split over them as in training, and one of them (`counts`) adds the group's sums."""

    index: int
    count: int
    group: Any = None
    counts: bool = True


def eval_shard(model) -> EvalShard:
    """This rank's shard: a DeepSpeed engine initialised with the sequence-parallel mpu brings its group."""
    rank, world = rank_world()
    if getattr(model, "sequence_parallel_size", 1) <= 1:
        return EvalShard(rank, world)
    from engine.sequence_parallel import SequenceGroup

    group = SequenceGroup(model.seq_parallel_group)  # consecutive ranks, as the trainer's data stream reads
    return EvalShard(rank // group.size, world // group.size, group, group.rank == 0)


def device_of(model) -> torch.device:
    """Where the model's inputs go (a DeepSpeed engine and an HF model both say; else its parameters')."""
    device = getattr(model, "device", None)
    return device if isinstance(device, torch.device) else next(model.parameters()).device


def batch_of(
    dataset: Dataset, rows: list[int], fallback: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """The rows of `dataset` as a batch on `device`; no rows: row `fallback` without targets."""
    from engine.data import IGNORE_INDEX, collate

    if rows:
        batch = collate([dataset[i] for i in rows])
    else:  # this rank's shard is used up: the same shapes, no targets
        batch = collate([dataset[fallback]])
        batch["labels"] = torch.full_like(batch["labels"], IGNORE_INDEX)
    return {k: v.to(device) for k, v in batch.items()}


@contextlib.contextmanager
def eval_mode(model):
    """Dropout off for the evaluation; the model's mode is put back afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def eval_loss(
    model, dataset: Dataset, rows: Sequence[int], batch_size: int, chunk_size: int, options: ChunkOptions
) -> dict:
    """{'eval/loss', 'eval/ppl', 'eval/tokens'} over `rows` of `dataset`, all ranks together."""
    shard = eval_shard(model)
    device = device_of(model)
    loss_sum, tokens = 0.0, 0
    with eval_mode(model):
        for batch_rows in shard_batches(rows, shard.index, shard.count, batch_size):
            b = trim_padding(batch_of(dataset, batch_rows, rows[0], device))
            s = score(
                model,
                b["input_ids"],
                labels=b["labels"],
                attention_mask=b["attention_mask"],
                position_ids=b.get("position_ids"),
                chunk_size=chunk_size,
                options=options,
                sequence_group=shard.group,
            )
            if shard.counts:
                loss_sum, tokens = loss_sum + s.loss_sum, tokens + s.num_tokens
    loss_sum, tokens = reduce_sum([loss_sum, float(tokens)], device)
    loss = loss_sum / tokens if tokens else math.nan
    return {"eval/loss": loss, "eval/ppl": math.exp(min(loss, 700.0)), "eval/tokens": int(tokens)}


# --------------------------------------------------------------------------------------------- the loop


class Evaluator:
    """What the training loop evaluates: the held-out loss and the retrieval grid, at eval.every and after
    the last step. `losses` maps each evaluated step to its eval/loss (for checkpoint.keep_best)."""

    def __init__(self, cfg: Config, eval_set: Dataset | None, retrieval_items: Any = None):
        self.cfg, self.eval_set, self.items = cfg, eval_set, retrieval_items
        ev: EvalConfig = cfg.eval
        self.rows: list[int] = []
        if eval_set is not None:
            self.rows = list(range(len(eval_set)))[: ev.max_samples]
            if not self.rows:
                raise ValueError("eval: the held-out set has no rows")
        self.batch_size = ev.batch_size or cfg.data.batch_size
        self.chunk_size, self.options = cfg.chunking.chunk_size, ChunkOptions.from_config(cfg.chunking)
        self.losses: dict[int, float] = {}

    def due(self, step: int, last_step: int) -> bool:
        every = self.cfg.eval.every
        return step == last_step or (every is not None and step % every == 0)

    def __call__(self, model, step: int) -> dict[str, Any]:
        t0, record = time.perf_counter(), {}
        if self.eval_set is not None:
            record.update(
                eval_loss(model, self.eval_set, self.rows, self.batch_size, self.chunk_size, self.options)
            )
            self.losses[step] = record["eval/loss"]
        if self.items is not None:
            from engine.retrieval import evaluate_items

            record.update(evaluate_items(model, self.items, self.batch_size, self.chunk_size, self.options))
        record["eval/time_s"] = time.perf_counter() - t0
        return record


def format_eval(step: int, record: dict[str, Any]) -> str:
    parts = [f"eval step {step}"]
    if "eval/loss" in record:
        parts.append(
            f"loss {record['eval/loss']:.4f} (ppl {record['eval/ppl']:.2f}, {record['eval/tokens']} tokens)"
        )
    if "eval/retrieval_acc" in record:
        parts.append(f"retrieval {record['eval/retrieval_acc']:.3f}")
    parts.append(f"{record['eval/time_s']:.1f} s")
    return " | ".join(parts)


# ---------------------------------------------------------------------------------------------- the CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m engine.evaluate",
        description="Evaluate a checkpoint or an exported model as the run config's eval section says "
        "(eval/loss, retrieval). Other arguments are overrides: --section.key=value.",
        allow_abbrev=False,
    )
    parser.add_argument("--config", required=True, help="the run's YAML config")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--checkpoint", help="a checkpoint.dir (its latest) or one global_stepN in it")
    group.add_argument("--model", help="an exported model: HF model directory or LoRA adapter")
    parser.add_argument("--out", help="directory for evaluation.json and retrieval.png (default: print only)")
    args, overrides = parser.parse_known_args(argv)
    try:
        record = evaluate_command(args.config, overrides, args.checkpoint, args.model)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_eval(0, record).replace("eval step 0", "eval"))
    for cell in record.get("eval/retrieval", []):
        print(f"  length {cell['length']:>7}  depth {cell['depth']:<5g}  accuracy {cell['accuracy']:.3f}")
    if args.out:
        _write_outputs(Path(args.out), record)
    return 0


def evaluate_command(
    config: str, overrides: list[str], checkpoint: str | None, model_dir: str | None
) -> dict:
    """The record `python -m engine.evaluate` prints: the loop's evaluation, in one process."""
    from engine.chunk_auto import resolve_chunk_size
    from engine.config_load import load_config
    from engine.data import build_dataset, load_tokenizer
    from engine.load_trained import model_for_eval
    from engine.model import model_vocab_size

    cfg, chunk_line = resolve_chunk_size(load_config(config, overrides), world_size=1)  # chunk_size: auto
    if chunk_line:
        print(chunk_line)
    if not cfg.eval.enabled:
        raise ValueError("eval: nothing to evaluate; set eval.path, eval.split or eval.retrieval.lengths")
    tokenizer = load_tokenizer(cfg.data.tokenizer, cfg.model.trust_remote_code)
    vocab = model_vocab_size(cfg.model)
    _, evaluator = prepare_eval(cfg, tokenizer, build_dataset(cfg.data, tokenizer, vocab), vocab)
    model = model_for_eval(cfg, checkpoint, model_dir)
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    return evaluator(model, step=0)


def _write_outputs(out: Path, record: dict) -> None:
    from engine import report

    out.mkdir(parents=True, exist_ok=True)
    (out / "evaluation.json").write_text(json.dumps(record, indent=1, allow_nan=True) + "\n")
    print(out / "evaluation.json")
    if record.get("eval/retrieval"):
        print(
            report.save_figure(
                report.retrieval_figure(0, record["eval/retrieval"]), out / report.RETRIEVAL_FILE
            )
        )


if __name__ == "__main__":
    sys.exit(main())
