"""The files a multirun's processes share: each one's layout, its one writer and its one reader.

A sweep (``python train.py -m``) runs in several processes that may not share memory or even a
machine: the sweep's own (Hydra's sweeper and callbacks), and its jobs (in that process with
the basic launcher, in others with joblib or ``fresh_process``, on other machines with
submitit). They agree through files in ``hydra.sweep.dir``, all defined here:

- ``mlflow_sweep.json`` (:class:`SweepContext`): written once by the sweep callback
  (:mod:`convnets.sweep`) before any job starts; read by every job, which records its run under
  the sweep's parent run.
- ``optuna_trials/<n>.json`` (:class:`TrialFile`): written by the search
  (:mod:`convnets.search`) before it launches trial ``n`` as job ``n``; read by that job
  (:mod:`convnets.trials`), which opens its trial through the study's storage.
- ``optimization_results.yaml``, ``pareto.csv``, ``pareto.png`` (:class:`SearchResults`):
  written by the search when it ends; read by the sweep callback, which logs them on the
  parent run.

A leaf: standard library and OmegaConf only (nothing of MLflow, Optuna or TensorFlow, nothing
else of convnets), so any side imports it at no cost and none imports another through it.
Every file is written to a temporary name and renamed into place: a reader in another process
sees the whole file or none.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

SWEEP_FILE = "mlflow_sweep.json"
SWEEP_LOCK = "sweep.lock"  # held by the sweep's process while it runs (convnets.folder_lock)
TRIALS_DIR = "optuna_trials"
RESULTS_FILE = "optimization_results.yaml"
PARETO_CSV = "pareto.csv"
PARETO_PNG = "pareto.png"
SEARCH_RESULTS_NAME = "convnets_optuna"  # the ``name`` field of RESULTS_FILE
# A trial's user attributes, written by its job (convnets.trials), read by the search.
RUN_ATTR = "mlflow_run_id"  # the job's MLflow run
METRICS_ATTR = "metrics"  # its final metrics, the objectives among them
PRUNED_ATTR = "pruned"  # the pruner stopped it
_MAX_TAG = 5000  # MLflow allows 8000 characters per tag; the complete definition is elsewhere
# The tag that marks a sweep's or a search's parent run in MLflow (its jobs carry none).
ROLE_TAG, PARENT_ROLE = "sweep_role", "parent"


def is_parent(tags: Mapping[str, str]) -> bool:
    """A run's tags say it is a sweep's or a search's parent run, not a training run."""
    return tags.get(ROLE_TAG) == PARENT_ROLE


def is_search_parent(tags: Mapping[str, str]) -> bool:
    """A sweep's parent run (its tags) is a search's (our Optuna sweeper), whose jobs are
    trials: the search, not ``resume=``, continues a stopped one."""
    return is_parent(tags) and tags.get("sweeper", "").startswith("ConvnetsOptuna")


def experiment_name(cfg: Any) -> str:
    """The MLflow experiment a run or sweep records into, and the default name of a search's
    Optuna study: ``tracking.experiment`` (experiment configs set it), else the dataset's."""
    return cfg.tracking.experiment or cfg.dataset.name


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ---------------------------------------------------------------- mlflow_sweep.json


@dataclass(frozen=True)
class SweepContext:
    """Where a sweep's jobs record their runs, and what names them.

    The file holds the sweep's fields; ``job_num`` and ``overrides`` are the reading job's
    own (from its Hydra config), filled in by :meth:`read`.
    """

    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    search: bool = False  # an Optuna search (job n is trial n), not a grid
    swept_keys: tuple[str, ...] = ()  # the keys the sweep varies: they name its jobs' runs
    job_num: int | None = None  # this job's index in the sweep (Hydra's hydra.job.num)
    overrides: tuple[str, ...] = ()  # this job's overrides (its grid point / trial)
    # (key, significant digits) where a grid's numbers need more than 2 to stay apart in names
    name_digits: tuple[tuple[str, int], ...] = ()

    @staticmethod
    def path(sweep_dir: str | Path) -> Path:
        return Path(sweep_dir) / SWEEP_FILE

    def write(self, sweep_dir: str | Path) -> Path:
        """The sweep's fields (not a job's) to ``<sweep_dir>/mlflow_sweep.json``."""
        fields = asdict(self)
        del fields["job_num"], fields["overrides"]
        fields["swept_keys"] = list(self.swept_keys)
        fields["name_digits"] = [list(pair) for pair in self.name_digits]
        path = self.path(sweep_dir)
        _write_atomically(path, json.dumps(fields, indent=1))
        return path

    @classmethod
    def read(
        cls,
        sweep_dir: str | Path,
        *,
        job_num: int | None = None,
        overrides: Sequence[str] = (),
    ) -> SweepContext | None:
        """The sweep in ``sweep_dir`` (with a job's number and overrides if given), or None
        when it has no ``mlflow_sweep.json``."""
        path = cls.path(sweep_dir)
        if not path.is_file():
            return None
        fields = json.loads(path.read_text())
        fields["swept_keys"] = tuple(fields.get("swept_keys", ()))
        fields["name_digits"] = tuple((k, int(d)) for k, d in fields.get("name_digits", ()))
        return cls(**fields, job_num=job_num, overrides=tuple(overrides))

    def tags(self) -> dict[str, str]:
        """Tags for the job's run: its place in the sweep (the parent tag comes from the tracker)."""
        return {
            "sweep_job": str(self.job_num),
            "sweep_overrides": " ".join(self.overrides)[:_MAX_TAG],
        }


# ---------------------------------------------------------------- optuna_trials/<n>.json


@dataclass(frozen=True)
class PrunerSpec:
    """What both sides (the search's study and the job's) build the same pruner from."""

    name: str
    max_epochs: int


@dataclass(frozen=True)
class TrialFile:
    """What job ``n`` of a search needs to find its trial ``n``."""

    storage: str
    study_name: str
    number: int
    pruner: PrunerSpec
    stale_after_s: int

    @staticmethod
    def path(sweep_dir: str | Path, number: int) -> Path:
        return Path(sweep_dir) / TRIALS_DIR / f"{number}.json"

    def write(self, sweep_dir: str | Path) -> Path:
        path = self.path(sweep_dir, self.number)
        _write_atomically(path, json.dumps(asdict(self)))
        return path

    @classmethod
    def read(cls, sweep_dir: str | Path, job_num: int) -> TrialFile | None:
        """Job ``job_num``'s trial, or None (a job the search did not launch)."""
        path = cls.path(sweep_dir, job_num)
        if not path.is_file():
            return None
        fields = json.loads(path.read_text())
        return cls(**{**fields, "pruner": PrunerSpec(**fields["pruner"])})

    @staticmethod
    def numbers(sweep_dir: str | Path) -> set[int]:
        """The trials launched from ``sweep_dir`` (one file each)."""
        return {int(p.stem) for p in (Path(sweep_dir) / TRIALS_DIR).glob("*.json")}


# ---------------------------------------------------------------- optimization_results.yaml


@dataclass(frozen=True)
class SearchResults:
    """What a search found, as Optuna has it: the best trial for one objective, the Pareto
    front (``solutions``, with ``pareto.csv`` and ``pareto.png`` beside) for several."""

    study_name: str
    objectives: tuple[str, ...]  # "selected_val_accuracy:max", ...
    trials_complete: int
    best_value: float | None = None  # one objective
    best_params: Mapping[str, Any] | None = None
    best_trial: int | None = None
    best_run_id: str | None = None
    # several objectives: each {trial, run_id, values: {name: value}, params}
    solutions: tuple[Mapping[str, Any], ...] = ()
    dominated_run_ids: tuple[str, ...] = ()  # runs a resumed study pushed off the front
    trials_running: int = 0  # in other processes sharing the study when this one ended

    @staticmethod
    def path(sweep_dir: str | Path) -> Path:
        return Path(sweep_dir) / RESULTS_FILE

    def write(self, sweep_dir: str | Path) -> Path:
        fields: dict[str, Any] = {"name": SEARCH_RESULTS_NAME, **asdict(self)}
        fields["objectives"] = list(self.objectives)
        if self.best_value is None:  # only what applies: one objective or several
            for key in ("best_value", "best_params", "best_trial", "best_run_id"):
                del fields[key]
        if not self.solutions:
            del fields["solutions"], fields["dominated_run_ids"]
        else:
            fields["solutions"] = [dict(s) for s in self.solutions]
            fields["dominated_run_ids"] = list(self.dominated_run_ids)
        path = self.path(sweep_dir)
        _write_atomically(path, OmegaConf.to_yaml(OmegaConf.create(fields)))
        return path

    @classmethod
    def read(cls, sweep_dir: str | Path) -> SearchResults | None:
        """The search's results in ``sweep_dir``, or None (not a search, or it did not end)."""
        path = cls.path(sweep_dir)
        if not path.is_file():
            return None
        fields = OmegaConf.to_container(OmegaConf.load(path))
        fields.pop("name", None)
        fields["objectives"] = tuple(fields["objectives"])
        fields["solutions"] = tuple(fields.get("solutions", ()))
        fields["dominated_run_ids"] = tuple(fields.get("dominated_run_ids", ()))
        return cls(**fields)

    @classmethod
    def pareto_files(cls, sweep_dir: str | Path) -> list[Path]:
        """``pareto.csv`` and ``pareto.png`` beside the results, those that were written."""
        return [p for p in (Path(sweep_dir) / n for n in (PARETO_CSV, PARETO_PNG)) if p.is_file()]
