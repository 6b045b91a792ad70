"""What a search leaves for a researcher: ``optimization_results.yaml`` (the best trial, or the
Pareto-optimal ones), ``pareto.csv`` and ``pareto.png`` for several objectives, and the
objectives' names on the study (optuna-dashboard shows ``selected_val_accuracy``, not
"Objective 0")."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Collection, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from convnets.pareto import pareto_front
from convnets.search_settings import Objective
from convnets.search_space import override_value
from convnets.sweep_files import PARETO_CSV, PARETO_PNG, RESULTS_FILE, RUN_ATTR, SearchResults

if TYPE_CHECKING:
    import optuna

log = logging.getLogger(__name__)


def write_results(
    study: optuna.Study,
    objectives: Sequence[Objective],
    sweep_dir: Path,
    stalled: Collection[int] = (),
) -> None:
    """``optimization_results.yaml`` (and for several objectives ``pareto.csv`` and
    ``pareto.png``) in the sweep dir; the sweep callback logs them on the parent run.
    ``stalled``: RUNNING trials no live process runs (not counted as running elsewhere)."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    results = SearchResults(
        study_name=study.study_name,
        objectives=tuple(f"{o.name}:{o.direction[:3]}" for o in objectives),
        trials_complete=len(complete),
        # This process's trials are all told by now: these run in other processes.
        trials_running=sum(
            t.state == TrialState.RUNNING and t.number not in stalled for t in trials
        ),
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
        write_pareto(complete, front, objectives, sweep_dir)
    results.write(sweep_dir)
    log.info("search: %d complete trials; results in %s", len(complete), RESULTS_FILE)


def name_objectives(study: optuna.Study, objectives: Sequence[Objective]) -> None:
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
    # pareto_front minimises x and maximises y: flip the objectives that go the other way.
    y_sign = 1 if objectives[0].direction == "maximize" else -1
    x_sign = 1 if objectives[1].direction == "minimize" else -1
    front_2d = pareto_front([x * x_sign for x in xs], [y * y_sign for y in ys])
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
