"""Architecture search (``hydra/sweeper=convnets_optuna``) through the real CLI on a fresh
SQLite MLflow store and Optuna storage: a two-objective search resumed to more trials, a
median-pruned search, two processes sharing one study, bad searches refused.

Plus the pure parts of :mod:`convnets.search` (no subprocess, no TensorFlow).
"""

from __future__ import annotations

import csv
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from conftest import CLI_ENV, REPO, heavy_modules_loaded, sqlite_store, train_cli
from omegaconf import OmegaConf
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from convnets import search, search_settings, search_space, search_storage
from convnets.errors import ConfigError
from convnets.sweep_files import PrunerSpec, SearchResults, TrialFile

TINY = [
    "trainer.verbose=0",
    "tracking.log_model=false",
    "model.layers=[{filters:4},{filters:4,pool:max}]",
]


# ---------------------------------------------------------------- helpers


def search_cli(
    tmp: Path, *overrides: str, sweep_dir: str = "multirun", timeout: float = 600, with_store=True
):
    """``train.py -m`` on the MLflow store ``tmp/mlflow.db``: one there already (a copy of the
    schema, :func:`conftest.sqlite_store`) unless not ``with_store``."""
    if with_store:
        sqlite_store(tmp)
    return train_cli(
        "-m",
        f"tracking.uri=sqlite:///{tmp}/mlflow.db",
        f"hydra.sweep.dir={tmp}/{sweep_dir}",
        *overrides,
        timeout=timeout,
    )


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def runs(tmp: Path) -> tuple[list, list, object]:
    """(parents, children, client) in the sweep's MLflow store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp}/mlflow.db")
    found = client.search_runs([e.experiment_id for e in client.search_experiments()])
    parents = [r for r in found if r.data.tags.get("sweep_role") == "parent"]
    children = sorted(
        (r for r in found if r not in parents), key=lambda r: int(r.data.tags["sweep_job"])
    )
    return parents, children, client


def study(tmp: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{tmp}/optuna.db")


def killed_in_trial(tmp: Path, args: list[str], number: int) -> subprocess.Popen:
    """``train.py -m ARGS`` on the stores in ``tmp`` (sweep folder ``multirun``), killed with
    SIGKILL (no handler, no atexit) once trial ``number`` has started its MLflow run.

    Waited for in two steps, so that a fast machine cannot finish the trial between two looks:
    the job's ``devices:`` line (read as it is printed: trial ``number`` is starting, the study
    exists), then the trial's run id in the study, looked at every 50 ms through one storage
    (a new one per look checks the schema each time, which took seconds under load)."""
    command = [sys.executable, "train.py", "-m", f"tracking.uri={sqlite_store(tmp)}"]
    command += [f"hydra.sweep.dir={tmp}/multirun", *args]
    proc = subprocess.Popen(
        command, cwd=REPO, env=CLI_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    jobs_started = 0
    while jobs_started <= number:
        line = proc.stdout.readline()
        assert line, proc.communicate()  # ended before trial ``number`` started
        jobs_started += line.startswith("devices:")
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp}/optuna.db")
    study_id = storage.get_study_id_from_name("digits_optuna")
    deadline = time.monotonic() + 60
    while "mlflow_run_id" not in storage.get_all_trials(study_id)[number].user_attrs:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.kill()
    proc.communicate()
    return proc


def sweeper_config(**sweeper) -> OmegaConf:
    return OmegaConf.create(
        {
            "hydra": {
                "sweeper": {
                    "_target_": "hydra_plugins.convnets_optuna.x",
                    "params": {"optimizer.lr": "interval(1e-4, 1e-2)"},
                    **sweeper,
                }
            },
            "dataset": {"val_fraction": 0.1},
            "tracking": {"uri": "sqlite:///mlflow.db", "experiment": None},
        }
    )


# ---------------------------------------------------------------- pure parts


def test_sweep_syntax_becomes_optuna_distributions():
    space, fixed = search_space.parse_space(
        [
            "optimizer.lr=tag(log, interval(1e-4, 1e-2))",
            "trainer.batch_size=tag(log, int, interval(16, 256))",
            "model.layer_defaults.dropout=interval(0.0, 0.5)",
            "model.depth=tag(int, interval(2, 6))",
            "model.layer_defaults.kernel_size=choice(3, 5)",
            "model.width=0.5,1.0",
            "model.layers=choice([{filters:4}],[{filters:4},{filters:8,pool:max}])",
            "trainer.epochs=range(2, 9, 3)",
            "optimizer.momentum=range(0.0, 1.0, 0.25)",
            "model.layer_defaults.batch_norm=choice(true, false)",
            "trainer.seed=1",
            "trainer.seed=2",  # the later one wins
            "dataset=digits",
        ]
    )
    assert space["optimizer.lr"] == FloatDistribution(1e-4, 1e-2, log=True)
    assert space["model.layer_defaults.dropout"] == FloatDistribution(0.0, 0.5)
    assert space["model.depth"] == IntDistribution(2, 6)
    assert space["trainer.batch_size"] == IntDistribution(16, 256, log=True)
    assert space["model.layer_defaults.kernel_size"] == CategoricalDistribution([3, 5])
    assert space["model.width"] == CategoricalDistribution([0.5, 1.0])
    assert space["model.layers"] == CategoricalDistribution(
        ["[{filters:4}]", "[{filters:4},{filters:8,pool:max}]"]
    )
    assert space["trainer.epochs"] == IntDistribution(2, 8, step=3)  # 2, 5, 8
    assert space["optimizer.momentum"] == FloatDistribution(0.0, 0.75, step=0.25)
    assert space["model.layer_defaults.batch_norm"] == CategoricalDistribution([True, False])
    assert fixed == {"trainer.seed": "2", "dataset": "digits"}


def test_a_trial_becomes_hydra_overrides():
    params = {"model.layer_defaults.batch_norm": False, "optimizer.lr": 0.01, "trainer.seed": 3}
    overrides = search_space.trial_overrides(params, {"trainer.seed": "1", "dataset": "digits"})
    assert overrides == [
        "model.layer_defaults.batch_norm=false",
        "optimizer.lr=0.01",
        "trainer.seed=3",
        "dataset=digits",
    ]


def test_objectives_take_a_direction_or_their_usual_one():
    assert search_settings.parse_objectives(
        ["selected_val_accuracy:max", "param_count", "receptive_field:max", "val_accuracy"]
    ) == (
        search_settings.Objective("selected_val_accuracy", "maximize"),
        search_settings.Objective("param_count", "minimize"),
        search_settings.Objective("receptive_field", "maximize"),
        search_settings.Objective("val_accuracy", "maximize"),
    )


def test_the_default_objective_is_the_tested_epochs_validation_accuracy():
    settings, objectives = search_settings.check(sweeper_config())
    assert settings.objectives == ["selected_val_accuracy:max"]
    assert objectives == (search_settings.Objective("selected_val_accuracy", "maximize"),)


@pytest.mark.parametrize(
    ("specs", "message"),
    [
        (["accuracy"], "unknown objective 'accuracy'; valid: selected_val_accuracy, val_accuracy,"),
        (["selected_val_accuracy:up"], "max or min (e.g. selected_val_accuracy:max)"),
        (["macs", "macs:min"], "macs is given twice"),
        ([], "empty; give at least one"),
    ],
)
def test_bad_objectives_are_one_line_naming_the_key(specs, message):
    with pytest.raises(ConfigError, match=r"^hydra\.sweeper\.objectives: ") as err:
        search_settings.parse_objectives(specs)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("sweeper", "val_fraction", "message"),
    [
        ({"pruner": "median", "objectives": ["selected_val_accuracy", "param_count"]}, 0.1,
         "hydra.sweeper.pruner=median: Optuna cannot prune a multi-objective search"),
        ({"pruner": "hyperband", "objectives": ["test_accuracy"]}, 0.1,
         r"pruning compares the trials' per-epoch val_accuracy; it needs "
         r"hydra.sweeper.objectives=\[selected_val_accuracy:max\] \(or \[val_accuracy:max\]\)"),
        ({"pruner": "asha"}, 0.1, "hydra.sweeper.pruner=asha: unknown; use none, median"),
        ({"sampler": "cmaes"}, 0.1, "hydra.sweeper.sampler=cmaes: unknown; use tpe, nsga2"),
        ({"n_trials": 0}, 0.1, "hydra.sweeper.n_trials=0: give 1 or more"),
        ({"seed": -1}, 0.1, r"hydra.sweeper.seed=-1: give 0 to 4294967295 \(2\*\*32 - 1\)"),
        ({"seed": 2**32}, 0.1, "hydra.sweeper.seed=4294967296: give 0 to"),
        ({"n_startup_trials": -2}, 0.1, "hydra.sweeper.n_startup_trials=-2: give 0 or more"),
        ({"stale_after_s": 5}, 0.1, "hydra.sweeper.stale_after_s=5: give 20 or more"),
        ({"params": {"model.width": "tag(log, interval(0, 2))"}}, 0.1,
         r"model.width=tag\(log, interval\(0, 2\)\): a log scale needs a lower bound above 0"),
        ({}, 0.0,
         "dataset.val_fraction=0: the objective selected_val_accuracy needs validation data"),
        ({"params": {"optimizer.lr": "interval(0.1,0.01)"}}, 0.1,
         r"^optimizer.lr=interval\(0.1,0.01\): the lower bound 0.1 is above the upper 0.01; "
         "put the smaller first$"),
        ({"params": {"trainer.batch_size": "range(64,32)"}}, 0.1,
         r"^trainer.batch_size=range\(64,32\): range\(64, 32\) is empty \(the stop is "
         r"excluded\); put the smaller first$"),
        ({"params": {}}, 0.1,
         r"^hydra.sweeper.params: the search space is empty .* run a grid: -m trainer.seed=0,1,2$"),
        ({"params": {"trainer.epochs": "3"}}, 0.1, "^hydra.sweeper.params: the search space is empty"),
        ({"objectives": ["param_count", "val_accuracy"]}, 0.0,
         "dataset.val_fraction=0: the objective val_accuracy needs validation data"),
    ],
)  # fmt: skip
def test_searches_that_cannot_run_are_refused(sweeper, val_fraction, message):
    config = sweeper_config(**sweeper)
    config.dataset.val_fraction = val_fraction
    with pytest.raises(ConfigError, match=message):
        search_settings.check(config)


@pytest.mark.parametrize("storage", ["sqlite:///mlflow.db", "sqlite:///./mlflow.db"])
def test_a_study_is_not_stored_in_the_mlflow_store(storage, tmp_path, monkeypatch):
    """Optuna would add its tables to MLflow's database, then refuse their schema version."""
    from convnets.search_storage import storage_url

    monkeypatch.chdir(tmp_path)
    config = sweeper_config(storage=storage)
    config.tracking.uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    settings, _ = search_settings.check(config)
    with pytest.raises(ConfigError, match=rf"^hydra.sweeper.storage={storage} is the MLflow"):
        storage_url(settings, config)
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize("objective", ["selected_val_accuracy", "val_accuracy"])
def test_a_pruned_search_optimises_either_validation_accuracy(objective):
    _, objectives = search_settings.check(sweeper_config(pruner="median", objectives=[objective]))
    assert [o.name for o in objectives] == [objective]


def test_a_test_accuracy_search_needs_no_validation_data():
    config = sweeper_config(objectives=["test_accuracy", "param_count"])
    config.dataset.val_fraction = 0.0
    _, objectives = search_settings.check(config)
    assert [o.name for o in objectives] == ["test_accuracy", "param_count"]


def test_only_our_sweeper_is_a_search():
    assert search_settings.is_search(
        OmegaConf.create({"_target_": "hydra_plugins.convnets_optuna.a.B"})
    )
    basic = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
    assert not search_settings.is_search(OmegaConf.create({"_target_": basic}))


def test_the_default_storage_sits_beside_a_sqlite_mlflow_store(tmp_path):
    assert search_storage.default_storage(f"sqlite:///{tmp_path}/mlflow.db") == (
        f"sqlite:///{tmp_path}/optuna.db"
    )
    assert (
        search_storage.default_storage("http://mlflow:5000") == f"sqlite:///{Path.cwd()}/optuna.db"
    )


def test_job_numbers_follow_trial_numbers_in_consecutive_launches():
    assert search.consecutive_runs([4, 5, 7, 8, 10]) == [[4, 5], [7, 8], [10]]
    assert search.consecutive_runs([]) == []


def test_the_budget_counts_finished_running_and_unretried_failed_trials():
    s = optuna.create_study()
    s.tell(s.ask(), 0.5)  # complete
    s.tell(s.ask(), state=TrialState.PRUNED)
    s.tell(s.ask(), state=TrialState.FAIL)  # a failed job: counts
    s.ask()  # running (maybe in another process): counts
    # A stale trial re-enqueued by the retry callback: the original does not count, the
    # waiting retry does not count until it is asked.
    stale = s.ask()
    s.tell(stale, state=TrialState.FAIL)
    s.enqueue_trial({}, user_attrs={})
    s._storage.set_trial_system_attr(s.trials[-1]._trial_id, "failed_trial", stale.number)
    assert search.counted_trials(s.get_trials()) == 4


def test_trials_stopped_by_ctrl_c_are_asked_again_with_their_params():
    s = optuna.create_study()
    trial = s.ask({"x": FloatDistribution(0, 1)})
    with pytest.raises(KeyboardInterrupt), search._retried_if_stopped(s, [trial]):
        raise KeyboardInterrupt
    assert [t.state for t in s.trials] == [TrialState.FAIL, TrialState.WAITING]
    assert search.counted_trials(s.get_trials()) == 0  # the budget still has room for it
    assert s.ask({"x": FloatDistribution(0, 1)}).params == trial.params


def test_heartbeats_recorded_outside_optimize_keep_a_trial_alive(tmp_path):
    """What the search relies on: the storage's public record_heartbeat marks a trial asked
    through ask/tell alive, and fail_stale_trials fails it once it falls silent."""
    import time as clock

    storage = optuna.storages.RDBStorage(
        f"sqlite:///{tmp_path}/o.db", heartbeat_interval=1, grace_period=2
    )
    study = optuna.create_study(storage=storage, study_name="s")
    trial = study.ask()
    trial_id = search.trial_id(storage, "s", trial.number)
    storage.record_heartbeat(trial_id)
    optuna.storages.fail_stale_trials(study)
    assert study.trials[0].state == TrialState.RUNNING
    clock.sleep(3)
    optuna.storages.fail_stale_trials(study)
    assert study.trials[0].state == TrialState.FAIL


def test_canary_a_trial_asked_elsewhere_is_reached_through_its_id(tmp_path):
    """A job reaches the trial the sweeper asked through optuna.trial.Trial(study, trial_id),
    which Optuna documents as internal: its reports must land on that very trial."""
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path}/o.db")
    asked = optuna.create_study(storage=storage, study_name="s").ask()
    study = optuna.load_study(study_name="s", storage=storage)
    trial = optuna.trial.Trial(study, search.trial_id(storage, "s", asked.number))
    trial.report(0.5, 1)
    trial.set_user_attr("metrics", {"selected_val_accuracy": 0.5})
    [frozen] = study.get_trials()
    assert trial.number == asked.number == frozen.number
    assert frozen.intermediate_values == {1: 0.5}
    assert frozen.user_attrs == {"metrics": {"selected_val_accuracy": 0.5}}


def test_the_trial_file_round_trips(tmp_path):
    spec = TrialFile("sqlite:///x.db", "s", 7, PrunerSpec("median", 5), 60)
    spec.write(tmp_path)
    assert TrialFile.read(tmp_path, 7) == spec
    assert TrialFile.read(tmp_path, 8) is None
    assert TrialFile.numbers(tmp_path) == {7}


def test_the_results_file_round_trips(tmp_path):
    assert SearchResults.read(tmp_path) is None
    one = SearchResults("s", ("selected_val_accuracy:max",), 3, 0.9, {"optimizer.lr": 0.01}, 2,
                        "r2")  # fmt: skip
    one.write(tmp_path)
    assert SearchResults.read(tmp_path) == one
    text = SearchResults.path(tmp_path).read_text()
    assert "solutions" not in text and "best_value: 0.9" in text
    front = ({"trial": 1, "run_id": "r1",
              "values": {"selected_val_accuracy": 0.9, "param_count": 10.0},
              "params": {"model.width": 0.5}},)  # fmt: skip
    several = SearchResults("s", ("selected_val_accuracy:max", "param_count:min"), 4,
                            solutions=front, dominated_run_ids=("r0",))  # fmt: skip
    several.write(tmp_path)
    assert SearchResults.read(tmp_path) == several
    assert "best_value" not in SearchResults.path(tmp_path).read_text()


def test_the_launcher_process_stays_light():
    imports = "convnets.sweep, convnets.search, convnets.trials, "
    imports += "hydra_plugins.convnets_optuna.convnets_optuna_sweeper"
    assert heavy_modules_loaded(imports, ("tensorflow", "mlflow", "optuna")) == []


# ---------------------------------------------------------------- through the CLI


# One of the search's own checks (the others: test_searches_that_cannot_run_are_refused), the
# first trial's composition, and the storage, each through the command it guards.
@pytest.mark.parametrize(
    ("overrides", "line"),
    [
        (["hydra.sweeper.objectives=[accuracy]"],
         "error: hydra.sweeper.objectives: unknown objective 'accuracy'; valid: "
         "selected_val_accuracy, val_accuracy,"),
        (["model.nosuch=choice(1,2)"],  # composed at the first trial: the parent was left FAILED
         "error: model.nosuch: unknown key (Key 'nosuch' not in 'ModelConfig')"),
        (["model.width=choice(a,b)"],
         "error: model.width: Value 'a' of type 'str' could not be converted to Float"),
        (["hydra.sweeper.storage=sqlite:////proc/convnets/optuna.db"],  # cannot be made there
         "error: hydra.sweeper.storage=sqlite:////proc/convnets/optuna.db: the Optuna storage "
         "cannot be used ("),
    ],
)  # fmt: skip
def test_a_bad_search_is_one_line_before_any_run(tmp_path, overrides, line):
    proc = search_cli(
        tmp_path, "hparams_search=digits_optuna", *overrides, timeout=120, with_store=False
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    [printed] = proc.stderr.strip().splitlines()
    assert printed.startswith(line), proc.stderr[-2000:]
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "optuna.db").exists()


@pytest.mark.slow
def test_a_two_objective_search_resumes_into_the_same_study_and_parent(tmp_path):
    args = ["hparams_search=digits_pareto", "trainer.epochs=1", "trainer.verbose=0"]
    args += ["tracking.log_model=false"]
    ok(search_cli(tmp_path, *args, "hydra.sweeper.n_trials=6"))
    parents, children, client = runs(tmp_path)
    assert len(parents) == 1 and len(children) == 6
    assert all(len(r.info.run_name) <= 60 for r in [*parents, *children])
    parent = parents[0].info.run_id
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent}
    assert {"pareto/pareto.csv", "pareto/pareto.png"} <= {
        a.path for a in client.list_artifacts(parent, "pareto")
    }

    ok(search_cli(tmp_path, *args, "hydra.sweeper.n_trials=8"))  # the same command, 2 more
    parents, children, client = runs(tmp_path)
    assert [p.info.run_id for p in parents] == [parent]
    assert parents[0].info.status == "FINISHED"
    assert [r.data.tags["sweep_job"] for r in children] == [str(n) for n in range(8)]
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent}
    resumed = study(tmp_path, "digits_pareto")
    # The objectives carry their names: optuna-dashboard shows them, not "Objective 0/1".
    assert resumed.metric_names == ["selected_val_accuracy", "param_count"]
    trials = resumed.trials
    assert [t.number for t in trials] == list(range(8))
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert {t.user_attrs["mlflow_run_id"] for t in trials} == {r.info.run_id for r in children}

    # The same search with another fixed setting is refused before any run is reopened: its
    # trials would not compare with the study's.
    changed = search_cli(tmp_path, *args, "hydra.sweeper.n_trials=9", "trainer.epochs=2")
    assert changed.returncode == 2, changed.stderr[-2000:]
    assert changed.stderr.strip().splitlines() == [
        "error: trainer.epochs=2: the trials of study 'digits_pareto' trained with "
        "trainer.epochs=1; rerun with its settings to add trials, or start a new study: "
        "hydra.sweeper.study_name=<name>"
    ]
    assert client.get_run(parent).info.status == "FINISHED"
    assert len(study(tmp_path, "digits_pareto").trials) == 8

    # The Pareto front over all 8 trials: tagged on the runs, listed in pareto.csv.
    local = Path(client.download_artifacts(parent, "pareto/pareto.csv", str(tmp_path)))
    rows = list(csv.DictReader(local.open()))
    assert len(rows) == 8
    front = {row["run_id"] for row in rows if row["pareto_optimal"] == "True"}
    tagged = {r.info.run_id for r in children if r.data.tags.get("pareto_optimal") == "true"}
    assert front and front == tagged
    for row in rows:  # no front point is beaten on both objectives by another trial
        if row["run_id"] in front:
            acc, params = float(row["selected_val_accuracy"]), float(row["param_count"])
            assert not any(
                float(o["selected_val_accuracy"]) > acc and float(o["param_count"]) < params
                for o in rows
            )


@pytest.mark.slow
def test_four_views_of_one_study_agree_on_every_figure_they_share(tmp_path):
    """``compare=`` over the parent, the parent's summary, ``pareto.csv`` and the study as
    optuna-dashboard reads it: per run the same figure under the same name. The objective is
    the validation accuracy of the epoch each run tested (its restored best), never the last
    epoch's ``val_accuracy`` under the objective's name."""
    import convnets

    objectives = ["selected_val_accuracy", "param_count"]
    spec = "[selected_val_accuracy:max,param_count:min]"
    ok(search_cli(tmp_path, "hparams_search=digits_optuna", *TINY, "trainer.epochs=2",
                  "hydra.sweeper.n_trials=3", f"hydra.sweeper.objectives={spec}"))  # fmt: skip
    [parent], children, client = runs(tmp_path)
    assert [r.info.status for r in children] == ["FINISHED"] * 3
    shared = (*objectives, "test_accuracy")
    record = {r.info.run_id: {k: r.data.metrics[k] for k in shared} for r in children}
    last = {}  # the last epoch's val_accuracy, as MLflow shows the per-epoch metric
    for run in children:
        metrics = run.data.metrics
        history = client.get_metric_history(run.info.run_id, "val_accuracy")
        by_epoch = {m.step: m.value for m in history}
        assert metrics["selected_val_accuracy"] == by_epoch[int(metrics["best_epoch"])]
        last[run.info.run_id] = by_epoch[max(by_epoch)]
        assert metrics["val_accuracy"] == last[run.info.run_id]  # as MLflow shows the run

    # The study, as optuna-dashboard shows it: named objectives, each trial's values.
    dashboard = study(tmp_path, "digits_optuna")
    assert dashboard.metric_names == objectives
    assert {t.user_attrs["mlflow_run_id"] for t in dashboard.trials} == set(record)
    for trial in dashboard.trials:
        run_id = trial.user_attrs["mlflow_run_id"]
        assert trial.values == [record[run_id][k] for k in objectives]
        reported = trial.user_attrs["metrics"]
        assert {k: reported[k] for k in shared} == record[run_id]
        assert reported["val_accuracy"] == last[run_id]  # the last epoch's, under its own name

    # pareto.csv in the sweep folder (and logged on the parent): one column per objective.
    with open(tmp_path / "multirun" / "pareto.csv", newline="") as f:
        pareto = list(csv.DictReader(f))
    assert list(pareto[0]) == ["trial", "run_id", *objectives, "pareto_optimal", "params"]
    assert {row["run_id"] for row in pareto} == set(record)
    for row in pareto:
        assert {k: float(row[k]) for k in objectives} == {
            k: record[row["run_id"]][k] for k in objectives
        }

    # The parent: summary/jobs.csv, and its best job, one named run and its criterion.
    local = client.download_artifacts(parent.info.run_id, "summary/jobs.csv", str(tmp_path))
    with open(local, newline="") as f:
        jobs = list(csv.DictReader(f))
    assert "val_accuracy" not in jobs[0]
    assert {row["run_id"] for row in jobs} == set(record)
    for row in jobs:
        assert {k: float(row[k]) for k in shared} == record[row["run_id"]]
    tags, metrics = parent.data.tags, parent.data.metrics
    best = record[tags["best_run_id"]]
    assert best["selected_val_accuracy"] == max(r["selected_val_accuracy"] for r in record.values())
    assert tags["best_run_name"] == client.get_run(tags["best_run_id"]).info.run_name
    assert tags["best_criterion"] == (
        "selected_val_accuracy (max); the search's Pareto front of selected_val_accuracy:max, "
        "param_count:min: pareto/"
    )
    assert metrics["best_selected_val_accuracy"] == best["selected_val_accuracy"]
    assert metrics["best_test_accuracy"] == best["test_accuracy"]
    assert "best_val_accuracy" not in metrics

    # evaluate.py compare=<parent>, in process.
    report = convnets.compare(
        parent.info.run_id,
        tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
        output_dir=tmp_path / "compare",
    )
    assert "val_accuracy" not in report.table.columns
    table = report.table.set_index("run_id")
    assert set(table.index) == set(record)
    for run_id, figures in record.items():
        assert {k: table.loc[run_id, k] for k in shared} == figures


@pytest.mark.slow
def test_a_median_pruned_search_stops_poor_trials_early(tmp_path):
    ok(
        search_cli(
            tmp_path,
            "hparams_search=digits_optuna",
            *TINY,
            "trainer.epochs=4",
            "hydra.sweeper.n_trials=8",
            "hydra.sweeper.pruner=median",
            "optimizer.lr=tag(log, interval(1e-4, 3e-1))",  # wide: some trials learn slowly
        )
    )
    _, children, client = runs(tmp_path)
    assert len(children) == 8
    pruned = [r for r in children if r.data.tags.get("pruned") == "true"]
    assert pruned, "the median pruner should stop at least one of 8 trials"
    for run in pruned:
        assert run.info.status == "FINISHED"
        assert run.data.metrics["epochs_completed"] < 4
        assert "test_accuracy" not in run.data.metrics
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy")]
        assert steps == list(range(1, int(run.data.metrics["epochs_completed"]) + 1))
    states = {t.number: t.state for t in study(tmp_path, "digits_optuna").trials}
    for run in pruned:
        assert states[int(run.data.tags["sweep_job"])] == TrialState.PRUNED


@pytest.mark.slow
def test_two_processes_on_one_storage_share_the_study_without_duplicates(tmp_path):
    args = [
        sys.executable,
        "train.py",
        "-m",
        "hparams_search=digits_optuna",
        *TINY,
        "trainer.epochs=1",
        "hydra.sweeper.n_trials=4",
        f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
    ]
    kwargs = {"cwd": REPO, "env": CLI_ENV, "stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
    # Started together: both create the study and its parent run at about the same moment.
    procs = [
        subprocess.Popen([*args, f"hydra.sweep.dir={tmp_path}/{folder}"], text=True, **kwargs)
        for folder in "ab"
    ]
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, (out[-2000:], err[-3000:])

    trials = study(tmp_path, "digits_optuna").trials
    # n_trials is the study's total; processes checking the budget at the same moment may
    # each start one more.
    assert 4 <= len(trials) <= 5
    assert all(t.state == TrialState.COMPLETE for t in trials)
    ran = {p: TrialFile.numbers(tmp_path / p) for p in "ab"}
    assert ran["a"] and ran["b"] and not ran["a"] & ran["b"]  # both worked, on distinct trials
    assert ran["a"] | ran["b"] == {t.number for t in trials}
    parents, children, client = runs(tmp_path)
    assert len(parents) == 1  # one process's claim won; the other joined that parent
    assert len(children) == len(trials)
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert len({t.user_attrs["mlflow_run_id"] for t in trials}) == len(trials)
    # The last process to end summarised the whole study on the parent and ended it.
    assert parents[0].info.status == "FINISHED"
    jobs = client.download_artifacts(parents[0].info.run_id, "summary/jobs.csv")
    assert len(list(csv.DictReader(Path(jobs).read_text().splitlines()))) == len(trials)


@pytest.mark.slow
def test_a_search_killed_mid_trial_resumes_and_redoes_that_trial(tmp_path):
    args = ["hparams_search=digits_optuna", *TINY, "trainer.epochs=1", "hydra.sweeper.n_trials=3"]
    args += ["hydra.sweeper.stale_after_s=20"]  # the least: two missed heartbeats
    killed_in_trial(tmp_path, args, 1)
    killed = study(tmp_path, "digits_optuna").trials[1]
    assert killed.state == TrialState.RUNNING

    time.sleep(21)  # its heartbeat goes stale
    ok(search_cli(tmp_path, *args))
    trials = study(tmp_path, "digits_optuna").trials
    states = [t.state for t in trials]
    assert states.count(TrialState.COMPLETE) == 3 and states[1] == TrialState.FAIL
    (retry,) = [t for t in trials if t.system_attrs.get("failed_trial") == 1]
    assert retry.params == killed.params and retry.state == TrialState.COMPLETE
    parents, children, _ = runs(tmp_path)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    by_run = {r.info.run_id: r for r in children}
    assert by_run[killed.user_attrs["mlflow_run_id"]].info.status == "KILLED"


def a_search_config(
    epochs=1, experiment="e", lr="interval(1e-4, 1e-2)", more: tuple[str, ...] = (), **sweeper
):
    config = sweeper_config(**sweeper)
    config.hydra.sweeper.params = {"optimizer.lr": lr, "model.width": "choice(0.5, 1.0)"}
    task = [f"trainer.epochs={epochs}", "tracking.uri=sqlite:///a.db", *more]
    config.hydra.overrides = {"task": task}
    config.trainer = {"epochs": epochs, "batch_size": 64}
    config.tracking.experiment = experiment
    return config


def continues(study, config) -> None:
    from convnets.search_storage import check_it_continues, trained_settings

    settings, objectives = search_settings.check(config)
    task = list(config.hydra.overrides.task)
    space, fixed = search_space.parse_space(search_space.space_overrides(settings.params, task))
    check_it_continues(study, objectives, config.tracking.experiment,
                       trained_settings(config, space, fixed), space)  # fmt: skip
    study.ask(space)  # a trial of it: what the study searches from now on


def test_a_study_continues_only_with_its_objectives_experiment_and_settings():
    study = optuna.create_study()
    continues(study, a_search_config())  # the first run of the study records them
    assert study.user_attrs["trained_settings"]["settings"]["trainer.epochs"] == "1"
    assert "optimizer.lr" not in study.user_attrs["trained_settings"]["settings"]  # searched
    continues(study, a_search_config())  # the same search again: more trials
    continues(study, a_search_config(lr="interval(1e-3, 1e-1)"))  # a narrowed range
    refused = {
        "trainer.epochs=2: the trials of study": a_search_config(epochs=2),
        "tracking.experiment=other: study": a_search_config(experiment="other"),
        "hydra.sweeper.objectives: study": a_search_config(objectives=["test_accuracy"]),
        # Optuna refuses a changed choice only when a trial asks for it, once runs exist
        "model.width=choice(1.0, 2.0): study 'no-name-": a_search_config(
            more=("model.width=choice(1.0,2.0)",)
        ),
        "model.width: study 'no-name-": a_search_config(more=("model.width=1.0",)),  # fixed
        "model.layer_defaults.dilation: study 'no-name-": a_search_config(
            more=("model.layer_defaults.dilation=1,2",)  # searched only from now on
        ),
    }
    for line, config in refused.items():
        with pytest.raises(ConfigError, match="start a new study: hydra.sweeper.study_name") as e:
            continues(study, config)
        assert str(e.value).startswith(line)


def test_a_dead_trials_run_that_ended_itself_keeps_its_status_and_cause(tmp_path):
    """A trial whose job ended its run FAILED with a cause (the storage lost) and then fell
    silent is retried; its run keeps that cause. A run left RUNNING (SIGKILL) ends KILLED."""
    import time as clock

    from mlflow.tracking import MlflowClient

    from convnets.sweep_files import RUN_ATTR

    uri = sqlite_store(tmp_path / "store")
    client = MlflowClient(uri)
    experiment = client.create_experiment("s")
    failed, silent = (client.create_run(experiment).info.run_id for _ in range(2))
    client.set_tag(failed, "failure_reason", "the Optuna storage stopped answering")
    client.set_terminated(failed, "FAILED")
    storage = optuna.storages.RDBStorage(
        f"sqlite:///{tmp_path}/o.db", heartbeat_interval=1, grace_period=1
    )
    study = optuna.create_study(storage=storage, study_name="s")
    for run_id in (failed, silent):
        trial = study.ask()
        trial.set_user_attr(RUN_ATTR, run_id)
        storage.record_heartbeat(search.trial_id(storage, "s", trial.number))
    clock.sleep(2.5)
    config = OmegaConf.create(
        {"hydra": {"sweep": {"dir": str(tmp_path)}}, "tracking": {"uri": uri, "http_timeout_s": 10}}
    )
    search.Search(config, launcher=None)._fail_dead_trials(study)

    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.FAIL]
    kept = client.get_run(failed)
    assert kept.info.status == "FAILED"
    assert kept.data.tags["failure_reason"] == "the Optuna storage stopped answering"
    ended = client.get_run(silent)
    assert ended.info.status == "KILLED"
    assert ended.data.tags["failure_reason"].startswith("its process died (no heartbeat)")


def test_a_searched_seed_says_it_is_tuned_not_repeated(capsys):
    from convnets.search_settings import warn_of_a_searched_seed
    from convnets.search_space import parse_space

    warn_of_a_searched_seed(parse_space(["optimizer.lr=tag(log, interval(1e-4, 1e-1))"])[0])
    assert capsys.readouterr().err == ""
    warn_of_a_searched_seed(parse_space(["trainer.seed=0,1,2", "model.width=0.5,1"])[0])
    assert capsys.readouterr().err.startswith(
        "warning: trainer.seed: in a search the seed is a hyperparameter like the others"
    )
