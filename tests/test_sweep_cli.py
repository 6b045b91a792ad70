"""Sweeps through the real CLI (``python train.py -m ...`` in a subprocess) on a fresh SQLite
store: grid under a parent run with its summary, a failing grid point, Optuna, joblib,
submitit's local executor and our fresh_process launcher (a job killed hard included). Tiny on
purpose: 8x8 digits, two 4-filter layers, one epoch.

Plus the pure helpers of :mod:`convnets.sweep` and :mod:`convnets.sweep_files`, run names, and
how the sweep callback ends the runs of a job that could not (no subprocess, no TensorFlow).
"""

from __future__ import annotations

import csv
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import command, heavy_modules_loaded, sqlite_store
from omegaconf import OmegaConf

from convnets import job, sweep
from convnets.plan import Plan
from convnets.sweep_files import SweepContext

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "trainer.epochs=1",
    "trainer.verbose=0",
    "tracking.log_model=false",
    "model.layers=[{filters:4},{filters:4,pool:max}]",
]
FINAL_METRICS = {
    "test_accuracy",
    "test_loss",
    "param_count",
    "receptive_field",
    "macs",
    "effective_receptive_field",
    "train_time_s",
    "images_per_sec",
}
EPOCH_METRICS = {"loss", "accuracy", "val_loss", "val_accuracy", "lr"}


# ---------------------------------------------------------------- helpers


class Sweep:
    """One finished ``train.py -m`` command: its output and what it left in the store."""

    def __init__(self, tmp: Path, proc: subprocess.CompletedProcess):
        from mlflow.tracking import MlflowClient

        self.dir = tmp / "multirun"
        self.proc = proc
        self.client = MlflowClient(tracking_uri=f"sqlite:///{tmp}/mlflow.db")
        experiments = [e.experiment_id for e in self.client.search_experiments()]
        runs = self.client.search_runs(experiments)
        parents = [r for r in runs if r.data.tags.get("sweep_role") == "parent"]
        assert len(parents) == 1, [r.info.run_name for r in runs]
        self.parent = parents[0]
        self.children = sorted(
            (r for r in runs if r is not self.parent), key=lambda r: int(r.data.tags["sweep_job"])
        )
        for child in self.children:
            assert child.data.tags["mlflow.parentRunId"] == self.parent.info.run_id
            assert child.info.experiment_id == self.parent.info.experiment_id

    def artifacts(self, run_id: str, path: str = "") -> set[str]:
        return {a.path for a in self.client.list_artifacts(run_id, path)}

    def finished(self) -> list:
        return [r for r in self.children if r.info.status == "FINISHED"]


def sweep_command(
    tmp: Path, *overrides: str, folder: str = "multirun", with_store: bool = True
) -> list[str]:
    """``train.py -m`` on the store ``tmp/mlflow.db``: one there already (a copy of the schema,
    :func:`conftest.sqlite_store`) unless not ``with_store``, when the sweep creates it."""
    if with_store:
        sqlite_store(tmp)
    return [
        sys.executable,
        "train.py",
        "-m",
        f"tracking.uri=sqlite:///{tmp}/mlflow.db",
        f"hydra.sweep.dir={tmp}/{folder}",
        *overrides,
    ]


def sweep_env(tmp: Path) -> dict[str, str]:
    # SWEEP_TEST_MARK: every process of the sweep inherits it (processes_left_behind).
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "HYDRA_FULL_ERROR": "0"}
    return {**env, "SWEEP_TEST_MARK": str(tmp)}


def sweep_process(
    tmp: Path, *overrides: str, timeout: float = 420, folder: str = "multirun", with_store=True
):
    """``train.py -m`` on the store and sweep folder (``tmp/folder``) in ``tmp``, run to its
    end."""
    return subprocess.run(
        sweep_command(tmp, *overrides, folder=folder, with_store=with_store),
        cwd=REPO,
        env=sweep_env(tmp),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_sweep(tmp: Path, *overrides: str, timeout: float = 420, with_store=True) -> Sweep:
    proc = sweep_process(tmp, *overrides, timeout=timeout, with_store=with_store)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return Sweep(tmp, proc)


def processes_left_behind(tmp: Path) -> list[int]:
    """Live processes started by the sweep in ``tmp`` (they carry its SWEEP_TEST_MARK)."""
    import psutil

    left = []
    for process in psutil.process_iter():
        try:
            if process.environ().get("SWEEP_TEST_MARK") == str(tmp):
                left.append(process.pid)
        except psutil.Error:  # gone, or not ours to read
            pass
    return left


def job_processes(output: str) -> dict[int, int]:
    """Job number -> pid, from the fresh_process launcher's ``#N : overrides (process PID)``."""
    return {int(n): int(pid) for n, pid in re.findall(r"#(\d+) : .*\(process (\d+)\)", output)}


def assert_complete_record(client, run) -> None:
    """What docs/reference.md says every finished training run records."""
    params, metrics, tags = run.data.params, run.data.metrics, run.data.tags
    assert params["dataset.name"] == "digits" and params["trainer.epochs"] == "1"
    assert params["model.layers.0.filters"] == "4"
    assert set(metrics) >= FINAL_METRICS, FINAL_METRICS - set(metrics)
    assert 0.0 <= metrics["test_accuracy"] <= 1.0 and metrics["param_count"] > 0
    for key in EPOCH_METRICS:
        history = client.get_metric_history(run.info.run_id, key)
        assert [m.step for m in history] == [1], key
    assert {"dataset", "model", "git_commit"} <= set(tags)
    assert "config.yaml" in {a.path for a in client.list_artifacts(run.info.run_id)}


# ---------------------------------------------------------------- pure helpers


def test_sweep_definition_takes_sweeper_params_then_command_line():
    config = OmegaConf.create(
        {
            "hydra": {
                "sweeper": {"params": {"model.width": "choice(0.5, 1.0)", "optimizer.lr": "0.1"}},
                "overrides": {"task": ["model.width=choice(2.0)", "trainer.epochs=1"]},
            }
        }
    )
    assert sweep.sweep_overrides(config) == {
        "model.width": "choice(2.0)",  # the command line replaces the config's range
        "optimizer.lr": "0.1",
        "trainer.epochs": "1",
    }


def test_param_keys_are_valid_mlflow_keys():
    assert sweep._param_key("model.layers.0.stride") == "sweep.model.layers.0.stride"
    assert sweep._param_key("+model.extra@x") == "sweep.model.extra_x"
    assert sweep._param_key("hydra/launcher") == "sweep.hydra/launcher"


def test_context_tags_place_the_job_in_the_sweep():
    ctx = SweepContext("sqlite:///x.db", "1", "abc", job_num=3, overrides=("a=1", "b=2"))
    assert ctx.tags() == {"sweep_job": "3", "sweep_overrides": "a=1 b=2"}


def test_the_sweep_file_round_trips_and_a_job_adds_its_own_fields(tmp_path):
    written = SweepContext("sqlite:///x.db", "1", "abc", search=True, swept_keys=("a", "b"))
    written.write(tmp_path)
    assert SweepContext.read(tmp_path) == written
    job_ctx = SweepContext.read(tmp_path, job_num=4, overrides=["a=1"])
    assert (job_ctx.job_num, job_ctx.overrides, job_ctx.swept_keys) == (4, ("a=1",), ("a", "b"))
    assert SweepContext.read(tmp_path / "elsewhere") is None


def test_a_job_without_the_sweep_file_is_recorded_on_its_own(tmp_path):
    hydra_cfg = OmegaConf.create({"sweep": {"dir": str(tmp_path)}, "job": {"num": 0}})
    hydra_cfg.overrides = {"task": ["a=1"]}
    assert sweep.sweep_context(hydra_cfg) is None


def test_the_swept_keys_are_the_ranges_not_the_fixed_values():
    definition = {
        "optimizer.lr": "tag(log, interval(1e-4, 1e-2))",
        "model.width": "choice(0.5, 1.0)",
        "+model.layer_defaults.kernel_size": "3,5",
        "trainer.epochs": "range(1, 3)",
        "trainer.seed": "1",
        "model.layers": "[{filters:4},{filters:4}]",
    }
    assert sweep.swept_keys(definition) == (
        "optimizer.lr",
        "model.width",
        "model.layer_defaults.kernel_size",
        "trainer.epochs",
    )


def test_the_best_job_says_by_which_criterion_and_where_a_search_keeps_its_own():
    assert sweep.best_criterion() == "selected_val_accuracy (max)"  # a grid sweep
    assert sweep.best_criterion(["selected_val_accuracy:max"]) == "selected_val_accuracy (max)"
    assert sweep.best_criterion(["selected_val_accuracy:max", "param_count:min"]) == (
        "selected_val_accuracy (max); the search's Pareto front of selected_val_accuracy:max, "
        "param_count:min: pareto/"
    )
    assert sweep.best_criterion(["test_accuracy:max"]) == (
        "selected_val_accuracy (max); the search's best by test_accuracy:max: optuna_best_value"
    )


# ---------------------------------------------------------------- run names

TRIAL = (
    "optimizer.lr=0.0055123",
    "model.layer_defaults.kernel_size=3",
    "model.width=1.0",
    "trainer.epochs=1",
    "tracking.log_model=false",
)


def test_a_search_trial_is_named_by_its_number_and_rounded_values():
    ctx = SweepContext("u", "1", "p", True, ("optimizer.lr", "model.layer_defaults.kernel_size",
                                             "model.width"), 5, TRIAL)  # fmt: skip
    assert job.run_name("simple_cnn", "digits", TRIAL, ctx) == "t05 lr=5.5e-3 k=3 w=1"


def test_a_grid_job_is_named_by_its_number_and_what_the_sweep_varies():
    overrides = (*TINY, "model.layer_defaults.kernel_size=5", "model.layer_defaults.dilation=2")
    swept = ("model.layer_defaults.kernel_size", "model.layer_defaults.dilation")
    ctx = SweepContext("u", "1", "p", False, swept, 3, overrides)
    assert sweep.job_run_name(ctx) == "j03 k=5 d=2"
    # Without known swept keys: every override that says what is trained, shortened.
    unknown = SweepContext("u", "1", "p", False, (), 12, overrides)
    assert sweep.job_run_name(unknown) == "j12 ep=1 layers=4-4pmax k=5 d=2"


def test_a_grids_numbers_keep_the_digits_that_tell_them_apart_in_names():
    definition = {"optimizer.lr": "0.00123,0.00124", "model.layer_defaults.dropout": "0.0,0.05",
                  "model.width": "choice(0.5, 1.0)", "trainer.epochs": "1"}  # fmt: skip
    digits = sweep.name_digits(definition)
    assert digits == (("optimizer.lr", 3),)  # 2 digits show both as 1.2e-3
    names = [
        sweep.job_run_name(SweepContext("u", "1", "p", False, ("optimizer.lr",), n,
                                        (f"optimizer.lr={lr}",), name_digits=digits))
        for n, lr in enumerate(["0.00123", "0.00124"])
    ]  # fmt: skip
    assert names == ["j00 lr=1.23e-3", "j01 lr=1.24e-3"]
    # The parent's name shows the grid's values as its jobs' names do.
    assert sweep._short_values("optimizer.lr", "0.00123,0.00124", 3) == "1.23e-3,1.24e-3"
    assert sweep._short_values("optimizer.lr", "choice(0.0123456, 0.1)", 2) == "1.2e-2,0.1"
    assert sweep._short_values("trainer.epochs", "range(1,40)", 2) == "range(1,40)"


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("0.0055123", "5.5e-3"),
        ("0.01", "1e-2"),
        ("1e-4", "1e-4"),
        ("0.123456", "0.12"),
        ("1.0", "1"),
        ("99.9", "100"),
        ("25000.0", "2.5e4"),
        ("128", "128"),  # integers as they are
        ("true", "true"),
        ("[{filters:16},{filters:16,stride:2,dilation:1},{filters:32}]", "16-16s2d1-32"),
    ],
)
def test_values_in_names_are_short(value, shown):
    assert sweep.short_override(f"model.x={value}") == f"x={shown}"


def test_keys_in_names_are_short():
    assert sweep.short_override("model.layers.0.stride=2") == "l0.s=2"
    assert sweep.short_override("optimizer.name=sgd") == "opt=sgd"
    assert sweep.short_override("+model.layer_defaults.dropout=0.25") == "drop=0.25"


def test_names_within_a_sweep_are_distinct_and_short_even_with_long_values():
    stacks = [f"model.layers=[{','.join(['{filters:64,pool:max}'] * n)}]" for n in (6, 7)]
    names = [
        sweep.job_run_name(
            SweepContext("u", "1", "p", True, ("model.layers", "optimizer.lr"), n, (stack, lr))
        )
        for n, (stack, lr) in enumerate(
            [(stacks[0], "optimizer.lr=0.00551"), (stacks[0], "optimizer.lr=0.00549"),
             (stacks[1], "optimizer.lr=0.00551")]
        )
    ]  # fmt: skip
    assert len(set(names)) == 3
    assert all(len(n) <= sweep.RUN_NAME_LIMIT == 60 for n in names), names
    assert names[0].startswith("t00 layers=64pmax-") and names[0].endswith(sweep.NAME_CUT)


def test_a_run_outside_a_sweep_keeps_model_dataset_overrides_within_the_limit():
    assert job.run_name("simple_cnn", "digits", ["model.layer_defaults.kernel_size=5"]) == (
        "simple_cnn-digits-kernel_size=5"
    )
    long = job.run_name("simple_cnn", "digits", [f"model.layers.{i}.filters=64" for i in range(9)])
    assert len(long) <= 60 and long.startswith("simple_cnn-digits-layers.0.filters=64,")
    assert long.endswith(sweep.NAME_CUT)


def test_a_sweep_job_names_its_run_from_its_sweep_context():
    cfg = OmegaConf.create(
        {"model": {"name": "simple_cnn"}, "dataset": {"name": "digits"}, "tracking": {}}
    )
    cfg.tracking.run_name = None
    ctx = SweepContext("u", "1", "p", False, ("model.width",), 3, ("model.width=2.0",))
    context = job.JobContext(overrides=ctx.overrides, multirun=True, sweep=ctx)
    planned = Plan(cfg, context, None, (), None, (8, 8, 1), 10, None, "1")
    assert planned.run_name() == "j03 w=2"


# ---------------------------------------------------------------- a job that could not end its run


def _failed(error: BaseException):
    from hydra.core.utils import JobReturn, JobStatus

    ret = JobReturn(overrides=["model.width=2.0"], status=JobStatus.FAILED)
    ret.return_value = error
    return ret


def test_the_callback_ends_the_runs_a_dead_job_left_running(tmp_path, capfd):
    from hydra.types import RunMode
    from mlflow.tracking import MlflowClient

    from convnets.tracking import Tracker

    uri = sqlite_store(tmp_path)
    tracker = Tracker(uri)
    tracker.check_store()
    experiment = tracker.experiment_id("x")
    parent = tracker.create_run(experiment, run_name="sweep", tags={})
    ctx = SweepContext(uri, experiment, parent, False, ("model.width",))
    ctx.write(tmp_path)
    running = {}
    for num in (0, 1):
        job_ctx = SweepContext.read(tmp_path, job_num=num, overrides=("model.width=2.0",))
        running[num] = tracker.create_run(
            experiment, run_name="x", tags=job_ctx.tags(), parent_run_id=parent
        )

    def config(num: int):
        return OmegaConf.create(
            {
                "hydra": {
                    "mode": RunMode.MULTIRUN,
                    "sweep": {"dir": str(tmp_path)},
                    "job": {"num": num},
                    "overrides": {"task": ["model.width=2.0"]},
                },
                "tracking": {"http_timeout_s": 5},
            }
        )

    callback = sweep.MlflowSweepCallback()
    callback.on_job_end(config(0), _failed(ChildProcessError("its process died")))
    callback.on_job_end(config(1), _failed(KeyboardInterrupt("the sweep was stopped")))
    callback.on_job_end(config(2), _failed(ChildProcessError("died while starting")))
    callback.on_job_end(config(3), _failed(KeyboardInterrupt("stopped before it began")))
    assert "Error executing job" not in capfd.readouterr().err  # Hydra's line, not ours

    client = MlflowClient(uri)
    dead = client.get_run(running[0])
    assert dead.info.status == "FAILED"
    assert dead.data.tags["failure_reason"] == "ChildProcessError: its process died"
    stopped = client.get_run(running[1])
    assert stopped.info.status == "KILLED"
    assert stopped.data.tags["failure_reason"] == "the sweep was stopped"
    children = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent}'")
    by_job = {r.data.tags["sweep_job"]: r for r in children}
    assert set(by_job) == {"0", "1", "2"}  # a job stopped before it began: nothing to count
    recorded = by_job["2"]  # died before its run existed: one recorded for it
    assert recorded.info.status == "FAILED" and recorded.info.run_name == "j02 w=2"
    assert recorded.data.tags["failure_reason"] == "ChildProcessError: died while starting"


def test_a_search_process_that_stops_leaves_a_parent_another_process_runs(tmp_path):
    """A search's parent is the study's, shared by every process running it: one that stops
    (Ctrl-C, an error) ends it only when no other live process shares it."""
    import json

    import psutil
    from mlflow.tracking import MlflowClient

    from convnets import folder_lock, liveness
    from convnets.tracking import Tracker

    uri = sqlite_store(tmp_path)
    tracker = Tracker(uri)
    tracker.check_store()
    experiment = tracker.experiment_id("x")
    parents = [tracker.create_run(experiment, run_name="search", tags={}) for _ in range(2)]
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        record = {**folder_lock.this_process(), "pid": other.pid}
        record["started"] = psutil.Process(other.pid).create_time()
        key = liveness.sharer_key(record)
        tracker.set_tags_on(parents[0], {key: json.dumps({**record, "beat": time.time()})})
        sweep.mark_stopped(None)  # stopped by an error, not a signal: FAILED when it ends it
        for parent in parents:
            callback = sweep.MlflowSweepCallback()
            callback._open_parent = (uri, parent)
            callback._join_parent(tracker, experiment, parent)
            callback._end_abandoned_parent()
    finally:
        other.kill()
        other.wait()
    client = MlflowClient(uri)
    shared, alone = (client.get_run(parent) for parent in parents)
    assert shared.info.status == "RUNNING"  # the other process ends it
    assert liveness.sharers(shared.data.tags).keys() == {key}  # this one left
    assert alone.info.status == "FAILED"
    assert alone.data.tags["failure_reason"] == "the sweep stopped before its end (see its log)"


def test_what_the_launcher_and_callback_rely_on_in_hydra():
    # Canary. A failed job's error is handed out only by raising it from
    # JobReturn.return_value (which also prints a line the callback and launcher keep out of
    # the output). A launcher reports the end of a job whose process died as run_job reports
    # every job's: through the public HydraContext.callbacks field, whose class (Hydra-internal,
    # not imported by the launcher) has on_job_end(config=, job_return=).
    import dataclasses
    import inspect

    from hydra._internal.callbacks import Callbacks
    from hydra.types import HydraContext

    from hydra_plugins.convnets_launcher import _core

    with pytest.raises(ChildProcessError, match="died"):
        _ = _failed(ChildProcessError("died")).return_value
    assert str(_core._job_value(_failed(ValueError("bad")))) == "bad"
    assert "callbacks" in {f.name for f in dataclasses.fields(HydraContext)}
    assert {"config", "job_return"} <= set(inspect.signature(Callbacks.on_job_end).parameters)


# ---------------------------------------------------------------- through the CLI


@pytest.mark.slow
def test_grid_sweep_nests_jobs_under_a_summarised_parent_and_survives_a_bad_point(tmp_path):
    # 2x2 grid; stride 2 with dilation 2 is an invalid stack: that job alone fails.
    s = run_sweep(tmp_path, *TINY, "model.layers.0.stride=1,2", "model.layer_defaults.dilation=1,2")

    assert len(s.children) == 4
    assert all(len(r.info.run_name) <= sweep.RUN_NAME_LIMIT for r in s.children)

    def point(run):
        return run.data.params["model.layers.0.stride"], run.data.params[
            "model.layer_defaults.dilation"
        ]

    assert {point(r) for r in s.children} == {("1", "1"), ("1", "2"), ("2", "1"), ("2", "2")}
    (bad,) = (r for r in s.children if point(r) == ("2", "2"))
    assert bad.info.status == "FAILED"
    assert "model.layers[0]" in bad.data.tags["failure_reason"]
    assert "error: model.layers[0]" in s.proc.stderr
    assert len(s.finished()) == 3
    for run in s.finished():
        assert_complete_record(s.client, run)

    parent = s.parent
    assert parent.info.status == "FINISHED"
    assert parent.info.run_name == "sweep l0.s=1,2 d=1,2"
    assert parent.data.params["sweep.model.layers.0.stride"] == "1,2"
    assert parent.data.params["sweep.model.layer_defaults.dilation"] == "1,2"
    assert parent.data.metrics["jobs"] == 4 and parent.data.metrics["jobs_failed"] == 1
    # The best job: one named run, and the criterion it is best by.
    best = max(s.finished(), key=lambda r: r.data.metrics["selected_val_accuracy"])
    assert parent.data.tags["best_run_id"] == best.info.run_id
    assert parent.data.tags["best_run_name"] == best.info.run_name
    assert parent.data.tags["best_criterion"] == "selected_val_accuracy (max)"
    selected = best.data.metrics["selected_val_accuracy"]
    assert parent.data.metrics["best_selected_val_accuracy"] == selected
    assert parent.data.metrics["best_test_accuracy"] == best.data.metrics["test_accuracy"]
    assert "best_val_accuracy" not in parent.data.metrics  # a run-level name of another meaning
    summary = s.artifacts(parent.info.run_id, "summary")
    assert {"summary/jobs.csv", "summary/accuracy_vs_params.png"} <= summary
    assert "sweep.yaml" in s.artifacts(parent.info.run_id)

    with open(s.dir / "summary" / "jobs.csv") as f:
        rows = list(csv.DictReader(f))
    assert [row["run_id"] for row in rows] == [r.info.run_id for r in s.children]
    assert [row["status"] for row in rows] == [r.info.status for r in s.children]
    for row, run in zip(rows, s.children, strict=True):
        if run.info.status == "FINISHED":
            assert float(row["test_accuracy"]) == run.data.metrics["test_accuracy"]
            assert float(row["receptive_field"]) == run.data.metrics["receptive_field"]
            selected = run.data.metrics["selected_val_accuracy"]
            assert float(row["selected_val_accuracy"]) == selected


@pytest.mark.slow
def test_a_sweep_over_seeds_reads_as_configurations_and_reproduces_as_a_study(tmp_path):
    s = run_sweep(
        tmp_path, *TINY, "model.width=0.5,1", "trainer.seed=0,1", "trainer.deterministic=true",
        "tracking.experiment=seeds",  # its reproduction goes there too, given no experiment
    )  # fmt: skip
    assert len(s.finished()) == 4
    summary = s.artifacts(s.parent.info.run_id, "summary")
    assert {"summary/groups.csv", "summary/groups_accuracy_vs_params.png"} <= summary
    with open(s.dir / "summary" / "groups.csv") as f:
        groups = {row["model.width"]: row for row in csv.DictReader(f)}
    assert set(groups) == {"0.5", "1.0"}
    for width, row in groups.items():
        runs = [r for r in s.children if r.data.params["model.width"] == width]
        accuracies = [r.data.metrics["test_accuracy"] for r in runs]
        assert int(row["n"]) == 2 and sorted(row["seeds"].split()) == ["0", "1"]
        assert float(row["test_accuracy_mean"]) == pytest.approx(sum(accuracies) / 2)
        assert float(row["test_accuracy_ci_low"]) <= float(row["test_accuracy_mean"])
    assert re.search(r"^g1 .*: n=2 test_accuracy \S+ \+- \S+ \(95% CI ", s.proc.stdout, re.M)

    # The whole study again, under a new parent: every job identical, the study unchanged.
    # Not in the first sweep's folder: its jobs' folders and summary would be written over.
    parent_id = s.parent.info.run_id
    refused = sweep_process(tmp_path, f"reproduce={parent_id}")
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert refused.stderr.strip().splitlines() == [
        f"error: hydra.sweep.dir={s.dir}: holds the jobs and summary of the sweep whose parent "
        f"run is {parent_id}, which this sweep would write over; give this one its own folder "
        "(leave hydra.sweep.dir out: every sweep gets a new folder)"
    ]
    assert len(s.client.search_runs([s.parent.info.experiment_id])) == 5  # no parent made
    assert not (s.dir / "sweep.lock").exists()
    again = sweep_process(tmp_path, f"reproduce={parent_id}", folder="again")
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count(": identical (delta test_accuracy=+0") == 4
    assert f"study {parent_id}: same best (j" in again.stdout
    assert "rank correlation 1.00 (Spearman, test_accuracy of 4 jobs); same Pareto front" in (
        again.stdout
    )
    new_parent = next(
        r
        for r in s.client.search_runs([s.parent.info.experiment_id])
        if r.data.tags.get("reproduces") == parent_id
    )
    assert new_parent.data.tags["sweep_role"] == "parent"
    assert new_parent.data.tags["reproduce_same_best"] == "true"
    assert new_parent.data.metrics["reproduce_rank_correlation"] == 1.0
    copies = s.client.search_runs(
        [s.parent.info.experiment_id],
        f"tags.`mlflow.parentRunId` = '{new_parent.info.run_id}'",
    )
    originals = {r.info.run_id: r for r in s.children}
    assert sorted(r.data.tags["reproduces"] for r in copies) == sorted(originals)
    for copy in copies:
        original = originals[copy.data.tags["reproduces"]]
        assert copy.info.run_name == f"{original.info.run_name}-reproduce"
        assert copy.data.tags["sweep_job"] == original.data.tags["sweep_job"]
        # what the job ran, not the command's reproduce=<parent>
        assert copy.data.tags["sweep_overrides"] == original.data.tags["sweep_overrides"]
    assert new_parent.data.tags["best_overrides"] == s.parent.data.tags["best_overrides"]

    # One job again under -m goes beside its original too, as it does without -m.
    job = s.children[0]
    one = sweep_process(tmp_path, f"reproduce={job.info.run_id}", folder="one")
    assert one.returncode == 0, one.stderr[-3000:]
    everywhere = [e.experiment_id for e in s.client.search_experiments()]
    [copy] = [
        r
        for r in s.client.search_runs(everywhere)
        if r.data.tags.get("reproduces") == job.info.run_id
        and r.data.tags["mlflow.parentRunId"] != new_parent.info.run_id
    ]
    assert copy.info.experiment_id == s.parent.info.experiment_id
    parent = s.client.get_run(copy.data.tags["mlflow.parentRunId"])
    assert parent.info.experiment_id == s.parent.info.experiment_id


@pytest.mark.slow
def test_optuna_trials_are_nested_runs_and_a_failed_trial_does_not_stop_the_study(tmp_path):
    # Layer 0 strides by 2, so every trial the seeded sampler gives dilation 2 is invalid.
    s = run_sweep(
        tmp_path,
        "hparams_search=digits_optuna",
        "hydra.sweeper.n_trials=3",
        *TINY[:3],
        "model.layers=[{filters:4,stride:2},{filters:4,pool:max}]",
    )

    assert len(s.children) == 3
    assert len({r.data.params["optimizer.lr"] for r in s.children}) == 3  # sampled per trial
    failed = [r for r in s.children if r.info.status == "FAILED"]
    assert failed and all(r.data.params["model.layer_defaults.dilation"] == "2" for r in failed)
    assert s.finished(), "the seeded sampler should draw dilation 1 at least once in 3 trials"

    results = OmegaConf.load(s.dir / "optimization_results.yaml")
    objectives = [r.data.metrics["selected_val_accuracy"] for r in s.finished()]
    assert results.best_value == pytest.approx(max(objectives))
    assert s.parent.info.status == "FINISHED"
    assert s.parent.data.tags["sweeper"] == "ConvnetsOptunaSweeper"
    assert s.parent.data.metrics["optuna_best_value"] == pytest.approx(max(objectives))
    assert s.parent.data.params["sweep.optimizer.lr"] == "tag(log, interval(1e-4, 1e-2))"


@pytest.mark.slow
def test_joblib_workers_on_a_fresh_sqlite_store_lose_nothing(tmp_path):
    s = run_sweep(
        tmp_path,
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        *TINY,
        "model.layer_defaults.kernel_size=3,5",
        "model.layer_defaults.dilation=1,2",
        with_store=False,  # the two workers create its schema at once
    )
    assert [r.info.status for r in s.children] == ["FINISHED"] * 4
    assert {r.data.tags["sweep_job"] for r in s.children} == {"0", "1", "2", "3"}
    for run in s.children:
        assert_complete_record(s.client, run)
    # nothing landed in MLflow's "Default" experiment (the set_experiment race)
    assert not s.client.search_runs(["0"])
    assert s.parent.data.tags["launcher"] == "JoblibLauncher"
    assert s.parent.info.status == "FINISHED" and s.parent.data.metrics["jobs_finished"] == 4


def test_the_fresh_process_launcher_plugin_stays_light():
    # Hydra imports every plugin module at start-up, for every command.
    heavy = ("tensorflow", "mlflow", "optuna", "cloudpickle", "concurrent.futures.process")
    launcher = "hydra_plugins.convnets_launcher.fresh_process_launcher"
    assert heavy_modules_loaded(launcher, heavy) == []
    # Nor, when it launches, anything of the application: a launcher does not record runs.
    core = "hydra_plugins.convnets_launcher._core"
    assert heavy_modules_loaded(core, ("convnets", "mlflow", "tensorflow")) == []


@pytest.mark.slow
def test_fresh_process_jobs_each_run_in_a_new_process_and_one_killed_hard_fails_alone(tmp_path):
    # Three jobs, two at a time, each in its own process. Job 0's process is SIGKILLed as soon
    # as it is announced; the others still run, the sweep neither hangs nor stops, and its
    # summary counts what finished. One sweep for both behaviours: each fresh process pays
    # TensorFlow's import.
    proc = subprocess.Popen(
        sweep_command(
            tmp_path,
            "hydra/launcher=fresh_process",
            "hydra.launcher.n_jobs=2",
            *TINY,
            "model.layer_defaults.kernel_size=1,3,5",
        ),
        cwd=REPO,
        env=sweep_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    stderr: list[str] = []
    reader = threading.Thread(target=lambda: stderr.extend(proc.stderr), daemon=True)
    reader.start()
    stdout = []
    for line in proc.stdout:
        stdout.append(line)
        if (pids := job_processes(line)) and 0 in pids:
            os.kill(pids[0], signal.SIGKILL)
            break
    stdout += proc.stdout.readlines()
    assert proc.wait(timeout=300) == 0, "".join(stdout[-20:] + stderr[-20:])
    reader.join()
    errors = [line for line in stderr if line.startswith("error: job #0 ")]
    assert errors and "ended abruptly (killed by SIGKILL)" in errors[0], "".join(stderr)
    s = Sweep(tmp_path, subprocess.CompletedProcess(proc.args, 0, "".join(stdout), ""))
    assert [r.data.tags["sweep_job"] for r in s.finished()] == ["1", "2"]
    pids = job_processes(s.proc.stdout)
    assert sorted(pids) == [0, 1, 2] and len(set(pids.values())) == 3, s.proc.stdout[-2000:]
    # Job 0 is recorded FAILED with how it died, whether it had started its run or not (the
    # sweep callback ends it, or records one for it), and the summary counts it.
    (dead,) = (r for r in s.children if r.data.tags["sweep_job"] == "0")
    assert dead.info.status == "FAILED", dead.info
    assert "ended abruptly (killed by SIGKILL)" in dead.data.tags["failure_reason"]
    assert s.parent.data.tags["launcher"] == "FreshProcessLauncher"
    assert s.parent.info.status == "FINISHED" and s.parent.data.metrics["jobs_finished"] == 2
    assert s.parent.data.metrics["jobs_failed"] == 1
    assert processes_left_behind(tmp_path) == []


@pytest.mark.slow
def test_submitit_local_executor_runs_a_search_under_the_parent(tmp_path):
    s = run_sweep(
        tmp_path,
        "hydra/launcher=submitit_local",
        "hparams_search=digits_optuna",
        "hydra.sweeper.n_trials=2",
        *TINY,
    )
    assert [r.info.status for r in s.children] == ["FINISHED"] * 2
    assert len({r.data.params["optimizer.lr"] for r in s.children}) == 2  # each job its trial's
    assert s.parent.data.tags["launcher"] == "LocalLauncher"
    assert s.parent.info.status == "FINISHED"
    assert s.parent.data.metrics["optuna_best_value"] == max(
        r.data.metrics["selected_val_accuracy"] for r in s.children
    )
    # where the README says each job's output is
    assert sorted(p.parent.name for p in s.dir.glob("*/train.log")) == ["0", "1"]
    printed = sorted(s.dir.glob(".submitit/*/*_0_log.out"))
    assert len(printed) == 2 and all("done: test_accuracy=" in p.read_text() for p in printed)


@pytest.mark.slow
def test_an_unusable_store_stops_the_sweep_before_any_job(tmp_path):
    command = [sys.executable, "train.py", "-m", f"hydra.sweep.dir={tmp_path}/multirun"]
    command += ["tracking.uri=http://127.0.0.1:9", "tracking.http_timeout_s=2"]
    command += ["model.layer_defaults.kernel_size=3,5"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "HYDRA_FULL_ERROR": "0"}
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "error: tracking.uri=http://127.0.0.1:9" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "multirun" / "0").exists()  # no job ran


def test_the_slurm_launcher_off_a_cluster_is_one_line_before_any_run(tmp_path):
    no_srun = os.pathsep.join(
        d for d in os.environ["PATH"].split(os.pathsep) if not (Path(d) / "srun").exists()
    )
    result = command(
        "train.py",
        "-m",
        "hydra/launcher=slurm",
        f"hydra.sweep.dir={tmp_path / 'multirun'}",
        cwd=tmp_path,
        env={"PATH": no_srun},
        timeout=120,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [
        "error: hydra/launcher=slurm: this machine is not on a Slurm cluster (no srun on PATH); "
        "run the command on the cluster's login node, or run the sweep here with "
        "hydra/launcher=submitit_local (or leave the launcher out)"
    ]
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize(
    ("swept", "line"),
    [
        ("trainer.sed=1,2", "error: trainer.sed: unknown key (Key 'sed' not in 'TrainerConfig'); "
         "check the spelling (--cfg job prints every key)"),
        ("trainer.epochs=a,b", "error: trainer.epochs: Value 'a' of type 'str' could not be "
         "converted to Integer; give a whole number"),
        ("+trainer.x=1,2", "error: trainer.x: unknown key (not in the config schema); check the "
         "spelling (--cfg job prints every key)"),
    ],
)  # fmt: skip
def test_a_swept_key_every_job_would_refuse_is_one_line_before_any_run(tmp_path, swept, line):
    """Hydra composes a job only when it launches it: before, the parent run was recorded and
    left FAILED, with every job failing alike."""
    result = command(
        "train.py", "-m", swept, f"hydra.sweep.dir={tmp_path / 'multirun'}", cwd=tmp_path,
        timeout=120,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [line]
    assert not (tmp_path / "mlflow.db").exists()  # no parent run


def test_a_sweep_folder_that_cannot_be_created_is_one_line_before_any_run(tmp_path):
    in_the_way = tmp_path / "multirun"
    in_the_way.write_text("a file where the sweep's folder would go")
    result = command(
        "train.py", "-m", "trainer.seed=1,2", f"hydra.sweep.dir={in_the_way}", cwd=tmp_path,
        timeout=120,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [
        f"error: hydra.sweep.dir={in_the_way}: the sweep's folder cannot be created there "
        f"(File exists: {in_the_way}); pick another folder"
    ]
    assert result.stdout.strip() == "" and not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize("target", ["a run that is not there", "a study without a finished job"])
def test_a_sweep_reproducing_nothing_reproducible_records_nothing(tmp_path, target):
    """Every job would find nothing to train and fail: refused once, before the parent run
    (a study's reproduction recorded that parent and left it FAILED)."""
    from mlflow.tracking import MlflowClient

    uri = sqlite_store(tmp_path)
    client = MlflowClient(uri)
    if target == "a run that is not there":
        run_id, kept = "0" * 32, []
        why = f"no such run in {uri}; copy the run id from the MLflow UI or pass the store it "
        why += "lives in with tracking.uri=..."
    else:
        experiment = client.create_experiment("digits")
        run_id = client.create_run(experiment, tags={"sweep_role": "parent"}).info.run_id
        client.set_terminated(run_id, status="FAILED")  # every job of it failed
        kept, why = [run_id], "the study has no finished job with a test accuracy to reproduce"
    result = command(
        "train.py", "-m", f"reproduce={run_id}", f"tracking.uri={uri}",
        f"hydra.sweep.dir={tmp_path / 'multirun'}", cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [f"error: reproduce={run_id}: {why}"]
    assert not (tmp_path / "multirun").exists()  # the folder it held is gone with it
    experiments = [e.experiment_id for e in client.search_experiments()]
    assert [r.info.run_id for r in client.search_runs(experiments)] == kept


def test_a_sweep_reproducing_a_run_of_a_store_that_is_not_there_creates_none(tmp_path):
    missing = tmp_path / "elsewhere.db"
    result = command(
        "train.py", "-m", f"reproduce={'0' * 32}", f"tracking.uri=sqlite:///{missing}",
        f"hydra.sweep.dir={tmp_path / 'multirun'}", cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr[-2000:]
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"error: reproduce={'0' * 32}: there is no MLflow store at {missing}")
    assert not missing.exists()  # looking a run up made no empty store


@pytest.mark.parametrize(
    ("launcher", "counts"),
    [
        ("joblib", "1 or more, or -1 for every core (joblib's count)"),
        ("fresh_process", "1 or more"),
    ],
)
def test_a_launcher_told_to_run_no_job_at_once_is_one_line_before_any_run(
    tmp_path, launcher, counts
):
    result = command(
        "train.py", "-m", "trainer.seed=1,2", f"hydra/launcher={launcher}",
        "hydra.launcher.n_jobs=0", f"hydra.sweep.dir={tmp_path / 'multirun'}",
        cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [
        f"error: hydra.launcher.n_jobs=0: how many jobs run at once; give {counts}"
    ]
    assert not (tmp_path / "mlflow.db").exists()  # no parent run


def test_a_negative_stop_grace_is_one_line_before_any_run(tmp_path):
    result = command(
        "train.py", "-m", "trainer.seed=1,2", "hydra/launcher=fresh_process",
        "hydra.launcher.stop_grace_s=-5", f"hydra.sweep.dir={tmp_path / 'multirun'}",
        cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [
        "error: hydra.launcher.stop_grace_s=-5: the seconds a stopped job gets to record its "
        "end; give 0 or more"
    ]
    assert not (tmp_path / "mlflow.db").exists()  # no parent run


@pytest.mark.slow
def test_a_second_sweep_in_a_live_sweeps_folder_is_refused(tmp_path):
    first = subprocess.Popen(
        sweep_command(tmp_path, *TINY, "trainer.epochs=200", "model.width=1,2"),
        cwd=REPO,
        env=sweep_env(tmp_path),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not (tmp_path / "multirun" / "mlflow_sweep.json").exists():
            assert first.poll() is None and time.monotonic() < deadline, first.stderr.read()
            time.sleep(0.2)
        second = sweep_process(tmp_path, *TINY, "model.width=3", timeout=240)
    finally:
        os.killpg(first.pid, signal.SIGTERM)
        first.wait(timeout=60)
    assert second.returncode == 2, second.stderr[-2000:]
    [line] = second.stderr.strip().splitlines()
    assert line.startswith(f"error: hydra.sweep.dir={tmp_path / 'multirun'}: another sweep runs")
    assert f"process {first.pid} on " in line
    assert not (tmp_path / "multirun" / "sweep.lock").exists()  # the first let go as it ended


@pytest.mark.slow
def test_a_sweep_killed_outright_is_ended_killed_by_the_next_command(tmp_path):
    """SIGKILL leaves the sweep no chance to end its parent or its running job; the next
    command recording in that experiment (a training) finds their process gone and ends
    both KILLED, saying why."""
    from mlflow.tracking import MlflowClient

    from convnets import liveness

    output = tmp_path / "sweep.log"
    with output.open("w") as log:
        sweep = subprocess.Popen(
            sweep_command(tmp_path, *TINY, "trainer.epochs=200", "model.width=1,2"),
            cwd=REPO,
            env=sweep_env(tmp_path),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline, job = time.monotonic() + 240, None
        while job is None:  # the parent exists (mlflow_sweep.json names it), job 0 has a run
            assert sweep.poll() is None and time.monotonic() < deadline, output.read_text()[-3000:]
            time.sleep(0.5)
            context = SweepContext.read(tmp_path / "multirun")
            if context is not None:  # the sweep made the store: open it only now
                client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
                children = client.search_runs(
                    [context.experiment_id],
                    f"tags.`mlflow.parentRunId` = '{context.parent_run_id}'",
                )
                job = children[0] if children else None
        parent = client.get_run(context.parent_run_id)
        assert parent.data.tags["process"] and parent.data.tags["heartbeat"]
        assert liveness.sharers(parent.data.tags)  # the sweep's process, as one of its own
        os.killpg(sweep.pid, signal.SIGKILL)
    finally:
        if sweep.poll() is None:
            os.killpg(sweep.pid, signal.SIGKILL)
        sweep.wait(timeout=60)
    assert client.get_run(context.parent_run_id).info.status == "RUNNING"

    trained = command(
        "train.py", *TINY, f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
        f"hydra.run.dir={tmp_path}/run", timeout=300,
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr[-3000:]
    gone = f"process {sweep.pid} on "
    parent, job = client.get_run(context.parent_run_id), client.get_run(job.info.run_id)
    for run in (parent, job):
        assert run.info.status == "KILLED"
        reason = run.data.tags["failure_reason"]
        assert reason.startswith(f"its process ({gone}") and reason.endswith(
            "ended without ending the run (killed with SIGKILL, crashed, or the store was not answering when it ended)"
        )
    warnings = [line for line in trained.stderr.splitlines() if line.startswith("warning: ")]
    assert any(
        x.startswith(f"warning: sweep parent run {parent.info.run_id} was left ") for x in warnings
    )
    assert any(x.startswith(f"warning: run {job.info.run_id} was left RUNNING: ") for x in warnings)


def test_a_sweep_without_validation_data_finished_every_job_and_has_no_best(tmp_path, capsys):
    """Jobs of dataset.val_fraction=0 finish with a test accuracy and no
    selected_val_accuracy: the sweep counts them finished (it once said "0 of 3" and failed
    the parent) and names no best job; a pruned trial is counted apart."""
    from mlflow.tracking import MlflowClient

    uri = sqlite_store(tmp_path)
    client = MlflowClient(uri)
    experiment = client.create_experiment("noval")
    parent = client.create_run(experiment).info.run_id
    for job_num, metrics in enumerate([{"test_accuracy": 0.8}, {"test_accuracy": 0.9}, {}]):
        tags = {"mlflow.parentRunId": parent, "sweep_job": str(job_num)}
        if not metrics:
            tags["pruned"] = "true"
        child = client.create_run(experiment, tags=tags).info.run_id
        for key, value in {**metrics, "param_count": 100}.items():
            client.log_metric(child, key, value)
        client.set_terminated(child, "FINISHED")
    context = SweepContext(uri, experiment, parent)
    sweep.summarize(context, tmp_path / "summary")

    record = client.get_run(parent)
    assert record.info.status == "FINISHED"
    assert {k: record.data.metrics[k] for k in ("jobs", "jobs_finished", "jobs_pruned")} == {
        "jobs": 3, "jobs_finished": 2, "jobs_pruned": 1}  # fmt: skip
    assert "best_run_id" not in record.data.tags
    assert (
        "sweep done: 2 of 3 jobs finished (1 pruned); no best job: none has a "
        "selected_val_accuracy (trained without validation data); parent run"
    ) in capsys.readouterr().out


def test_a_search_on_the_last_epochs_val_accuracy_lists_it_in_its_summary(tmp_path):
    """Its objective is the last epoch's val_accuracy: jobs.csv shows it under that name,
    beside the tested epoch's selected_val_accuracy, as pareto.csv and the study do."""
    from mlflow.tracking import MlflowClient

    uri = sqlite_store(tmp_path)
    client = MlflowClient(uri)
    experiment = client.create_experiment("last")
    parent = client.create_run(experiment).info.run_id
    child = client.create_run(
        experiment, tags={"mlflow.parentRunId": parent, "sweep_job": "0"}
    ).info.run_id
    for step, value in enumerate([0.2292, 0.2083], start=1):  # the best epoch was the first
        client.log_metric(child, "val_accuracy", value, step=step)
    for key, value in {
        "selected_val_accuracy": 0.2292,
        "test_accuracy": 0.2,
        "param_count": 9,
    }.items():
        client.log_metric(child, key, value)
    client.set_terminated(child, "FINISHED")
    context = SweepContext(uri, experiment, parent, search=True)
    objectives = ("val_accuracy:max", "param_count:min")
    sweep.summarize(context, tmp_path / "summary", objectives=objectives)
    with open(tmp_path / "summary" / "jobs.csv", newline="") as f:
        [row] = list(csv.DictReader(f))
    assert (float(row["val_accuracy"]), float(row["selected_val_accuracy"])) == (0.2083, 0.2292)
    sweep.summarize(context, tmp_path / "other", objectives=("selected_val_accuracy:max",))
    with open(tmp_path / "other" / "jobs.csv", newline="") as f:
        assert "val_accuracy" not in next(csv.reader(f))
