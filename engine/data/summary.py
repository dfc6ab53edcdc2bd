"""What a dataset holds and what became of the data on the way: the lines `python -m engine.data` prints and
the trainer logs at start-up (rows, samples, loss tokens, and every token split, truncated or dropped)."""

from __future__ import annotations

import statistics

from torch.utils.data import Subset

from engine.data.mixture import MixtureDataset
from engine.data.packing import PackedDataset, PaddedDataset
from engine.data.sft import SftDataset


def summary(dataset) -> list[str]:
    """Human-readable lines; a mixture gives its draw, then each dataset's lines indented."""
    if isinstance(dataset, Subset):  # eval.split: the training rows of a dataset
        held = len(dataset.dataset) - len(dataset)
        return summary(dataset.dataset) + [f"training rows: {len(dataset)} ({held} held out for evaluation)"]
    if isinstance(dataset, MixtureDataset):
        lines = [f"mixture: {len(dataset)} rows"]
        for name, p, n, part in zip(dataset.names, dataset.weights, dataset.drawn(), dataset.components):
            lines.append(f"  {name}: weight {p:.3f}, {n} rows drawn of its {len(part)}")
            lines += ["    " + line for line in summary(part)]
        return lines
    lines = [f"rows: {len(dataset)} of {dataset[0]['input_ids'].numel()} tokens"]
    if isinstance(dataset, PackedDataset):
        lines.append(
            f"documents: {dataset.num_documents}, {dataset.tokens.numel()} tokens; packed into full rows, the "
            f"{dataset.dropped_tokens} tokens after the last full row dropped"
        )
    elif isinstance(dataset, PaddedDataset):
        lines.append(_padded(dataset))
    elif isinstance(dataset, SftDataset):
        lines += _sft(dataset)
    return lines + list(getattr(dataset, "notes", []))


def _padded(ds: PaddedDataset) -> str:
    long = f"{ds.long_documents} longer than seq_len {ds.seq_len}"
    if ds.dropped_tokens:
        what = f"dropped, {ds.dropped_tokens} tokens (data.truncation: drop)"
    elif ds.long_documents:
        what = f"split over {len(ds) - (ds.num_documents - ds.long_documents)} rows (data.truncation: split)"
    else:
        what = "none cut"
    return f"documents: {ds.num_documents}, {ds.tokens.numel()} tokens, one per row; {long}: {what}"


def _sft(ds: SftDataset) -> list[str]:
    lengths = [len(s.ids) for s in ds.samples]
    losses = [sum(s.loss) for s in ds.samples]
    truncated = [s.truncated for s in ds.samples if s.truncated]
    lines = [
        f"samples: {len(lengths)}; tokens per sample min {min(lengths)} / mean {statistics.mean(lengths):.1f} / "
        f"max {max(lengths)}",
        f"loss tokens: {sum(losses)} in all, per sample min {min(losses)} / mean {statistics.mean(losses):.1f} / "
        f"max {max(losses)}",
        f"truncated (oldest tokens dropped, data.truncation: left): {len(truncated)} samples, "
        f"{sum(truncated)} tokens",
    ]
    dropped = sum(ds.dropped.values())
    lines.append(
        f"dropped: {dropped} samples, {ds.dropped_tokens} tokens"
        + "".join(f"\n  {n} {why}" for why, n in ds.dropped.items())
    )
    if ds.packing:
        used = sum(lengths) / (len(ds) * ds.seq_len)
        lines.append(f"packing: {len(lengths)} samples in {len(ds)} rows, {used:.1%} of the tokens used")
    return lines
