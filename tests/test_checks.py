"""Every rule that needs no data is checked once, in the pure config check, before TensorFlow
loads or a run is recorded; the layers below (trainer, data, distribute) take validated
values. Through the API, which composes as the command line does."""

from __future__ import annotations

import pytest

import convnets

CASES = [
    ("trainer.precision=float16", "trainer.precision"),
    ("optimizer.name=lamb", "optimizer.name"),
    ("optimizer.schedule=step", "optimizer.schedule"),
    ("optimizer.lr=0", r"optimizer.lr=0.0 must be > 0"),
    ("optimizer.warmup_epochs=20", r"optimizer.warmup_epochs=20.0 must be shorter than"),
    ("trainer.label_smoothing=1.5", r"trainer.label_smoothing=1.5 must be in \[0, 1\)"),
    ("trainer.batch_size=0", "trainer.batch_size=0 must be at least 1"),
    ("dataset.val_fraction=1.0", r"dataset.val_fraction=1.0 must be in \[0, 1\)"),
    ("dataset.test_fraction=0", "dataset.test_fraction=0 leaves digits no test split"),
    ("dataset.std=[0]", "dataset.std=\\[0.0\\] must be > 0 for every channel"),
    ("dataset.mean=[nan]", r"dataset.mean=\[nan\] must be a number per channel"),
    ("model.width=nan", "model.width must be a positive number, got nan"),
    ("~dataset", r"dataset: has no value \(did an override remove it with ~dataset\?\)"),
    ("dataset.max_pixel_value=0", "dataset.max_pixel_value=0.0 must be > 0"),
    ("dataset.image_size=[0,8]", r"dataset.image_size=\[0,8\] must be \[H, W\]"),
    (
        "dataset.image_size=[12,12]",  # digits has its size: the key was ignored there
        r"dataset.image_size=\[12,12\] resizes the images of an image folder .*: drop it",
    ),
    ("distribute.cpu_replicas=-1", "distribute.cpu_replicas=-1 must be >= 0"),
    ("tracking.outage_wait_s=-1", "tracking.outage_wait_s=-1.0 must be >= 0"),
    ("distribute.strategy=horovod", "distribute.strategy"),
    ("tracking.run_name=${model.nope}", r"tracking.run_name: its \$\{...\} cannot be resolved"),
    ("reproduce=", "reproduce= is empty: give a run id"),
    ("init_from=", "init_from= is empty: give a run id"),
]


@pytest.mark.parametrize("override, message", CASES, ids=[c[0] for c in CASES])
def test_refused_before_anything_runs(tmp_path, monkeypatch, override, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(convnets.ConfigError, match=message):
        convnets.train([override, f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"])
    assert not (tmp_path / "mlflow.db").exists()


def test_every_command_refuses_an_interpolation_it_cannot_resolve():
    """Not OmegaConf's traceback from wherever the value is first read."""
    unset = "${oc.env:CONVNETS_TEST_UNSET}"
    with pytest.raises(convnets.ConfigError, match=r"^run_id: its \$\{...\} cannot be resolved"):
        convnets.evaluate([f"run_id={unset}"])
    with pytest.raises(convnets.ConfigError, match=r"^model.name: its \$\{...\} cannot be"):
        convnets.inspect([f"model.name={unset}"])
