"""Datasets (bundled digits, TFDS, the user's image folder) -> batched ``tf.data`` pipelines.

Every source is read and decoded once into in-memory arrays (uint8 pixels, int labels): the
datasets this project targets (MNIST-style, CIFAR, a user's folder of small images) fit in
memory, and arrays make the splits exact and seeded (stratified by label, with
``dataset.split_seed``) for every source alike. ``from_tensor_slices`` over those arrays *is* the
cache: a ``.cache()`` after it would only copy them. The pipelines over them are built by
:mod:`convnets.pipeline`.

The pipelines yield the pixels as stored (digits 0..16, uint8 0..255; float when resized), not
normalised: the normalisation ``(x / max_pixel_value - mean) / std`` is the model's first layer
(:class:`convnets.model.PixelScaling`), so a logged model takes the stored images as they are.
Resizing (``dataset.image_size``) stays here: a batch tensor needs one size anyway, and the
model's input is the size it trains on.

``check_available`` is the cheap guard to call before anything else: TFDS retries a download
for minutes when the machine is offline, so preparedness is checked first and the user is told
how to prepare the data offline. This module imports TensorFlow only where it reads TFDS or
decodes an image folder (never for the checks of the bundled digits or a folder's layout), so
a job refuses bad data before TensorFlow loads.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import numpy as np
from omegaconf import DictConfig, OmegaConf

from convnets.config import DatasetConfig
from convnets.errors import ConfigError, DataError

if TYPE_CHECKING:
    import tensorflow as tf

SPLITS = ("train", "test")  # image_folder's required split folders
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif")  # what Keras's folder reader accepts
GRAYSCALE_MODES = ("1", "L", "LA", "I", "I;16", "F")  # PIL modes kept as one channel
PROBE_TIMEOUT_S = 3.0  # bound on the "is the TFDS download host reachable" check


@dataclass
class DataBundle:
    """Batched pipelines plus what a model, a trainer and the figures need to know about them."""

    train: tf.data.Dataset  # one epoch: shuffled (seeded, new order each epoch), augmented
    val: tf.data.Dataset | None  # None when val_fraction == 0
    test: tf.data.Dataset  # fixed order
    input_shape: tuple[int, int, int]
    num_classes: int
    class_names: list[str]
    num_train: int
    # Training images left out of each epoch (a different few each epoch): the last, smaller
    # batch when it would leave a replica with none (convnets.pipeline); 0 on one device.
    train_dropped_per_epoch: int
    num_val: int
    num_test: int
    # Per channel: x_norm = (x / max_pixel_value - mean) / std, applied by the model.
    mean: tuple[float, ...]
    std: tuple[float, ...]
    max_pixel_value: float
    pixel_dtype: str  # how the images are stored: uint8, or float32 when resized
    # sha256 of each split's images as stored (before normalisation) and labels: "train",
    # "validation", "test". A reproduce on another machine compares them with the original's.
    digests: dict[str, str] = field(default_factory=dict)


@dataclass
class _Splits:
    """Decoded images (NHWC, uint8 or float32 in [0, max_pixel_value]) and int labels per split."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: list[str]


# ---------------------------------------------------------------- public API


def dataset_shape(cfg: Any) -> tuple[tuple[int, int, int], int]:
    """``(input_shape, num_classes)`` without loading the data (image_folder: one image read)."""
    cfg = _as_config(cfg)
    if cfg.source == "image_folder":
        root = _folder_root(cfg)
        train_dir = _split_dir(root, "train")
        labels = _label_dirs(train_dir)
        first = next((f for label in labels for f in _image_files(train_dir / label)), None)
        if first is None:
            raise DataError(f"image folder {train_dir} has no images (png/jpg/bmp/gif)")
        height, width, channels = _image_shape(first)
        if cfg.image_size is not None:
            height, width = _image_size(cfg)
        num_classes = cfg.num_classes if cfg.num_classes is not None else len(labels)
        return (height, width, channels), int(num_classes)
    if cfg.input_shape is None or cfg.num_classes is None:
        raise ConfigError(
            f"dataset {cfg.name}: set dataset.input_shape=[H,W,C] and dataset.num_classes "
            "in its config (only source=image_folder reads them from the data)"
        )
    height, width, channels = (int(v) for v in cfg.input_shape)
    return (height, width, channels), int(cfg.num_classes)


def check_available(cfg: Any) -> int | None:
    """Raise :class:`DataError` within seconds, touching nothing, if the dataset is not usable.

    Where the labels are known without decoding (digits, an image folder's layout), this also
    refuses data that cannot train a classifier (see :func:`check_splits`) and returns the
    number of training images once validation is held out; ``None`` where that is not known
    before reading the data (TFDS).
    """
    cfg = _as_config(cfg)
    if cfg.source == "sklearn":
        arrays = _load_digits(cfg)  # bundled with scikit-learn; a tenth of a second
        train_idx, _ = check_splits(cfg, arrays.y_train, arrays.y_test, arrays.class_names)
        return len(train_idx)
    if cfg.source == "image_folder":
        return _check_image_folder(cfg)
    _check_tfds(cfg)
    return None


def load_data(
    cfg: Any, *, batch_size: int, seed: int, deterministic: bool = False, replicas: int = 1
) -> DataBundle:
    """Read the dataset, split off validation, and build the three batched pipelines.

    ``batch_size`` is the global batch, split over ``replicas``. ``seed`` drives the shuffle
    order and the augmentation (``dataset.split_seed`` alone decides which examples go to
    val/test). Call
    :func:`check_available` first: an unprepared TFDS dataset would otherwise be downloaded.
    """
    cfg = _as_config(cfg)
    loaders = {"sklearn": _load_digits, "tfds": _load_tfds, "image_folder": _load_image_folder}
    arrays = loaders[cfg.source](cfg)

    input_shape = tuple(int(v) for v in arrays.x_train.shape[1:])
    num_classes = len(arrays.class_names)
    if cfg.num_classes is not None and cfg.num_classes != num_classes:
        raise DataError(
            f"dataset {cfg.name}: the data has {num_classes} classes but "
            f"dataset.num_classes={cfg.num_classes}: fix or null the key"
        )
    if cfg.input_shape is not None and list(cfg.input_shape) != list(input_shape):
        raise DataError(
            f"dataset {cfg.name}: the images are {list(input_shape)} but "
            f"dataset.input_shape={list(cfg.input_shape)}: fix or null the key"
        )
    mean, std = _channel_stats(cfg, input_shape[-1])

    from convnets.pipeline import (
        Pipeline,
        evaluation_batch_size,
        last_batch_leaves_a_replica_empty,
    )

    train_idx, val_idx = check_splits(cfg, arrays.y_train, arrays.y_test, arrays.class_names)
    pipe = Pipeline(cfg.augment, cfg.shuffle_buffer, batch_size, seed, deterministic)

    def evaluation(split: str, x: np.ndarray, y: np.ndarray) -> tf.data.Dataset:
        size = evaluation_batch_size(len(y), batch_size, replicas)
        if size is None:
            raise DataError(
                f"dataset {cfg.name}: its {split} split has {len(y)} images, too few to give "
                f"each of {replicas} replicas one in its last batch; use fewer replicas, or "
                "a larger split (dataset.val_fraction, dataset.test_fraction)"
            )
        return pipe.evaluation(x, y, size)

    x_train, y_train = arrays.x_train[train_idx], arrays.y_train[train_idx]
    x_val, y_val = arrays.x_train[val_idx], arrays.y_train[val_idx]
    val = evaluation("validation", x_val, y_val) if len(val_idx) else None
    drop_last = last_batch_leaves_a_replica_empty(len(train_idx), batch_size, replicas)
    return DataBundle(
        train=pipe.training(x_train, y_train, drop_last=drop_last),
        train_dropped_per_epoch=len(train_idx) % batch_size if drop_last else 0,
        val=val,
        test=evaluation("test", arrays.x_test, arrays.y_test),
        input_shape=input_shape,  # type: ignore[arg-type]
        num_classes=num_classes,
        class_names=list(arrays.class_names),
        num_train=len(train_idx),
        num_val=len(val_idx),
        num_test=len(arrays.y_test),
        mean=mean,
        std=std,
        max_pixel_value=float(cfg.max_pixel_value),
        pixel_dtype=arrays.x_test.dtype.name,
        digests={  # a split that is empty (dataset.val_fraction=0) has nothing to digest
            split: content_digest(images, labels)
            for split, images, labels in (
                ("train", x_train, y_train),
                ("validation", x_val, y_val),
                ("test", arrays.x_test, arrays.y_test),
            )
            if len(labels)
        },
    )


def check_splits(
    cfg: Any, y_train: np.ndarray, y_test: np.ndarray, class_names: list[str]
) -> tuple[np.ndarray, np.ndarray]:
    """The (train, validation) indices of ``y_train``, or a :class:`DataError` when the data
    cannot train a classifier: fewer than 2 classes, an empty test split, or a class left
    without a training example once validation is held out."""
    cfg = _as_config(cfg)
    if len(class_names) < 2:
        raise DataError(
            f"dataset {cfg.name} has {len(class_names)} class ({', '.join(class_names)}): a "
            "classifier needs at least 2; add a folder per label"
        )
    if len(y_test) == 0:
        raise DataError(f"dataset {cfg.name}: the test split is empty; add test images")
    if cfg.get("source") == "sklearn" and len(y_train) < len(class_names):  # digits only
        raise DataError(
            f"dataset.test_fraction={cfg.test_fraction:g} leaves {len(y_train)} training "
            f"examples for {len(class_names)} classes; lower dataset.test_fraction"
        )
    train_idx, val_idx = split_indices(
        y_train, cfg.val_fraction, cfg.split_seed, "dataset.val_fraction"
    )
    missing = sorted(set(range(len(class_names))) - set(y_train[train_idx].tolist()))
    if missing:
        names = ", ".join(class_names[i] for i in missing[:5]) + (
            ", ..." if len(missing) > 5 else ""
        )
        raise DataError(
            f"dataset {cfg.name}: {len(missing)} class(es) ({names}) have no training example "
            f"once dataset.val_fraction={cfg.val_fraction} is held out; lower "
            "dataset.val_fraction or add training images"
        )
    return train_idx, val_idx


def content_digest(images: np.ndarray, labels: np.ndarray) -> str:
    """sha256 of one split as stored: pixel dtype, shape and bytes, then the int32 labels."""
    digest = hashlib.sha256(f"{images.dtype.str}{images.shape}".encode())
    digest.update(np.ascontiguousarray(images).tobytes())
    digest.update(np.ascontiguousarray(labels, dtype="<i4").tobytes())
    return digest.hexdigest()


def data_source(cfg: Any) -> str:
    """Where the data is read from, as a URI (recorded with the run's dataset inputs)."""
    cfg = _as_config(cfg)
    if cfg.source == "image_folder":
        return Path(os.path.expanduser(cfg.path)).resolve().as_uri()
    if cfg.source == "tfds":
        return f"tfds:{cfg.tfds_name or cfg.name}"
    return "sklearn:load_digits"


def split_indices(
    labels: np.ndarray, fraction: float, seed: int, key: str
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of ``range(len(labels))`` into (kept, held out), each sorted; ``key``
    (``dataset.test_fraction``) is the setting a split that cannot be made names.

    Stratified by label (sklearn) whenever every class can appear on both sides; a plain seeded
    split otherwise (tiny data). The held-out part has ``ceil(fraction * n)`` examples.
    """
    from sklearn.model_selection import train_test_split

    index = np.arange(len(labels))
    if fraction == 0.0:
        return index, index[:0]
    counts = np.bincount(labels)
    counts = counts[counts > 0]
    n_out = int(np.ceil(fraction * len(labels)))
    can_stratify = counts.min() >= 2 and len(counts) <= n_out <= len(labels) - len(counts)
    try:
        kept, held = train_test_split(
            index,
            test_size=fraction,
            random_state=seed,
            stratify=labels if can_stratify else None,
        )
    except ValueError:  # too few examples for the fraction: one side would be empty
        raise DataError(
            f"{key}={fraction:g} cannot split {len(labels)} examples (it holds out {n_out}, "
            f"leaving {len(labels) - n_out}; each side needs at least one): lower {key} or "
            "add images"
        ) from None
    return np.sort(kept), np.sort(held)


# ---------------------------------------------------------------- config


def _as_config(cfg: Any) -> DictConfig:
    """The ``dataset`` node, typed; a plain dict is merged onto the schema's defaults."""
    if isinstance(cfg, DictConfig):
        return cfg
    if isinstance(cfg, Mapping):
        return OmegaConf.merge(OmegaConf.structured(DatasetConfig), dict(cfg))  # type: ignore[return-value]
    raise TypeError(f"expected the dataset config (DictConfig or dict), got {type(cfg).__name__}")


def _channel_stats(cfg: DictConfig, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    from convnets.checks import check_channel_stats

    check_channel_stats(cfg, channels)  # image folders: the channels are known from the files
    stats = []
    for key in ("mean", "std"):
        values = [float(v) for v in cfg[key]]
        stats.append(tuple(values * channels if len(values) == 1 else values))
    return stats[0], stats[1]


def _image_size(cfg: DictConfig) -> tuple[int, int]:
    size = list(cfg.image_size)  # [H, W], positive: checked in the config
    return int(size[0]), int(size[1])


# ---------------------------------------------------------------- digits (scikit-learn)


def _load_digits(cfg: DictConfig) -> _Splits:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits.images.astype(np.uint8)[..., np.newaxis]  # 0..16, exact
    labels = digits.target.astype(np.int32)
    train_idx, test_idx = split_indices(
        labels, cfg.test_fraction, cfg.split_seed, "dataset.test_fraction"
    )
    return _Splits(
        x_train=images[train_idx],
        y_train=labels[train_idx],
        x_test=images[test_idx],
        y_test=labels[test_idx],
        class_names=[str(name) for name in digits.target_names],
    )


# ---------------------------------------------------------------- TFDS


def _tfds_builder(cfg: DictConfig):
    import tensorflow_datasets as tfds

    name = cfg.tfds_name or cfg.name
    data_dir = os.path.expanduser(cfg.data_dir) if cfg.data_dir else None
    try:
        return tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise ConfigError(
            f"dataset.tfds_name={name!r} is not a TFDS dataset: see `tfds.list_builders()`"
        ) from None


def _manual_dir(builder) -> Path:
    """Where TFDS's download manager looks for archives before downloading them."""
    return Path(builder.data_dir_root) / "downloads" / "manual"


def _check_tfds(cfg: DictConfig) -> None:
    builder = _tfds_builder(cfg)
    if builder.is_prepared():
        return
    files = sorted({info.filename or Path(urlparse(url).path).name for url, info in _urls(builder)})
    manual = _manual_dir(builder)
    if files and all((manual / f).is_file() for f in files):
        return  # load_data builds it offline from the archives (TFDS checks their checksums)
    hosts = sorted({urlparse(url).hostname or "" for url, _ in _urls(builder)})
    if cfg.download and hosts and all(_reachable(host) for host in hosts):
        return  # online: load_data lets TFDS download and prepare it
    if cfg.download:
        reason = f"{', '.join(hosts) or 'its download host'} cannot be reached to download it"
    else:
        reason = "dataset.download=false"
    archives = f"the original archives ({', '.join(files)})" if files else "the original archives"
    raise DataError(
        f"dataset {cfg.name}: TFDS {builder.name} {builder.version} is not prepared in "
        f"data dir {builder.data_dir_root} and {reason}: copy a prepared TFDS directory to "
        f"{builder.data_dir}, or put {archives} in {manual}/, "
        "or use dataset=image_folder dataset.path=<your images>"
    )


def _urls(builder) -> list[tuple[str, Any]]:
    try:
        return list((builder.url_infos or {}).items())
    except Exception:  # builders without a checksums file have no known URLs
        return []


def _reachable(host: str) -> bool:
    """Can a TCP connection to ``host``:443 open within PROBE_TIMEOUT_S (DNS included)?

    Runs in a daemon thread because name resolution ignores socket timeouts.
    """
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, 443), timeout=PROBE_TIMEOUT_S):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(PROBE_TIMEOUT_S)
    return bool(result and result[0])


def _load_tfds(cfg: DictConfig) -> _Splits:
    import tensorflow_datasets as tfds

    builder = _tfds_builder(cfg)
    if not builder.is_prepared():
        try:  # from <data_dir>/downloads/manual/ or the network; check_available said which
            builder.download_and_prepare()
        except Exception as err:
            first_line = (str(err).strip().splitlines() or [repr(err)])[0]
            raise DataError(
                f"dataset {cfg.name}: TFDS could not prepare {builder.name} in "
                f"{builder.data_dir_root} ({first_line}): replace the files in "
                f"{_manual_dir(builder)}/ with the original archives, or copy a prepared "
                f"TFDS directory to {builder.data_dir}"
            ) from None
    image_key, label_key = builder.info.supervised_keys
    splits = []
    for split in SPLITS:
        ds = builder.as_dataset(split=split, as_supervised=True, shuffle_files=False)
        batches = list(tfds.as_numpy(ds.batch(8192)))
        splits.append(
            (np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches]))
        )
    (x_train, y_train), (x_test, y_test) = splits
    names = builder.info.features[label_key].names
    return _Splits(x_train, y_train.astype(np.int32), x_test, y_test.astype(np.int32), names)


# ---------------------------------------------------------------- image folder


def _folder_root(cfg: DictConfig) -> Path:
    if not cfg.path:
        raise DataError(
            "dataset.path is not set: point it at <path>/{train,test}/<label>/<image file>"
        )
    root = Path(os.path.expanduser(cfg.path))
    if root.exists() and not root.is_dir():
        raise DataError(
            f"dataset.path={root} is a file, not a folder: point it at the image folder "
            "holding train/ and test/"
        )
    if not root.is_dir():
        raise DataError(
            f"dataset.path={root}: no such folder; point it at the image folder holding "
            "train/ and test/"
        )
    if not any(root.iterdir()):
        raise DataError(
            f"image folder {root} is empty: lay it out as {root}/{{train,test}}/<label>/<image file>"
        )
    return root


def _split_dir(root: Path, split: str) -> Path:
    folder = root / split
    if not folder.is_dir():
        raise DataError(
            f"image folder {root} has no {split}/ folder: lay it out as "
            f"{root}/{{train,test}}/<label>/<image file>"
        )
    return folder


def _label_dirs(split_dir: Path) -> list[str]:
    labels = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    if not labels:
        raise DataError(
            f"image folder {split_dir} is empty: put one folder per label in it, "
            f"{split_dir}/<label>/<image file>"
        )
    return labels


def _image_files(label_dir: Path) -> list[Path]:
    """The images of one label, in its subfolders too: Keras's folder reader walks them all
    (``os.walk``, not following links), so they are checked as the ones beside them."""
    return sorted(
        Path(root) / name
        for root, _, names in os.walk(label_dir)
        for name in names
        if Path(name).suffix.lower() in IMAGE_SUFFIXES
    )


def _image_shape(path: Path) -> tuple[int, int, int]:
    """(H, W, C) of one image, C = 1 for grayscale (kept as one channel) and 3 otherwise."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            width, height = image.size
            mode = image.mode
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read image {path}: {err}; remove or replace the file") from None
    return height, width, 1 if mode in GRAYSCALE_MODES else 3


def _check_image_folder(cfg: DictConfig) -> int:
    from PIL import Image

    root = _folder_root(cfg)
    train_labels = None
    # The first image: without image_size all share its size, and all are grayscale or all
    # colour, as it is (it sets the model's channels).
    first: tuple[Path, tuple[int, int], bool] | None = None
    labels_of: dict[str, np.ndarray] = {}
    for split in SPLITS:
        folder = _split_dir(root, split)
        labels = _label_dirs(folder)
        if train_labels is None:
            train_labels = labels
        elif labels != train_labels:
            raise DataError(
                f"dataset.path={root}: {folder.name}/ has the label folders {labels} but "
                f"train/ has {train_labels}; give both splits the same label folders (an "
                "empty one is fine)"
            )
        per_label = [_image_files(folder / label) for label in labels]
        files = [f for label_files in per_label for f in label_files]
        if not files:
            raise DataError(f"image folder {folder} has no images (png/jpg/bmp/gif)")
        labels_of[split] = np.repeat(np.arange(len(labels)), [len(f) for f in per_label])
        for path in files:
            try:
                with Image.open(path) as image:
                    size, grey = image.size, image.mode in GRAYSCALE_MODES
                    image.verify()  # header and integrity, without a full decode
            except Exception as err:
                raise DataError(
                    f"cannot read image {path}: {err}; remove or replace the file"
                ) from None
            first = first or (path, size, grey)
            if grey != first[2]:  # the channels come from the first: colour would be lost
                kinds = ("grayscale", "colour") if grey else ("colour", "grayscale")
                raise DataError(
                    f"image {path} is {kinds[0]} but {first[0]} is {kinds[1]}: every image of "
                    "dataset.path needs the same kind (the first sets the model's channels); "
                    "convert the grayscale ones to RGB, or replace the file"
                )
            if cfg.image_size is None and size != first[1]:
                raise DataError(
                    f"image {path} is {size[0]}x{size[1]} (WxH) but {first[0]} is "
                    f"{first[1][0]}x{first[1][1]}: set dataset.image_size=[H,W] to resize "
                    "every image, or replace the file"
                )
    train_idx, _ = check_splits(cfg, labels_of["train"], labels_of["test"], train_labels)
    if cfg.image_size is not None:
        _image_size(cfg)
    return len(train_idx)


def _first_undecodable(files: list[Path]) -> Path | None:
    """The first file whose pixels do not decode (``verify`` reads headers only); a failure's
    path only, so decoding every file again costs nothing otherwise."""
    from PIL import Image

    for path in files:
        try:
            with Image.open(path) as image:
                image.load()
        except Exception:  # noqa: BLE001 - any decoder's error: this is the file
            return path
    return None


def _load_image_folder(cfg: DictConfig) -> _Splits:
    """Decode every image once with Keras's folder reader (labels = sorted folder names)."""
    import keras
    import tensorflow as tf

    root = _folder_root(cfg)
    (height, width, channels), _ = dataset_shape(cfg)
    class_names = _label_dirs(_split_dir(root, "train"))
    arrays = []
    for split in SPLITS:
        ds = keras.utils.image_dataset_from_directory(
            _split_dir(root, split),
            labels="inferred",
            label_mode="int",
            class_names=class_names,
            color_mode="grayscale" if channels == 1 else "rgb",
            batch_size=256,
            image_size=(height, width),  # the first image's size unless dataset.image_size
            shuffle=False,
            verbose=False,
        )
        try:
            batches = list(ds.as_numpy_iterator())
        except tf.errors.OpError as err:
            folder = _split_dir(root, split)
            files = [f for label in class_names for f in _image_files(folder / label)]
            culprit = _first_undecodable(files)
            where = f"image {culprit}" if culprit else f"an image under {folder}"
            # TensorFlow's message opens with its graph function's name in {{...}}.
            why = re.sub(r"\{\{.*?\}\}\s*", "", err.message.splitlines()[0]).strip()
            raise DataError(
                f"cannot decode {where} ({why}): its header reads but its pixels do not; "
                "replace or remove the file"
            ) from None
        images = np.concatenate([b[0] for b in batches])
        if cfg.image_size is None:  # not resized: the float pixels are exact integers
            images = images.astype(np.uint8)
        arrays.append((images, np.concatenate([b[1] for b in batches]).astype(np.int32)))
    (x_train, y_train), (x_test, y_test) = arrays
    return _Splits(x_train, y_train, x_test, y_test, class_names)
