"""logging.report_to: wandb (offline) and mlflow (a local file store) get the scalars TensorBoard gets, at the
same steps, and the run config once. Skipped where the optional packages are not installed, unless
SECO_TRACKERS_REQUIRED=1 (CI's tracker step, which installs them), where a missing one fails."""

from __future__ import annotations

import importlib.util
import json
import os
import struct
from pathlib import Path

import pytest

from engine.config import ConfigError, LoggingConfig
from engine.config_load import load_config
from engine.metrics import TENSORBOARD_DIR, Metrics

RUN_CONFIG = {"optim": {"lr": 0.003, "betas": [0.9, 0.99]}, "data": {"kind": "synthetic"}}


def values(step: int) -> dict:
    out = {"total_steps": 4, "loss": 5.0 / step, "lr": 1e-3 * step, "grad_norm": 2.0, "tokens_per_s": 10.0,
           "step_time_s": 0.1, "peak_memory_bytes": 1, "num_chunks": 2, "chunks_backpropagated": 2,
           "compensation": 1.0, "aux_loss": None, "skipped": False}  # fmt: skip
    if step == 2:
        out["eval/loss"] = 4.5
    return out


def tensorboard(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tiny import event_accumulator

    EventAccumulator = event_accumulator()

    (run,) = (log_dir / TENSORBOARD_DIR).iterdir()
    acc = EventAccumulator(str(run))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def wandb_offline(log_dir: Path) -> tuple[dict[str, list[tuple[int, float]]], dict]:
    """History and config from the offline run file (a LevelDB-style log of protobuf records)."""
    from wandb.proto import wandb_internal_pb2

    (file,) = log_dir.glob("wandb/offline-run-*/run-*.wandb")
    data, pos, records, buf = file.read_bytes(), 7, [], b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            break
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            records.append(buf)
    history: dict[str, list[tuple[int, float]]] = {}
    config = {}
    for raw in records:
        pb = wandb_internal_pb2.Record()
        pb.ParseFromString(raw)
        if pb.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in pb.history.item}
            for key, value in items.items():
                if not key.startswith("_"):
                    history.setdefault(key, []).append((items["_step"], value))
        if pb.WhichOneof("record_type") == "run":
            config.update({i.key: json.loads(i.value_json) for i in pb.run.config.update})
    return history, config


def mlflow_store(log_dir: Path) -> tuple[dict[str, list[tuple[int, float]]], dict]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(log_dir / "mlruns").resolve().as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("seco-engine").experiment_id])
    history = {
        key: [
            (m.step, m.value)
            for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)
        ]
        for key in run.data.metrics
    }
    return history, run.data.params


def require(name: str) -> None:
    if importlib.util.find_spec(name) is None:
        if os.environ.get("SECO_TRACKERS_REQUIRED") == "1":
            pytest.fail(f"SECO_TRACKERS_REQUIRED=1 but {name} is not installed")
        pytest.skip(f"{name} is not installed (the [{name}] extra)")


def test_wandb_and_mlflow_get_the_tensorboard_scalars(tmp_path, monkeypatch):
    require("wandb")
    require("mlflow")
    monkeypatch.setenv("WANDB_MODE", "offline")  # wandb's own switch: nothing leaves the machine
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow's own switch for its file store
    cfg = LoggingConfig(dir=str(tmp_path), progress_bar=False, report_to=["tensorboard", "wandb", "mlflow"])
    m = Metrics(cfg, 4, 0, enabled=True, run_config=RUN_CONFIG)
    for step in range(1, 5):
        m.log(step, values(step))
    m.close()
    tb = tensorboard(tmp_path)
    assert set(tb) >= {"train/loss", "train/lr", "eval/loss"} and len(tb["train/loss"]) == 4
    wb, wb_config = wandb_offline(tmp_path)
    ml, ml_params = mlflow_store(tmp_path)
    for other in (wb, ml):
        assert set(other) == set(tb)
        for key, points in tb.items():
            assert [s for s, _ in other[key]] == [s for s, _ in points], key
            assert [v for _, v in other[key]] == pytest.approx([v for _, v in points], rel=1e-6), key
    assert wb_config["optim"] == RUN_CONFIG["optim"] and ml_params["optim.lr"] == "0.003"


def test_report_to_rules(tmp_path):
    assert LoggingConfig().trackers() == ["tensorboard"] and LoggingConfig(tensorboard=False).trackers() == []
    assert LoggingConfig(report_to=["mlflow"]).trackers() == ["mlflow"]
    with pytest.raises(ConfigError, match="logging.tensorboard: false and logging.report_to"):
        LoggingConfig(tensorboard=False, report_to=["wandb"])
    with pytest.raises(
        ConfigError, match=r"logging.report_to\[0\]: must be one of 'tensorboard', 'wandb', 'mlflow'"
    ):
        load_config(None, ["--logging.report_to=[comet]"])


@pytest.mark.parametrize("name", ["wandb", "mlflow"])
def test_a_tracker_not_installed_is_a_config_error(tmp_path, name):
    if importlib.util.find_spec(name) is not None:
        pytest.skip(f"{name} is installed")
    with pytest.raises(ValueError, match=rf"logging.report_to: '{name}' needs the {name} package"):
        load_config(None, [f"--logging.report_to=[{name}]", f"--logging.dir={tmp_path}/log"])
