"""Batching: ``collate`` and ``DataStream``, an endless, data-parallel, exactly resumable batch iterator."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from engine.data.tokenizers import Sample

LENGTH_GROUP_BATCHES = 64  # group_by_length: rows sorted within windows of this many steps


def row_lengths_of(dataset: Dataset) -> np.ndarray:
    """Real (attended) tokens of every row: the dataset's own ``row_lengths()`` where it has one."""
    if isinstance(dataset, Subset):
        return row_lengths_of(dataset.dataset)[np.asarray(dataset.indices, dtype=np.int64)]
    own = getattr(dataset, "row_lengths", None)
    if own is not None:
        return np.asarray(own(), dtype=np.int64)
    return np.array([int(dataset[i]["attention_mask"].sum()) for i in range(len(dataset))], dtype=np.int64)


def collate(
    samples: Sequence[Sample], pad_to_longest: bool = False, min_length: int = 0
) -> dict[str, torch.Tensor]:
    """Stack equally shaped samples into a batch (all our samples are exactly seq_len long).

    ``pad_to_longest`` cuts the right padding every row of the batch has (``attention_mask == 0`` to the end):
    the batch is as long as its longest row, but at least ``min_length`` (never longer than the rows). The
    cut changes nothing a causal model computes for the real tokens, nor which tokens are targets.
    """
    if not samples:
        raise ValueError("collate: no samples")
    keys = samples[0].keys()
    for s in samples:
        if s.keys() != keys:
            raise ValueError(f"collate: samples have different keys: {sorted(keys)} vs {sorted(s.keys())}")
    try:
        batch = {k: torch.stack([s[k] for s in samples]) for k in keys}
    except RuntimeError as e:
        shapes = {k: [tuple(s[k].shape) for s in samples] for k in keys}
        raise ValueError(f"collate: samples have different shapes: {shapes}") from e
    if not pad_to_longest or "attention_mask" not in batch:
        return batch
    width = batch["attention_mask"].shape[1]
    used = batch["attention_mask"].any(dim=0).nonzero()
    length = min(width, max(min_length, int(used[-1]) + 1 if used.numel() else 1))
    return {k: v[:, :length] for k, v in batch.items()}


def length_grouped(perm: np.ndarray, lengths: np.ndarray, group: int) -> np.ndarray:
    """``perm`` with each window of ``group`` consecutive indices sorted by length, longest first: the rows
    of one batch (and of the ranks' batches of one step) are then of similar lengths, while which rows
    share a window stays random."""
    out = perm.copy()
    for start in range(0, perm.size, group):
        window = perm[start : start + group]
        out[start : start + group] = window[np.argsort(-lengths[window], kind="stable")]
    return out


class DataStream:
    """Endless iterator of batches for one data-parallel rank, resumable exactly from ``state_dict``.

    Every epoch draws a permutation of all samples from ``(seed, epoch)``; rank ``r`` of ``W`` takes
    positions ``r, r + W, r + 2W, ...`` of it, so ranks are disjoint and, together, cover the epoch.
    All ranks get the same number of batches per epoch (``len(dataset) // W // batch_size``) so they
    never disagree about epoch boundaries, which would deadlock collectives; the up to
    ``W * batch_size - 1`` samples left over are different ones each epoch.

    The state is just ``(epoch, position)`` (position = batches already taken in this epoch) and is the
    same on every rank, so one rank's saved state resumes all of them.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        pad_to_longest: bool = False,
        min_length: int = 0,
        group_by_length: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.dataset = dataset
        self.num_samples = len(dataset)  # type: ignore[arg-type]
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.pad_to_longest, self.min_length = pad_to_longest, min_length
        self.group_by_length = group_by_length
        self._lengths = row_lengths_of(dataset) if group_by_length else None
        self.samples_per_rank = self.num_samples // world_size
        self.batches_per_epoch = self.samples_per_rank // batch_size
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"dataset has {self.num_samples} samples: {self.samples_per_rank} per rank with "
                f"world_size={world_size}, fewer than batch_size={batch_size}, so an epoch has no batch"
            )
        self.epoch = 0
        self.position = 0
        self._order_epoch = -1
        self._order = np.empty(0, np.int64)

    def _rank_order(self) -> np.ndarray:
        """This rank's sample indices for the current epoch (cached: a permutation of 1M ids is ~10 ms)."""
        if self._order_epoch != self.epoch:
            if self.shuffle:
                perm = np.random.default_rng((self.seed, self.epoch)).permutation(self.num_samples)
            else:
                perm = np.arange(self.num_samples)
            if self._lengths is not None:
                # Windows of LENGTH_GROUP_BATCHES steps' rows (all ranks'), each sorted by length.
                group = LENGTH_GROUP_BATCHES * self.batch_size * self.world_size
                perm = length_grouped(perm, self._lengths, group)
            self._order = perm[self.rank :: self.world_size][: self.samples_per_rank]
            self._order_epoch = self.epoch
        return self._order

    def indices(self) -> list[int]:
        """Sample indices of the next batch, without advancing."""
        start = self.position * self.batch_size
        return [int(i) for i in self._rank_order()[start : start + self.batch_size]]

    def __iter__(self) -> DataStream:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        batch = collate([self.dataset[i] for i in self.indices()], self.pad_to_longest, self.min_length)
        # Advance only after the batch was built, so a failure leaves the state pointing at it.
        self.position += 1
        if self.position == self.batches_per_epoch:
            self.epoch += 1
            self.position = 0
        return batch

    def state_dict(self) -> dict[str, int | bool]:
        # The configuration is saved too, so resuming with a different one fails loudly instead of
        # silently producing different batches.
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "num_samples": self.num_samples,
            "shuffle": self.shuffle,
            "group_by_length": self.group_by_length,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = self.state_dict()
        state = {"group_by_length": False, **state}  # states saved before the option existed
        missing = sorted(set(mine) - set(state))
        if missing:
            raise ValueError(f"DataStream state is missing {missing}")
        differ = {
            k: (state[k], mine[k])
            for k in ("seed", "batch_size", "world_size", "num_samples", "shuffle", "group_by_length")
            if state[k] != mine[k]
        }
        if differ:
            detail = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in differ.items())
            raise ValueError(f"cannot resume the data stream exactly; configuration changed ({detail})")
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < self.batches_per_epoch:
            raise ValueError(f"invalid DataStream state: epoch={epoch}, position={position}")
        self.epoch, self.position = epoch, position
