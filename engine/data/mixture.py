"""``MixtureDataset``: several datasets of rows as one, each row drawn from dataset i with probability
weight_i / sum(weights), deterministically from a seed."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from torch.utils.data import Dataset

from engine.data.stream import row_lengths_of
from engine.data.tokenizers import Sample, wrap_index


class MixtureDataset(Dataset):
    """As many rows as the components have together; row i comes from component ``which[i]``.

    The draw of ``which`` is fixed by ``seed``, so every rank and every resume sees the same mixture. A
    component drawn more often than it has rows repeats them, walking a seeded permutation of its rows
    cyclically; one drawn less often uses a prefix of that permutation (a different subset for every seed).
    """

    def __init__(
        self, components: Sequence[Dataset], weights: Sequence[float], seed: int, names: Sequence[str]
    ):
        assert len(components) == len(weights) == len(names) >= 1 and all(w > 0 for w in weights)
        self.components, self.names = list(components), list(names)
        sizes = np.array([len(c) for c in components], dtype=np.int64)  # type: ignore[arg-type]
        total = int(sizes.sum())
        p = np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
        self.weights = p
        rng = np.random.default_rng(
            (seed, 0x6D6978)
        )  # its own stream: the DataStream shuffles with (seed, epoch)
        self.which = rng.choice(len(components), size=total, p=p).astype(np.int64)
        perms = [rng.permutation(int(n)) for n in sizes]
        ordinal = np.zeros(total, dtype=np.int64)  # how many earlier rows came from the same component
        for c in range(len(components)):
            at = np.nonzero(self.which == c)[0]
            ordinal[at] = perms[c][np.arange(at.size) % sizes[c]]
        self.row = ordinal
        self.source = "mixture of " + ", ".join(self.names)

    def __len__(self) -> int:
        return self.which.size

    def __getitem__(self, index: int) -> Sample:
        index = wrap_index(index, len(self), "rows")
        return self.components[int(self.which[index])][int(self.row[index])]

    def row_lengths(self) -> np.ndarray:
        """Real tokens of every row, from the components' own ``row_lengths`` (or their attention masks)."""
        out = np.empty(self.which.size, dtype=np.int64)
        for c, part in enumerate(self.components):
            at = self.which == c
            out[at] = row_lengths_of(part)[self.row[at]]
        return out

    def drawn(self) -> list[int]:
        """Rows drawn from each component."""
        return np.bincount(self.which, minlength=len(self.components)).tolist()
