"""Transfer learning: ``python train.py init_from=<run id> [trainer.freeze_layers=N]``.

A new run starts from the weights of the model another run logged. The new stack may differ
from the old one (another dataset, class count or depth), so weights are matched by conv-block
order, not loaded as a whole model: block ``k`` of the new model takes block ``k``'s conv and
batch-norm weights while their shapes match, stopping at the first block that does not (a
later block would receive features it was not trained on). The head (hidden dense layers and
the classifier) is copied only when every conv block was, its shapes match and the classes
are the same ones (names and order, from the logged model's metadata); otherwise it keeps its
fresh initialisation: a classifier trained on other classes with the same count (digits 0-4
for 5-9) starts confidently wrong, which is worse than a fresh one.

Freezing the first N conv blocks sets ``trainable = False`` on their conv and batch-norm
layers; in Keras 3 a non-trainable BatchNormalization layer also runs in inference mode (its
moving statistics stay as loaded), as Keras's fine-tuning guide recommends.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np

from convnets.errors import ConfigError, TrackingError
from convnets.tracking import Tracker


@dataclass
class Transfer:
    """Which weights of run ``run_id``'s model go into which layer, and what is frozen."""

    run_id: str
    weights: dict[str, list[np.ndarray]] = field(default_factory=dict)  # layer -> weights
    loaded_blocks: int = 0  # conv blocks copied: a prefix of the stack
    frozen_blocks: int = 0
    head_copied: bool = False

    def apply(self, model: keras.Model) -> keras.Model:
        """Copy the weights into a freshly built ``model`` and freeze; call before compiling."""
        for name, values in self.weights.items():
            model.get_layer(name).set_weights(values)
        for conv, bn in _blocks(model)[: self.frozen_blocks]:
            conv.trainable = False
            if bn is not None:
                bn.trainable = False  # Keras 3: also runs it in inference mode
        return model

    def tags(self) -> dict[str, str]:
        return {
            "init_from": self.run_id,
            "init_loaded_layers": str(self.loaded_blocks),
            "init_frozen_layers": str(self.frozen_blocks),
            "init_head": "copied" if self.head_copied else "re-initialised",
        }


def plan(
    tracker: Tracker,
    run_id: str,
    target: keras.Model,
    freeze_layers: int,
    class_names: Sequence[str],
) -> Transfer:
    """Match run ``run_id``'s logged model against ``target`` (the new, freshly built model,
    to be trained on ``class_names``).

    Raises a one-line :class:`TrackingError` when the run has no loadable model and a
    :class:`ConfigError` when no conv block matches or ``freeze_layers`` is out of range.
    """
    source, source_classes = _load_logged_model(tracker, run_id)
    mine, theirs = _blocks(target), _blocks(source)
    result = Transfer(run_id)
    mismatch = ""
    for k, ((conv, bn), (src_conv, src_bn)) in enumerate(zip(mine, theirs, strict=False)):
        pairs = [(conv, src_conv)] + (
            [(bn, src_bn)] if bn is not None or src_bn is not None else []
        )
        mismatch = _mismatch(pairs)
        if mismatch:
            mismatch = f"conv layer {k + 1}: {mismatch}"
            break
        for layer, src in pairs:
            result.weights[layer.name] = src.get_weights()
        result.loaded_blocks = k + 1
    if result.loaded_blocks == 0:
        why = mismatch or "the run's model has no conv layer"
        raise ConfigError(
            f"init_from={run_id}: no layer of this stack matches the run's model ({why}); "
            "start from a run whose first conv layers have the same shapes"
        )
    same_classes = source_classes == [str(name) for name in class_names]
    if same_classes and result.loaded_blocks == len(mine) == len(theirs):
        head = [
            (layer, _layer_or_none(source, layer.name))
            for layer in target.layers
            if layer.name.startswith("dense") or layer.name == "classifier"
        ]
        if not _mismatch(head):
            result.weights.update({layer.name: src.get_weights() for layer, src in head})
            result.head_copied = True
    if not 0 <= freeze_layers <= result.loaded_blocks:
        raise ConfigError(
            f"trainer.freeze_layers={freeze_layers}: only {result.loaded_blocks} conv layers "
            f"were loaded from init_from={run_id}; freeze between 0 and {result.loaded_blocks}"
        )
    result.frozen_blocks = freeze_layers
    return result


def _load_logged_model(tracker: Tracker, run_id: str) -> tuple[keras.Model, list[str] | None]:
    """The run's logged Keras model and the class names it was logged with (None if unknown)."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = tracker.download_model(run_id, Path(tmp), key="init_from")
        found = sorted(folder.rglob("*.keras"))
        if not found:
            raise TrackingError(
                f"init_from={run_id}: its logged model holds no .keras file (not saved by "
                "convnets); start from a run that python train.py recorded"
            )
        names = tracker.model_metadata(folder).get("class_names")
        try:  # safe mode: no code from the file; compile=False: only the weights are wanted
            model = keras.saving.load_model(found[0], safe_mode=True, compile=False)
        except (OSError, ValueError) as err:
            raise TrackingError(
                f"init_from={run_id}: its logged model cannot be loaded "
                f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
            ) from err
    return model, [str(name) for name in names] if names is not None else None


def _blocks(model: keras.Model) -> list[tuple[keras.layers.Layer, keras.layers.Layer | None]]:
    """``(block{i}_conv, block{i}_bn or None)`` in block order (see :mod:`convnets.model`)."""
    blocks = []
    for layer in model.layers:
        block, _, kind = layer.name.partition("_")
        if kind == "conv" and block.startswith("block") and block[5:].isdigit():
            blocks.append((layer, _layer_or_none(model, f"{block}_bn")))
    return blocks


def _layer_or_none(model: keras.Model, name: str) -> keras.layers.Layer | None:
    return next((layer for layer in model.layers if layer.name == name), None)


def _mismatch(pairs) -> str:
    """Why the (target, source) layer pairs cannot share weights; "" when they can."""
    for layer, src in pairs:
        if layer is None or src is None:
            return f"{(layer or src).name} exists in only one of the models"
        mine = [tuple(w.shape) for w in layer.weights]
        theirs = [tuple(w.shape) for w in src.weights]
        if mine != theirs:
            return f"{layer.name} has weights {mine}, the run's {src.name} {theirs}"
    return ""
