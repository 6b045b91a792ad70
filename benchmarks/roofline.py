"""Achieved training FLOP/s of a few stacks against this machine's measured matmul peak.

    python benchmarks/roofline.py [--quick | --smoke] [--precision mixed_float16] [--jit]

Peak: ``tf.matmul`` of two N x N float32 matrices (``--precision`` mixed_*: that dtype),
warmed up, then timed (2 N^3 FLOPs per product). Each stack is built from its
``configs/model/*.yaml`` by :func:`convnets.model.build_model`; its MACs per image come from
:func:`convnets.architecture.analyze`. Training images/s: ``model.fit`` on one synthetic batch
repeated (no input cost), Adam, sparse cross-entropy, one warm-up epoch then one timed epoch.
Achieved FLOP/s = 3 x 2 x MACs x images/s (forward 2 FLOPs per MAC; backward ~2x forward),
and its fraction of the matmul peak. ``--precision`` sets Keras's global dtype policy and
``--jit`` compiles with XLA (``jit_compile=True``), as ``trainer.precision`` /
``trainer.jit_compile`` do; both are meant for GPUs (on CPU mixed float16 is emulated and slow).
Prints a table, then one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# TensorFlow, Keras and convnets are imported where used, so that --help answers at once.
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
STACKS = {  # case: (configs/model/<name>.yaml, input shape)
    "simple_cnn-8x8x1": ("simple_cnn", (8, 8, 1)),
    "simple_cnn-28x28x1": ("simple_cnn", (28, 28, 1)),
    "vgg_small-32x32x3": ("vgg_small", (32, 32, 3)),
}
NUM_CLASSES = 10


def matmul_peak(n: int, repeats: int, dtype: str) -> float:
    """FLOP/s of ``n x n @ n x n`` products, after a warm-up, each forced to completion."""
    import tensorflow as tf

    a = tf.random.normal((n, n), dtype=dtype)
    b = tf.random.normal((n, n), dtype=dtype)
    matmul = tf.function(lambda x, y: tf.matmul(x, y))
    for _ in range(2):
        matmul(a, b).numpy()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, b).numpy()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def train_rate(model_name: str, shape, batch_size: int, steps: int, jit: bool) -> tuple:
    """(images/s of the train step after one warm-up epoch, MACs per image, params)."""
    import keras
    import numpy as np
    import tensorflow as tf
    from omegaconf import OmegaConf

    from convnets.architecture import analyze, resolve_stack
    from convnets.model import build_model

    class EpochTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.seconds: list[float] = []

        def on_epoch_begin(self, epoch, logs=None):
            self._start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.seconds.append(time.perf_counter() - self._start)

    keras.utils.set_random_seed(0)
    stack = resolve_stack(OmegaConf.load(CONFIGS / "model" / f"{model_name}.yaml"))
    analysis = analyze(stack, list(shape), NUM_CLASSES)
    model = build_model(stack, list(shape), NUM_CLASSES)
    model.compile(
        optimizer="adam",
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        jit_compile=jit,
    )
    rng = np.random.default_rng(0)
    images = rng.standard_normal((batch_size, *shape), dtype=np.float32)
    labels = rng.integers(0, NUM_CLASSES, size=batch_size).astype(np.int32)
    ds = tf.data.Dataset.from_tensors((images, labels)).repeat().prefetch(2)
    timer = EpochTimer()
    model.fit(ds, steps_per_epoch=steps, epochs=2, callbacks=[timer], verbose=0)
    return steps * batch_size / timer.seconds[-1], analysis.macs, analysis.param_count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller matmul, fewer steps")
    parser.add_argument("--smoke", action="store_true", help="one tiny stack, seconds (tests)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=None, help="timed steps per stack")
    parser.add_argument("--matmul-size", type=int, default=None, help="N of the N x N matmul")
    parser.add_argument("--stacks", default=",".join(STACKS), help="comma-separated cases")
    parser.add_argument(
        "--precision",
        default="float32",
        choices=("float32", "mixed_float16", "mixed_bfloat16"),
        help="Keras global dtype policy (as trainer.precision)",
    )
    parser.add_argument("--jit", action="store_true", help="XLA: compile(jit_compile=True)")
    args = parser.parse_args()

    if args.smoke:
        stacks, steps, n, repeats = ["simple_cnn-8x8x1"], args.steps or 5, 256, 3
    elif args.quick:
        stacks, steps, n, repeats = args.stacks.split(","), args.steps or 15, 1024, 5
    else:
        stacks, steps, n, repeats = args.stacks.split(","), args.steps or 50, 2048, 10
    n = args.matmul_size or n
    import keras
    import tensorflow as tf

    keras.mixed_precision.set_global_policy(args.precision)
    compute_dtype = {"float32": "float32", "mixed_float16": "float16"}.get(
        args.precision, "bfloat16"
    )
    peak = matmul_peak(n, repeats, compute_dtype)

    results = {}
    for case in stacks:
        model_name, shape = STACKS[case]
        rate, macs, params = train_rate(model_name, shape, args.batch_size, steps, args.jit)
        flops = 3 * 2 * macs * rate
        results[case] = {
            "model": model_name,
            "input_shape": list(shape),
            "params": params,
            "macs_per_image": macs,
            "images_per_sec": round(rate, 1),
            "achieved_flops": round(flops),
            "fraction_of_peak": round(flops / peak, 4),
        }

    device = "GPU" if tf.config.list_physical_devices("GPU") else "CPU"
    print(
        f"{device}, {os.cpu_count()} CPU cores, precision {args.precision}, jit {args.jit}, "
        f"batch {args.batch_size}, {steps} timed steps"
    )
    print(f"matmul peak ({n}x{n} {compute_dtype}): {peak / 1e9:,.1f} GFLOP/s")
    header = (
        f"{'stack':<22}{'params':>10}{'MMACs/img':>11}{'img/s':>10}{'GFLOP/s':>10}{'of peak':>9}"
    )
    print(header)
    print("-" * len(header))
    for case, r in results.items():
        print(
            f"{case:<22}{r['params']:>10,}{r['macs_per_image'] / 1e6:>11.2f}"
            f"{r['images_per_sec']:>10,.0f}{r['achieved_flops'] / 1e9:>10.2f}"
            f"{r['fraction_of_peak']:>8.1%}"
        )
    summary = {
        "device": device,
        "precision": args.precision,
        "jit": args.jit,
        "batch_size": args.batch_size,
        "matmul_size": n,
        "peak_flops": round(peak),
        "stacks": results,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
