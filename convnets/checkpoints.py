"""A training's checkpoint directory: its layout and its commit record (no TensorFlow here).

Layout (``checkpoint_dir``), written by :mod:`convnets.trainer` only at epoch ends:

- ``epoch-NNNN.weights.h5``: model + optimizer state after epoch NNNN (the last one kept)
- ``best-NNNN.weights.h5``: the weights of the best epoch by ``val_accuracy``
- ``state.json``: the commit record naming the two files above (bare names of that pattern,
  each with its sha256, checked by :func:`verify` before anything is loaded), the last completed epoch,
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

import contextlib
import hashlib
import json
import os
import re
from pathlib import Path

from convnets import folder_lock
from convnets.errors import CheckpointError, ConfigError, DiskFull, out_of_space

STATE_FILE = "state.json"
LOCK_FILE = "training.lock"  # host, pid and start of the process training into the folder
FINAL_MODEL = "model.keras"
FINAL_CONFIG = "config.yaml"  # the name evaluate.py looks for beside a .keras file


def check_model_file(path: Path) -> None:
    """Refuse ``checkpoint=<path>`` that names no file, before TensorFlow loads."""
    if path.is_dir():
        hint = " (it holds one)" if (path / FINAL_MODEL).is_file() else ""
        raise ConfigError(
            f"checkpoint={path} is a folder{hint}; pass the path of a .keras model, e.g. "
            f"checkpoint={path / FINAL_MODEL}"
        )
    if not path.is_file():
        raise ConfigError(f"checkpoint={path}: no such file; pass the path of a .keras model")


def read_state(checkpoint_dir: str | Path) -> dict | None:
    """The committed ``state.json`` of ``checkpoint_dir``, or None when there is none; a file
    that is not a commit record (not JSON, not an object, no whole epoch number of at least
    1) is a :class:`CheckpointError` naming it. It is only ever replaced whole, so a damaged
    one was damaged after it was written."""
    path = Path(checkpoint_dir) / STATE_FILE
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError is a ValueError
        raise CheckpointError(
            f"{path}: not a readable commit record ({type(err).__name__}); the file was "
            "damaged after it was written, so which epoch the folder holds is unknown"
        ) from None
    epoch = state.get("epoch") if isinstance(state, dict) else None
    if type(epoch) is not int or epoch < 1:  # bool is an int: excluded
        raise CheckpointError(
            f"{path}: not a commit record (its epoch is {epoch!r}, expected a whole number "
            "of at least 1); the file was changed after it was written"
        )
    return state


WEIGHTS_NAME = re.compile(r"(epoch|best)-\d{4}\.weights\.h5")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify(checkpoint_dir: str | Path, state: dict) -> None:
    """Refuse, in one line, a committed state whose weights files cannot be trusted: a name
    that is not a bare ``epoch-NNNN.weights.h5`` / ``best-NNNN.weights.h5`` (an absolute path
    or ``..`` would read outside the folder), a missing file, or one whose sha256 differs from
    the recorded one (swapped in from another run, or changed). Records written before
    digests were kept are checked by name only."""
    folder = Path(checkpoint_dir)
    digests = state.get("sha256") or {}
    for key in ("last", "best"):
        name = state.get(key)
        if name is None:
            continue
        if not isinstance(name, str) or not WEIGHTS_NAME.fullmatch(name):
            raise CheckpointError(
                f"{folder / STATE_FILE}: {key}={name!r} is not a weights file of this folder "
                "(expected e.g. epoch-0003.weights.h5); refusing to load it"
            )
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{path}: named by {STATE_FILE} but missing; cannot continue")
        if name in digests and sha256(path) != digests[name]:
            raise CheckpointError(
                f"{path}: its sha256 differs from the one {STATE_FILE} recorded (the file was "
                "replaced or changed after the epoch was committed); refusing to load it"
            )


@contextlib.contextmanager
def held(checkpoint_dir: str | Path):
    """Mark ``checkpoint_dir`` as being trained into by this process while the block runs, so
    that ``resume=`` refuses it instead of splicing a second training into a live one."""
    try:
        with folder_lock.held(checkpoint_dir, LOCK_FILE):
            yield
    except folder_lock.FolderHeld as err:
        raise CheckpointError(
            f"{err.folder}: {err.holder} is training into it; stop that process first (if "
            f"it is gone for good, delete {err.lock})"
        ) from None


def live_holder(checkpoint_dir: str | Path) -> str | None:
    """Who trains into ``checkpoint_dir`` now ("process 123 on host"), or None."""
    return folder_lock.live_holder(checkpoint_dir, LOCK_FILE)


@contextlib.contextmanager
def replacing(path: Path, tmp_name: str | None = None):
    """Yield a temporary path beside ``path`` to write; on success it replaces ``path``
    atomically (a reader sees the old file or the whole new one). On failure the partial
    file is removed, and a full disk is a :class:`DiskFull` naming ``path``. ``tmp_name``:
    Keras picks the format by suffix, so its files keep theirs (``.tmp-model.keras``)."""
    tmp = path.with_name(tmp_name or f".{path.name}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if out_of_space(err):
            raise DiskFull(path) from err
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` so that a reader sees the old file or the whole new one."""
    with replacing(path) as tmp, open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
