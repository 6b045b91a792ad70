"""Runs read as groups: the runs that differ only in ``trainer.seed`` are one configuration
measured n times. Per group: n, mean, standard deviation and a 95% confidence interval of the
test and validation accuracy; against a baseline group, Welch's t-test says whether a group is
better, worse, or indistinguishable.

Why Welch's t-test: seed groups are small (3-10 runs) and need not have equal variances; a
bootstrap of 3 values has too few distinct resamples to give an interval. The t interval and
the test come from SciPy (``scipy.stats``), which scikit-learn brings. Pure: pandas, NumPy,
SciPy; no MLflow, no TensorFlow.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

SEED = "trainer.seed"
CONFIDENCE = 0.95
ALPHA = 1 - CONFIDENCE
TEST_NAME = "Welch's t-test"
# Per group: mean, std, ci_low, ci_high. selected_val_accuracy: the validation accuracy of the
# epoch each run tested (the restored best one under trainer.restore_best).
MEASURED = ("test_accuracy", "selected_val_accuracy")
CARRIED = ("param_count", "receptive_field", "effective_receptive_field", "macs")


def group_key_columns(table: pd.DataFrame) -> list[str]:
    """The params that tell configurations apart: every differing param but the seed."""
    return [c for c in table.attrs.get("params", []) if c != SEED]


def group_label(row: pd.Series, keys: list[str]) -> str:
    short = {c: c.removeprefix("model.").removeprefix("layer_defaults.") for c in keys}
    return ", ".join(f"{short[c]}={row[c]}" for c in keys) if keys else "all runs"


def mean_interval(values: np.ndarray) -> tuple[float, float, float, float]:
    """(mean, sample std, CI low, CI high); the interval is NaN for fewer than two values."""
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return (math.nan,) * 4
    mean = float(values.mean())
    if len(values) < 2:
        return mean, math.nan, math.nan, math.nan
    from scipy import stats

    std = float(values.std(ddof=1))
    half = float(stats.t.ppf(1 - ALPHA / 2, len(values) - 1)) * std / math.sqrt(len(values))
    return mean, std, mean - half, mean + half


def groups_table(table: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration (runs that differ only in the seed): ``group`` (its label),
    the differing params, ``n``, ``seeds``, ``run_ids``, then for each of :data:`MEASURED`
    ``<metric>_mean/_std/_ci_low/_ci_high``, then :data:`CARRIED` (the same within a group).
    Sorted by mean test accuracy, best first."""
    keys = group_key_columns(table)
    rows = []
    grouped = table.groupby(keys, sort=False, dropna=False) if keys else [((), table)]
    for _, runs in grouped:
        first = runs.iloc[0]
        row = {"group": group_label(first, keys), **{c: first[c] for c in keys}}
        row["n"] = len(runs)
        row["seeds"] = " ".join(str(s) for s in runs[SEED]) if SEED in runs else ""
        row["run_ids"] = " ".join(runs["run_id"])
        for metric in MEASURED:
            if metric not in runs:
                continue
            mean, std, low, high = mean_interval(runs[metric].to_numpy(float))
            row.update(
                {
                    f"{metric}_mean": mean,
                    f"{metric}_std": std,
                    f"{metric}_ci_low": low,
                    f"{metric}_ci_high": high,
                }
            )
        for col in CARRIED:
            if col in runs:
                row[col] = first[col]
        rows.append(row)
    groups = pd.DataFrame(rows)
    groups.attrs["params"] = keys
    return groups.sort_values("test_accuracy_mean", ascending=False, kind="stable").reset_index(
        drop=True
    )


def baseline_group(groups: pd.DataFrame, baseline: str) -> int:
    """The index of the group ``baseline`` names: a run id in it, or its label."""
    for i, row in groups.iterrows():
        if baseline in row["run_ids"].split() or baseline == row["group"]:
            return int(i)
    labels = "; ".join(groups["group"])
    raise ValueError(
        f"baseline={baseline}: neither a run id of the compared runs nor a group label "
        f"(the groups: {labels})"
    )


def verdicts(groups: pd.DataFrame, table: pd.DataFrame, baseline: int) -> pd.DataFrame:
    """Each group's test accuracy against the baseline group's: ``verdict`` (better / worse /
    indistinguishable at the 5% level, or why none can be given), ``p_value``, ``test``."""
    from scipy import stats

    keys = group_key_columns(table)

    def accuracies(row: pd.Series) -> np.ndarray:
        ids = set(row["run_ids"].split())
        return table.loc[table["run_id"].isin(ids), "test_accuracy"].to_numpy(float)

    base = accuracies(groups.loc[baseline])
    out = groups.copy()
    verdict, p_values = [], []
    for i, row in groups.iterrows():
        values = accuracies(row)
        if i == baseline:
            verdict.append("baseline")
            p_values.append(math.nan)
        elif len(values) < 2 or len(base) < 2:
            verdict.append("no test: a group has one run (run more seeds: trainer.seed=0,1,2)")
            p_values.append(math.nan)
        else:
            result = stats.ttest_ind(values, base, equal_var=False)
            p = float(result.pvalue)
            if not math.isfinite(p) or p >= ALPHA:
                verdict.append("indistinguishable")
            else:
                verdict.append("better" if values.mean() > base.mean() else "worse")
            p_values.append(p)
    out["verdict"] = verdict
    out["p_value"] = p_values
    out["test"] = TEST_NAME
    out.attrs["params"] = keys
    return out
