"""Evaluation runs at lengths a plain forward cannot hold: under a memory cap (engine/memory.py's tracker,
raising once the live tensors exceed it) chunk-wise scoring of a 4K sequence completes, and equals the
uncapped plain loss in float64, while a plain no-grad forward of the same sequence breaks the cap."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny import tiny_model

from engine.chunk_eval import score
from engine.memory import MemoryTracker

CAP = 12 * 2**20  # measured: chunk-wise 4K ~5.4 MiB, plain 1K ~6.3 MiB, plain 4K ~25 MiB (tiny float64 Llama)


class CappedTracker(MemoryTracker):
    """The CPU tracker with a cap: an allocation that takes the live total past `cap` raises MemoryError."""

    def __init__(self, cap: int):
        super().__init__("cpu")
        self.cap = cap

    def _track(self, s) -> None:
        super()._track(s)
        if self._current > self.cap:
            raise MemoryError(f"{self._current} bytes live, over the cap of {self.cap}")


def plain_loss(model, ids) -> float:
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    return F.cross_entropy(logits[0, :-1], ids[0, 1:]).item()  # float64 logits kept (HF's loss is float32)


def test_chunkwise_eval_fits_a_cap_plain_forward_does_not():
    model = tiny_model("LlamaConfig", torch.float64, max_position_embeddings=8192).eval()
    short = torch.randint(3, 97, (1, 1024), generator=torch.Generator().manual_seed(0))
    long = torch.randint(3, 97, (1, 4096), generator=torch.Generator().manual_seed(1))
    with CappedTracker(CAP):
        plain_loss(model, short)  # the cap is not absurd: a plain forward of 1K fits
    with pytest.raises(MemoryError), CappedTracker(CAP):
        plain_loss(model, long)
    with CappedTracker(CAP) as capped:
        got = score(model, long, chunk_size=256)
    assert capped.peak_bytes <= CAP
    assert got.num_tokens == 4095
    assert got.loss_sum / got.num_tokens == pytest.approx(plain_loss(model, long), rel=1e-12)
