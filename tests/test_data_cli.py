"""Data errors: one line naming the folder, file or key and the fix, before anything is
recorded; and training on an image folder. In this process (``convnets.train``): the command
line's part (``error:``, exit 1, no traceback, before TensorFlow) is tests/test_record_cli.py's.

How fast they fail is measured by benchmarks/failfast.py, not asserted here.
"""

from pathlib import Path

import pytest
from PIL import Image

import convnets
import convnets.data
from convnets.errors import DataError

REPO = Path(__file__).resolve().parents[1]
MNIST_ARCHIVES = (
    "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz, "
    "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz"
)

pytestmark = pytest.mark.skipif(
    not (REPO / "train.py").exists(), reason="train.py is not in the repository yet"
)


def refusal(tmp_path, *overrides) -> str:
    """The one-line message ``convnets.train`` refuses ``overrides`` with (a DataError: exit 1
    on the command line), having recorded nothing."""
    with pytest.raises(DataError) as refused:
        convnets.train(
            [*overrides, f"tracking.uri=sqlite:///{tmp_path}/m.db"], output_dir=tmp_path / "out"
        )
    assert "\n" not in str(refused.value)
    assert not (tmp_path / "m.db").exists()  # refused before the MLflow store is opened
    return str(refused.value)


def test_tfds_not_prepared_offline(tmp_path, monkeypatch):
    """The TFDS download hosts unreachable, whatever this machine's network."""
    asked = []
    monkeypatch.setattr(convnets.data, "_reachable", lambda host: asked.append(host) or False)
    data_dir = tmp_path / "tfds"
    data_dir.mkdir()
    assert refusal(tmp_path, "dataset=mnist", f"dataset.data_dir={data_dir}") == (
        f"dataset mnist: TFDS mnist 3.0.1 is not prepared in data dir {data_dir} and "
        "storage.googleapis.com cannot be reached to download it: copy a prepared TFDS "
        f"directory to {data_dir}/mnist/3.0.1, or put the original archives ({MNIST_ARCHIVES}) "
        f"in {data_dir}/downloads/manual/, or use dataset=image_folder dataset.path=<your images>"
    )
    assert asked == ["storage.googleapis.com"]  # simulated
    assert list(data_dir.iterdir()) == []


def _png(path, value=128):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (6, 6), value).save(path)


def _missing(root):
    return root / "nope", (
        f"dataset.path={root / 'nope'}: no such folder; point it at the image folder holding "
        "train/ and test/"
    )


def _empty(root):
    return (
        root,
        f"image folder {root} is empty: lay it out as {root}/{{train,test}}/<label>/<image file>",
    )


def _no_test_split(root):
    _png(root / "train" / "a" / "0.png")
    return root, (
        f"image folder {root} has no test/ folder: lay it out as "
        f"{root}/{{train,test}}/<label>/<image file>"
    )


def _unreadable(root):
    for split in ("train", "test"):
        _png(root / split / "a" / "0.png")
    bad = root / "train" / "a" / "1.png"
    bad.write_bytes(b"not a png")
    return root, f"cannot read image {bad}: "


def _a_file(root):
    (root / "images.zip").write_bytes(b"PK")
    return root / "images.zip", (
        f"dataset.path={root / 'images.zip'} is a file, not a folder: point it at the image "
        "folder holding train/ and test/"
    )


def _unreadable_in_a_subfolder(root):
    """Keras's reader walks a label's subfolders: the check walks them too."""
    for split in ("train", "test"):
        _png(root / split / "a" / "0.png")
    bad = root / "train" / "a" / "more" / "1.png"
    bad.parent.mkdir()
    bad.write_bytes(b"not a png")
    return root, f"cannot read image {bad}: "


def _another_size_in_a_subfolder(root):
    for split in ("train", "test"):
        _png(root / split / "a" / "0.png")
    wide = root / "train" / "a" / "more" / "1.png"
    wide.parent.mkdir()
    Image.new("L", (12, 6), 0).save(wide)
    return root, (
        f"image {wide} is 12x6 (WxH) but {root / 'train' / 'a' / '0.png'} is 6x6: set "
        "dataset.image_size=[H,W] to resize every image, or replace the file"
    )


@pytest.mark.parametrize(
    "make",
    [_missing, _a_file, _empty, _no_test_split, _unreadable, _unreadable_in_a_subfolder,
     _another_size_in_a_subfolder],
)  # fmt: skip
def test_image_folder_errors(tmp_path, make):
    root = tmp_path / "images"
    root.mkdir()
    path, message = make(root)
    refused = refusal(tmp_path, "dataset=image_folder", f"dataset.path={path}")
    if make in (_unreadable, _unreadable_in_a_subfolder):  # PIL's reason follows the path
        assert refused.startswith(message) and refused.endswith("remove or replace the file")
    else:
        assert refused == message


@pytest.mark.slow
def test_train_on_an_image_folder_reports_test_accuracy(tmp_path):
    """The digits written as PNGs (0..255, grayscale), trained through `dataset=image_folder`."""
    import mlflow
    import numpy as np
    from sklearn.datasets import load_digits

    digits = load_digits()
    root = tmp_path / "images"
    for i, (image, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        split = "test" if i % 5 == 0 else "train"
        path = root / split / f"digit{label}" / f"{i:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.rint(image * 255 / 16).astype(np.uint8), "L").save(path)
    uri = f"sqlite:///{tmp_path}/m.db"
    returned = convnets.train(
        [
            "dataset=image_folder",
            f"dataset.path={root}",
            "trainer.epochs=3",
            "trainer.verbose=0",
            f"tracking.uri={uri}",
        ],
        output_dir=tmp_path / "run",
    )
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(search_all_experiments=True)
    assert len(runs) == 1
    run = runs.iloc[0]
    assert run["run_id"] == returned.run_id
    assert run["tags.dataset"] == "image_folder"
    assert run["metrics.test_accuracy"] == returned.test_accuracy
    assert run["metrics.test_accuracy"] > 0.85  # 8x8 digits: ~0.97 after 3 epochs
