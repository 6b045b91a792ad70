"""Input pipeline throughput against the model step's consumption, per dataset shape.

    python benchmarks/pipeline.py [--batch-size 64] [--epochs 2] [--model simple_cnn]

For each case the train pipeline from :func:`convnets.data.load_data` is iterated for one
warm-up epoch, then ``--epochs`` timed epochs (images/s of the pipeline alone). The MNIST- and
CIFAR-shaped cases feed synthetic uint8 images through the real TFDS code path (TFDS mocked
to return in-memory arrays of the true sizes, 60,000 and 50,000), CIFAR with its default
augmentation (pad-4 crop + flip). The step's consumption is images/s of ``train_on_batch`` on
the compiled model (Adam, sparse cross-entropy) after warm-up. Target: pipeline >= 10x step.
Prints a table, then one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from omegaconf import OmegaConf

from convnets.config import DatasetConfig

if TYPE_CHECKING:
    import tensorflow as tf

    from convnets import data

# TensorFlow, Keras, TFDS and the modules that import them load inside the functions, after
# the arguments are parsed, as in the other benchmarks: --help answers at once.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
CASES = {  # name: (dataset config, synthetic train size or None for the real data)
    "digits": ("digits", None),
    "mnist-shaped": ("mnist", 60_000),
    "cifar-shaped": ("cifar10", 50_000),
}


def dataset_config(name: str):
    schema = OmegaConf.structured(DatasetConfig)
    return OmegaConf.merge(schema, OmegaConf.load(CONFIGS / "dataset" / f"{name}.yaml"))


def synthetic_tfds(num_examples: int):
    """``mock_data`` whose builders return ``num_examples`` random uint8 images from memory."""
    import tensorflow as tf
    import tensorflow_datasets as tfds

    def as_dataset(self, *args, **kwargs):
        features = self.info.features
        shape = features["image"].shape
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, size=(num_examples, *shape), dtype=np.uint8)
        labels = rng.integers(0, features["label"].num_classes, size=num_examples)
        return tf.data.Dataset.from_tensor_slices({"image": images, "label": labels})

    return tfds.testing.mock_data(as_dataset_fn=as_dataset)


def pipeline_rate(ds: tf.data.Dataset, epochs: int) -> tuple[float, int]:
    """Images/s over ``epochs`` full passes, after one warm-up pass (fills autotuning)."""
    for _ in ds:
        pass
    seen, start = 0, time.perf_counter()
    for _ in range(epochs):
        for images, _ in ds:
            seen += int(images.shape[0])
    return seen / (time.perf_counter() - start), seen


def step_rate(model_name: str, bundle: data.DataBundle, batch_size: int, steps: int) -> float:
    """Images/s of the compiled model's train step on one fixed batch (data cost excluded)."""
    import keras

    from convnets.architecture import resolve_stack
    from convnets.model import PixelScaling, build_model

    keras.utils.set_random_seed(0)
    model_cfg = OmegaConf.load(CONFIGS / "model" / f"{model_name}.yaml")
    scaling = PixelScaling(bundle.max_pixel_value, bundle.mean, bundle.std)
    model = build_model(
        resolve_stack(model_cfg), bundle.input_shape, bundle.num_classes, pixel_scaling=scaling
    )
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    images, labels = next(iter(bundle.train.unbatch().batch(batch_size)))
    for _ in range(5):
        model.train_on_batch(images, labels)
    start = time.perf_counter()
    for _ in range(steps):
        model.train_on_batch(images, labels)
    return steps * batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=64, help="global batch (trainer's)")
    parser.add_argument("--epochs", type=int, default=2, help="timed pipeline epochs")
    parser.add_argument("--steps", type=int, default=30, help="timed model steps")
    parser.add_argument("--model", default="simple_cnn", help="configs/model/<name>.yaml")
    args = parser.parse_args()
    import tensorflow as tf

    from convnets import data

    results = {}
    for case, (config_name, synthetic) in CASES.items():
        cfg = dataset_config(config_name)
        if synthetic is None:
            bundle = data.load_data(cfg, batch_size=args.batch_size, seed=0)
        else:
            with synthetic_tfds(synthetic):
                bundle = data.load_data(cfg, batch_size=args.batch_size, seed=0)
        pipe, seen = pipeline_rate(bundle.train, args.epochs)
        step = step_rate(args.model, bundle, args.batch_size, args.steps)
        results[case] = {
            "input_shape": list(bundle.input_shape),
            "augment": bool(cfg.augment.random_crop_padding or cfg.augment.horizontal_flip),
            "train_images": bundle.num_train,
            "pipeline_images_per_s": round(pipe),
            "step_images_per_s": round(step),
            "ratio": round(pipe / step, 1),
        }

    device = "GPU" if tf.config.list_physical_devices("GPU") else "CPU"
    print(f"model {args.model}, batch {args.batch_size}, {device}, {os.cpu_count()} CPU cores")
    header = (
        f"{'case':<14}{'shape':<14}{'aug':<6}{'pipeline img/s':>16}{'step img/s':>12}{'ratio':>8}"
    )
    print(header)
    print("-" * len(header))
    for case, r in results.items():
        shape = "x".join(map(str, r["input_shape"]))
        print(
            f"{case:<14}{shape:<14}{'yes' if r['augment'] else 'no':<6}"
            f"{r['pipeline_images_per_s']:>16,}{r['step_images_per_s']:>12,}{r['ratio']:>7}x"
        )
    summary = {
        "model": args.model,
        "batch_size": args.batch_size,
        "device": device,
        "cases": results,
        "target_ratio": 10,
        "meets_target": all(r["ratio"] >= 10 for r in results.values()),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
