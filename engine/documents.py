"""Documents in packed rows: several documents in one row that never see each other (the packing of rows
itself is engine/data/packing.py's).

Convention (HF's, as `DataCollatorWithFlattening` produces it): `position_ids` restart at 0 where a document
starts; a document boundary is wherever a position is not the previous one plus 1
(`transformers.masking_utils.find_packed_sequence_indices`). transformers turns that into a document mask
only when a forward runs without a cache and without a 2D mask, and a chunk always runs against a cache, so
the chunk's 4D mask is built here from transformers' own mask pieces (`sdpa_mask`, `causal_mask_function`,
`packed_sequence_mask_function`, `sliding_window_overlay`) and handed to the model, which passes a ready 4D
mask through unchanged. Three consequences for chunk-wise backprop:
  * the last token of a document has no target (its "next token" begins another document);
  * a chunk's attention reads keys only from the earliest document start among its first tokens
    (`kv_start`): the K/V relay never crosses a document boundary;
  * a chunk whose documents all end with it is read by no later chunk: it needs no K/V gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.masking_utils import (
    and_masks,
    causal_mask_function,
    find_packed_sequence_indices,
    packed_sequence_mask_function,
    sdpa_mask,
    sliding_window_overlay,
)

IGNORE = -100


@dataclass
class Documents:
    """Where the documents of each row start. `doc_ids[b, i]`: index of token i's document in row b (None when
    every row holds one document); `starts[b, i]`: position in the row where that document starts."""

    doc_ids: torch.Tensor | None
    starts: torch.Tensor

    def kv_start(self, s: int) -> int:
        """The first key any query of the chunk starting at `s` may read (its documents start there or later)."""
        return int(self.starts[:, s].min()) if self.doc_ids is not None else 0

    def padded(self, seq_len: int) -> Documents:
        """The layout after right padding to `seq_len`: padding continues each row's last document."""
        extra = seq_len - self.starts.shape[1]
        if extra == 0:
            return self
        pad = lambda t: torch.cat([t, t[:, -1:].expand(-1, extra)], dim=1)  # noqa: E731
        return Documents(None if self.doc_ids is None else pad(self.doc_ids), pad(self.starts))

    def cut_targets(self, targets: torch.Tensor) -> torch.Tensor:
        """No target across a boundary: token i's target is token i+1, which may begin the next document."""
        if self.doc_ids is None:
            return targets
        begins_next = self.doc_ids[:, 1:] != self.doc_ids[:, :-1]
        targets = targets.clone()
        targets[:, :-1] = targets[:, :-1].masked_fill(begins_next, IGNORE)
        return targets


def documents_of(position_ids: torch.Tensor) -> Documents:
    """The document layout of `position_ids` [batch, seq] in HF's packed convention."""
    doc_ids = find_packed_sequence_indices(position_ids)
    n = position_ids.shape[1]
    idx = torch.arange(n, device=position_ids.device).expand_as(position_ids)
    if doc_ids is None:
        return Documents(None, torch.zeros_like(idx))
    is_start = torch.ones_like(doc_ids, dtype=torch.bool)
    is_start[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    return Documents(doc_ids, torch.where(is_start, idx, 0).cummax(dim=-1).values)


def check_position_ids(position_ids: torch.Tensor, input_ids: torch.Tensor) -> None:
    if not isinstance(position_ids, torch.Tensor) or position_ids.dtype != torch.long:
        raise ValueError("position_ids must be a LongTensor of shape [batch, seq]")
    if tuple(position_ids.shape) != tuple(input_ids.shape):
        raise ValueError(
            f"position_ids has shape {tuple(position_ids.shape)}, input_ids has {tuple(input_ids.shape)}"
        )
    if (position_ids < 0).any():
        raise ValueError(
            "position_ids: must be >= 0 (HF's packed convention restarts them at 0 per document)"
        )


def layer_kinds(cfg) -> list[str]:
    """The attention kind of each layer, as the model's own mask selection sees it."""
    types = getattr(cfg, "layer_types", None)
    if types:
        return list(types)
    sliding = (
        getattr(cfg, "sliding_window", None) is not None
    )  # Mistral / Phi3 style: one kind for all layers
    return ["sliding_attention" if sliding else "full_attention"] * cfg.num_hidden_layers


def document_mask(
    cfg,
    docs: Documents,
    attention_mask: torch.Tensor | None,
    s: int,
    e: int,
    lo: int,
    dtype: torch.dtype,
) -> torch.Tensor | dict[str, torch.Tensor]:
    """The additive [batch, 1, e - s, e - lo] mask of the chunk [s, e) over keys [lo, e): causal, same
    document, not padding (and the sliding window on sliding layers). Additive, in the model's dtype: SDPA
    then keeps one copy for all layers (a boolean mask would be converted, and saved, per layer); eager
    attention adds it as it adds its own. Models with mixed layer kinds take one mask per kind."""
    assert docs.doc_ids is not None
    if "flash" in str(getattr(cfg, "_attn_implementation", "")):
        raise ValueError(
            f"{cfg.model_type}: packed rows (position_ids) need a document mask, which "
            f"{cfg._attn_implementation} cannot take against a K/V prefix; use attn_implementation sdpa"
        )
    batch = docs.doc_ids.shape[0]
    padding = None if attention_mask is None else attention_mask[:, :e].to(torch.bool)
    same_doc = and_masks(causal_mask_function, packed_sequence_mask_function(docs.doc_ids))
    masks = {}
    for kind in dict.fromkeys(layer_kinds(cfg)):
        fn = same_doc
        if kind == "sliding_attention":
            fn = and_masks(same_doc, sliding_window_overlay(cfg.sliding_window))
        elif kind != "full_attention":
            raise ValueError(
                f"{cfg.model_type}: packed rows (position_ids) support full and sliding attention only, not {kind!r}"
            )
        allowed = sdpa_mask(
            batch_size=batch,
            q_length=e - s,
            kv_length=e - lo,
            q_offset=s,
            kv_offset=lo,
            mask_function=fn,
            attention_mask=padding,
            allow_is_causal_skip=False,
            device=docs.doc_ids.device,
        )
        zero = torch.zeros((), dtype=dtype, device=allowed.device)
        masks[kind] = zero.masked_fill(~allowed, torch.finfo(dtype).min)
    return masks if len(masks) > 1 else next(iter(masks.values()))
