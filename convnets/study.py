"""``python train.py -m reproduce=<sweep or search parent run id>``: a whole study, again.

Every job of the study that finished (a search's pruned trials are left out: they have no
final result) is trained again from its recorded config, each as ``reproduce=<its run id>``
does for one run (same name with ``-reproduce``, its verdict), under this multirun's new
parent, which is tagged ``reproduces=<the original parent>``. Then, for the study, one
printed line and the new parent's record: whether the best job is the same one (by the
objective the sweep picks its best by), the Spearman rank correlation of the jobs' test
accuracies, and which jobs entered or left the accuracy-vs-parameters Pareto front.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from omegaconf import DictConfig

from convnets.errors import TrackingError
from convnets.sweep_files import is_parent, is_search_parent


def study_parent(cfg: DictConfig):
    """The run ``reproduce=`` names when it is a sweep's or a search's parent, else None (an
    unknown id is the job's plan to refuse, as for one run)."""
    if not cfg.get("reproduce"):
        return None
    try:
        run = _store(cfg).get_run(str(cfg.reproduce), key="reproduce")
    except TrackingError:
        return None
    return run if is_parent(run.data.tags) else None


def reproduce(cfg: DictConfig, context, parent):
    """Reproduce every finished job of ``parent``'s study under ``context``'s sweep; returns
    the reproduction of the original best job (None when it failed)."""
    from convnets import job

    tracker = _store(cfg)
    parent_id = parent.info.run_id
    originals = tracker.finished_study_jobs(parent)
    if context.sweep is not None:
        tracker.set_tags_on(context.sweep.parent_run_id, {"reproduces": parent_id})
    reproduced = {}
    for number, original in originals:
        child_cfg = cfg.copy()
        child_cfg.reproduce = original.info.run_id
        # Named by what the original job ran, not by this command's reproduce=<parent>: the
        # new parent's jobs.csv and best_overrides then say which configuration each is.
        ran = original.data.tags.get("sweep_overrides")
        sweep = context.sweep and dataclasses.replace(
            context.sweep, job_num=number, overrides=(ran,) if ran else context.sweep.overrides
        )
        child_context = dataclasses.replace(context, sweep=sweep)
        reproduced[number] = job.train(child_cfg, child_context)  # its own MLflow recorder
    searched = is_search_parent(parent.data.tags)  # its jobs are trials: t03
    line, record = summary(
        [(n, run.data.metrics) for n, run in originals],
        {n: run.metrics for n, run in reproduced.items() if run is not None},
        prefix="t" if searched else "j",
    )
    print(f"study {parent_id}: {line}", flush=True)
    if context.sweep is not None:
        tracker.set_tags_on(context.sweep.parent_run_id, record["tags"])
        if record["metrics"]:
            tracker.log_metrics_to(context.sweep.parent_run_id, record["metrics"])
    best = record["best_original"]
    return reproduced.get(best)


def _store(cfg: DictConfig):
    from convnets.tracking import open_store

    return open_store(cfg.tracking.uri, http_timeout_s=cfg.tracking.http_timeout_s)


def objective(metrics: dict[str, float]) -> float:
    """What a sweep picks its best job by: ``selected_val_accuracy``, the validation accuracy
    of the epoch the job tested. A job recorded before that metric existed: what its sweep
    picked by then, its best epoch's validation accuracy, else its last epoch's."""
    older = metrics.get("best_val_accuracy", metrics.get("val_accuracy", math.nan))
    return metrics.get("selected_val_accuracy", older)


def summary(
    originals: Sequence[tuple[int, dict[str, float]]],
    reproduced: dict[int, dict[str, float]],
    prefix: str = "j",
) -> tuple[str, dict]:
    """The study line and the new parent's record, from each job's metrics (originals in job
    order; reproduced by job number, a failed one missing). ``prefix``: how the study's run
    names number its jobs (``j03``; a search's trials ``t03``)."""
    from scipy import stats

    from convnets.pareto import pareto_front

    numbers = [n for n, _ in originals]
    before = dict(originals)
    best_before = max(numbers, key=lambda n: _finite(objective(before[n])))
    done = [n for n in numbers if n in reproduced]
    parts, tags, metrics = [], {}, {}
    if not math.isfinite(objective(before[best_before])):  # trained without validation data
        parts.append("no best job (no validation accuracy to choose one by)")
        tags["reproduce_same_best"] = "unknown"
    elif best_before in reproduced:
        best_after = max(done, key=lambda n: _finite(objective(reproduced[n])))
        same = best_after == best_before
        parts.append(
            f"same best ({prefix}{best_before:02d})"
            if same
            else f"best changed ({prefix}{best_before:02d} -> {prefix}{best_after:02d})"
        )
        tags["reproduce_same_best"] = str(same).lower()
    else:
        parts.append(f"the best job {prefix}{best_before:02d} failed to reproduce")
        tags["reproduce_same_best"] = "unknown"
    accuracy_before = [before[n]["test_accuracy"] for n in done]
    accuracy_after = [reproduced[n]["test_accuracy"] for n in done]
    if accuracy_before == accuracy_after:
        rho = 1.0  # also when every job scored the same (Spearman is undefined there)
    elif len(done) >= 2:
        rho = float(stats.spearmanr(accuracy_before, accuracy_after).statistic)
    else:
        rho = math.nan
    parts.append(f"rank correlation {rho:.2f} (Spearman, test_accuracy of {len(done)} jobs)")
    if math.isfinite(rho):
        metrics["reproduce_rank_correlation"] = rho
    params = [before[n].get("param_count", math.nan) for n in done]
    front_before = {done[i] for i in pareto_front(params, accuracy_before)}
    front_after = {done[i] for i in pareto_front(params, accuracy_after)}
    changed = [f"+{prefix}{n:02d}" for n in sorted(front_after - front_before)]
    changed += [f"-{prefix}{n:02d}" for n in sorted(front_before - front_after)]
    parts.append(f"Pareto front changed: {' '.join(changed)}" if changed else "same Pareto front")
    tags["reproduce_pareto_changed"] = " ".join(changed) or "none"
    failed = [n for n in numbers if n not in reproduced]
    if failed:
        parts.append(f"{len(failed)} job(s) failed: {' '.join(f'{prefix}{n:02d}' for n in failed)}")
    return "; ".join(parts), {"tags": tags, "metrics": metrics, "best_original": best_before}


def _finite(value: float) -> float:
    return value if math.isfinite(value) else -math.inf
