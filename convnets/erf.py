"""The effective receptive field of a trained model (Luo et al. 2016), measured by one gradient.

The job measures it at the end of every run and ``evaluate.py`` draws it; the theoretical
receptive field it is compared with comes from :mod:`convnets.architecture`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from convnets.model import feature_model, normalise

log = logging.getLogger(__name__)

ERF_MASS = 0.95  # fraction of the gradient mass the ERF square holds
ERF_IMAGES = 64  # test images the ERF gradient is averaged over


@dataclass
class ErfResult:
    """The measured effective receptive field of the centre unit.

    ``side``: side in pixels of the smallest square (placement below) that holds ``mass`` of
    the gradient; 0 when the gradient vanishes everywhere (every sampled centre unit is
    inactive). ``grad_map`` (H, W): mean over images of |d unit / d input| summed over input
    channels. ``centroid`` (row, col): the gradient's centre of mass. ``box``: (top, left,
    side) of the square. ``unit``: (row, col) of the centre unit in the feature map.
    """

    side: int
    grad_map: np.ndarray
    centroid: tuple[float, float] = (0.0, 0.0)
    box: tuple[int, int, int] = (0, 0, 0)
    unit: tuple[int, int] = (0, 0)
    mass: float = ERF_MASS


def _take_images(images: Any, max_images: int) -> tf.Tensor:
    """Up to ``max_images`` images from an array/tensor or an (images, labels) dataset."""
    if isinstance(images, tf.data.Dataset):
        batches, count = [], 0
        for element in images:
            x = element[0] if isinstance(element, tuple | list) else element
            batches.append(x)
            count += int(x.shape[0])
            if count >= max_images:
                break
        images = tf.concat(batches, axis=0)
    return tf.convert_to_tensor(images, dtype=tf.float32)[:max_images]


def _square_start(centre: float, side: int, size: int) -> int:
    """First index of the ``side``-long window centred as near ``centre`` as pixels allow.

    The window's middle is ``start + (side - 1) / 2``; rounding ties go down/right (half-up),
    and the window is shifted, not cut, to stay inside ``[0, size)`` while it fits.
    """
    start = math.floor(centre - (side - 1) / 2 + 0.5)
    return min(max(start, 0), max(size - side, 0))


# Why a run has no effective_receptive_field: a network whose centre unit does not respond to
# its input at all (e.g. every ReLU dead after a diverged learning rate) has no field to measure;
# 0 px would rank it the smallest field of all.
UNDEFINED = "the centre unit's gradient is zero everywhere (no input pixel affects it)"


def erf_square(grad_map: np.ndarray, mass: float = ERF_MASS) -> tuple[int, tuple[int, int, int]]:
    """Smallest square around the gradient's centroid holding ``mass`` of the total.

    Squares of side 1, 2, ... are tried; each is placed by :func:`_square_start` on both
    axes around the centroid. Side ``max(H, W)`` covers the whole map, so the answer is at
    most that. Returns ``(side, (top, left, side))``; side 0 when the map is all zero.
    """
    grad = np.asarray(grad_map, dtype=np.float64)
    total = grad.sum()
    h, w = grad.shape
    if not total > 0:
        return 0, (0, 0, 0)
    rows, cols = np.indices(grad.shape)
    cy, cx = (rows * grad).sum() / total, (cols * grad).sum() / total
    # Integral image: the mass of any window in O(1) (numpy has no windowed sum of this shape).
    integral = np.zeros((h + 1, w + 1))
    integral[1:, 1:] = grad.cumsum(0).cumsum(1)
    # A tiny relative tolerance so a mass fraction that is exactly `mass` counts as reached.
    target = mass * total * (1 - 1e-9)
    for side in range(1, max(h, w) + 1):
        top, left = _square_start(cy, side, h), _square_start(cx, side, w)
        bottom, right = min(top + side, h), min(left + side, w)
        inside = (
            integral[bottom, right]
            - integral[top, right]
            - integral[bottom, left]
            + integral[top, left]
        )
        if inside >= target:
            return side, (top, left, side)
    raise AssertionError("unreachable: the largest square covers the whole map")


def effective_receptive_field(
    model: keras.Model, images: Any, *, mass: float = ERF_MASS, max_images: int = ERF_IMAGES
) -> ErfResult:
    """Effective receptive field (Luo et al. 2016) of ``model``'s last spatial feature map.

    The unit is the centre position of the feature map that ``head_pool`` receives, at row
    ``h // 2`` and column ``w // 2`` (for an even size, the lower/right of the two middle
    positions), its channels summed. One gradient of that unit w.r.t. the input, in
    inference mode (dropout off, batch norm on its moving statistics, so images do not
    interact), over up to ``max_images`` of ``images`` (an array/tensor of what the model
    takes, or a dataset of (images, labels) batches: use real test images). The gradient is
    taken w.r.t. the normalised image the first conv sees (after the model's ``preprocess``
    layer, if any), so the map does not depend on the pixel scale. The map is |gradient|
    summed over input channels and averaged over the images.

    ``side`` is the side of the smallest square holding ``mass`` of the map's total, placed
    around the gradient's centre of mass (see :func:`erf_square`): the centroid, not the
    image centre, because after strides/pools the centre unit's receptive field is not
    centred on the image. Cost: one forward and one backward pass over one batch.
    """
    x = normalise(model, _take_images(images, max_images))
    features = feature_model(model)
    with tf.GradientTape() as tape:
        tape.watch(x)
        fmap = features(x, training=False)
        h, w = int(fmap.shape[1]), int(fmap.shape[2])
        # Summed over the batch: each image's gradient only depends on its own unit.
        unit = tf.reduce_sum(tf.cast(fmap[:, h // 2, w // 2, :], tf.float32))
    grad = tape.gradient(unit, x)
    grad_map = np.abs(grad.numpy()).sum(axis=-1).mean(axis=0)
    side, box = erf_square(grad_map, mass)
    total = grad_map.sum()
    rows, cols = np.indices(grad_map.shape)
    centroid = (
        (float((rows * grad_map).sum() / total), float((cols * grad_map).sum() / total))
        if total > 0
        else (0.0, 0.0)
    )
    if side == 0:
        log.warning(f"effective receptive field: not measured, {UNDEFINED}")
    return ErfResult(side, grad_map, centroid, box, (h // 2, w // 2), mass)


def theoretical_rf_box(analysis: Any) -> tuple[float, float, int, int] | None:
    """(centre_row, centre_col, height, width) of the centre unit's theoretical receptive field.

    From :func:`convnets.architecture.analyze`: the last spatial row's ``start`` (centre of
    unit 0's field, in input pixels), ``jump`` and size; the centre unit is the one
    :func:`effective_receptive_field` differentiates.
    """
    rows = [r for r in analysis.layers if r.receptive_field is not None]
    if not rows:
        return None
    last = rows[-1]
    fh, fw = last.output_shape[0], last.output_shape[1]
    cy = last.start[0] + (fh // 2) * last.jump[0]
    cx = last.start[1] + (fw // 2) * last.jump[1]
    return cy, cx, last.receptive_field[0], last.receptive_field[1]
