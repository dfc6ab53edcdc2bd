"""The training loop: setup -> run_loop -> close (launch/train.py calls the three).

    prepare   (no process group, nothing written) tokenizer, dataset + vocabulary check, resume target,
              ds_config for the world size the launcher announced: a user error costs seconds, not a hang
    setup     process group, model (partitioned at load under ZeRO-3) + LoRA, deepspeed.initialize,
              resume, this rank's data stream, metrics
    run       per step: LR from the schedule -> the step's micro-batches and their global token count ->
              chunk-wise backward of each through the engine (one gradient reduction for all of them,
              engine/accumulation.py) -> step (or skip it when the loss is non-finite) -> metrics ->
              checkpoint / preemption
    close     flush metrics, release the process group

Everything DeepSpeed / torch.distributed (joining the group, the ds_config, deepspeed.initialize, the
optimizer step or its skip) is engine/distributed's; this module keeps the loop, preemption and metrics.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import math
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from engine import checkpoint, distributed, retention, run_dirs, run_guard, throughput
from engine.accumulation import StepTokens, count_step_tokens, step_context
from engine.chunk_auto import resolve_chunk_size
from engine.chunkwise import ChunkOptions, ChunkSchedule, ChunkStats, chunkwise_backward
from engine.config import Config, OptimConfig
from engine.config_load import config_to_dict
from engine.data import DataStream, load_tokenizer
from engine.data.chat_render import use_template
from engine.data.host_cache import build_dataset_once_per_host
from engine.data.summary import summary as data_summary
from engine.evaluate import format_eval, prepare_eval
from engine.export import export
from engine.host_memory import check_host_memory
from engine.metrics import Metrics, peak_memory_bytes
from engine.model import apply_lora, build_model, check_weights, model_config, model_vocab_size
from engine.schedule import spaco_generator
from engine.sequence_parallel import check_model as check_sequence_model
from engine.sequence_parallel import sequence_mpu
from engine.unwrap import text_config

PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # Slurm: scancel / requeue, and --signal=USR1@secs


class TrainingDiverged(RuntimeError):
    """optim.max_nonfinite_steps steps in a row had a non-finite loss or gradient."""


@dataclass(frozen=True)
class Faults:
    """Faults a test injects through run_loop's parameter (tests/workers/faulty_train.py); never read from
    the environment. The default injects nothing."""

    nan_steps: frozenset[int] = frozenset()  # logits * NaN: loss and every gradient non-finite (a divergence)
    crash_in_save: int | None = None  # this step's save raises once its files are written, before the commit
    write: checkpoint.Writer | None = None  # replaces the checkpoint file writer (e.g. one raising ENOSPC)
    log_full_from: int | None = None  # from this step on, writing metrics fails with ENOSPC (a full disk)
    no_loss_steps: frozenset[int] = frozenset()  # every label of these steps' batches ignored (-100)


@dataclass
class Prepared:
    """What can be checked and built before any process group exists."""

    tokenizer: Any
    dataset: Any
    resume: tuple[str, str] | None  # (checkpoint dir, tag)
    ds_config: dict
    world_size: int
    claim: run_dirs.Claim | None = None  # the output directories' locks (rank 0), released by close()
    evaluator: Any = None  # engine/evaluate.py's Evaluator when the eval section asks for anything
    grad_accum_steps: int = 1  # micro-batches per optimizer step on each rank
    micro_batches_per_epoch: int = 1  # per data-parallel rank
    total_steps: int = 1  # optim.steps, or from optim.epochs
    weights_only: bool = False  # checkpoint.resume_weights_only: start from `resume`'s weights at step 0
    resume_optimizer: bool = True  # with weights_only: the world size matches, so its optimizer states too


@dataclass
class Run:
    cfg: Config
    engine: Any  # deepspeed.DeepSpeedEngine
    stream: DataStream
    metrics: Metrics
    tokenizer: Any
    step: int  # steps done (the next one is step + 1)
    grad_accum_steps: int = 1
    total_steps: int = 1
    flops: throughput.FlopModel | None = None
    peak_tflops: float | None = None  # one device's, for MFU (None: no MFU)
    eta: throughput.Eta | None = None
    nonfinite_streak: int = 0
    saved_step: int | None = None
    zero3_ctx: Any = None  # transformers only weakly references it: must live as long as the engine
    signals: dict = field(default_factory=dict)  # previous handlers, restored by close()
    claim: run_dirs.Claim | None = None  # the output directories' locks (rank 0), released by close()
    watch: run_guard.LauncherWatch | None = None  # the launcher chain (engine/run_guard.py)
    stopping: bool = False  # a preemption stops this run (set by run_loop; close() keeps the handlers)
    no_loss_steps: list[int] = field(default_factory=list)  # this process's steps without a loss token
    evaluator: Any = None  # engine/evaluate.py's Evaluator, or None


# ------------------------------------------------------------------------------------------------ setup


def prepare(cfg: Config) -> Prepared:
    claim = run_dirs.claim(cfg, distributed.announced_rank())  # first: a second run on the dirs ends here
    try:
        return _prepare(cfg, claim)
    except BaseException:
        claim.abandon()
        raise


def _prepare(cfg: Config, claim: run_dirs.Claim) -> Prepared:
    world_size = distributed.announced_world_size()
    check_host_memory(cfg, world_size, torch.cuda.is_available())  # sizes that cannot fit: before anything
    check_weights(cfg.model)
    tokenizer = load_tokenizer(cfg.data.tokenizer, cfg.model.trust_remote_code)
    use_template(tokenizer, cfg.data.chat_template)  # the export's tokenizer renders as training did
    # checks ids < vocab_size; tokenized by one rank per host, loaded by the others
    dataset = build_dataset_once_per_host(
        cfg.data, tokenizer, model_vocab_size(cfg.model), cfg.model.trust_remote_code
    )
    dataset, evaluator = prepare_eval(cfg, tokenizer, dataset, model_vocab_size(cfg.model))  # eval section
    check_sequence_parallel(cfg, world_size)
    resume, weights_only = _resume_target(cfg)
    same_world = True
    if resume is not None:  # every file safe to load, same ranks: on every rank, before any collective
        same_world = checkpoint.verify(*resume, world_size, weights_only) == world_size
    # DeepSpeed's batch arithmetic counts data-parallel ranks: the P ranks of a sequence group share a batch
    data_parallel = world_size // cfg.parallel.sequence
    ds_config = distributed.run_ds_config(cfg, data_parallel)
    accum = distributed.grad_accum_steps(cfg)
    # Rank 0's stream has every rank's epoch length; it raises here when an epoch has no batch.
    per_epoch = DataStream(
        dataset, cfg.data.batch_size, 0, data_parallel, seed=cfg.data.seed
    ).batches_per_epoch
    return Prepared(
        tokenizer=tokenizer,
        dataset=dataset,
        resume=resume,
        weights_only=weights_only,
        resume_optimizer=same_world,
        ds_config=ds_config,
        world_size=world_size,
        claim=claim,
        evaluator=evaluator,
        grad_accum_steps=accum,
        micro_batches_per_epoch=per_epoch,
        total_steps=cfg.optim.total_steps(per_epoch, accum),
    )


def _resume_target(cfg: Config) -> tuple[tuple[str, str] | None, bool]:
    """(checkpoint to load, whether only its weights (and optimizer) start this run). With
    checkpoint.resume_weights_only, checkpoint.dir's own checkpoints win once there are any: a requeued job
    continues itself exactly instead of starting again from the other run's weights."""
    if cfg.checkpoint.resume_weights_only:
        own = checkpoint.find_resume(
            dataclasses.replace(cfg.checkpoint, resume="auto", resume_weights_only=False)
        )
        if own is not None:
            return own, False
        return checkpoint.find_resume(cfg.checkpoint), True
    return checkpoint.find_resume(cfg.checkpoint), False


def check_sequence_parallel(cfg: Config, world_size: int) -> None:
    """parallel.sequence against the world and the model, before any process group exists."""
    p = cfg.parallel.sequence
    if p == 1:
        return
    if world_size % p:
        raise ValueError(f"parallel.sequence: {p} must divide the world size ({world_size} ranks)")
    attn = cfg.model.attn_implementation
    if attn not in ("sdpa", "eager"):
        raise ValueError(
            f"parallel.sequence: {p} runs its own attention; model.attn_implementation must be sdpa"
        )
    hf = model_config(cfg.model)
    check_sequence_model(text_config(hf), p)


def _batching(cfg: Config) -> dict[str, Any]:
    """DataStream's padding and grouping: a batch shorter than seq_len still holds chunking.budget chunks."""
    budget = cfg.chunking.budget
    return {
        "pad_to_longest": cfg.data.pad_to == "longest",
        "min_length": 0 if budget is None else budget * cfg.chunking.chunk_size,
        "group_by_length": cfg.data.group_by_length,
    }


def setup(cfg: Config) -> Run:
    cfg, chunk_line = resolve_chunk_size(cfg, distributed.announced_world_size())  # chunk_size: auto
    rdzv = distributed.join_rendezvous()  # before preparing: a taken MASTER_PORT ends the start here
    prep = rdzv.agreed(lambda: prepare(cfg), undo=lambda p: p.claim.abandon())  # one fails: all end
    joins = not dist.is_initialized()  # else the caller built the group and keeps it
    distributed.init_distributed(rdzv)
    try:
        return _start(cfg, prep, chunk_line)
    except BaseException:  # an in-process caller (tests, a notebook) gets the group and environment back
        if joins:
            distributed.shutdown()
        prep.claim.release()
        raise


def _start(cfg: Config, prep: Prepared, chunk_line: str) -> Run:
    rank, world = dist.get_rank(), dist.get_world_size()
    if world != prep.world_size:
        raise ValueError(f"the launcher announced {prep.world_size} ranks but {world} joined")

    # Order matters: partitioning context -> weights -> adapters -> engine (which copies the trainable
    # weights into its optimizer's fp32 partitions, so nothing may change them after this point).
    zero3_ctx = distributed.zero3_context(prep.ds_config)
    model = build_model(cfg.model, seed=cfg.optim.seed)
    model = apply_lora(model, cfg.lora)
    p = cfg.parallel.sequence
    engine = distributed.initialize(model, prep.ds_config, mpu=sequence_mpu(p))

    # The P ranks of a sequence group read the same rows (data-parallel rank = rank // P).
    stream = DataStream(
        prep.dataset, cfg.data.batch_size, rank // p, world // p, seed=cfg.data.seed, **_batching(cfg)
    )
    step, streak, saved_config = 0, 0, None
    if prep.resume is not None:
        state = checkpoint.load(engine, *prep.resume, prep.weights_only, prep.resume_optimizer)
        if not prep.weights_only:  # weights-only: step 0 and a fresh data stream
            stream.load_state_dict(state["data"])
            step, streak = int(state["step"]), int(state.get("nonfinite_streak", 0))
            saved_config = state["config"]
    metrics = Metrics(
        cfg.logging, prep.total_steps, start_step=step, enabled=rank == 0, run_config=config_to_dict(cfg)
    )
    _announce(metrics, cfg, prep, engine.module, chunk_line, step, saved_config)
    # From here a signal means "save and stop"; before, it simply ends the process (nothing to save yet).
    _PREEMPT.clear()
    previous = {s: signal.signal(s, _request_stop) for s in PREEMPT_SIGNALS}
    previous[signal.SIGINT] = signal.signal(signal.SIGINT, run_guard.interrupt_handler(_PREEMPT, rank == 0))
    watch = run_guard.LauncherWatch(_launcher_lost)  # a rank whose launcher is gone saves and stops
    return Run(
        cfg=cfg,
        engine=engine,
        stream=stream,
        metrics=metrics,
        tokenizer=prep.tokenizer,
        step=step,
        grad_accum_steps=prep.grad_accum_steps,
        total_steps=prep.total_steps,
        flops=throughput.FlopModel(engine.module),
        peak_tflops=throughput.peak_tflops(cfg.logging.peak_tflops),
        eta=throughput.Eta(prep.total_steps, step),
        nonfinite_streak=streak,
        saved_step=step or None,
        zero3_ctx=zero3_ctx,
        signals=previous,
        claim=prep.claim,
        evaluator=prep.evaluator,
        watch=watch,
    )


def _announce(
    metrics: Metrics,
    cfg: Config,
    prep: Prepared,
    module,
    chunk_line: str,
    step: int,
    saved_config: dict | None,
) -> None:
    """The start-up lines: the chosen chunk size, the data, the model and what the run starts from."""
    if chunk_line:
        metrics.print(chunk_line)
    for line in data_summary(prep.dataset):  # what was split, truncated or dropped: never silently
        metrics.print(f"data: {line}")
    _print_summary(metrics, cfg, prep, module)
    if prep.weights_only:
        what = (
            "weights and optimizer states"
            if prep.resume_optimizer
            else "weights (another world size: fresh optimizer)"
        )
        metrics.print(f"started from the {what} of {os.path.join(*prep.resume)}; step 0, a fresh data stream")
    elif prep.resume is not None:
        metrics.print(f"resumed from {os.path.join(*prep.resume)} at step {step}")
        _warn_config_changes(metrics, saved_config, config_to_dict(cfg))


def _print_summary(metrics: Metrics, cfg: Config, prep: Prepared, module) -> None:
    trainable, total = throughput.parameter_counts(module)
    lines = throughput.summary_lines(
        trainable=trainable,
        total=total,
        rows=len(prep.dataset),
        tokens=throughput.dataset_tokens(prep.dataset),
        world=prep.world_size // cfg.parallel.sequence,
        micro=cfg.data.batch_size,
        accum=prep.grad_accum_steps,
        seq_len=cfg.data.seq_len,
        chunk_size=cfg.chunking.chunk_size,
        micro_batches_per_epoch=prep.micro_batches_per_epoch,
        total_steps=prep.total_steps,
    )
    for line in lines:
        metrics.print(line)


def _warn_config_changes(metrics: Metrics, saved: dict, now: dict, prefix: str = "") -> None:
    for key in sorted(set(saved) | set(now)):
        a, b = saved.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict) and key != "hf_config":
            _warn_config_changes(metrics, a, b, f"{prefix}{key}.")
        elif a != b and f"{prefix}{key}" != "checkpoint.resume":
            metrics.print(f"warning: {prefix}{key} changed since the checkpoint: {a!r} -> {b!r}")


# ------------------------------------------------------------------------------------------------- loop


def run_loop(run: Run, faults: Faults = Faults()) -> dict[str, Any]:
    cfg = run.cfg
    first_step, losses, preempted = run.step, [], False
    if faults.log_full_from is not None:
        run.metrics.write_line = _full_disk_from(faults.log_full_from, run.metrics.write_line)
    while run.step < run.total_steps:
        run.step += 1
        record = train_step(
            run, poison=run.step in faults.nan_steps, no_loss=run.step in faults.no_loss_steps
        )
        evaluate_step(run, record)
        run.metrics.log(run.step, record)
        losses.append(record["loss"])
        _count_no_loss(run, record)
        _count_nonfinite(run, record)
        # Every rank takes part, so a signal that reached only some ranks still stops all of them together.
        preempted = distributed.any_rank(bool(_PREEMPT))
        every = cfg.checkpoint.every
        if cfg.checkpoint.dir and (preempted or (every and run.step % every == 0)):
            save(run, faults)
        if preempted:
            run.stopping = True
            break
    if cfg.checkpoint.dir and run.saved_step != run.step:
        save(run, faults)
    if run.no_loss_steps:
        run.metrics.print(
            f"{len(run.no_loss_steps)} batch(es) of this run held no loss token (zero gradient), the first at "
            f"step {run.no_loss_steps[0]}"
        )
    export_dir = None
    if preempted:
        signame = _PREEMPT.get("reason") or (
            signal.Signals(_PREEMPT["signum"]).name if _PREEMPT else "a signal to another rank"
        )
        where = cfg.checkpoint.dir or "nowhere (no checkpoint.dir)"
        run.metrics.print(
            f"preempted by {signame}: checkpoint of step {run.step} saved in {where}; exiting "
            "(checkpoint.resume=auto continues from it)"
        )
    elif cfg.checkpoint.dir:
        export_dir = export(run.engine, cfg.checkpoint, checkpoint.tag_for(run.step), run.tokenizer)
    return {
        "first_step": first_step,
        "last_step": run.step,
        "losses": losses,
        "preempted": preempted,
        "checkpoint": checkpoint.tag_for(run.step) if run.saved_step == run.step else None,
        "export": export_dir,
    }


def train_step(run: Run, poison: bool = False, no_loss: bool = False) -> dict[str, Any]:
    """One optimizer step (LR, the step's micro-batches, chunk-wise backward of each, update or skip); returns
    its metrics record."""
    engine, t0 = run.engine, time.perf_counter()
    lr = lr_at(run.step, run.cfg.optim, run.total_steps)
    for group in engine.optimizer.param_groups:
        group["lr"] = lr
    micro = [
        {k: v.to(engine.device) for k, v in next(run.stream).items()} for _ in range(run.grad_accum_steps)
    ]
    if no_loss:  # Faults.no_loss_steps
        for batch in micro:
            batch["labels"] = torch.full_like(batch["labels"], -100)
    # before the first backward: every loss is divided by it (the P ranks of a sequence group share their rows)
    tokens = count_step_tokens(engine, micro, copies=run.cfg.parallel.sequence)
    with _poisoned_logits(engine.module) if poison else contextlib.nullcontext(), step_context(engine):
        stats = [_micro_backward(run, batch, i, tokens.loss_tokens) for i, batch in enumerate(micro)]
    # No loss token in the whole step (every rank): the mean loss is 0 / 0, the gradient exactly zero. The
    # step goes on with that zero gradient and reports loss 0 rather than NaN (which would read as divergence).
    loss = 0.0 if tokens.loss_tokens == 0 else sum(s.loss for s in stats)  # micro-batches' shares of the mean
    applied = distributed.optimizer_step(engine, loss, tokens.loss_tokens)
    return _step_record(run, stats, tokens, loss, lr, applied, time.perf_counter() - t0)


def _micro_backward(run: Run, batch: dict[str, torch.Tensor], micro: int, loss_tokens: int) -> ChunkStats:
    chunking = run.cfg.chunking
    return chunkwise_backward(
        run.engine,
        batch["input_ids"],
        labels=batch["labels"],
        attention_mask=batch["attention_mask"],
        position_ids=batch.get("position_ids"),  # packed rows with document boundaries (data.packing)
        schedule=ChunkSchedule.from_config(chunking),
        options=ChunkOptions.from_config(chunking),
        generator=spaco_generator(run.cfg.optim.seed, run.step, micro),
        num_items_in_batch=loss_tokens,
        last_micro_batch=micro == run.grad_accum_steps - 1,
    )


def _step_record(
    run: Run,
    stats: list[ChunkStats],
    tokens: StepTokens,
    loss: float,
    lr: float,
    applied: bool,
    elapsed: float,
) -> dict[str, Any]:
    world = dist.get_world_size()
    grad_norm = run.engine.get_global_grad_norm() if applied else None
    padded = sum(s.seq_len for s in stats) * run.cfg.data.batch_size * world // run.cfg.parallel.sequence
    flops = run.flops.step_flops(tokens.real_tokens, tokens.attention_pairs)
    aux = [s.aux_loss for s in stats if s.aux_loss is not None]
    return {
        "total_steps": run.total_steps,
        "loss": loss,
        "loss_tokens": tokens.loss_tokens,
        "lr": lr,
        "grad_norm": None if grad_norm is None else float(grad_norm),
        "tokens_per_s": tokens.real_tokens / elapsed,  # non-padding tokens of all data-parallel ranks
        "tokens_per_s_padded": padded / elapsed,  # what the ranks computed on, padding included
        "mfu": throughput.mfu(flops, elapsed, run.peak_tflops, world),
        "eta_s": run.eta.seconds_left(run.step),
        "step_time_s": elapsed,
        "peak_memory_bytes": peak_memory_bytes(),
        "kv_bytes": max(
            s.kv_bytes for s in stats
        ),  # this rank's K/V + K/V gradients (1/P with parallel.sequence)
        "num_chunks": sum(s.num_chunks for s in stats),  # over the step's micro-batches
        "chunks_backpropagated": sum(len(s.selected) for s in stats),
        "compensation": max(s.compensation for s in stats),
        "aux_loss": sum(aux) / len(aux) if aux else None,  # MoE router load-balancing loss (engine/moe.py)
        "skipped": not applied,
    }


def _count_no_loss(run: Run, record: dict[str, Any]) -> None:
    """A step without loss tokens is not an error (e.g. SFT rows whose answers all fell to truncation);
    said once when it first happens, counted at the end of the run."""
    if record["loss_tokens"]:
        return
    run.no_loss_steps.append(run.step)
    if len(run.no_loss_steps) == 1:
        run.metrics.print(
            f"warning: step {run.step}: no rank's batch holds a loss token (every label -100): zero gradient, "
            "loss reported as 0; such steps are counted at the end of the run"
        )


def evaluate_step(run: Run, record: dict[str, Any]) -> None:
    """eval/* into this step's record when the eval section asks for it now (eval.every, the last step)."""
    if run.evaluator is None or not run.evaluator.due(run.step, record["total_steps"]):
        return
    record.update(run.evaluator(run.engine, run.step))
    run.metrics.print(format_eval(run.step, record))


def _count_nonfinite(run: Run, record: dict[str, Any]) -> None:
    limit = run.cfg.optim.max_nonfinite_steps
    if not record["skipped"]:
        run.nonfinite_streak = 0
        return
    run.nonfinite_streak += 1
    run.metrics.print(
        f"warning: step {run.step}: non-finite loss or gradients (loss {record['loss']}); update skipped "
        f"({run.nonfinite_streak} in a row, limit optim.max_nonfinite_steps={limit})"
    )
    if run.nonfinite_streak >= limit:
        raise TrainingDiverged(
            f"{run.nonfinite_streak} steps in a row (up to step {run.step}) had a non-finite loss or "
            f"gradients (optim.max_nonfinite_steps={limit}); lower optim.lr or check the data. "
            "Checkpoints already written are intact."
        )


def lr_at(step: int, optim: OptimConfig, total_steps: int | None = None) -> float:
    """LR of (1-based) optimizer step `step`: linear warmup to optim.lr, then constant / linear / cosine decay
    to optim.lr * optim.min_lr_ratio at the last step (`total_steps`, by default optim.steps)."""
    total = optim.steps if total_steps is None else total_steps
    if step <= optim.warmup_steps:
        return optim.lr * step / optim.warmup_steps
    # 0 on the first step after warmup, 1 on the last: the run starts at the peak and ends at the floor.
    progress = (step - optim.warmup_steps - 1) / max(1, total - optim.warmup_steps - 1)
    floor = optim.min_lr_ratio
    if optim.schedule == "cosine":
        return optim.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))
    if optim.schedule == "linear":
        return optim.lr * (1 - (1 - floor) * progress)
    return optim.lr


@contextlib.contextmanager
def _poisoned_logits(module):
    handle = module.get_output_embeddings().register_forward_hook(lambda m, i, out: out * float("nan"))
    try:
        yield
    finally:
        handle.remove()


# ---------------------------------------------------------------------------------------- checkpointing


def save(run: Run, faults: Faults = Faults()) -> None:
    state = {
        "step": run.step,
        "data": run.stream.state_dict(),
        "config": config_to_dict(run.cfg),
        "world_size": dist.get_world_size(),
        "nonfinite_streak": run.nonfinite_streak,
    }
    crash = _simulated_crash if faults.crash_in_save == run.step else None
    path = checkpoint.save(run.engine, run.cfg.checkpoint.dir, run.step, state, faults.write, crash)
    run.saved_step = run.step
    run.metrics.print(f"checkpoint saved: {path}")
    retain(run)


def retain(run: Run) -> None:
    """After a committed save, on rank 0: record the step's eval loss, apply checkpoint.keep_last / keep_best."""
    if dist.get_rank() != 0:
        return
    ckpt, tag = run.cfg.checkpoint, checkpoint.tag_for(run.step)
    if run.evaluator is not None and run.step in run.evaluator.losses:
        retention.record_score(ckpt.dir, tag, run.evaluator.losses[run.step])
    for removed in retention.prune(ckpt.dir, ckpt.keep_last, ckpt.keep_best, saved=tag):
        run.metrics.print(f"checkpoint removed (checkpoint.keep_last={ckpt.keep_last}): {removed}")


def _simulated_crash(step: int) -> None:
    raise RuntimeError(f"Faults(crash_in_save={step}): simulated crash in the middle of a checkpoint save")


def _full_disk_from(step: int, write):
    def full(line: str) -> None:
        if json.loads(line)["step"] >= step:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f"Faults(log_full_from={step})")
        write(line)

    return full


# ------------------------------------------------------------------------------------------- preemption

_PREEMPT: dict[str, Any] = {}  # set by the signal handlers / the launcher watch; read once per step


def _request_stop(signum, frame) -> None:
    # Only a flag: the step in flight finishes, then all ranks agree, save and leave together.
    _PREEMPT["signum"] = signum


def _launcher_lost(reason: str) -> None:
    _PREEMPT.update(signum=signal.SIGTERM, reason=f"the end of the job: {reason}")


def close(run: Run) -> None:
    if run.watch is not None:
        run.watch.stop()
    run.metrics.close()
    # A preempted process is on its way out with its checkpoint saved, and launchers repeat the signal:
    # DeepSpeed's inner launcher, once it has a TERM of its own, terminates the ranks one after the other,
    # each after the previous one exited. Restoring the default action here would let that late TERM kill
    # a rank between its save and its exit (exit 143 instead of 0), so the flag handler stays.
    if not (run.stopping or _PREEMPT):
        for sig, handler in run.signals.items():
            signal.signal(sig, handler)
    distributed.shutdown()
    if run.claim is not None:
        run.claim.release()
