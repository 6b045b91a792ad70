"""Sweeps: one MLflow parent run per Hydra multirun, every job nested under it.

:class:`MlflowSweepCallback` is registered in ``configs/train.yaml`` (``hydra.callbacks``),
so it runs for every ``python train.py -m ...`` whatever the sweeper (basic grid, Optuna)
or launcher (basic: jobs in this process; joblib: loky workers; submitit: other processes
or machines; fresh_process: a new process per job).

Why a callback and a file: the callback's ``on_multirun_start`` runs once, in the launching
process, before any job starts. It opens the store (for sqlite: creates the schema) and the
experiment there, which removes the races of several fresh processes doing both at once,
creates the parent run, and writes the sweep's :class:`~convnets.sweep_files.SweepContext`
(``mlflow_sweep.json``). Every job, wherever it runs, reads it through :func:`sweep_context`
and starts its own run with the sweep's ``experiment_id`` and ``parent_run_id`` (the MLflow UI
nests it), named by :func:`job_run_name`. When the sweep ends, ``on_multirun_end`` writes the
summary (CSV + figure + best job) on the parent and ends it. While the sweep runs, its
process records itself on the parent and beats there (:class:`convnets.liveness.SharedRun`;
every process of a search shares the study's one parent), so a sweep killed outright
(SIGKILL, a lost machine) does not leave its parent RUNNING: the next command that records in
the experiment ends it KILLED once no process of it is left.

How a job's run ends is decided here, not in a launcher: a job ends its own run (FINISHED,
FAILED or KILLED, :mod:`convnets.job`); a job that could not (its process died, or the sweep
was stopped first) reaches ``on_job_end`` as a failed :class:`~hydra.core.utils.JobReturn`,
and the callback ends the runs it left RUNNING (or, if it died before it had one, records a
FAILED run for it), so the summary counts every job.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import io
import logging
import math
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict

from convnets.cli import report_user_errors
from convnets.config import RUN_ID_KEYS, override_texts
from convnets.errors import ConfigError
from convnets.sweep_files import (
    PARENT_ROLE,
    ROLE_TAG,
    SWEEP_LOCK,
    SearchResults,
    SweepContext,
    is_parent,
)
from convnets.sweep_files import experiment_name as experiment_name  # the job names it so

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

SUMMARY_DIR = "summary"  # artifact folder on the parent run
_MAX_TAG = 5000  # MLflow allows 8000 characters; the complete definition is in sweep.yaml

# Per-job columns of the summary CSV: MLflow search_runs column -> CSV column.
SUMMARY_COLUMNS = {
    "tags.sweep_job": "job",
    "run_id": "run_id",
    "tags.mlflow.runName": "run_name",
    "status": "status",
    "tags.sweep_overrides": "overrides",
    # The validation accuracy of the epoch each job tested (the restored best one under
    # trainer.restore_best): a search's default objective, and what the best job is picked by.
    "metrics.selected_val_accuracy": "selected_val_accuracy",
    "metrics.test_accuracy": "test_accuracy",
    "metrics.param_count": "param_count",
    "metrics.receptive_field": "receptive_field",
    "metrics.effective_receptive_field": "effective_receptive_field",
    "metrics.macs": "macs",
    "metrics.train_time_s": "train_time_s",
    "tags.failure_reason": "failure_reason",
    "tags.pruned": "pruned",  # stopped early by a search's pruner: not a candidate for best
}
BEST_BY = "selected_val_accuracy"  # the summary column the parent's best job maximises


def sweep_context(hydra_cfg: DictConfig) -> SweepContext | None:
    """The sweep a multirun job belongs to (``hydra_cfg``: the job's ``hydra`` config node, as
    the entry point has it), or ``None`` when its ``mlflow_sweep.json`` is missing."""
    context = SweepContext.read(
        hydra_cfg.sweep.dir,
        job_num=hydra_cfg.job.num,
        overrides=override_texts(hydra_cfg.overrides.task),
    )
    if context is None:
        log.warning(
            "%s not found: this job is recorded on its own, not under a sweep",
            SweepContext.path(hydra_cfg.sweep.dir),
        )
    return context


def sweep_overrides(config: DictConfig) -> dict[str, str]:
    """The sweep's definition, key -> value: ``hydra.sweeper.params``, then the command line.

    Later entries win, as in the sweepers: a command-line ``key=choice(1,3)`` replaces that
    key's range from the config.
    """
    params = OmegaConf.select(config, "hydra.sweeper.params") or {}
    overrides = [f"{key}={value}" for key, value in params.items()]
    overrides += override_texts(config.hydra.overrides.task)
    return dict(override.split("=", 1) for override in overrides if "=" in override)


def swept_keys(definition: dict[str, str]) -> tuple[str, ...]:
    """The keys a sweep varies (``3,5``, ``choice(...)``, ``range(...)``, ``interval(...)``),
    in the order of its definition; fixed values are not among them."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    keys = []
    for key, value in definition.items():
        try:
            (override,) = parser.parse_overrides([f"{key}={value}"])
        except Exception:  # noqa: BLE001 - not a sweep the parser knows: not swept
            continue
        if override.is_sweep_override():
            keys.append(_bare_key(key))
    return tuple(keys)


# ---------------------------------------------------------------- run names

# Runs are told apart in MLflow's UI by their names, which it cuts to the width of a column,
# and a LoggedModel takes its run's name: both must be short, and distinct within a sweep.
RUN_NAME_LIMIT = 60
NAME_CUT = "\u2026"  # ends a name cut to RUN_NAME_LIMIT; the overrides are whole in the tags
# Overrides that say where or how a run is recorded, not what it is: never part of a name.
NOT_IN_NAME = ("experiment", "hparams_search", "reproduce", "resume", "tracking")
NOT_IN_NAME += ("trainer.verbose",)
# The last part of a key -> what a name shows for it.
_SHORT_KEYS = {
    "kernel_size": "k",
    "dilation": "d",
    "width": "w",
    "stride": "s",
    "filters": "f",
    "dropout": "drop",
    "batch_norm": "bn",
    "activation": "act",
    "padding": "pad",
    "pool_size": "psize",
    "pool_stride": "pstride",
    "weight_decay": "wd",
    "momentum": "mom",
    "batch_size": "bs",
    "epochs": "ep",
    "label_smoothing": "ls",
    "warmup_epochs": "warmup",
    "min_lr_fraction": "min_lr",
    "schedule": "sched",
    "optimizer": "opt",
}


def job_run_name(context: SweepContext) -> str:
    """``j03 k=5 d=2`` (grid job 3) or ``t05 lr=5.5e-3 k=3 w=1`` (search trial 5): the job's
    number, then the values of the keys the sweep varies, shortened (:func:`short_override`);
    at most :data:`RUN_NAME_LIMIT` characters. The number keeps names distinct whatever the
    rounding does; no model or dataset: the sweep's experiment and parent run say those.
    Without known swept keys, every override that says what is trained."""
    from convnets.tracking import redact  # a credential in an override never names a run

    shown = [o for o in context.overrides if not _not_in_name(o, NOT_IN_NAME)]
    if context.swept_keys:
        shown = [o for o in shown if _bare_key(o.split("=", 1)[0]) in context.swept_keys]
    number = "" if context.job_num is None else f"{context.job_num:02d}"
    digits = dict(context.name_digits)
    shown = [short_override(o, digits.get(_bare_key(o.split("=", 1)[0]), 2)) for o in shown]
    words = [f"{'t' if context.search else 'j'}{number}", *shown]
    return fit_name([redact(word) for word in words])


def short_override(override: str, digits: int = 2) -> str:
    """``model.layer_defaults.kernel_size=5`` -> ``k=5``, ``optimizer.lr=0.0055123`` ->
    ``lr=5.5e-3`` (floats to ``digits`` significant digits), ``model.layers.0.stride=2`` ->
    ``l0.s=2``, a stack ``[{filters:16},{filters:32,pool:max}]`` -> ``16-32pmax``."""
    key, sep, value = override.partition("=")
    if not sep:
        return key
    return f"{_short_key(key)}={_short_value(value, digits)}"


def name_digits(definition: dict[str, str]) -> tuple[tuple[str, int], ...]:
    """The significant digits each numeric key of a grid needs in its jobs' names to tell its
    values apart (``lr=0.00123,0.00124``: 3), where 2 do not. A search's ranges are not
    enumerable: its trials keep 2 (their numbers tell them apart)."""
    needed = []
    for key, value in definition.items():
        try:
            values = {float(v) for v in _grid_values(key, value) or ()}
        except ValueError:  # not a grid of numbers
            continue
        digits = next(
            (d for d in range(2, 16) if len({_significant(v, d) for v in values}) == len(values)),
            16,
        )
        if digits > 2:
            needed.append((_bare_key(key), digits))
    return tuple(needed)


def fit_name(words: Sequence[str], sep: str = " ", limit: int = RUN_NAME_LIMIT) -> str:
    """``words`` joined by ``sep``, within ``limit`` characters: as many whole words as fit,
    then a mark; cut inside a word only when that word alone would leave little to read."""
    name = sep.join(words)
    if len(name) <= limit:
        return name
    room = limit - len(NAME_CUT)
    kept = words[0]
    for word in words[1:]:
        if len(kept) + len(sep) + len(word) > room:
            break
        kept += sep + word
    if len(kept) <= room // 2:
        kept = name[:room]
    return kept.rstrip(" ,") + NAME_CUT


def _not_in_name(override: str, excluded: Iterable[str]) -> bool:
    key = _bare_key(override.split("=", 1)[0])
    return any(key == x or key.startswith(f"{x}.") for x in excluded)


def _bare_key(key: str) -> str:
    return key.strip().lstrip("+~")


def _short_key(key: str) -> str:
    parts = _bare_key(key).split(".")
    last = parts[-1]
    if last == "name" and len(parts) > 1:  # optimizer.name=sgd -> opt=sgd
        last = parts[-2]
    short = _SHORT_KEYS.get(last, last)
    index = next((p for p in reversed(parts[:-1]) if p.isdigit()), None)
    return f"l{index}.{short}" if index is not None else short  # one layer of model.layers


def _short_value(value: str, digits: int = 2) -> str:
    text = value.strip()
    if re.fullmatch(r"[+-]?\d+", text):
        return text
    try:
        number = float(text)
    except ValueError:
        return _short_stack(text) if text.startswith("[{") else text
    return _rounded(number, digits)


def _short_values(key: str, value: str, digits: int) -> str:
    """A grid's values as its jobs' names show them (``0.00123456,0.0123`` ->
    ``1.2e-3,1.2e-2``); a range or anything else as given."""
    values = None if value.strip().startswith("range(") else _grid_values(key, value)
    return value if values is None else ",".join(_short_value(v, digits) for v in values)


def _grid_values(key: str, value: str) -> list[str] | None:
    """The values a grid sweeps ``key`` over (``3,5``, ``choice(...)``, ``range(...)``), as
    given; None for anything else (a fixed value, a search's ``interval``)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        return list(
            OverridesParser.create().parse_override(f"{key}={value}").sweep_string_iterator()
        )
    except HydraException:
        return None


def _significant(x: float, digits: int) -> float:
    return float(f"{x:.{digits - 1}e}")


def _rounded(x: float, digits: int = 2) -> str:
    """``digits`` significant digits: plain from 0.1 to 999 (``0.25``, ``1``, ``120``), else
    compact scientific (``5.5e-3``, ``1e-4``, ``2.5e4``; ``1.23e-3`` with 3)."""
    if x == 0 or not math.isfinite(x):
        return f"{x:g}"
    mantissa, exponent = f"{x:.{digits - 1}e}".split("e")
    if -2 < int(exponent) < 3:
        return f"{_significant(x, digits):.{max(6, digits)}g}"
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def _short_stack(text: str) -> str:
    """``[{filters:16},{filters:32,pool:max}]`` -> ``16-32pmax``: a stack by its layers, each
    its filters then its other keys (``s2``, ``d2``, ``k5``, ``pmax``); as given if not one."""
    layers = re.findall(r"\{([^{}]*)\}", text)
    if not layers or any("[" in layer for layer in layers):  # [kh, kw] pairs: kept as given
        return text
    shown = []
    for layer in layers:
        fields = dict(
            item.split(":", 1) for item in layer.replace(" ", "").split(",") if ":" in item
        )
        if "filters" not in fields:
            return text
        rest = "".join(
            f"{'p' if k == 'pool' else _SHORT_KEYS.get(k, k)}{v}"
            for k, v in fields.items()
            if k != "filters"
        )
        shown.append(fields["filters"] + rest)
    return "-".join(shown)


# ---------------------------------------------------------------- the callback


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


def check_launcher(config: DictConfig) -> None:
    """Refuse a launcher that cannot start a job on this machine, before the parent run
    exists: submitit's Slurm launcher outside a Slurm cluster fails only when it submits."""
    target = str(OmegaConf.select(config, "hydra.launcher._target_", default=""))
    if target.endswith("SlurmLauncher") and shutil.which("srun") is None:
        raise ConfigError(
            "hydra/launcher=slurm: this machine is not on a Slurm cluster (no srun on PATH); "
            "run the command on the cluster's login node, or run the sweep here with "
            "hydra/launcher=submitit_local (or leave the launcher out)"
        )
    grace_s = OmegaConf.select(config, "hydra.launcher.stop_grace_s", default=None)
    if grace_s is not None and not (isinstance(grace_s, int | float) and grace_s >= 0):
        shown = f"{grace_s:g}" if isinstance(grace_s, int | float) else grace_s
        raise ConfigError(
            f"hydra.launcher.stop_grace_s={shown}: the seconds a stopped job gets to record "
            "its end; give 0 or more"
        )
    # Each parallel launcher refuses these only once it launches, after the parent run exists.
    n_jobs = OmegaConf.select(config, "hydra.launcher.n_jobs", default=None)
    if n_jobs is None:
        return
    fresh = target.endswith("FreshProcessLauncher")
    if (
        not isinstance(n_jobs, int)
        or isinstance(n_jobs, bool)
        or n_jobs == 0
        or (fresh and n_jobs < 0)
    ):
        counts = "1 or more" if fresh else "1 or more, or -1 for every core (joblib's count)"
        raise ConfigError(
            f"hydra.launcher.n_jobs={n_jobs}: how many jobs run at once; give {counts}"
        )


def check_first_job(config: DictConfig, definition: dict[str, str]) -> None:
    """Compose a sweep's first point (``definition``: :func:`sweep_overrides`; a grid's first
    job, a search space's first choice or the start of its interval) before the parent run
    exists: a misspelt swept key (``trainer.sed=1,2``, ``model.nosuch=choice(1,2)``) or a value
    of the wrong type fails every job alike, and Hydra finds it only when it composes a job.
    Only what fails for all jobs: a job whose values are impossible (a stack too small for
    the images) is a bad point, recorded FAILED while the others run."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from convnets.checks import check_known_keys
    from convnets.cli import config_error_line

    parsed = OverridesParser.create().parse_overrides(
        [f"{key}={value}" for key, value in definition.items()]
    )

    def first_value(o: Any) -> str | None:
        if o.is_interval_sweep():  # a search's continuous range: its start
            return str(o.value().start)
        return next(iter(o.sweep_string_iterator()), None)  # None: empty, the sweeper says so

    first = []
    for o in parsed:
        if not o.is_sweep_override():
            first.append(o.input_line)
        elif (value := first_value(o)) is not None:
            first.append(f"{o.get_key_element()}={value}")
    try:
        job = GlobalHydra.instance().config_loader().load_sweep_config(config, first)
    except Exception as err:  # noqa: BLE001 - Hydra's composition errors
        line = config_error_line(err, first)
        if line is None:
            raise
        raise ConfigError(line) from err
    with open_dict(job):
        del job["hydra"]
    check_known_keys(job)


def _refuse_an_ended_sweeps_folder(sweep_dir: Path, search: bool) -> None:
    """A grid sweep given a folder where another sweep ran (its ``mlflow_sweep.json`` is
    there) would write its jobs' folders and its summary over that sweep's. A search given
    a search's folder goes on: resumed there, it continues the same study and parent."""
    try:
        earlier = SweepContext.read(sweep_dir)
        if earlier is None or (search and earlier.search):
            return
        parent = earlier.parent_run_id
    except (OSError, ValueError, TypeError):  # damaged: a sweep's folder all the same
        parent = f"unknown ({SweepContext.path(sweep_dir).name} cannot be read)"
    raise ConfigError(
        f"hydra.sweep.dir={sweep_dir}: holds the jobs and summary of the sweep whose parent "
        f"run is {parent}, which this sweep would write over; give this one its "
        "own folder (leave hydra.sweep.dir out: every sweep gets a new folder)"
    )


class MlflowSweepCallback(Callback):
    """Parent MLflow run for a multirun: created before the fan-out, summarised at the end;
    the runs of jobs that could not end them, ended."""

    def __init__(self) -> None:
        self._open_parent: tuple[str, str] | None = None  # (tracking_uri, run_id) until ended
        self._folder_lock: Path | None = None  # this sweep's hold on its folder
        self._made_folders: list[Path] = []  # the folders holding it created
        self._shared: Any = None  # liveness.SharedRun: this process's part in the parent

    def __getstate__(self) -> dict[str, Any]:
        # A parallel launcher (joblib, submitit, fresh_process) pickles the callbacks with
        # each job. The sweeping process's part in the parent (a heartbeat thread and its
        # lock) stays with that process: a job's copy takes no part in the parent.
        return {**self.__dict__, "_shared": None}

    @_stop_sweep_on_error
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        definition = sweep_overrides(config)
        check_launcher(config)
        check_first_job(config, definition)
        self._hold_folder(Path(config.hydra.sweep.dir).resolve())
        try:
            self._start(config, definition)
        except BaseException:  # refused (no such run, no store, a bad search) or stopped
            self._give_up_folder()
            raise

    def _start(self, config: DictConfig, definition: dict[str, str]) -> None:
        """The parent run, found or created, and the sweep's context file for its jobs."""
        from convnets.search_storage import study_ref
        from convnets.tracking import Tracker, require_existing_store

        study = study_ref(config)  # checks an Optuna search before any run exists
        _refuse_an_ended_sweeps_folder(Path(config.hydra.sweep.dir).resolve(), study is not None)
        run_ids = {
            key: str(config[key])
            for key in RUN_ID_KEYS
            if OmegaConf.select(config, key, default=None)
        }
        for key, run_id in run_ids.items():  # looked up, not recorded into: no new store
            require_existing_store(config.tracking.uri, f"{key}={run_id}")
        tracker = Tracker(config.tracking.uri, http_timeout_s=config.tracking.http_timeout_s)
        tracker.check_store()  # first contact: sqlite creates its schema here, once
        original_experiment = None  # a reproduction goes beside the original, as one run's
        for key, run_id in run_ids.items():  # every job would fail to find it
            found = tracker.get_run(run_id, key=key)
            if key == "reproduce":
                original_experiment = found.info.experiment_id
                if is_parent(found.data.tags):  # a whole study again
                    tracker.finished_study_jobs(found)  # none: refused, no parent made
        digits = () if study is not None else name_digits(definition)
        if study is None:
            experiment_id = (
                original_experiment
                if original_experiment is not None and not config.tracking.experiment
                else tracker.experiment_id(experiment_name(config))
            )
            run_id = self._create_parent(
                tracker, config, experiment_id, definition, False, digits=digits
            )
        else:
            experiment_id, run_id = self._study_parent(tracker, config, definition, study)
        self._open_parent = (config.tracking.uri, run_id)
        mark_stopped(None)  # a new sweep in this process: not stopped (yet)
        # If the sweep dies (Optuna raising, Ctrl-C), on_multirun_end never runs.
        atexit.register(self._end_abandoned_parent)
        self._join_parent(tracker, experiment_id, run_id)

        context = SweepContext(
            config.tracking.uri,
            experiment_id,
            run_id,
            study is not None,
            swept_keys(definition),
            name_digits=digits,
        )
        context.write(Path(config.hydra.sweep.dir).resolve())  # before any job reads it
        log.info("sweep: MLflow parent run %s in experiment %s", run_id, experiment_id)

    def _hold_folder(self, sweep_dir: Path) -> None:
        """Hold the sweep's folder while it runs: a second live sweep given the same
        ``hydra.sweep.dir`` would overwrite this one's ``mlflow_sweep.json`` under its jobs
        (their runs would land under the other's parent) and its summary."""
        from convnets import folder_lock

        # deepest first: what _give_up_folder may remove again
        self._made_folders = [p for p in (sweep_dir, *sweep_dir.parents) if not p.exists()]
        try:
            self._folder_lock = folder_lock.claim(sweep_dir, SWEEP_LOCK)
        except folder_lock.FolderHeld as err:
            raise ConfigError(
                f"hydra.sweep.dir={sweep_dir}: another sweep runs in this folder ({err.holder}); "
                "give this one its own (leave hydra.sweep.dir out: every sweep gets a new "
                f"folder), or wait for that one to end (if it is gone for good, delete {err.lock})"
            ) from None
        except OSError as err:  # a file in the way, no permission, a full disk
            raise ConfigError(
                f"hydra.sweep.dir={sweep_dir}: the sweep's folder cannot be created there "
                f"({err.strerror or type(err).__name__}: {err.filename}); pick another folder"
            ) from None
        atexit.register(self._release_folder)

    def _join_parent(self, tracker: Any, experiment_id: str, run_id: str) -> None:
        """Take part in the parent run: this process's tags and a heartbeat on it while the
        sweep runs (a search's parent may be shared by several processes: each records
        itself), without the reason a past end left on a reopened one; then end the runs of
        the experiment whose process is gone, as a training does."""
        from convnets import liveness
        from convnets.recording import end_dead_runs

        tracker.clear_failure_reason(run_id)
        self._shared = liveness.SharedRun(tracker, run_id).join()
        end_dead_runs(tracker, experiment_id, tracker.uri, keep=run_id)

    def _leave_parent(self) -> bool:
        """Stop beating on the parent and drop this process's tag from it; whether another
        live process still shares it (then that one ends it)."""
        shared, self._shared = self._shared, None
        if shared is None:
            return False
        try:
            return shared.leave()
        except Exception:  # noqa: BLE001 - the store is gone: ending the parent says so
            return False

    def _release_folder(self) -> None:
        if self._folder_lock is not None:
            self._folder_lock.unlink(missing_ok=True)
            self._folder_lock = None

    def _give_up_folder(self) -> None:
        """A sweep that never started leaves no folder behind: its lock goes, then the
        folders claiming it made, as long as they are empty."""
        self._release_folder()
        for folder in self._made_folders:
            try:
                folder.rmdir()
            except OSError:  # not empty (another sweep's date folder): kept
                break

    def _study_parent(
        self, tracker: Any, config: DictConfig, definition: dict, study: Any
    ) -> tuple[str, str]:
        """(experiment id, parent run id) of a search: the study's parent, reopened, or a new
        one this process claims for the study. Processes that start the same study at once
        each create a candidate; one claim wins, the others delete theirs and join it."""
        from convnets import study_parent

        known = study.parent_run_id
        experiment_id = tracker.reopen_run(known) if known else None
        if experiment_id is not None:  # a resumed search, or one another process runs now
            if study_parent.claimed(study.storage_url, study.study_id, study.name) is None:
                known = study_parent.claim(study.storage_url, study.study_id, study.name, known)
            return tracker.reopen_run(known) or experiment_id, known
        experiment_id = tracker.experiment_id(experiment_name(config))
        candidate = self._create_parent(tracker, config, experiment_id, definition, True)
        if known is None:
            run_id = study_parent.claim(study.storage_url, study.study_id, study.name, candidate)
        else:  # the remembered parent was deleted from the tracking store
            run_id = study_parent.replace(study.storage_url, study.study_id, known, candidate)
        if run_id != candidate:
            tracker.delete_run(candidate)
            log.info("sweep: joined study %s's parent run %s", study.name, run_id)
            experiment_id = tracker.reopen_run(run_id) or experiment_id
        return experiment_id, run_id

    @staticmethod
    def _create_parent(
        tracker: Any,
        config: DictConfig,
        experiment_id: str,
        overrides: dict,
        search: bool,
        digits: tuple[tuple[str, int], ...] = (),
    ) -> str:
        """The sweep's parent run, named by what it varies (``digits``: :func:`name_digits`)."""
        from convnets.tracking import redact, shorten

        definition = redact(" ".join(f"{key}={value}" for key, value in overrides.items()))
        sweep_dir = Path(config.hydra.sweep.dir).resolve()
        varied = swept_keys(overrides)
        if search:  # its ranges are long: the keys it searches
            words = ["search", *(_short_key(key) for key in varied)]
        else:
            shown = dict(digits)
            words = [
                "sweep",
                *(
                    f"{_short_key(k)}={_short_values(k, overrides[k], shown.get(k, 2))}"
                    for k in varied
                ),
            ]
        run_id = tracker.create_run(
            experiment_id,
            run_name=fit_name([redact(word) for word in words]),
            tags={
                ROLE_TAG: PARENT_ROLE,
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
        if OmegaConf.select(config, "hydra.mode") != RunMode.MULTIRUN:
            return
        if job_return.status == JobStatus.FAILED:
            error = _job_error(job_return)
            if isinstance(error, KeyboardInterrupt):
                mark_stopped(str(error) or "KeyboardInterrupt")
            _end_failed_job(config, error)
        # The basic launcher runs every job in this process: drop the finished job's Keras
        # state (graphs, layer-name counters) and garbage so memory stays flat over a sweep.
        if "keras" in sys.modules:
            sys.modules["keras"].utils.clear_session(free_memory=True)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        context = SweepContext.read(sweep_dir)
        if context is None:  # on_multirun_start stopped the sweep before writing it
            return
        results = SearchResults.read(sweep_dir)  # written by convnets.search
        if results is not None:
            _log_optuna_results(context, results, sweep_dir)
        others = results.trials_running if results is not None else 0
        table = summarize(
            context,
            sweep_dir / SUMMARY_DIR,
            config.tracking.http_timeout_s,
            end=not others,
            objectives=results.objectives if results is not None else (),
        )
        if others:
            print(
                f"the parent run stays RUNNING: {others} trial(s) of study "
                f"{results.study_name} still run in other processes; the last to end "
                "summarises the whole study and ends it",
                flush=True,
            )
        self._open_parent = None
        self._leave_parent()
        self._release_folder()
        if not (table["status"] == "FINISHED").any():
            print(
                "error: no job of the sweep finished (each job's error is above)", file=sys.stderr
            )
            sys.exit(1)

    def _end_abandoned_parent(self) -> None:
        if self._open_parent is None:
            return
        from convnets.tracking import Tracker

        uri, run_id = self._open_parent
        if self._leave_parent():  # another process of the study still runs: it ends the parent
            return
        if _stopped_by is not None:  # Ctrl-C, SIGTERM, SIGHUP: as its running job, KILLED
            Tracker(uri).end_run(run_id, "KILLED", f"interrupted ({_stopped_by})")
        else:
            Tracker(uri).end_run(run_id, "FAILED", "the sweep stopped before its end (see its log)")


_stopped_by: str | None = None  # the signal that stopped this process's sweep, if one did


def mark_stopped(by: str | None) -> None:
    """Record that the sweep in this process was stopped by a signal (``KeyboardInterrupt``,
    ``SIGTERM``...): its parent run then ends KILLED, as its jobs do, not FAILED."""
    global _stopped_by
    _stopped_by = by


def _job_error(job_return: JobReturn) -> BaseException:
    """The exception a failed job ended with. Hydra hands it out only by raising it from
    ``return_value``, which also prints an "Error executing job" line: that line is Hydra's
    sweeper's to print, so it is kept out of the output here."""
    with contextlib.redirect_stderr(io.StringIO()):
        try:
            value = job_return.return_value
        except BaseException as err:  # noqa: BLE001 - what the job raised, whatever it is
            return err
    return RuntimeError(f"the job failed, returning {value!r}")


def _end_failed_job(config: DictConfig, error: BaseException) -> None:
    """The runs a failed job left RUNNING, ended: KILLED when it was stopped (Ctrl-C), else
    FAILED with the error as the reason. A job that failed before it started its run (its
    process died while starting) gets a FAILED run of its own, so the summary counts it.
    A job that ended its run itself, as every job does unless its process dies, leaves
    nothing to do."""
    from convnets.tracking import Tracker, failure_reason

    context = SweepContext.read(
        config.hydra.sweep.dir,
        job_num=config.hydra.job.num,
        overrides=override_texts(config.hydra.overrides.task),
    )
    if context is None:
        return
    stopped = isinstance(error, KeyboardInterrupt)
    status = "KILLED" if stopped else "FAILED"
    reason = (str(error) or "interrupted") if stopped else failure_reason(error)
    timeout_s = OmegaConf.select(config, "tracking.http_timeout_s", default=10.0)
    tracker = Tracker(context.tracking_uri, http_timeout_s=timeout_s)
    runs = tracker.search_runs(
        [context.experiment_id],
        filter_string=(
            f"tags.`mlflow.parentRunId` = '{context.parent_run_id}' "
            f"and tags.sweep_job = '{context.job_num}'"
        ),
    )
    if len(runs):
        left = list(runs.loc[runs["status"] == "RUNNING", "run_id"])
    elif stopped:  # stopped before it began: nothing ran, nothing to count
        left = []
    else:
        left = [
            tracker.create_run(
                context.experiment_id,
                run_name=job_run_name(context),
                tags=context.tags(),
                parent_run_id=context.parent_run_id,
            )
        ]
    for run_id in left:
        tracker.end_run(run_id, status, reason)
        log.warning(
            "sweep: job #%s: run %s recorded %s: %s", context.job_num, run_id, status, reason
        )


def _log_optuna_results(context: SweepContext, results: SearchResults, sweep_dir: Path) -> None:
    """The study's best objective value and parameters, as Optuna reported them; for several
    objectives the Pareto front (``pareto/`` artifacts, runs tagged ``pareto_optimal=true``)."""
    from convnets.tracking import Tracker, shorten

    tracker = Tracker(context.tracking_uri)
    tracker.log_artifact_to(context.parent_run_id, SearchResults.path(sweep_dir))
    if results.best_value is not None:  # single objective
        tracker.log_metrics_to(context.parent_run_id, {"optuna_best_value": results.best_value})
        best = " ".join(f"{key}={value}" for key, value in (results.best_params or {}).items())
        tracker.set_tags_on(
            context.parent_run_id, {"optuna_best_params": shorten(best, _MAX_TAG, "...")}
        )
    for path in SearchResults.pareto_files(sweep_dir):
        tracker.log_artifact_to(context.parent_run_id, path, "pareto")
    for solution in results.solutions:
        if solution.get("run_id"):
            tracker.set_tags_on(solution["run_id"], {"pareto_optimal": "true"})
    for run_id in results.dominated_run_ids:
        tracker.set_tags_on(run_id, {"pareto_optimal": "false"})


def _seed_groups(runs: pd.DataFrame, out_dir: Path) -> None:
    """``groups.csv`` and the group means with error bars, beside ``jobs.csv``: the jobs that
    differ only in ``trainer.seed`` as one configuration (n, mean, std, 95% CI). Printed when a
    configuration ran with more than one seed."""
    from convnets.comparison import group_lines, runs_table, seed_groups

    tested = runs[(runs["status"] == "FINISHED") & runs["metrics.test_accuracy"].notna()]
    if len(tested) == 0:
        return
    groups, _, _ = seed_groups(runs_table(tested.reset_index(drop=True)), out_dir)
    if (groups["n"] > 1).any():
        for line in group_lines(groups):
            print(line, flush=True)


def best_criterion(objectives: Sequence[str] = ()) -> str:
    """How the parent's best job is picked, as its ``best_criterion`` tag says it; for a search
    that optimises something else, also where the search's own answer is (``objectives``: the
    search's, ``name:max`` / ``name:min``)."""
    criterion = f"{BEST_BY} (max)"
    if not objectives or list(objectives) == [f"{BEST_BY}:max"]:
        return criterion
    if len(objectives) > 1:
        return f"{criterion}; the search's Pareto front of {', '.join(objectives)}: pareto/"
    return f"{criterion}; the search's best by {objectives[0]}: optuna_best_value"


def summarize(
    context: SweepContext,
    out_dir: Path,
    http_timeout_s: float = 10.0,
    end: bool = True,
    objectives: Sequence[str] = (),
) -> pd.DataFrame:
    """Summary of the sweep's jobs on the parent run; ends the parent (unless ``end`` is
    false: other processes still run trials of the same study); returns the table.

    Logs ``summary/jobs.csv`` (one row per job), ``summary/groups.csv`` (jobs that differ only
    in the seed as one configuration: n, mean, std, 95% CI), ``summary/*.png`` (test accuracy
    against parameter count coloured by receptive field, and against receptive field; the
    configurations' means with error bars), the job counts (finished, failed, pruned), and the
    best job: the finished, unpruned one with the highest ``selected_val_accuracy`` (none
    when no job has one: trained without validation data), as tags ``best_run_id``,
    ``best_run_name`` and ``best_criterion`` (:func:`best_criterion`; ``objectives``: a
    search's) and metrics ``best_selected_val_accuracy`` / ``best_test_accuracy``, both that
    run's. The parent ends FINISHED, or FAILED when no job finished.
    """
    import pandas as pd

    from convnets.comparison import selected_val_accuracy, summary_figures
    from convnets.tracking import Tracker, where_to_look

    tracker = Tracker(context.tracking_uri, http_timeout_s=http_timeout_s)
    runs = tracker.search_runs(
        [context.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{context.parent_run_id}'",
    )
    table = runs.reindex(columns=list(SUMMARY_COLUMNS)).rename(columns=SUMMARY_COLUMNS)
    table["selected_val_accuracy"] = selected_val_accuracy(runs)  # older runs' from their record
    if any(spec.split(":")[0] == "val_accuracy" for spec in objectives):
        # A search on the last epoch's validation accuracy: its objective, under its own name
        # beside the tested epoch's, as pareto.csv and the study have it.
        last = runs.get("metrics.val_accuracy", pd.Series(float("nan"), index=runs.index))
        table.insert(table.columns.get_loc("selected_val_accuracy") + 1, "val_accuracy", last)
    table["job"] = pd.to_numeric(table["job"]).astype("Int64")
    table = table.sort_values("job", kind="stable").reset_index(drop=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    table.to_csv(out_dir / "jobs.csv", index=False)
    if "metrics.test_accuracy" in runs.columns:  # some job finished
        # From the runs themselves, so points are labelled by the params that differ.
        summary_figures(runs, out_dir)  # accuracy vs params coloured by RF, vs RF; Pareto fronts
        _seed_groups(runs, out_dir)
    tracker.log_artifacts_to(context.parent_run_id, out_dir, SUMMARY_DIR)

    pruned = table["pruned"].notna()
    finished = table[(table["status"] == "FINISHED") & ~pruned]
    metrics = {"jobs": len(table), "jobs_finished": len(finished)}
    metrics["jobs_failed"] = int((table["status"] == "FAILED").sum())
    metrics["jobs_killed"] = int((table["status"] == "KILLED").sum())  # stopped, or died
    metrics["jobs_pruned"] = int(pruned.sum())
    choosable = finished[finished[BEST_BY].notna()]  # none trained with validation data: no best
    if len(choosable):
        best = choosable.loc[choosable[BEST_BY].idxmax()]
        tags = {
            "best_run_id": best["run_id"],
            "best_run_name": str(best["run_name"]),
            "best_criterion": best_criterion(objectives),
            "best_overrides": str(best["overrides"]),
        }
        tracker.set_tags_on(context.parent_run_id, tags)
        metrics["best_selected_val_accuracy"] = best["selected_val_accuracy"]
        if not math.isnan(best["test_accuracy"]):
            metrics["best_test_accuracy"] = best["test_accuracy"]
    tracker.log_metrics_to(context.parent_run_id, metrics)
    if end and len(finished):
        tracker.end_run(context.parent_run_id, "FINISHED")
    elif end:
        tracker.end_run(context.parent_run_id, "FAILED", "no job of the sweep finished")
    log.info("sweep: %d of %d jobs finished; summary in %s", len(finished), len(table), out_dir)
    where = where_to_look(context.tracking_uri, context.experiment_id, context.parent_run_id)
    also = f" ({metrics['jobs_pruned']} pruned)" if metrics["jobs_pruned"] else ""
    if len(finished) and not len(choosable):
        also += f"; no best job: none has a {BEST_BY} (trained without validation data)"
    print(
        f"sweep done: {len(finished)} of {len(table)} jobs finished{also}; parent run "
        f"{context.parent_run_id} ({where})",
        flush=True,
    )
    return table
