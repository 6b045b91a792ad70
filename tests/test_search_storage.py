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
