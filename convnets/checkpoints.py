"""A training's checkpoint directory: its layout and its commit record (no TensorFlow here).

Layout (``checkpoint_dir``), written by :mod:`convnets.trainer` only at epoch ends:

- ``epoch-NNNN.weights.h5``: model + optimizer state after epoch NNNN (the last one kept)
- ``best-NNNN.weights.h5``: the weights of the best epoch by ``val_accuracy``
- ``state.json``: the commit record naming the two files above, the last completed epoch,
  every completed epoch's logs and the ``identity`` the caller gave (the job: the MLflow run
  id and the config digest, so a resume can refuse a checkpoint that is not its own). It is
  replaced atomically *after* the files it names are complete, so a process killed at any
  moment leaves a consistent last completed epoch.
- ``model.keras`` + ``config.yaml``: the final model (the weights that were tested) and the
  run's resolved config, written by :func:`convnets.trainer.save_final_model` once training
  is done, so ``python evaluate.py checkpoint=<dir>/model.keras`` works without the MLflow
  store.

A directory holds one training's checkpoint: a fresh fit never clears or overwrites one it
finds there (it refuses), so two trainings cannot splice each other's weights. Reading the
commit record needs no TensorFlow, so a resume is checked before it loads.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

STATE_FILE = "state.json"
FINAL_MODEL = "model.keras"
FINAL_CONFIG = "config.yaml"  # the name evaluate.py looks for beside a .keras file


def read_state(checkpoint_dir: str | Path) -> dict | None:
    """The committed ``state.json`` of ``checkpoint_dir``, or None when there is none."""
    try:
        return json.loads((Path(checkpoint_dir) / STATE_FILE).read_text())
    except FileNotFoundError:
        return None


def atomic_write_text(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` so that a reader sees the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
