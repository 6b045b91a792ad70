"""``python evaluate.py`` mistakes, each one ``error:`` line through the real CLI, nothing
created: an unknown ``+key``, a store that does not exist, a file that is not a Keras archive,
images of another size than the model takes."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import command

import convnets


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


def test_a_store_that_does_not_exist_is_not_created(tmp_path):
    store = tmp_path / "elsewhere.db"
    result = evaluate_cli(tmp_path, f"run_id={'0' * 32}", f"tracking.uri=sqlite:///{store}")
    assert one_line(result) == (
        f"error: run_id={'0' * 32}: there is no MLflow store at {store} (tracking.uri="
        f"sqlite:///{store}); pass the store the runs were recorded in "
        "(tracking.uri=sqlite:///<path>/mlflow.db)"
    )
    assert not store.exists() and not (tmp_path / "mlflow.db").exists()


def test_a_file_that_is_not_a_keras_archive_says_so(tmp_path):
    (tmp_path / "model.keras").write_text("not a model")
    # first, before it asks for the dataset= a model would need
    result = evaluate_cli(tmp_path, "checkpoint=model.keras")
    assert one_line(result) == (
        "error: checkpoint=model.keras: not a Keras archive (a .keras file is the zip archive "
        "model.save writes, e.g. the model.keras beside a run's checkpoints)"
    )


@pytest.mark.slow
def test_images_of_another_size_are_refused_before_predicting(tmp_path):
    from PIL import Image

    run = convnets.train(
        ["model.layers=[{filters:4,pool:max}]", "trainer.epochs=1", "trainer.verbose=0",
         "tracking.log_model=false", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"],
        output_dir=tmp_path / "run",
    )  # fmt: skip
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for label in ("a", "b"):
            (tmp_path / "images" / split / label).mkdir(parents=True)
            for n in range(3):
                pixels = rng.integers(0, 256, (12, 12), dtype=np.uint8)
                Image.fromarray(pixels, "L").save(tmp_path / "images" / split / label / f"{n}.png")
    result = evaluate_cli(
        tmp_path,
        f"checkpoint={run.model_path}",
        "dataset=image_folder",
        f"dataset.path={tmp_path / 'images'}",
    )
    assert one_line(result) == (
        f"error: checkpoint={run.model_path}: the model takes 8x8x1 images but "
        "dataset=image_folder gives 12x12x1; pick the dataset it was trained on (dataset=...), "
        "or resize with dataset.image_size=[H,W] (image folders)"
    )
