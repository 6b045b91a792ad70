"""``python evaluate.py`` mistakes, each one line, nothing created: an unknown ``+key`` through
the real CLI (Hydra's part); a store that does not exist, a file that is not a Keras archive and
images of another size than the model takes in this process (``convnets.evaluate`` raises the
line the command prints after ``error:``)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import command, sqlite_store
from mlflow.tracking import MlflowClient

import convnets
from convnets.errors import ConvnetsError


def evaluate_cli(tmp_path, *args):
    return command("evaluate.py", *args, f"hydra.run.dir={tmp_path / 'out'}", cwd=tmp_path)


def one_line(result) -> str:
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    [line] = [x for x in result.stderr.splitlines() if x.startswith("error: ")]
    return line


def test_an_unknown_plus_key_is_refused(tmp_path):
    result = evaluate_cli(tmp_path, "+foo=1", "compare=digits")
    assert result.returncode == 2
    assert one_line(result).startswith("error: foo: unknown key (not in the config schema)")


def refusal(tmp_path, monkeypatch, *overrides) -> str:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConvnetsError) as refused:
        convnets.evaluate(list(overrides))
    return str(refused.value)


def test_a_store_that_does_not_exist_is_not_created(tmp_path, monkeypatch):
    store = tmp_path / "elsewhere.db"
    refused = refusal(
        tmp_path, monkeypatch, f"run_id={'0' * 32}", f"tracking.uri=sqlite:///{store}"
    )
    assert refused == (
        f"run_id={'0' * 32}: there is no MLflow store at {store} (tracking.uri="
        f"sqlite:///{store}); pass the store the runs were recorded in "
        "(tracking.uri=sqlite:///<path>/mlflow.db)"
    )
    assert not store.exists() and not (tmp_path / "mlflow.db").exists()


def test_a_file_that_is_not_a_keras_archive_says_so(tmp_path, monkeypatch):
    (tmp_path / "model.keras").write_text("not a model")
    # first, before it asks for the dataset= a model would need
    assert refusal(tmp_path, monkeypatch, "checkpoint=model.keras") == (
        "checkpoint=model.keras: not a Keras archive (a .keras file is the zip archive "
        "model.save writes, e.g. the model.keras beside a run's checkpoints)"
    )


def test_what_names_no_model_or_nothing_is_refused_for_what_it_is(tmp_path, monkeypatch):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "model.keras").write_text("")
    assert refusal(tmp_path, monkeypatch, f"checkpoint={tmp_path / 'run'}") == (
        f"checkpoint={tmp_path / 'run'} is a folder (it holds one); pass the path of a .keras "
        f"model, e.g. checkpoint={tmp_path / 'run' / 'model.keras'}"
    )
    for empty in ("run_id", "baseline"):  # what an unset shell variable gives
        with pytest.raises(ConvnetsError) as refused:
            convnets.compare("x", [f"{empty}="])
        assert str(refused.value) == (
            f"{empty}= is empty (an unset shell variable?); give it a value or leave it out"
        )
    assert refusal(tmp_path, monkeypatch, "baseline=g1").startswith(
        "baseline=g1 names the group the others are tested against in a comparison: add compare="
    )


@pytest.mark.slow
def test_images_of_another_size_are_refused_before_predicting(tmp_path, monkeypatch):
    from PIL import Image

    run = convnets.train(
        ["model.layers=[{filters:4,pool:max}]", "trainer.epochs=1", "trainer.verbose=0",
         "tracking.log_model=false", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"],
        output_dir=tmp_path / "run",
    )  # fmt: skip
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for label in DIGITS:  # the model's ten classes, at another size
            (tmp_path / "images" / split / label).mkdir(parents=True)
            for n in range(2):
                pixels = rng.integers(0, 256, (12, 12), dtype=np.uint8)
                Image.fromarray(pixels, "L").save(tmp_path / "images" / split / label / f"{n}.png")
    refused = refusal(
        tmp_path,
        monkeypatch,
        f"checkpoint={run.model_path}",
        "dataset=image_folder",
        f"dataset.path={tmp_path / 'images'}",
    )
    assert refused == (
        f"checkpoint={run.model_path}: the model takes 8x8x1 images but "
        "dataset=image_folder gives 12x12x1; pick the dataset it was trained on (dataset=...), "
        "or resize with dataset.image_size=[8,8] (image folders)"
    )
    resized = convnets.evaluate(  # as the line says
        [f"checkpoint={run.model_path}", "dataset=image_folder",
         f"dataset.path={tmp_path / 'images'}", "dataset.image_size=[8,8]"],
        output_dir=tmp_path / "resized",
    )  # fmt: skip
    assert 0 <= resized.metrics["eval_accuracy"] <= 1


# ---------------------------------------------------------------- a run's model, evaluated again


def write_images(root, classes, pixel_max=255, per_class=3, seed=0):
    """``root/{train,test}/<class>/<n>.png``: 8x8 grayscale images of pixels 0..pixel_max."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split in ("train", "test"):
        for label in classes:
            (root / split / label).mkdir(parents=True)
            for n in range(per_class):
                pixels = rng.integers(0, pixel_max + 1, (8, 8), dtype=np.uint8)
                Image.fromarray(pixels, "L").save(root / split / label / f"{n}.png")
    return root


DIGITS = [str(d) for d in range(10)]
TINY = ["model.layers=[{filters:4,pool:max}]", "trainer.epochs=1", "trainer.verbose=0"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One store holding a digits run and an image-folder run, both with their logged model
    (10 classes named 0..9, 8x8 images of pixels 0..255): ``(uri, digits, images, folder)``."""
    tmp = tmp_path_factory.mktemp("evaluate_runs")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    images = write_images(tmp / "images", DIGITS)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)  # the store's artifacts (mlruns/) stay in the test's folder
        digits = convnets.train([*TINY, f"tracking.uri={uri}"], output_dir=tmp / "digits")
        folder = convnets.train(
            [*TINY, "dataset=image_folder", f"dataset.path={images}", f"tracking.uri={uri}"],
            output_dir=tmp / "folder",
        )
    return uri, digits, folder, images


@pytest.mark.slow
def test_run_id_takes_where_its_data_lives_and_refuses_another_dataset(runs, tmp_path, capsys):
    uri, digits, folder, images = runs
    with pytest.raises(ConvnetsError, match=rf"dataset.path={tmp_path / 'gone'}: no such folder"):
        convnets.evaluate([f"dataset.path={tmp_path / 'gone'}"], run_id=folder.run_id,
                          tracking_uri=uri, output_dir=tmp_path / "out")  # fmt: skip
    moved = tmp_path / "moved"
    shutil.copytree(images, moved)
    report = convnets.evaluate(
        [f"dataset.path={moved}"], run_id=folder.run_id, tracking_uri=uri, output_dir=tmp_path
    )
    assert report.metrics["eval_accuracy"] == folder.test_accuracy  # same images, same model
    assert "digest" not in capsys.readouterr().err
    fewer = tmp_path / "fewer"  # other images at the place given: said, not silently logged
    shutil.copytree(images, fewer)
    next((fewer / "test").rglob("*.png")).unlink()
    convnets.evaluate(
        [f"dataset.path={fewer}"], run_id=folder.run_id, tracking_uri=uri, output_dir=tmp_path
    )
    assert (
        f"warning: run_id={folder.run_id}: these test images differ from the ones the run was "
        "tested on (test digest changed)"
    ) in capsys.readouterr().err

    allowed = "(dataset.data_dir, dataset.path)"
    with pytest.raises(ConvnetsError) as refused:
        convnets.evaluate(["dataset=image_folder", f"dataset.path={images}"],
                          run_id=digits.run_id, tracking_uri=uri)  # fmt: skip
    assert str(refused.value) == (
        f"dataset=image_folder: run_id={digits.run_id} evaluates the run's model on the dataset "
        f"the run recorded; give only where that data lives {allowed}, or evaluate the model "
        "on other data with checkpoint=<its model.keras> dataset=image_folder"
    )
    for value in ("0.5", "0.1"):  # 0.1 is the default: given, it is refused all the same
        with pytest.raises(ConvnetsError) as refused:
            convnets.evaluate(
                [f"dataset.val_fraction={value}"], run_id=digits.run_id, tracking_uri=uri
            )
        assert str(refused.value) == (
            f"dataset.val_fraction: run_id={digits.run_id} evaluates the run's model on the "
            f"dataset the run recorded; drop it -- only where that data lives may be given "
            f"{allowed}"
        )


def test_two_evaluations_started_in_one_second_get_their_own_folders():
    from hydra import compose, initialize_config_dir

    from convnets.api import CONFIG_DIR

    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        folders = [
            compose("evaluate", ["compare=digits"], return_hydra_config=True).hydra.run.dir
            for _ in range(2)
        ]
    assert folders[0] != folders[1], folders  # compare= reports land in the run's folder
    assert all(f.startswith("outputs/evaluate/") for f in folders)


@pytest.mark.slow
def test_a_damaged_logged_model_names_the_run_and_its_artifact(runs, tmp_path):
    uri, digits, _, _ = runs
    run = MlflowClient(uri).get_run(digits.run_id)
    root = Path(uri.removeprefix("sqlite:///")).parent / "mlruns"
    [artifact] = [p for p in root.rglob("model.keras") if run.data.tags["model_id"] in str(p)]
    kept = artifact.read_bytes()
    artifact.write_text("not a model")
    try:
        with pytest.raises(ConvnetsError) as refused:
            convnets.evaluate(run_id=digits.run_id, tracking_uri=uri, output_dir=tmp_path)
    finally:
        artifact.write_bytes(kept)
    assert str(refused.value) == (
        f"run_id={digits.run_id}: its logged model (artifact {run.data.tags['model_uri']}, file "
        "data/model.keras) is not a Keras archive: it was damaged after it was logged; retrain "
        f"it (python train.py reproduce={digits.run_id}), or evaluate a copy saved elsewhere "
        "with checkpoint=<path.keras>"
    )


def finished_run(uri, config=None):
    client = MlflowClient(uri)
    run_id = client.create_run(client.get_experiment_by_name("Default").experiment_id).info.run_id
    if config is not None:
        client.log_text(run_id, config, "config.yaml")
    client.set_terminated(run_id, status="FINISHED")
    return run_id


def test_a_runs_missing_or_damaged_config_names_the_run_not_a_copy(tmp_path):
    uri = sqlite_store(tmp_path)
    instead = (
        "so the data to test its model on is unknown; evaluate the model with "
        "checkpoint=<its model.keras> dataset=<name>"
    )
    damaged = finished_run(uri, "dataset: {name: [digits\n")
    with pytest.raises(ConvnetsError) as refused:
        convnets.evaluate(run_id=damaged, tracking_uri=uri)
    assert str(refused.value) == (
        f"run_id={damaged}: its config.yaml artifact is not readable YAML at line 2, {instead}"
    )
    missing = finished_run(uri)
    with pytest.raises(ConvnetsError) as refused:
        convnets.evaluate(run_id=missing, tracking_uri=uri)
    assert str(refused.value).startswith(
        f"run_id={missing}: the run has no readable config.yaml artifact ("
    )
    assert str(refused.value).endswith(instead)  # nothing "can be rerun" here


def test_a_running_run_says_to_wait_for_it(tmp_path):
    uri = sqlite_store(tmp_path)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("Default").experiment_id
    run_id = client.create_run(experiment, tags={"checkpoint_dir": "/runs/ckpt"}).info.run_id
    with pytest.raises(ConvnetsError) as refused:
        convnets.evaluate(run_id=run_id, tracking_uri=uri)
    assert str(refused.value) == (
        f"run_id={run_id}: the run is RUNNING (its model is logged when it ends); wait until "
        "it finishes, or evaluate the model.keras it saves in its checkpoint folder with "
        "checkpoint=/runs/ckpt/model.keras"
    )


def only_warning(capsys) -> str:
    """The one ``warning:`` line printed since the last read."""
    [warning] = [x for x in capsys.readouterr().err.splitlines() if x.startswith("warning:")]
    return warning


@pytest.mark.slow
def test_data_unlike_what_the_model_was_trained_on_is_one_warning(runs, tmp_path, capsys):
    uri, digits, folder, images = runs
    # A digits model (pixels 0..16, its config.yaml beside it) on 0..255 images
    report = convnets.evaluate(
        [f"checkpoint={digits.model_path}", "dataset=image_folder", f"dataset.path={images}"],
        output_dir=tmp_path / "a",
    )
    assert 0 <= report.metrics["eval_accuracy"] <= 1  # evaluated all the same
    assert only_warning(capsys) == (
        f"warning: checkpoint={digits.model_path}: the model was trained on pixels 0..16 and "
        "scales its input by that range, but dataset=image_folder's pixels are 0..255 "
        "(dataset.max_pixel_value): its eval_accuracy says little about the model; store the "
        "images as 0..16 (or, if they already are, set dataset.max_pixel_value=16)"
    )
    # The image-folder run on a copy whose class folders are named otherwise
    renamed = write_images(tmp_path / "renamed", [f"c{d}" for d in range(10)])
    convnets.evaluate([f"dataset.path={renamed}"], run_id=folder.run_id, tracking_uri=uri,
                      output_dir=tmp_path / "b")  # fmt: skip
    assert only_warning(capsys) == (
        f"warning: run_id={folder.run_id}: the model's classes are 0, 1, 2, 3, 4, 5, ... (10 "
        "in all) but dataset=image_folder's are c0, c1, c2, c3, c4, c5, ... (10 in all): its "
        "eval_accuracy counts the k-th of one as the k-th of the other; evaluate data with the "
        "model's classes (an image folder: name its class folders as they are)"
    )
