"""A RUNNING run whose process is gone is told from one that still records."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time

from conftest import ended_process

from convnets import folder_lock, liveness


def tags_of(record: dict, heartbeat: float) -> dict[str, str]:
    return {liveness.PROCESS_TAG: json.dumps(record), liveness.HEARTBEAT_TAG: str(heartbeat)}


def test_a_run_of_a_live_process_on_this_host_is_alive():
    assert liveness.dead_reason(liveness.process_tags()) is None


def test_a_run_whose_process_ended_on_this_host_is_dead_at_once():
    record = ended_process()
    reason = liveness.dead_reason(tags_of(record, time.time()))
    assert reason == (
        f"its process (process {record['pid']} on {record['host']}) ended without ending the run "
        "(killed with SIGKILL, crashed, or the store was not answering when it ended)"
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


# ---------------------------------------------------------------- a run several processes share


def shared_tags(*records: tuple[dict, float]) -> dict[str, str]:
    """The tags of a run shared by ``records`` (each a process and its last beat)."""
    return {
        liveness.sharer_key(record): json.dumps({**record, "beat": beat})
        for record, beat in records
    }


def test_a_shared_run_lives_while_any_of_its_processes_does():
    now = time.time()
    me, gone = folder_lock.this_process(), ended_process()
    elsewhere = {"host": "elsewhere", "pid": 7, "started": 0.0}
    late = now - liveness.STALE_AFTER_S - 1
    # This process still runs the study: the run is alive, whoever else died.
    assert liveness.dead_reason(shared_tags((me, now), (gone, now)), now) is None
    # Another machine's process beat a minute ago: alive.
    assert liveness.dead_reason(shared_tags((gone, now), (elsewhere, now - 60)), now) is None
    # The `process` tag names the last to join; it does not decide for a shared run.
    tags = {**shared_tags((me, now)), **liveness.process_tags()}
    tags[liveness.PROCESS_TAG] = json.dumps(gone)
    assert liveness.dead_reason(tags, now) is None

    # One process, gone: the reason a training run gets.
    only = liveness.dead_reason(shared_tags((gone, now)), now)
    assert only == liveness.dead_reason(tags_of(gone, now), now)
    both = liveness.dead_reason(shared_tags((gone, now), (elsewhere, late)), now)
    assert both.startswith("every process that shared it is gone: its process (process ")
    assert "no heartbeat from its process (process 7 on elsewhere) since " in both


def test_a_sharer_tag_is_a_valid_mlflow_key_for_any_host():
    key = liveness.sharer_key({"host": "node 3/gpu:a100@lab", "pid": 12})
    assert key == f"{liveness.SHARER_PREFIX}node_3_gpu_a100_lab.12"
    assert re.fullmatch(r"[\w.\-]+", key)  # within what MLflow allows in a tag's key


def test_a_process_joins_beats_on_and_leaves_a_shared_run(tmp_path):
    from conftest import sqlite_store

    from convnets.tracking import Tracker

    tracker = Tracker(sqlite_store(tmp_path))
    run_id = tracker.create_run(tracker.experiment_id("s"), run_name="parent")
    gone = ended_process()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        import psutil

        alive = {**folder_lock.this_process(), "pid": other.pid}
        alive["started"] = psutil.Process(other.pid).create_time()
        tracker.set_tags_on(run_id, shared_tags((gone, 0), (alive, time.time())))

        shared = liveness.SharedRun(tracker, run_id, interval_s=0.05).join()
        time.sleep(0.3)
        tags = tracker.client.get_run(run_id).data.tags
        assert json.loads(tags[liveness.PROCESS_TAG])["pid"] == folder_lock.this_process()["pid"]
        assert liveness.sharer_key(gone) not in tags  # this host's dead process, forgotten
        assert set(liveness.sharers(tags)) == {shared.key, liveness.sharer_key(alive)}
        assert shared.heartbeat.thread.is_alive()
        assert shared.leave() is True  # the other process still shares it
        tags = tracker.client.get_run(run_id).data.tags
        assert shared.key not in tags and not shared.heartbeat.thread.is_alive()
    finally:
        other.kill()
        other.wait()
    assert liveness.SharedRun(tracker, run_id).join().leave() is False  # the other is gone


def test_the_next_command_ends_a_dead_sweeps_parent_and_says_how_to_continue(tmp_path, capsys):
    from conftest import sqlite_store

    from convnets.recording import end_dead_runs
    from convnets.tracking import Tracker

    uri = sqlite_store(tmp_path)
    tracker = Tracker(uri)
    experiment = tracker.experiment_id("s")
    parent = {"sweep_role": "parent", "sweeper": "ConvnetsOptunaSweeper"}
    dead = tracker.create_run(experiment, run_name="dead", tags=parent)
    live = tracker.create_run(experiment, run_name="live", tags=parent)
    trial = tracker.create_run(experiment, run_name="t01", parent_run_id=live)
    gone, me = ended_process(), folder_lock.this_process()
    tracker.set_tags_on(dead, shared_tags((gone, time.time())))
    tracker.set_tags_on(live, shared_tags((gone, time.time()), (me, time.time())))
    tracker.set_tags_on(trial, {**tags_of(gone, time.time()), "checkpoint_dir": "/x"})

    end_dead_runs(tracker, experiment, uri)

    ended = tracker.client.get_run(dead)
    assert ended.info.status == "KILLED"
    assert ended.data.tags["failure_reason"] == (
        f"its process ({folder_lock.describe(gone)}) ended without ending the run "
        "(killed with SIGKILL, crashed, or the store was not answering when it ended)"
    )
    assert tracker.client.get_run(live).info.status == "RUNNING"  # this process shares it
    assert tracker.client.get_run(trial).info.status == "KILLED"
    lines = capsys.readouterr().err.splitlines()
    [line] = [x for x in lines if dead in x]
    assert line.startswith(f"warning: sweep parent run {dead} was left RUNNING: its process ")
    assert line.endswith(
        "recorded KILLED; rerun the search's command to continue its study under this parent run"
    )
    [line] = [x for x in lines if trial in x]  # its search retries it: not resume=
    assert line.endswith(
        "recorded KILLED; its search asks the trial again once it is stale "
        "(hydra.sweeper.stale_after_s): rerun the search's command then"
    )
