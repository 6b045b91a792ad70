"""MLflow: the store, runs (parent/child), the record of every run.

v0 interface (the lead's sketch; the tracking owner hardens it). ``job.py`` uses only
:class:`Tracker`; nothing else in the package imports mlflow for logging.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient

from convnets.errors import TrackingError

log = logging.getLogger(__name__)


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"model": {"layers": [{"filters": 8}]}}`` -> ``{"model.layers.0.filters": 8}``."""
    flat: dict[str, Any] = {}
    if isinstance(tree, Mapping):
        items = tree.items()
    elif isinstance(tree, list | tuple):
        items = enumerate(tree)
    else:
        return {prefix: tree}
    for key, value in items:
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping | list | tuple) and len(value) > 0:
            flat.update(flatten(value, name))
        else:
            flat[name] = value
    return flat


class Tracker:
    """One MLflow store: checked once, experiments created once, runs started explicitly."""

    def __init__(self, uri: str, *, http_timeout_s: float = 10.0):
        self.uri = uri
        self.http_timeout_s = http_timeout_s
        mlflow.set_tracking_uri(uri)
        self.client = MlflowClient(tracking_uri=uri)

    def check_store(self) -> None:
        """Fail fast with one line when the store cannot be reached or opened."""
        try:
            self.client.search_experiments(max_results=1)
        except Exception as err:  # noqa: BLE001 - any failure here means "unusable store"
            raise TrackingError(
                f"tracking.uri={self.uri}: the MLflow store cannot be used "
                f"({type(err).__name__}); check the URI or start the server"
            ) from err

    def experiment_id(self, name: str) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        return self.client.create_experiment(name)

    @contextlib.contextmanager
    def run(
        self,
        *,
        experiment_id: str,
        run_name: str | None = None,
        run_id: str | None = None,
        parent_run_id: str | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> Iterator[mlflow.ActiveRun]:
        """Start (or, with ``run_id``, reopen) a run; end it FINISHED, FAILED or KILLED."""
        all_tags = dict(tags or {})
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        active = mlflow.start_run(
            run_id=run_id,
            experiment_id=None if run_id else experiment_id,
            run_name=None if run_id else run_name,
            tags=all_tags,
        )
        try:
            yield active
        except KeyboardInterrupt:
            mlflow.set_tag("failure_reason", "interrupted (Ctrl-C)")
            mlflow.end_run(status="KILLED")
            raise
        except BaseException as err:
            mlflow.set_tag("failure_reason", f"{type(err).__name__}: {err}"[:5000])
            mlflow.end_run(status="FAILED")
            raise
        else:
            mlflow.end_run(status="FINISHED")

    def log_params(self, params: Mapping[str, Any]) -> None:
        mlflow.log_params({k: ("None" if v is None else v) for k, v in params.items()})

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)
