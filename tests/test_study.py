"""The study line of ``-m reproduce=<parent>``, from the jobs' metrics alone."""

from __future__ import annotations

import pytest

from convnets.study import objective, summary


def job(val: float, test: float, params: int = 100) -> dict[str, float]:
    return {"selected_val_accuracy": val, "test_accuracy": test, "param_count": params}


ORIGINAL = [(0, job(0.90, 0.91, 100)), (1, job(0.95, 0.94, 200)), (2, job(0.80, 0.85, 50))]


def test_an_identical_study_keeps_its_best_its_ranks_and_its_front():
    line, record = summary(ORIGINAL, dict(ORIGINAL))
    assert line == (
        "same best (j01); rank correlation 1.00 (Spearman, test_accuracy of 3 jobs); "
        "same Pareto front"
    )
    assert record["tags"] == {"reproduce_same_best": "true", "reproduce_pareto_changed": "none"}
    assert record["metrics"] == {"reproduce_rank_correlation": 1.0}
    assert record["best_original"] == 1


def test_a_study_whose_results_moved_says_what_changed():
    again = {0: job(0.97, 0.96, 100), 1: job(0.93, 0.95, 200), 2: job(0.80, 0.80, 50)}
    line, record = summary(ORIGINAL, again)
    assert line.startswith("best changed (j01 -> j00); rank correlation 0.50 (Spearman")
    # j01 (200 params, 0.95) is beaten by j00 (100 params, 0.96): it leaves the front
    assert line.endswith("Pareto front changed: -j01")
    assert record["tags"]["reproduce_same_best"] == "false"
    assert record["metrics"]["reproduce_rank_correlation"] == pytest.approx(0.5)


def test_a_job_that_failed_to_reproduce_is_named():
    line, record = summary(ORIGINAL, {0: job(0.9, 0.91), 2: job(0.8, 0.85, 50)})
    assert line.startswith("the best job j01 failed to reproduce;")
    assert line.endswith("1 job(s) failed: j01")
    assert record["tags"]["reproduce_same_best"] == "unknown"


def test_the_best_job_is_picked_by_the_tested_epochs_validation_accuracy():
    # the last epoch's val_accuracy (higher here) is not what a sweep picks by
    assert objective({"selected_val_accuracy": 0.9, "val_accuracy": 0.95}) == 0.9
    # a job recorded before selected_val_accuracy existed: what its sweep picked by then
    assert objective({"best_val_accuracy": 0.8, "val_accuracy": 0.85}) == 0.8
    assert objective({"val_accuracy": 0.85}) == 0.85


def test_a_study_trained_without_validation_data_has_no_best_job():
    """Jobs of dataset.val_fraction=0 have no selected_val_accuracy: there is no best job to
    keep or lose, so the line says so instead of 'same best (j00)'."""
    blind = [(n, {"test_accuracy": acc, "param_count": 100}) for n, acc in enumerate((0.8, 0.9))]
    line, record = summary(blind, dict(blind))
    assert line.startswith("no best job (no validation accuracy to choose one by); rank")
    assert record["tags"]["reproduce_same_best"] == "unknown"


def test_a_searchs_study_line_numbers_its_trials_as_their_runs_do():
    again = {0: job(0.90, 0.91, 100), 1: job(0.80, 0.94, 200), 2: job(0.97, 0.85, 50)}
    line, _ = summary(ORIGINAL, again, prefix="t")
    assert line.startswith("best changed (t01 -> t02)")
