"""``python evaluate.py`` mistakes, each one line, nothing created: an unknown ``+key`` through
the real CLI (Hydra's part); a store that does not exist, a file that is not a Keras archive and
images of another size than the model takes in this process (``convnets.evaluate`` raises the
line the command prints after ``error:``)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import command

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
        for label in ("a", "b"):
            (tmp_path / "images" / split / label).mkdir(parents=True)
            for n in range(3):
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
        "or resize with dataset.image_size=[H,W] (image folders)"
    )
