"""Sweeps through the real CLI (``python train.py -m ...`` in a subprocess) on a fresh SQLite
store: grid under a parent run with its summary, a failing grid point, Optuna, joblib,
submitit's local executor and our fresh_process launcher (a job killed hard included). Tiny on
purpose: 8x8 digits, two 4-filter layers, one epoch.

Plus the pure helpers of :mod:`convnets.sweep` (no subprocess, no TensorFlow).
"""

from __future__ import annotations

import csv
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import heavy_modules_loaded
from omegaconf import OmegaConf

from convnets import sweep

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


def sweep_command(tmp: Path, *overrides: str) -> list[str]:
    return [
        sys.executable,
        "train.py",
        "-m",
        f"tracking.uri=sqlite:///{tmp}/mlflow.db",
        f"hydra.sweep.dir={tmp}/multirun",
        *overrides,
    ]


def sweep_env(tmp: Path) -> dict[str, str]:
    # SWEEP_TEST_MARK: every process of the sweep inherits it (processes_left_behind).
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "HYDRA_FULL_ERROR": "0"}
    return {**env, "SWEEP_TEST_MARK": str(tmp)}


def run_sweep(tmp: Path, *overrides: str, timeout: float = 420) -> Sweep:
    proc = subprocess.run(
        sweep_command(tmp, *overrides),
        cwd=REPO,
        env=sweep_env(tmp),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
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
    ctx = sweep.SweepContext("sqlite:///x.db", "1", "abc", job_num=3, overrides=("a=1", "b=2"))
    assert ctx.tags() == {"sweep_job": "3", "sweep_overrides": "a=1 b=2"}


def test_a_job_without_the_sweep_file_is_recorded_on_its_own(tmp_path):
    from omegaconf import OmegaConf

    hydra_cfg = OmegaConf.create({"sweep": {"dir": str(tmp_path)}, "job": {"num": 0}})
    hydra_cfg.overrides = {"task": ["a=1"]}
    assert sweep.sweep_context(hydra_cfg) is None


# ---------------------------------------------------------------- through the CLI


@pytest.mark.slow
def test_grid_sweep_nests_jobs_under_a_summarised_parent_and_survives_a_bad_point(tmp_path):
    # 2x2 grid; stride 2 with dilation 2 is an invalid stack: that job alone fails.
    s = run_sweep(tmp_path, *TINY, "model.layers.0.stride=1,2", "model.layer_defaults.dilation=1,2")

    assert len(s.children) == 4

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
    assert parent.data.params["sweep.model.layers.0.stride"] == "1,2"
    assert parent.data.params["sweep.model.layer_defaults.dilation"] == "1,2"
    assert parent.data.metrics["jobs"] == 4 and parent.data.metrics["jobs_failed"] == 1
    best = max(s.finished(), key=lambda r: r.data.metrics["best_val_accuracy"])
    assert parent.data.metrics["best_val_accuracy"] == best.data.metrics["best_val_accuracy"]
    assert parent.data.tags["best_run_id"] in {r.info.run_id for r in s.finished()}
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
    objectives = [r.data.metrics["best_val_accuracy"] for r in s.finished()]
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


@pytest.mark.slow
def test_fresh_process_launcher_runs_each_job_in_a_new_process(tmp_path):
    s = run_sweep(
        tmp_path,
        "hydra/launcher=fresh_process",
        "hydra.launcher.n_jobs=2",
        *TINY,
        "model.layer_defaults.kernel_size=1,3,5",
    )
    assert [r.info.status for r in s.children] == ["FINISHED"] * 3
    assert {r.data.tags["sweep_job"] for r in s.children} == {"0", "1", "2"}
    assert s.parent.data.tags["launcher"] == "FreshProcessLauncher"
    assert s.parent.info.status == "FINISHED" and s.parent.data.metrics["jobs_finished"] == 3
    pids = job_processes(s.proc.stdout)
    assert sorted(pids) == [0, 1, 2] and len(set(pids.values())) == 3, s.proc.stdout[-2000:]
    assert processes_left_behind(tmp_path) == []


@pytest.mark.slow
def test_a_fresh_process_job_killed_hard_fails_alone(tmp_path):
    # Job 0's process is SIGKILLed as soon as it is announced; job 1 still runs, the sweep
    # neither hangs nor stops, and its summary counts what finished.
    proc = subprocess.Popen(
        sweep_command(
            tmp_path, "hydra/launcher=fresh_process", *TINY, "model.layer_defaults.kernel_size=1,3"
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
        if pids := job_processes(line):
            os.kill(pids[0], signal.SIGKILL)
            break
    stdout += proc.stdout.readlines()
    assert proc.wait(timeout=300) == 0, "".join(stdout[-20:] + stderr[-20:])
    reader.join()
    errors = [line for line in stderr if line.startswith("error: job #0 ")]
    assert errors and "ended abruptly (killed by SIGKILL)" in errors[0], "".join(stderr)
    s = Sweep(tmp_path, subprocess.CompletedProcess(proc.args, 0, "".join(stdout), ""))
    assert [r.data.tags["sweep_job"] for r in s.finished()] == ["1"]
    assert all(r.info.status != "RUNNING" for r in s.children)  # a run of job 0: ended FAILED
    assert s.parent.info.status == "FINISHED" and s.parent.data.metrics["jobs_finished"] == 1
    assert processes_left_behind(tmp_path) == []


@pytest.mark.slow
def test_submitit_local_executor_runs_the_jobs_under_the_parent(tmp_path):
    s = run_sweep(
        tmp_path, "hydra/launcher=submitit_local", *TINY, "model.layer_defaults.kernel_size=3,5"
    )
    assert [r.info.status for r in s.children] == ["FINISHED"] * 2
    assert {r.data.params["model.layer_defaults.kernel_size"] for r in s.children} == {"3", "5"}
    assert s.parent.data.tags["launcher"] == "LocalLauncher"
    assert s.parent.info.status == "FINISHED"


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
