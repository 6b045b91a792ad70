"""A job's link to its Optuna trial, when ``hydra/sweeper=convnets_optuna`` launched it.

The sweeper (:mod:`convnets.search`) writes ``<sweep dir>/optuna_trials/<job num>.json``
(:class:`convnets.sweep_files.TrialFile`) before launching job ``n`` = trial ``n``; the job, in
the sweeper's process (basic launcher) or another one (joblib, submitit, fresh_process),
opens the trial through the shared storage to:

- record its MLflow run id (the sweeper tags the Pareto-optimal runs with it);
- report ``val_accuracy`` after every epoch and learn whether the pruner stops it;
- write its final metrics, from which the sweeper tells the objectives.

No TensorFlow here: the job's Keras callback calls :meth:`TrialLink.report`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from convnets.search_settings import OBJECTIVES, is_search
from convnets.search_storage import make_pruner, open_storage, storage_errors
from convnets.sweep_files import METRICS_ATTR, PRUNED_ATTR, RUN_ATTR, TrialFile


class TrialLink:
    """This job's trial: report per epoch, flag pruning, hand over the final metrics."""

    def __init__(self, spec: TrialFile):
        import optuna

        storage = open_storage(spec.storage, spec.stale_after_s)
        study = optuna.load_study(
            study_name=spec.study_name, storage=storage, pruner=make_pruner(spec.pruner)
        )
        study_id = storage.get_study_id_from_name(spec.study_name)
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, spec.number)
        self.url = spec.storage
        self.number = spec.number
        self.last_epoch = spec.pruner.max_epochs
        # The sweeper asked this trial in its own process; Optuna has no public way to take
        # hold of an asked trial from another one, so the Trial is built on its id (a
        # constructor Optuna calls internally; tests/test_search_cli.py fails if it changes).
        self.trial = optuna.trial.Trial(study, trial_id)
        self.reports = len(study.directions) == 1  # Optuna: no intermediate values otherwise
        self.pruned = False

    def start(self, run_id: str) -> None:
        with storage_errors(self.url):
            self.trial.set_user_attr(RUN_ATTR, run_id)

    def report(self, epoch: int, logs: Mapping[str, Any]) -> bool:
        """Report the epoch's ``val_accuracy``; True when the pruner stops this trial (never
        after the last epoch: the trial is complete then, stopping it saves nothing)."""
        value = logs.get("val_accuracy")
        if not self.reports or value is None or not math.isfinite(float(value)):
            return False
        with storage_errors(self.url):
            self.trial.report(float(value), epoch)
            if epoch < self.last_epoch and self.trial.should_prune():
                self.pruned = True
                self.trial.set_user_attr(PRUNED_ATTR, True)
        return self.pruned

    def finish(self, metrics: Mapping[str, float]) -> None:
        """The final metrics the objectives are taken from (every one of the search's OBJECTIVES)."""
        wanted = {k: float(v) for k, v in metrics.items() if k in OBJECTIVES}
        with storage_errors(self.url):
            self.trial.set_user_attr(METRICS_ATTR, wanted)


def current(hydra_cfg) -> TrialLink | None:
    """The trial of a multirun job (``hydra_cfg``: the job's ``hydra`` config node, as the
    entry point has it), or None (another sweeper's job)."""
    if not is_search(hydra_cfg.sweeper):
        return None
    spec = TrialFile.read(Path(hydra_cfg.sweep.dir).resolve(), hydra_cfg.job.num)
    return TrialLink(spec) if spec is not None else None
