"""Runs read as groups: the runs that differ only in ``trainer.seed`` are one configuration
measured n times, each seed once. Per group: n, mean, standard deviation and a 95% confidence
interval of the test and validation accuracy; against a baseline group, Welch's t-test says
whether a group is better, worse, or indistinguishable, its p-values adjusted for the number of
groups compared (Holm).

Why Welch's t-test: seed groups are small (3-10 runs) and need not have equal variances; a
bootstrap of 3 values has too few distinct resamples to give an interval. The t interval and
the test come from SciPy (``scipy.stats``), which scikit-learn brings. The interval is clipped
to [0, 1], the range of an accuracy: a t interval of 2-3 values near 1 reaches past it. A seed
measured twice (a reproduction of a compared run, or the same configuration and seed trained
again) is one sample, not two: counting it twice would narrow the interval with no new
information. Pure: pandas, NumPy, SciPy; no MLflow, no TensorFlow.
"""

from __future__ import annotations

import math
import warnings

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
    shown = {c: "unset" if pd.isna(row[c]) else row[c] for c in keys}  # a deeper stack's key
    return ", ".join(f"{short[c]}={shown[c]}" for c in keys) if keys else "all runs"


def mean_interval(values: np.ndarray) -> tuple[float, float, float, float]:
    """(mean, sample std, CI low, CI high) of accuracies; the interval, clipped to [0, 1], is
    NaN for fewer than two values."""
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return (math.nan,) * 4
    mean = float(values.mean())
    if len(values) < 2:
        return mean, math.nan, math.nan, math.nan
    from scipy import stats

    # Identical values have no spread; their float std can be 1e-16 (three 0.95s), not 0.
    std = 0.0 if np.ptp(values) == 0 else float(values.std(ddof=1))
    half = float(stats.t.ppf(1 - ALPHA / 2, len(values) - 1)) * std / math.sqrt(len(values))
    return mean, std, max(0.0, mean - half), min(1.0, mean + half)


def groups_table(table: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration (runs that differ only in the seed): ``label`` (``g1``...,
    best mean first, as the figures and printed lines number them), ``group`` (its params),
    the differing params, ``n``, ``seeds``, ``run_ids``, then for each of :data:`MEASURED`
    ``<metric>_mean/_std/_ci_low/_ci_high``, then :data:`CARRIED` (the same within a group).
    Sorted by mean test accuracy, best first."""
    keys = group_key_columns(table)
    table, repeated = one_run_per_seed(table, keys)
    rows = []
    grouped = table.groupby(keys, sort=False, dropna=False) if keys else [((), table)]
    for _, runs in grouped:
        first = runs.iloc[0]
        row = {"group": group_label(first, keys), **{c: first[c] for c in keys}}
        row["n"] = len(runs)
        if SEED in runs:  # in order, whatever order the runs came in; run_ids follow it
            runs = runs.sort_values(SEED, key=lambda seeds: pd.to_numeric(seeds, errors="coerce"))
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
    groups = groups.sort_values("test_accuracy_mean", ascending=False, kind="stable")
    groups = groups.reset_index(drop=True)
    groups.insert(0, "label", [f"g{i + 1}" for i in range(len(groups))])  # as figures show them
    groups.attrs["params"] = keys
    groups.attrs["repeated_seed_runs"] = repeated
    return groups


def one_run_per_seed(table: pd.DataFrame, keys: list[str]) -> tuple[pd.DataFrame, list[str]]:
    """``table`` with each (configuration, seed) once: the earliest run of it (a reproduction
    starts after its original); and the ids of the runs left out. Runs without a recorded seed
    are all kept."""
    if SEED not in table or len(table) == 0:
        return table, []
    order = table.sort_values("start_time", kind="stable") if "start_time" in table else table
    repeated = order.duplicated(subset=[*keys, SEED], keep="first") & order[SEED].notna()
    left_out = order.loc[repeated, "run_id"].tolist()
    return table[~table["run_id"].isin(left_out)], left_out


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjustment of p-values (NaN stays NaN): with k groups tested against
    one baseline, the chance that some verdict is a false "better" or "worse" stays within
    5%, where k raw tests would allow up to k x 5%. Written here because SciPy adjusts for the
    false discovery rate only (``scipy.stats.false_discovery_control``), not for this."""
    tested = sorted((p, i) for i, p in enumerate(p_values) if math.isfinite(p))
    adjusted = [math.nan] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(tested):
        running = max(running, min(1.0, (len(tested) - rank) * p))
        adjusted[i] = running
    return adjusted


def baseline_group(groups: pd.DataFrame, baseline: str, table: pd.DataFrame | None = None) -> int:
    """The index of the group ``baseline`` names: a run id in it, its short label (``g2``, as
    the figures and the printed table show it) or its full one (the params that set it apart);
    or, given the runs' ``table``, a run of its configuration left out as a repeated seed."""
    for i, row in groups.iterrows():
        if baseline in row["run_ids"].split() or baseline in (row["group"], row["label"]):
            return int(i)
    repeated = table[table["run_id"] == baseline] if table is not None else ()
    if len(repeated):
        label = group_label(repeated.iloc[0], groups.attrs["params"])
        for i, row in groups.iterrows():
            if row["group"] == label:
                return int(i)
    labels = "; ".join(f"{row['label']}: {row['group']}" for _, row in groups.iterrows())
    raise ValueError(
        f"baseline={baseline}: neither a run id of the compared runs nor a group label "
        f"(the groups: {labels})"
    )


def verdicts(groups: pd.DataFrame, table: pd.DataFrame, baseline: int) -> pd.DataFrame:
    """Each group's test accuracy against the baseline group's: ``verdict`` (better / worse /
    indistinguishable at the 5% level after Holm's adjustment for the number of groups tested,
    or why no test can be made), ``p_value`` (Welch's), ``p_holm`` (adjusted), ``test``."""
    from scipy import stats

    keys = group_key_columns(table)

    def accuracies(row: pd.Series) -> np.ndarray:
        ids = set(row["run_ids"].split())
        return table.loc[table["run_id"].isin(ids), "test_accuracy"].to_numpy(float)

    base = accuracies(groups.loc[baseline])
    out = groups.copy()
    reasons, p_values, better = [], [], []
    for i, row in groups.iterrows():
        values = accuracies(row)
        p, reason = math.nan, None
        if i == baseline:
            reason = "baseline"
        elif len(base) < 2:
            reason = "no test: the baseline group has one run (run more seeds: trainer.seed=0,1,2)"
        elif len(values) < 2:
            reason = "no test: this group has one run (run more seeds: trainer.seed=0,1,2)"
        elif np.ptp(values) == 0 and np.ptp(base) == 0:  # float std: 1e-16, not 0
            # Welch's statistic divides by the groups' spread: with none it is undefined (SciPy
            # would answer p=0 for any difference, with a cancellation warning).
            reason = "no test: every seed gave the same accuracy in both groups (no spread)"
        else:
            with warnings.catch_warnings():
                # One group of identical accuracies (no spread) makes SciPy warn of precision
                # loss in its variance; Welch's variance then comes from the other group, and
                # the p-value stands. Only that warning, only here.
                warnings.filterwarnings(
                    "ignore", "Precision loss occurred in moment calculation", RuntimeWarning
                )
                p = float(stats.ttest_ind(values, base, equal_var=False).pvalue)
        reasons.append(reason)
        p_values.append(p)
        better.append(values.mean() > base.mean())
    adjusted = holm(p_values)
    verdict = []
    for reason, p, up in zip(reasons, adjusted, better, strict=True):
        if reason is not None:
            verdict.append(reason)
        elif not math.isfinite(p) or p >= ALPHA:
            verdict.append("indistinguishable")
        else:
            verdict.append("better" if up else "worse")
    out["verdict"] = verdict
    out["p_value"] = p_values
    out["p_holm"] = adjusted
    out["test"] = [TEST_NAME if math.isfinite(p) else "" for p in p_values]  # rows tested only
    out.attrs = {**groups.attrs, "params": keys}
    return out
