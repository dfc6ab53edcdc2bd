"""ZeRO-3 fetches a module's parameters when its forward starts, and every rank must fetch the same tensors in
the same order. A mixture-of-experts block runs only the experts its tokens route to (HF's experts modules
loop over the hit experts), so the ranks' fetch sequences, and DeepSpeed's prefetch trace built from them,
depend on each rank's data: the all-gathers go out of step (gloo: "collective mismatch", or a hang).
DeepSpeed's remedy is a z3 leaf module: the whole block's parameters are fetched at once when the block
starts, whatever its experts then do.

A block is recognised by its structure, not by class name: a module whose direct child `experts` holds
parameters (a ModuleList of experts or one fused experts module, as every HF MoE family has)."""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)


def moe_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The mixture-of-experts blocks of `model`: modules whose child `experts` has parameters."""
    found = []
    for module in model.modules():
        experts = getattr(module, "experts", None)
        if isinstance(experts, torch.nn.Module) and any(True for _ in experts.parameters()):
            found.append(module)
    return found


def mark_moe_blocks_as_leaves(model: torch.nn.Module) -> int:
    """Flag every MoE block of `model` as a ZeRO-3 leaf (call before deepspeed.initialize, which registers
    the fetch hooks). Returns the number of blocks flagged."""
    from deepspeed.utils import set_z3_leaf_module

    blocks = moe_blocks(model)
    for block in blocks:
        set_z3_leaf_module(block, True)
    if blocks:
        logger.info(
            "ZeRO-3: %d mixture-of-experts blocks (%s) fetch their parameters whole, as leaf modules",
            len(blocks),
            type(blocks[0]).__name__,
        )
    return len(blocks)
