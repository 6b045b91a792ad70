"""Framework overhead: ``python train.py`` against a plain Keras script, same model and data.

    python benchmarks/overhead.py [--quick] [--repeats 3] [--epochs 4] [--mnist-examples 6000]

Each case trains the same Conv2D stack (``simple_cnn``: 3x3 same convs, batch norm, ReLU, two
max-pools, global average head) with the same optimizer (Adam 1e-3), batch size, epochs and
data twice, each in a fresh Python process so start-up costs compare:

- framework: ``python train.py dataset=... trainer.epochs=... trainer.verbose=0
  tracking.uri=sqlite:///<tmp>/mlflow.db`` -- the whole public path (Hydra config, checks,
  MLflow run, data pipeline, trainer, test evaluation, ERF, curves, logged model). Its
  steady-state images/s and ``startup_s`` are read back from the MLflow store.
- keras: a hand-written script (this file's ``--child keras``): numpy arrays, the model written
  out layer by layer, ``model.fit`` with validation, ``model.evaluate`` on the test split.

Cases: the bundled 8x8 ``digits`` and MNIST-shaped data (28x28x1 random uint8, 10 classes; the
framework reads it through the real TFDS code path with TFDS mocked, as in ``pipeline.py``).
The two variants alternate (order flipped every repeat); medians are reported.

Measured the same way in both: steady-state training images/s (epochs 2.., validation time
subtracted; epoch hooks only), whole-process wall time, and ``startup_s`` = process start to
the first training step; also each process's CPU seconds (user + system, from
``getrusage``; less sensitive than wall time to other load on the machine). Targets:
throughput_ratio (framework/keras) >= 0.97, wall_ratio (framework/keras) <= 1.10. Prints a table, then one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BATCH_SIZE = 64
LR = 1e-3
MNIST_TEST_FRACTION = 1 / 6  # MNIST's 10,000 test images per 60,000 train
CASES = ("digits", "mnist-shaped")
TARGET_THROUGHPUT_RATIO = 0.97
TARGET_WALL_RATIO = 1.10


# ---------------------------------------------------------------- shared by both children


def synthetic_arrays(num_train: int, split: str):
    """MNIST-shaped random uint8 images and labels: the same arrays for both variants."""
    import numpy as np

    num = num_train if split == "train" else max(1, round(num_train * MNIST_TEST_FRACTION))
    rng = np.random.default_rng(0 if split == "train" else 1)
    images = rng.integers(0, 256, size=(num, 28, 28, 1), dtype=np.uint8)
    labels = rng.integers(0, 10, size=num).astype(np.int64)
    return images, labels


def process_age() -> float:
    import psutil

    return time.time() - psutil.Process().create_time()


# ---------------------------------------------------------------- framework child


def framework_child(num_train: int, overrides: list[str]) -> None:
    """``train.py`` with TFDS mocked to serve :func:`synthetic_arrays` (mnist-shaped case)."""
    import contextlib
    import runpy
    from unittest import mock

    sys.argv = [str(ROOT / "train.py"), *overrides]
    with contextlib.ExitStack() as stack:
        if "dataset=mnist" in overrides:  # TFDS only where train.py would import it too
            # Imported as train.py imports them for a TFDS dataset (convnets.data), only
            # earlier, so that the mock is in place before train.py runs.
            import tensorflow as tf
            import tensorflow_datasets as tfds

            def as_dataset(self, *args, split="train", **kwargs):
                images, labels = synthetic_arrays(num_train, str(split))
                return tf.data.Dataset.from_tensor_slices({"image": images, "label": labels})

            stack.enter_context(tfds.testing.mock_data(as_dataset_fn=as_dataset))
            stack.enter_context(
                mock.patch.object(tfds.core.DatasetBuilder, "is_prepared", return_value=True)
            )
        runpy.run_path(str(ROOT / "train.py"), run_name="__main__")


# ---------------------------------------------------------------- plain Keras child


def keras_child(case: str, epochs: int, num_train: int) -> None:
    """What a user would write by hand: arrays, a Sequential-style stack, fit, evaluate."""

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras

    if case == "digits":
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        x, y = digits.images[..., None].astype("float32") / 16.0, digits.target
        x_train, x_test, y_train, y_test = train_test_split(
            x, y, test_size=0.2, stratify=y, random_state=0
        )
        x_train, x_val, y_train, y_val = train_test_split(
            x_train, y_train, test_size=0.1, stratify=y_train, random_state=0
        )
        mean, std = 0.3053, 0.3760
    else:
        images, labels = synthetic_arrays(num_train, "train")
        n_val = round(0.1 * len(labels))
        x = images.astype("float32") / 255.0
        x_train, y_train, x_val, y_val = x[n_val:], labels[n_val:], x[:n_val], labels[:n_val]
        test_images, y_test = synthetic_arrays(num_train, "test")
        x_test = test_images.astype("float32") / 255.0
        mean, std = 0.1307, 0.3081
    x_train, x_val, x_test = ((a - mean) / std for a in (x_train, x_val, x_test))

    keras.utils.set_random_seed(0)
    layers = keras.layers
    inputs = keras.Input(shape=x_train.shape[1:])
    h = inputs
    for filters, pool in ((32, False), (32, True), (64, False), (64, True)):
        h = layers.Conv2D(filters, 3, padding="same", use_bias=False)(h)
        h = layers.BatchNormalization(momentum=0.9)(h)
        h = layers.Activation("relu")(h)
        if pool:
            h = layers.MaxPooling2D(2)(h)
    h = layers.GlobalAveragePooling2D()(h)
    h = layers.Dense(10)(h)
    outputs = layers.Activation("softmax")(h)
    model = keras.Model(inputs, outputs)
    model.compile(
        optimizer=keras.optimizers.Adam(LR),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )

    class Timer(keras.callbacks.Callback):
        """Epoch seconds minus the validation pass; process age at the first step."""

        startup_s = None
        epoch_seconds: list[float] = []

        def on_train_batch_begin(self, batch, logs=None):
            if self.startup_s is None:
                self.startup_s = process_age()

        def on_epoch_begin(self, epoch, logs=None):
            self.start, self.val = time.perf_counter(), 0.0

        def on_test_begin(self, logs=None):
            self.val_start = time.perf_counter()

        def on_test_end(self, logs=None):
            self.val += time.perf_counter() - self.val_start

        def on_epoch_end(self, epoch, logs=None):
            self.epoch_seconds.append(time.perf_counter() - self.start - self.val)

    timer = Timer()
    started = time.perf_counter()
    model.fit(
        x_train,
        y_train,
        batch_size=BATCH_SIZE,
        epochs=epochs,
        validation_data=(x_val, y_val),
        callbacks=[timer],
        verbose=0,
    )
    train_time = time.perf_counter() - started
    _, test_accuracy = model.evaluate(x_test, y_test, batch_size=BATCH_SIZE, verbose=0)
    steady = timer.epoch_seconds[1:] or timer.epoch_seconds
    result = {
        "images_per_sec": len(y_train) * len(steady) / sum(steady),
        "startup_s": timer.startup_s,
        "train_time_s": train_time,
        "num_train": len(y_train),
        "test_accuracy": float(test_accuracy),
    }
    print("RESULT " + json.dumps(result), flush=True)


# ---------------------------------------------------------------- parent


def run_framework(
    case: str, epochs: int, num_train: int, tmp: Path, index: int, one_device_strategy: bool
) -> dict:
    import mlflow

    uri = f"sqlite:///{tmp}/mlflow.db"
    experiment = f"overhead-{index}"
    overrides = [
        f"dataset={'digits' if case == 'digits' else 'mnist'}",
        f"trainer.epochs={epochs}",
        f"trainer.batch_size={BATCH_SIZE}",
        "trainer.verbose=0",
        f"tracking.uri={uri}",
        f"tracking.experiment={experiment}",
        f"hydra.run.dir={tmp}/run-{index}",
    ]
    if one_device_strategy:  # an explicit device: tf.distribute.OneDeviceStrategy
        overrides += ["distribute=one_device", "distribute.devices=[/cpu:0]"]
    if case == "digits":
        cmd = [sys.executable, str(ROOT / "train.py"), *overrides]
    else:
        cmd = [sys.executable, __file__, "--child", "framework", "--num-train", str(num_train)]
        cmd += ["--", *overrides]
    wall, cpu = _timed(cmd)
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=[experiment])
    metrics = runs.iloc[0]
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "images_per_sec": float(metrics["metrics.images_per_sec"]),
        "startup_s": float(metrics["metrics.startup_s"]),
        "train_time_s": float(metrics["metrics.train_time_s"]),
        "test_accuracy": float(metrics["metrics.test_accuracy"]),
    }


def run_keras(case: str, epochs: int, num_train: int) -> dict:
    cmd = [sys.executable, __file__, "--child", "keras", "--case", case]
    cmd += ["--epochs", str(epochs), "--num-train", str(num_train)]
    wall, cpu, out = _timed(cmd, capture=True)
    line = next(ln for ln in reversed(out.splitlines()) if ln.startswith("RESULT "))
    return {"wall_s": wall, "cpu_s": cpu, **json.loads(line.removeprefix("RESULT "))}


def _timed(cmd: list[str], capture: bool = False):
    """Run ``cmd``; (wall seconds, CPU seconds of the child: user + system[, stdout])."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONWARNINGS": "ignore"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return (wall, cpu, proc.stdout) if capture else (wall, cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 repeat, fewer epochs/images")
    parser.add_argument("--repeats", type=int, default=None, help="default 3 (--quick: 1)")
    parser.add_argument("--epochs", type=int, default=None, help="default 6 (--quick: 3)")
    parser.add_argument(
        "--mnist-examples", type=int, default=None, help="MNIST-shaped train+val images"
    )
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated")
    parser.add_argument(
        "--one-device-strategy",
        action="store_true",
        help="framework runs under distribute=one_device distribute.devices=[/cpu:0] "
        "(tf.distribute.OneDeviceStrategy) instead of distribute=auto's default strategy",
    )
    parser.add_argument("--child", choices=("framework", "keras"), help=argparse.SUPPRESS)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--num-train", type=int, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "framework":
        return framework_child(args.num_train, args.overrides)
    if args.child == "keras":
        return keras_child(args.case, args.epochs, args.num_train)

    repeats = args.repeats or (1 if args.quick else 3)
    epochs = args.epochs or (3 if args.quick else 6)
    num_mnist = args.mnist_examples or (2_000 if args.quick else 6_000)
    cases = [c for c in args.cases.split(",") if c]
    runs: dict[str, dict[str, list[dict]]] = {c: {"framework": [], "keras": []} for c in cases}
    with tempfile.TemporaryDirectory(prefix="overhead-") as tmp:
        index = 0
        for repeat in range(repeats):
            for case in cases:
                order = ("framework", "keras") if repeat % 2 == 0 else ("keras", "framework")
                for variant in order:
                    index += 1
                    if variant == "framework":
                        r = run_framework(
                            case, epochs, num_mnist, Path(tmp), index, args.one_device_strategy
                        )
                    else:
                        r = run_keras(case, epochs, num_mnist)
                    runs[case][variant].append(r)
                    print(
                        f"  [{repeat + 1}/{repeats}] {case:<13}{variant:<10}"
                        f"{r['images_per_sec']:>9,.0f} img/s  wall {r['wall_s']:6.1f}s  "
                        f"startup {r['startup_s']:5.1f}s",
                        file=sys.stderr,
                        flush=True,
                    )

    results = {}
    for case in cases:
        med = {
            variant: {
                key: statistics.median(r[key] for r in runs[case][variant])
                for key in ("images_per_sec", "wall_s", "cpu_s", "startup_s", "train_time_s")
            }
            for variant in ("framework", "keras")
        }
        fw, ks = med["framework"], med["keras"]
        results[case] = {
            "framework_images_per_sec": round(fw["images_per_sec"], 1),
            "keras_images_per_sec": round(ks["images_per_sec"], 1),
            "throughput_ratio": round(fw["images_per_sec"] / ks["images_per_sec"], 3),
            "framework_wall_s": round(fw["wall_s"], 2),
            "keras_wall_s": round(ks["wall_s"], 2),
            "wall_ratio": round(fw["wall_s"] / ks["wall_s"], 3),
            "framework_cpu_s": round(fw["cpu_s"], 1),
            "keras_cpu_s": round(ks["cpu_s"], 1),
            "cpu_ratio": round(fw["cpu_s"] / ks["cpu_s"], 3),
            "startup_s": round(fw["startup_s"], 2),
            "keras_startup_s": round(ks["startup_s"], 2),
            "framework_train_time_s": round(fw["train_time_s"], 2),
            "keras_train_time_s": round(ks["train_time_s"], 2),
            "repeats": repeats,
        }

    print(
        f"simple_cnn, batch {BATCH_SIZE}, {epochs} epochs, MNIST-shaped: {num_mnist} images, "
        f"{repeats} repeat(s), {os.cpu_count()} CPU cores; medians"
    )
    header = (
        f"{'case':<14}{'fw img/s':>10}{'keras img/s':>13}{'ratio':>7}"
        f"{'fw wall':>9}{'keras wall':>12}{'ratio':>7}{'fw start':>10}{'keras start':>13}"
        f"{'cpu ratio':>11}"
    )
    print(header)
    print("-" * len(header))
    for case, r in results.items():
        print(
            f"{case:<14}{r['framework_images_per_sec']:>10,.0f}{r['keras_images_per_sec']:>13,.0f}"
            f"{r['throughput_ratio']:>7.3f}{r['framework_wall_s']:>8.1f}s{r['keras_wall_s']:>11.1f}s"
            f"{r['wall_ratio']:>7.3f}{r['startup_s']:>9.1f}s{r['keras_startup_s']:>12.1f}s"
            f"{r['cpu_ratio']:>11.3f}"
        )
    # Headline figures: the MNIST-shaped case when run (training dominates), else the first.
    main_case = "mnist-shaped" if "mnist-shaped" in results else cases[0]
    head = results[main_case]
    summary = {
        "headline_case": main_case,
        **{k: head[k] for k in ("framework_images_per_sec", "keras_images_per_sec")},
        **{k: head[k] for k in ("throughput_ratio", "wall_ratio", "startup_s", "keras_startup_s")},
        "epochs": epochs,
        "batch_size": BATCH_SIZE,
        "mnist_examples": num_mnist,
        "one_device_strategy": args.one_device_strategy,
        "cases": results,
        "targets": {"throughput_ratio": TARGET_THROUGHPUT_RATIO, "wall_ratio": TARGET_WALL_RATIO},
        "meets_targets": all(
            r["throughput_ratio"] >= TARGET_THROUGHPUT_RATIO
            and r["wall_ratio"] <= TARGET_WALL_RATIO
            for r in results.values()
        ),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
