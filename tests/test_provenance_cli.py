"""Provenance of the code: a run trained from a dirty tree records its changes against the
commit (``code/git_diff.patch``, its sha256, untracked package files), and a reproduce from a
tree with other changes says so and how to apply the recorded patch."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CLI_ENV, REPO, sqlite_store
from mlflow.tracking import MlflowClient


def in_clone(clone, *args):
    return subprocess.run(
        [sys.executable, "train.py", *args],
        cwd=clone,
        env={**CLI_ENV, "PYTHONPATH": str(clone)},
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_a_dirty_tree_records_its_diff_and_reproduce_warns_on_another(tmp_path):
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    config = clone / "convnets" / "config.py"
    config.write_text(config.read_text() + "\n# a local experiment\n")
    (clone / "convnets" / "scratch.py").write_text("# not committed\n")
    uri = sqlite_store(tmp_path)
    first = in_clone(clone, "model.layers=[{filters:4,pool:max}]", "trainer.epochs=1",
                     "trainer.verbose=0", "tracking.log_model=false", f"tracking.uri={uri}")  # fmt: skip
    assert first.returncode == 0, first.stderr[-3000:]
    run_id = re.findall(r"run=([0-9a-f]{32})", first.stdout)[-1]
    client = MlflowClient(uri)
    tags = client.get_run(run_id).data.tags
    assert tags["git_dirty"] == "true" and len(tags["git_diff_sha256"]) == 64
    assert tags["git_untracked"] == "convnets/scratch.py"
    patch = client.download_artifacts(run_id, "code/git_diff.patch", str(tmp_path))
    assert "+# a local experiment" in Path(patch).read_text()

    config.write_text(config.read_text() + "# another change\n")
    again = in_clone(clone, f"reproduce={run_id}", f"tracking.uri={uri}")
    assert again.returncode == 0, again.stderr[-3000:]
    [line] = [x for x in again.stderr.splitlines() if "working tree's changes differ" in x]
    assert line.startswith(f"warning: reproduce={run_id}: this working tree's changes differ")
    assert "git apply code/git_diff.patch" in line
