"""A checkpoint folder is trusted only as far as its commit record vouches for it: bare weights
names of the expected pattern, each file's sha256 as recorded. Checked before TensorFlow loads,
through the real CLI for a stopped run, and directly on hand-made folders."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
from conftest import imported, signal_after_epochs, sqlite_store, start_training, train_cli
from mlflow.tracking import MlflowClient

import convnets
from convnets import checkpoints
from convnets.errors import CheckpointError, ConvnetsError

TINY = "model.layers=[{filters:8},{filters:8,pool:max}]"


def folder_with(tmp_path: Path, **state) -> Path:
    for name in ("epoch-0002.weights.h5", "best-0001.weights.h5"):
        (tmp_path / name).write_bytes(name.encode())
    digests = {n: checkpoints.sha256(tmp_path / n) for n in ("epoch-0002.weights.h5",)}
    record = {"epoch": 2, "last": "epoch-0002.weights.h5", "best": "best-0001.weights.h5"}
    (tmp_path / "state.json").write_text(json.dumps({**record, "sha256": digests, **state}))
    return tmp_path


def test_a_consistent_folder_passes(tmp_path):
    folder = folder_with(tmp_path)  # best-0001 has no digest: an older record, checked by name
    checkpoints.verify(folder, checkpoints.read_state(folder))


@pytest.mark.parametrize(
    "state, message",
    [
        ({"last": "/etc/passwd"}, "is not a weights file of this folder"),
        ({"last": "../epoch-0002.weights.h5"}, "is not a weights file of this folder"),
        ({"best": "best-0009.weights.h5"}, "missing"),
        ({"sha256": {"epoch-0002.weights.h5": "0" * 64}}, "sha256 differs"),
    ],
)
def test_an_untrusted_folder_is_refused(tmp_path, state, message):
    folder = folder_with(tmp_path, **state)
    with pytest.raises(CheckpointError, match=message):
        checkpoints.verify(folder, checkpoints.read_state(folder))


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"epoch": 2, "la', "not a readable commit record"),  # cut short
        ("[2]", r"its epoch is None"),
        ('{"epoch": "x"}', r"its epoch is 'x'"),
        ('{"epoch": 0}', r"its epoch is 0"),
        ('{"epoch": true}', r"its epoch is True"),
    ],
)
def test_a_damaged_commit_record_is_refused_naming_it(tmp_path, text, message):
    (tmp_path / "state.json").write_text(text)
    with pytest.raises(CheckpointError, match=message) as refused:
        checkpoints.read_state(tmp_path)
    assert str(refused.value).startswith(str(tmp_path / "state.json"))


@pytest.mark.slow
def test_resume_refuses_a_swapped_or_escaping_checkpoint_before_tensorflow(tmp_path):
    uri = sqlite_store(tmp_path)
    client = MlflowClient(uri)  # the schema exists before the training opens the store
    proc = start_training(
        TINY,
        "trainer.epochs=1000",  # never ends on its own: the test stops it, then only refuses
        "trainer.verbose=0",
        f"tracking.uri={uri}",
        f"hydra.run.dir={tmp_path / 'out'}",
    )
    run_id, _ = signal_after_epochs(proc, tmp_path / "out", 2, signal.SIGTERM)
    folder = Path(client.get_run(run_id).data.tags["checkpoint_dir"])
    state = checkpoints.read_state(folder)
    weights = folder / state["last"]
    weights.write_bytes(weights.read_bytes() + b"\0")  # another run's file would differ too
    refused = train_cli(f"resume={run_id}", f"tracking.uri={uri}", importtime=True)
    assert refused.returncode == 1
    lines = [x for x in refused.stderr.splitlines() if x.startswith("error: ")]
    assert lines == [
        f"error: {weights}: its sha256 differs from the one state.json recorded (the file was "
        "replaced or changed after the epoch was committed); refusing to load it"
    ]
    assert "Traceback" not in refused.stderr and "tensorflow" not in imported(refused)
    # The CLI's one line and exit status are checked above; the other refusals are the
    # library's, raised in this process.
    resume = [f"resume={run_id}", f"tracking.uri={uri}"]
    (folder / "state.json").write_text(json.dumps({**state, "last": str(Path("/etc/passwd"))}))
    with pytest.raises(CheckpointError, match="is not a weights file of this folder"):
        convnets.train(resume)
    (folder / "state.json").write_text(json.dumps({**state, "epoch": 1001}))
    with pytest.raises(ConvnetsError, match="says epoch 1001 of a run of trainer.epochs=1000"):
        convnets.train(resume)
    (folder / "state.json").unlink()  # the weights stay: the record of which epoch is lost
    with pytest.raises(ConvnetsError, match="has no state.json but it holds") as lost:
        convnets.train(resume)
    assert state["last"] in str(lost.value)
    empty = tmp_path / "empty"  # a copy without the record: the run's recorded epochs say so
    empty.mkdir()
    with pytest.raises(ConvnetsError, match="has no state.json but the run recorded epochs"):
        convnets.train([*resume, f"checkpoint_dir={empty}"])
    run = client.get_run(run_id)
    assert run.info.status == "KILLED"  # the store is left as it was
