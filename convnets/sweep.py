"""Sweeps: one MLflow parent run per Hydra multirun, every job nested under it.

:class:`MlflowSweepCallback` is registered in ``configs/train.yaml`` (``hydra.callbacks``),
so it runs for every ``python train.py -m ...`` whatever the sweeper (basic grid, Optuna)
or launcher (basic: jobs in this process; joblib: loky workers; submitit: other processes
or machines).

Why a callback and a file: the callback's ``on_multirun_start`` runs once, in the launching
process, before any job starts. It opens the store (for sqlite: creates the schema) and the
experiment there, which removes the races of several fresh processes doing both at once,
creates the parent run, and writes ``<hydra.sweep.dir>/mlflow_sweep.json``. Every job,
wherever it runs, reads that file through :func:`sweep_context` and starts its own run
with the sweep's ``experiment_id`` and ``parent_run_id`` (the MLflow UI nests it). When
the sweep ends, ``on_multirun_end`` writes the summary (CSV + figure + best job) on the
parent and ends it.
"""

from __future__ import annotations

import atexit
import functools
import json
import logging
import math
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from convnets.cli import report_user_errors

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

SWEEP_FILE = "mlflow_sweep.json"
SUMMARY_DIR = "summary"  # artifact folder on the parent run
_MAX_TAG = 5000  # MLflow allows 8000 characters; the complete definition is in sweep.yaml

# Per-job columns of the summary CSV: MLflow search_runs column -> CSV column.
SUMMARY_COLUMNS = {
    "tags.sweep_job": "job",
    "run_id": "run_id",
    "tags.mlflow.runName": "run_name",
    "status": "status",
    "tags.sweep_overrides": "overrides",
    "metrics.best_val_accuracy": "val_accuracy",  # the objective: the restored best epoch's
    "metrics.test_accuracy": "test_accuracy",
    "metrics.param_count": "param_count",
    "metrics.receptive_field": "receptive_field",
    "metrics.effective_receptive_field": "effective_receptive_field",
    "metrics.macs": "macs",
    "metrics.train_time_s": "train_time_s",
    "tags.failure_reason": "failure_reason",
    "tags.pruned": "pruned",  # stopped early by a search's pruner: not a candidate for best
}


@dataclass(frozen=True)
class SweepContext:
    """Where a sweep's jobs record their runs (the content of ``mlflow_sweep.json``)."""

    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    job_num: int | None = None  # this job's index in the sweep (Hydra's hydra.job.num)
    overrides: tuple[str, ...] = ()  # this job's overrides (its grid point / trial)

    @classmethod
    def read(cls, sweep_dir: str | Path, **job: Any) -> SweepContext:
        """The sweep's ``mlflow_sweep.json`` in ``sweep_dir``, with the job's fields if given."""
        return cls(**json.loads((Path(sweep_dir) / SWEEP_FILE).read_text()), **job)

    def tags(self) -> dict[str, str]:
        """Tags for the job's run: its place in the sweep (the parent tag comes from the tracker)."""
        return {
            "sweep_job": str(self.job_num),
            "sweep_overrides": " ".join(self.overrides)[:_MAX_TAG],
        }


def sweep_context(hydra_cfg: DictConfig) -> SweepContext | None:
    """The sweep a multirun job belongs to (``hydra_cfg``: the job's ``hydra`` config node, as
    the entry point has it), or ``None`` when its ``mlflow_sweep.json`` is missing."""
    path = Path(hydra_cfg.sweep.dir) / SWEEP_FILE
    if not path.is_file():
        log.warning("%s not found: this job is recorded on its own, not under a sweep", path)
        return None
    return SweepContext.read(
        path.parent, job_num=hydra_cfg.job.num, overrides=tuple(hydra_cfg.overrides.task)
    )


def experiment_name(cfg: DictConfig) -> str:
    """``tracking.experiment`` (experiment configs set it), else the dataset's name."""
    return cfg.tracking.experiment or cfg.dataset.name


def sweep_overrides(config: DictConfig) -> dict[str, str]:
    """The sweep's definition, key -> value: ``hydra.sweeper.params``, then the command line.

    Later entries win, as in the sweepers: a command-line ``key=choice(1,3)`` replaces that
    key's range from the config.
    """
    params = OmegaConf.select(config, "hydra.sweeper.params") or {}
    overrides = [f"{key}={value}" for key, value in params.items()]
    overrides += list(config.hydra.overrides.task)
    return dict(override.split("=", 1) for override in overrides)


def _param_key(key: str) -> str:
    """``+model.x`` -> ``sweep.model.x``: MLflow keys allow letters, digits, ``_-. /``."""
    key = key.lstrip("+~")
    return "sweep." + "".join(c if c.isalnum() or c in "_-. /" else "_" for c in key)


def _stop_sweep_on_error(method: Callable[..., None]) -> Callable[..., None]:
    """Exit instead of letting Hydra turn the error into a warning and sweep on.

    Hydra catches a callback's exception, warns and continues; a sweep without its parent
    run would scatter its jobs as unrelated runs. A user error (bad ``tracking.uri``) is one
    line, as in a job; anything else is logged with its traceback.
    """
    user_errors_reported = report_user_errors(method)

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            user_errors_reported(*args, **kwargs)
        except Exception:
            log.exception("sweep: the MLflow parent run could not be created; nothing was run")
            sys.exit(1)

    return wrapper


class MlflowSweepCallback(Callback):
    """Parent MLflow run for a multirun: created before the fan-out, summarised at the end."""

    def __init__(self) -> None:
        self._open_parent: tuple[str, str] | None = None  # (tracking_uri, run_id) until ended

    @_stop_sweep_on_error
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from convnets.search import resumed_parent_run
        from convnets.tracking import Tracker

        resumed = resumed_parent_run(config)  # checks an Optuna search before any run exists
        tracker = Tracker(config.tracking.uri, http_timeout_s=config.tracking.http_timeout_s)
        tracker.check_store()  # first contact: sqlite creates its schema here, once
        experiment_id = tracker.reopen_run(resumed) if resumed else None
        if experiment_id is not None:  # a resumed search: its jobs join the same parent
            run_id = resumed
        else:
            experiment_id = tracker.experiment_id(experiment_name(config))
            run_id = self._create_parent(tracker, config, experiment_id)
        self._open_parent = (config.tracking.uri, run_id)
        # If the sweep dies (Optuna raising, Ctrl-C), on_multirun_end never runs.
        atexit.register(self._end_abandoned_parent)

        context = SweepContext(config.tracking.uri, experiment_id, run_id)
        sweep_dir = Path(config.hydra.sweep.dir).resolve()
        sweep_dir.mkdir(parents=True, exist_ok=True)
        fields = asdict(context)
        del fields["job_num"], fields["overrides"]  # per job, filled in by sweep_context()
        tmp_file = sweep_dir / f".{SWEEP_FILE}.tmp"
        tmp_file.write_text(json.dumps(fields, indent=1))
        os.replace(tmp_file, sweep_dir / SWEEP_FILE)  # atomic: a job never reads half a file
        log.info("sweep: MLflow parent run %s in experiment %s", run_id, experiment_id)

    @staticmethod
    def _create_parent(tracker: Any, config: DictConfig, experiment_id: str) -> str:
        from convnets.tracking import redact, shorten

        overrides = sweep_overrides(config)
        definition = redact(" ".join(f"{key}={value}" for key, value in overrides.items()))
        sweep_dir = Path(config.hydra.sweep.dir).resolve()
        run_id = tracker.create_run(
            experiment_id,
            run_name=shorten("sweep " + " ".join(config.hydra.overrides.task), 250, "..."),
            tags={
                "sweep_role": "parent",
                "sweep_overrides": shorten(definition, _MAX_TAG, "..."),
                "sweeper": config.hydra.sweeper._target_.rsplit(".", 1)[-1],
                "launcher": config.hydra.launcher._target_.rsplit(".", 1)[-1],
                "sweep_dir": str(sweep_dir),
            },
        )
        tracker.log_params_to(run_id, {_param_key(key): value for key, value in overrides.items()})
        with tempfile.TemporaryDirectory() as tmp:  # the complete definition, as a file
            definition_file = Path(tmp) / "sweep.yaml"
            text = OmegaConf.to_yaml({"overrides": overrides, "sweeper": config.hydra.sweeper})
            definition_file.write_text(redact(text))
            tracker.log_artifact_to(run_id, definition_file)
        return run_id

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if HydraConfig.get().mode != RunMode.MULTIRUN:
            return
        # The basic launcher runs every job in this process: drop the finished job's Keras
        # state (graphs, layer-name counters) and garbage so memory stays flat over a sweep.
        if "keras" in sys.modules:
            sys.modules["keras"].utils.clear_session(free_memory=True)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        context = SweepContext.read(sweep_dir)
        optuna_results = sweep_dir / "optimization_results.yaml"  # by convnets.search
        if optuna_results.is_file():
            _log_optuna_results(context, optuna_results)
        summarize(context, sweep_dir / SUMMARY_DIR, config.tracking.http_timeout_s)
        self._open_parent = None

    def _end_abandoned_parent(self) -> None:
        if self._open_parent is None:
            return
        from convnets.tracking import Tracker

        uri, run_id = self._open_parent
        reason = "the sweep stopped before its end (see its log)"
        Tracker(uri).end_run(run_id, "FAILED", reason)


def end_runs_left_running(
    sweep_dir: str | Path, job_num: int, status: str, reason: str, http_timeout_s: float = 10.0
) -> list[str]:
    """End the runs job ``job_num`` of this sweep left RUNNING because its process died
    (SIGKILL, out of memory, a crash in native code) before it could end them; their ids.

    Called from the sweep's process by a launcher that runs jobs in processes of their own
    (``hydra/launcher=fresh_process``), once the job's process is gone; without this the run
    would stay RUNNING and the sweep summary would count it neither finished nor failed.
    """
    if not (Path(sweep_dir) / SWEEP_FILE).is_file():
        return []
    from convnets.tracking import Tracker

    context = SweepContext.read(sweep_dir)
    tracker = Tracker(context.tracking_uri, http_timeout_s=http_timeout_s)
    runs = tracker.search_runs(
        [context.experiment_id],
        filter_string=(
            f"tags.`mlflow.parentRunId` = '{context.parent_run_id}' "
            f"and tags.sweep_job = '{job_num}' and attributes.status = 'RUNNING'"
        ),
    )
    run_ids = list(runs["run_id"]) if len(runs) else []
    for run_id in run_ids:
        tracker.end_run(run_id, status, reason)
    return run_ids


def _log_optuna_results(context: SweepContext, path: Path) -> None:
    """The study's best objective value and parameters, as Optuna reported them; for several
    objectives the Pareto front (``pareto/`` artifacts, runs tagged ``pareto_optimal=true``)."""
    from convnets.tracking import Tracker, shorten

    tracker = Tracker(context.tracking_uri)
    results = OmegaConf.load(path)
    tracker.log_artifact_to(context.parent_run_id, path)
    if "best_value" in results:  # single objective
        tracker.log_metrics_to(context.parent_run_id, {"optuna_best_value": results.best_value})
        best = " ".join(f"{key}={value}" for key, value in results.best_params.items())
        tracker.set_tags_on(
            context.parent_run_id, {"optuna_best_params": shorten(best, _MAX_TAG, "...")}
        )
    for name in ("pareto.csv", "pareto.png"):
        if (path.parent / name).is_file():
            tracker.log_artifact_to(context.parent_run_id, path.parent / name, "pareto")
    for solution in results.get("solutions", []):
        if solution.run_id:
            tracker.set_tags_on(solution.run_id, {"pareto_optimal": "true"})
    for run_id in results.get("dominated_run_ids", []):
        tracker.set_tags_on(run_id, {"pareto_optimal": "false"})


def summarize(context: SweepContext, out_dir: Path, http_timeout_s: float = 10.0) -> pd.DataFrame:
    """Summary of the sweep's jobs on the parent run; ends the parent; returns the table.

    Logs ``summary/jobs.csv`` (one row per job), ``summary/*.png`` (test accuracy against
    parameter count coloured by receptive field, and against receptive field), the best
    job (highest ``val_accuracy``, the objective) as tag ``best_run_id`` and metrics
    ``best_val_accuracy`` / ``best_test_accuracy``, and the job counts. The parent ends FINISHED, or FAILED when no
    job finished.
    """
    import pandas as pd

    from convnets.comparison import summary_figures
    from convnets.tracking import Tracker

    tracker = Tracker(context.tracking_uri, http_timeout_s=http_timeout_s)
    runs = tracker.search_runs(
        [context.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{context.parent_run_id}'",
    )
    table = runs.reindex(columns=list(SUMMARY_COLUMNS)).rename(columns=SUMMARY_COLUMNS)
    if "metrics.val_accuracy" in runs.columns:  # trainer.restore_best=false: the last epoch's
        table["val_accuracy"] = table["val_accuracy"].fillna(runs["metrics.val_accuracy"])
    table["job"] = pd.to_numeric(table["job"]).astype("Int64")
    table = table.sort_values("job", kind="stable").reset_index(drop=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    table.to_csv(out_dir / "jobs.csv", index=False)
    if "metrics.test_accuracy" in runs.columns:  # some job finished
        # From the runs themselves, so points are labelled by the params that differ.
        summary_figures(runs, out_dir)  # accuracy vs params coloured by RF, vs RF; Pareto fronts
    tracker.log_artifacts_to(context.parent_run_id, out_dir, SUMMARY_DIR)

    finished = table[
        (table["status"] == "FINISHED") & table["val_accuracy"].notna() & table["pruned"].isna()
    ]
    metrics = {"jobs": len(table), "jobs_finished": len(finished)}
    metrics["jobs_failed"] = int((table["status"] == "FAILED").sum())
    if len(finished):
        best = finished.loc[finished["val_accuracy"].idxmax()]
        tags = {"best_run_id": best["run_id"], "best_overrides": str(best["overrides"])}
        tracker.set_tags_on(context.parent_run_id, tags)
        metrics["best_val_accuracy"] = best["val_accuracy"]
        if not math.isnan(best["test_accuracy"]):
            metrics["best_test_accuracy"] = best["test_accuracy"]
    tracker.log_metrics_to(context.parent_run_id, metrics)
    if len(finished):
        tracker.end_run(context.parent_run_id, "FINISHED")
    else:
        tracker.end_run(context.parent_run_id, "FAILED", "no job of the sweep finished")
    log.info("sweep: %d of %d jobs finished; summary in %s", len(finished), len(table), out_dir)
    return table
