"""One MLflow parent run per Optuna study, however many processes run the study at once.

Processes on several machines may start the same search (same storage, same study) at the
same moment; each would create a parent run and the trials' runs would be split between
them. So the parent is claimed in the study's own database, the one every process already
shares: a row keyed by the study's id, inserted once. Inserting a primary key is atomic in
every database SQLAlchemy speaks to (SQLite, PostgreSQL, MySQL), across machines; the loser's
insert fails and it reads the winner's row.

Written with SQLAlchemy by hand because Optuna has no compare-and-set: ``set_user_attr``
overwrites, so two processes that each set their parent would both believe they had won.
The table sits beside Optuna's; Optuna's migrations leave tables they do not know alone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import sqlalchemy

TABLE_NAME = "convnets_study_parent"


def _table(metadata: sqlalchemy.MetaData) -> sqlalchemy.Table:
    import sqlalchemy as sa

    return sa.Table(
        TABLE_NAME,
        metadata,
        sa.Column("study_id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("study_name", sa.String(512), nullable=False),
        sa.Column("parent_run_id", sa.String(64), nullable=False),
    )


@contextlib.contextmanager
def _claims(storage_url: str) -> Iterator[tuple[sqlalchemy.Engine, sqlalchemy.Table]]:
    """An engine on the study's database and the claims table, created if missing."""
    import sqlalchemy as sa

    # SQLite waits for another writer's lock rather than failing at once, as the storage does.
    options = {"connect_args": {"timeout": 60}} if storage_url.startswith("sqlite") else {}
    engine = sa.create_engine(storage_url, **options)
    metadata = sa.MetaData()
    table = _table(metadata)
    try:
        try:
            metadata.create_all(engine, checkfirst=True)
        except sa.exc.DatabaseError:
            # Another process created it between our check and our CREATE (PostgreSQL
            # reports that as a duplicate type or table): it exists now, or this is real.
            if not sa.inspect(engine).has_table(TABLE_NAME):
                raise
        yield engine, table
    finally:
        engine.dispose()


def claimed(storage_url: str, study_id: int, study_name: str) -> str | None:
    """The parent run claimed for this study, or None. A row left by a deleted study whose
    id the database gave again to another one (SQLite reuses the last id) does not count."""
    import sqlalchemy as sa

    with _claims(storage_url) as (engine, table), engine.connect() as connection:
        row = connection.execute(
            sa.select(table.c.study_name, table.c.parent_run_id).where(table.c.study_id == study_id)
        ).first()
    return row.parent_run_id if row is not None and row.study_name == study_name else None


def claim(storage_url: str, study_id: int, study_name: str, run_id: str) -> str:
    """Make ``run_id`` the study's parent unless another process did first; returns the
    parent every process of the study uses (``run_id`` when this one won)."""
    import sqlalchemy as sa

    with _claims(storage_url) as (engine, table):
        try:
            with engine.begin() as connection:
                connection.execute(
                    sa.insert(table).values(
                        study_id=study_id, study_name=study_name, parent_run_id=run_id
                    )
                )
            return run_id
        except sa.exc.IntegrityError:
            pass  # another process's row is there
        with engine.begin() as connection:
            row = connection.execute(
                sa.select(table.c.study_name, table.c.parent_run_id).where(
                    table.c.study_id == study_id
                )
            ).one()
            if row.study_name == study_name:
                return row.parent_run_id
            # A deleted study's row: taken over only if still as read (compare-and-set).
            taken = connection.execute(
                sa.update(table)
                .where(table.c.study_id == study_id, table.c.study_name == row.study_name)
                .values(study_name=study_name, parent_run_id=run_id)
            )
        return run_id if taken.rowcount == 1 else claimed(storage_url, study_id, study_name)


def replace(storage_url: str, study_id: int, old_run_id: str, new_run_id: str) -> str:
    """The claimed parent ``old_run_id`` is gone from the tracking store (deleted): make
    ``new_run_id`` the parent, unless another process replaced it first; returns the parent."""
    import sqlalchemy as sa

    with _claims(storage_url) as (engine, table), engine.begin() as connection:
        taken = connection.execute(
            sa.update(table)
            .where(table.c.study_id == study_id, table.c.parent_run_id == old_run_id)
            .values(parent_run_id=new_run_id)
        )
        if taken.rowcount == 1:
            return new_run_id
        return connection.execute(
            sa.select(table.c.parent_run_id).where(table.c.study_id == study_id)
        ).scalar_one()
