"""A picture of a run: loss, tokens/s and peak memory against step, read from its metrics.jsonl.

    python -m engine.report RUN_DIR                    # redraws RUN_DIR/metrics.png (+ retrieval.png)
    python -m engine.report RUN_A RUN_B --out ab.png   # several runs, one line each in every panel

eval/loss, where the run evaluated, is drawn on the loss panel; the last retrieval evaluation (eval.retrieval)
as a depth x length accuracy heatmap in RUN_DIR/retrieval.png. The trainer draws both itself when a run
ends (engine/metrics.py). The figure is built on a
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
RETRIEVAL_FILE = "retrieval.png"
EVAL_LOSS = "eval/loss"  # drawn on the loss panel, as points at the evaluated steps
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
            line = ax.plot(steps, values, label=name, marker="." if len(steps) < 50 else None)
            if key == "loss":
                _plot_eval_loss(ax, name, records, line[0].get_color())
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    if len(runs) > 1:
        axes[0].legend(fontsize="small")
    return fig


def _plot_eval_loss(ax, name: str, records: list[dict[str, Any]], color) -> None:
    evaluated = [r for r in records if EVAL_LOSS in r]
    if evaluated:
        steps, values = series(evaluated, EVAL_LOSS)
        ax.plot(steps, values, label=f"{name} {EVAL_LOSS}", color=color, linestyle="--", marker="o")
        ax.legend(fontsize="small")


def last_retrieval(records: list[dict[str, Any]]) -> tuple[int, list[dict[str, Any]]] | None:
    """(step, cells) of the last record with retrieval accuracies, or None."""
    for r in reversed(records):
        if r.get("eval/retrieval"):
            return int(r["step"]), r["eval/retrieval"]
    return None


def retrieval_figure(step: int, cells: list[dict[str, Any]]):
    """Accuracy heatmap: depth (rows, 0 at the top) x length (columns), each cell annotated."""
    from matplotlib.figure import Figure

    lengths = sorted({c["length"] for c in cells})
    depths = sorted({c["depth"] for c in cells})
    grid = [[math.nan] * len(lengths) for _ in depths]
    for c in cells:
        grid[depths.index(c["depth"])][lengths.index(c["length"])] = c["accuracy"]
    fig = Figure(figsize=(1.2 + 0.9 * len(lengths), 1.2 + 0.55 * len(depths)), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
    for i, row in enumerate(grid):
        for j, acc in enumerate(row):
            ax.text(j, i, "-" if math.isnan(acc) else f"{acc:.2f}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
    ax.set_xlabel("length (tokens)")
    ax.set_ylabel("depth")
    ax.set_title(f"retrieval accuracy, step {step}", fontsize=9)
    fig.colorbar(image, ax=ax)
    return fig


def draw_retrieval(run_dir: str | Path, out: str | Path | None = None) -> Path | None:
    """Write the heatmap of the run's last retrieval evaluation (default RUN_DIR/retrieval.png); None when
    the run has none."""
    found = last_retrieval(read_records(run_dir))
    if found is None:
        return None
    return save_figure(
        retrieval_figure(*found), Path(out) if out is not None else Path(run_dir) / RETRIEVAL_FILE
    )


def save_figure(fig, out: str | Path) -> Path:
    out = Path(out)
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)  # attaches itself to the figure: savefig then renders without pyplot
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out


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
        if len(args.run_dirs) == 1:  # and the retrieval heatmap beside it, when the run has one
            heatmap = draw_retrieval(args.run_dirs[0])
            if heatmap is not None:
                print(heatmap)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
