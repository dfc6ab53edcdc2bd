"""Experiment trackers besides TensorBoard, through the libraries themselves (optional extras: pip install
seco-engine[wandb] / [mlflow]): rank 0 only (engine/metrics.py holds them), the run config logged once per run,
then the same scalars as TensorBoard at the same steps.

wandb: `wandb.init(project=logging.project, dir=logging.dir, config=...)`; its own settings (WANDB_MODE=offline,
WANDB_API_KEY, WANDB_ENTITY) apply. mlflow: an `MlflowClient` (no process-wide tracking URI is set) on
logging.mlflow_tracking_uri, or MLFLOW_TRACKING_URI, or a file store in logging.dir/mlruns (which mlflow 3
accepts only with MLFLOW_ALLOW_FILE_STORE=true); experiment logging.project, the config as flattened params.

A tracker that cannot start, or fails while the run goes on (network, quota), is dropped with one warning: it
must not end a run.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any, Protocol

from engine.config import LoggingConfig

EXTRAS = {"wandb": ("wandb", "wandb"), "mlflow": ("mlflow", "mlflow")}  # name -> (module, pip extra)


class Tracker(Protocol):
    name: str

    def log(self, step: int, scalars: dict[str, float]) -> None: ...

    def close(self) -> None: ...


def check_installed(log_cfg: LoggingConfig) -> None:
    """At config load: a tracker named in logging.report_to whose library is missing is a user error."""
    for name in log_cfg.trackers():
        if name in EXTRAS and importlib.util.find_spec(EXTRAS[name][0]) is None:
            raise ValueError(
                f"logging.report_to: {name!r} needs the {EXTRAS[name][0]} package, which is not installed "
                f"(pip install 'seco-engine[{EXTRAS[name][1]}]', or pip install {EXTRAS[name][0]})"
            )


def open_trackers(log_cfg: LoggingConfig, run_config: dict[str, Any], run_name: str) -> list[Tracker]:
    """The trackers of logging.report_to other than TensorBoard (which engine/metrics.py writes itself)."""
    out: list[Tracker] = []
    kinds = {"wandb": WandbTracker, "mlflow": MlflowTracker}
    for name in log_cfg.trackers():
        if name not in kinds:
            continue
        try:
            out.append(kinds[name](log_cfg, run_config, run_name))
        except Exception as e:  # a tracker's server, login or store refusing: the run goes on without it
            print(
                f"warning: logging.report_to {name} could not start ({type(e).__name__}: {e}); not used",
                flush=True,
            )
    return out


class WandbTracker:
    name = "wandb"

    def __init__(self, log_cfg: LoggingConfig, run_config: dict[str, Any], run_name: str):
        import wandb

        Path(log_cfg.dir).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=log_cfg.project, name=run_name, dir=log_cfg.dir, config=run_config, reinit="create_new"
        )

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


class MlflowTracker:
    name = "mlflow"

    def __init__(self, log_cfg: LoggingConfig, run_config: dict[str, Any], run_name: str):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = log_cfg.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if uri is None:
            uri = (Path(log_cfg.dir) / "mlruns").resolve().as_uri()
        self.client = MlflowClient(tracking_uri=uri)
        experiment = self.client.get_experiment_by_name(log_cfg.project)
        experiment_id = (
            experiment.experiment_id if experiment else self.client.create_experiment(log_cfg.project)
        )
        self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
        params = [Param(k, str(v)[:500]) for k, v in sorted(flatten(run_config).items())]
        for i in range(0, len(params), 100):  # mlflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[i : i + 100])

    def log(self, step: int, scalars: dict[str, float]) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in scalars.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}: the run config as mlflow params."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out
