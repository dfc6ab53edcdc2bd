"""Check a run's data before the run: `python -m engine.data --config X [--inspect N] [--data.key=value ...]`.

Prints N rendered samples with the loss-bearing tokens marked (between [[ and ]], or green on a terminal)
and a summary: samples, tokens per sample, loss tokens, samples truncated or dropped and why, and rows
(with packing, how full they are). Runs no model and starts no process group.
"""

from __future__ import annotations

import argparse
import statistics
import sys

from engine.config_load import load_config
from engine.data import IGNORE_INDEX, build_dataset, load_tokenizer
from engine.data.sft import SftDataset
from engine.model import model_vocab_size


def marked(tokenizer, ids: list[int], loss: list[bool], color: bool) -> str:
    """The sample's text with every maximal run of loss-bearing tokens marked."""
    on, off = ("\033[32m", "\033[0m") if color else ("[[", "]]")
    out, run, state = [], [], False
    for t, flag in zip(ids + [None], loss + [not loss[-1] if loss else False]):
        if flag != state or t is None:
            text = tokenizer.decode(run)
            out.append(on + text + off if state else text)
            run, state = [], flag
        if t is not None:
            run.append(t)
    return "".join(out)


def summary(dataset) -> list[str]:
    lines = [f"rows: {len(dataset)} of {dataset[0]['input_ids'].numel()} tokens"]
    if not isinstance(dataset, SftDataset):
        return lines
    lengths = [len(s.ids) for s in dataset.samples]
    losses = [sum(s.loss) for s in dataset.samples]
    lines += [
        f"samples: {len(lengths)}; tokens per sample min {min(lengths)} / mean {statistics.mean(lengths):.1f} / "
        f"max {max(lengths)}",
        f"loss tokens: {sum(losses)} in all, per sample min {min(losses)} / mean {statistics.mean(losses):.1f} / "
        f"max {max(losses)}",
        f"truncated (oldest tokens dropped, data.truncation: left): {sum(1 for s in dataset.samples if s.truncated)}",
    ]
    dropped = sum(dataset.dropped.values())
    lines.append(f"dropped: {dropped}" + "".join(f"\n  {n} {why}" for why, n in dataset.dropped.items()))
    if dataset.packing:
        used = sum(lengths) / (len(dataset) * dataset.seq_len)
        lines.append(f"packing: {len(lengths)} samples in {len(dataset)} rows, {used:.1%} of the tokens used")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.data", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--inspect", type=int, default=3, metavar="N", help="samples to print (default 3)")
    args, overrides = parser.parse_known_args(argv)
    cfg = load_config(args.config, overrides)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    dataset = build_dataset(cfg.data, tokenizer, model_vocab_size(cfg.model))
    color = sys.stdout.isatty()
    if isinstance(dataset, SftDataset):
        for i, s in enumerate(dataset.samples[: args.inspect]):
            print(f"--- sample {i} ({s.where}): {len(s.ids)} tokens, {sum(s.loss)} with loss")
            print(marked(tokenizer, s.ids, s.loss, color))
    else:
        for i in range(min(args.inspect, len(dataset))):
            row = dataset[i]
            ids, labels = row["input_ids"].tolist(), row["labels"].tolist()
            print(f"--- row {i}: {sum(x != IGNORE_INDEX for x in labels)} tokens with loss")
            print(marked(tokenizer, ids, [x != IGNORE_INDEX for x in labels], color))
    print("--- summary")
    print("\n".join(summary(dataset)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
