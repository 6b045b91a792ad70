"""A folder held by one live process: a lock file naming its host, pid and start time.

A checkpoint folder is held while a training writes into it (``resume=`` refuses it); a
sweep's folder while its sweep runs (a second sweep given the same ``hydra.sweep.dir`` is
refused, instead of overwriting the first one's ``mlflow_sweep.json`` under its jobs). A lock
whose process is gone is stale and taken over.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path


class FolderHeld(Exception):
    """``folder`` is held by ``holder`` ("process 123 on host"); ``lock`` is its lock file."""

    def __init__(self, folder: Path, holder: str, lock: Path):
        self.folder, self.holder, self.lock = folder, holder, lock
        super().__init__(f"{folder}: held by {holder}")


def claim(folder: str | Path, name: str) -> Path:
    """Hold ``folder`` for this process (lock file ``name`` in it); the lock's path. Raises
    :class:`FolderHeld` when a live process holds it."""

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / name
    record = this_process()
    for _ in range(2):  # a stale lock (its process is gone) is replaced once
        try:  # O_EXCL: of two processes starting at once, one gets the folder
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            holder = live_holder(folder, name)
            if holder is not None:
                raise FolderHeld(folder, holder, lock) from None
            lock.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(record))
        return lock
    raise FolderHeld(folder, "another process starting at the same moment", lock)


@contextlib.contextmanager
def held(folder: str | Path, name: str) -> Iterator[Path]:
    """Hold ``folder`` while the block runs (:func:`claim`)."""
    lock = claim(folder, name)
    try:
        yield lock
    finally:
        lock.unlink(missing_ok=True)


def live_holder(folder: str | Path, name: str) -> str | None:
    """Who holds ``folder`` now ("process 123 on host"), or None.

    On this host a lock is live while its process runs (:func:`is_alive`); a lock from another
    host cannot be checked from here and counts as live (a machine that died leaves it: the
    refusals say to delete it)."""
    try:
        record = json.loads((Path(folder) / name).read_text())
    except (FileNotFoundError, ValueError):
        return None
    return describe(record) if is_alive(record) is not False else None


def this_process() -> dict:
    """This process as a lock records it: host, pid and start time."""
    import psutil

    me = psutil.Process()
    return {"host": socket.gethostname(), "pid": me.pid, "started": me.create_time()}


def describe(record: dict) -> str:
    return f"process {record.get('pid')} on {record.get('host')}"


def is_alive(record: dict) -> bool | None:
    """Whether the process ``record`` names (:func:`this_process`) runs: on this host, the pid
    with the same start time (a reused pid is not it); None for another host's."""
    import psutil

    if record.get("host") != socket.gethostname():
        return None
    try:
        return abs(psutil.Process(record["pid"]).create_time() - record["started"]) < 1.0
    except (psutil.Error, KeyError, TypeError):
        return False
