"""`python -m engine.plan`: the planner on a run config, with the launcher's `--section.key=value` overrides.

    python -m engine.plan --config configs/llama3-8b-lora-24gb.yaml --preset llama3-8b --device-memory 24GiB
    python -m engine.plan --config configs/x.yaml --device-memory 80GiB --chunking.chunk_size=auto

The config is read by engine.config_load (the launcher's loader: its types, ZeRO rules and error messages);
paths need not exist here. The model's shape comes from model.hf_config, else model.name_or_path's
config.json, else --preset / --hf-config (for a recipe whose model is not on this machine). Everything else
the planner needs is a config key: model.dtype / attn_implementation, lora.*, data.seq_len / batch_size,
chunking.*, deepspeed.*. `--chunking.chunk_size=auto` (or `auto:fastest`) picks the largest chunk that fits at
data.seq_len (or the fastest predicted); --chunk-sizes prints a table per chunk size instead.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path

from engine.options import ChunkOptions
from engine.plan import (
    DEFAULT_BANDWIDTH,
    DEFAULT_TFLOPS,
    PRESETS,
    Breakdown,
    ModelShape,
    Setup,
    choose_chunk_size,
    load_model_config,
    longest_sequence,
    parse_bytes,
    plan,
    predict_time,
    usable_memory,
)  # fmt: skip


def _lora_targets(targets) -> tuple[str, ...]:
    """PEFT's all-linear: every linear layer of the decoder blocks the planner models."""
    from engine.plan.shape import LINEARS

    return LINEARS if targets == "all-linear" else tuple(targets)


def setup_from_config(cfg, device: str = "cuda", world_size: int = 1) -> dict:
    """The keywords of engine.plan.plan that a run config (engine.config.Config) sets."""
    return dict(
        chunk_size=cfg.chunking.chunk_size, dtype=cfg.model.dtype, batch=cfg.data.batch_size,
        zero_stage=cfg.deepspeed.zero_stage, world_size=world_size,
        offload_optimizer=cfg.deepspeed.offload_optimizer, offload_param=cfg.deepspeed.offload_param,
        lora_rank=cfg.lora.r if cfg.lora.enabled else 0, lora_targets=_lora_targets(cfg.lora.target_modules),
        attn=cfg.model.attn_implementation, device=device, sequence=cfg.parallel.sequence,
        **asdict(ChunkOptions.from_config(cfg.chunking)),
    )  # fmt: skip


def _model_fields(cfg, preset: str | None, hf_config: str | None) -> tuple[str, dict]:
    if preset or hf_config:
        return load_model_config(hf_config=preset or hf_config)
    if cfg.model.hf_config is not None:
        return "model.hf_config", dict(cfg.model.hf_config)
    if cfg.model.name_or_path and (Path(cfg.model.name_or_path) / "config.json").is_file():
        return load_model_config(model=cfg.model.name_or_path)
    raise ValueError(
        f"model.name_or_path {cfg.model.name_or_path!r} has no config.json here: give --preset "
        f"({', '.join(PRESETS)}) or --hf-config FILE for the model's shape"
    )


def _tokens(text: str) -> int:
    text = text.strip().upper()
    return int(float(text[:-1]) * 1024) if text.endswith("K") else int(text)


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def _secs(x: float) -> str:
    return f"{x:.1f}" if x < 100 else f"{x:.0f}"


def _fmt_len(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m engine.plan", allow_abbrev=False,
        description="Predict the peak device memory and step time of chunk-wise (SeCO/SpaCO) training of a run "
        "config, and the longest sequence that fits. Other arguments are the launcher's overrides "
        "(--section.key=value). Sizes are per rank; see engine/plan/memory.py for what is not modelled.",
    )  # fmt: skip
    p.add_argument("--config", help="run config YAML (default: the launcher's, configs/tiny-cpu.yaml)")
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--preset", choices=sorted(PRESETS), help="the model's shape, when it is not on this machine"
    )
    src.add_argument("--hf-config", help="the model's shape from a config JSON file or an inline JSON object")
    p.add_argument("--device-memory", help="accelerator memory, e.g. 24GiB, 80GB (omit: no longest sequence)")
    p.add_argument("--host-memory", help="host memory for offloaded state, e.g. 256GiB (default: unbounded)")
    p.add_argument("--reserve", default="1GiB", help="CUDA context, cuBLAS/NCCL workspaces (default 1GiB)")
    p.add_argument("--margin", type=float, default=0.10, help="fraction kept for allocator fragmentation")
    p.add_argument(
        "--world-size",
        type=int,
        default=1,
        help="all ranks: data x parallel.sequence (ZeRO partitions over them)",
    )
    p.add_argument("--chunk-sizes", help="one table per chunk size (default: chunking.chunk_size)")
    p.add_argument("--seq-lens", default="4K,8K,16K,32K", help="lengths to show (K = 1024); + data.seq_len")
    p.add_argument(
        "--device", default="cuda", choices=("cuda", "cpu"), help="cpu: the engine's CPU code paths"
    )
    p.add_argument(
        "--tflops", type=float, default=DEFAULT_TFLOPS, help="stated achieved TFLOP/s of the device"
    )
    p.add_argument("--bandwidth", default=DEFAULT_BANDWIDTH, help="stated host<->device bytes/s (e.g. 20GB)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a, overrides = build_parser().parse_known_args(argv)
    auto = None
    for item in list(overrides):  # chunking.chunk_size: auto is the planner's to resolve
        if item.startswith("--chunking.chunk_size=auto"):
            auto = item.partition(":")[2] or "largest"
            overrides.remove(item)
    try:
        from engine.config_load import load_config  # the launcher's loader: one vocabulary, one set of rules

        cfg = load_config(a.config, overrides, check_paths=False)
        if cfg.chunking.chunk_size == "auto" and auto is None:  # chunk_size: auto in the YAML itself
            auto = "largest"
        name, fields = _model_fields(cfg, a.preset, a.hf_config)
        shape = ModelShape.from_config(fields)
        kw = setup_from_config(cfg, a.device, a.world_size)
        budget = usable_memory(a.device_memory, a.reserve, a.margin) if a.device_memory else None
        host = parse_bytes(a.host_memory) if a.host_memory else None
        bandwidth = parse_bytes(a.bandwidth)
        lines = ["# python -m engine.plan " + " ".join(argv), ""]
        if auto is not None:
            if budget is None:
                raise ValueError("chunking.chunk_size: auto needs --device-memory")
            chosen = choose_chunk_size(shape, seq_len=cfg.data.seq_len, device_memory=budget, prefer=auto,
                                       tflops=a.tflops, bandwidth=bandwidth, **{**kw, "chunk_size": 1})  # fmt: skip
            if not chosen:
                raise ValueError(
                    f"chunking.chunk_size: auto: no chunk size fits data.seq_len {cfg.data.seq_len}"
                )
            lines.append(
                f"chunking.chunk_size: auto ({auto} that fits at data.seq_len {cfg.data.seq_len}) -> {chosen}"
            )
            kw["chunk_size"] = chosen
        chunks = [int(c) for c in a.chunk_sizes.split(",")] if a.chunk_sizes else [kw["chunk_size"]]
        lengths = sorted({*(_tokens(s) for s in a.seq_lens.split(",") if s.strip()), cfg.data.seq_len})
        first = plan(shape, seq_len=lengths[0], device_memory=budget, **{**kw, "chunk_size": chunks[0]})
    except ValueError as e:  # ConfigError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    lines += _describe(name, shape, kw, first, cfg)
    if budget is not None:
        lines.append(
            f"device     {a.device_memory} - reserve {a.reserve}, margin {a.margin:.0%} -> {_gib(budget)} GiB for the "
            "step's tensors" + (f"; host {a.host_memory}" if host else "")
        )
    lines.append(
        f"time       at a stated {a.tflops:g} TFLOP/s achieved and {bandwidth / 1e9:g} GB/s host<->device"
    )
    lines.append("all sizes in GiB, per rank; peak = the largest moment of the last chunk's backward")
    for chunk in chunks:
        lines += [
            "",
            *_chunk_table(shape, {**kw, "chunk_size": chunk}, lengths, budget, host, a.tflops, bandwidth),
        ]
    print("\n".join(lines))
    return 0


def _describe(name: str, shape: ModelShape, kw: dict, b0: Breakdown, cfg) -> list[str]:
    kinds = f"{shape.layers} layers"
    if shape.linear_layers:
        kinds += f" ({shape.linear_layers} linear-attention/SSM, {shape.state_bytes(2) / 2**20:.2f} MiB bf16/fp32 state each)"
    if shape.experts:
        kinds += f", {shape.experts} experts (top {shape.top_k}, {shape.base_params(active=True) / 1e9:.2f}B active)"
    attn = kw["attn"] + {"sdpa": " (the engine's mask-free attention, grouped K/V heads)",
                         "eager": " (K/V repeated per query head)"}.get(kw["attn"], "")  # fmt: skip
    if kw["lora_rank"]:
        what = f"LoRA r={kw['lora_rank']} on {','.join(kw['lora_targets'])} ({b0.trainable / 1e6:.2f}M trainable)"
    else:
        what = f"full fine-tuning ({b0.trainable / 1e9:.2f}B trainable)"
    off = [n for n, on in (("optimizer", kw["offload_optimizer"]), ("parameters", kw["offload_param"])) if on]
    zero = f"stage {kw['zero_stage']}, world size {kw['world_size']}" + (
        f", {' and '.join(off)} offloaded to host" if off else ""
    )
    p = kw.get("sequence", 1)
    if p > 1:
        zero += f"; parallel.sequence {p}: {kw['world_size'] // p} data-parallel group(s) of {p} ranks sharing a sequence"
    extras = [k for k in ("checkpoint_layers", "fused_loss") if kw[k]]
    extras += [f"offload_kv {kw['offload_kv']}"] if kw["offload_kv"] else []
    extras += [f"K/V grads in {Setup(**kw).kv_grad_dtype}"]
    from engine.distributed.ds_config import grad_accum_steps

    accum = grad_accum_steps(cfg)
    # Each micro-batch frees its K/V before the next, so memory is one micro-batch's whatever the accumulation.
    step = (
        [f"accum      {accum} micro-batches per optimizer step: memory as one micro-batch; an optimizer step "
         f"takes {accum} x the step time below"]
        if accum > 1 else []
    )  # fmt: skip
    return [
        f"model      {name}: hidden {shape.hidden}, {kinds}, {shape.heads} heads / {shape.kv_heads} KV heads "
        f"(head_dim {shape.head_dim}), MLP {shape.intermediate}, vocab {shape.vocab}; {b0.params / 1e9:.2f}B params",
        f"training   {what}; {kw['dtype']}, batch {kw['batch']}, attention {attn}; chunking.mode {cfg.chunking.mode}"
        + ("; " + ", ".join(extras) if extras else ""),
        f"ZeRO       {zero}",
        *step,
    ]


def _chunk_table(
    shape: ModelShape, kw: dict, lengths, budget, host, tflops: float, bandwidth: int
) -> list[str]:
    """One chunk size: the breakdown at the given lengths and at the longest that fits (if a budget)."""
    chunk = kw["chunk_size"]
    longest = None
    if budget is not None:
        longest = longest_sequence(shape, device_memory=budget, reserve=0, margin=0.0, host_memory=host, **kw)
    cols = [*lengths, longest] if longest else list(lengths)
    plans = [plan(shape, seq_len=n, device_memory=budget, **kw) for n in cols]
    times = [
        predict_time(shape, seq_len=n, tflops=tflops, bandwidth=bandwidth, device_memory=budget, **kw)
        for n in cols
    ]
    head = [_fmt_len(n) for n in cols]
    if longest:
        head[-1] += " (max)"

    def row(label: str, cells) -> str:
        return f"  {label:<20}" + "".join(f"{cell:>13}" for cell in cells)

    lines = [f"chunk {chunk:<16}" + "".join(f"{h:>13}" for h in head)]
    for comp in Breakdown.COMPONENTS:
        lines.append(row(comp, [_gib(getattr(b, comp)) for b in plans]))
        if comp == "activations":
            lines.append(row("  growing with L", [_gib(b.seq_activations) for b in plans]))
    lines.append(row("total", [_gib(b.total) for b in plans]))
    lines.append(row("peak phase", [b.peak_phase for b in plans]))
    lines.append(row("host (offloaded)", [_gib(b.host) for b in plans]))
    lines.append(row("step time (s)", [_secs(t.seconds) for t in times]))
    lines.append(row("  compute / copies", [f"{_secs(t.compute_s)}/{_secs(t.transfer_s)}" for t in times]))
    if budget is None:
        return lines
    fits = [b.total <= budget and (host is None or b.host <= host) for b in plans]
    lines.append(row("fits", ["yes" if f else "no" for f in fits]))
    if longest:
        lines.append(
            f"  longest sequence that fits: {longest} tokens ({longest // chunk} chunks of {chunk}), "
            f"predicted step {times[-1].seconds:.1f} s"
        )
    else:
        one = plan(shape, seq_len=chunk, device_memory=budget, **kw)
        lines.append(
            f"  does not fit: one chunk of {chunk} tokens alone needs {_gib(one.total)} GiB"
            + (f" (host {_gib(one.host)} GiB)" if host else "")
        )
    return lines
