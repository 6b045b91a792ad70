"""MLflow: the store, experiments, runs and the record every training run leaves.

The only module that imports ``mlflow``: the job, the sweep, evaluation and comparison read
and write through :class:`Tracker`, so every call gets the same store handling (the lock, the
bounded HTTP probe, redaction). It stays free of TensorFlow so that a sweep's launcher process
can prepare the store cheaply (``log_model`` imports it only when a model is logged).

Store handling:

- A remote store is probed once with MLflow's HTTP retries switched off and a bounded timeout:
  by default the client retries for minutes, so an unreachable server would look like a hang.
- A SQLite store is initialised and the experiment created under an exclusive file lock next
  to the database. MLflow creates the schema on first use and ``set_experiment`` is
  get-or-create: both race when several processes start together on a fresh store (schema
  creation fails, or runs land in "Default"). Runs then start with an explicit experiment id.
- Artifacts of a SQLite store live beside the database (``<db dir>/mlruns/<experiment>``),
  not in whatever directory the process happens to run in.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import importlib.metadata
import io
import json
import math
import os
import re
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import numpy as np
from mlflow.entities import Metric, Run, RunStatus, RunTag
from mlflow.environment_variables import MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import MAX_ENTITY_KEY_LENGTH, MAX_PARAM_VAL_LENGTH, MAX_TAG_VAL_LENGTH
from omegaconf import DictConfig

if TYPE_CHECKING:
    import pandas as pd

from convnets.config import read_run_config
from convnets.errors import ConfigError, ConvnetsError, Interrupted, TrackingError

CONFIG_ARTIFACT = "config.yaml"
MODEL_URI_TAG = "model_uri"  # the logged model's runs:/<run_id>/<name> URI, on its run
EPOCH_METRICS = ("loss", "accuracy", "val_loss", "val_accuracy", "lr")
SHORTENED = "...[shortened; full value in config.yaml]"
VERSIONED_PACKAGES = (
    "convnets",
    "tensorflow",
    "keras",
    "mlflow",
    "hydra-core",
    "omegaconf",
    "numpy",
    "tensorflow-datasets",
    "scikit-learn",
)

_CREDENTIALS = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)[^/@\s]+@")


# ---------------------------------------------------------------- pure helpers


def epoch_metrics(logs: Mapping[str, Any]) -> dict[str, float]:
    """The per-epoch metrics a run records (:data:`EPOCH_METRICS`) of Keras's epoch ``logs``."""
    return {key: float(logs[key]) for key in EPOCH_METRICS if key in logs}


def redact(text: str) -> str:
    """Drop ``user:password@`` from every URI in ``text`` (params and tags are world-readable)."""
    return _CREDENTIALS.sub(r"\g<scheme>", text)


def logged_model_uri(run: Run, key: str) -> str:
    """The URI of the model ``run`` (given as ``key=``) logged, its ``model_uri`` tag; a run
    without one is of the wrong kind for the key: the command is to be fixed."""
    uri = run.data.tags.get(MODEL_URI_TAG)
    if uri is None:
        raise ConfigError(
            f"{key}={run.info.run_id}: the run has no logged model (no {MODEL_URI_TAG} tag): it "
            "was trained with tracking.log_model=false, or did not finish; give a run that "
            "logged its model"
        )
    return uri


def shorten(text: str, limit: int, marker: str = SHORTENED) -> str:
    """``text`` cut to ``limit`` characters, ending in ``marker`` when cut."""
    return text if len(text) <= limit else text[: limit - len(marker)] + marker


def to_params(flat: Mapping[str, Any]) -> dict[str, str]:
    """MLflow params from a flat config: strings, credentials removed, within MLflow's limits.

    A value longer than MLflow's limit would make ``log_params`` fail; it is shortened here
    and stays complete in the ``config.yaml`` artifact.
    """
    params = {}
    for key, value in flat.items():
        text = "None" if value is None else str(value)
        params[shorten(key, MAX_ENTITY_KEY_LENGTH)] = shorten(redact(text), MAX_PARAM_VAL_LENGTH)
    return params


@functools.cache
def git_state(path: str | Path) -> tuple[str, bool | None]:
    """(commit, dirty) of the git checkout holding ``path``; ("unknown", None) outside git.

    Read once per process: the code a process runs is the code it imported at its start, and
    the jobs of a sweep in one process then do not each pay for two ``git`` subprocesses.
    """

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(path), *args], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        return git("rev-parse", "HEAD"), bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return "unknown", None


@functools.cache
def git_changes(path: str | Path) -> tuple[str, list[str]]:
    """What the working tree adds to its commit: ``git diff HEAD`` (tracked files, staged or
    not) and the untracked files under ``path`` (git's own ignores applied); ("", []) when
    clean or outside git. Read once per process, as :func:`git_state`."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(path), *args], capture_output=True, text=True, timeout=30, check=True
        ).stdout

    try:
        diff = git("diff", "HEAD", "--binary")
        untracked = git("ls-files", "--others", "--exclude-standard", "--", ".").splitlines()
    except (OSError, subprocess.SubprocessError):
        return "", []
    return diff, untracked


@functools.cache
def package_versions() -> dict[str, str]:
    """Python's and the :data:`VERSIONED_PACKAGES`' versions (read once per process)."""
    versions = {"python": sys.version.split()[0]}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def model_name(name: str) -> str:
    """``name`` as a LoggedModel name: MLflow refuses ``/ : . % " '`` in it; they become ``_``."""
    return re.sub(r"[/:.%\"']", "_", name) or "model"


LOCAL_UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves a local store by default


def ui_url(uri: str, experiment_id: str, run_id: str | None = None) -> str:
    """The MLflow UI page of a run (or, without ``run_id``, the experiment's runs table; MLflow
    3 opens an experiment on its GenAI overview page otherwise)."""
    base = LOCAL_UI if not uri.startswith(("http://", "https://")) else redact(uri).rstrip("/")
    page = f"{base}/#/experiments/{experiment_id}/runs"
    return f"{page}/{run_id}" if run_id else page


def where_to_look(uri: str, experiment_id: str, run_id: str) -> str:
    """The URLs of a run and of its experiment's runs table, after the command that serves
    them when the store is a local file: what a finished command prints last."""
    where = f"{ui_url(uri, experiment_id, run_id)}; all runs: {ui_url(uri, experiment_id)}"
    if uri.startswith("sqlite:"):
        where = f"mlflow ui --backend-store-uri {shlex.quote(uri)}, then {where}"
    return where


def _denied(err: BaseException) -> OSError | None:
    """The permission (or read-only filesystem) error in ``err``'s chain of causes, if any."""
    while err is not None:
        if isinstance(err, PermissionError) or (
            isinstance(err, OSError) and err.errno == errno.EROFS
        ):
            return err
        err = err.__cause__ or err.__context__
    return None


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (relative to the working directory), else None."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///") :].split("?", 1)[0]
    return Path(path).resolve() if path and path != ":memory:" else None


def absolute_uri(uri: str) -> str:
    """``uri`` as a command run in another folder reaches the same store: a relative SQLite
    path made absolute; credentials dropped (:func:`redact`)."""
    path = sqlite_path(uri)
    if path is None:
        return redact(uri)
    query = uri.partition("?")[2]
    return f"sqlite:///{path}" + (f"?{query}" if query else "")


_BOUNDED_LOCK = threading.Lock()
_bounded_blocks = 0  # bounded blocks open now, in any thread
_unbounded_env: dict[str, str | None] = {}  # the variables as they were before the first


@contextlib.contextmanager
def _bounded_http(timeout_s: float) -> Iterator[None]:
    """MLflow's HTTP client without retries and with a timeout, for the duration of the block.

    MLflow reads these variables on every request (see ``mlflow.environment_variables``), and
    they are the process's: threads (the epoch sender, the heartbeat) share them with the main
    thread. The first block to open sets them and the last to close restores them, so a
    block that ends in one thread never undoes another's that is still open; while one is
    open, every MLflow request of the process tries once, within the first block's timeout.
    """
    global _bounded_blocks
    wanted = {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(max(1, math.ceil(timeout_s))),
    }
    with _BOUNDED_LOCK:
        if _bounded_blocks == 0:
            _unbounded_env.clear()
            _unbounded_env.update({key: os.environ.get(key) for key in wanted})
            os.environ.update(wanted)
        _bounded_blocks += 1
    try:
        yield
    finally:
        with _BOUNDED_LOCK:
            _bounded_blocks -= 1
            if _bounded_blocks == 0:
                for key, value in _unbounded_env.items():
                    if value is None:
                        os.environ.pop(key, None)
                    else:
                        os.environ[key] = value


# ---------------------------------------------------------------- the store


class Tracker:
    """One MLflow store: checked once, experiments created once, runs started explicitly."""

    def __init__(self, uri: str, *, http_timeout_s: float = 10.0):
        self.uri = uri
        self.http_timeout_s = http_timeout_s
        self.db_path = sqlite_path(uri)
        self._refuse_what_cannot_be_a_store()
        self.client = self._open_client()
        mlflow.set_tracking_uri(uri)

    def _refuse_what_cannot_be_a_store(self) -> None:
        """SQLite URIs MLflow would take and then fail on late: an in-memory database (the
        run, recorded nowhere, fails at its first write) and a folder (MLflow retries opening
        it for two minutes)."""
        if self.uri.split("?", 1)[0] in ("sqlite:", "sqlite://", "sqlite:///:memory:"):
            raise TrackingError(
                f"tracking.uri={self.shown_uri}: an in-memory SQLite store keeps nothing once "
                "the command ends; give a file, e.g. tracking.uri=sqlite:///mlflow.db"
            )
        if self.db_path is not None and self.db_path.is_dir():
            raise TrackingError(
                f"tracking.uri={self.shown_uri}: {self.db_path} is a folder; name the database "
                f"file in it, e.g. tracking.uri=sqlite:///{self.db_path / 'mlflow.db'}"
            )

    def _open_client(self) -> MlflowClient:
        """The client, which opens the store right away: a fresh SQLite schema is created here,
        and MLflow imports the store's modules (SQLAlchemy, alembic) the first time.

        Our own processes create a schema one at a time (the lock), but any other MLflow
        program (``mlflow ui``, a notebook's client) may be creating the same fresh file at
        this moment, and MLflow's creation is not safe against a concurrent one: the loser
        fails with "table ... already exists" or an alembic row mismatch while the winner
        completes the schema. Opening again once it is done succeeds, so such a failure is
        retried for a while before the store is called unusable.
        """
        for attempt in range(SCHEMA_RACE_RETRIES + 1):
            try:
                with self._store_lock():
                    return MlflowClient(tracking_uri=self.uri)
            except Exception as err:  # noqa: BLE001 - e.g. an unknown scheme, an unwritable path
                if self.db_path is None or not _lost_schema_race(err):
                    raise self._unusable(err) from err
                if attempt == SCHEMA_RACE_RETRIES:
                    raise TrackingError(
                        f"tracking.uri={self.shown_uri}: the store's schema is broken: two "
                        "programs created this SQLite file at the same moment, which MLflow "
                        f"does not survive; if {self.db_path} holds no runs yet, delete it "
                        "and start again"
                    ) from err
                time.sleep(0.5 * (attempt + 1))
        raise AssertionError("unreachable")

    @property
    def shown_uri(self) -> str:
        return redact(self.uri)

    @contextlib.contextmanager
    def _store_lock(self) -> Iterator[None]:
        """Exclusive lock beside a SQLite database (POSIX ``flock``; no-op for other stores)."""
        if self.db_path is None:
            yield
            return
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.db_path.with_name(self.db_path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _unusable(self, err: Exception) -> TrackingError:
        denied = _denied(err)
        if denied is not None and self.db_path is not None:
            where = Path(denied.filename).parent if denied.filename else self.db_path.parent
            return TrackingError(
                f"tracking.uri={self.shown_uri}: cannot write in {where} ({denied.strerror}); "
                f"SQLite and our lock write beside {self.db_path.name}, so its folder must be "
                "writable by this user: fix its permissions or record elsewhere with "
                "tracking.uri=sqlite:///<writable folder>/mlflow.db"
            )
        if "filesystem tracking backend" in str(err):  # file:///x, ./mlruns
            return TrackingError(
                f"tracking.uri={self.shown_uri}: MLflow no longer records runs in a folder "
                "store (its file backend is in maintenance mode); record in a SQLite database "
                "instead: tracking.uri=sqlite:///<folder>/mlflow.db"
            )
        lines = redact(str(err)).strip().splitlines()
        detail = _cut_at_word(lines[0], 160) if lines else ""
        return TrackingError(
            f"tracking.uri={self.shown_uri}: the MLflow store cannot be used "
            f"({type(err).__name__}{': ' + detail if detail else ''}); check the URI, "
            "start the server, or use the local default tracking.uri=sqlite:///mlflow.db"
        )

    def check_store(self) -> None:
        """Open the store (creating a SQLite schema once, under the lock); fail fast otherwise.

        A SQLite file without write permission (or in a folder SQLite cannot write its journal
        to) is refused here: reading it works, and the first write would fail with a
        SQLAlchemy traceback. Checked on the mode bits too, as root ignores them in
        ``os.access`` while the user plainly meant the file to be read-only.
        """
        if self.db_path is not None and self.db_path.exists():
            folder = self.db_path.parent
            if (
                not os.access(self.db_path, os.W_OK)
                or not self.db_path.stat().st_mode & 0o222
                or not os.access(folder, os.W_OK)
            ):
                raise TrackingError(
                    f"tracking.uri={self.shown_uri}: the store {self.db_path} is read-only "
                    f"(the file or its folder); make both writable (chmod u+w) or record "
                    "elsewhere with tracking.uri=sqlite:///<writable path>/mlflow.db"
                )
        try:
            with self._store_lock(), _bounded_http(self.http_timeout_s):
                self.client.search_experiments(max_results=1)
        except Exception as err:  # noqa: BLE001 - whatever it is, the store is unusable
            raise self._unusable(err) from err

    def experiment_id(self, name: str) -> str:
        """Get or create experiment ``name``: one experiment however many processes on however
        many machines ask at once."""
        try:
            with self._store_lock(), _bounded_http(self.http_timeout_s):
                found = self.client.get_experiment_by_name(name)
                if found is not None:
                    if found.lifecycle_stage == "deleted":
                        raise TrackingError(
                            f"experiment {name!r} is deleted in {self.shown_uri}; restore it "
                            f"(mlflow experiments restore --experiment-id {found.experiment_id}) "
                            "or set tracking.experiment to another name"
                        )
                    return found.experiment_id
                try:
                    return self.client.create_experiment(
                        name, artifact_location=self._artifacts(name)
                    )
                except MlflowException as err:
                    # Another machine created it since we looked (the lock covers only this
                    # machine's processes on a SQLite file): theirs is the one.
                    if err.error_code != "RESOURCE_ALREADY_EXISTS":
                        raise
                    return self.client.get_experiment_by_name(name).experiment_id
        except TrackingError:
            raise
        except Exception as err:  # noqa: BLE001
            raise self._unusable(err) from err

    def _artifacts(self, experiment: str) -> str | None:
        if self.db_path is None:
            return None  # the server decides (e.g. mlflow server --artifacts-destination)
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", experiment).strip("._") or "experiment"
        return (self.db_path.parent / "mlruns" / safe).as_uri()

    # ------------------------------------------------------------ runs

    def get_run(self, run_id: str, *, key: str = "run_id") -> Run:
        """The run, or a TrackingError naming ``key`` (e.g. ``reproduce``) and the store; a
        deleted run (MLflow keeps it until garbage collection) is refused too: nothing can be
        written to it, and the UI no longer shows it."""
        try:
            with _bounded_http(self.http_timeout_s):
                run = self.client.get_run(run_id)
        except MlflowException as err:
            if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                raise TrackingError(
                    f"{key}={run_id}: no such run in {self.shown_uri}; copy the run id from the "
                    "MLflow UI or pass the store it lives in with tracking.uri=..."
                ) from err
            raise self._unusable(err) from err
        except Exception as err:  # noqa: BLE001
            raise self._unusable(err) from err
        if run.info.lifecycle_stage == "deleted":
            raise TrackingError(
                f"{key}={run_id}: the run is deleted in {self.shown_uri}; restore it first "
                f"(mlflow runs restore --run-id {run_id}, with MLFLOW_TRACKING_URI set to it)"
            )
        return run

    def reopen_run(self, run_id: str) -> str | None:
        """Mark an ended run RUNNING again (a resumed search's parent run); returns its
        experiment id, or None when the store has no such live run (deleted, another store)."""
        try:
            with _bounded_http(self.http_timeout_s):
                run = self.client.get_run(run_id)
                if run.info.lifecycle_stage == "deleted":
                    return None
                self.client.update_run(run_id, status="RUNNING")
        except MlflowException:
            return None
        except Exception as err:  # noqa: BLE001
            raise self._unusable(err) from err
        return run.info.experiment_id

    def delete_run(self, run_id: str) -> None:
        """Delete a run (MLflow keeps it among the deleted ones until garbage-collected)."""
        with _bounded_http(self.http_timeout_s):
            self.client.delete_run(run_id)

    def load_config(
        self,
        run_id: str,
        *,
        key: str = "run_id",
        require: tuple[str, ...] = (),
        then: str | None = None,
    ) -> DictConfig:
        """The resolved config a run recorded as its ``config.yaml`` artifact (with the
        sections of ``require``: :func:`~convnets.config.read_run_config`). ``then``: what a
        refusal says after what is wrong (default: for a rerun). A refusal names the
        artifact, not the temporary copy it read."""
        self.get_run(run_id, key=key)
        with tempfile.TemporaryDirectory() as tmp:
            try:
                local = self.download_artifacts(run_id, CONFIG_ARTIFACT, tmp)
            except Exception as err:  # noqa: BLE001
                raise TrackingError(
                    f"{key}={run_id}: the run has no readable {CONFIG_ARTIFACT} artifact "
                    f"({type(err).__name__})"
                    + (f", {then}" if then else "; only runs recorded by train.py can be rerun")
                ) from err
            return read_run_config(
                local,
                f"{key}={run_id}",
                require,
                shown=f"its {CONFIG_ARTIFACT} artifact",
                then=then or "so the run cannot be rerun from its record",
            )

    def finished_study_jobs(self, parent: Run) -> list[tuple[int, Run]]:
        """The finished, unpruned jobs with a test accuracy of the sweep or search whose
        parent run is ``parent``, as ``(job number, run)`` in job order: what ``-m
        reproduce=<parent>`` trains again; none is a :class:`TrackingError`."""
        parent_id = parent.info.run_id
        found = self.client.search_runs(
            [parent.info.experiment_id],
            filter_string=(
                f"tags.`mlflow.parentRunId` = '{parent_id}' and attributes.status = 'FINISHED'"
            ),
            max_results=10_000,
        )
        jobs = [
            (int(run.data.tags.get("sweep_job", 0)), run)
            for run in found
            if run.data.tags.get("pruned") != "true" and "test_accuracy" in run.data.metrics
        ]
        if not jobs:
            raise TrackingError(
                f"reproduce={parent_id}: the study has no finished job with a test accuracy to "
                "reproduce"
            )
        return sorted(jobs, key=lambda pair: pair[0])

    def download_artifacts(self, run_id: str, artifact_path: str, dst: str | Path) -> Path:
        """A run's artifact (file or folder) copied under ``dst``; MLflow's errors pass through."""
        # A progress bar per downloaded file is noise on a one-line command.
        MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.set(False)
        return Path(
            mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=artifact_path, dst_path=str(dst), tracking_uri=self.uri
            )
        )

    def get_experiment_by_name(self, name: str) -> Any:
        with _bounded_http(self.http_timeout_s):
            return self.client.get_experiment_by_name(name)

    def search_runs(self, experiment_ids: Sequence[str], filter_string: str = "") -> pd.DataFrame:
        """Runs as MLflow's DataFrame (``params.*``, ``metrics.*``, ``tags.*`` columns)."""
        return mlflow.search_runs(experiment_ids=list(experiment_ids), filter_string=filter_string)

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
        """Start (or, with ``run_id``, reopen) a run; end it FINISHED, FAILED or KILLED.

        KeyboardInterrupt ends the run KILLED; any other exception FAILED with the reason in the
        ``failure_reason`` tag. The exception is re-raised either way.
        """
        all_tags = {
            key: shorten(redact(str(v)), MAX_TAG_VAL_LENGTH) for key, v in (tags or {}).items()
        }
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
        except KeyboardInterrupt as err:
            self._end(active.info.run_id, "KILLED", f"interrupted ({_signal_name(err)})")
            raise
        except BaseException as err:
            self._end(active.info.run_id, "FAILED", failure_reason(err))
            raise
        else:
            mlflow.end_run(status="FINISHED")

    def _end(self, run_id: str, status: str, reason: str) -> None:
        # Best effort, each call tried once: the store may be the thing that failed (MLflow's
        # own retries would hold the error back for minutes); the original error matters more.
        with self.bounded(), contextlib.suppress(Exception):
            self.client.set_tag(run_id, "failure_reason", shorten(redact(reason), 5000))
        with self.bounded(), contextlib.suppress(Exception):
            mlflow.end_run(status=status)

    def bounded(self) -> contextlib.AbstractContextManager[None]:
        """A block whose MLflow HTTP requests are each tried once, within ``http_timeout_s``
        (MLflow's own retries take about four minutes): for a caller that retries itself or
        can do without the answer (the epoch sender, the heartbeat)."""
        return _bounded_http(self.http_timeout_s)

    # ------------------------------------------------------------ the record (active run)

    def log_params(self, params: Mapping[str, Any]) -> None:
        mlflow.log_params(to_params(params))

    def log_text(self, text: str, artifact_file: str) -> None:
        mlflow.log_text(text, artifact_file)

    def log_dict(self, data: Mapping[str, Any], artifact_file: str) -> None:
        mlflow.log_dict(dict(data), artifact_file)

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        mlflow.log_figure(figure, artifact_file)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        mlflow.set_tags({k: shorten(redact(str(v)), MAX_TAG_VAL_LENGTH) for k, v in tags.items()})

    def log_steps(self, run_id: str, steps: Sequence[tuple[int, int, Mapping[str, float]]]) -> None:
        """``(step, timestamp in ms, metrics)`` rows in one store call (MLflow splits a batch
        past its limit), confirmed before it returns whatever ``MLFLOW_ENABLE_ASYNC_LOGGING``
        says. The store keeps a metric as (key, value, timestamp, step) and ignores a row it
        has already: sending the same rows again, after a call whose answer was lost, adds
        nothing."""
        metrics = [
            Metric(key, float(value), timestamp, step)
            for step, timestamp, logs in steps
            for key, value in logs.items()
        ]
        self.client.log_batch(run_id, metrics=metrics, synchronous=True)

    def metric_steps(self, run_id: str, keys: Sequence[str]) -> set[tuple[str, int]]:
        """The (key, step) pairs of ``keys`` the run has recorded."""
        return {(k, m.step) for k in keys for m in self.client.get_metric_history(run_id, k)}

    def history(self, run_id: str, keys: Sequence[str] = EPOCH_METRICS) -> dict[str, list[float]]:
        """Per-epoch metrics of a run ordered by step (covers every resumed part of the run)."""
        out = {}
        for key in keys:
            points = sorted(self.client.get_metric_history(run_id, key), key=lambda m: m.step)
            if points:
                out[key] = [m.value for m in points]
        return out

    def log_data_inputs(
        self, run_id: str, *, name: str, source: str, splits: Mapping[str, tuple[str, int]]
    ) -> None:
        """Each split (``{context: (digest, number of examples)}``, e.g. ``train``) as an MLflow
        dataset input of the run: the UI's Datasets column, and
        ``search_runs(filter_string="dataset.digest = '...'")`` find runs by their data.

        MLflow caps a dataset digest at 36 characters: the first 36 of the sha256 (the full
        one is in the ``data_digest.<split>`` tags). Empty splits are left out.
        """
        from mlflow.entities import Dataset, DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT
        from mlflow.utils.validation import MAX_DATASET_DIGEST_SIZE

        inputs = [
            DatasetInput(
                Dataset(
                    name=name,
                    digest=digest[:MAX_DATASET_DIGEST_SIZE],
                    source_type=source.split(":", 1)[0],
                    source=json.dumps({"uri": redact(source)}),
                    profile=json.dumps({"num_examples": count}),
                ),
                tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)],
            )
            for context, (digest, count) in splits.items()
            if count > 0
        ]
        # MLflow gets-or-creates the experiment's dataset rows in two steps: two jobs of a
        # parallel sweep logging the same data at once collide on its unique key (SQLite:
        # IntegrityError). The store lock serialises local processes; a second try finds the
        # row the other one created (a remote server's own race).
        for attempt in (1, 2):
            try:
                with self._store_lock():
                    self.client.log_inputs(run_id, datasets=inputs)
                return
            except MlflowException:
                if attempt == 2:
                    raise

    def log_model(
        self,
        model: Any,
        *,
        name: str,
        input_example: np.ndarray,
        metadata: Mapping[str, Any] | None = None,
    ) -> tuple[str, str]:
        """Log a Keras model (Keras format) as the LoggedModel ``name``; ``(model_uri, model_id)``.

        ``name`` (e.g. the run's name) is made a valid model name by :func:`model_name`; the
        model loads as ``runs:/<run_id>/<that name>`` (the returned URI) or
        ``models:/<model_id>``. MLflow 3 links the run's step-0 metrics logged before this call
        (the test metrics, param_count, receptive_field, ...) and its params to the model, so
        ``mlflow.search_logged_models`` can filter and rank models by them.

        The signature and ``input_example`` say what goes in: images as the dataset stores them
        (the example's dtype and the model's input shape); MLflow checks that the served model
        answers the example. ``pip_requirements`` is given explicitly: inferring it loads the
        model in a subprocess (about 7 s for a tiny model on this machine).
        """
        import mlflow.tensorflow  # imports TensorFlow: only when a model is logged
        from mlflow.models import ModelSignature
        from mlflow.types import Schema, TensorSpec

        versions = package_versions()
        signature = ModelSignature(
            inputs=Schema([TensorSpec(input_example.dtype, (-1, *model.input_shape[1:]))]),
            outputs=Schema([TensorSpec(np.dtype("float32"), (-1, *model.output_shape[1:]))]),
        )
        # MLflow predicts on the input example to check it serves; Keras's progress bar for
        # that one batch would land in the middle of a quiet run's output.
        with contextlib.redirect_stdout(io.StringIO()):
            info = mlflow.tensorflow.log_model(
                model,
                name=model_name(name),
                signature=signature,
                input_example=input_example,
                metadata=dict(metadata or {}),
                pip_requirements=[
                    f"tensorflow=={versions['tensorflow']}",
                    f"keras=={versions['keras']}",
                ],
            )
        return f"runs:/{mlflow.active_run().info.run_id}/{model_name(name)}", info.model_id

    @staticmethod
    def model_metadata(folder: str | Path) -> dict[str, Any]:
        """The ``metadata`` a downloaded model was logged with (its ``MLmodel`` file)."""
        from mlflow.models import Model

        return dict(Model.load(Path(folder)).metadata or {})

    def download_model(self, run_id: str, dst: str | Path, *, key: str = "run_id") -> Path:
        """The folder of the model a run logged (its ``model_uri`` tag), copied under ``dst``."""
        uri = logged_model_uri(self.get_run(run_id, key=key), key)
        MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.set(False)
        try:
            return Path(
                mlflow.artifacts.download_artifacts(
                    artifact_uri=uri, dst_path=str(dst), tracking_uri=self.uri
                )
            )
        except Exception as err:  # noqa: BLE001 - MLflow raises several types for "not there"
            raise TrackingError(
                f"{key}={run_id}: its logged model {uri} cannot be downloaded "
                f"({type(err).__name__}); was it deleted?"
            ) from err

    # ------------------------------------------------------------ any run, by id

    def create_run(
        self,
        experiment_id: str,
        *,
        run_name: str,
        tags: Mapping[str, Any] | None = None,
        parent_run_id: str | None = None,
    ) -> str:
        """A run that is not this process's active one (a sweep parent, a failed job's record)."""
        all_tags = {k: shorten(redact(str(v)), MAX_TAG_VAL_LENGTH) for k, v in (tags or {}).items()}
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        run = self.client.create_run(experiment_id, run_name=redact(run_name), tags=all_tags)
        return run.info.run_id

    def log_params_to(self, run_id: str, params: Mapping[str, Any]) -> None:
        """Params (:func:`to_params`: strings, redacted, within limits) in one store call."""
        from mlflow.entities import Param

        batch = [Param(k, v) for k, v in to_params(params).items()]
        self.client.log_batch(run_id, params=batch)

    def log_metrics_to(self, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self.client.log_batch(run_id, metrics=batch)

    def set_tags_on(self, run_id: str, tags: Mapping[str, Any]) -> None:
        """One batch, not a ``set_tag`` per key: processes sharing a run (a search's parent)
        set the same tags at the same moment, and MLflow's SQL store retries a batch's insert
        that collides with another's, where a single ``set_tag`` fails with the collision."""
        batch = [RunTag(k, shorten(redact(str(v)), MAX_TAG_VAL_LENGTH)) for k, v in tags.items()]
        self.client.log_batch(run_id, tags=batch)

    def log_artifact_to(self, run_id: str, path: str | Path, artifact_path: str | None = None):
        self.client.log_artifact(run_id, str(path), artifact_path)

    def log_artifacts_to(self, run_id: str, folder: str | Path, artifact_path: str | None = None):
        self.client.log_artifacts(run_id, str(folder), artifact_path)

    def clear_failure_reason(self, run_id: str) -> None:
        """Drop a reopened run's ``failure_reason``: it ended for that reason, and goes on now."""
        if "failure_reason" in self.client.get_run(run_id).data.tags:
            self.client.delete_tag(run_id, "failure_reason")

    def end_run(self, run_id: str, status: str, reason: str | None = None) -> None:
        """End a run by id (not the active one), with ``failure_reason`` when not FINISHED."""
        if reason:
            self.client.set_tag(run_id, "failure_reason", shorten(redact(reason), 5000))
        self.client.set_terminated(run_id, status=status)


SCHEMA_RACE_RETRIES = 8  # 18 s of waits in all: a fresh schema takes 1-3 s to create
SCHEMA_RACE_SIGNS = ("already exists", "alembic_version", "CircularDependencyError")


def _lost_schema_race(err: Exception) -> bool:
    """Whether ``err`` is what MLflow raises when another process created the same SQLite
    schema at the same time (a table it meant to create exists, or alembic found the version
    row already moved)."""
    text = f"{type(err).__name__}: {err}"
    return any(sign in text for sign in SCHEMA_RACE_SIGNS)


def require_existing_store(uri: str, what: str) -> None:
    """Refuse a SQLite store that does not exist yet when ``what`` (e.g. ``resume=<id>``) can
    only be found in one that does: opening it would create an empty store to say so."""
    store_file = sqlite_path(uri)
    if store_file is not None and not store_file.exists():
        raise TrackingError(
            f"{what}: there is no MLflow store at {store_file} (tracking.uri={redact(uri)}); "
            "pass the store the runs were recorded in (tracking.uri=sqlite:///<path>/mlflow.db)"
        )


def open_store(uri: str, *, http_timeout_s: float = 10.0) -> Tracker:
    """A :class:`Tracker` whose store answered (a fresh SQLite schema is created here, once)."""
    tracker = Tracker(uri, http_timeout_s=http_timeout_s)
    tracker.check_store()
    return tracker


def _cut_at_word(text: str, limit: int) -> str:
    """``text`` within ``limit`` characters, cut at a word boundary and marked ``...``."""
    if len(text) <= limit:
        return text
    cut = text[: limit - 3].rsplit(" ", 1)[0].rstrip(" ,;:(")
    return f"{cut}..."


def _signal_name(err: KeyboardInterrupt) -> str:
    """``SIGTERM`` / ``SIGHUP`` for :class:`~convnets.errors.Interrupted`, else Ctrl-C's."""
    return str(err) if isinstance(err, Interrupted) else "KeyboardInterrupt"


def describe_error(err: BaseException, limit: int = 160) -> str:
    """``err`` in a few words for a one-line message: its type and its first line, credentials
    dropped, cut at a word past ``limit`` characters."""
    lines = redact(str(err)).strip().splitlines()
    detail = _cut_at_word(lines[0], limit) if lines else ""
    return f"{type(err).__name__}{': ' + detail if detail else ''}"


STORE_DOWN_CODES = ("INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "DEADLINE_EXCEEDED")


def store_failure(err: BaseException) -> bool:
    """Whether ``err`` is the store not answering (no connection, a timeout, a server error
    such as its database gone) rather than a request it refused: MLflow's REST client wraps a
    failed connection in an ``INTERNAL_ERROR``; artifact uploads may raise ``requests``'s
    own errors."""
    import requests

    if isinstance(err, MlflowException):
        return err.error_code in STORE_DOWN_CODES
    return isinstance(err, requests.exceptions.ConnectionError | requests.exceptions.Timeout)


def failure_reason(err: BaseException) -> str:
    """Why a run failed, as its ``failure_reason`` tag and its ``error:`` line: our own error's
    line, else the exception's type and first line (TensorFlow's run to kilobytes of graph
    dump; the whole traceback is in the command's log)."""
    return str(err) if isinstance(err, ConvnetsError) else describe_error(err, limit=300)


def run_is_finished(run: Run) -> bool:
    return run.info.status == RunStatus.to_string(RunStatus.FINISHED)
