"""Opening a search's Optuna storage while another program creates its schema."""

from __future__ import annotations

import sqlite3

import optuna
import sqlalchemy

from convnets import search_storage


def test_a_schema_created_by_another_program_at_the_same_moment_is_used(tmp_path, monkeypatch):
    """SQLite commits each CREATE TABLE on its own, so a program that does not take the
    sweeper's lock (optuna-dashboard, a user's ``optuna.load_study``) can create a table
    between our check and our create: the storage is opened again, not refused."""
    url = f"sqlite:///{tmp_path}/optuna.db"
    real = optuna.storages.RDBStorage
    calls = []

    def racing(*args, **kwargs):
        calls.append(args)
        if len(calls) == 1:
            real(url)  # the other program wins the race...
            raise sqlalchemy.exc.OperationalError(  # ...and ours trips on its table
                "CREATE TABLE study_directions",
                (),
                sqlite3.OperationalError("table study_directions already exists"),
            )
        return real(*args, **kwargs)

    monkeypatch.setattr(optuna.storages, "RDBStorage", racing)
    storage = search_storage.open_storage.__wrapped__(url)
    monkeypatch.undo()
    study = optuna.create_study(study_name="s", storage=storage)
    assert study.study_name == "s" and len(calls) == 2


def test_a_resumed_search_draws_new_values_after_its_first_trial_was_stopped():
    """Stopped in its first trial, a search records it FAIL and enqueues it again; the next
    run of the command redoes it, then draws. Seeded by the trials done (none), that draw was
    the stopped trial's values again: one point run twice of a two-trial budget."""
    from optuna.distributions import FloatDistribution
    from optuna.storages import RetryFailedTrialCallback
    from optuna.trial import TrialState

    from convnets.search_settings import Settings

    space = {"lr": FloatDistribution(1e-4, 1e-1, log=True)}
    settings = Settings(sampler="tpe", seed=3)
    study = optuna.create_study()
    study.sampler = search_storage.make_sampler(settings, n_done=0, n_asked=0)
    stopped = study.ask(space)
    RetryFailedTrialCallback(max_retry=3)(study, study.tell(stopped, state=TrialState.FAIL))
    # The next process: nothing done, two trials asked (the stopped one and its retry).
    study.sampler = search_storage.make_sampler(settings, n_done=0, n_asked=len(study.trials))
    retry, fresh = study.ask(space), study.ask(space)
    assert retry.params == stopped.params  # the retry redoes the stopped point
    assert fresh.params != stopped.params  # and the budget's next trial is a new one
