"""Evaluation: effective receptive field, evaluating a logged model, comparing runs.

* :func:`effective_receptive_field` measures the ERF of a trained model (Luo et al. 2016);
  the job calls it at the end of every run.
* :func:`evaluate_run` / :func:`evaluate_checkpoint` evaluate a model on its test split and
  draw the figures (``python evaluate.py run_id=...`` / ``checkpoint=...``).
* :func:`compare` reads finished runs with ``mlflow.search_runs`` and writes the CSV and the
  accuracy-vs-params / accuracy-vs-receptive-field plots with the Pareto front;
  :func:`summary_figures` draws those plots from any runs table (the sweep summary reuses it).
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import mlflow
import numpy as np
import pandas as pd
import tensorflow as tf
from mlflow.entities import Metric
from mlflow.environment_variables import MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR
from omegaconf import DictConfig, OmegaConf

from convnets import plots
from convnets.architecture import analyze, resolve_stack
from convnets.data import check_available, load_data
from convnets.errors import ConfigError, TrackingError
from convnets.model import feature_map_layers, feature_model
from convnets.tracking import CONFIG_ARTIFACT, MODEL_ARTIFACT, Tracker, run_is_finished
from convnets.trainer import evaluate

log = logging.getLogger(__name__)

ERF_MASS = 0.95  # fraction of the gradient mass the ERF square holds
ERF_IMAGES = 64  # test images the ERF gradient is averaged over
EVAL_DIR = "evaluation"  # artifact folder of evaluate.py's figures
COMPARE_DIR = "compare"  # artifact folder of the compare report on a sweep parent run
MAX_MISCLASSIFIED = 24
MAX_FEATURE_CHANNELS = 8


# ---------------------------------------------------------------- effective receptive field


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
    interact), over up to ``max_images`` of ``images`` (an array/tensor in the model's
    normalised input space, or a dataset of (images, labels) batches: use real test images).
    The map is |gradient| summed over input channels and averaged over the images.

    ``side`` is the side of the smallest square holding ``mass`` of the map's total, placed
    around the gradient's centre of mass (see :func:`erf_square`): the centroid, not the
    image centre, because after strides/pools the centre unit's receptive field is not
    centred on the image. Cost: one forward and one backward pass over one batch.
    """
    x = _take_images(images, max_images)
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
        log.warning("effective receptive field: the centre unit's gradient is zero everywhere")
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


# ---------------------------------------------------------------- Pareto front


def pareto_front(xs: Sequence[float], ys: Sequence[float]) -> list[int]:
    """Indices of the points no other point beats on both: smaller-or-equal x, larger-or-equal y.

    "Cheapest for its accuracy": minimise x (parameters, receptive field), maximise y
    (accuracy). A point is on the front unless another has x <= its x and y >= its y with
    one of them strict; identical points are all on it. NaN/inf points are ignored.
    Returned in increasing x (the order to draw the front as a step line).
    """
    x = np.asarray(xs, dtype=float)
    y = np.asarray(ys, dtype=float)
    valid = [i for i in range(len(x)) if np.isfinite(x[i]) and np.isfinite(y[i])]
    front: list[int] = []
    best = -math.inf
    for i in sorted(valid, key=lambda i: (x[i], -y[i])):
        if y[i] > best:
            front.append(i)
            best = y[i]
        elif y[i] == best and x[i] == x[front[-1]]:
            front.append(i)
    return front


# ---------------------------------------------------------------- comparison


METRIC_COLUMNS = (
    "test_accuracy",
    "param_count",
    "receptive_field",
    "effective_receptive_field",
    "macs",
)
# Parameters that differ between runs without being a design choice.
_NOISE_PARAMS = ("tracking.", "hydra.", "reproduce", "resume", "trainer.verbose")


def runs_table(runs: pd.DataFrame) -> pd.DataFrame:
    """``mlflow.search_runs`` output -> one row per run, best test accuracy first.

    Columns: ``run_id``, ``name``, the params whose values differ between the runs (without
    the ``params.`` prefix; their names also in ``table.attrs["params"]``), then
    :data:`METRIC_COLUMNS` (NaN where a run lacks one).
    """
    params = [
        c
        for c in runs.columns
        if c.startswith("params.")
        and not c[len("params.") :].startswith(_NOISE_PARAMS)
        and runs[c].astype(str).nunique() > 1
    ]
    table = pd.DataFrame(
        {
            "run_id": runs["run_id"],
            "name": runs.get("tags.mlflow.runName", pd.Series("", index=runs.index)),
        }
    )
    for c in params:
        table[c[len("params.") :]] = runs[c]
    table.attrs["params"] = [c[len("params.") :] for c in params]
    for m in METRIC_COLUMNS:
        table[m] = runs.get(f"metrics.{m}", pd.Series(np.nan, index=runs.index))
    return table.sort_values("test_accuracy", ascending=False, kind="stable").reset_index(drop=True)


def summary_figures(runs: pd.DataFrame, out_dir: str | Path) -> dict[str, Path]:
    """Test accuracy vs parameter count (log x, coloured by receptive field) and vs receptive
    field (coloured by parameter count), Pareto fronts marked; also vs the effective
    receptive field when runs have it. Returns ``{figure name: PNG path}``.

    ``runs``: :func:`runs_table` output or any frame with columns ``test_accuracy``,
    ``param_count``, ``receptive_field`` (optionally ``effective_receptive_field`` and a
    ``name``/``run_name`` for labels); rows without a test accuracy (failed jobs) are left
    out. ``mlflow.search_runs`` output is converted, so points are labelled by the params
    that differ between the runs.
    """
    if "metrics.test_accuracy" in runs.columns:
        runs = runs_table(runs)
    runs = runs[runs["test_accuracy"].notna()].reset_index(drop=True)
    out_dir = Path(out_dir)
    labels = _point_labels(runs)
    acc = runs["test_accuracy"].to_numpy(float)
    specs = [
        (
            "accuracy_vs_params",
            "param_count",
            "parameters (log scale)",
            True,
            "receptive_field",
            "receptive field (pixels)",
        ),
        (
            "accuracy_vs_receptive_field",
            "receptive_field",
            "theoretical receptive field (pixels)",
            False,
            "param_count",
            "parameters",
        ),
        (
            "accuracy_vs_effective_receptive_field",
            "effective_receptive_field",
            f"effective receptive field (pixels, {ERF_MASS:.0%} of gradient)",
            False,
            "param_count",
            "parameters",
        ),
    ]
    paths: dict[str, Path] = {}
    for name, x_col, x_label, log_x, c_col, c_label in specs:
        if x_col not in runs.columns or runs[x_col].isna().all():
            continue
        x = runs[x_col].to_numpy(float)
        color = runs[c_col].to_numpy(float) if c_col in runs.columns else None
        front = pareto_front(x, acc)
        fig = plots.pareto_scatter(
            x,
            acc,
            front,
            xlabel=x_label,
            title=f"Test accuracy vs {x_label.split(' (')[0]} ({len(runs)} runs; "
            "front: best accuracy for its cost)",
            color=color,
            color_label=c_label,
            log_x=log_x,
            labels=labels,
        )
        paths[name] = plots.save(fig, out_dir / f"{name}.png")
    return paths


def _point_labels(runs: pd.DataFrame) -> list[str] | None:
    """What tells the runs apart: the differing params (``kernel_size=5``) that
    :func:`runs_table` found, else the run name."""
    params = runs.attrs.get("params")
    if params:
        short = {c: c.removeprefix("model.").removeprefix("layer_defaults.") for c in params}
        return [", ".join(f"{short[c]}={row[c]}" for c in params) for _, row in runs.iterrows()]
    for col in ("name", "run_name"):
        if col in runs.columns:
            return list(runs[col].astype(str))
    return None


@dataclass
class CompareReport:
    table: pd.DataFrame
    csv: Path
    figures: dict[str, Path]
    parent_run_id: str | None = None  # set when the report was logged to a sweep parent


def _finished_runs(tracker: Tracker, target: str) -> tuple[pd.DataFrame, str | None]:
    """FINISHED runs of experiment ``target``, or the children of run ``target``."""
    client = tracker.client
    parent = None
    if re.fullmatch(r"[0-9a-f]{32}", target):
        with contextlib.suppress(TrackingError):
            parent = tracker.get_run(target, key="compare")
    if parent is not None:
        runs = mlflow.search_runs(
            experiment_ids=[parent.info.experiment_id],
            filter_string=(
                f"tags.`mlflow.parentRunId` = '{target}' and attributes.status = 'FINISHED'"
            ),
        )
        where = f"compare={target}: the sweep parent run has no FINISHED child runs"
    else:
        experiment = client.get_experiment_by_name(target)
        if experiment is None:
            raise TrackingError(
                f"compare={target}: no experiment of that name and no run with that id in "
                f"{tracker.shown_uri}; check tracking.uri, or list experiments with "
                "`mlflow experiments search`"
            )
        runs = mlflow.search_runs(
            experiment_ids=[experiment.experiment_id],
            filter_string="attributes.status = 'FINISHED'",
        )
        # Sweep parents sit in the experiment next to their jobs; they are not runs to compare.
        if len(runs) and "tags.mlflow.parentRunId" in runs.columns:
            runs = runs[~runs["run_id"].isin(set(runs["tags.mlflow.parentRunId"].dropna()))]
        where = f"compare={target}: experiment {target!r} has no FINISHED runs"
    if len(runs) and "metrics.test_accuracy" in runs.columns:
        runs = runs[runs["metrics.test_accuracy"].notna()]
    else:
        runs = runs.iloc[0:0]
    if len(runs) == 0:
        raise TrackingError(f"{where} with a test_accuracy; train some first (python train.py)")
    return runs.reset_index(drop=True), parent.info.run_id if parent is not None else None


def compare(tracker: Tracker, target: str, out_dir: str | Path) -> CompareReport:
    """Comparison report of an experiment's (or a sweep parent's) FINISHED runs.

    Writes ``runs.csv`` (:func:`runs_table`, plus ``pareto_params`` / ``pareto_rf``: whether
    the run is on the front of accuracy vs parameters / vs receptive field) and the
    :func:`summary_figures` PNGs to ``out_dir``; when ``target`` is a run id they are also
    logged to that run under ``compare/``.
    """
    runs, parent_id = _finished_runs(tracker, target)
    table = runs_table(runs)
    acc = table["test_accuracy"]
    for flag, col in (("pareto_params", "param_count"), ("pareto_rf", "receptive_field")):
        on_front = set(pareto_front(table[col], acc))
        table[flag] = [i in on_front for i in range(len(table))]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv = out_dir / "runs.csv"
    table.to_csv(csv, index=False)
    figures = summary_figures(table, out_dir)
    if parent_id is not None:
        for path in (csv, *figures.values()):
            tracker.client.log_artifact(parent_id, str(path), COMPARE_DIR)
    log.info("compare: %d runs; report in %s", len(table), out_dir)
    return CompareReport(table, csv, figures, parent_id)


# ---------------------------------------------------------------- evaluating one model


@dataclass
class EvalReport:
    metrics: dict[str, float]
    figures: dict[str, Path] = field(default_factory=dict)
    erf: ErfResult | None = None


def _metric_name(class_name: str) -> str:
    """MLflow metric names allow letters, digits and ``_-. /``; anything else becomes ``_``."""
    return "eval_accuracy_class_" + re.sub(r"[^A-Za-z0-9_.\-]", "_", str(class_name))


def _unnormalise(images: np.ndarray, bundle: Any) -> np.ndarray:
    """Model input -> displayable [0, 1] pixels: invert (x / scale - mean) / std."""
    mean = np.asarray(bundle.mean, dtype=np.float32)
    std = np.asarray(bundle.std, dtype=np.float32)
    return np.clip(images * std + mean, 0.0, 1.0)


def _first_conv(model: keras.Model) -> keras.layers.Layer | None:
    return next((lyr for lyr in model.layers if isinstance(lyr, keras.layers.Conv2D)), None)


def evaluate_model(
    model: keras.Model,
    bundle: Any,
    out_dir: str | Path,
    *,
    analysis: Any = None,
    title: str = "",
) -> EvalReport:
    """Evaluate ``model`` on ``bundle.test`` and draw the figures into ``out_dir``.

    Metrics: ``eval_loss`` and ``eval_accuracy`` from :func:`convnets.trainer.evaluate` (the
    function the job computes ``test_*`` with, so they agree exactly), per-class accuracy
    (recall) ``eval_accuracy_class_<name>``, and ``effective_receptive_field``. ``analysis``
    (from :func:`convnets.architecture.analyze`) draws the theoretical receptive field box.
    """
    out_dir = Path(out_dir)
    scores = evaluate(model, bundle.test)
    metrics = {"eval_loss": float(scores["loss"]), "eval_accuracy": float(scores["accuracy"])}

    images, labels, probs = [], [], []
    for x, y in bundle.test:
        images.append(x.numpy())
        labels.append(y.numpy())
        probs.append(model(x, training=False).numpy())
    x_test = np.concatenate(images)
    y_test = np.concatenate(labels)
    if y_test.ndim == 2:  # one-hot labels
        y_test = y_test.argmax(axis=1)
    prob = np.concatenate(probs)
    pred = prob.argmax(axis=1)
    names = list(bundle.class_names)
    n = len(names)
    matrix = np.zeros((n, n), dtype=np.int64)
    np.add.at(matrix, (y_test, pred), 1)
    for k, name in enumerate(names):
        support = matrix[k].sum()
        if support:
            metrics[_metric_name(name)] = float(matrix[k, k] / support)

    sub = f" - {title}" if title else ""
    figures: dict[str, Path] = {}

    def put(name: str, fig: Any) -> None:
        figures[name] = plots.save(fig, out_dir / f"{name}.png")

    put(
        "confusion_matrix",
        plots.confusion_matrix(
            matrix,
            names,
            title=f"Confusion matrix, test set (accuracy {metrics['eval_accuracy']:.4f}){sub}",
        ),
    )
    all_wrong = np.flatnonzero(pred != y_test)
    wrong = all_wrong[:MAX_MISCLASSIFIED]
    put(
        "misclassified",
        plots.misclassified_grid(
            _unnormalise(x_test[wrong], bundle),
            y_test[wrong],
            pred[wrong],
            names,
            confidence=prob[wrong, pred[wrong]],
            total=len(all_wrong),
        ),
    )
    conv = _first_conv(model)
    if conv is not None:
        put("filters", plots.filters(keras.ops.convert_to_numpy(conv.kernel)))
    layer_names = feature_map_layers(model)
    if layer_names:
        probe = keras.Model(model.input, [model.get_layer(nm).output for nm in layer_names])
        outputs = probe(x_test[:1], training=False)
        outputs = outputs if isinstance(outputs, list | tuple) else [outputs]
        maps = [(nm, np.asarray(o)[0]) for nm, o in zip(layer_names, outputs, strict=True)]
        put(
            "feature_maps",
            plots.feature_maps(
                _unnormalise(x_test[0], bundle), maps, max_channels=MAX_FEATURE_CHANNELS
            ),
        )

    erf = effective_receptive_field(model, x_test)
    metrics["effective_receptive_field"] = float(erf.side)
    rf_box = theoretical_rf_box(analysis) if analysis is not None else None
    rf_text = f", theoretical RF {rf_box[2]}x{rf_box[3]}" if rf_box else ""
    put(
        "effective_receptive_field",
        plots.erf_map(
            erf.grad_map,
            erf_box=erf.box if erf.side else None,
            erf_mass=erf.mass,
            rf_box=rf_box,
            title=(
                f"Effective receptive field: {erf.side} px{rf_text}\n"
                f"centre unit {erf.unit} of the last feature map, "
                f"mean over {min(len(x_test), ERF_IMAGES)} test images"
            ),
        ),
    )
    return EvalReport(metrics, figures, erf)


def load_keras_model(path: str | Path) -> keras.Model:
    """Load a ``.keras`` file in Keras safe mode (no arbitrary code from the file)."""
    try:
        return keras.saving.load_model(path, safe_mode=True, compile=True)
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"checkpoint={path}: not a loadable Keras model ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); pass a .keras file"
        ) from err


def _download_model(tracker: Tracker, run_id: str, dst: Path) -> Path:
    """The ``.keras`` file of the model the run logged (``runs:/<id>/model``)."""
    try:
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=f"runs:/{run_id}/{MODEL_ARTIFACT}",
            dst_path=str(dst),
            tracking_uri=tracker.uri,
        )
    except Exception as err:  # noqa: BLE001 - MLflow raises several types for "not there"
        raise TrackingError(
            f"run_id={run_id}: the run has no logged model (artifact '{MODEL_ARTIFACT}'); it "
            "was trained with tracking.log_model=false: retrain it, or evaluate a saved model "
            "with checkpoint=<path.keras>"
        ) from err
    found = sorted(Path(local).rglob("*.keras"))
    if not found:
        raise TrackingError(
            f"run_id={run_id}: the logged '{MODEL_ARTIFACT}' holds no .keras file (not saved "
            "by convnets); evaluate a saved model with checkpoint=<path.keras>"
        )
    return found[0]


def _bundle(cfg: DictConfig, batch_size: int | None) -> Any:
    """The test split exactly as the run saw it (same dataset config, seed and batch size)."""
    check_available(cfg.dataset)
    trainer = cfg.get("trainer") or {}
    return load_data(
        cfg.dataset,
        batch_size=int(batch_size or trainer.get("batch_size", 64)),
        seed=int(trainer.get("seed", 0)),
        deterministic=bool(trainer.get("deterministic", False)),
    )


def _analysis(cfg: DictConfig, bundle: Any) -> Any:
    """Theoretical receptive field etc. of the run's stack, or None without a model config."""
    if cfg.get("model") is None:
        return None
    return analyze(resolve_stack(cfg.model), bundle.input_shape, bundle.num_classes)


def evaluate_run(
    tracker: Tracker, run_id: str, out_dir: str | Path, *, batch_size: int | None = None
) -> EvalReport:
    """``python evaluate.py run_id=...``: evaluate a run's logged model on its test split.

    Loads the model (Keras safe mode) and the run's ``config.yaml``, rebuilds the test split
    with the run's dataset config, seed and ``trainer.batch_size`` (unless ``batch_size``),
    and logs to the same run: the :func:`evaluate_model` metrics (``eval_*``) and the
    figures under ``evaluation/``. Only FINISHED runs: a failed or killed run has no final
    model, a running one may not have logged it yet.
    """
    run = tracker.get_run(run_id)
    if not run_is_finished(run):
        reason = run.data.tags.get("failure_reason")
        raise TrackingError(
            f"run_id={run_id}: the run is {run.info.status}"
            + (f" ({reason.splitlines()[0][:200]})" if reason else "")
            + "; evaluate a FINISHED run (rerun it with python train.py reproduce=<id>)"
        )
    cfg = tracker.load_config(run_id)
    with tempfile.TemporaryDirectory() as tmp:
        model = load_keras_model(_download_model(tracker, run_id, Path(tmp)))
    bundle = _bundle(cfg, batch_size)
    report = evaluate_model(
        model, bundle, out_dir, analysis=_analysis(cfg, bundle), title=run.info.run_name or ""
    )
    stamp = int(time.time() * 1000)
    logged = {k: v for k, v in report.metrics.items() if k.startswith("eval_")}
    tracker.client.log_batch(run_id, metrics=[Metric(k, v, stamp, 0) for k, v in logged.items()])
    tracker.client.log_artifacts(run_id, str(out_dir), EVAL_DIR)
    return report


def checkpoint_config(path: str | Path, dataset: Any = None) -> DictConfig:
    """The config of a local ``.keras`` model: ``config.yaml`` next to it, else ``dataset``.

    ``config.yaml`` (e.g. a run's downloaded artifact, or Hydra's resolved config) gives the
    dataset, trainer.batch_size/seed and the model stack (for the theoretical receptive
    field). Without one, ``dataset=<name>`` on the command line says which test split to
    use; the receptive-field box is then left out of the ERF figure.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint={path}: no such file; pass the path of a .keras model")
    beside = path.parent / CONFIG_ARTIFACT
    if beside.is_file():
        cfg = OmegaConf.load(beside)
        if dataset is not None:
            cfg.dataset = dataset
        return cfg
    if dataset is None:
        raise ConfigError(
            f"checkpoint={path}: no {CONFIG_ARTIFACT} next to it, so the dataset is unknown; "
            f"add dataset=<name> (e.g. dataset=digits) or put the run's {CONFIG_ARTIFACT} beside it"
        )
    return OmegaConf.create({"dataset": dataset})


def evaluate_checkpoint(
    path: str | Path,
    out_dir: str | Path,
    *,
    dataset: Any = None,
    batch_size: int | None = None,
) -> EvalReport:
    """``python evaluate.py checkpoint=<path.keras>``: figures and metrics, written locally."""
    cfg = checkpoint_config(path, dataset)
    model = load_keras_model(path)
    bundle = _bundle(cfg, batch_size)
    return evaluate_model(
        model, bundle, out_dir, analysis=_analysis(cfg, bundle), title=Path(path).name
    )


# ---------------------------------------------------------------- entry point


def run(cfg: DictConfig, default_out_dir: str | Path) -> EvalReport | CompareReport:
    """What ``python evaluate.py`` does with its composed config (:class:`EvaluateConfig`).

    Exactly one of ``run_id``, ``checkpoint``, ``compare``. Files go to ``output_dir``
    (default ``default_out_dir``, Hydra's run directory): ``evaluation/*.png`` or the
    compare report.
    """
    chosen = [key for key in ("run_id", "checkpoint", "compare") if cfg.get(key)]
    if len(chosen) != 1:
        given = ", ".join(chosen) if chosen else "none"
        raise ConfigError(
            "evaluate.py needs exactly one of run_id=<mlflow run id>, checkpoint=<path.keras>, "
            f"compare=<experiment name or sweep parent run id> (given: {given})"
        )
    out_dir = Path(cfg.output_dir or default_out_dir)
    # A progress bar per downloaded file (config, model) is noise on a one-line command.
    MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.set(False)
    if cfg.checkpoint:
        report = evaluate_checkpoint(
            cfg.checkpoint, out_dir / EVAL_DIR, dataset=cfg.dataset, batch_size=cfg.batch_size
        )
        log.info("checkpoint %s: %s; figures in %s", cfg.checkpoint, _fmt(report), out_dir)
        return report
    tracker = Tracker(cfg.tracking.uri, http_timeout_s=cfg.tracking.http_timeout_s)
    tracker.check_store()
    if cfg.compare:
        return compare(tracker, str(cfg.compare), out_dir)
    report = evaluate_run(tracker, str(cfg.run_id), out_dir / EVAL_DIR, batch_size=cfg.batch_size)
    log.info("run %s: %s; figures logged under %s/", cfg.run_id, _fmt(report), EVAL_DIR)
    return report


def _fmt(report: EvalReport) -> str:
    m = report.metrics
    return (
        f"eval_accuracy={m['eval_accuracy']:.4f} eval_loss={m['eval_loss']:.4f} "
        f"effective_receptive_field={m['effective_receptive_field']:.0f}"
    )
