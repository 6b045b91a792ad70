"""Whether a RUNNING run's process still lives, so a run killed with SIGKILL (or one whose
machine was lost) does not stay RUNNING forever.

Every recorded run carries the tag :data:`PROCESS_TAG` (host, pid, start time of the process
that records it) and :data:`HEARTBEAT_TAG`, the time of its last heartbeat, refreshed every
:data:`HEARTBEAT_S` by a thread while the run records. The next command that records a run in
the same experiment ends the runs whose process is gone KILLED with the reason: on this host
at once (the pid is not that process any more), on another host once its heartbeat is older
than :data:`STALE_AFTER_S`.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Mapping

from convnets import folder_lock

PROCESS_TAG = "process"
HEARTBEAT_TAG = "heartbeat"
HEARTBEAT_S = 60
STALE_AFTER_S = 5 * HEARTBEAT_S  # five missed heartbeats: that process is gone


def process_tags() -> dict[str, str]:
    """The tags a run starts with: its process, and a first heartbeat."""
    return {
        PROCESS_TAG: json.dumps(folder_lock.this_process()),
        HEARTBEAT_TAG: str(int(time.time())),
    }


def dead_reason(tags: Mapping[str, str], now: float | None = None) -> str | None:
    """Why the RUNNING run with ``tags`` cannot be running any more, or None (alive, or a run
    recorded before heartbeats, which cannot be told)."""
    try:
        record = json.loads(tags[PROCESS_TAG])
    except (KeyError, ValueError, TypeError):
        return None
    who = folder_lock.describe(record)
    alive = folder_lock.is_alive(record)
    if alive is False:
        return (
            f"its process ({who}) ended without ending the run (killed with SIGKILL, or it crashed)"
        )
    if alive is None:
        try:
            last = float(tags[HEARTBEAT_TAG])
        except (KeyError, ValueError):
            return None
        now = time.time() if now is None else now
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
