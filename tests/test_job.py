"""convnets.job's pure helpers."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

from convnets.job import _selected_val_accuracy, reproduce_verdict

# At accuracy 0.9 on 100 test images two binomial standard errors are
# 2 * sqrt(0.9 * 0.1 / 100) = 0.06: the band a rerun's accuracy may move within by chance.
NOISE = 2 * math.sqrt(0.9 * 0.1 / 100)


@pytest.mark.parametrize(
    "delta_accuracy, delta_loss, verdict",
    [
        (0.0, 0.0, "identical"),  # bit for bit
        (0.0, 1e-7, "within noise"),  # same accuracy, the loss moved: not identical
        (0.05, 0.01, "within noise"),
        (-0.05, -0.01, "within noise"),  # worse by as much: the same verdict
        (NOISE - 1e-4, 0.01, "within noise"),  # just inside the band
        (NOISE + 1e-4, 0.01, "differs"),  # just outside
        (0.07, 0.0, "differs"),
        (-0.07, 0.0, "differs"),
    ],
)
def test_reproduce_verdict(delta_accuracy, delta_loss, verdict):
    assert reproduce_verdict(delta_accuracy, delta_loss, accuracy=0.9, num_test=100) == verdict


def test_the_noise_band_narrows_with_more_test_images():
    assert reproduce_verdict(0.01, 0.0, accuracy=0.9, num_test=100) == "within noise"
    assert reproduce_verdict(0.01, 0.0, accuracy=0.9, num_test=100_000) == "differs"


def test_a_resumed_original_was_not_expected_to_be_bit_identical():
    """A deterministic run interrupted and resumed shuffles its later epochs from a fresh
    seed: its reproduction, uninterrupted, differs from it by design."""
    assert reproduce_verdict(0.005, 0.003, accuracy=0.97, num_test=360, resumed=True) == (
        "within noise (bit-identity not expected: the original was interrupted and resumed)"
    )
    assert reproduce_verdict(0.0, 0.0, accuracy=0.97, num_test=360) == "identical"
    assert reproduce_verdict(0.0, 0.0, accuracy=0.97, num_test=360, resumed=True) == (
        "identical (so, though not guaranteed: the original was interrupted and resumed)"
    )


def test_a_perfect_original_still_has_a_verdict():
    """accuracy 1.0 has no binomial spread: any change in accuracy differs, none is noise."""
    assert reproduce_verdict(0.0, 1e-6, accuracy=1.0, num_test=360) == "within noise"
    assert reproduce_verdict(-1 / 360, 0.01, accuracy=1.0, num_test=360) == "differs"


@pytest.mark.parametrize(
    "restore_best, best, history, selected",
    [
        (True, 0.9, [0.9, 0.8], 0.9),  # the restored best epoch, not the last one
        (False, 0.9, [0.9, 0.8], 0.8),  # nothing restored: the last epoch is tested
        (True, None, [0.3, 0.4], 0.4),  # no finite val_loss: nothing to restore
        (True, None, [], None),  # no validation data
    ],
)
def test_the_selected_val_accuracy_is_the_tested_epochs(restore_best, best, history, selected):
    cfg = OmegaConf.create({"trainer": {"restore_best": restore_best}})
    result = SimpleNamespace(best_val_accuracy=best)
    assert _selected_val_accuracy(cfg, result, {"val_accuracy": history}) == selected
