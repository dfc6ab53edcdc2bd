"""The run's PNG (written when a run ends, redrawn by `python -m engine.report`) and the TTY-only progress bar."""

import io
import json
import os
import subprocess
from pathlib import Path

import pytest
from one_rank import train_cmd

from engine import report
from engine.config import LoggingConfig
from engine.metrics import Metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def record(step: int, loss: float, tokens_per_s: float, peak_mib: float) -> dict:
    return {
        "step": step,
        "total_steps": 3,
        "loss": loss,
        "lr": 1e-3,
        "grad_norm": 1.0,
        "tokens_per_s": tokens_per_s,
        "step_time_s": 0.1,
        "peak_memory_bytes": int(peak_mib * 2**20),
        "num_chunks": 2,
        "chunks_backpropagated": 2,
        "compensation": 1.0,
        "skipped": False,
    }


def write_run(run_dir: Path, records: list[dict]) -> Path:
    run_dir.mkdir(parents=True)
    (run_dir / report.METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in records))
    return run_dir


def test_report_draws_two_runs_side_by_side(tmp_path):
    a = write_run(
        tmp_path / "seco", [record(1, 5.0, 100, 10), record(2, 4.0, 110, 12), record(3, 3.0, 120, 12)]
    )
    b = write_run(tmp_path / "spaco", [record(1, 5.5, 300, 8), record(2, float("nan"), 310, 8)])
    out = tmp_path / "both.png"
    assert report.main([str(a), str(b), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG_MAGIC

    fig = report.figure({"seco": report.read_records(a), "spaco": report.read_records(b)})
    axes = fig.get_axes()
    assert [ax.get_ylabel() for ax in axes] == ["loss", "tokens / s", "peak memory (MiB)"]
    for ax in axes:
        assert [line.get_label() for line in ax.get_lines()] == ["seco", "spaco"]
    loss_a, loss_b = (line.get_ydata() for line in axes[0].get_lines())
    assert list(loss_a) == [5.0, 4.0, 3.0]
    assert loss_b[0] == 5.5 and loss_b[1] != loss_b[1]  # a skipped step's NaN is a gap
    assert list(axes[2].get_lines()[0].get_ydata()) == [10, 12, 12]  # MiB
    assert list(axes[1].get_lines()[1].get_xdata()) == [1, 2]


def test_report_one_run_defaults_next_to_its_metrics(tmp_path):
    a = write_run(tmp_path / "run", [record(1, 5.0, 100, 10)])
    assert report.main([str(a)]) == 0
    assert (a / report.PLOT_FILE).read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(SystemExit):  # several runs need --out
        report.main([str(a), str(a)])
    assert report.main([str(tmp_path / "missing")]) == 2


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("stream_cls", [io.StringIO, FakeTerminal])
def test_progress_bar_only_on_a_terminal(tmp_path, capsys, stream_cls):
    stream = stream_cls()
    cfg = LoggingConfig(dir=str(tmp_path / "log"), tensorboard=False, progress_bar=True, every=1)
    metrics = Metrics(cfg, total_steps=3, start_step=0, enabled=True, stream=stream)
    assert (metrics.bar is not None) == (stream_cls is FakeTerminal)
    for step in (1, 2):
        metrics.log(step, record(step, 4.0, 100, 10))
    metrics.close()
    if stream_cls is FakeTerminal:
        assert "\r" in stream.getvalue() and "2/3" in stream.getvalue()
    else:
        assert stream.getvalue() == ""  # no carriage-return frames in a redirected log
    assert "step 2/3 | loss 4.0000" in capsys.readouterr().out  # the periodic line is there either way
    assert (tmp_path / "log" / report.PLOT_FILE).read_bytes()[:8] == PNG_MAGIC


def test_a_run_writes_its_png(tmp_path):
    log = tmp_path / "log"
    args = train_cmd(
        "--data.seq_len=64",
        "--chunking.chunk_size=32",
        "--optim.steps=2",
        "--optim.warmup_steps=0",
        "--logging.tensorboard=false",
        f"--logging.dir={log}",
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    png = log / report.PLOT_FILE
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert f"plot of the run: {png}" in r.stdout
    assert [rec["step"] for rec in report.read_records(log)] == [1, 2]
    assert "\r" not in r.stderr  # stderr is a pipe here: no progress-bar frames
