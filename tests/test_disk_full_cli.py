"""A disk that fills up while a run trains: one line, the partial file gone, the run FAILED
with the reason, and the printed command continues it once there is space again.

The disk is a real small filesystem (a tmpfs mounted for the test, which needs root, as CI
has); it is filled by another file once the first epoch is committed, as a neighbour's job
or a growing log fills a shared disk."""

from __future__ import annotations

import contextlib
import shlex
import subprocess

import pytest
from conftest import command, sqlite_store, start_training, wait_for_epochs


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], capture_output=True
    )
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small filesystem here: {made.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(folder) -> None:
    with open(folder / "filler", "wb") as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * (1 << 16))
            f.flush()


@pytest.mark.slow
def test_a_full_disk_fails_the_run_in_one_line_and_its_resume_command_continues_it(
    tmp_path, small_disk
):
    from mlflow.tracking import MlflowClient

    uri = sqlite_store(tmp_path / "store")  # the store is on another disk, with space
    client = MlflowClient(uri)
    proc = start_training(
        "trainer.epochs=6", f"tracking.uri={uri}", f"hydra.run.dir={small_disk / 'run'}"
    )
    try:
        run_id = wait_for_epochs(proc, small_disk / "run", 1)
        fill(small_disk)
        _, stderr = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()

    assert proc.returncode == 1, stderr[-2000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    checkpoint_dir = small_disk / "run" / "checkpoints" / run_id
    assert last.startswith(f"error: {checkpoint_dir}/"), last
    assert ": no space left on device; " in last and f"run {run_id} recorded FAILED" in last
    assert not list(checkpoint_dir.glob(".*tmp*")), "the partial file is left behind"
    run = client.get_run(run_id)
    assert run.info.status == "FAILED"
    assert "no space left on device" in run.data.tags["failure_reason"]

    resume = last.split("continue with: ", 1)[1]
    argv = shlex.split(resume)
    assert argv[:2] == ["python", "train.py"], resume
    (small_disk / "filler").unlink()  # space again
    done = command("train.py", *argv[2:])
    assert done.returncode == 0, done.stderr[-3000:]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1, 2, 3, 4, 5, 6]
