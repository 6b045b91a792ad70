"""Comparing runs: accuracy against parameter count and receptive field, with Pareto fronts.

``python evaluate.py compare=<experiment or sweep parent run id>`` and the sweep summary draw
from here. Pandas, matplotlib and MLflow (through :class:`~convnets.tracking.Tracker`), no
TensorFlow: a sweep's launcher process summarises without loading it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from convnets import plots, statistics
from convnets.config import RUNTIME_KEYS
from convnets.errors import ConfigError, TrackingError, command, shell_override, warn
from convnets.pareto import pareto_front
from convnets.sweep_files import is_parent
from convnets.tracking import Tracker

log = logging.getLogger(__name__)

COMPARE_DIR = "compare"  # artifact folder of the compare report on a sweep parent run
METRIC_COLUMNS = (
    "test_accuracy",
    "selected_val_accuracy",  # the validation accuracy of the epoch tested (a search's objective)
    "param_count",
    "receptive_field",
    "effective_receptive_field",
    "macs",
)
# Parameters that differ between runs without being a design choice.
# Where and how a run ran (the runtime keys a rerun may change: where the data lives, the
# devices), not what it trained: a reproduction on another machine is the same configuration.
_NOISE_PARAMS = ("hydra.", "reproduce", "resume", *RUNTIME_KEYS)  # tracking.* among them
# Derived from the stack (logged as params so that MLflow can group by them): not a choice.
_NOISE_PARAMS += ("receptive_field", "depth")


def runs_table(runs: pd.DataFrame) -> pd.DataFrame:
    """``mlflow.search_runs`` output -> one row per run, best test accuracy first.

    Columns: ``run_id``, ``name``, the params whose values differ between the runs (without
    the ``params.`` prefix; their names also in ``table.attrs["params"]``; a param only some
    runs have differs), ``trainer.seed``, then :data:`METRIC_COLUMNS` (NaN where a run lacks
    one), ``erf_saturated`` and ``start_time``.
    """
    # Sorted: mlflow.search_runs orders its params columns by a set of names, so by the
    # process's hash seed; the group labels made of them must read the same every time.
    params = sorted(
        c
        for c in runs.columns
        if c.startswith("params.")
        and not c[len("params.") :].startswith(_NOISE_PARAMS)
        and runs[c].nunique(dropna=False) > 1  # set in some runs only (a deeper stack): differs
    )
    table = pd.DataFrame(
        {
            "run_id": runs["run_id"],
            "name": runs.get("tags.mlflow.runName", pd.Series("", index=runs.index)),
        }
    )
    for c in params:
        table[c[len("params.") :]] = runs[c]
    table.attrs["params"] = [c[len("params.") :] for c in params]
    if f"params.{statistics.SEED}" in runs:  # also when it does not differ: a seed run twice
        table[statistics.SEED] = runs[f"params.{statistics.SEED}"]
    for m in METRIC_COLUMNS:
        table[m] = runs.get(f"metrics.{m}", pd.Series(np.nan, index=runs.index))
    table["selected_val_accuracy"] = selected_val_accuracy(runs)
    # When each run started: the seed groups keep a seed's earliest run (the original).
    table["start_time"] = runs.get("start_time", pd.Series(pd.NaT, index=runs.index))
    # The measured ERF filled the whole image: it says nothing about the stack beyond that.
    saturated = runs.get("tags.erf_saturated", pd.Series(None, index=runs.index))
    table["erf_saturated"] = saturated.astype(str).eq("true")
    return table.sort_values("test_accuracy", ascending=False, kind="stable").reset_index(drop=True)


def selected_val_accuracy(runs: pd.DataFrame) -> pd.Series:
    """Each run's ``selected_val_accuracy`` (``mlflow.search_runs`` output): the validation
    accuracy of the epoch whose weights were tested and logged.

    A run recorded before that metric existed lacks it; its record still says which epoch it
    tested, so it gets the same figure: ``best_val_accuracy`` when it ran with
    ``trainer.restore_best=true`` and had a best epoch (the weights it restored), else its
    ``val_accuracy`` (MLflow's latest value: the last epoch's). NaN without validation data,
    and for a run that tested nothing (failed, or stopped by a search's pruner).
    """
    nan = pd.Series(np.nan, index=runs.index)
    selected = runs.get("metrics.selected_val_accuracy", nan)
    restored = runs.get("params.trainer.restore_best", nan).astype(str).str.lower().eq("true")
    best = runs.get("metrics.best_val_accuracy", nan).where(restored)
    older = best.fillna(runs.get("metrics.val_accuracy", nan))
    tested = runs.get("metrics.test_accuracy", nan).notna()
    return selected.fillna(older.where(tested)).astype(float)


def summary_figures(runs: pd.DataFrame, out_dir: str | Path) -> dict[str, Path]:
    """Test accuracy vs parameter count (log x, coloured by receptive field) and vs receptive
    field (coloured by parameter count), Pareto fronts marked; also vs the effective
    receptive field when runs have it. Returns ``{figure name: PNG path}``.

    ``runs``: :func:`runs_table` output or any frame with columns ``test_accuracy``,
    ``param_count``, ``receptive_field`` (optionally ``effective_receptive_field`` and a
    ``name``/``run_name`` for labels); rows without a test accuracy (failed jobs) are left
    out. ``mlflow.search_runs`` output is converted, so points are labelled by the params
    that differ between the runs.
    """
    if "metrics.test_accuracy" in runs.columns:
        runs = runs_table(runs)
    runs = runs[runs["test_accuracy"].notna()].reset_index(drop=True)
    out_dir = Path(out_dir)
    labels = _point_labels(runs)
    acc = runs["test_accuracy"].to_numpy(float)
    specs = [
        (
            "accuracy_vs_params",
            "param_count",
            "parameters (log scale)",
            True,
            "receptive_field",
            "receptive field (pixels)",
        ),
        (
            "accuracy_vs_receptive_field",
            "receptive_field",
            "theoretical receptive field (pixels)",
            False,
            "param_count",
            "parameters",
        ),
        (
            "accuracy_vs_effective_receptive_field",
            "effective_receptive_field",
            "effective receptive field (pixels, 95% of the gradient)",
            False,
            "param_count",
            "parameters",
        ),
    ]
    paths: dict[str, Path] = {}
    saturated = runs.get("erf_saturated", pd.Series(False, index=runs.index)).astype(bool)
    for name, x_col, x_label, log_x, c_col, c_label in specs:
        if x_col not in runs.columns or runs[x_col].isna().all():
            continue
        if x_col == "effective_receptive_field" and saturated.all():
            continue  # every run's ERF filled the image: the x axis would say only that
        x = runs[x_col].to_numpy(float)
        color = runs[c_col].to_numpy(float) if c_col in runs.columns else None
        front = pareto_front(x, acc)
        fig = plots.pareto_scatter(
            x,
            acc,
            front,
            xlabel=x_label,
            title=f"Test accuracy vs {x_label.split(' (')[0]} ({len(runs)} runs; "
            "front: best accuracy for its cost)",
            color=color,
            color_label=c_label,
            log_x=log_x,
            labels=labels,
        )
        paths[name] = plots.save(fig, out_dir / f"{name}.png")
    return paths


LABEL_LIMIT = 30  # characters of a point label; longer ones give way to the job's number
RUN_ID_SHOWN = 6  # characters of a run id that label its point when nothing shorter does


def _point_labels(runs: pd.DataFrame) -> list[str] | None:
    """What tells the runs apart: the differing params (``kernel_size=5``) that
    :func:`runs_table` found, else the run name; when those are long (several keys, long
    floats), the job's or trial's number from its run name (``j03``, ``t05``; the CSV beside
    the figure has its overrides) when no two runs share one (runs of several sweeps do),
    else the start of the run id (``83ea41``), which the CSV and MLflow's UI show too."""
    names = next(
        (list(runs[col].astype(str)) for col in ("name", "run_name") if col in runs.columns),
        None,
    )
    params = runs.attrs.get("params")
    labels = names
    if params:
        short = {c: c.removeprefix("model.").removeprefix("layer_defaults.") for c in params}
        labels = [", ".join(f"{short[c]}={row[c]}" for c in params) for _, row in runs.iterrows()]
    if labels is None or max(map(len, labels), default=0) <= LABEL_LIMIT:
        return labels
    numbers = [
        match[0] if (match := re.match(r"[jt]\d+\b", name)) else None for name in names or []
    ]
    if names and all(numbers) and len(set(numbers)) == len(numbers):
        return numbers
    if "run_id" in runs.columns:
        return [str(run_id)[:RUN_ID_SHOWN] for run_id in runs["run_id"]]
    return [f"#{i + 1}" for i in range(len(labels))]


@dataclass
class CompareReport:
    table: pd.DataFrame  # one row per run
    csv: Path
    figures: dict[str, Path]
    parent_run_id: str | None = None  # set when the report was logged to a sweep parent
    groups: pd.DataFrame | None = None  # one row per seed group (statistics.groups_table)
    groups_csv: Path | None = None


def _finished_runs(tracker: Tracker, target: str) -> tuple[pd.DataFrame, str | None]:
    """FINISHED runs of experiment ``target``, or the children of run ``target``."""
    parent = None
    if re.fullmatch(r"[0-9a-f]{32}", target):
        with contextlib.suppress(TrackingError):
            parent = tracker.get_run(target, key="compare")
    if parent is not None and not is_parent(parent.data.tags):
        experiment = tracker.client.get_experiment(parent.info.experiment_id).name
        raise ConfigError(
            f"compare={target}: that is a single run, not a sweep's or search's parent run; "
            f"compare the runs of its experiment with {shell_override('compare', experiment)}, "
            f"or evaluate this one with run_id={target}"
        )
    if parent is not None:
        runs = tracker.search_runs(
            [parent.info.experiment_id],
            filter_string=(
                f"tags.`mlflow.parentRunId` = '{target}' and attributes.status = 'FINISHED'"
            ),
        )
        where = f"compare={target}: the sweep parent run has no FINISHED child runs"
    else:
        experiment = tracker.get_experiment_by_name(target)
        if experiment is None:
            raise TrackingError(
                f"compare={target}: no experiment of that name and no run with that id in "
                f"{tracker.shown_uri}; check tracking.uri, or list experiments with "
                "`mlflow experiments search`"
            )
        if experiment.lifecycle_stage == "deleted":
            raise TrackingError(
                f"compare={target}: the experiment {target!r} is deleted in "
                f"{tracker.shown_uri}; restore it with `mlflow experiments restore "
                f"--experiment-id {experiment.experiment_id}`, or compare another"
            )
        runs = tracker.search_runs(
            [experiment.experiment_id], filter_string="attributes.status = 'FINISHED'"
        )
        # Sweep parents sit in the experiment next to their jobs; they are not runs to compare.
        if len(runs) and "tags.mlflow.parentRunId" in runs.columns:
            runs = runs[~runs["run_id"].isin(set(runs["tags.mlflow.parentRunId"].dropna()))]
        where = f"compare={target}: experiment {target!r} has no FINISHED runs"
    if len(runs) and "metrics.test_accuracy" in runs.columns:
        runs = runs[runs["metrics.test_accuracy"].notna()]
    else:
        runs = runs.iloc[0:0]
    if len(runs) == 0:
        raise TrackingError(f"{where} with a test_accuracy; train some first ({command('train')})")
    return runs.reset_index(drop=True), parent.info.run_id if parent is not None else None


def compare(
    tracker: Tracker, target: str, out_dir: str | Path, baseline: str | None = None
) -> CompareReport:
    """Comparison report of an experiment's (or a sweep parent's) FINISHED runs.

    Writes ``runs.csv`` (:func:`runs_table`, plus ``pareto_params`` / ``pareto_rf``: whether
    the run is on the front of accuracy vs parameters / vs receptive field), ``groups.csv``
    (runs that differ only in ``trainer.seed`` as one row: n, mean, std, 95% CI; the Pareto
    front of the means; with ``baseline``, each group's verdict against the baseline group
    and the test used) and the :func:`summary_figures` PNGs plus the group means with error
    bars to ``out_dir``; when ``target`` is a run id they are also logged to that run under
    ``compare/``.
    """
    runs, parent_id = _finished_runs(tracker, target)
    table = runs_table(runs)
    if "dataset.name" in table.attrs["params"]:  # accuracies on different test sets
        names = ", ".join(sorted(table["dataset.name"].astype(str).unique()))
        warn(
            f"compare={target}: the runs trained on different datasets ({names}), so "
            "the fronts and groups weigh accuracies on different test sets against each "
            "other; record each dataset's runs in an experiment of its own "
            "(tracking.experiment=...)"
        )
    acc = table["test_accuracy"]
    for flag, col in (("pareto_params", "param_count"), ("pareto_rf", "receptive_field")):
        on_front = set(pareto_front(table[col], acc))
        table[flag] = [i in on_front for i in range(len(table))]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv = out_dir / "runs.csv"
    table.to_csv(csv, index=False)
    figures = summary_figures(table, out_dir)
    _check_baseline_run(tracker, baseline, table)
    groups, groups_csv, group_figure = seed_groups(table, out_dir, baseline)
    if group_figure is not None:
        figures["groups_accuracy_vs_params"] = group_figure
    for line in group_lines(groups):
        print(line, flush=True)
    if parent_id is not None:
        for path in (csv, groups_csv, *figures.values()):
            tracker.log_artifact_to(parent_id, path, COMPARE_DIR)
    log.info("compare: %d runs in %d groups; report in %s", len(table), len(groups), out_dir)
    return CompareReport(table, csv, figures, parent_id, groups, groups_csv)


def _check_baseline_run(tracker: Tracker, baseline: str | None, table: pd.DataFrame) -> None:
    """A ``baseline`` that is the id of a run left out of the comparison (not FINISHED, or
    without a test accuracy) says so, rather than 'not a run id of the compared runs'."""
    if baseline is None or not re.fullmatch(r"[0-9a-f]{32}", str(baseline)):
        return
    if str(baseline) in set(table["run_id"]):
        return
    with contextlib.suppress(TrackingError):
        run = tracker.get_run(str(baseline), key="baseline")
        if run.info.status != "FINISHED":
            why = f"it is {run.info.status}"
        elif "test_accuracy" not in run.data.metrics:
            why = "it has no test_accuracy"
        else:
            return  # another experiment's run: baseline_group says what the groups are
        raise ConfigError(
            f"baseline={baseline}: that run is not among the compared runs ({why}; only "
            "FINISHED runs with a test accuracy are compared): name a finished run of the "
            "baseline configuration, or its group label"
        )


def seed_groups(
    table: pd.DataFrame, out_dir: Path, baseline: str | None = None
) -> tuple[pd.DataFrame, Path, Path | None]:
    """Runs that differ only in ``trainer.seed`` as one row each (n, mean, std, 95% CI; the
    Pareto front of the means; with ``baseline``, each group's verdict against it and the
    test used): ``(groups, groups.csv, the figure of the means with error bars)``; no figure
    when the runs record no parameter count.
    ``table``: :func:`runs_table` output."""
    groups = statistics.groups_table(table)
    groups["pareto_params"] = False
    groups.loc[
        pareto_front(groups["param_count"], groups["test_accuracy_mean"]), "pareto_params"
    ] = True
    if baseline is not None:
        try:
            base = statistics.baseline_group(groups, str(baseline), table)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        groups = statistics.verdicts(groups, table, base)
    groups_csv = out_dir / "groups.csv"
    groups.to_csv(groups_csv, index=False)
    if "param_count" not in groups or groups["param_count"].isna().all():
        return groups, groups_csv, None  # nothing to place the groups on
    return groups, groups_csv, _group_figure(groups, out_dir)


def _group_figure(groups: pd.DataFrame, out_dir: Path) -> Path:
    front = pareto_front(groups["param_count"], groups["test_accuracy_mean"])
    fig = plots.group_means(
        groups["param_count"],
        groups["test_accuracy_mean"],
        groups["test_accuracy_ci_low"],
        groups["test_accuracy_ci_high"],
        groups["n"].tolist(),
        front,
        xlabel="parameters (log scale)",
        title=f"Test accuracy per configuration ({len(groups)} group"
        f"{'s' if len(groups) != 1 else ''}; seeds pooled)",
        log_x=True,
    )
    return plots.save(fig, out_dir / "groups_accuracy_vs_params.png")


def group_lines(groups: pd.DataFrame) -> list[str]:
    """One line a group: ``g1 width=1.0: n=3 test_accuracy 0.95 +- 0.01 (95% CI ...)``."""
    lines = []
    tested = int(np.isfinite(groups["p_value"].to_numpy(float)).sum()) if "p_value" in groups else 0
    for _, row in groups.iterrows():
        text = (
            f"{row['label']} {row['group']}: n={row['n']} test_accuracy "
            f"{row['test_accuracy_mean']:.4f}"
        )
        if row["n"] >= 2:
            text += (
                f" +- {row['test_accuracy_std']:.4f} (95% CI {row['test_accuracy_ci_low']:.4f}"
                f"..{row['test_accuracy_ci_high']:.4f})"
            )
        else:
            text += " (one run: no interval)"
        if "verdict" in groups:
            text += f"; {row['verdict']}"
            if math.isfinite(row["p_value"]):
                text += f" ({row['test']}, p={row['p_value']:.3g}"
                if tested > 1:
                    text += f", Holm-adjusted for {tested} tests p={row['p_holm']:.3g}"
                text += ")"
        lines.append(text)
    repeated = groups.attrs.get("repeated_seed_runs", [])
    if repeated:
        lines.append(
            f"note: {len(repeated)} run(s) repeat the seed of an earlier run of their "
            f"configuration (a reproduction, or the same command again): each seed counts once "
            f"in its group; left out: {' '.join(repeated)}"
        )
    return lines
