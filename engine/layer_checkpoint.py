"""Checkpointed chunks (`chunking.checkpoint_layers`): each decoder layer recomputed in the chunk's backward.

Without it a chunk's backward needs every layer's saved activations at once (layers x chunk x ~20 hidden
for a Llama layer); with it only each layer's input (layers x chunk x hidden) stays, plus one layer's
activations during its recompute, so chunks can be several times longer in the same memory.

Why not transformers' own `gradient_checkpointing_enable`: its layer wrapper drops the cache (`cache=None`)
for layers that write to it, because a recompute would append the K/V a second time. Our cache is safe under
recompute, by construction (engine/kv_cache.py): a chunk's K/V go to fixed positions of preallocated
buffers, so the recompute writes the same values to the same place, and the deposit/relay happens in the
backward of the *original* `_AppendKV` node only (non-reentrant checkpointing backpropagates the original
graph and only borrows the recomputed tensors it saved), so nothing is deposited twice. The recompute
replays the RNG (torch's `preserve_rng_state`), so dropout masks are the forward's, bit for bit.

The wrapping is an instance attribute on each decoder layer for the duration of pass 2 and is removed after;
module hooks (DeepSpeed's ZeRO-3 gather, PEFT) stay outside the checkpoint and run once per forward.

A model on which the user enabled transformers' checkpointing (`gradient_checkpointing_enable()`, or
`TrainingArguments(gradient_checkpointing=True)`) would lose the prefix in every chunk (its layers drop the
cache): `hf_checkpointing_taken_over` switches that off for the step and reports it, so the step runs with
our checkpointed layers instead, which keep the cache. The model's flags are restored after the step.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
from torch.utils.checkpoint import checkpoint
from transformers.modeling_layers import GradientCheckpointingLayer

logger = logging.getLogger(__name__)
_reported: set[str] = set()


def decoder_layers(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The outermost checkpointable layers (transformers' GradientCheckpointingLayer) of a model."""
    found, prefixes = [], []
    for name, m in module.named_modules():
        if isinstance(m, GradientCheckpointingLayer) and not any(name.startswith(p) for p in prefixes):
            found.append(m)
            prefixes.append(name + ".")
    return found


@contextlib.contextmanager
def checkpointed_layers(module: torch.nn.Module, enabled: bool):
    if not enabled:
        yield
        return
    layers = decoder_layers(module)
    if not layers:
        raise ValueError(
            f"chunking.checkpoint_layers: {type(module).__name__} has no transformers decoder layers "
            "(GradientCheckpointingLayer) to checkpoint; set it to false"
        )
    saved = [layer.__dict__.get("forward") for layer in layers]
    for layer in layers:
        layer.forward = _checkpointed(layer.forward)
    try:
        yield
    finally:
        for layer, previous in zip(layers, saved):
            del layer.forward
            if previous is not None:
                layer.forward = previous


def _checkpointed(forward):
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


@contextlib.contextmanager
def hf_checkpointing_taken_over(module: torch.nn.Module) -> Iterator[bool]:
    """Switch off transformers' gradient checkpointing on `module` (a PEFT model's base model included) for
    the duration, yielding whether it was on: the caller then checkpoints layers itself, cache kept.

    transformers marks each checkpointed module with an instance attribute `gradient_checkpointing = True`
    (decoder layers and the backbone, whose `use_cache` it also turns off); exactly those are cleared and
    set back afterwards, whatever raises in between.
    """
    flagged = [m for m in module.modules() if getattr(m, "gradient_checkpointing", False) is True]
    own = [("gradient_checkpointing" in vars(m), vars(m).get("gradient_checkpointing")) for m in flagged]
    for m in flagged:
        m.gradient_checkpointing = False
    if flagged and type(module).__name__ not in _reported:
        _reported.add(type(module).__name__)
        logger.info(
            "%s has transformers' gradient checkpointing enabled, which drops the chunk-wise cache: "
            "chunk-wise steps checkpoint its layers themselves instead (chunking.checkpoint_layers)",
            type(module).__name__,
        )
    try:
        yield bool(flagged)
    finally:
        for m, (had, value) in zip(flagged, own):
            if had:
                m.gradient_checkpointing = value
            else:
                del m.gradient_checkpointing
