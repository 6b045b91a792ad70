"""The logged model as an artifact: runs trained in this process with ``convnets.train``.

Raw images in (pyfunc and a real ``mlflow models serve``) give back the run's test_accuracy,
for the bundled digits and for an image folder resized by ``dataset.image_size``; models are
found by name and ranked by their metrics; the model training wrote locally evaluates like
the run (``convnets.evaluate(checkpoint=...)``); ``init_from=`` fine-tunes a pretrained run
(frozen layers untouched, ahead of training from scratch) and refuses what it cannot use
with one line. The same refusals through ``python train.py`` (exit status, ``error:`` line)
are in test_model_artifact_cli.py.
"""

from __future__ import annotations

import contextlib
import io
import json
import shlex
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest
import tensorflow as tf
from conftest import CLI_ENV, REPO, free_port, sqlite_store, stop_process_group, wait_until_serving
from PIL import Image
from sklearn.datasets import load_digits

import convnets
from convnets.data import split_indices
from convnets.errors import ConfigError, hydra_override
from convnets.tracking import Tracker, model_name

# Runs trained once for the module (in this process) and two model servers; the xdist group
# keeps the module on one worker (`--dist loadgroup`), so its shared runs are trained once.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("model_artifact")]

TINY = "model.layers=[{filters:8},{filters:8,pool:max}]"
DIGITS_PIXELS = ["dataset.max_pixel_value=16", "dataset.mean=[0.3053]", "dataset.std=[0.376]"]
FOLDER_CLASSES = ("blue", "green", "red")
SERVE_TIMEOUT_S = 180


# ---------------------------------------------------------------- helpers


def train(tmp: Path, uri: str, *args: str) -> convnets.Run:
    """``convnets.train`` (quiet) into ``uri``, its files in a new folder under ``tmp``."""
    return convnets.train(
        ["trainer.verbose=0", hydra_override("tracking.uri", uri), *args],
        output_dir=tmp / f"run-{time.monotonic_ns()}",
    )


def refusal(tmp: Path, uri: str, *args: str) -> str:
    """``convnets.train`` expecting a user error (what the CLI prints as its one ``error:``
    line and exits on); return its message, checked to be that one line."""
    with pytest.raises(convnets.ConvnetsError) as refused:
        train(tmp, uri, *args)
    message = str(refused.value)
    assert message and "\n" not in message, message
    return message


def raw_digits_test() -> tuple[np.ndarray, np.ndarray]:
    """digits' test split as stored (uint8 0..16), independently of the pipeline."""
    digits = load_digits()
    labels = digits.target
    _, test = split_indices(
        labels, 0.2, 0, "dataset.test_fraction"
    )  # digits.yaml: test_fraction 0.2, split_seed 0
    return digits.images.astype(np.uint8)[test][..., None], labels[test]


def write_colour_folder(root: Path, size: int = 12) -> None:
    """Three classes of noisy RGB images, one bright channel each, ``size`` x ``size``."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 24), ("test", 12)):
        for channel, label in enumerate(FOLDER_CLASSES[::-1]):  # red=0, green=1, blue=2
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(count):
                image = rng.integers(0, 120, (size, size, 3))
                image[..., channel] += rng.integers(60, 136)
                Image.fromarray(image.astype(np.uint8), "RGB").save(folder / f"{i:03d}.png")


def raw_folder_test(root: Path, image_size: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """The test images resized as dataset.image_size does (bilinear), in 0..255 float32."""
    images, labels = [], []
    for index, label in enumerate(sorted(FOLDER_CLASSES)):
        for path in sorted((root / "test" / label).iterdir()):
            pixels = np.asarray(Image.open(path).convert("RGB"))
            images.append(tf.image.resize(pixels, image_size, method="bilinear").numpy())
            labels.append(index)
    return np.stack(images).astype(np.float32), np.array(labels)


def accuracy(probabilities, labels) -> float:
    return float((np.asarray(probabilities).argmax(axis=1) == labels).mean())


def serve_predict(store_uri: str, model_uri: str, log: Path, *batches: np.ndarray) -> list:
    """``mlflow models serve`` on 127.0.0.1 (a free port, bounded wait); POST each batch of
    images as JSON; the predictions of each."""
    port = free_port()
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri]
            + ["--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
            env={**CLI_ENV, "MLFLOW_TRACKING_URI": store_uri},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(proc, f"{url}/ping", log, SERVE_TIMEOUT_S)
        predictions = []
        for images in batches:
            request = urllib.request.Request(
                f"{url}/invocations",
                data=json.dumps({"inputs": images.tolist()}).encode(),
                headers={"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(request, timeout=60) as response:
                predictions.append(np.array(json.loads(response.read())["predictions"]))
        return predictions
    finally:
        stop_process_group(proc)


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    # A folder name with a space and non-ASCII letters: every printed command must paste.
    tmp = tmp_path_factory.mktemp("model artifact été")
    return tmp, sqlite_store(tmp)


@pytest.fixture(scope="module")
def digits_run(store):
    """(the returned Run, what training printed, the run as the store has it)."""
    tmp, uri = store
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        run = train(tmp, uri, TINY, "trainer.epochs=3", "optimizer.lr=0.01")
    return run, printed.getvalue(), mlflow.MlflowClient(uri).get_run(run.run_id)


@pytest.fixture(scope="module")
def folder_run(store):
    tmp, uri = store
    root = tmp / "colours"
    write_colour_folder(root)
    run = train(
        tmp,
        uri,
        TINY,
        "dataset=image_folder",
        hydra_override("dataset.path", root),
        "dataset.image_size=[8,8]",  # stored 12x12
        "trainer.epochs=3",
        "optimizer.lr=0.01",
    )
    return run, root, mlflow.MlflowClient(uri).get_run(run.run_id)


# ---------------------------------------------------------------- raw images in


def assert_pyfunc_and_served_reproduce_test_accuracy(uri, run, images, labels, log: Path):
    """``mlflow.pyfunc`` and ``mlflow models serve`` on the raw images score the run's
    test_accuracy. The model takes float32 pixel values as stored; a request of other floats
    (here normalised to 0..1, a common mistake) is read as those pixel values, not truncated
    to integers (an all-zero image)."""
    model_uri = run.data.tags["model_uri"]
    mlflow.set_tracking_uri(uri)
    expected = run.data.metrics["test_accuracy"]
    pyfunc = mlflow.pyfunc.load_model(model_uri)
    assert accuracy(pyfunc.predict(images.astype(np.float32)), labels) == (
        pytest.approx(expected, abs=1e-6)
    )
    scale = float(images.max())
    normalised = images[:8] / scale
    served, served_normalised = serve_predict(uri, model_uri, log, images, normalised)
    assert accuracy(served, labels) == pytest.approx(expected, abs=1e-6)
    as_given = pyfunc.predict(normalised.astype(np.float32))
    all_zero = pyfunc.predict(np.zeros_like(normalised, dtype=np.float32))
    np.testing.assert_allclose(served_normalised, as_given, atol=1e-5)
    assert not np.allclose(served_normalised, all_zero, atol=1e-5)


def test_pyfunc_and_served_digits_model_take_raw_pixels(store, digits_run):
    tmp, uri = store
    returned, _, run = digits_run
    images, labels = raw_digits_test()
    assert run.data.tags["model_uri"] == f"runs:/{run.info.run_id}/{model_name(run.info.run_name)}"
    assert returned.model_uri == run.data.tags["model_uri"]
    assert returned.test_accuracy == run.data.metrics["test_accuracy"]
    assert_pyfunc_and_served_reproduce_test_accuracy(
        uri, run, images, labels, tmp / "serve-digits.log"
    )


def test_pyfunc_and_served_image_folder_model_take_resized_pixels(store, folder_run):
    tmp, uri = store
    _, root, run = folder_run
    images, labels = raw_folder_test(root, [8, 8])
    assert_pyfunc_and_served_reproduce_test_accuracy(
        uri, run, images, labels, tmp / "serve-folder.log"
    )


def test_logged_model_says_what_goes_in(store, digits_run):
    _, uri = store
    _, _, run = digits_run
    mlflow.set_tracking_uri(uri)
    info = mlflow.models.get_model_info(run.data.tags["model_uri"])
    (spec,) = info.signature.inputs.inputs
    assert (spec.type, spec.shape) == (np.dtype("float32"), (-1, 8, 8, 1))
    assert "0..16" in info.metadata["input"] and "not normalised" in info.metadata["input"]
    assert info.metadata["max_pixel_value"] == 16.0 and info.metadata["class_names"][0] == "0"
    assert info.saved_input_example_info["type"] == "ndarray"


# ---------------------------------------------------------------- found by name, ranked


def test_models_are_named_after_their_runs_and_ranked_by_metrics(store, digits_run, folder_run):
    _, uri = store
    mlflow.set_tracking_uri(uri)
    runs = {run.info.run_id: run for _, _, run in (digits_run, folder_run)}
    experiments = sorted({run.info.experiment_id for run in runs.values()})
    ranked = mlflow.search_logged_models(
        experiment_ids=experiments,
        filter_string="metrics.test_accuracy >= 0",
        order_by=[{"field_name": "metrics.test_accuracy", "ascending": False}],
        output_format="list",
    )
    assert {m.source_run_id for m in ranked} == set(runs)
    accuracies = []
    for found in ranked:
        run = runs[found.source_run_id]
        assert found.name == model_name(run.info.run_name) != "model"
        metrics = {m.key: m.value for m in found.metrics}
        for key in ("test_accuracy", "param_count", "receptive_field"):
            assert metrics[key] == run.data.metrics[key], key
        assert found.params["model.layers.0.filters"] == "8"
        accuracies.append(metrics["test_accuracy"])
    assert accuracies == sorted(accuracies, reverse=True)
    best = max(accuracies)
    top = mlflow.search_logged_models(
        experiment_ids=experiments,
        filter_string=f"metrics.test_accuracy > {best - 1e-6}",
        output_format="list",
    )
    assert [m.model_id for m in top] == [ranked[0].model_id]


# ---------------------------------------------------------------- local model, the UI


def test_evaluate_checkpoint_on_the_locally_written_model(store, digits_run):
    tmp, _ = store
    returned, printed, run = digits_run
    path = returned.model_path
    assert path.name == "model.keras" and (path.parent / "config.yaml").is_file()
    assert path.is_relative_to(tmp)  # under the output_dir it was given
    (line,) = [line for line in printed.splitlines() if line.startswith("model: ")]
    command = line.removeprefix(f"model: {path} (").removesuffix(")")
    assert command == f"python evaluate.py \"checkpoint='{path}'\""
    pasted = subprocess.run(  # as the user pastes it into a shell, in that folder
        command.replace("python evaluate.py", f"{sys.executable} {REPO / 'evaluate.py'}", 1),
        shell=True,
        cwd=tmp,
        env=CLI_ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert pasted.returncode == 0, pasted.stderr[-2000:]
    report = convnets.evaluate(checkpoint=path, output_dir=tmp / "eval")
    expected = run.data.metrics["test_accuracy"]
    assert report.metrics["eval_accuracy"] == pytest.approx(expected, abs=1e-4)
    assert (tmp / "eval" / "evaluation" / "effective_receptive_field.png").is_file()
    three = tmp / "three-digits"  # 8x8 images as the model takes, but 3 classes, not 10
    write_digit_classes(three, [0, 1, 2])
    with pytest.raises(ConfigError, match="the model tells 10 classes apart but dataset=image"):
        convnets.evaluate(
            ["dataset=image_folder", hydra_override("dataset.path", three)],
            checkpoint=path,
            output_dir=tmp / "eval3",
        )


def test_done_line_opens_the_run_and_the_runs_table(store, digits_run):
    _, uri = store
    returned, printed, run = digits_run
    run_id = run.info.run_id
    done = printed.strip().splitlines()[-1]
    experiment = f"http://127.0.0.1:5000/#/experiments/{run.info.experiment_id}"
    assert returned.ui_url == f"{experiment}/runs/{run_id}"
    assert done.startswith("done: test_accuracy=")
    ui = f"mlflow ui --backend-store-uri {shlex.quote(uri)}, then {experiment}/runs/{run_id};"
    assert ui in done and " " in uri  # quoted, so it pastes
    assert done.endswith(f"all runs: {experiment}/runs)")


# ---------------------------------------------------------------- transfer learning


def write_digit_classes(root: Path, classes, train_per_class: int | None = None) -> None:
    """Digits of ``classes`` as an image folder (pixels 0..16); 25% of each class to test."""
    digits = load_digits()
    keep = np.isin(digits.target, classes)
    images, labels = digits.images.astype(np.uint8)[keep], digits.target[keep]
    train, test = split_indices(labels, 0.25, 0, "dataset.test_fraction")
    rng = np.random.default_rng(0)
    for split, index in (("train", train), ("test", test)):
        for label in classes:
            chosen = index[labels[index] == label]
            if split == "train" and train_per_class:
                chosen = rng.choice(chosen, train_per_class, replace=False)
            folder = root / split / str(label)
            folder.mkdir(parents=True)
            for i in chosen:
                Image.fromarray(images[i], "L").save(folder / f"{i:04d}.png")


def test_fine_tuning_keeps_frozen_layers_and_beats_scratch(store):
    """Pretrained on digits 0-4, then 5 labelled images per class of 5-9 for 6 short epochs:
    the pretrained start (first conv layer frozen) is ahead of the same training from scratch.
    With more labels or epochs scratch catches up (see notebooks/04_transfer_learning)."""
    tmp, uri = store
    write_digit_classes(tmp / "digits04", [0, 1, 2, 3, 4])
    write_digit_classes(tmp / "digits59", [5, 6, 7, 8, 9], train_per_class=5)
    folder = ["dataset=image_folder", *DIGITS_PIXELS]
    pretrained = train(
        tmp,
        uri,
        *folder,
        hydra_override("dataset.path", tmp / "digits04"),
        "trainer.epochs=6",
        "optimizer.lr=0.01",
    ).run_id
    few = [*folder, hydra_override("dataset.path", tmp / "digits59"), "dataset.val_fraction=0"]
    few += ["trainer.epochs=6", "trainer.batch_size=8"]
    scratch = train(tmp, uri, *few).run_id
    tuned = train(tmp, uri, *few, f"init_from={pretrained}", "trainer.freeze_layers=1").run_id

    client = mlflow.MlflowClient(uri)
    tags = client.get_run(tuned).data.tags
    assert tags["init_from"] == pretrained
    assert (tags["init_loaded_layers"], tags["init_frozen_layers"]) == ("4", "1")
    assert tags["init_head"] == "re-initialised"  # other classes, same count
    accuracy_of = {
        run: client.get_run(run).data.metrics["test_accuracy"] for run in (scratch, tuned)
    }
    assert accuracy_of[tuned] > accuracy_of[scratch]

    import keras

    tracker = Tracker(uri)
    before, after = (
        keras.saving.load_model(
            next(tracker.download_model(run, tmp / f"model-{run}").rglob("*.keras")), compile=False
        )
        for run in (pretrained, tuned)
    )
    for layer in ("block1_conv", "block1_bn"):
        for old, new in zip(
            before.get_layer(layer).weights, after.get_layer(layer).weights, strict=True
        ):
            np.testing.assert_array_equal(old.numpy(), new.numpy())
    assert not np.array_equal(
        before.get_layer("block2_conv").kernel.numpy(),
        after.get_layer("block2_conv").kernel.numpy(),
    )


def test_init_from_refuses_in_one_line(store, digits_run):
    tmp, uri = store
    run_id = digits_run[0].run_id
    unknown = refusal(tmp, uri, TINY, "init_from=0123456789abcdef0123456789abcdef")
    assert unknown.startswith("init_from=0123456789abcdef0123456789abcdef: no such run")
    mismatch = refusal(tmp, uri, "model.layers=[{filters:5}]", f"init_from={run_id}")
    assert mismatch.startswith(f"init_from={run_id}: no layer of this stack matches")
    no_model = train(tmp, uri, TINY, "trainer.epochs=1", "tracking.log_model=false").run_id
    missing = refusal(tmp, uri, TINY, f"init_from={no_model}")
    assert missing.startswith(f"init_from={no_model}: the run has no logged model")
    unused = refusal(tmp, uri, TINY, "trainer.freeze_layers=1")
    assert unused.startswith("trainer.freeze_layers=1 freezes layers loaded")
