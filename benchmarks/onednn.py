"""What avoiding TensorFlow 2.21's broken oneDNN kernel costs in training images/s.

    python benchmarks/onednn.py [--quick] [--images 4096] [--epochs 3] [--batch-size 64]

TensorFlow 2.21's oneDNN weight gradient of a *strided 1x1* convolution corrupts memory on
AVX-512 CPUs. Two ways around it, each timed in a fresh process (oneDNN reads its ISA
setting once):

- **ours**: :func:`convnets.model.build_model` builds a strided 1x1 convolution as a 1x1
  average pooling with the stride (a subsampling) and a unit-stride 1x1 convolution, with
  oneDNN's full ISA (AVX-512 here);
- **isa_avx2**: every kernel capped at AVX2 (``ONEDNN_MAX_CPU_ISA=AVX2``), stock strided Conv2D.

Cases: ``strided1x1-32x32x3``, a CIFAR-shaped stack with two strided 1x1 convolutions (the
only stacks the first policy changes; timed as built by us, under both ISAs, and as stock
Keras under AVX2), and the shipped ``simple_cnn`` on CIFAR-shaped data, which has none (ours
changes nothing there; the cap still costs). Training images/s: ``model.fit`` on synthetic
data, Adam, one warm-up epoch then ``--epochs`` timed. Prints a table, then one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STRIDED_1X1 = [
    {"filters": 32},
    {"filters": 64, "kernel_size": 1, "stride": 2},
    {"filters": 64},
    {"filters": 128, "kernel_size": 1, "stride": 2},
    {"filters": 128},
]
# (case, stack, builder, ISA cap or None)
VARIANTS = [
    ("strided1x1-32x32x3", "strided1x1", "ours", None),
    ("strided1x1-32x32x3", "strided1x1", "ours", "AVX2"),
    ("strided1x1-32x32x3", "strided1x1", "stock", "AVX2"),
    ("simple_cnn-32x32x3", "simple_cnn", "ours", None),
    ("simple_cnn-32x32x3", "simple_cnn", "ours", "AVX2"),
]


def child(stack_name: str, builder: str, images: int, epochs: int, batch_size: int) -> None:
    """Train and print images/s of the timed epochs (this process's ISA setting)."""
    import keras
    import numpy as np
    from omegaconf import OmegaConf

    from convnets.architecture import resolve_stack
    from convnets.model import build_model

    if stack_name == "strided1x1":
        stack = resolve_stack({"name": stack_name, "layers": STRIDED_1X1})
    else:
        cfg = OmegaConf.to_container(OmegaConf.load(REPO / "configs/model" / f"{stack_name}.yaml"))
        stack = resolve_stack(cfg)
    keras.utils.set_random_seed(0)
    if builder == "ours":
        model = build_model(stack, (32, 32, 3), 10)
    else:  # the same stack with Keras's own strided Conv2D everywhere
        x = inputs = keras.Input((32, 32, 3))
        for layer in stack.layers:
            x = keras.layers.Conv2D(
                layer.filters,
                layer.kernel_size,
                strides=layer.stride,
                padding=layer.padding,
                use_bias=False,
            )(x)
            x = keras.layers.Activation("relu")(keras.layers.BatchNormalization()(x))
        x = keras.layers.GlobalAveragePooling2D()(x)
        model = keras.Model(inputs, keras.layers.Dense(10, activation="softmax")(x))
    model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((images, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 10, images)
    model.fit(x, y, batch_size=batch_size, epochs=1, verbose=0)  # warm-up: tracing
    start = time.perf_counter()
    model.fit(x, y, batch_size=batch_size, epochs=epochs, verbose=0)
    print(json.dumps({"images_per_sec": images * epochs / (time.perf_counter() - start)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1,024 images, 1 timed epoch")
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.images, args.epochs = 1024, 1
    if args.child:
        child(*args.child, args.images, args.epochs, args.batch_size)
        return
    results = []
    for case, stack, builder, isa in VARIANTS:
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(REPO)}
        env.pop("ONEDNN_MAX_CPU_ISA", None)
        if isa:
            env["ONEDNN_MAX_CPU_ISA"] = isa
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                stack,
                builder,
                "--images",
                str(args.images),
                "--epochs",
                str(args.epochs),
                "--batch-size",
                str(args.batch_size),
            ],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        rate = json.loads(out.stdout.strip().splitlines()[-1])["images_per_sec"]
        results.append(
            {"case": case, "build": builder, "isa": isa or "full", "images_per_sec": round(rate, 1)}
        )
        print(f"{case:20} {builder:6} {isa or 'full':5} {rate:9.1f} img/s", flush=True)
    ours = {
        r["case"]: r["images_per_sec"]
        for r in results
        if r["build"] == "ours" and r["isa"] == "full"
    }
    cap = {
        r["case"]: r["images_per_sec"]
        for r in results
        if r["build"] == "ours" and r["isa"] == "AVX2"
    }
    summary = {
        "images": args.images,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "results": results,
        "isa_cap_cost": {case: round(1 - cap[case] / ours[case], 3) for case in ours},
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
