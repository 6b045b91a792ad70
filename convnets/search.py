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
  ``fail_stale_trials`` with ``RetryFailedTrialCallback``); a rerun before then says which
  trials no live process runs and when they are retried, and counts them in flight, not done
  (:mod:`convnets.trial_liveness`);
- several processes (or a parallel launcher) on one storage ask distinct trials from it.

Trial ``n`` runs as Hydra job ``n`` (``hydra.job.num``). The job finds its trial through
``<sweep dir>/optuna_trials/<n>.json`` (:class:`convnets.sweep_files.TrialFile`, read in
:mod:`convnets.trials`), reports each epoch's ``val_accuracy`` (pruning) and writes its final
metrics to the trial's user attributes, from which the objectives are told (each the run's
final metric of that name: ``selected_val_accuracy``, the epoch it tested, is not the last
epoch's ``val_accuracy``). The results go to ``optimization_results.yaml``
(:class:`convnets.sweep_files.SearchResults`), which the sweep callback logs on the parent
run. The study's objectives carry their names (``Study.metric_names``), so optuna-dashboard
shows ``selected_val_accuracy``, not "Objective 0". Neither Optuna, MLflow nor TensorFlow is
imported at module import: Hydra imports the plugin in every launch.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig

from convnets import folder_lock, trial_liveness
from convnets.search_report import name_objectives, write_results
from convnets.search_settings import HEARTBEAT_S, check, warn_of_a_searched_seed
from convnets.search_space import parse_space, space_overrides, trial_overrides
from convnets.search_storage import (
    MAX_RETRY,
    PARENT_ATTR,
    make_pruner,
    make_sampler,
    open_storage,
    redact_url,
    retry_callback,
    storage_errors,
    storage_url,
    study_name,
)
from convnets.sweep_files import (
    METRICS_ATTR,
    PRUNED_ATTR,
    RUN_ATTR,
    PrunerSpec,
    SweepContext,
    TrialFile,
)

if TYPE_CHECKING:
    import optuna

log = logging.getLogger(__name__)


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


def counted_trials(trials: Sequence[optuna.trial.FrozenTrial]) -> int:
    """Trials that use up ``n_trials``: finished, failed or running (maybe in another
    process); not waiting ones, nor a failed trial that was enqueued again (its retry counts)."""
    from optuna.exceptions import ExperimentalWarning
    from optuna.trial import TrialState

    with warnings.catch_warnings():  # "experimental" since Optuna 2.8
        warnings.simplefilter("ignore", ExperimentalWarning)
        retried = {retry_callback().retried_trial_number(t) for t in trials}
    live = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
    return sum(
        t.state in live or (t.state == TrialState.FAIL and t.number not in retried) for t in trials
    )


def trial_id(storage: Any, study: str, number: int) -> int:
    """A trial's id in its storage (what heartbeats are recorded against), through the
    storage's public API: ``Trial`` keeps it only in a private attribute."""
    return storage.get_trial_id_from_study_id_trial_number(
        storage.get_study_id_from_name(study), number
    )


class _Heartbeat:
    """Records a heartbeat for each trial in flight every HEARTBEAT_S, from a thread of the
    sweeper's process (alive while its jobs run, whatever the launcher).

    Optuna records heartbeats itself only inside ``study.optimize``, which runs the objective
    in this process; a search launches its trials as Hydra jobs through ask/tell, so it calls
    the storage's public ``record_heartbeat`` (tests/test_search_cli.py checks that Optuna's
    ``fail_stale_trials`` still takes such a trial for alive, and a silent one for dead)."""

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
            retry = retry_callback()(max_retry=MAX_RETRY)
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
        settings, objectives = check(self.config)
        url = storage_url(settings, self.config)
        with storage_errors(url):  # a storage lost mid-search: one line, the study kept
            self._run(settings, objectives, url, arguments)

    def _run(self, settings, objectives, url: str, arguments: Sequence[str]) -> None:
        import optuna

        space, fixed = parse_space(space_overrides(settings.params, arguments))
        warn_of_a_searched_seed(space)
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
        name_objectives(study, objectives)
        self._fail_dead_trials(study)
        # Trials no live process runs before they are stale keep their place, but not as done.
        stalled = trial_liveness.report(study, storage, url, settings.stale_after_s)
        done = counted_trials(study.get_trials(deepcopy=False))
        study.sampler = make_sampler(settings, done, len(study.get_trials(deepcopy=False)))
        self._link_parent_run(study)
        in_flight = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)))
        if done >= settings.n_trials:
            log.warning(
                "search: study %s has %d trials already, hydra.sweeper.n_trials=%d: none to "
                "run; raise n_trials to add trials",
                name, done, settings.n_trials,
            )  # fmt: skip
        log.info(
            "search: study %s in %s: %d of %d trials done, %d in flight (%d without a live "
            "process), objectives %s, pruner %s",
            name, redact_url(url), done - in_flight, settings.n_trials, in_flight, len(stalled),
            ", ".join(settings.objectives), settings.pruner,
        )  # fmt: skip
        while (left := settings.n_trials - counted_trials(study.get_trials(deepcopy=False))) > 0:
            with warnings.catch_warnings():  # heartbeats outside optimize(): see _Heartbeat
                warnings.filterwarnings("ignore", "Heartbeat of storage", UserWarning)
                trials = [study.ask(space) for _ in range(min(settings.n_jobs, left))]
            for trial in trials:  # who runs it: a rerun tells a trial whose process is gone
                trial.set_user_attr(trial_liveness.PROCESS_ATTR, folder_lock.this_process())
            by_number = {t.number: t for t in trials}
            with (
                _Heartbeat(storage, [trial_id(storage, name, t.number) for t in trials]),
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
        stalled = trial_liveness.find_stalled(study, storage, url, settings.stale_after_s)
        write_results(study, objectives, self.sweep_dir, stalled={t.number for t in stalled})

    def _fail_dead_trials(self, study: optuna.Study) -> None:
        """Trials whose process died (no heartbeat): FAIL, enqueued again, their MLflow runs
        ended KILLED when still RUNNING (a SIGKILL left them so)."""
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
                    run_id = trial.user_attrs[RUN_ATTR]
                    # A run that ended itself (FAILED with its cause, e.g. the storage lost)
                    # keeps its status and reason: only a run left RUNNING is ended here.
                    if tracker.get_run(run_id).info.status == "RUNNING":
                        tracker.end_run(run_id, "KILLED", reason)

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
