"""Whether a RUNNING run's process still lives, so a run killed with SIGKILL (or one whose
machine was lost) does not stay RUNNING forever.

Every recorded run carries the tag :data:`PROCESS_TAG` (host, pid, start time of the process
that records it) and :data:`HEARTBEAT_TAG`, the time of its last heartbeat, refreshed every
:data:`HEARTBEAT_S` by a thread while the run records. The next command that records a run in
the same experiment ends the runs whose process is gone KILLED with the reason: on this host
at once (the pid is not that process any more), on another host once its heartbeat is older
than :data:`STALE_AFTER_S`.

A sweep's parent run may be shared: every process that runs trials of one search joins the
study's one parent. Each of them records itself in a tag of its own (:func:`sharer_tags`,
``process.<host>.<pid>``, with its own last beat), so joining never overwrites another's
record; such a run is dead only when every process that shares it is (:func:`dead_reason`).
:class:`SharedRun` is one process's part in it.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from convnets import folder_lock

PROCESS_TAG = "process"
HEARTBEAT_TAG = "heartbeat"
SHARER_PREFIX = f"{PROCESS_TAG}."  # + "<host>.<pid>": one of the processes sharing a run
HEARTBEAT_S = 60
STALE_AFTER_S = 5 * HEARTBEAT_S  # five missed heartbeats: that process is gone


def process_tags() -> dict[str, str]:
    """The tags a run starts with: its process, and a first heartbeat."""
    return {
        PROCESS_TAG: json.dumps(folder_lock.this_process()),
        HEARTBEAT_TAG: str(int(time.time())),
    }


def sharer_key(record: Mapping) -> str:
    """The tag that records the process ``record`` (:func:`folder_lock.this_process`) among a
    shared run's processes: ``process.<host>.<pid>``, in the characters MLflow allows."""
    host = re.sub(r"[^\w.\-]", "_", str(record.get("host")))
    return f"{SHARER_PREFIX}{host}.{record.get('pid')}"


def sharer_tags(now: float | None = None) -> dict[str, str]:
    """This process's own tag on a shared run: its process and its last beat (now)."""
    record = folder_lock.this_process()
    beat = int(time.time() if now is None else now)
    return {sharer_key(record): json.dumps({**record, "beat": beat})}


def sharers(tags: Mapping[str, str]) -> dict[str, dict]:
    """The processes recorded as sharing the run (tag -> record with its ``beat``)."""
    found = {}
    for key, value in tags.items():
        if key.startswith(SHARER_PREFIX):
            try:
                record = json.loads(value)
            except (ValueError, TypeError):
                continue
            if isinstance(record, dict):
                found[key] = record
    return found


def dead_reason(tags: Mapping[str, str], now: float | None = None) -> str | None:
    """Why the RUNNING run with ``tags`` cannot be running any more, or None (alive, or a run
    recorded before heartbeats, which cannot be told). A run several processes share
    (:func:`sharers`) is alive while any of them is."""
    now = time.time() if now is None else now
    shared = sharers(tags)
    if shared:
        reasons = [_gone(record, record.get("beat"), now) for record in shared.values()]
        if any(reason is None for reason in reasons):
            return None
        if len(reasons) == 1:
            return reasons[0]
        return "every process that shared it is gone: " + "; ".join(reasons)
    try:
        record = json.loads(tags[PROCESS_TAG])
    except (KeyError, ValueError, TypeError):
        return None
    return _gone(record, tags.get(HEARTBEAT_TAG), now)


def _gone(record: dict, last_beat: object, now: float) -> str | None:
    """Why the process ``record`` cannot be recording any more (its last heartbeat at
    ``last_beat``), or None."""
    who = folder_lock.describe(record)
    alive = folder_lock.is_alive(record)
    if alive is False:
        return (
            f"its process ({who}) ended without ending the run (killed with SIGKILL, crashed, "
            "or the store was not answering when it ended)"
        )
    if alive is None:
        try:
            last = float(last_beat)
        except (TypeError, ValueError):
            return None
        if now - last > STALE_AFTER_S:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(last))
            return (
                f"no heartbeat from its process ({who}) since {when} (killed, or its machine lost)"
            )
    return None


class Heartbeat:
    """While the block runs, ``beat()`` every :data:`HEARTBEAT_S` seconds from a thread; a
    beat that fails (a busy or unreachable store) is skipped, the next one tries again."""

    def __init__(self, beat: Callable[[], None], interval_s: float = HEARTBEAT_S):
        self.beat, self.interval_s = beat, interval_s
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="run-heartbeat", daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(self.interval_s):
            try:
                self.beat()
            except Exception:  # noqa: BLE001, S112 - the next beat tries again
                continue

    def __enter__(self) -> Heartbeat:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


class SharedRun:
    """This process's part in a run that several processes may share (a search's parent):
    :meth:`join` records it (the ``process`` tag names the last to join; its own tag, beside
    the others', is what counts) and beats every :data:`HEARTBEAT_S` while it takes part;
    :meth:`leave` stops the beat and drops its tag, and says whether another process still
    shares the run. ``tracker``: a :class:`convnets.tracking.Tracker` on the run's store."""

    def __init__(self, tracker: Any, run_id: str, interval_s: float = HEARTBEAT_S):
        self.tracker, self.run_id = tracker, run_id
        self.key = sharer_key(folder_lock.this_process())
        self.heartbeat = Heartbeat(self.beat, interval_s)

    def join(self) -> SharedRun:
        tags = self.tracker.client.get_run(self.run_id).data.tags
        for key, record in sharers(tags).items():  # processes of this host gone: forgotten
            if key != self.key and folder_lock.is_alive(record) is False:
                self.tracker.client.delete_tag(self.run_id, key)
        self.tracker.set_tags_on(self.run_id, {**process_tags(), **sharer_tags()})
        self.heartbeat.__enter__()
        return self

    def beat(self) -> None:
        now = time.time()
        self.tracker.set_tags_on(self.run_id, {HEARTBEAT_TAG: str(int(now)), **sharer_tags(now)})

    def leave(self) -> bool:
        """Stop taking part; whether another live process still shares the run."""
        if self.heartbeat.thread.is_alive():
            self.heartbeat.__exit__()
        tags = self.tracker.client.get_run(self.run_id).data.tags
        if self.key in tags:
            self.tracker.client.delete_tag(self.run_id, self.key)
        others = {key: value for key, value in tags.items() if key != self.key}
        return bool(sharers(others)) and dead_reason(others) is None
