"""Planner: peak device memory and step time of one chunk-wise training step, and what fits.

    python -m engine.plan --config configs/llama3-8b-lora-24gb.yaml --preset llama3-8b --device-memory 24GiB \\
        [--section.key=value ...]          # the launcher's overrides, e.g. --chunking.chunk_size=auto

Python: `plan(config, chunk_size=..., seq_len=..., ...) -> Breakdown`, `longest_sequence(config,
device_memory=..., chunk_size=..., ...) -> int`, `predict_time(...) -> StepTime`, `choose_chunk_size(...)`.
The memory model is engine/plan/memory.py (its docstring says what is and is not counted), the time model
engine/plan/timing.py, model shapes (dense, hybrid, MoE) engine/plan/shape.py with presets in presets.json,
the run-config front end engine/plan/cli.py. The bench (bench/) imports these: there is one memory model.
"""

from __future__ import annotations

from engine.plan.memory import Breakdown, evaluate, longest
from engine.plan.setup import (
    ATTN,
    BACKENDS,
    DEFAULT_LOSS_SLICE,
    DEVICES,
    DTYPE_BYTES,
    LORA_DEFAULT_TARGETS,
    GiB,
    Setup,
    parse_bytes,
    usable_memory,
)  # fmt: skip
from engine.plan.shape import LINEARS, PRESETS, ModelShape, load_model_config
from engine.plan.timing import DEFAULT_BANDWIDTH, DEFAULT_TFLOPS, StepTime, step_time

__all__ = [
    "ATTN", "BACKENDS", "DEFAULT_BANDWIDTH", "DEFAULT_LOSS_SLICE", "DEFAULT_TFLOPS", "DEVICES", "DTYPE_BYTES",
    "LINEARS", "LORA_DEFAULT_TARGETS", "PRESETS", "Breakdown", "GiB", "ModelShape", "Setup", "StepTime",
    "choose_chunk_size", "load_model_config", "longest_sequence", "main", "parse_bytes", "plan",
    "predict_time", "usable_memory",
]  # fmt: skip


def plan(model_config, *, seq_len: int, device_memory: int | str | None = None, **setup) -> Breakdown:
    """Predicted peak memory of one chunk-wise step on `seq_len` tokens (per rank, bytes by component).

    model_config: a transformers config, a dict of its fields, a preset name (see PRESETS) or a ModelShape.
    setup (keywords of Setup):
    chunk_size: tokens per chunk. dtype: the model's dtype (bfloat16 / float16 mean mixed precision: Adam
        keeps float32 master weights). batch: sequences per rank.
    zero_stage, world_size, offload_optimizer, offload_param: how DeepSpeed partitions and places the static
        state (ZeRO-1: optimizer states; ZeRO-2: + gradients; ZeRO-3: + weights).
    lora_rank: 0 = full fine-tuning; otherwise LoRA adapters of that rank on `lora_targets`, stored in
        `lora_dtype` (default: the model dtype, as DeepSpeed casts every parameter; PEFT alone keeps them
        in float32).
    attn: "sdpa", "eager" or "flash_attention_2" (the model's attn_implementation). For "sdpa" the engine
        runs its own mask-free causal attention on grouped K/V heads (engine/attention.py).
    repeat_kv: whether attention gets K/V copied once per query head (GQA). None = what the engine does:
        eager repeats K/V; sdpa (the engine's) and flash_attention_2 take grouped heads.
    backend: "deepspeed" (the above applies) or "local" (a plain model in one process, torch AdamW, and
        chunkwise_backward's own float32 accumulation of 16-bit gradients).
    offload_kv: K/V and their gradients in host memory (`kv_host`), one layer's K/V copied to the device at
        a time (and the next one prefetched, on CUDA); "auto": only what does not fit in `device_memory`
        (the usable bytes, see usable_memory) beside the rest of the step.
    checkpoint_layers: each decoder layer is recomputed during its chunk's backward (chunking.checkpoint_layers).
    fused_loss, loss_slice: the chunk's cross-entropy over slices of loss_slice tokens.
    kv_grad_dtype: "bfloat16" (default) or "float32" K/V gradients (chunking.kv_grad_dtype), never below the
        K/V's own dtype (float32 models keep float32).
    device: "cuda" (the planner's purpose) or "cpu" (where tests/test_plan.py measures; no prefetch there).
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be an integer >= 1, got {seq_len!r}")
    budget = None if device_memory is None else parse_bytes(device_memory)
    return evaluate(
        ModelShape.from_config(model_config), Setup(**_setup(setup)), seq_len, device_budget=budget
    )


def longest_sequence(
    model_config,
    *,
    device_memory: int | str,
    reserve: int | str = GiB,
    margin: float = 0.10,
    host_memory: int | str | None = None,
    multiple_of: int | None = None,
    **setup,
) -> int:
    """The longest sequence whose predicted peak fits in `usable_memory(device_memory, reserve, margin)`
    (and whose host-side state fits in `host_memory`, if given), rounded down to `multiple_of` (default: the
    chunk size); 0 if not even one chunk fits. `setup`: the keywords of `plan`."""
    budget = usable_memory(device_memory, reserve, margin)
    return longest(
        ModelShape.from_config(model_config), Setup(**_setup(setup)), budget, host_memory, multiple_of
    )


def predict_time(
    model_config,
    *,
    seq_len: int,
    tflops: float = DEFAULT_TFLOPS,
    bandwidth: int | str = DEFAULT_BANDWIDTH,
    selected: int | None = None,
    device_memory: int | str | None = None,
    **setup,
) -> StepTime:
    """Predicted step time at a stated achieved throughput (TFLOP/s) and host link bandwidth (bytes/s, e.g.
    "20GB"); `selected`: chunks pass 2 revisits (default all: SeCO). See engine/plan/timing.py."""
    budget = None if device_memory is None else parse_bytes(device_memory)
    o = Setup(**_setup(setup))
    return step_time(ModelShape.from_config(model_config), o, seq_len, tflops=tflops,
                     bandwidth=parse_bytes(bandwidth), selected=selected, device_budget=budget)  # fmt: skip


def choose_chunk_size(
    model_config,
    *,
    seq_len: int,
    device_memory: int | str,
    prefer: str = "largest",
    candidates: tuple[int, ...] = tuple(128 << i for i in range(8)),
    tflops: float = DEFAULT_TFLOPS,
    bandwidth: int | str = DEFAULT_BANDWIDTH,
    **setup,
) -> int:
    """chunking.chunk_size: auto. Of `candidates` (up to seq_len), the largest chunk whose step fits in
    `device_memory` (usable bytes), or (prefer="fastest") the one with the least predicted step time among
    those that fit (the largest of those within 1% of it). 0 when none fits."""
    if prefer not in ("largest", "fastest"):
        raise ValueError(f"prefer must be 'largest' or 'fastest', got {prefer!r}")
    budget = parse_bytes(device_memory)
    fit = []
    for c in sorted(x for x in candidates if x <= seq_len) or [seq_len]:
        kw = {**setup, "chunk_size": c}
        if plan(model_config, seq_len=seq_len, device_memory=budget, **kw).total <= budget:
            t = predict_time(model_config, seq_len=seq_len, tflops=tflops, bandwidth=bandwidth,
                             device_memory=budget, **kw).seconds  # fmt: skip
            fit.append((t, c))
    if not fit:
        return 0
    if prefer == "largest":
        return max(c for _, c in fit)
    # The time model has no per-chunk efficiency term (small matmuls run below the stated throughput on a
    # GPU): predicted times within 1% are a tie, which the larger chunk wins.
    best = min(t for t, _ in fit)
    return max(c for t, c in fit if t <= 1.01 * best)


def _setup(kw: dict) -> dict:
    if "lora_targets" in kw:
        kw = {**kw, "lora_targets": tuple(kw["lora_targets"])}
    return kw


def main(argv: list[str] | None = None) -> int:
    from engine.plan.cli import main as cli_main  # the run-config front end imports the config loader

    return cli_main(argv)
