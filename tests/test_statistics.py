"""Runs read as seed groups: n, mean, std and a 95% t interval per configuration, Welch's
t-test against a baseline group, and the whole report through ``convnets.compare``."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from conftest import sqlite_store
from scipy import stats as scipy_stats

import convnets
from convnets import statistics
from convnets.errors import ConfigError, TrackingError


def table(rows: list[tuple[float, int, float]]) -> pd.DataFrame:
    """(width, seed, test_accuracy) rows as runs_table gives them."""
    frame = pd.DataFrame(
        {
            "run_id": [f"r{i}" for i in range(len(rows))],
            "model.width": [w for w, _, _ in rows],
            "trainer.seed": [s for _, s, _ in rows],
            "test_accuracy": [a for _, _, a in rows],
            "selected_val_accuracy": [a - 0.01 for _, _, a in rows],
            "param_count": [1000 * w for w, _, _ in rows],
        }
    )
    frame.attrs["params"] = ["model.width", "trainer.seed"]
    return frame


def test_groups_pool_the_seeds_with_a_t_interval():
    runs = table([(1, 2, 0.94), (1, 0, 0.90), (1, 10, 0.92), (2, 0, 0.97), (3, 0, 0.5)])
    groups = statistics.groups_table(runs)
    assert list(groups["group"]) == ["width=2", "width=1", "width=3"]  # best mean first
    one = groups.set_index("group").loc["width=1"]
    assert one["n"] == 3 and one["seeds"] == "0 2 10"  # in order, as numbers
    assert one["run_ids"] == "r1 r0 r2"  # in the seeds' order
    values = np.array([0.90, 0.92, 0.94])
    half = scipy_stats.t.ppf(0.975, 2) * values.std(ddof=1) / math.sqrt(3)
    assert one["test_accuracy_mean"] == pytest.approx(0.92)
    assert one["test_accuracy_std"] == pytest.approx(0.02)
    assert one["test_accuracy_ci_low"] == pytest.approx(0.92 - half)
    assert one["test_accuracy_ci_high"] == pytest.approx(0.92 + half)
    assert one["selected_val_accuracy_mean"] == pytest.approx(0.91)
    assert one["selected_val_accuracy_ci_low"] == pytest.approx(0.91 - half)
    single = groups.set_index("group").loc["width=2"]
    assert single["n"] == 1 and math.isnan(single["test_accuracy_ci_low"])


def test_welch_verdicts_against_a_baseline():
    runs = table(
        [(1, s, a) for s, a in enumerate([0.90, 0.91, 0.92, 0.90])]
        + [(2, s, a) for s, a in enumerate([0.97, 0.98, 0.97, 0.98])]
        + [(3, s, a) for s, a in enumerate([0.89, 0.93, 0.90, 0.91])]
        + [(4, 0, 0.99)]
    )
    groups = statistics.groups_table(runs)
    base = statistics.baseline_group(groups, "r0")  # a run id names its group
    assert groups.loc[base, "group"] == "width=1"
    judged = statistics.verdicts(groups, runs, base).set_index("group")
    assert judged.loc["width=1", "verdict"] == "baseline"
    assert judged.loc["width=2", "verdict"] == "better" and judged.loc["width=2", "p_holm"] < 0.05
    assert judged.loc["width=3", "verdict"] == "indistinguishable"
    assert judged.loc["width=4", "verdict"].startswith("no test: this group has one run")
    tested = judged["p_value"].notna()
    assert set(judged.loc[tested, "test"]) == {"Welch's t-test"}
    assert set(judged.loc[~tested, "test"]) == {""}  # the baseline, the one-run group
    expected = scipy_stats.ttest_ind([0.97, 0.98, 0.97, 0.98], [0.90, 0.91, 0.92, 0.90],
                                     equal_var=False).pvalue  # fmt: skip
    assert judged.loc["width=2", "p_value"] == pytest.approx(expected)
    # Two groups tested against the baseline: Holm doubles the smaller p, then caps the rest.
    other = judged.loc["width=3", "p_value"]
    assert judged.loc["width=2", "p_holm"] == pytest.approx(2 * expected)
    assert judged.loc["width=3", "p_holm"] == pytest.approx(max(2 * expected, min(1.0, other)))
    # The short label the figures and the printed table show names a group too.
    assert statistics.baseline_group(groups, groups.loc[base, "label"]) == base
    with pytest.raises(ValueError, match="baseline=nope.*g2: width=2"):
        statistics.baseline_group(groups, "nope")


def test_holm_keeps_the_family_of_verdicts_at_five_percent():
    """Five raw p-values as five groups against one baseline give them: the smallest is
    multiplied by 5, the next by 4 (never below the one before), ...; untested stay NaN."""
    adjusted = statistics.holm([0.04, 0.01, math.nan, 0.03, 0.5, 0.011])
    assert adjusted[1] == pytest.approx(0.05)  # 5 x 0.01
    assert adjusted[5] == pytest.approx(0.05)  # 4 x 0.011 = 0.044, raised to the one before
    assert adjusted[3] == pytest.approx(0.09)  # 3 x 0.03
    assert adjusted[0] == pytest.approx(0.09)  # 2 x 0.04 = 0.08, raised to 0.09
    assert adjusted[4] == pytest.approx(0.5)
    assert math.isnan(adjusted[2])
    # A 'worse' at p=0.04 among five tests is not one after the adjustment.
    runs = table(
        [(1, s, a) for s, a in enumerate([0.95, 0.96, 0.95])]
        + [(w, s, a) for w in (2, 3, 4) for s, a in enumerate([0.95, 0.955, 0.96])]
        + [(5, s, a) for s, a in enumerate([0.93, 0.94, 0.935])]
    )
    groups = statistics.groups_table(runs)
    judged = statistics.verdicts(groups, runs, statistics.baseline_group(groups, "r0"))
    worst = judged.set_index("group").loc["width=5"]
    assert worst["p_value"] < 0.05 and worst["p_holm"] == pytest.approx(4 * worst["p_value"])
    assert worst["verdict"] == ("worse" if 4 * worst["p_value"] < 0.05 else "indistinguishable")


def test_one_group_without_spread_is_tested_quietly(recwarn):
    """Identical accuracies in one group only: Welch's variance comes from the other, the
    test stands; SciPy's precision-loss warning about the first must not reach the user."""
    runs = table(
        [(1, s, 1.0) for s in range(3)] + [(2, s, a) for s, a in enumerate([0.9, 0.95, 1.0])]
    )
    groups = statistics.groups_table(runs)
    judged = statistics.verdicts(groups, runs, statistics.baseline_group(groups, "r0"))
    assert not [w for w in recwarn if "Precision loss" in str(w.message)]
    other = judged.set_index("group").loc["width=2"]
    expected = scipy_stats.ttest_ind([0.9, 0.95, 1.0], [1.0] * 3, equal_var=False).pvalue
    assert [w for w in recwarn if "Precision loss" in str(w.message)]  # SciPy's own, as said
    assert other["p_value"] == pytest.approx(expected) and other["verdict"] == "indistinguishable"


@pytest.mark.parametrize("accuracies", [(0.975, 0.9805), (1.0, 0.95)])
def test_groups_without_spread_get_no_test(accuracies):
    """Welch's statistic divides by the spread: identical accuracies for every seed in both
    groups leave it undefined (SciPy answered p=0, 'better', with a warning). Three 0.95s
    have a float standard deviation of 1e-16, not 0: no spread is told by the values."""
    first, second = accuracies
    runs = table([(1, s, first) for s in range(3)] + [(2, s, second) for s in range(3)])
    groups = statistics.groups_table(runs)
    judged = statistics.verdicts(groups, runs, statistics.baseline_group(groups, "r0"))
    other = judged.set_index("group").loc["width=2"]
    assert other["verdict"].startswith("no test: every seed gave the same accuracy in both")
    assert other["test_accuracy_std"] == 0.0
    assert other["test_accuracy_ci_low"] == other["test_accuracy_ci_high"]
    assert other["test_accuracy_ci_low"] == pytest.approx(second)


def test_a_seed_measured_twice_counts_once_and_intervals_stay_within_0_and_1():
    runs = table([(1, 0, 0.99), (1, 1, 1.0), (1, 0, 0.99), (2, 0, 0.5), (2, 1, 0.6)])
    runs["start_time"] = pd.to_datetime([1, 2, 3, 1, 2], unit="s")  # r2 reran seed 0 last
    groups = statistics.groups_table(runs).set_index("group")
    assert groups.loc["width=1", "n"] == 2 and groups.loc["width=1", "run_ids"] == "r0 r1"
    assert groups.attrs["repeated_seed_runs"] == ["r2"]
    assert groups.loc["width=1", "test_accuracy_ci_high"] == 1.0  # the t interval: 1.06
    assert 0.0 <= groups.loc["width=2", "test_accuracy_ci_low"] < 0.55


def test_a_key_only_some_runs_have_tells_their_configurations_apart():
    """A depth sweep: the second layer's params exist in the deeper runs only. They were
    read as 'not differing', and the two stacks pooled into one group."""
    from convnets.comparison import runs_table

    runs = pd.DataFrame(
        {
            "run_id": ["a", "b", "c", "d"],
            "params.model.layers.0.filters": ["16"] * 4,
            "params.model.layers.1.filters": [None, None, "32", "32"],
            "params.trainer.seed": ["0", "1", "0", "1"],
            "metrics.test_accuracy": [0.11, 0.21, 0.43, 0.58],
            "metrics.param_count": [378, 378, 5274, 5274],
        }
    )
    groups = statistics.groups_table(runs_table(runs)).set_index("group")
    assert sorted(groups.index) == ["layers.1.filters=32", "layers.1.filters=unset"]
    assert list(groups["n"]) == [2, 2]
    assert groups.loc["layers.1.filters=unset", "param_count"] == 378


@pytest.mark.slow
def test_compare_reports_seed_groups_and_verdicts(tmp_path, capsys):
    uri = sqlite_store(tmp_path)
    common = ["model.layers=[{filters:4},{filters:4,pool:max}]", "trainer.epochs=1",
              "trainer.verbose=0", "tracking.log_model=false", f"tracking.uri={uri}",
              "tracking.experiment=seeds"]  # fmt: skip
    runs = {}
    for width in ("0.5", "1.0"):
        for seed in (0, 1, 2):
            run = convnets.train(
                [*common, f"model.width={width}", f"trainer.seed={seed}"],
                output_dir=tmp_path / f"w{width}-s{seed}",
            )
            runs[(width, seed)] = run
    report = convnets.compare(
        "seeds", tracking_uri=uri, baseline=runs[("0.5", 0)].run_id, output_dir=tmp_path / "cmp"
    )
    groups = report.groups.set_index("group")
    assert sorted(groups.index) == ["width=0.5", "width=1.0"]
    assert list(groups["n"]) == [3, 3]
    columns = pd.read_csv(report.groups_csv).columns
    for col in ("n", "test_accuracy_mean", "test_accuracy_std", "test_accuracy_ci_low",
                "test_accuracy_ci_high", "verdict", "p_value", "test"):  # fmt: skip
        assert col in columns
    assert groups.loc["width=0.5", "verdict"] == "baseline"
    assert groups.loc["width=1.0", "verdict"] in ("better", "worse", "indistinguishable")
    assert report.figures["groups_accuracy_vs_params"].is_file()
    printed = capsys.readouterr()
    assert "Welch's t-test, p=" in printed.out and "n=3" in printed.out
    assert "different datasets" not in printed.err  # one dataset: nothing to warn of


def test_a_comparison_across_datasets_says_so(tmp_path, capsys):
    """One experiment holding runs on two datasets: its fronts weighed digits accuracy against
    another test set's, without a word."""
    from mlflow.tracking import MlflowClient

    from convnets import comparison
    from convnets.tracking import Tracker

    uri = sqlite_store(tmp_path)
    client = MlflowClient(uri)
    experiment = client.create_experiment("mixed")
    for i, name in enumerate(("digits", "image_folder", "digits")):
        run = client.create_run(experiment).info.run_id
        client.log_param(run, "dataset.name", name)
        client.log_param(run, "trainer.seed", str(i))
        for key, value in {"test_accuracy": 0.5 + i / 10, "param_count": 100 * (i + 1),
                           "receptive_field": 5, "effective_receptive_field": 5,
                           "macs": 1000}.items():  # fmt: skip
            client.log_metric(run, key, value)
        client.set_terminated(run, "FINISHED")
    comparison.compare(Tracker(uri), "mixed", tmp_path / "cmp")
    assert (
        "warning: compare=mixed: the runs trained on different datasets (digits, image_folder)"
        in capsys.readouterr().err
    )
    # A baseline that is a run the comparison leaves out says why.
    failed = client.create_run(experiment).info.run_id
    client.set_terminated(failed, "FAILED")
    with pytest.raises(ConfigError, match=f"baseline={failed}: that run is not among the "
                       r"compared runs \(it is FAILED; only FINISHED runs"):  # fmt: skip
        comparison.compare(Tracker(uri), "mixed", tmp_path / "cmp2", baseline=failed)
    client.delete_experiment(experiment)
    with pytest.raises(TrackingError, match="compare=mixed: the experiment 'mixed' is deleted"):
        comparison.compare(Tracker(uri), "mixed", tmp_path / "cmp3")


def test_a_baseline_run_left_out_as_a_repeated_seed_names_its_configuration():
    runs = table([(1, 0, 0.9), (1, 1, 0.92), (1, 0, 0.91), (2, 0, 0.5), (2, 1, 0.6)])
    runs["start_time"] = pd.to_datetime([1, 2, 3, 1, 2], unit="s")  # r2 reran seed 0 last
    groups = statistics.groups_table(runs)
    assert groups.attrs["repeated_seed_runs"] == ["r2"]
    assert list(groups["label"]) == ["g1", "g2"]  # as the figure and the printed lines
    assert groups.loc[statistics.baseline_group(groups, "r2", runs), "group"] == "width=1"
    with pytest.raises(ValueError, match="neither a run id of the compared runs"):
        statistics.baseline_group(groups, "r9", runs)


def test_where_a_run_ran_does_not_split_its_configuration():
    """A reproduction given where its data lives on another machine (dataset.data_dir) or
    other devices is the same configuration: the same group, and left out as a repeated
    seed, not a group of its own."""
    from convnets.comparison import runs_table

    runs = pd.DataFrame(
        {
            "run_id": ["a", "b", "c"],
            "params.optimizer.lr": ["0.02", "0.02", "0.001"],
            "params.dataset.data_dir": ["None", "/elsewhere/tfds", "None"],
            "params.distribute.devices": ["None", "[0,1]", "None"],
            "params.trainer.seed": ["0", "0", "0"],
            "metrics.test_accuracy": [0.9, 0.91, 0.8],
            "metrics.param_count": [100, 100, 100],
            "start_time": pd.to_datetime([1, 2, 1], unit="s"),
        }
    )
    compared = runs_table(runs)
    assert compared.attrs["params"] == ["optimizer.lr"]
    groups = statistics.groups_table(compared)
    assert sorted(groups["group"]) == ["optimizer.lr=0.001", "optimizer.lr=0.02"]
    assert groups.attrs["repeated_seed_runs"] == ["b"]
