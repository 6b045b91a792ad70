"""Architecture search on Optuna's ask/tell API: the search space, the objectives, the study.

``hydra_plugins/convnets_optuna`` is the thin Hydra adapter (``hydra/sweeper=convnets_optuna``);
everything it does lives here. A search is an Optuna study in a persistent storage (by default
``optuna.db`` beside a SQLite MLflow store), so:

- rerunning the same command continues the study: ``n_trials`` is the study's total, trial
  numbers go on, and the MLflow parent run is the same (:func:`study_ref`, read by
  :class:`convnets.sweep.MlflowSweepCallback`);
- processes that start the same search at once, on one machine or several, share one parent
  run: the first to claim it in the study's database wins (:mod:`convnets.study_parent`);
- a trial whose process died is found by its missing heartbeat (the sweeper records one for
  every trial in flight), recorded FAIL and asked again with the same parameters (Optuna's
  ``fail_stale_trials`` with ``RetryFailedTrialCallback``);
- several processes (or a parallel launcher) on one storage ask distinct trials from it.

Trial ``n`` runs as Hydra job ``n`` (``hydra.job.num``). The job finds its trial through
``<sweep dir>/optuna_trials/<n>.json`` (:class:`convnets.sweep_files.TrialFile`, read in
:mod:`convnets.trials`), reports ``val_accuracy`` per epoch (pruning) and writes its final
metrics to the trial's user attributes, from which the objectives are told. The results go to
``optimization_results.yaml`` (:class:`convnets.sweep_files.SearchResults`), which the sweep
callback logs on the parent run. The study's objectives carry their names
(``Study.metric_names``), so optuna-dashboard shows ``val_accuracy``, not "Objective 0".
Neither Optuna, MLflow nor TensorFlow is imported at module import: Hydra imports the plugin
in every launch.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import inspect
import logging
import math
import threading
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from convnets.errors import ConfigError
from convnets.sweep_files import (
    PARETO_CSV,
    PARETO_PNG,
    RESULTS_FILE,
    PrunerSpec,
    SearchResults,
    SweepContext,
    TrialFile,
    experiment_name,
)

if TYPE_CHECKING:
    import optuna

log = logging.getLogger(__name__)

# Objective -> its usual direction (used when the config names no direction).
OBJECTIVES = {
    "val_accuracy": "max",
    "test_accuracy": "max",
    "param_count": "min",
    "receptive_field": "min",
    "effective_receptive_field": "min",
    "macs": "min",
    "train_time_s": "min",
}
PRUNERS = ("none", "median", "hyperband")
SAMPLERS = ("tpe", "nsga2", "random")
PARENT_ATTR = "mlflow_parent_run_id"  # study user attribute
METRICS_ATTR = "metrics"  # trial user attribute, written by the job
PRUNED_ATTR = "pruned"  # trial user attribute, written by the job
RUN_ATTR = "mlflow_run_id"  # trial user attribute, written by the job
HEARTBEAT_S = 10  # the sweeper records a heartbeat for every trial in flight this often
STALE_AFTER_FLOOR_S = 2 * HEARTBEAT_S  # the least stale_after_s: two missed heartbeats
MAX_RETRY = 3  # a trial whose process died is asked again at most this many times


# ---------------------------------------------------------------- settings


@dataclass
class Settings:
    """``hydra.sweeper`` of ``hydra/sweeper=convnets_optuna`` (the plugin's config schema)."""

    objectives: list[str] = field(default_factory=lambda: ["val_accuracy:max"])
    n_trials: int = 20  # the study's total: a rerun with more adds the difference
    n_jobs: int = 1  # trials asked and launched at once (with a parallel launcher)
    pruner: str = "none"  # none | median | hyperband (one objective: val_accuracy)
    sampler: str = "tpe"  # tpe | nsga2 | random
    n_startup_trials: int = 10  # TPE: random trials before it models the objective(s)
    seed: int = 0
    study_name: str | None = None  # null: the MLflow experiment's name
    storage: str | None = None  # any SQLAlchemy URL; null: optuna.db beside a SQLite MLflow store
    stale_after_s: int = 60  # a RUNNING trial without a heartbeat this long died: asked again
    # key: choice(...) | range(...) | interval(...) | tag(log, ...) | a fixed value
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Objective:
    name: str
    direction: str  # "maximize" | "minimize"


def settings_of(config: DictConfig) -> Settings:
    fields = OmegaConf.to_container(config.hydra.sweeper, resolve=True)
    fields.pop("_target_", None)
    return Settings(**fields)


def is_search(sweeper: DictConfig) -> bool:
    """Whether a multirun's sweeper (``hydra.sweeper``) is ours (``convnets_optuna``)."""
    return str(sweeper.get("_target_", "")).startswith("hydra_plugins.convnets_optuna.")


def parse_objectives(specs: Sequence[str]) -> tuple[Objective, ...]:
    """``["val_accuracy:max", "param_count"]`` -> objectives (direction defaults per name)."""
    if not specs:
        raise ConfigError(
            "hydra.sweeper.objectives: empty; give at least one, e.g. [val_accuracy:max]"
        )
    objectives = []
    for spec in specs:
        name, _, way = str(spec).partition(":")
        name, way = name.strip(), way.strip()
        if name not in OBJECTIVES:
            raise ConfigError(
                f"hydra.sweeper.objectives: unknown objective {name!r}; "
                f"valid: {', '.join(OBJECTIVES)}"
            )
        way = way or OBJECTIVES[name]
        if way not in ("max", "min"):
            raise ConfigError(
                f"hydra.sweeper.objectives: {spec!r}: the direction is max or min "
                f"(e.g. {name}:{OBJECTIVES[name]})"
            )
        if any(o.name == name for o in objectives):
            raise ConfigError(f"hydra.sweeper.objectives: {name} is given twice; give it once")
        objectives.append(Objective(name, "maximize" if way == "max" else "minimize"))
    return tuple(objectives)


def check(config: DictConfig) -> tuple[Settings, tuple[Objective, ...]]:
    """Refuse, in one line each, a search that cannot run, before any job or run exists."""
    settings = settings_of(config)
    objectives = parse_objectives(settings.objectives)
    names = [o.name for o in objectives]
    if settings.n_trials < 1:
        raise ConfigError(f"hydra.sweeper.n_trials={settings.n_trials}: give 1 or more")
    if settings.n_jobs < 1:
        raise ConfigError(f"hydra.sweeper.n_jobs={settings.n_jobs}: give 1 or more")
    if settings.stale_after_s < STALE_AFTER_FLOOR_S:
        raise ConfigError(
            f"hydra.sweeper.stale_after_s={settings.stale_after_s}: give {STALE_AFTER_FLOOR_S} "
            f"or more (two missed heartbeats, one every {HEARTBEAT_S} s): a live trial must not "
            "be taken for dead"
        )
    if settings.sampler not in SAMPLERS:
        raise ConfigError(
            f"hydra.sweeper.sampler={settings.sampler}: unknown; use {', '.join(SAMPLERS)}"
        )
    if settings.pruner not in PRUNERS:
        raise ConfigError(
            f"hydra.sweeper.pruner={settings.pruner}: unknown; use {', '.join(PRUNERS)}"
        )
    if settings.pruner != "none" and len(objectives) > 1:
        raise ConfigError(
            f"hydra.sweeper.pruner={settings.pruner}: Optuna cannot prune a multi-objective "
            "search; use hydra.sweeper.pruner=none or a single objective"
        )
    if settings.pruner != "none" and names != ["val_accuracy"]:
        raise ConfigError(
            f"hydra.sweeper.pruner={settings.pruner}: pruning compares the trials' per-epoch "
            "val_accuracy; it needs hydra.sweeper.objectives=[val_accuracy:max]"
        )
    needs_val = "val_accuracy" in names or settings.pruner != "none"
    if needs_val and not OmegaConf.select(config, "dataset.val_fraction", default=0.1):
        raise ConfigError(
            "dataset.val_fraction=0: the objective val_accuracy needs validation data; set "
            "dataset.val_fraction=0.1 or optimise another objective (hydra.sweeper.objectives)"
        )
    task = OmegaConf.select(config, "hydra.overrides.task", default=[])
    parse_space(space_overrides(settings, task))  # a bound Optuna refuses
    return settings, objectives


def space_overrides(settings: Settings, arguments: Sequence[str]) -> list[str]:
    """The search space as overrides: ``hydra.sweeper.params``, then the command line's."""
    return [*(f"{key}={value}" for key, value in settings.params.items()), *arguments]


# ---------------------------------------------------------------- the search space


def parse_space(overrides: Sequence[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """Hydra sweep overrides -> (Optuna distributions, fixed overrides), by key.

    The syntax of ``hydra.sweeper.params`` and the command line, as in hydra-optuna-sweeper:
    ``choice(a, b)`` (also ``a,b``) is categorical (lists and dicts, e.g. whole
    ``model.layers`` stacks, become their override strings); ``range(lo, hi[, step])`` is an
    int (a float with a float bound or step) on that grid, ``hi`` excluded;
    ``interval(lo, hi)`` is a float in ``[lo, hi]``, an int with ``tag(int, interval(...))``;
    ``tag(log, ...)`` samples on a log scale. Anything else is fixed. Later overrides of a key
    win.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    space: dict[str, Any] = {}
    fixed: dict[str, str] = {}
    for override in OverridesParser.create().parse_overrides(list(overrides)):
        key = override.get_key_element()
        space.pop(key, None)
        fixed.pop(key, None)
        if not override.is_sweep_override():
            fixed[key] = override.get_value_element_as_str()
            continue
        try:
            space[key] = _distribution(override)
        except ValueError as err:  # Optuna refuses the bounds
            raise ConfigError(_refused_distribution(override, err)) from err
    return space, fixed


def _distribution(override: Any) -> Any:
    from hydra.core.override_parser.types import Transformer
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    value = override.value()
    log_scale = "log" in getattr(value, "tags", set())
    if override.is_interval_sweep():
        if "int" in value.tags:  # Hydra parses interval bounds as floats
            return IntDistribution(int(value.start), int(value.end), log=log_scale)
        return FloatDistribution(value.start, value.end, log=log_scale)
    if override.is_range_sweep() and not value.shuffle:
        bounds = (value.start, value.stop, value.step)
        if value.step <= 0:
            raise ValueError("a range's step must be above 0")
        if any(isinstance(v, float) for v in bounds):
            # range(0, 1, 0.25) -> 0, 0.25, 0.5, 0.75 (the stop is excluded, as in Hydra)
            high = value.start + value.step * (
                math.ceil((value.stop - value.start) / value.step) - 1
            )
            return FloatDistribution(value.start, high, step=value.step)
        high = value.start + value.step * ((value.stop - value.start - 1) // value.step)
        return IntDistribution(value.start, high, step=value.step, log=log_scale)
    return CategoricalDistribution(list(override.sweep_iterator(transformer=Transformer.encode)))


def _refused_distribution(override: Any, err: ValueError) -> str:
    """One line for a search-space entry Optuna cannot sample: the entry as written, why,
    and the fix."""
    value = override.value()
    where = override.input_line or override.get_key_element()
    low = getattr(value, "start", None)
    high = getattr(value, "end", getattr(value, "stop", None))
    tags = getattr(value, "tags", set())
    if "log" in tags and low is not None and low <= 0:
        example = "1" if "int" in tags or override.is_range_sweep() else "1e-5"
        why = f"a log scale needs a lower bound above 0 (it is {low:g}); start at e.g. {example}"
    elif override.is_range_sweep() and value.step <= 0:
        why = "a search samples a range upwards: give a step above 0, the smaller bound first"
    elif override.is_range_sweep() and value.start >= value.stop:
        why = f"range({low:g}, {high:g}) is empty (the stop is excluded); put the smaller first"
    elif low is not None and high is not None and low > high:
        why = f"the lower bound {low:g} is above the upper {high:g}; put the smaller first"
    else:
        why = f"{err} (Optuna refuses this search space)"
    return f"{where}: {why}"


def override_value(value: Any) -> str:
    """An Optuna parameter value as Hydra override text (``True`` -> ``true``)."""
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def trial_overrides(params: Mapping[str, Any], fixed: Mapping[str, str]) -> list[str]:
    return [f"{k}={override_value(v)}" for k, v in params.items()] + [
        f"{k}={v}" for k, v in fixed.items() if k not in params
    ]


def consecutive_runs(numbers: Sequence[int]) -> list[list[int]]:
    """Split trial numbers into runs of consecutive numbers, in order: ``[4, 5, 7]`` ->
    ``[[4, 5], [7]]``. A launch numbers its jobs consecutively from its first, and job
    ``n`` must be trial ``n``; another process sharing the study may take numbers between."""
    runs: list[list[int]] = []
    for number in numbers:
        if runs and number == runs[-1][-1] + 1:
            runs[-1].append(number)
        else:
            runs.append([number])
    return runs


# ---------------------------------------------------------------- the study


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
    return f"sqlite:///{db}" if db is not None else settings.storage


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
            **{stale: _retry_callback()(max_retry=MAX_RETRY)},
        )

    with _storage_lock(url), warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats
        try:
            try:
                return create()
            except sqlalchemy.exc.IntegrityError:
                # Another process that does not take our lock (optuna-dashboard, a user's
                # optuna.load_study) created the new database's schema at the same moment:
                # it exists now.
                time.sleep(1)
                return create()
        except Exception as err:  # noqa: BLE001 - a bad URL, a missing driver, no server
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
            raise ConfigError(
                f"hydra.sweeper.storage={_redact(url)}: the Optuna storage cannot be used "
                f"({first}); give a SQLAlchemy URL such as sqlite:///optuna.db"
            ) from err


def _retry_callback() -> type:
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


def _make_sampler(settings: Settings, n_done: int) -> Any:
    """Seeded with ``seed + trials already in the study``: reproducible, and a resumed
    search does not replay its first random draws."""
    import optuna

    seed = settings.seed + n_done
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
    study_id = storage.get_study_id_from_name(name)
    parent = study_parent.claimed(url, study_id, name) or study.user_attrs.get(PARENT_ATTR)
    return StudyRef(url, study_id, name, parent)


def counted_trials(trials: Sequence[optuna.trial.FrozenTrial]) -> int:
    """Trials that use up ``n_trials``: finished, failed or running (maybe in another
    process); not waiting ones, nor a failed trial that was enqueued again (its retry counts)."""
    from optuna.exceptions import ExperimentalWarning
    from optuna.trial import TrialState

    with warnings.catch_warnings():  # "experimental" since Optuna 2.8
        warnings.simplefilter("ignore", ExperimentalWarning)
        retried = {_retry_callback().retried_trial_number(t) for t in trials}
    live = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
    return sum(
        t.state in live or (t.state == TrialState.FAIL and t.number not in retried) for t in trials
    )


class _Heartbeat:
    """Records a heartbeat for each trial in flight every HEARTBEAT_S, from a thread of the
    sweeper's process (alive while its jobs run, whatever the launcher)."""

    def __init__(self, storage: Any, trial_ids: Sequence[int]):
        self.storage, self.trial_ids = storage, list(trial_ids)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, name="optuna-heartbeat", daemon=True)

    def _beat(self) -> None:
        while not self.stop.wait(HEARTBEAT_S):
            for trial_id in self.trial_ids:
                with contextlib.suppress(Exception):  # a busy store: the next beat will do
                    self.storage.record_heartbeat(trial_id)

    def __enter__(self) -> _Heartbeat:
        for trial_id in self.trial_ids:
            self.storage.record_heartbeat(trial_id)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


@contextlib.contextmanager
def _retried_if_stopped(study: optuna.Study, batch: Sequence[Any]) -> Iterator[None]:
    """Ctrl-C (or any error) while trials run: record them FAIL and enqueue their parameters
    again, as for a trial whose process died, so the next run of the command redoes them."""
    try:
        yield
    except BaseException:
        import optuna
        from optuna.trial import TrialState

        with warnings.catch_warnings():  # "experimental" since Optuna 2.8
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            retry = _retry_callback()(max_retry=MAX_RETRY)
        for trial in batch:
            with contextlib.suppress(Exception):  # best effort: the original error matters
                retry(study, study.tell(trial, state=TrialState.FAIL, skip_if_finished=True))
        raise


class Search:
    """One ``train.py -m`` invocation's part of a study: ask, launch, tell until ``n_trials``."""

    def __init__(self, config: DictConfig, launcher: Any):
        self.config = config
        self.launcher = launcher
        self.sweep_dir = Path(config.hydra.sweep.dir).resolve()

    def run(self, arguments: Sequence[str]) -> None:
        import optuna

        settings, objectives = check(self.config)
        space, fixed = parse_space(space_overrides(settings, arguments))
        url = storage_url(settings, self.config)
        storage = open_storage(url, settings.stale_after_s)
        name = study_name(settings, self.config)
        pruner = PrunerSpec(settings.pruner, int(self.config.trainer.epochs))
        study = optuna.create_study(
            storage=storage,
            study_name=name,
            directions=[o.direction for o in objectives],
            pruner=make_pruner(pruner),
            load_if_exists=True,
        )
        self._check_same_objectives(study, objectives)
        _name_objectives(study, objectives)
        self._fail_dead_trials(study)
        done = counted_trials(study.get_trials(deepcopy=False))
        study.sampler = _make_sampler(settings, done)
        self._link_parent_run(study)
        log.info(
            "search: study %s in %s: %d of %d trials done, objectives %s, pruner %s",
            name, _redact(url), done, settings.n_trials,
            ", ".join(settings.objectives), settings.pruner,
        )  # fmt: skip
        while (left := settings.n_trials - counted_trials(study.get_trials(deepcopy=False))) > 0:
            with warnings.catch_warnings():  # heartbeats outside optimize(): see _Heartbeat
                warnings.filterwarnings("ignore", "Heartbeat of storage", UserWarning)
                trials = [study.ask(space) for _ in range(min(settings.n_jobs, left))]
            by_number = {t.number: t for t in trials}
            with (
                _Heartbeat(storage, [t._trial_id for t in trials]),
                _retried_if_stopped(study, trials),
            ):
                for numbers in consecutive_runs(sorted(by_number)):
                    batch = [by_number[n] for n in numbers]
                    for trial in batch:
                        spec = TrialFile(url, name, trial.number, pruner, settings.stale_after_s)
                        spec.write(self.sweep_dir)
                    returns = self.launcher.launch(
                        [trial_overrides(t.params, fixed) for t in batch],
                        initial_job_idx=numbers[0],
                    )
                    self._tell(study, batch, returns, objectives)
        self._write_results(study, objectives)

    def _fail_dead_trials(self, study: optuna.Study) -> None:
        """Trials whose process died (no heartbeat): FAIL, enqueued again, their MLflow runs
        ended KILLED (a SIGKILL left them RUNNING)."""
        import optuna
        from optuna.trial import TrialState

        from convnets.tracking import Tracker

        running = {t.number for t in study.get_trials(states=(TrialState.RUNNING,))}
        with warnings.catch_warnings():  # "experimental" since Optuna 2.9
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        dead = [t for t in study.get_trials(states=(TrialState.FAIL,)) if t.number in running]
        if not dead:
            return
        tracker = Tracker(
            self.config.tracking.uri, http_timeout_s=self.config.tracking.http_timeout_s
        )
        for trial in dead:
            log.warning("search: trial %d died mid-run; asking its parameters again", trial.number)
            if RUN_ATTR in trial.user_attrs:
                reason = f"its process died (no heartbeat); trial {trial.number} is run again"
                with contextlib.suppress(Exception):  # best effort: the search goes on
                    tracker.end_run(trial.user_attrs[RUN_ATTR], "KILLED", reason)

    def _check_same_objectives(self, study: optuna.Study, objectives: Sequence[Objective]):
        wanted = [f"{o.name}:{o.direction[:3]}" for o in objectives]
        recorded = study.user_attrs.get("objectives")
        if recorded is None:
            study.set_user_attr("objectives", wanted)
        elif recorded != wanted:
            raise ConfigError(
                f"hydra.sweeper.objectives: study {study.study_name!r} optimises "
                f"[{', '.join(recorded)}]; keep those or start a new study with "
                "hydra.sweeper.study_name=<name>"
            )

    def _link_parent_run(self, study: optuna.Study) -> None:
        """Show the study's MLflow parent run (claimed by the sweep callback) as a study user
        attribute, for optuna-dashboard and studies read without convnets."""
        context = SweepContext.read(self.sweep_dir)
        if context is not None and study.user_attrs.get(PARENT_ATTR) != context.parent_run_id:
            study.set_user_attr(PARENT_ATTR, context.parent_run_id)

    def _tell(self, study, batch, returns, objectives) -> None:
        from hydra.core.utils import JobStatus
        from optuna.trial import TrialState

        recorded = {t.number: t for t in study.get_trials(deepcopy=False)}
        for trial, ret in zip(batch, returns, strict=True):
            attrs = recorded[trial.number].user_attrs
            metrics = attrs.get(METRICS_ATTR) or {}
            values = [metrics.get(o.name) for o in objectives]
            if attrs.get(PRUNED_ATTR):
                study.tell(trial, state=TrialState.PRUNED)
            elif ret.status == JobStatus.COMPLETED and all(
                isinstance(v, int | float) and math.isfinite(v) for v in values
            ):
                study.tell(trial, values)
            else:  # the job failed (its MLflow run says why) or returned nan
                study.tell(trial, state=TrialState.FAIL)

    def _write_results(self, study: optuna.Study, objectives: Sequence[Objective]) -> None:
        """``optimization_results.yaml`` (and for several objectives ``pareto.csv`` and
        ``pareto.png``) in the sweep dir; the sweep callback logs them on the parent run."""
        from optuna.trial import TrialState

        trials = study.get_trials(deepcopy=False)
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        results = SearchResults(
            study_name=study.study_name,
            objectives=tuple(f"{o.name}:{o.direction[:3]}" for o in objectives),
            trials_complete=len(complete),
            # This process's trials are all told by now: these run in other processes.
            trials_running=sum(t.state == TrialState.RUNNING for t in trials),
        )
        if complete and len(objectives) == 1:
            best = study.best_trial
            results = replace(
                results,
                best_value=best.value,
                best_params=best.params,
                best_trial=best.number,
                best_run_id=best.user_attrs.get(RUN_ATTR),
            )
        elif complete:
            front = {t.number for t in study.best_trials}
            solutions = tuple(
                {
                    "trial": t.number,
                    "run_id": t.user_attrs.get(RUN_ATTR),
                    "values": dict(zip([o.name for o in objectives], t.values, strict=True)),
                    "params": t.params,
                }
                for t in complete
                if t.number in front
            )
            # Runs a resumed study's new trials pushed off the front lose their tag.
            dominated = tuple(
                t.user_attrs[RUN_ATTR]
                for t in complete
                if t.number not in front and RUN_ATTR in t.user_attrs
            )
            results = replace(results, solutions=solutions, dominated_run_ids=dominated)
            write_pareto(complete, front, objectives, self.sweep_dir)
        results.write(self.sweep_dir)
        log.info("search: %d complete trials; results in %s", len(complete), RESULTS_FILE)


def _name_objectives(study: optuna.Study, objectives: Sequence[Objective]) -> None:
    """The objectives' names on the study (optuna-dashboard and ``study.metric_names`` show
    them), once: experimental in Optuna since 3.2, and the only way to name them."""
    import optuna

    names = [o.name for o in objectives]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if study.metric_names != names:
            study.set_metric_names(names)


def write_pareto(
    trials: Sequence[optuna.trial.FrozenTrial],
    front: set[int],
    objectives: Sequence[Objective],
    out_dir: Path,
) -> None:
    """``pareto.csv``: every complete trial, its objectives and whether it is Pareto-optimal;
    ``pareto.png``: the first objective against the second, the front drawn."""
    import csv

    from convnets import plots  # matplotlib only

    names = [o.name for o in objectives]
    with open(out_dir / PARETO_CSV, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["trial", "run_id", *names, "pareto_optimal", "params"])
        for t in trials:
            params = " ".join(f"{k}={override_value(v)}" for k, v in t.params.items())
            row = [t.number, t.user_attrs.get(RUN_ATTR, ""), *t.values, t.number in front]
            writer.writerow([*row, params])
    ys = [t.values[0] for t in trials]
    xs = [t.values[1] for t in trials]
    flip = [1 if o.direction == "maximize" else -1 for o in objectives[:2]]
    front_2d = pareto_2d([y * flip[0] for y in ys], [x * flip[1] for x in xs])
    figure = plots.pareto_scatter(
        xs,
        ys,
        sorted(front_2d, key=lambda i: xs[i]),
        xlabel=names[1],
        ylabel=names[0],
        title=f"Pareto front: {names[0]} ({objectives[0].direction}) vs {names[1]} "
        f"({objectives[1].direction})",
        log_x=names[1] in ("param_count", "macs") and min(xs) > 0,
        labels=[f"#{t.number}" for t in trials],
    )
    figure.savefig(out_dir / PARETO_PNG, dpi=120)


def pareto_2d(better_y: Sequence[float], better_x: Sequence[float]) -> list[int]:
    """Indices of the points no other point beats on both axes (larger is better on both)."""
    return [
        i
        for i, (y, x) in enumerate(zip(better_y, better_x, strict=True))
        if not any(
            (oy >= y and ox >= x) and (oy > y or ox > x)
            for oy, ox in zip(better_y, better_x, strict=True)
        )
    ]


def _redact(url: str) -> str:
    from convnets.tracking import redact

    return redact(url)
