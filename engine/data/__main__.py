"""Check a run's data before the run: `python -m engine.data --config X [--inspect N] [--data.key=value ...]`.

Prints N rendered samples with the loss-bearing tokens marked (between [[ and ]], or green on a terminal)
and a summary: samples, tokens per sample, loss tokens, what was split, truncated or dropped (samples and
tokens) and why, and rows (with packing, how full they are). Runs no model and starts no process group. Errors
are reported as the launcher reports them: one `error:` line naming the file, record and field, exit 2.
"""

from __future__ import annotations

import argparse
import contextlib
import sys

from engine.config_load import load_config
from engine.data import IGNORE_INDEX, MixtureDataset, SftDataset, build_dataset, load_tokenizer
from engine.data.summary import summary
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.data", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--inspect", type=int, default=3, metavar="N", help="samples to print (default 3)")
    args, overrides = parser.parse_known_args(argv)
    try:
        # transformers' model configs import DeepSpeed (through accelerate), whose logger writes to the stdout
        # it finds at import: it goes to stderr, stdout keeps the samples and the summary.
        with contextlib.redirect_stdout(sys.stderr):
            cfg = load_config(args.config, overrides)
            tokenizer = load_tokenizer(cfg.data.tokenizer, cfg.model.trust_remote_code)
            dataset = build_dataset(cfg.data, tokenizer, model_vocab_size(cfg.model))
    except (ValueError, OSError) as e:  # the launcher's contract (launch/train.py): one line, exit 2
        print(f"error: {e}", file=sys.stderr)
        return 2
    show(dataset, tokenizer, args.inspect, sys.stdout.isatty())
    print("--- summary")
    print("\n".join(summary(dataset)))
    return 0


def show(dataset, tokenizer, n: int, color: bool) -> None:
    """The first ``n`` samples (SFT: as rendered, before packing) or rows, loss-bearing tokens marked."""
    parts = dataset.components if isinstance(dataset, MixtureDataset) else [dataset]
    for part in parts:
        if isinstance(part, SftDataset):
            for i, s in enumerate(part.samples[:n]):
                print(f"--- sample {i} ({s.where}): {len(s.ids)} tokens, {sum(s.loss)} with loss")
                print(marked(tokenizer, s.ids, s.loss, color))
            continue
        for i in range(min(n, len(part))):
            row = part[i]
            ids, labels = row["input_ids"].tolist(), row["labels"].tolist()
            print(f"--- row {i} of {part.source}: {sum(x != IGNORE_INDEX for x in labels)} tokens with loss")
            print(marked(tokenizer, ids, [x != IGNORE_INDEX for x in labels], color))


if __name__ == "__main__":
    sys.exit(main())
