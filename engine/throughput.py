"""What a run reports about its speed and size: tokens/s over real (non-padding) tokens, MFU, ETA, and the
start-up summary (parameters, rows, tokens, steps per epoch, effective batch, chunks per row).

MFU counts model FLOPs, not the work chunk-wise backprop does (its pass-1 forward and any recompute are
overhead, as activation recomputation is in every MFU figure). Per real token: 2 x the parameters that do
matmuls (all but the input embedding lookup) for the forward, 2 x them again for the gradients of the
activations, 2 x the trainable ones for their weight gradients (6 x N for a full fine-tune; frozen weights
under LoRA cost 4 x), plus causal attention, 6 x layers x attention width x the document's length (forward
and backward over the lower triangle of the score matrix).
"""

from __future__ import annotations

import math
import time

import torch

# Dense bf16 / fp16 tensor-core peaks (TFLOPS, no sparsity) from the vendors' data sheets, matched against
# torch.cuda.get_device_name() in this order (the first substring that occurs wins).
KNOWN_PEAK_TFLOPS = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("A6000", 154.8),
    ("L4", 121.0),
    ("RTX 4090", 165.2),
    ("RTX 3090", 71.0),
)


def peak_tflops(configured: float | None) -> float | None:
    """logging.peak_tflops, else the known peak of this CUDA device, else None (CPU, unknown device)."""
    if configured is not None:
        return configured
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((tflops for key, tflops in KNOWN_PEAK_TFLOPS if key in name), None)


def _numel(p: torch.Tensor) -> int:
    return int(getattr(p, "ds_numel", 0) or p.numel())  # ZeRO-3 partitions leave numel() 0 on the rank


def parameter_counts(module: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters, whole also under ZeRO-3 partitioning."""
    params = list(module.parameters())
    return sum(_numel(p) for p in params if p.requires_grad), sum(_numel(p) for p in params)


class FlopModel:
    """Model FLOPs of a training step from its token counts (module doc)."""

    def __init__(self, module: torch.nn.Module):
        cfg = module.config.get_text_config() if hasattr(module.config, "get_text_config") else module.config
        trainable, total = parameter_counts(module)
        embed = module.get_input_embeddings()
        tied = embed is not None and embed.weight is getattr(module.get_output_embeddings(), "weight", None)
        lookup = 0 if embed is None or tied else _numel(embed.weight)
        trained_lookup = lookup if lookup and embed.weight.requires_grad else 0
        self.per_token = 4 * (total - lookup) + 2 * (trainable - trained_lookup)
        heads = getattr(cfg, "num_attention_heads", 0) or 0
        head_dim = getattr(cfg, "head_dim", None) or (cfg.hidden_size // heads if heads else 0)
        kinds = getattr(cfg, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers
        layers = sum(1 for k in kinds if "attention" in k and "linear" not in k)
        self.per_pair = 6 * layers * heads * head_dim  # x (document length)^2 summed over documents

    def step_flops(self, real_tokens: int, attention_pairs: int) -> float:
        return float(self.per_token) * real_tokens + float(self.per_pair) * attention_pairs


def mfu(flops: float, seconds: float, peak: float | None, devices: int) -> float | None:
    if peak is None or seconds <= 0:
        return None
    return flops / seconds / (peak * 1e12 * devices)


class Eta:
    """Seconds left, from the mean step time of this run so far (a resumed run starts its own mean)."""

    def __init__(self, total_steps: int, start_step: int):
        self.total, self.start, self.t0 = total_steps, start_step, time.perf_counter()

    def seconds_left(self, step: int) -> float:
        done = step - self.start
        return (time.perf_counter() - self.t0) / max(done, 1) * (self.total - step)


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}" if h else f"{rem // 60}:{rem % 60:02d}"


def _count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def summary_lines(
    *,
    trainable: int,
    total: int,
    rows: int,
    tokens: int | None,
    world: int,
    micro: int,
    accum: int,
    seq_len: int,
    chunk_size: int,
    micro_batches_per_epoch: int,
    total_steps: int,
) -> list[str]:
    """The start-up summary printed on rank 0 before the first step."""
    effective = micro * accum * world
    per_epoch = micro_batches_per_epoch / accum
    real = "" if tokens is None else f", {_count(tokens)} non-padding tokens"
    avg = "" if tokens is None or not rows else f" (~{_count(tokens / rows * effective)} non-padding)"
    return [
        f"parameters: {_count(trainable)} trainable of {_count(total)} ({100 * trainable / max(total, 1):.2f}%)",
        f"train set: {rows} rows of up to {seq_len} tokens{real}",
        f"effective batch: {effective} rows = data.batch_size {micro} x {accum} micro-batches x {world} "
        f"data-parallel ranks, "
        f"{_count(effective * seq_len)} token slots{avg}",
        f"steps: {total_steps} optimizer steps, {per_epoch:g} per epoch ({total_steps / per_epoch:.3g} epochs); "
        f"chunks per row: {math.ceil(seq_len / chunk_size)} (chunk_size {chunk_size})",
    ]


def dataset_tokens(dataset) -> int:
    """Non-padding tokens in the dataset's rows (a mixture's drawn rows, eval.split's training rows), from the
    row lengths the datasets record."""
    from engine.data.stream import row_lengths_of

    return int(row_lengths_of(dataset).sum())
