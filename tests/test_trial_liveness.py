"""A search rerun before ``stale_after_s`` has passed: the RUNNING trials no live process runs
are named, with when Optuna retries them, and are counted in flight, not done."""

from __future__ import annotations

import re
import time

import optuna
import pytest
from conftest import ended_process, sqlite_store
from optuna.trial import TrialState
from test_search_cli import TINY, killed_in_trial, ok, runs, search_cli, study

import convnets
from convnets import folder_lock, search, trial_liveness
from convnets.sweep_files import SearchResults


def asked(*processes: dict | None) -> tuple[list, dict[int, int]]:
    """RUNNING trials of an in-memory study, each recorded as asked by one of ``processes``
    (None: recorded before processes were); and their ids (number -> number + 100)."""
    s = optuna.create_study()
    trials = []
    for record in processes:
        trial = s.ask()
        if record is not None:
            trial.set_user_attr(trial_liveness.PROCESS_ATTR, record)
        trials.append(trial)
    return s.get_trials(), {t.number: t.number + 100 for t in trials}


def test_a_trial_whose_search_ended_on_this_host_is_named_with_when_it_is_retried():
    gone = ended_process()
    running, ids = asked(gone, folder_lock.this_process())
    found = trial_liveness.stalled(running, ids, {100: 25.0, 101: 300.0}, stale_after_s=60)
    [dead] = found  # the other's search lives (here, this process): in flight, however quiet
    assert (dead.number, dead.trial_id, dead.here, dead.retry_in_s) == (0, 100, True, 35.0)
    assert dead.line(60) == (
        f"warning: trial 0 is RUNNING without a live process here "
        f"(process {gone['pid']} on {gone['host']} ended); its last heartbeat was 25 s ago, it "
        "is retried once hydra.sweeper.stale_after_s=60 has passed (in 35 s): rerun then"
    )


def test_a_trial_whose_search_died_before_its_first_heartbeat_is_named_too():
    gone = ended_process()
    running, ids = asked(gone)
    [dead] = trial_liveness.stalled(running, ids, {}, stale_after_s=60)
    assert dead.age_s is None and dead.retry_in_s == 60
    assert dead.line(60).endswith(
        "ended); it had no heartbeat, one is recorded now: it is retried once "
        "hydra.sweeper.stale_after_s=60 has passed (in 60 s): rerun then"
    )


def test_a_trial_nobody_said_they_run_is_named_once_two_heartbeats_have_passed():
    """A search stopped inside Optuna's ask (a trial RUNNING before its process and first
    heartbeat were recorded) left it RUNNING for good: never retried, the parent kept open."""
    import datetime

    running, ids = asked(None, None)
    running[0].datetime_start -= datetime.timedelta(seconds=trial_liveness.MISSED_BEATS_S + 5)
    [orphan] = trial_liveness.stalled(running, ids, {}, stale_after_s=60)
    assert orphan.number == 0  # trial 1 was asked just now: its process may say so yet
    assert orphan.age_s is None and orphan.retry_in_s == 60
    assert orphan.line(60) == (
        "warning: trial 0 is RUNNING, and no process says it runs it (its search stopped "
        "while asking it); it had no heartbeat, one is recorded now: it is retried once "
        "hydra.sweeper.stale_after_s=60 has passed (in 60 s): rerun then"
    )


def test_a_trial_run_elsewhere_is_named_once_it_has_missed_two_heartbeats():
    elsewhere = {"host": "elsewhere", "pid": 7, "started": 0.0}
    running, ids = asked(elsewhere, elsewhere, None)
    beat = trial_liveness.MISSED_BEATS_S
    ages = {100: beat - 1.0, 101: beat + 5.0, 102: beat + 5.0}
    found = trial_liveness.stalled(running, ids, ages, stale_after_s=60)
    assert [t.number for t in found] == [1, 2]  # trial 0 beat within two heartbeats: alive
    assert not any(t.here for t in found)
    assert found[0].line(60) == (
        f"warning: trial 1 is RUNNING but process 7 on elsewhere has sent no heartbeat for "
        f"{beat + 5} s; it is retried if none comes once hydra.sweeper.stale_after_s=60 has "
        f"passed (in {60 - beat - 5} s): rerun then"
    )
    assert found[1].line(60).startswith("warning: trial 2 is RUNNING but its process has sent")


def test_canary_the_heartbeat_table_says_when_optuna_retries(tmp_path):
    """The age of a trial's last heartbeat is read from Optuna's own table (no public API
    says it): it must be what fail_stale_trials compares to the grace period."""
    url = f"sqlite:///{tmp_path}/o.db"
    storage = optuna.storages.RDBStorage(url, heartbeat_interval=1, grace_period=2)
    s = optuna.create_study(storage=storage, study_name="s")
    trial_id = search.trial_id(storage, "s", s.ask().number)
    assert trial_liveness.heartbeat_ages(url, [trial_id]) == {}  # none recorded yet
    storage.record_heartbeat(trial_id)
    [age] = trial_liveness.heartbeat_ages(url, [trial_id]).values()
    assert 0 <= age <= 1
    optuna.storages.fail_stale_trials(s)
    assert s.trials[0].state == TrialState.RUNNING  # within the grace period: not retried
    deadline = time.monotonic() + 10
    while trial_liveness.heartbeat_ages(url, [trial_id])[trial_id] <= 2:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    optuna.storages.fail_stale_trials(s)
    assert s.trials[0].state == TrialState.FAIL  # past it, as the age said: retried


def test_a_study_reports_its_stalled_trials_from_its_storage(tmp_path, capsys):
    url = f"sqlite:///{tmp_path}/o.db"
    storage = optuna.storages.RDBStorage(url, heartbeat_interval=10, grace_period=60)
    s = optuna.create_study(storage=storage, study_name="s")
    gone = ended_process()
    for record in (gone, folder_lock.this_process(), gone):
        trial = s.ask()
        trial.set_user_attr(trial_liveness.PROCESS_ATTR, record)
    for number in (0, 1):  # trial 2's search died before its first heartbeat
        storage.record_heartbeat(search.trial_id(storage, "s", number))

    found = trial_liveness.report(s, storage, url, 60)

    assert [t.number for t in found] == [0, 2]
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(" is RUNNING")[0] for line in lines] == [
        "warning: trial 0",
        "warning: trial 2",
    ]
    # Trial 2 has a heartbeat now: Optuna retries it once stale, as the line said.
    ages = trial_liveness.heartbeat_ages(url, [search.trial_id(storage, "s", 2)])
    assert list(ages.values())[0] <= 1


@pytest.mark.slow
def test_a_rerun_before_a_killed_trial_is_stale_names_it_and_does_not_count_it_done(tmp_path):
    args = ["hparams_search=digits_optuna", *TINY, "trainer.epochs=10", "hydra.sweeper.n_trials=2"]
    args += ["hydra.sweeper.stale_after_s=600"]
    proc = killed_in_trial(tmp_path, args, 1)
    killed = study(tmp_path, "digits_optuna").trials[1]
    assert killed.state == TrialState.RUNNING
    assert killed.user_attrs[trial_liveness.PROCESS_ATTR]["pid"] == proc.pid

    rerun = ok(search_cli(tmp_path, *args))

    [line] = [x for x in rerun.stderr.splitlines() if x.startswith("warning: trial ")]
    pattern = (
        rf"warning: trial 1 is RUNNING without a live process here \(process {proc.pid} on "
        r"\S+ ended\); its last heartbeat was (\d+) s ago, it is retried once "
        r"hydra\.sweeper\.stale_after_s=600 has passed \(in (\d+) s\): rerun then"
    )
    match = re.fullmatch(pattern, line)
    assert match, line
    age, retry_in = map(int, match.groups())
    assert age < 120 and 599 <= age + retry_in <= 601
    # Not done: the log says so, and it keeps its place (no trial asked in its stead) ...
    assert "1 of 2 trials done, 1 in flight (1 without a live process)" in rerun.stdout
    trials = study(tmp_path, "digits_optuna").trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.RUNNING]
    # ... not as run by another process: the parent is not kept RUNNING waiting for it.
    results = SearchResults.read(tmp_path / "multirun")
    assert results.trials_running == 0 and results.trials_complete == 1
    parents, children, _ = runs(tmp_path)
    assert [p.info.status for p in parents] == ["FINISHED"]
    counts = {k: v for k, v in parents[0].data.metrics.items() if k.startswith("jobs")}
    assert counts == {"jobs": 2, "jobs_finished": 1, "jobs_failed": 0, "jobs_killed": 1,
                      "jobs_pruned": 0}  # fmt: skip
    by_run = {r.info.run_id: r for r in children}
    assert by_run[killed.user_attrs["mlflow_run_id"]].info.status == "KILLED"
    # The search continues a stopped trial (it asks its parameters again), not resume=: a
    # resumed trial run would sit under the parent beside its retry.
    killed_run = killed.user_attrs["mlflow_run_id"]
    with pytest.raises(convnets.ConfigError, match=rf"resume={killed_run} is a trial of the"):
        convnets.train([f"resume={killed_run}", f"tracking.uri={sqlite_store(tmp_path)}"])
