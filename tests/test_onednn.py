"""TensorFlow 2.21's oneDNN weight gradient of a strided 1x1 convolution corrupts memory on
AVX-512 CPUs; the model never reaches it (see convnets/model.py). Each process-level check runs
in a subprocess: heap corruption aborts the process that has it."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import CLI_ENV, REPO

# The kernel's failure, reduced: the weight gradient of a 1x1 convolution with stride 2 over
# odd batches and odd feature maps (batch 1, 14x14 -> 7x7). Reference: numpy in float64.
RAW_KERNEL = """
import numpy as np, tensorflow as tf
rng = np.random.default_rng(0)
for batch in (1, 3, 5):
    for cin in (1, 3, 8):
        x = rng.standard_normal((batch, 14, 14, cin)).astype("float32")
        g = rng.standard_normal((batch, 7, 7, 4)).astype("float32")
        ref = np.einsum("bhwc,bhwo->co", x[:, ::2, ::2].astype("float64"), g)[None, None]
        for _ in range(3):
            got = tf.raw_ops.Conv2DBackpropFilter(input=x, filter_sizes=[1, 1, cin, 4],
                out_backprop=g, strides=[1, 2, 2, 1], padding="SAME").numpy()
            if not np.allclose(got, ref, rtol=1e-4, atol=1e-3):
                raise SystemExit(f"wrong gradient: batch {batch}, {cin} channels")
print("clean")
"""

# The product's path: a stack with strided 1x1 convs (on one channel, and deeper), trained
# with an odd last batch (15 images, batch 4) and an odd batch size, then the effective
# receptive field of one image, the shape the bug report started from.
PRODUCT = """
import numpy as np, keras
from convnets.architecture import resolve_stack
from convnets.erf import effective_receptive_field
from convnets.model import build_model
stack = resolve_stack({"layers": [
    {"filters": 4, "kernel_size": 1, "stride": 2},
    {"filters": 8, "kernel_size": 3},
    {"filters": 8, "kernel_size": 1, "stride": [1, 2]},
]})
rng = np.random.default_rng(0)
x = rng.standard_normal((15, 14, 14, 1)).astype("float32")
y = rng.integers(0, 3, 15)
model = build_model(stack, [14, 14, 1], 3)
model.compile("adam", "sparse_categorical_crossentropy")
for batch in (4, 3, 1):
    model.fit(x, y, batch_size=batch, epochs=3, verbose=0)
for _ in range(20):
    erf = effective_receptive_field(model, x[:1])
assert np.isfinite(model.predict(x, verbose=0)).all()
print("clean", erf.side)
"""


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env={**CLI_ENV, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


def _avx512() -> bool:
    cpuinfo = Path("/proc/cpuinfo")
    return cpuinfo.exists() and "avx512f" in cpuinfo.read_text()


@pytest.mark.slow  # trains, in a process of its own
def test_the_model_never_runs_the_broken_kernel():
    """Training on odd batches and the ERF of one image complete, with oneDNN's full ISA."""
    result = _run(PRODUCT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("clean")


@pytest.mark.skipif(not _avx512(), reason="the corruption was seen on AVX-512 CPUs only")
@pytest.mark.skipif(
    os.environ.get("TF_ENABLE_ONEDNN_OPTS") == "0", reason="oneDNN is off in this environment"
)
def test_canary_the_raw_kernel_is_still_broken():
    """When a TensorFlow upgrade fixes the kernel this fails: the workaround in
    convnets/model.py (subsampling before strided 1x1 convolutions) may then go."""
    result = _run(RAW_KERNEL)
    assert result.returncode != 0 and "clean" not in result.stdout, (
        "TensorFlow's strided 1x1 weight gradient now runs clean on this AVX-512 CPU: "
        "re-check the subsampling workaround in convnets/model.py"
    )


def test_strided_1x1_is_subsampling_then_a_unit_conv():
    """Same function as Keras's strided Conv2D (forward only: that kernel is safe), for SAME,
    VALID and explicit padding, odd and even sizes, square and non-square strides."""
    import keras

    from convnets.architecture import resolve_stack
    from convnets.model import build_model

    rng = np.random.default_rng(0)
    for padding, stride, hw in [("same", 2, (9, 8)), ("valid", [1, 3], (7, 10)), (1, 2, (8, 7))]:
        layer = {"filters": 3, "kernel_size": 1, "stride": stride, "padding": padding}
        layer.update(batch_norm=False, activation=None)
        stack = resolve_stack({"layers": [layer], "head": {"global_pool": "flatten"}})
        model = build_model(stack, [*hw, 2], 4)
        names = [layer.name for layer in model.layers]
        assert "block1_subsample" in names and model.get_layer("block1_conv").strides == (1, 1)
        kernel, bias = model.get_layer("block1_conv").get_weights()
        strides = (stride, stride) if isinstance(stride, int) else tuple(stride)
        plain = keras.Sequential(
            [keras.Input((*hw, 2))]
            + ([keras.layers.ZeroPadding2D(padding)] if isinstance(padding, int) else [])
            + [
                keras.layers.Conv2D(
                    3, 1, strides=strides, padding="valid" if isinstance(padding, int) else padding
                )
            ]
        )
        plain.layers[-1].set_weights([kernel, bias])
        x = rng.standard_normal((2, *hw, 2)).astype("float32")
        expected = plain.predict(x, verbose=0)
        got = keras.Model(model.inputs, model.get_layer("block1_conv").output).predict(x, verbose=0)
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
