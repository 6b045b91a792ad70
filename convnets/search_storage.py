"""A search's study and where it lives: the Optuna storage (by default ``optuna.db`` beside a
SQLite MLflow store), opened once per process with heartbeats and retries of dead trials; the
pruner and the seeded sampler; the study a command starts or continues (:func:`study_ref`)."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import inspect
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig

from convnets.config import RUN_ID_KEYS, flatten, is_runtime_key, override_texts
from convnets.errors import ConfigError, StorageLost
from convnets.search_settings import (
    HEARTBEAT_S,
    STALE_AFTER_FLOOR_S,
    Objective,
    Settings,
    check,
    is_search,
)
from convnets.search_space import parse_space, space_overrides
from convnets.sweep_files import PrunerSpec, experiment_name

if TYPE_CHECKING:
    import optuna

PARENT_ATTR = "mlflow_parent_run_id"  # study user attribute
MAX_RETRY = 3  # a trial whose process died is asked again at most this many times


def default_storage(tracking_uri: str) -> str:
    """``sqlite:///<dir of mlflow.db>/optuna.db`` for a SQLite MLflow store, else
    ``sqlite:///<cwd>/optuna.db``: absolute, so every job process opens the same file."""
    from convnets.tracking import sqlite_path

    db = sqlite_path(tracking_uri)
    folder = db.parent if db is not None else Path.cwd()
    return f"sqlite:///{folder / 'optuna.db'}"


def storage_url(settings: Settings, config: DictConfig) -> str:
    if settings.storage is None:
        return default_storage(config.tracking.uri)
    from convnets.tracking import sqlite_path

    db = sqlite_path(settings.storage)  # a relative SQLite path, made absolute for the jobs
    url = f"sqlite:///{db}" if db is not None else settings.storage
    if url == config.tracking.uri or (db is not None and db == sqlite_path(config.tracking.uri)):
        # Optuna would add its tables to MLflow's database, then refuse its schema version.
        ours = (db or Path("optuna.db")).with_name("optuna.db")
        raise ConfigError(
            f"hydra.sweeper.storage={settings.storage} is the MLflow store (tracking.uri); "
            f"give the study a database of its own, e.g. hydra.sweeper.storage=sqlite:///{ours}"
        )
    return url


def study_name(settings: Settings, config: DictConfig) -> str:
    return settings.study_name or experiment_name(config)


@contextlib.contextmanager
def _storage_lock(url: str) -> Iterator[None]:
    """Exclusive lock beside a SQLite database while its schema may be created (POSIX flock):
    two processes creating Optuna's tables at once would collide. No-op for a server."""
    from convnets.tracking import sqlite_path

    db = sqlite_path(url)
    if db is None:
        yield
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@functools.cache
def open_storage(url: str, stale_after_s: int = 60) -> optuna.storages.RDBStorage:
    """The storage, once per process (a basic-launcher job reuses the sweeper's).

    Heartbeats mark live trials; a RUNNING trial silent for ``stale_after_s`` is recorded
    FAIL by ``fail_stale_trials`` and enqueued again with its parameters. SQLite waits up to
    60 s for a lock rather than failing at once when several processes write.
    """
    import optuna
    import sqlalchemy
    from optuna.storages import RDBStorage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    # Optuna 4.9 renamed failed_trial_callback and its retry callback (removed in 6).
    stale = "heartbeat_stale_trial_callback"
    if stale not in inspect.signature(RDBStorage).parameters:
        stale = "failed_trial_callback"

    def create() -> RDBStorage:
        return RDBStorage(
            url,
            engine_kwargs=engine,
            heartbeat_interval=HEARTBEAT_S,
            grace_period=max(stale_after_s, STALE_AFTER_FLOOR_S),  # check() refuses less
            **{stale: retry_callback()(max_retry=MAX_RETRY)},
        )

    # A bad URL, a missing driver, no server, or a SQLite file (or its lock beside it) that
    # cannot be made there: one line.
    try:
        with _storage_lock(url), warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats
            try:
                return create()
            except sqlalchemy.exc.DatabaseError as err:
                # Another process that does not take our lock (optuna-dashboard, a user's
                # optuna.load_study) created the new database's schema at the same moment:
                # a unique row inserted twice, or (SQLite commits each CREATE TABLE on its
                # own) a table made between the check and the create. It exists now.
                if not _schema_race(err):
                    raise
                time.sleep(1)
                return create()
    except Exception as err:  # noqa: BLE001
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise ConfigError(
            f"hydra.sweeper.storage={redact_url(url)}: the Optuna storage cannot be used "
            f"({first}); give a SQLAlchemy URL such as sqlite:///optuna.db"
        ) from err


def _schema_race(err: Exception) -> bool:
    import sqlalchemy

    return isinstance(err, sqlalchemy.exc.IntegrityError) or "already exists" in str(err)


@contextlib.contextmanager
def storage_errors(url: str) -> Iterator[None]:
    """A storage that stops answering while the block runs is one :class:`StorageLost` line
    naming it and its cause. Optuna wraps a database error of a commit in
    ``StorageInternalError`` whose message blames "invalid data in the commit"; the cause is
    what the database driver said."""
    try:
        yield
    except Exception as err:
        import sqlalchemy
        from optuna.exceptions import StorageInternalError

        if not isinstance(err, StorageInternalError | sqlalchemy.exc.SQLAlchemyError):
            raise
        cause = err
        while cause.__cause__ is not None or cause.__context__ is not None:
            cause = cause.__cause__ or cause.__context__
        first = (str(cause).strip().splitlines() or [type(cause).__name__])[0][:200]
        raise StorageLost(
            f"hydra.sweeper.storage={redact_url(url)}: the Optuna storage stopped answering "
            f"({type(cause).__name__}: {first}); the study keeps what it recorded: rerun the "
            "same command once it is back to continue it"
        ) from err


def retry_callback() -> type:
    """Optuna's callback that enqueues a stale trial again (renamed in 4.9)."""
    from optuna import storages

    return getattr(storages, "RetryHeartbeatStaleTrialCallback", None) or (
        storages.RetryFailedTrialCallback
    )


def make_pruner(spec: PrunerSpec) -> optuna.pruners.BasePruner:
    """Median: stop a trial whose val_accuracy after an epoch is below the median of the
    earlier trials at that epoch (after 3 trials, from epoch 2). Hyperband: successive
    halving over 1..max_epochs epochs."""
    import optuna

    if spec.name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1)
    if spec.name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=spec.max_epochs)
    return optuna.pruners.NopPruner()


def make_sampler(settings: Settings, n_done: int, n_asked: int) -> Any:
    """Seeded with ``seed + trials the study has ever asked`` (``n_asked``: failed ones and
    retries waiting to run too): reproducible, and a resumed search does not replay its first
    random draws (seeded by the trials done only, a search stopped in its first trial drew
    that trial's values again for the next one, beside the trial's own retry). TPE's random
    start counts only ``n_done``, the trials with a result."""
    import optuna

    seed = settings.seed + n_asked
    if settings.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if settings.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    startup = max(0, settings.n_startup_trials - n_done)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup)


def load_study(url: str, name: str, stale_after_s: int = 60) -> optuna.Study | None:
    """The study if it exists (nothing is created)."""
    import optuna

    storage = open_storage(url, stale_after_s)
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        return None


@dataclass(frozen=True)
class StudyRef:
    """The study a search runs in, and the MLflow parent run it already has (None: new)."""

    storage_url: str
    study_id: int
    name: str
    parent_run_id: str | None


def study_ref(config: DictConfig) -> StudyRef | None:
    """The study of this search, created if new, or None when not our sweeper. Checks the
    search first, so a bad one stops before any run is made.

    Creating the study is atomic in its storage (a concurrent creator's study is loaded), so
    every process that starts the same search names the same study id; its parent run is
    the one claimed for that id (:mod:`convnets.study_parent`), or for a study from before
    claims, the one it remembers as a user attribute.
    """
    import optuna

    from convnets import study_parent

    if not is_search(config.hydra.sweeper):
        return None
    settings, objectives = check(config)
    url = storage_url(settings, config)
    name = study_name(settings, config)
    storage = open_storage(url, settings.stale_after_s)
    study = optuna.create_study(
        storage=storage,
        study_name=name,
        directions=[o.direction for o in objectives],
        load_if_exists=True,
    )
    space, fixed = parse_space(
        space_overrides(settings.params, override_texts(config.hydra.overrides.task))
    )
    check_it_continues(
        study, objectives, experiment_name(config), trained_settings(config, space, fixed), space
    )
    study_id = storage.get_study_id_from_name(name)
    parent = study_parent.claimed(url, study_id, name) or study.user_attrs.get(PARENT_ATTR)
    return StudyRef(url, study_id, name, parent)


# ---------------------------------------------------------------- one study, one search

# The study's user attributes a rerun is held to: what it optimises, where its trials are
# recorded and what they trained with (see check_it_continues).
OBJECTIVES_ATTR = "objectives"
SETTINGS_ATTR = "trained_settings"


def trained_settings(config: DictConfig, space: dict, fixed: dict[str, str]) -> dict[str, str]:
    """What every trial of the search trains with besides the searched keys: the composed
    config (as given, interpolations unresolved) and the fixed overrides on top, by dotted key,
    as strings (a study's user attribute is JSON). Runtime keys and run ids are left out."""
    from omegaconf import OmegaConf

    trained = OmegaConf.masked_copy(config, [key for key in config if key != "hydra"])
    flat = {key: str(value) for key, value in flatten(OmegaConf.to_container(trained)).items()}
    flat.update(fixed)
    searched = tuple(space)
    return {
        key: value
        for key, value in sorted(flat.items())
        if not is_runtime_key(key.lstrip("+~"))
        and key not in RUN_ID_KEYS
        and not any(key == s or key.startswith(f"{s}.") for s in searched)
    }


def check_it_continues(
    study: optuna.Study,
    objectives: Sequence[Objective],
    experiment: str,
    settings: dict[str, str],
    space: Mapping[str, Any],
) -> None:
    """Refuse, before any run is made or reopened, a rerun that would add to a study trials
    that do not compare with its own: other objectives, another ``tracking.experiment`` (its
    trials would land in two experiments under one parent), another fixed setting
    (``trainer.epochs=2`` after 1) or other searched keys (see :func:`check_same_space`).
    The first process to run the study records the first three; runtime keys (data folders,
    devices, the store's URI) may differ between the machines sharing it, and a key only one
    side has (the config schema grew) is not compared."""
    new_study = "start a new study: hydra.sweeper.study_name=<name>"
    check_same_space(study, space, new_study)
    wanted = [f"{o.name}:{o.direction[:3]}" for o in objectives]
    recorded = study.user_attrs.get(OBJECTIVES_ATTR)
    if recorded is None:
        study.set_user_attr(OBJECTIVES_ATTR, wanted)
    elif recorded != wanted:
        raise ConfigError(
            f"hydra.sweeper.objectives: study {study.study_name!r} optimises "
            f"[{', '.join(recorded)}]; keep those or {new_study}"
        )
    before = study.user_attrs.get(SETTINGS_ATTR)
    if before is None:
        study.set_user_attr(SETTINGS_ATTR, {"experiment": experiment, "settings": settings})
        return
    if before["experiment"] != experiment:
        raise ConfigError(
            f"tracking.experiment={experiment}: study {study.study_name!r} records its trials "
            f"in the experiment {before['experiment']!r}; keep that one, or {new_study}"
        )
    trained = before["settings"]
    changed = sorted(k for k in trained.keys() & settings.keys() if trained[k] != settings[k])
    if changed:
        key, more = changed[0], len(changed) - 1
        also = f" (and {more} more key{'s' if more > 1 else ''})" if more else ""
        raise ConfigError(
            f"{key}={settings[key]}: the trials of study {study.study_name!r} trained with "
            f"{key}={trained[key]}{also}; rerun with its settings to add trials, or {new_study}"
        )


def check_same_space(study: optuna.Study, space: Mapping[str, Any], new_study: str) -> None:
    """The keys a study's trials searched, searched again from distributions Optuna can
    continue: a float or int range may move (a narrowed ``interval``), a ``choice`` may not
    (Optuna refuses a categorical whose choices changed only when the trial asks for it,
    after the runs exist), and a key searched before cannot be fixed now, nor one fixed before
    searched now (the study's trials would not compare)."""
    from optuna.distributions import check_distribution_compatibility

    searched: dict[str, Any] = {}
    for trial in study.get_trials(deepcopy=False):
        searched.update(trial.distributions)  # the latest trial's, where ranges moved
    if not searched:
        return  # a new study, or one no trial has asked anything of yet
    name = study.study_name
    for key, before in searched.items():
        if key not in space:
            raise ConfigError(
                f"{key}: study {name!r} searches it ({shown_distribution(before)}); search it "
                f"again (no fixed {key}= on the command line) to add trials, or {new_study}"
            )
        try:
            check_distribution_compatibility(before, space[key])
        except ValueError as err:
            raise ConfigError(
                f"{key}={shown_distribution(space[key])}: study {name!r} draws it from "
                f"{shown_distribution(before)}, and Optuna cannot change that within a study "
                f"({str(err).rstrip('.')}); keep it, or {new_study}"
            ) from None
    added = sorted(space.keys() - searched.keys())
    if added:
        raise ConfigError(
            f"{added[0]}: study {name!r} does not search it (it searches "
            f"{', '.join(sorted(searched))}); fix it as its trials had it to add trials, "
            f"or {new_study}"
        )


def shown_distribution(distribution: Any) -> str:
    """An Optuna distribution in the sweep syntax it came from (:func:`~convnets.search_space
    .parse_space`): ``choice(0.5, 1.0)``, ``tag(log, interval(0.0001, 0.01))``,
    ``range(1, 4)``, ``tag(int, interval(1, 9))``."""
    from optuna.distributions import CategoricalDistribution, IntDistribution

    if isinstance(distribution, CategoricalDistribution):
        return f"choice({', '.join(str(c) for c in distribution.choices)})"
    low, high, step = distribution.low, distribution.high, distribution.step
    if step is not None and not distribution.log:  # range(start, stop[, step]), stop excluded
        by = "" if step == 1 and isinstance(distribution, IntDistribution) else f", {step:g}"
        return f"range({low:g}, {high + step:g}{by})"
    tags = ["log"] * distribution.log + ["int"] * isinstance(distribution, IntDistribution)
    interval = f"interval({low:g}, {high:g})"
    return f"tag({', '.join(tags)}, {interval})" if tags else interval


def redact_url(url: str) -> str:
    from convnets.tracking import redact

    return redact(url)
