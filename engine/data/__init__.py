"""Training data for long-context fine-tuning.

Four layers, each its own module and usable on its own:

* ``tokenizers``: ``ByteTokenizer`` (no download, 259 ids) and ``load_tokenizer`` for a local HF tokenizer;
* datasets: ``synthetic.SyntheticDataset`` (long-range recall tasks generated from a seed), document datasets
  (``files``, read by ``readers`` from any format ``datasets`` reads) that ``packing`` packs into ``seq_len``
  blocks or splits and pads, SFT datasets (``sft``) and ``mixture.MixtureDataset``;
* ``stream``: ``DataStream``, an endless, data-parallel, exactly resumable batch iterator;
* ``build_dataset`` (here), which maps a ``DataConfig`` onto the above.

Every sample is a dict of three 1-D ``torch.long`` tensors of length ``seq_len``:
``input_ids``, ``labels`` and ``attention_mask``. ``labels`` are *aligned* with ``input_ids`` (HF
convention: the model / loss shifts them by one); positions that must not contribute to the loss hold
``IGNORE_INDEX`` (-100).
"""

from __future__ import annotations

import dataclasses

from torch.utils.data import Dataset

from engine.config import DataConfig, MixtureSource
from engine.data.files import FILE_KINDS, load_file_dataset
from engine.data.mixture import MixtureDataset
from engine.data.packing import PackedDataset, PaddedDataset, TokenStore
from engine.data.sft import SftDataset, build_sft_dataset
from engine.data.stream import DataStream, collate
from engine.data.synthetic import SYNTHETIC_TASKS, SyntheticDataset
from engine.data.tokenizers import IGNORE_INDEX, ByteTokenizer, Tokenizer, load_tokenizer

SFT_KINDS = ("chat", "prompt_completion")  # engine/data/sft.py

__all__ = [
    "IGNORE_INDEX",
    "SYNTHETIC_TASKS",
    "FILE_KINDS",
    "Tokenizer",
    "ByteTokenizer",
    "load_tokenizer",
    "SyntheticDataset",
    "PackedDataset",
    "PaddedDataset",
    "SftDataset",
    "MixtureDataset",
    "SFT_KINDS",
    "load_file_dataset",
    "check_vocab",
    "collate",
    "DataStream",
    "build_dataset",
]


def check_vocab(dataset: Dataset, vocab_size: int) -> None:
    """Raise ValueError if any token id of ``dataset`` is >= ``vocab_size`` (the model's embedding rows).

    Out-of-range ids otherwise surface as a device-side assert deep inside the embedding on GPU.
    Datasets of this module answer in O(1)/one vectorised pass; other datasets are scanned sample by sample.
    """
    max_token_id = getattr(dataset, "max_token_id", None)
    if max_token_id is not None:
        top = max_token_id()
    else:
        top = max(int(dataset[i]["input_ids"].max()) for i in range(len(dataset)))  # type: ignore[arg-type]
    if top < vocab_size:
        return
    source = getattr(dataset, "source", type(dataset).__name__)
    where = ""
    if isinstance(dataset, TokenStore):
        where = f" (first in document {dataset.locate_token(top)})"
    elif getattr(dataset, "pad_id", None) == top:
        where = " (the pad id: the tokenizer's pad token, or its eos where it has none)"
    raise ValueError(
        f"{source}: token id {top}{where} is outside the model vocabulary (vocab_size={vocab_size}); "
        "does the tokenizer belong to this model?"
    )


# ----------------------------------------------------------------------------------------------------
# Config entry point
# ----------------------------------------------------------------------------------------------------


def build_dataset(data_cfg: DataConfig, tokenizer: Tokenizer, vocab_size: int | None = None) -> Dataset:
    """The dataset of config section ``data_cfg`` (a ``MixtureDataset`` for ``data.mixture``).

    ``num_samples`` and ``synthetic_task`` apply to ``kind == "synthetic"`` only; file data uses every
    document (``num_samples`` is ignored), and ``seed`` there only matters to the mixture's draw and
    ``DataStream``'s shuffling. If ``vocab_size`` (the model's) is given, ``check_vocab`` runs on every dataset.
    """
    kind = data_cfg.kind
    if kind == "synthetic":
        parts: list[Dataset] = [
            SyntheticDataset(
                data_cfg.synthetic_task, data_cfg.seq_len, data_cfg.num_samples, data_cfg.seed, tokenizer
            )
        ]
    elif kind in FILE_KINDS or kind in SFT_KINDS:
        sources = (
            [(data_cfg, data_cfg.path, data_cfg.format)]
            if data_cfg.mixture is None
            else [
                (_source_config(data_cfg, m), m.path, m.format or data_cfg.format) for m in data_cfg.mixture
            ]
        )
        parts = [_file_dataset(cfg, tokenizer, path, fmt) for cfg, path, fmt in sources]
    else:
        raise ValueError(
            f"unknown data kind {kind!r}; expected 'synthetic' or one of {sorted(FILE_KINDS) + list(SFT_KINDS)}"
        )
    if vocab_size is not None:
        for part in parts:
            check_vocab(part, vocab_size)
    if data_cfg.mixture is None:
        return parts[0]
    names = [str(m.path) for m in data_cfg.mixture]
    return MixtureDataset(parts, [m.weight for m in data_cfg.mixture], data_cfg.seed, names)


def _source_config(data_cfg: DataConfig, source: MixtureSource) -> DataConfig:
    """The data section as one mixture dataset reads it: its own chat layout where it names one."""
    if source.chat_format is None:
        return data_cfg
    return dataclasses.replace(data_cfg, chat_format=source.chat_format)


def _file_dataset(data_cfg: DataConfig, tokenizer: Tokenizer, path: str | None, fmt: str) -> Dataset:
    if not path:
        raise ValueError(f"data kind {data_cfg.kind!r} needs a path")
    if data_cfg.kind in SFT_KINDS:
        return build_sft_dataset(data_cfg, tokenizer, path, fmt)
    assert data_cfg.truncation is not None, "DataConfig resolves the documents' default"
    return load_file_dataset(
        data_cfg.kind,
        path,
        tokenizer,
        seq_len=data_cfg.seq_len,
        packing=data_cfg.packing,
        text_field=data_cfg.text_field,
        format=fmt,
        truncation=data_cfg.truncation,
    )
