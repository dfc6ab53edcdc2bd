"""TensorBoard: every run in a logging.dir writes its own subdirectory; a resumed run continues the latest."""

from __future__ import annotations

from pathlib import Path

from tiny import event_accumulator

from engine.config import LoggingConfig
from engine.metrics import TENSORBOARD_DIR, Metrics


def values(step: int, loss: float) -> dict:
    return {
        "total_steps": 4,
        "loss": loss,
        "lr": 1e-3,
        "grad_norm": 1.0,
        "tokens_per_s": 10.0,
        "step_time_s": 0.1,
        "peak_memory_bytes": 1,
        "num_chunks": 2,
        "chunks_backpropagated": 2,
        "compensation": 1.0,
        "skipped": False,
    }


def run(log_dir: Path, start: int, losses: list[float]) -> None:
    m = Metrics(LoggingConfig(dir=str(log_dir), progress_bar=False), 4, start, enabled=True)
    for i, loss in enumerate(losses, start=start + 1):
        m.log(i, values(i, loss))
    m.close()


def curves(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    out = {}
    for d in sorted((log_dir / TENSORBOARD_DIR).iterdir()):
        acc = event_accumulator()(str(d))
        acc.Reload()
        out[d.name] = [(e.step, round(e.value, 6)) for e in acc.Scalars("train/loss")]
    return out


def test_each_run_its_own_subdirectory_and_a_resume_continues_the_latest(tmp_path):
    run(tmp_path, 0, [4.0, 3.0])
    run(tmp_path, 0, [5.0, 4.5, 4.2])  # a new run in the same logging.dir
    first, second = curves(tmp_path).values()
    assert first == [(1, 4.0), (2, 3.0)] and second == [(1, 5.0), (2, 4.5), (3, 4.2)]
    assert not list(tmp_path.glob("events.out.tfevents.*"))  # nothing at the top level to overlay
    run(tmp_path, 2, [4.4, 4.1])  # resumed at step 2: continues the second run, step 3 rewritten
    assert len(curves(tmp_path)) == 2
    assert list(curves(tmp_path).values())[1] == [(1, 5.0), (2, 4.5), (3, 4.4), (4, 4.1)]


def test_a_link_under_a_fresh_runs_name_is_never_written_into(tmp_path, monkeypatch):
    """A symbolic link planted at the name a fresh run's TensorBoard directory would take (the UTC second it
    starts) is passed over: the run gets the next free name, a real directory, and nothing lands outside."""
    import engine.metrics as metrics

    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "log" / TENSORBOARD_DIR
    root.mkdir(parents=True)
    (root / "run-20260101-000000").symlink_to(outside)
    monkeypatch.setattr(metrics.time, "strftime", lambda fmt, t=None: "run-20260101-000000")
    got = metrics.tensorboard_run_dir(tmp_path / "log", resumed=False)
    assert got == root / "run-20260101-000000-001"
    (root / "run-20260101-000000").unlink()  # control: without the link, the name is free
    assert metrics.tensorboard_run_dir(tmp_path / "log", resumed=False) == root / "run-20260101-000000"
    assert list(outside.iterdir()) == []
