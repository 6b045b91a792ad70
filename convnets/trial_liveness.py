"""The RUNNING trials of a study that no live process runs, and when Optuna will retry them.

The sweeper records on every trial it asks its own process (user attribute
:data:`PROCESS_ATTR`: host, pid, start time) and a heartbeat every ``HEARTBEAT_S`` while the
trial is in flight. Optuna fails a trial whose heartbeat is older than ``stale_after_s``
(``fail_stale_trials``, at the start of every search) and the retry callback asks its
parameters again. Until then the trial is RUNNING: it keeps its place in ``n_trials`` (it is
retried in that place), but it is not done, and no process may be running it. A rerun tells
such trials from live ones (:func:`stalled`) and says in one line each when the retry comes
(:meth:`Stalled.line`): those whose process was on this host and is gone, and those whose
process, elsewhere, has missed two heartbeats.
"""

from __future__ import annotations

import datetime
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from convnets import folder_lock
from convnets.search_settings import HEARTBEAT_S

if TYPE_CHECKING:
    import optuna

PROCESS_ATTR = "process"  # trial user attribute: the process of the search that asked it
MISSED_BEATS_S = 2 * HEARTBEAT_S  # a live process is never this long without a heartbeat
HEARTBEATS_TABLE = "trial_heartbeats"  # Optuna's (see heartbeat_ages)


@dataclass(frozen=True)
class Stalled:
    """A RUNNING trial no live process runs: ``age_s`` since its last heartbeat (None: it
    has none), retried by Optuna in ``retry_in_s``."""

    number: int
    trial_id: int
    process: Mapping[str, Any] | None  # the search that asked it, as it recorded itself
    here: bool  # that process was on this host and is gone; else it missed heartbeats
    age_s: float | None
    retry_in_s: float

    def line(self, stale_after_s: int) -> str:
        who = folder_lock.describe(self.process) if self.process else "its process"
        when = (
            f"once hydra.sweeper.stale_after_s={stale_after_s} has passed "
            f"(in {math.ceil(self.retry_in_s)} s): rerun then"
        )
        if not self.here:
            return (
                f"warning: trial {self.number} is RUNNING but {who} has sent no heartbeat for "
                f"{int(self.age_s)} s; it is retried if none comes {when}"
            )
        where = (
            f"warning: trial {self.number} is RUNNING without a live process here ({who} ended)"
            if self.process
            else f"warning: trial {self.number} is RUNNING, and no process says it runs it "
            "(its search stopped while asking it)"
        )
        if self.age_s is None:
            return f"{where}; it had no heartbeat, one is recorded now: it is retried {when}"
        return f"{where}; its last heartbeat was {int(self.age_s)} s ago, it is retried {when}"


def stalled(
    running: Sequence[optuna.trial.FrozenTrial],
    trial_ids: Mapping[int, int],
    ages: Mapping[int, float],
    stale_after_s: int,
) -> list[Stalled]:
    """Of the ``running`` trials (``trial_ids``: number -> storage id; ``ages``: id -> seconds
    since its last heartbeat, missing when it has none), those no live process runs: its
    process was on this host and is gone, or it has missed two heartbeats, or it has neither
    a process nor a heartbeat two heartbeats after it was asked (its search stopped while
    asking it, before saying who runs it)."""
    found = []
    for trial in running:
        trial_id = trial_ids[trial.number]
        record = trial.user_attrs.get(PROCESS_ATTR)
        record = record if isinstance(record, dict) else None
        alive = folder_lock.is_alive(record) if record else None
        age = ages.get(trial_id)
        if alive is None and age is None and _asked_s_ago(trial) > MISSED_BEATS_S:
            alive = False  # nobody said they run it, and nobody has beaten for it
        if alive is False or (alive is None and age is not None and age > MISSED_BEATS_S):
            left = stale_after_s - (age or 0.0)
            found.append(
                Stalled(trial.number, trial_id, record, alive is False, age, max(left, 0.0))
            )
    return found


def _asked_s_ago(trial: optuna.trial.FrozenTrial) -> float:
    """Seconds since the trial was asked, by this machine's clock (Optuna stamps
    ``datetime_start`` with the asking machine's local time)."""
    if trial.datetime_start is None:
        return math.inf
    return (datetime.datetime.now() - trial.datetime_start).total_seconds()


def heartbeat_ages(storage_url: str, trial_ids: Sequence[int]) -> dict[int, float]:
    """Seconds since each trial's last heartbeat, by the database's clock, as Optuna's
    ``fail_stale_trials`` measures them; a trial without one is missing.

    Read from Optuna's own table: no public API says when a trial last beat
    (``BaseHeartbeat`` only records one, and lists the trials already stale). A test
    (``test_canary_the_heartbeat_table_says_when_optuna_retries``) fails if Optuna changes
    that table or its clock."""
    import sqlalchemy as sa

    if not trial_ids:
        return {}
    table = sa.table(
        HEARTBEATS_TABLE, sa.column("trial_id", sa.Integer), sa.column("heartbeat", sa.DateTime)
    )
    # SQLite waits for another writer's lock rather than failing at once, as the storage does.
    options = {"connect_args": {"timeout": 60}} if storage_url.startswith("sqlite") else {}
    engine = sa.create_engine(storage_url, **options)
    try:
        with engine.connect() as connection:
            rows = connection.execute(
                sa.select(table.c.trial_id, table.c.heartbeat, sa.func.now()).where(
                    table.c.trial_id.in_(list(trial_ids))
                )
            ).all()
    finally:
        engine.dispose()
    # As Optuna compares them: a PostgreSQL now() carries a time zone the column does not.
    return {
        trial_id: (now.replace(tzinfo=None) - beat.replace(tzinfo=None)).total_seconds()
        for trial_id, beat, now in rows
    }


def find_stalled(
    study: optuna.Study, storage: Any, storage_url: str, stale_after_s: int
) -> list[Stalled]:
    """The RUNNING trials of ``study`` (in ``storage``, at ``storage_url``) that no live
    process runs (:func:`stalled`)."""
    from optuna.trial import TrialState

    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    if not running:
        return []
    study_id = storage.get_study_id_from_name(study.study_name)
    ids = {
        t.number: storage.get_trial_id_from_study_id_trial_number(study_id, t.number)
        for t in running
    }
    ages = heartbeat_ages(storage_url, list(ids.values()))
    return stalled(running, ids, ages, stale_after_s)


def report(
    study: optuna.Study, storage: Any, storage_url: str, stale_after_s: int
) -> list[Stalled]:
    """Say in one line each which trials of the study no live process runs and when they are
    retried; one whose process died before its first heartbeat gets one now, so Optuna
    retries it too (it never fails a trial that has none)."""
    found = find_stalled(study, storage, storage_url, stale_after_s)
    for trial in found:
        if trial.age_s is None:
            storage.record_heartbeat(trial.trial_id)
        print(trial.line(stale_after_s), file=sys.stderr, flush=True)
    return found
