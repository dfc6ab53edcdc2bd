"""A picture of a run: loss, tokens/s and peak memory against step, read from its metrics.jsonl.

    python -m engine.report RUN_DIR                    # redraws RUN_DIR/metrics.png
    python -m engine.report RUN_A RUN_B --out ab.png   # several runs, one line each in every panel

The trainer draws RUN_DIR/metrics.png itself when a run ends (engine/metrics.py). The figure is built on a
bare matplotlib ``Figure`` with the Agg canvas rather than pyplot, so drawing selects no backend and leaves
no global figure state behind in the training process.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "metrics.png"
# (record key, axis label, scale applied to the value)
PANELS = (
    ("loss", "loss", 1.0),
    ("tokens_per_s", "tokens / s", 1.0),
    ("peak_memory_bytes", "peak memory (MiB)", 1.0 / 2**20),
)


def read_records(run_dir: str | Path) -> list[dict[str, Any]]:
    """The per-step records of `run_dir`/metrics.jsonl, in file order (a line cut short by a crash is
    skipped, as the trainer does on resume)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise ValueError(f"{run_dir}: no {METRICS_FILE} (is it a run's logging.dir?)")
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "step" in record:
            records.append(record)
    return records


def series(records: list[dict[str, Any]], key: str, scale: float = 1.0) -> tuple[list[int], list[float]]:
    """(steps, values) of `key`; a missing or non-finite value (a skipped step's NaN loss) becomes NaN,
    which matplotlib draws as a gap rather than a spike."""
    steps, values = [], []
    for r in records:
        v = r.get(key)
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        steps.append(int(r["step"]))
        values.append(v * scale if ok else math.nan)
    return steps, values


def figure(runs: dict[str, list[dict[str, Any]]]):
    """One row of panels (PANELS), one line per run (label -> records)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2 * len(PANELS), 3.4), layout="constrained")
    axes = fig.subplots(1, len(PANELS))
    for ax, (key, label, scale) in zip(axes, PANELS, strict=True):
        for name, records in runs.items():
            steps, values = series(records, key, scale)
            ax.plot(steps, values, label=name, marker="." if len(steps) < 50 else None)
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    if len(runs) > 1:
        axes[0].legend(fontsize="small")
    return fig


def draw(run_dirs: list[str | Path], out: str | Path) -> Path:
    """Write the PNG of `run_dirs` to `out`; runs are labelled by their directory."""
    runs = {_label(Path(d), run_dirs): read_records(d) for d in run_dirs}
    if len(runs) != len(run_dirs):
        raise ValueError(f"the same run directory was given twice: {[str(d) for d in run_dirs]}")
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = figure(runs)
    FigureCanvasAgg(fig)  # attaches itself to the figure: savefig then renders without pyplot
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out


def _label(run_dir: Path, all_dirs: list[str | Path]) -> str:
    # The directory name, or the whole path where two runs share a name (runs/a/log, runs/b/log).
    names = [Path(d).name for d in all_dirs]
    return run_dir.name if names.count(run_dir.name) == 1 else str(run_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.report", description=__doc__.split("\n")[0])
    parser.add_argument("run_dirs", nargs="+", help="logging.dir of each run (holding metrics.jsonl)")
    parser.add_argument(
        "--out", default=None, help=f"PNG to write (default: RUN_DIR/{PLOT_FILE} for one run, else required)"
    )
    args = parser.parse_args(argv)
    if args.out is None and len(args.run_dirs) > 1:
        parser.error("--out is required with several runs")
    out = args.out or Path(args.run_dirs[0]) / PLOT_FILE
    try:
        print(draw(args.run_dirs, out))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
