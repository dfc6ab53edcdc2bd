"""What a run reports, from rank 0 only: TensorBoard scalars, a JSONL file, a PNG, a progress bar, log lines.

TensorBoard events go to logging.dir/tensorboard/run-<UTC start time>/, a subdirectory per run (a resumed run
continues the latest), so runs started in the same logging.dir show as separate curves.

logging.dir/metrics.jsonl gets one JSON object per step (every step, whatever logging.every says): the
record a script or test reads back. On resume, records past the resumed step (written by the interrupted
run after its last checkpoint) are dropped so the file holds one clean curve; TensorBoard does the same via
purge_step. When the run ends (also by preemption or divergence) logging.dir/metrics.png is drawn from
that file (engine/report.py; `python -m engine.report` redraws it or compares runs).

Writing under logging.dir never ends a run: a write that fails (a full disk, a quota) prints one warning and
the run goes on without metrics files (its checkpoints are written elsewhere or fail on their own). None of
the files named here is written through a symbolic link (engine/safe_paths.py).

The progress bar is drawn only when stderr is a terminal: under Slurm, mpirun or a redirected log its
carriage-return frames would pile up in the log file, where the log line every logging.every steps says
the same.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from engine import report
from engine.config import LoggingConfig
from engine.memory import peak_rss_bytes
from engine.run_lock import LOCK_FILE
from engine.safe_paths import entry, refuse_links
from engine.throughput import format_duration
from engine.trackers import open_trackers

TENSORBOARD_DIR = "tensorboard"  # logging.dir/tensorboard/run-<UTC start time>: one subdirectory per run
OWN_NAMES = (
    TENSORBOARD_DIR,
    "wandb",  # logging.report_to wandb: its run directories
    "mlruns",  # logging.report_to mlflow: the default file store
    report.METRICS_FILE,
    report.METRICS_FILE + ".tmp",
    report.PLOT_FILE,
    report.RETRIEVAL_FILE,
    LOCK_FILE,
)

SCALARS = (
    "loss",
    "lr",
    "grad_norm",
    "tokens_per_s",
    "tokens_per_s_padded",
    "mfu",
    "step_time_s",
    "peak_memory_bytes",
    "kv_bytes",
    "num_chunks",
    "chunks_backpropagated",
    "compensation",
    "aux_loss",
)


def peak_memory_bytes() -> int:
    """Peak GPU memory of this rank's tensors, or on CPU the process's peak resident set size."""
    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else peak_rss_bytes()


class Metrics:
    """Rank 0 writes; every other rank holds an inert instance so the loop has no rank checks."""

    def __init__(
        self,
        log_cfg: LoggingConfig,
        total_steps: int,
        start_step: int,
        enabled: bool,
        stream: Any = None,
        run_config: dict[str, Any] | None = None,
    ):
        """`stream`: where the progress bar would go (default sys.stderr); it is drawn only on a terminal.
        `run_config`: what the trackers of logging.report_to record once (config_to_dict of the run's)."""
        self.cfg, self.enabled = log_cfg, enabled
        self.writer = self.bar = self.jsonl = None
        self.trackers: list = []
        self.write_line = self._write_jsonl  # tests inject a failing writer here (trainer.Faults.log_write)
        if not enabled:
            return
        out = Path(log_cfg.dir)
        out.mkdir(parents=True, exist_ok=True)
        self.jsonl = _open_jsonl(entry(out, report.METRICS_FILE, "logging.dir"), keep_until=start_step)
        tb_dir = None
        if "tensorboard" in log_cfg.trackers():
            from torch.utils.tensorboard import SummaryWriter

            tb_dir = tensorboard_run_dir(out, resumed=start_step > 0)
            self.writer = SummaryWriter(str(tb_dir), purge_step=start_step + 1 if start_step else None)
        run_name = tb_dir.name if tb_dir is not None else time.strftime("run-%Y%m%d-%H%M%S", time.gmtime())
        self.trackers = open_trackers(log_cfg, run_config or {}, run_name)
        stream = sys.stderr if stream is None else stream
        if log_cfg.progress_bar and _is_terminal(stream):
            from tqdm import tqdm

            self.bar = tqdm(
                total=total_steps, initial=start_step, desc="train", dynamic_ncols=True, file=stream
            )

    def log(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **values}
        if self.jsonl is not None:
            self._guarded(self.write_line, json.dumps(record, allow_nan=True) + "\n")
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{values['loss']:.4f}", refresh=False)
            self.bar.update(1)
        evals = eval_scalars(values)
        if self.writer is not None:  # eval points whatever logging.every says: they are rare
            for key, value in evals.items():
                if self.writer is not None:  # None once a write failed (_give_up)
                    self._guarded(self.writer.add_scalar, key, value, step)
        if step % self.cfg.every:
            self._track(step, evals)
            return
        train = {f"train/{key}": values[key] for key in SCALARS if _finite(values.get(key))}
        if self.writer is not None:
            for key, value in train.items():
                if self.writer is not None:
                    self._guarded(self.writer.add_scalar, key, value, step)
        self._track(step, {**train, **evals})
        self.print(format_line(step, values))

    def _track(self, step: int, scalars: dict[str, float]) -> None:
        """The scalars TensorBoard got, to the other trackers; one that fails is dropped with a warning."""
        for tracker in list(self.trackers) if scalars else []:
            try:
                tracker.log(step, scalars)
            except Exception as e:  # a tracker's network or quota error must not end the run
                self.trackers.remove(tracker)
                self.print(
                    f"warning: logging.report_to {tracker.name} failed ({type(e).__name__}: {e}); dropped"
                )

    def _write_jsonl(self, line: str) -> None:
        self.jsonl.write(line)
        self.jsonl.flush()

    def _guarded(self, fn, *args) -> None:
        try:
            fn(*args)
        except OSError as e:
            self._give_up(e)

    def _give_up(self, e: OSError) -> None:
        """A failed write under logging.dir: warn once, stop writing files there, keep training."""
        self.print(
            f"warning: writing metrics under logging.dir {self.cfg.dir!r} failed ({e.strerror or e}): no "
            "more metrics files are written by this run; training and checkpoints go on"
        )
        for sink in (self.writer, self.jsonl):
            try:
                if sink is not None:
                    sink.close()
            except OSError:
                pass  # the same full disk: what was written stays, the rest is lost
        self.writer = self.jsonl = None

    def print(self, line: str) -> None:
        """A line for humans (rank 0 only), kept clear of the progress bar."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(line, file=sys.stdout)
        else:
            print(line, flush=True)

    def close(self) -> None:
        drawn = self.jsonl is not None  # once, and only on rank 0, and not after a failed write
        if self.bar is not None:
            self.bar.close()
        for sink in (self.writer, self.jsonl):
            if sink is not None:
                self._guarded(sink.close)
        for tracker in self.trackers:
            try:
                tracker.close()
            except Exception as e:  # as in _track: the run's outcome is not the tracker's
                self.print(
                    f"warning: logging.report_to {tracker.name}: closing failed ({type(e).__name__}: {e})"
                )
        self.writer = self.bar = self.jsonl = None
        self.trackers = []
        if drawn:
            self._draw()

    def _draw(self) -> None:
        # A plot is a convenience: failing to draw one must not turn a finished run into a failed one.
        try:
            path = report.draw([self.cfg.dir], entry(Path(self.cfg.dir), report.PLOT_FILE, "logging.dir"))
        except Exception as e:  # matplotlib's errors have no common base class
            print(f"warning: could not draw {report.PLOT_FILE}: {type(e).__name__}: {e}", flush=True)
            return
        print(f"plot of the run: {path}", flush=True)
        try:
            heatmap = report.draw_retrieval(
                self.cfg.dir, entry(Path(self.cfg.dir), report.RETRIEVAL_FILE, "logging.dir")
            )
        except Exception as e:
            print(f"warning: could not draw {report.RETRIEVAL_FILE}: {type(e).__name__}: {e}", flush=True)
            return
        if heatmap is not None:
            print(f"retrieval heatmap: {heatmap}", flush=True)


def eval_scalars(values: dict[str, Any]) -> dict[str, float]:
    """The TensorBoard scalars of a record's eval/* entries: loss, ppl, mean retrieval accuracy and one
    per retrieval cell (eval/retrieval/L<length>_d<depth>)."""
    out = {}
    for key in ("eval/loss", "eval/ppl", "eval/retrieval_acc"):
        value = values.get(key)
        if value is not None and math.isfinite(value):
            out[key] = value
    for cell in values.get("eval/retrieval") or []:
        out[f"eval/retrieval/L{cell['length']}_d{cell['depth']:g}"] = cell["accuracy"]
    return out


def tensorboard_run_dir(out: Path, resumed: bool) -> Path:
    """This run's TensorBoard directory: a new one for a fresh run (a run started again in the same
    logging.dir is its own curve, not overlaid on the old events), the latest one for a resumed run (which
    continues its curve; purge_step drops the points past the checkpoint)."""
    root = entry(out, TENSORBOARD_DIR, "logging.dir")
    runs = sorted(p for p in root.iterdir() if p.is_dir() and not p.is_symlink()) if root.is_dir() else []
    if resumed and runs:
        return runs[-1]
    name = time.strftime("run-%Y%m%d-%H%M%S", time.gmtime())
    taken = {p.name for p in root.iterdir()} if root.is_dir() else set()  # links included: never written into
    unique = (
        name
        if name not in taken
        else next(f"{name}-{i:03d}" for i in range(1, 1000) if f"{name}-{i:03d}" not in taken)
    )
    return root / unique


def _finite(value: Any) -> bool:
    return value is not None and math.isfinite(value)


def check_dir(log_dir: str) -> None:
    """Start-up check (every rank): no file this module writes in logging.dir is a symbolic link."""
    if Path(log_dir).is_dir():
        refuse_links(Path(log_dir), list(OWN_NAMES), "logging.dir")


def _is_terminal(stream: Any) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def format_line(step: int, v: dict[str, Any]) -> str:
    parts = [f"step {step}/{v['total_steps']}", f"loss {v['loss']:.4f}", f"lr {v['lr']:.2e}"]
    if v.get("grad_norm") is not None:
        parts.append(f"grad_norm {v['grad_norm']:.3f}")
    speed = f"{v['tokens_per_s']:.0f} tok/s"
    if v.get("tokens_per_s_padded") is not None:
        speed += f" ({v['tokens_per_s_padded']:.0f} with padding)"
    parts += [speed]
    if v.get("mfu") is not None:
        parts.append(f"MFU {100 * v['mfu']:.1f}%")
    parts += [
        f"{v['step_time_s']:.2f} s/step",
        f"chunks {v['chunks_backpropagated']}/{v['num_chunks']}",
        f"mem {v['peak_memory_bytes'] / 2**20:.0f} MiB",
    ]
    if v.get("eta_s") is not None:
        parts.append(f"ETA {format_duration(v['eta_s'])}")
    if v.get("skipped"):
        parts.append("SKIPPED (non-finite)")
    return " | ".join(parts)


def _open_jsonl(path: Path, keep_until: int):
    """Open for appending, first dropping records of steps after `keep_until` (0: start a new file; the
    records of an earlier run there, which had no checkpoint to continue from, are kept aside)."""
    if not keep_until and path.is_file() and path.stat().st_size:
        k = 1
        while (aside := path.with_name(f"{path.stem}.{k}{path.suffix}")).exists():
            k += 1
        os.replace(path, aside)
        print(
            f"warning: {path} held the records of an earlier run (and there is no checkpoint to resume): "
            f"moved to {aside.name}; this run starts a new {path.name}",
            file=sys.stderr,
            flush=True,
        )
    kept = []
    if keep_until and path.is_file():
        for line in path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= keep_until:
                    kept.append(line)
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by a crash
    tmp = entry(path.parent, path.name + ".tmp", "logging.dir")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)
    return open(path, "a")
