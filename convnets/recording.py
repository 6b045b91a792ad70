"""Where a training job is recorded: the :class:`Recorder` seam, with MLflow's and one in memory.

A job (:mod:`convnets.job`) tells its recorder what happened (the run began, its definition,
each epoch, its results, its model) and never talks to MLflow itself. :class:`MlflowRecorder`
is the record every command writes; :class:`MemoryRecorder` keeps the same record in this
process, for tests of what a job records without a store, and for a notebook that does not
want one.

The recorder is also the store a plan reads (``reproduce=``, ``resume=``, ``init_from=`` and
the experiment), so a plan and its record always agree on where runs are.
"""

from __future__ import annotations

import contextlib
import itertools
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Protocol

from omegaconf import DictConfig, OmegaConf

from convnets import liveness
from convnets.errors import ConvnetsError, TrackingError, command, shell_override, warn
from convnets.outbox import Epoch, Outbox, keep_unsent, upload_command
from convnets.sweep_files import is_parent, is_search_parent
from convnets.tracking import (
    CONFIG_ARTIFACT,
    EPOCH_METRICS,
    MODEL_URI_TAG,
    absolute_uri,
    describe_error,
    epoch_metrics,
    failure_reason,
    open_store,
    redact,
    require_existing_store,
    store_failure,
    ui_url,
    where_to_look,
)

if TYPE_CHECKING:
    from convnets.plan import Plan
    from convnets.tracking import Run as MlflowRun
    from convnets.tracking import Tracker


def resume_command(run_id: str, uri: str) -> str:
    """The command that continues run ``run_id``, with the store when it is not the default
    (else following it would open an empty ``mlflow.db``); the URI shown redacted."""
    from convnets.config import TrackingConfig

    hint = f"{command('train')} resume={run_id}"
    if uri != TrackingConfig.uri:
        hint += f" {shell_override('tracking.uri', redact(uri))}"
    return hint


def end_dead_runs(tracker: Tracker, experiment_id: str, uri: str, keep: str | None = None) -> None:
    """End KILLED, with the reason, the RUNNING runs of the experiment whose process is gone
    (:func:`convnets.liveness.dead_reason`: a training's, or every process sharing a sweep's
    parent), saying so in a warning line with how to continue; ``keep``: a run this command
    takes over."""
    running = tracker.client.search_runs(
        [experiment_id], "attributes.status = 'RUNNING'", max_results=1000
    )
    for run in running:
        reason = liveness.dead_reason(run.data.tags)
        if reason is None or run.info.run_id == keep:
            continue
        tracker.end_run(run.info.run_id, "KILLED", reason)
        tags = run.data.tags
        parent = tags.get("mlflow.parentRunId")
        what, hint = "run", ""
        if is_parent(tags):
            what = "sweep parent run"
            if is_search_parent(tags):
                hint = "; rerun the search's command to continue its study under this parent run"
        elif parent and is_search_parent(tracker.client.get_run(parent).data.tags):
            hint = (
                "; its search asks the trial again once it is stale "
                "(hydra.sweeper.stale_after_s): rerun the search's command then"
            )
        elif "checkpoint_dir" in tags:
            hint = f"; continue it with: {resume_command(run.info.run_id, uri)}"
        warn(f"{what} {run.info.run_id} was left RUNNING: {reason}; recorded KILLED{hint}")


@dataclass(frozen=True)
class Definition:
    """What a run is, recorded before it trains: params, text and JSON artifacts, tags, and the
    data it reads (``splits``: ``{split: (digest, number of examples)}``)."""

    params: dict[str, Any]
    texts: dict[str, str]
    dicts: dict[str, dict]
    tags: dict[str, str]
    data_name: str
    data_source: str
    splits: dict[str, tuple[str, int]]


@dataclass(frozen=True)
class Recorded:
    """A run as its recorder has it now."""

    metrics: dict[str, float]
    params: dict[str, str]
    tags: dict[str, str]

    @property
    def model_uri(self) -> str | None:
        return self.tags.get(MODEL_URI_TAG)


class Recorder(Protocol):
    """What a job needs from where it is recorded. ``run`` starts (or, resuming, reopens) the
    run and ends it FINISHED, FAILED with the reason, or KILLED on Ctrl-C; the other writes go
    to that run."""

    shown_uri: str

    # the store a plan reads
    def get_run(self, run_id: str, *, key: str = "run_id") -> MlflowRun: ...
    def load_config(self, run_id: str, *, key: str = "run_id") -> DictConfig: ...
    def experiment_id(self, name: str) -> str: ...

    # one run
    def run(
        self, plan: Plan, tags: Mapping[str, str]
    ) -> contextlib.AbstractContextManager[str]: ...
    def set_tags(self, tags: Mapping[str, Any]) -> None: ...
    def set_folder(self, folder: Path) -> None: ...  # the run's own: its checkpoints
    def log_definition(self, definition: Definition) -> None: ...
    def logged_epochs(self) -> set[int]: ...
    def log_epoch(self, epoch: int, logs: Mapping[str, float]) -> None: ...
    def log_metrics(self, metrics: Mapping[str, float]) -> None: ...
    def history(self) -> dict[str, list[float]]: ...
    def log_figure(self, figure: Any, name: str) -> None: ...
    def log_model(
        self, model: Any, *, input_example: Any, metadata: Mapping[str, Any]
    ) -> tuple[str, str]: ...  # named after the run; (model URI, model id)
    def recorded(self) -> Recorded: ...
    def failed_job(
        self, experiment_id: str, run_name: str, tags: Mapping[str, str],
        parent_run_id: str | None, params: Mapping[str, Any], reason: str,
    ) -> str: ...  # fmt: skip
    def where_to_look(self, experiment_id: str, run_id: str) -> str: ...
    def ui_url(self, experiment_id: str, run_id: str) -> str: ...


# ---------------------------------------------------------------- MLflow


class MlflowRecorder:
    """The MLflow record at ``tracking.uri``. The store is opened on first use, so a plan that
    refuses before it needs the store creates no store file.

    Training never waits on the store: each epoch's metrics go through an
    :class:`~convnets.outbox.Outbox`, whose thread sends them and, while the store does not
    answer, keeps them and tries again. Every other write or read of the run (its tags, its
    results, its history, its end) first waits until the store has every epoch, at most
    ``outage_wait_s``: the store answers again, or the epochs are kept in the run's folder
    (:data:`~convnets.outbox.UNSENT_FILE`) and the run stops with one :class:`TrackingError`
    line that names the file and the command that finishes the run.
    """

    def __init__(self, uri: str, *, http_timeout_s: float = 10.0, outage_wait_s: float = 120.0):
        self.uri = uri
        self.http_timeout_s = http_timeout_s
        self.outage_wait_s = outage_wait_s
        self.shown_uri = redact(uri)
        self._tracker: Tracker | None = None
        self.run_id: str | None = None
        self.run_name: str | None = None  # as the store named the run (a resume keeps its own)
        self.folder: Path | None = None  # the run's own (its checkpoints): unsent epochs go there
        self.unsent_path: Path | None = None  # the file they went to, once they did
        self._outbox: Outbox | None = None
        self._resumable = False  # the run's definition is recorded: resume= can finish it
        self._told = False  # a raised error line names the unsent file already

    @property
    def tracker(self) -> Tracker:
        if self._tracker is None:
            self._tracker = open_store(self.uri, http_timeout_s=self.http_timeout_s)
        return self._tracker

    def _store_holding(self, what: str) -> Tracker:
        """The store, to look ``what`` (``resume=<id>``) up in: a SQLite store that is not
        there yet is refused, not created to say the run is not in it."""
        if self._tracker is None:
            require_existing_store(self.uri, what)
        return self.tracker

    def get_run(self, run_id: str, *, key: str = "run_id") -> MlflowRun:
        return self._store_holding(f"{key}={run_id}").get_run(run_id, key=key)

    def load_config(self, run_id: str, *, key: str = "run_id") -> DictConfig:
        return self._store_holding(f"{key}={run_id}").load_config(run_id, key=key)

    def experiment_id(self, name: str) -> str:
        return self.tracker.experiment_id(name)

    @contextlib.contextmanager
    def run(self, plan: Plan, tags: Mapping[str, str]) -> Iterator[str]:
        """Start the run (ending first the runs of its experiment that a killed process left
        RUNNING), with its process's tags, a heartbeat and the epochs' outbox while it records;
        it ends once the store has every epoch. A store that stops answering while the run
        records is one :class:`TrackingError` line, with the command that finishes the run."""
        sweep = plan.context.sweep
        self._end_dead_runs(plan)
        self.run_id, self.unsent_path, self._told = None, None, False
        self._resumable = plan.resuming
        try:
            with self.tracker.run(
                experiment_id=plan.experiment_id,
                run_name=plan.run_name(),
                run_id=plan.source.run_id if plan.resuming else None,
                parent_run_id=sweep.parent_run_id if sweep else None,
                tags={**tags, **liveness.process_tags()},
            ) as active:
                self.run_id, self.run_name = active.info.run_id, active.info.run_name
                if plan.resuming:
                    self.tracker.clear_failure_reason(self.run_id)
                self._outbox = self._open_outbox(self.run_id)
                try:
                    with liveness.Heartbeat(self._beat):
                        yield self.run_id
                        self._send_all()
                except BaseException as err:
                    self._stop_sending(err)
                    raise
                else:
                    self._keep_unsent(0.0)  # every epoch sent: this only ends the thread
        except Exception as err:
            if self.run_id is None or isinstance(err, ConvnetsError) or not store_failure(err):
                raise
            raise self._lost(err) from err

    def _beat(self) -> None:
        with self.tracker.bounded():  # a beat that fails is skipped: no minutes of retries
            self.tracker.set_tags_on(self.run_id, {liveness.HEARTBEAT_TAG: str(int(time.time()))})

    # ------------------------------------------------------------ the epochs' outbox

    def _open_outbox(self, run_id: str) -> Outbox:
        def send(epochs: list[Epoch]) -> None:
            with self.tracker.bounded():  # each call tried once; the outbox tries again
                self.tracker.log_steps(
                    run_id, [(e.step, e.timestamp_ms, e.metrics) for e in epochs]
                )

        def failing(err: Exception) -> None:
            warn(
                f"tracking.uri={self.shown_uri}: the MLflow store stopped answering "
                f"({describe_error(err)}); training goes on, its epochs are kept and sent "
                "once the store answers again"
            )

        def recovered(count: int) -> None:
            print(
                f"tracking.uri={self.shown_uri} answers again: the {count} epochs it missed "
                "are sent",
                file=sys.stderr,
                flush=True,
            )

        return Outbox(send, failing=failing, recovered=recovered)

    def _send_all(self) -> None:
        """Wait until the store has every epoch, at most ``outage_wait_s``; past that, keep
        them in the run's folder and raise the line that says so."""
        if self._outbox is not None and not self._outbox.flush(self.outage_wait_s):
            raise self._lost(self._outbox.error, waited=True)

    def _keep_unsent(self, wait_s: float) -> Path | None:
        """Close the outbox, its epochs given ``wait_s`` more; those still unsent appended to
        the run's unsent file. The file, or None when the store has every epoch."""
        if self._outbox is not None:
            unsent, self._outbox = self._outbox.close(wait_s), None
            folder = self.folder if self.folder is not None else Path.cwd()
            try:
                if unsent:
                    uri = absolute_uri(self.uri)
                    self.unsent_path = keep_unsent(folder, self.run_id, uri, unsent)
            except OSError as err:  # a full disk: the error under way matters more
                warn(
                    f"run {self.run_id}: {len(unsent)} epochs the MLflow store did not "
                    f"get could not be kept in {folder} ({err.strerror or err}); resume= sends "
                    "them again from the checkpoint"
                )
        return self.unsent_path

    def _stop_sending(self, err: BaseException) -> None:
        """The run ends with ``err``: its epochs get a moment (none while the store fails),
        the rest go to the run's folder, and a warning line says so unless the error's own
        line does."""
        failing = self._outbox is not None and self._outbox.error is not None
        path = self._keep_unsent(0.0 if failing else self.http_timeout_s)
        told = self._told or (isinstance(err, Exception) and store_failure(err))
        if path is not None and not told:
            warn(
                f"run {self.run_id}: the MLflow store did not get every epoch; they "
                f"are kept in {path}; send them with: {upload_command(path)}"
            )

    def _lost(self, cause: BaseException | None, *, waited: bool = False) -> TrackingError:
        """The one line of a store that stopped answering while run ``run_id`` recorded."""
        path = self._keep_unsent(0.0)
        self._told = True
        when = (
            f"did not answer at the end of run {self.run_id} within "
            f"tracking.outage_wait_s={self.outage_wait_s:g}"
            if waited
            else f"stopped answering during run {self.run_id}"
        )
        why = f" ({describe_error(cause)})" if cause is not None else ""
        # SQLite's own words for ENOSPC, wrapped by SQLAlchemy and MLflow as text only.
        full = cause is not None and "database or disk is full" in str(cause)
        if full:
            when, why = f"ran out of disk space during run {self.run_id}", ""
        answers = "once its disk has room" if full else "once it answers"
        if self._resumable:
            fix = f"{answers}, finish the run with: {resume_command(self.run_id, self.uri)}"
            if path is not None:
                fix += f" (which sends them too), or send only them with: {upload_command(path)}"
        else:
            fix = f"{answers}, run the command again"
        kept = f"; the epochs it did not get are kept in {path}" if path is not None else ""
        return TrackingError(
            f"tracking.uri={self.shown_uri}: the MLflow store {when}{why}{kept}; {fix}"
        )

    def _end_dead_runs(self, plan: Plan) -> None:
        """:func:`end_dead_runs` in the plan's experiment; a run resumed now is its own."""
        keep = plan.source.run_id if plan.resuming else None
        end_dead_runs(self.tracker, plan.experiment_id, self.uri, keep=keep)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self._send_all()
        self.tracker.set_tags(tags)

    def set_folder(self, folder: Path) -> None:
        self.folder = Path(folder).absolute()  # named in lines a user copies

    def log_definition(self, definition: Definition) -> None:
        self.tracker.log_params(definition.params)
        for name, text in definition.texts.items():
            self.tracker.log_text(text, name)
        for name, content in definition.dicts.items():
            self.tracker.log_dict(content, name)
        self.tracker.set_tags(definition.tags)
        self.tracker.log_data_inputs(
            self.run_id,
            name=definition.data_name,
            source=definition.data_source,
            splits=definition.splits,
        )
        self._resumable = True

    def logged_epochs(self) -> set[int]:
        queued = {epoch.step for epoch in self._outbox.pending()} if self._outbox else set()
        logged = {step for _, step in self.tracker.metric_steps(self.run_id, ["loss"])}
        return logged | queued

    def log_epoch(self, epoch: int, logs: Mapping[str, float]) -> None:
        """Queued for the outbox's thread: returns at once, whether the store answers or not."""
        self._outbox.put(Epoch.now(epoch, epoch_metrics(logs)))

    def log_metrics(self, metrics: Mapping[str, float]) -> None:
        self._send_all()
        self.tracker.log_metrics(metrics)

    def history(self) -> dict[str, list[float]]:
        self._send_all()
        return self.tracker.history(self.run_id)

    def log_figure(self, figure: Any, name: str) -> None:
        self._send_all()
        self.tracker.log_figure(figure, name)

    def log_model(
        self, model: Any, *, input_example: Any, metadata: Mapping[str, Any]
    ) -> tuple[str, str]:
        self._send_all()
        return self.tracker.log_model(
            model, name=self.run_name, input_example=input_example, metadata=metadata
        )

    def recorded(self) -> Recorded:
        run = self.tracker.get_run(self.run_id)
        return Recorded(dict(run.data.metrics), dict(run.data.params), dict(run.data.tags))

    def failed_job(
        self,
        experiment_id: str,
        run_name: str,
        tags: Mapping[str, str],
        parent_run_id: str | None,
        params: Mapping[str, Any],
        reason: str,
    ) -> str:
        run_id = self.tracker.create_run(
            experiment_id, run_name=run_name, tags=dict(tags), parent_run_id=parent_run_id
        )
        self.tracker.log_params_to(run_id, params)
        self.tracker.end_run(run_id, "FAILED", reason)
        return run_id

    def where_to_look(self, experiment_id: str, run_id: str) -> str:
        return where_to_look(self.shown_uri, experiment_id, run_id)

    def ui_url(self, experiment_id: str, run_id: str) -> str:
        return ui_url(self.shown_uri, experiment_id, run_id)


# ---------------------------------------------------------------- in memory


@dataclass
class MemoryRun:
    """One run as :class:`MemoryRecorder` keeps it."""

    run_id: str
    experiment_id: str
    run_name: str
    status: str = "RUNNING"
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    epochs: dict[int, dict[str, float]] = field(default_factory=dict)  # epoch -> its metrics
    artifacts: dict[str, Any] = field(default_factory=dict)  # name -> text, dict, figure, model

    def as_mlflow_run(self) -> Any:
        """The attributes of an MLflow ``Run`` a plan reads (``info``, ``data``)."""
        return SimpleNamespace(
            info=SimpleNamespace(
                run_id=self.run_id,
                run_name=self.run_name,
                experiment_id=self.experiment_id,
                status=self.status,
            ),
            data=SimpleNamespace(tags=self.tags, params=self.params, metrics=self.metrics),
        )


class MemoryRecorder:
    """The record of every run this recorder saw, kept in this process (``runs``)."""

    shown_uri = "memory:"

    def __init__(self) -> None:
        self.runs: dict[str, MemoryRun] = {}
        self.experiments: dict[str, str] = {}
        self.current: MemoryRun | None = None
        self._ids = itertools.count(1)

    def get_run(self, run_id: str, *, key: str = "run_id") -> MlflowRun:
        if run_id not in self.runs:
            raise TrackingError(f"{key}={run_id}: no such run in this process's memory record")
        return self.runs[run_id].as_mlflow_run()

    def load_config(self, run_id: str, *, key: str = "run_id") -> DictConfig:
        self.get_run(run_id, key=key)
        return OmegaConf.create(self.runs[run_id].artifacts[CONFIG_ARTIFACT])

    def experiment_id(self, name: str) -> str:
        return self.experiments.setdefault(name, str(len(self.experiments) + 1))

    @contextlib.contextmanager
    def run(self, plan: Plan, tags: Mapping[str, str]) -> Iterator[str]:
        if plan.resuming:
            run = self.runs[plan.source.run_id]
            run.status = "RUNNING"
            run.tags.pop("failure_reason", None)
        else:
            run_id = f"{next(self._ids):032x}"
            run = self.runs[run_id] = MemoryRun(run_id, plan.experiment_id, plan.run_name())
        run.tags.update({key: str(value) for key, value in tags.items()})
        sweep = plan.context.sweep
        if sweep is not None:
            run.tags["mlflow.parentRunId"] = sweep.parent_run_id
        self.current = run
        try:
            yield run.run_id
        except KeyboardInterrupt as err:
            run.status, run.tags["failure_reason"] = "KILLED", f"interrupted ({err})"
            raise
        except BaseException as err:
            run.status, run.tags["failure_reason"] = "FAILED", failure_reason(err)
            raise
        else:
            run.status = "FINISHED"

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self.current.tags.update({key: str(value) for key, value in tags.items()})

    def set_folder(self, folder: Path) -> None:
        pass  # nothing is ever left unsent in memory

    def log_definition(self, definition: Definition) -> None:
        self.current.params.update({key: str(v) for key, v in definition.params.items()})
        self.current.artifacts.update(definition.texts)
        self.current.artifacts.update(definition.dicts)
        self.set_tags(definition.tags)

    def logged_epochs(self) -> set[int]:
        return set(self.current.epochs)

    def log_epoch(self, epoch: int, logs: Mapping[str, float]) -> None:
        self.current.epochs[epoch] = epoch_metrics(logs)
        self.current.metrics.update(self.current.epochs[epoch])  # the latest, as MLflow shows

    def log_metrics(self, metrics: Mapping[str, float]) -> None:
        self.current.metrics.update({key: float(value) for key, value in metrics.items()})

    def history(self) -> dict[str, list[float]]:
        epochs = [self.current.epochs[e] for e in sorted(self.current.epochs)]
        keys = [key for key in EPOCH_METRICS if any(key in logs for logs in epochs)]
        return {key: [logs[key] for logs in epochs if key in logs] for key in keys}

    def log_figure(self, figure: Any, name: str) -> None:
        self.current.artifacts[name] = figure

    def log_model(
        self, model: Any, *, input_example: Any, metadata: Mapping[str, Any]
    ) -> tuple[str, str]:
        name = self.current.run_name
        self.current.artifacts[name] = model
        return f"memory:/{self.current.run_id}/{name}", f"m-{self.current.run_id}"

    def recorded(self) -> Recorded:
        run = self.current
        return Recorded(dict(run.metrics), dict(run.params), dict(run.tags))

    def failed_job(
        self,
        experiment_id: str,
        run_name: str,
        tags: Mapping[str, str],
        parent_run_id: str | None,
        params: Mapping[str, Any],
        reason: str,
    ) -> str:
        run_id = f"{next(self._ids):032x}"
        self.runs[run_id] = MemoryRun(
            run_id,
            experiment_id,
            run_name,
            status="FAILED",
            params={key: str(v) for key, v in params.items()},
            tags={**tags, "failure_reason": reason},
        )
        if parent_run_id is not None:
            self.runs[run_id].tags["mlflow.parentRunId"] = parent_run_id
        return run_id

    def where_to_look(self, experiment_id: str, run_id: str) -> str:
        return f"in memory: recorder.runs[{run_id!r}]"

    def ui_url(self, experiment_id: str, run_id: str) -> str:
        return f"memory:/{run_id}"
