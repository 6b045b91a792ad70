"""No run silently wrong, nothing half-written, reproducible on another machine. Each
test records into a fresh SQLite store in tmp. What the command line itself promises (one-line
refusals before TensorFlow and the store, kills, Ctrl-C and its hint, credentials kept off disk
by Hydra) runs ``python train.py``; training whose point is the record runs in this process
(``convnets.train``)."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # the runs trained in this process

import json  # noqa: E402
import re  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import mlflow  # noqa: E402
import pytest  # noqa: E402
from conftest import (  # noqa: E402
    CLI_ENV,
    REPO,
    free_port,
    imported,
    sqlite_store,
    start_training,
    train_cli,
    wait_for_epochs,
)
from mlflow.tracking import MlflowClient  # noqa: E402

import convnets  # noqa: E402
from convnets.errors import ConfigError, ConvnetsError  # noqa: E402

TINY = "model.layers=[{filters:4},{filters:4,pool:max}]"
QUIET = ("trainer.verbose=0", "tracking.log_model=false")


def error_line(result: subprocess.CompletedProcess) -> str:
    """The one ``error:`` line of a refused command (and no traceback)."""
    assert result.returncode != 0, result.stdout[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    [line] = [x for x in result.stderr.splitlines() if x.startswith("error: ")]
    return line


def kill_after(args, run_dir: Path, epochs: int, known=frozenset()) -> str:
    proc = start_training(*args, f"hydra.run.dir={run_dir}")
    try:
        run_id = wait_for_epochs(proc, run_dir, epochs, known)
        proc.kill()  # SIGKILL: the run stays RUNNING, its checkpoint at the last epoch
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "training ended before it could be killed"
    return run_id


def write_images(folder: Path, sizes: dict[str, list[tuple[int, int]]], seed: int = 0) -> None:
    """``<folder>/{train,test}/<label>/<n>.png``: random grayscale images of the given sizes."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split in ("train", "test"):
        for label, label_sizes in sizes.items():
            (folder / split / label).mkdir(parents=True, exist_ok=True)
            for n, (w, h) in enumerate(label_sizes):
                pixels = rng.integers(0, 256, (h, w), dtype=np.uint8)
                Image.fromarray(pixels, "L").save(folder / split / label / f"{n}.png")


# ---------------------------------------------------------------- 1. checkpoints


@pytest.mark.slow
def test_two_runs_in_one_folder_each_resume_from_their_own_checkpoint(tmp_path):
    epochs, uri = 20, sqlite_store(tmp_path)
    client = MlflowClient(uri)
    args = [TINY, f"trainer.epochs={epochs}", *QUIET, f"tracking.uri={uri}"]
    shared_dir = tmp_path / "run"
    shared = f"hydra.run.dir={shared_dir}"  # or two runs started in the same second
    first = kill_after(args, shared_dir, 2)
    second = kill_after(args, shared_dir, 2, known={first})
    # The second found the first's process gone: it ended that run KILLED, saying why.
    killed = client.get_run(first)
    assert killed.info.status == "KILLED"
    assert killed.data.tags["failure_reason"].startswith("its process (process ")
    assert killed.data.tags["failure_reason"].endswith(
        "ended without ending the run (killed with SIGKILL, crashed, or the store was not answering when it ended)"
    )

    dirs = {r: Path(client.get_run(r).data.tags["checkpoint_dir"]) for r in (first, second)}
    assert dirs[first] != dirs[second]
    for run_id, folder in dirs.items():
        assert folder == tmp_path / "run" / "checkpoints" / run_id
        assert json.loads((folder / "state.json").read_text())["run_id"] == run_id

    # A foreign checkpoint (state.json naming another run) is refused; the run is untouched.
    state_file = dirs[first] / "state.json"
    original = state_file.read_text()
    state_file.write_text(json.dumps({**json.loads(original), "run_id": second}))
    refused = train_cli(f"resume={first}", f"tracking.uri={uri}", shared)
    assert error_line(refused).startswith(
        f"error: resume={first}: the checkpoint in {dirs[first]} belongs to run {second}"
    )
    assert client.get_run(first).info.status == "KILLED"  # untouched by the refusal
    state_file.write_text(original)

    for run_id in (first, second):  # the kills needed processes; the resumes run here
        resumed = convnets.train([f"resume={run_id}", f"tracking.uri={uri}"], output_dir=shared_dir)
        assert resumed.run_id == run_id
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        assert run.data.metrics["epochs_completed"] == epochs
        for key in ("loss", "val_accuracy", "lr"):
            steps = sorted(m.step for m in client.get_metric_history(run_id, key))
            assert steps == list(range(1, epochs + 1)), (run_id, key)  # each epoch once
        history = json.loads((dirs[run_id] / "state.json").read_text())["history"]
        assert [h["epoch"] for h in history] == list(range(1, epochs + 1))


@pytest.mark.slow
def test_a_run_without_epoch_checkpoints_is_not_resumable(tmp_path):
    uri = sqlite_store(tmp_path)
    run_id = convnets.train(
        [TINY, "trainer.epochs=1", "trainer.checkpoint_every_epoch=false", *QUIET,
         f"tracking.uri={uri}"],
        output_dir=tmp_path / "out",
    ).run_id  # fmt: skip
    client = MlflowClient(uri)
    client.set_terminated(run_id, "KILLED")  # as if it had been interrupted
    refused = train_cli(f"resume={run_id}", f"tracking.uri={uri}", importtime=True)
    line = error_line(refused)
    assert "tensorflow" not in imported(refused)  # refused before TensorFlow loads
    assert "trainer.checkpoint_every_epoch=false" in line
    assert f"python train.py reproduce={run_id}" in line
    assert client.get_run(run_id).info.status == "KILLED"
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1]


# ---------------------------------------------------------------- 2. config mistakes


CONFIG_MISTAKES = [
    ("optimizer.name=rmsprop", "optimizer.name"),
    ("optimizer.schedule=linear", "optimizer.schedule"),
    ("optimizer.lr=0", "optimizer.lr"),
    ("optimizer.lr=-0.01", "optimizer.lr"),
    ("trainer.epochs=0", "trainer.epochs"),
    ("trainer.epochs=-1", "trainer.epochs"),
    ("+trainer.epoch=3", "trainer.epoch"),
    ("+trainer.foo=1", "trainer.foo"),
    ("trainer.batch_size=0", "trainer.batch_size"),
    ("optimizer.warmup_epochs=-1", "optimizer.warmup_epochs"),
    ("dataset.val_fraction=1.0", "dataset.val_fraction"),
    ("distribute.cpu_replicas=-2", "distribute.cpu_replicas"),
]


def test_a_config_mistake_is_refused_before_tensorflow_and_the_store(tmp_path):
    """Through the command line: exit 2, one line naming the key, before TensorFlow, Keras or
    MLflow is imported and before the store exists. Every config mistake takes that path (the
    pure config check runs first); which key each names is checked in the next test."""
    store = tmp_path / "store"
    store.mkdir()
    result = train_cli(
        "optimizer.lr=0", f"tracking.uri=sqlite:///{store / 'mlflow.db'}",
        f"hydra.run.dir={tmp_path / 'out'}", importtime=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert error_line(result).startswith("error: optimizer.lr")
    assert not imported(result) & {"tensorflow", "keras", "mlflow"}
    assert list(store.iterdir()) == []  # no mlflow.db, no run


@pytest.mark.parametrize(("override", "key"), CONFIG_MISTAKES)
def test_a_config_mistake_names_its_key_and_records_nothing(tmp_path, override, key):
    store = tmp_path / "store"
    store.mkdir()
    with pytest.raises(ConfigError) as refused:
        convnets.train(
            [override, f"tracking.uri=sqlite:///{store / 'mlflow.db'}"],
            output_dir=tmp_path / "out",
        )
    assert str(refused.value).startswith(key) and "\n" not in str(refused.value)
    assert list(store.iterdir()) == []  # no mlflow.db, no run


# ---------------------------------------------------------------- 3. data


@pytest.mark.parametrize("case", ["one_class", "mixed_sizes", "val_fraction", "test_fraction"])
def test_data_that_cannot_train_a_classifier_is_refused(tmp_path, case):
    """An image folder's check and the split's are refused before the store and TensorFlow:
    one case of each through the command line, the others in this process."""
    images = tmp_path / "images"
    if case == "one_class":
        write_images(images, {"cat": [(8, 8)] * 4})
        args, expected = [f"dataset.path={images}"], "has 1 class (cat)"
    elif case == "mixed_sizes":
        write_images(images, {"cat": [(8, 8)] * 3, "dog": [(8, 8), (12, 8), (8, 8)]})
        args = [f"dataset.path={images}"]
        expected = f"image {images / 'train' / 'dog' / '1.png'} is 12x8"
    elif case == "val_fraction":
        args, expected = ["dataset.val_fraction=0.999"], "have no training example"
    else:  # the key that left too few, not the split that found them too few, is named
        args = ["dataset.test_fraction=0.999"]
        expected = "dataset.test_fraction=0.999 leaves 1 training examples for 10 classes"
    dataset = ["dataset=image_folder"] if case in ("one_class", "mixed_sizes") else []
    store = tmp_path / "store"
    store.mkdir()
    overrides = [*dataset, *args, TINY, *QUIET, f"tracking.uri=sqlite:///{store / 'mlflow.db'}"]
    if case in ("one_class", "test_fraction"):
        result = train_cli(*overrides, f"hydra.run.dir={tmp_path / 'out'}", importtime=True)
        assert expected in error_line(result)
        assert "tensorflow" not in imported(result)  # refused before TensorFlow loaded
    else:
        with pytest.raises(ConvnetsError, match=re.escape(expected)):
            convnets.train(overrides, output_dir=tmp_path / "out")
    assert list(store.iterdir()) == []  # refused before the store was opened


# ---------------------------------------------------------------- 4. reproduce elsewhere


@pytest.mark.slow
def test_reproduce_on_another_machine_takes_runtime_overrides(tmp_path, capsys):
    uri = sqlite_store(tmp_path)
    client = MlflowClient(uri)
    original = convnets.train(
        [TINY, "trainer.epochs=1", *QUIET, f"tracking.uri={uri}"], output_dir=tmp_path / "a"
    ).run_id
    elsewhere = tmp_path / "tfds-elsewhere"
    # No trainer.verbose=0: a reproduce takes the recorded config (verbose=0 already), and the
    # runtime overrides given are what the tag below lists.
    reproduced = convnets.train(
        [f"reproduce={original}", f"dataset.data_dir={elsewhere}", "distribute=one_device",
         f"tracking.uri={uri}"],
        output_dir=tmp_path / "b",
    )  # fmt: skip
    new = reproduced.run_id
    run, source = client.get_run(new), client.get_run(original)
    assert run.data.tags["reproduces"] == original
    assert run.data.tags["runtime_overrides"] == (
        f"dataset.data_dir={elsewhere} distribute=one_device tracking.uri={uri}"
    )
    assert run.data.params["dataset.data_dir"] == str(elsewhere)
    assert run.data.params["distribute.strategy"] == "one_device"
    assert run.data.params["optimizer.name"] == "adam"  # the plain string, not the Enum
    assert run.data.tags["config_digest"] == source.data.tags["config_digest"]
    # Same data (its digest), non-deterministic original: said so in the verdict.
    for split in ("train", "validation", "test"):
        assert run.data.tags[f"data_digest.{split}"] == source.data.tags[f"data_digest.{split}"]
    assert "the original ran with trainer.deterministic=false" in run.data.tags["reproduce_verdict"]
    assert reproduced.tags["reproduce_verdict"] == run.data.tags["reproduce_verdict"]
    assert "warning: reproduce" not in capsys.readouterr().err
    # The splits are MLflow dataset inputs: runs are found by their data.
    digest = source.data.tags["data_digest.train"][:36]
    mlflow.set_tracking_uri(uri)
    found = mlflow.search_runs(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"dataset.digest = '{digest}' AND dataset.context = 'train'",
    )
    assert set(found["run_id"]) == {original, new}

    # The refusal through the command line: one error: line, no traceback.
    refused = train_cli(f"reproduce={original}", "trainer.epochs=7", f"tracking.uri={uri}")
    line = error_line(refused)
    assert "trainer.epochs=7" in line
    assert "dataset.data_dir, dataset.path, distribute.*, trainer.verbose, tracking.*" in line


@pytest.mark.slow
def test_reproduce_on_changed_data_says_so(tmp_path, capsys):
    uri, images, copy = sqlite_store(tmp_path), tmp_path / "images", tmp_path / "copy"
    write_images(images, {"cat": [(8, 8)] * 6, "dog": [(8, 8)] * 6})
    original = convnets.train(
        ["dataset=image_folder", f"dataset.path={images}", TINY, "trainer.epochs=1", *QUIET,
         f"tracking.uri={uri}", "tracking.experiment=cats"],
        output_dir=tmp_path / "a",
    ).run_id  # fmt: skip
    shutil.copytree(images, copy)
    write_images(copy / "extra", {"cat": [(8, 8)]}, seed=1)  # new pixels for test/cat/0.png
    shutil.copy(copy / "extra" / "test" / "cat" / "0.png", copy / "test" / "cat" / "0.png")
    reproduced = convnets.train(
        [f"reproduce={original}", f"dataset.path={copy}", f"tracking.uri={uri}"],
        output_dir=tmp_path / "b",
    )
    client = MlflowClient(uri)
    run = client.get_run(reproduced.run_id)
    # beside its original: no tracking.experiment= on the reproduce
    assert run.info.experiment_id == client.get_run(original).info.experiment_id
    assert f"warning: reproduce={original}: the data differs from the original's (test " in (
        capsys.readouterr().err
    )
    assert "the data differs: test digest changed" in run.data.tags["reproduce_verdict"]
    assert reproduced.tags["reproduce_verdict"] == run.data.tags["reproduce_verdict"]


# ---------------------------------------------------------------- 5. credentials


@pytest.mark.parametrize("script", ["train.py", "evaluate.py"])
def test_credentials_in_the_tracking_uri_never_reach_disk_or_the_console(tmp_path, script):
    secret = "s3cr3t-pa55"
    args = [f"tracking.uri=http://user:{secret}@127.0.0.1:{free_port()}"]
    if script == "evaluate.py":
        args.append("compare=digits")
    result = subprocess.run(
        [sys.executable, str(REPO / script), *args, f"hydra.run.dir={tmp_path / 'out'}"],
        cwd=tmp_path, env=CLI_ENV | {"PYTHONPATH": str(REPO)}, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    line = error_line(result)
    assert "MLFLOW_TRACKING_USERNAME" in line and "MLFLOW_TRACKING_PASSWORD" in line
    assert secret not in result.stdout + result.stderr
    found = subprocess.run(["grep", "-rl", secret, str(tmp_path)], capture_output=True, text=True)
    assert found.stdout == ""


# ---------------------------------------------------------------- 6. tracebacks, half-truths


def test_a_read_only_store_is_refused_in_one_line(tmp_path):
    uri = sqlite_store(tmp_path)
    MlflowClient(uri).search_experiments()  # creates the store's schema
    (tmp_path / "mlflow.db").chmod(0o444)
    result = train_cli(TINY, *QUIET, f"tracking.uri={uri}", f"hydra.run.dir={tmp_path / 'out'}")
    assert error_line(result) == (
        f"error: tracking.uri={uri}: the store {tmp_path / 'mlflow.db'} is read-only (the file "
        "or its folder); make both writable (chmod u+w) or record elsewhere with "
        "tracking.uri=sqlite:///<writable path>/mlflow.db"
    )
    (tmp_path / "mlflow.db").chmod(0o644)
    assert MlflowClient(uri).search_runs(["0"]) == []


def test_the_unreachable_store_message_is_cut_at_a_word(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}/a/rather/long/path/to/make/the/message/long"
    result = train_cli(f"tracking.uri={uri}", f"hydra.run.dir={tmp_path}", timeout=120)
    line = error_line(result)
    detail = re.search(r"cannot be used \(MlflowException: (.*)\); check the URI", line)[1]
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    try:
        with pytest.raises(Exception) as err:  # noqa: PT011 - whatever MLflow raises
            MlflowClient(uri).search_experiments(max_results=1)
    finally:
        del os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]
    full = str(err.value).strip().splitlines()[0]
    assert len(full) > 160 and detail.endswith("...")
    kept = detail.removesuffix("...")
    assert full.startswith(kept) and full[len(kept)] in " ,;:("  # a whole word, then cut


@pytest.mark.slow
def test_the_ctrl_c_hint_names_the_store_and_works(tmp_path):
    uri = sqlite_store(tmp_path)
    client = MlflowClient(uri)
    proc = start_training(TINY, "trainer.epochs=20", *QUIET, f"tracking.uri={uri}",
                 f"hydra.run.dir={tmp_path / 'out'}")  # fmt: skip
    try:
        run_id = wait_for_epochs(proc, tmp_path / "out", 1)
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr[-3000:]
    [line] = [x for x in stderr.splitlines() if x.startswith("interrupted: ")]
    hint = line.split("; continue with: ", 1)[1]
    assert hint == f"python train.py resume={run_id} tracking.uri={uri}"
    command = shlex.split(hint)
    assert command[:2] == ["python", "train.py"]
    # The hint's overrides, given as train.py would take them, in this process.
    assert convnets.train(command[2:], output_dir=tmp_path / "resumed").run_id == run_id
    assert client.get_run(run_id).info.status == "FINISHED"
