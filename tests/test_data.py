"""convnets.data: real digits, the TFDS code paths on mocked data, image folders, errors."""

import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import pytest
import tensorflow_datasets as tfds
from omegaconf import OmegaConf
from PIL import Image

from convnets import data
from convnets.config import DatasetConfig
from convnets.errors import DataError

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "dataset"
MNIST_ARCHIVES = [
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
]


def dataset_cfg(name, **overrides):
    """The shipped YAML, typed by the schema, with overrides (as Hydra would compose it)."""
    cfg = OmegaConf.merge(
        OmegaConf.structured(DatasetConfig), OmegaConf.load(CONFIGS / f"{name}.yaml")
    )
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value, merge=False)
    return cfg


def first_batch(ds):
    x, y = next(iter(ds))
    return x.numpy(), y.numpy()


def all_examples(ds):
    xs, ys = zip(*[(x.numpy(), y.numpy()) for x, y in ds], strict=True)
    return np.concatenate(xs), np.concatenate(ys)


# ---------------------------------------------------------------- digits (real data)


def test_digits_splits_add_up_and_are_disjoint_and_stratified():
    bundle = data.load_data(dataset_cfg("digits"), batch_size=64, seed=0)
    assert (bundle.num_train, bundle.num_val, bundle.num_test) == (1293, 144, 360)
    assert bundle.num_train + bundle.num_val + bundle.num_test == 1797
    assert bundle.input_shape == (8, 8, 1) and bundle.num_classes == 10
    assert bundle.class_names == [str(i) for i in range(10)]

    x_train, y_train = all_examples(bundle.train)
    x_val, y_val = all_examples(bundle.val)
    x_test, y_test = all_examples(bundle.test)
    assert (len(y_train), len(y_val), len(y_test)) == (1293, 144, 360)
    # The 1,797 images, as the pipelines yield them, are exactly sklearn's, each in one split.
    from sklearn.datasets import load_digits

    raw = load_digits().images
    pixels = np.concatenate([x_train, x_val, x_test])[..., 0]
    restored = pixels.astype(int)
    assert sorted(map(bytes, restored.astype(np.uint8))) == sorted(map(bytes, raw.astype(np.uint8)))
    train_keys = {
        (bytes(x.astype(np.float32)), int(y)) for x, y in zip(x_train, y_train, strict=True)
    }
    test_keys = {(bytes(x.astype(np.float32)), int(y)) for x, y in zip(x_test, y_test, strict=True)}
    assert len(train_keys & test_keys) <= 2  # digits has a few duplicate images, no more
    # Stratified: every class in every split, near its 10% share.
    for labels in (y_train, y_val, y_test):
        assert np.bincount(labels, minlength=10).min() >= 0.08 * len(labels)


def test_digits_raw_pixels_and_batching():
    """The pipelines yield the stored pixels as float32; the model normalises them."""
    bundle = data.load_data(dataset_cfg("digits"), batch_size=100, seed=0)
    x_train, _ = all_examples(bundle.train)
    assert x_train.dtype == np.float32 and bundle.pixel_dtype == "uint8"
    assert x_train.min() == 0 and x_train.max() == 16 and (x_train == np.rint(x_train)).all()
    assert (bundle.max_pixel_value, bundle.mean, bundle.std) == (16.0, (0.3053,), (0.376,))
    sizes = [int(x.shape[0]) for x, _ in bundle.train]
    assert sizes == [100] * 12 + [93]  # global batch, the remainder kept


def test_a_starving_last_batch_is_dropped_from_training_only():
    """digits' 1797 images, 360 for test and 10% of the rest for validation: 1293 train.
    Batches of 4 on 2 replicas leave a last batch of 1: training drops it, evaluation does
    not (inference needs no batch statistics), one device keeps it."""
    two = data.load_data(dataset_cfg("digits"), batch_size=4, seed=0, replicas=2)
    one = data.load_data(dataset_cfg("digits"), batch_size=4, seed=0)
    assert two.num_train == one.num_train and two.num_train % 4 == 1
    assert two.train_dropped_per_epoch == 1 and one.train_dropped_per_epoch == 0
    assert int(two.train.cardinality()) == two.num_train // 4
    assert int(one.train.cardinality()) == two.num_train // 4 + 1
    assert int(two.test.cardinality()) == int(one.test.cardinality())


def test_digits_splits_are_deterministic_and_follow_split_seed():
    test_a = all_examples(data.load_data(dataset_cfg("digits"), batch_size=512, seed=1).test)
    test_b = all_examples(data.load_data(dataset_cfg("digits"), batch_size=64, seed=2).test)
    np.testing.assert_array_equal(test_a[1], test_b[1])
    np.testing.assert_array_equal(test_a[0], test_b[0])
    other = data.load_data(dataset_cfg("digits", split_seed=7), batch_size=512, seed=1)
    assert not np.array_equal(all_examples(other.test)[0], test_a[0])


def test_val_fraction_zero_gives_no_val():
    bundle = data.load_data(dataset_cfg("digits", val_fraction=0.0), batch_size=64, seed=0)
    assert bundle.val is None and bundle.num_val == 0
    assert bundle.num_train == 1437 and bundle.num_test == 360
    assert set(bundle.digests) == {"train", "test"}  # no digest of a split that is not there


def test_train_reshuffles_each_epoch_and_deterministic_loads_match():
    cfg = dataset_cfg("digits")
    a = data.load_data(cfg, batch_size=32, seed=3, deterministic=True)
    b = data.load_data(cfg, batch_size=32, seed=3, deterministic=True)
    epoch1, epoch2 = first_batch(a.train), first_batch(a.train)
    assert not np.array_equal(epoch1[1], epoch2[1])  # a new order each epoch
    for mine, theirs in zip(
        (epoch1, epoch2), (first_batch(b.train), first_batch(b.train)), strict=True
    ):
        np.testing.assert_array_equal(mine[0], theirs[0])
        np.testing.assert_array_equal(mine[1], theirs[1])
    other_seed = data.load_data(cfg, batch_size=32, seed=4, deterministic=True)
    assert not np.array_equal(first_batch(other_seed.train)[1], epoch1[1])


def test_plain_dict_config_is_accepted():
    bundle = data.load_data(
        {"name": "digits", "source": "sklearn", "max_pixel_value": 16.0, "val_fraction": 0.0},
        batch_size=64,
        seed=0,
    )
    assert bundle.num_train == 1437 and bundle.input_shape == (8, 8, 1)


def test_dataset_shape_from_config():
    assert data.dataset_shape(dataset_cfg("digits")) == ((8, 8, 1), 10)
    assert data.dataset_shape(dataset_cfg("mnist")) == ((28, 28, 1), 10)
    assert data.dataset_shape(dataset_cfg("cifar100")) == ((32, 32, 3), 100)


# ---------------------------------------------------------------- TFDS code paths (mocked)


def test_mnist_through_tfds_mock():
    with tfds.testing.mock_data(num_examples=100):
        bundle = data.load_data(dataset_cfg("mnist"), batch_size=16, seed=0)
        x, y = first_batch(bundle.train)
        x_test, _ = all_examples(bundle.test)
    assert (bundle.num_train, bundle.num_val, bundle.num_test) == (90, 10, 100)
    assert x.shape == (16, 28, 28, 1) and x.dtype == np.float32 and y.shape == (16,)
    assert bundle.input_shape == (28, 28, 1) and bundle.num_classes == 10
    assert ((y >= 0) & (y < 10)).all()
    # The stored uint8 pixels, not normalised (the model applies MNIST's constants).
    np.testing.assert_array_equal(x_test, np.rint(x_test))
    assert x_test.min() >= 0 and x_test.max() <= 255 and bundle.pixel_dtype == "uint8"


def _aug_matches(augmented, original, pad, fill):
    """Is ``augmented`` a pad-and-crop (and maybe a flip) of ``original``?"""
    h, w, _ = original.shape
    padded = np.pad(original, [(pad, pad), (pad, pad), (0, 0)], constant_values=0)
    padded = np.where(
        np.pad(np.ones((h, w, 1), bool), [(pad, pad), (pad, pad), (0, 0)]), padded, fill
    )
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            crop = padded[dy : dy + h, dx : dx + w]
            if np.allclose(crop, augmented, atol=1e-5) or np.allclose(
                crop[:, ::-1], augmented, atol=1e-5
            ):
                return True
    return False


def test_cifar10_augmentation_changes_images_not_shapes_or_labels():
    with tfds.testing.mock_data(num_examples=64):
        plain_cfg = dataset_cfg("cifar10")
        plain_cfg.augment.random_crop_padding = 0
        plain_cfg.augment.horizontal_flip = False
        aug = data.load_data(dataset_cfg("cifar10"), batch_size=64, seed=5, deterministic=True)
        plain = data.load_data(plain_cfg, batch_size=64, seed=5, deterministic=True)
        x_aug, y_aug = first_batch(aug.train)
        x_aug2, _ = first_batch(aug.train)
        x_plain, y_plain = first_batch(plain.train)
    assert x_aug.shape == x_plain.shape == (57, 32, 32, 3)  # 64 minus 10% val
    np.testing.assert_array_equal(y_aug, y_plain)  # same seeded order: augmentation keeps labels
    assert not np.allclose(x_aug, x_plain)
    fill = 0.0  # zero padding of the raw pixels
    for augmented, original in zip(x_aug, x_plain, strict=True):
        assert _aug_matches(augmented, original, pad=4, fill=fill)
    # A new epoch draws new crops and flips (and a new order).
    assert not np.allclose(x_aug, x_aug2)
    # Evaluation pipelines are never augmented.
    np.testing.assert_array_equal(first_batch(aug.test)[0], first_batch(plain.test)[0])


def test_cifar10_deterministic_loads_give_identical_batches():
    with tfds.testing.mock_data(num_examples=40):
        a = data.load_data(dataset_cfg("cifar10"), batch_size=8, seed=9, deterministic=True)
        b = data.load_data(dataset_cfg("cifar10"), batch_size=8, seed=9, deterministic=True)
        xa, ya = first_batch(a.train)
        xb, yb = first_batch(b.train)
    np.testing.assert_array_equal(xa, xb)
    np.testing.assert_array_equal(ya, yb)


# ---------------------------------------------------------------- image folder


def write_folder(root, *, mode, size, counts, splits=("train", "test")):
    """PNG images with one known colour per (class, index); returns {split: [(label, value)]}."""
    written = {}
    for split in splits:
        written[split] = []
        for label, count in counts.items():
            (root / split / label).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                value = (40 * (ord(label[0]) - ord("a")) + 3 * i + (split == "test")) % 256
                Image.new(mode, size, value if mode == "L" else (value, 255 - value, 7)).save(
                    root / split / label / f"{i:03d}.png"
                )
                written[split].append((label, value))
    return written


def test_image_folder_grayscale_keeps_one_channel_and_sorts_labels(tmp_path):
    written = write_folder(tmp_path, mode="L", size=(12, 10), counts={"cat": 6, "ant": 5, "bee": 4})
    cfg = dataset_cfg("image_folder", path=str(tmp_path), val_fraction=0.0)
    data.check_available(cfg)
    assert data.dataset_shape(cfg) == ((10, 12, 1), 3)
    bundle = data.load_data(cfg, batch_size=4, seed=0)
    assert bundle.class_names == ["ant", "bee", "cat"]
    assert bundle.input_shape == (10, 12, 1) and bundle.num_classes == 3
    assert (bundle.num_train, bundle.num_test) == (15, 15)
    x_test, y_test = all_examples(bundle.test)
    # Fixed order: by label, then file name; labels are the indices of the sorted names.
    expected = sorted(written["test"], key=lambda lv: lv[0])
    assert [bundle.class_names[i] for i in y_test] == [label for label, _ in expected]
    pixels = x_test
    np.testing.assert_allclose(pixels[:, 0, 0, 0], [v for _, v in expected], atol=1e-3)


def test_image_folder_rgb_and_resize(tmp_path):
    write_folder(tmp_path, mode="RGB", size=(9, 7), counts={"x": 10, "y": 10})
    cfg = dataset_cfg("image_folder", path=str(tmp_path), val_fraction=0.2)
    bundle = data.load_data(cfg, batch_size=8, seed=0)
    assert bundle.input_shape == (7, 9, 3) and len(bundle.mean) == 3
    assert (bundle.num_train, bundle.num_val, bundle.num_test) == (16, 4, 20)
    _, y_val = all_examples(bundle.val)
    assert sorted(y_val.tolist()) == [0, 0, 1, 1]  # stratified
    resized_cfg = dataset_cfg("image_folder", path=str(tmp_path), image_size=[16, 20])
    assert data.dataset_shape(resized_cfg) == ((16, 20, 3), 2)
    resized = data.load_data(resized_cfg, batch_size=8, seed=0)
    x, _ = first_batch(resized.train)
    assert resized.input_shape == (16, 20, 3) and x.shape[1:] == (16, 20, 3)
    # A flat colour stays that colour when resized.
    pixels = x
    assert resized.pixel_dtype == "float32"  # resizing interpolates
    np.testing.assert_allclose(pixels[:, 0, 0, 1] + pixels[:, 0, 0, 0], 255, atol=1e-2)


# ---------------------------------------------------------------- check_available errors


@pytest.fixture
def offline(monkeypatch):
    """The TFDS download hosts unreachable, whatever this machine's network: the hosts asked."""
    asked = []

    def unreachable(host):
        asked.append(host)
        return False

    monkeypatch.setattr(data, "_reachable", unreachable)
    return asked


def test_tfds_not_prepared_offline_fails_with_the_fix(tmp_path, offline):
    cfg = dataset_cfg("mnist", data_dir=str(tmp_path))
    with pytest.raises(DataError) as err:
        data.check_available(cfg)
    assert offline == ["storage.googleapis.com"]
    manual = tmp_path / "downloads" / "manual"
    assert str(err.value) == (
        f"dataset mnist: TFDS mnist 3.0.1 is not prepared in data dir {tmp_path} and "
        "storage.googleapis.com cannot be reached to download it: copy a prepared TFDS "
        f"directory to {tmp_path}/mnist/3.0.1, or put the original archives "
        f"({', '.join(MNIST_ARCHIVES)}) in {manual}/, "
        "or use dataset=image_folder dataset.path=<your images>"
    )
    assert list(tmp_path.iterdir()) == []  # nothing left behind


def test_tfds_not_prepared_online_is_left_to_tfds(tmp_path, monkeypatch):
    """Reachable hosts: check_available passes (load_data would download), nothing written."""
    monkeypatch.setattr(data, "_reachable", lambda host: True)
    data.check_available(dataset_cfg("mnist", data_dir=str(tmp_path)))
    assert list(tmp_path.iterdir()) == []


def test_reachable_is_false_for_a_host_that_does_not_resolve():
    assert data._reachable("no-such-host.invalid") is False  # RFC 2606: never resolves


def test_tfds_download_false_skips_the_network(tmp_path, offline):
    cfg = dataset_cfg("cifar10", data_dir=str(tmp_path), download=False)
    with pytest.raises(
        DataError, match=r"cifar10 .* and dataset.download=false: .*cifar-10-binary"
    ):
        data.check_available(cfg)
    assert offline == []  # not even probed


def test_tfds_manual_archives_are_accepted_and_their_checksums_checked(tmp_path):
    manual = tmp_path / "downloads" / "manual"
    manual.mkdir(parents=True)
    for name in MNIST_ARCHIVES[:-1]:
        (manual / name).write_bytes(b"not an archive")
    cfg = dataset_cfg("mnist", data_dir=str(tmp_path), download=False)
    with pytest.raises(DataError, match="not prepared"):
        data.check_available(cfg)  # one archive missing
    (manual / MNIST_ARCHIVES[-1]).write_bytes(b"not an archive")
    data.check_available(cfg)
    with pytest.raises(DataError, match=r"could not prepare mnist .*wrong checksum"):
        data.load_data(cfg, batch_size=8, seed=0)


def test_image_folder_missing(tmp_path):
    cfg = dataset_cfg("image_folder", path=str(tmp_path / "nope"))
    message = (
        f"dataset.path={tmp_path / 'nope'}: no such folder; point it at the image folder "
        "holding train/ and test/"
    )
    with pytest.raises(DataError) as err:
        data.check_available(cfg)
    assert str(err.value) == message
    with pytest.raises(DataError) as err:
        data.dataset_shape(cfg)
    assert str(err.value) == message


def test_image_folder_path_unset():
    with pytest.raises(DataError, match=r"dataset.path is not set"):
        data.check_available(dataset_cfg("image_folder"))


def test_image_folder_empty(tmp_path):
    with pytest.raises(DataError) as err:
        data.check_available(dataset_cfg("image_folder", path=str(tmp_path)))
    assert str(err.value) == (
        f"image folder {tmp_path} is empty: lay it out as {tmp_path}/{{train,test}}/<label>/<image file>"
    )


def test_image_folder_split_without_images(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    (tmp_path / "test" / "a").mkdir(parents=True)
    with pytest.raises(DataError) as err:
        data.check_available(dataset_cfg("image_folder", path=str(tmp_path)))
    assert str(err.value) == f"image folder {tmp_path / 'train'} has no images (png/jpg/bmp/gif)"


def test_image_folder_missing_split(tmp_path):
    write_folder(tmp_path, mode="L", size=(4, 4), counts={"a": 2}, splits=("train",))
    with pytest.raises(DataError) as err:
        data.check_available(dataset_cfg("image_folder", path=str(tmp_path)))
    assert str(err.value) == (
        f"image folder {tmp_path} has no test/ folder: lay it out as "
        f"{tmp_path}/{{train,test}}/<label>/<image file>"
    )


def test_image_folder_label_mismatch(tmp_path):
    write_folder(tmp_path, mode="L", size=(4, 4), counts={"a": 2, "b": 2}, splits=("train",))
    write_folder(tmp_path, mode="L", size=(4, 4), counts={"a": 2}, splits=("test",))
    with pytest.raises(
        DataError,
        match=r"^dataset.path=.*: test/ has the label folders \['a'\] but "
        r"train/ has \['a', 'b'\]; give both splits",
    ):
        data.check_available(dataset_cfg("image_folder", path=str(tmp_path)))


def test_image_folder_mixing_grayscale_and_colour_is_refused(tmp_path):
    """The first image sets the model's channels: a grayscale one first trained a folder of
    colour images as grayscale, without a word."""
    write_folder(tmp_path, mode="RGB", size=(4, 4), counts={"a": 2, "b": 2})
    grey = tmp_path / "train" / "a" / "000.png"
    Image.open(grey).convert("L").save(grey)
    with pytest.raises(DataError) as err:
        data.check_available(dataset_cfg("image_folder", path=str(tmp_path)))
    assert str(err.value) == (
        f"image {tmp_path / 'train' / 'a' / '001.png'} is colour but {grey} is grayscale: every "
        "image of dataset.path needs the same kind (the first sets the model's channels); "
        "convert the grayscale ones to RGB, or replace the file"
    )


def test_image_folder_unreadable_image(tmp_path):
    write_folder(tmp_path, mode="L", size=(4, 4), counts={"a": 2, "b": 2})
    bad = tmp_path / "test" / "b" / "zzz.png"
    bad.write_bytes(b"this is not a png")
    with pytest.raises(DataError) as err:
        data.check_available(dataset_cfg("image_folder", path=str(tmp_path)))
    assert str(err.value).startswith(f"cannot read image {bad}: ")
    assert str(err.value).endswith("; remove or replace the file")
    assert "\n" not in str(err.value)


def test_an_image_whose_header_reads_but_pixels_do_not_is_named(tmp_path):
    """A JPEG whose data ends in zeros passes the check's header read (``verify``) and fails
    in Keras's reader, whose message named neither the file nor anything a user can act on."""
    import io

    cfg = OmegaConf.merge(
        OmegaConf.structured(DatasetConfig),
        {
            "name": "image_folder",
            "source": "image_folder",
            "path": str(tmp_path),
            "input_shape": None,
        },
    )
    for split in ("train", "test"):
        for label in ("a", "b"):
            (tmp_path / split / label).mkdir(parents=True)
            for i in range(3):
                Image.new("L", (8, 8), 40 * i).save(tmp_path / split / label / f"{i}.jpg")
    buffer = io.BytesIO()
    Image.effect_noise((8, 8), 50).convert("L").save(buffer, "JPEG")
    jpeg = buffer.getvalue()
    cut = tmp_path / "train" / "a" / "9.jpg"
    cut.write_bytes(jpeg[:-40] + bytes(38) + jpeg[-2:])  # its end-of-image marker kept
    data.check_available(cfg)  # the header reads
    with pytest.raises(DataError, match=rf"cannot decode image {cut} \(.*\): its header reads"):
        data.load_data(cfg, batch_size=4, seed=0)
