"""A RUNNING run whose process is gone is told from one that still records."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

from convnets import folder_lock, liveness


def tags_of(record: dict, heartbeat: float) -> dict[str, str]:
    return {liveness.PROCESS_TAG: json.dumps(record), liveness.HEARTBEAT_TAG: str(heartbeat)}


def test_a_run_of_a_live_process_on_this_host_is_alive():
    assert liveness.dead_reason(liveness.process_tags()) is None


def test_a_run_whose_process_ended_on_this_host_is_dead_at_once():
    import psutil

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    record = {**folder_lock.this_process(), "pid": proc.pid}
    record["started"] = psutil.Process(proc.pid).create_time()
    proc.wait()
    reason = liveness.dead_reason(tags_of(record, time.time()))
    assert reason == (
        f"its process (process {proc.pid} on {record['host']}) ended without ending the run "
        "(killed with SIGKILL, or it crashed)"
    )


def test_a_run_on_another_host_is_dead_once_its_heartbeat_is_stale():
    record = {"host": "elsewhere", "pid": 1, "started": 0.0}
    now = time.time()
    assert liveness.dead_reason(tags_of(record, now - 10), now) is None
    late = now - liveness.STALE_AFTER_S - 1
    reason = liveness.dead_reason(tags_of(record, late), now)
    assert reason.startswith("no heartbeat from its process (process 1 on elsewhere) since ")
    assert liveness.dead_reason({}, now) is None  # recorded before heartbeats: cannot tell


def test_the_heartbeat_beats_until_the_block_ends_and_survives_a_failing_beat():
    beats = []
    failed = threading.Event()

    def beat():
        beats.append(time.monotonic())
        if len(beats) == 2 and not failed.is_set():
            failed.set()
            raise OSError("the store is busy")

    with liveness.Heartbeat(beat, interval_s=0.02):
        time.sleep(0.3)
    count = len(beats)
    time.sleep(0.1)
    assert count >= 5 and len(beats) == count  # went on after the failure, stopped at the end
