"""Evaluating one model: ``python evaluate.py run_id=<id> | checkpoint=<path.keras>``.

:func:`evaluate_run` / :func:`evaluate_checkpoint` evaluate a model on its test split and draw
the figures (confusion matrix, misclassified examples, filters, feature maps, the effective
receptive field). :mod:`convnets.evaluate_job` decides which one ``python evaluate.py``
runs (``compare=`` goes to :mod:`convnets.comparison` without this module or TensorFlow).
"""

from __future__ import annotations

import logging
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np
from omegaconf import DictConfig, OmegaConf

from convnets import checkpoints, plots
from convnets.architecture import analyze, resolve_stack
from convnets.checks import check_dataset
from convnets.config import read_run_config
from convnets.data import check_available, load_data
from convnets.erf import ERF_IMAGES, ErfResult, effective_receptive_field, theoretical_rf_box
from convnets.errors import ConfigError, TrackingError, command, warn
from convnets.model import PREPROCESS, feature_map_layers
from convnets.tracking import CONFIG_ARTIFACT, MODEL_URI_TAG, Tracker, run_is_finished
from convnets.trainer import evaluate

log = logging.getLogger(__name__)

EVAL_DIR = "evaluation"  # artifact folder of evaluate.py's figures
MAX_MISCLASSIFIED = 24
MAX_FEATURE_CHANNELS = 8


@dataclass
class EvalReport:
    metrics: dict[str, float]
    figures: dict[str, Path] = field(default_factory=dict)
    erf: ErfResult | None = None


def _metric_name(class_name: str) -> str:
    """MLflow metric names allow letters, digits and ``_-. /``; anything else becomes ``_``."""
    return "eval_accuracy_class_" + re.sub(r"[^A-Za-z0-9_.\-]", "_", str(class_name))


def _displayable(images: np.ndarray, bundle: Any) -> np.ndarray:
    """Model input (the stored pixels, 0..max_pixel_value) -> displayable [0, 1] pixels."""
    return np.clip(images / bundle.max_pixel_value, 0.0, 1.0)


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
    if PREPROCESS not in {layer.name for layer in model.layers}:
        raise ConfigError(
            f"model {model.name!r} has no '{PREPROCESS}' layer: it was saved before models "
            "carried their input normalisation and expects normalised pixels, not the stored "
            "ones this evaluates on; retrain it (python train.py reproduce=<run id>)"
        )
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
            _displayable(x_test[wrong], bundle),
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
                _displayable(x_test[0], bundle), maps, max_channels=MAX_FEATURE_CHANNELS
            ),
        )

    erf = effective_receptive_field(model, x_test)
    if erf.side:  # 0: undefined (no input pixel affects the centre unit), not a field of 0 px
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


def is_keras_archive(path: str | Path) -> bool:
    """Whether ``path`` is a ``.keras`` archive (Keras itself says "File not found" for a file
    that is not one)."""
    import zipfile

    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            return "config.json" in archive.namelist()  # what every Keras archive holds
    return False


def check_keras_archive(path: str | Path) -> None:
    """Refuse a ``checkpoint=`` file that is not a ``.keras`` archive at all."""
    if Path(path).is_file() and not is_keras_archive(path):
        raise ConfigError(
            f"checkpoint={path}: not a Keras archive (a .keras file is the zip archive "
            "model.save writes, e.g. the model.keras beside a run's checkpoints)"
        )


def load_keras_model(
    path: str | Path, what: str | None = None, fix: str = "pass a .keras file"
) -> keras.Model:
    """Load a ``.keras`` file in Keras safe mode (no arbitrary code from the file). An error
    names it as ``what`` (default ``checkpoint=<path>``, the key the user gave) and says
    ``fix``."""
    check_keras_archive(path)
    try:
        return keras.saving.load_model(path, safe_mode=True, compile=True)
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"{what or f'checkpoint={path}'}: not a loadable Keras model ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); {fix}"
        ) from err


def check_input_shape(model: keras.Model, bundle: Any, dataset: str, what: str) -> None:
    """Refuse, before predicting, data whose images are not the size the model takes."""
    expected = tuple(model.inputs[0].shape[1:])
    given = tuple(bundle.input_shape)
    if expected != given:
        height, width, channels = expected
        if channels != given[2]:  # no resize changes it
            fix = f"give it {'grayscale' if channels == 1 else 'colour'} images"
        elif what.startswith("run_id="):  # the run's own dataset settings apply: no resize
            fix = (
                f"give it {height}x{width} images, or resize others by evaluating its model "
                f"file: checkpoint=<its model.keras> dataset=image_folder dataset.path=... "
                f"dataset.image_size=[{height},{width}]"
            )
        else:
            fix = (
                "pick the dataset it was trained on (dataset=...), or resize with "
                f"dataset.image_size=[{height},{width}] (image folders)"
            )
        raise ConfigError(
            f"{what}: the model takes {'x'.join(map(str, expected))} images but dataset="
            f"{dataset} gives {'x'.join(map(str, given))}; {fix}"
        )
    classes = int(model.outputs[0].shape[-1])
    if classes != bundle.num_classes:  # its accuracy would be counted against other labels
        raise ConfigError(
            f"{what}: the model tells {classes} classes apart but dataset={dataset} has "
            f"{bundle.num_classes}; pick the dataset it was trained on (dataset=...)"
        )


def check_trained_on(trained: Mapping[str, Any], bundle: Any, dataset: str, what: str) -> None:
    """Warn when the data differs from what the model was trained on in a way the shapes do
    not show: its pixel range (the model divides by its own) or its class names (label k of
    one is counted as class k of the other). Only a warning: a user may know better."""
    trained_max = trained.get("max_pixel_value")
    if trained_max is not None and float(trained_max) != float(bundle.max_pixel_value):
        trained_max, given_max = f"{float(trained_max):g}", f"{float(bundle.max_pixel_value):g}"
        warn(
            f"{what}: the model was trained on pixels 0..{trained_max} and scales its input by "
            f"that range, but dataset={dataset}'s pixels are 0..{given_max} "
            "(dataset.max_pixel_value): its eval_accuracy says little about the model; store "
            f"the images as 0..{trained_max} (or, if they already are, set "
            f"dataset.max_pixel_value={trained_max})"
        )
    names = trained.get("class_names")
    if names is not None and [str(n) for n in names] != [str(n) for n in bundle.class_names]:
        warn(
            f"{what}: the model's classes are {_names(names)} but dataset={dataset}'s are "
            f"{_names(bundle.class_names)}: its eval_accuracy counts the k-th of one as the "
            "k-th of the other; evaluate data with the model's classes (an image folder: "
            "name its class folders as they are)"
        )


def _names(names: Any, shown: int = 6) -> str:
    names = [str(n) for n in names]
    return ", ".join(names[:shown]) + (f", ... ({len(names)} in all)" if len(names) > shown else "")


def model_metadata(folder: Path) -> dict[str, Any]:
    """The metadata a logged model records (its ``MLmodel`` file in ``folder``: the pixel
    range and class names it was trained on); empty without one."""
    from mlflow.models import Model

    if not (folder / "MLmodel").is_file():
        return {}
    try:
        return dict(Model.load(folder).metadata or {})
    except Exception:  # noqa: BLE001 - a damaged MLmodel only costs the check it feeds
        return {}


def _load_logged_model(tracker: Tracker, run: Any, dst: Path) -> tuple[keras.Model, dict]:
    """The model the run logged (its ``model_uri`` tag) and its :func:`model_metadata`."""
    run_id = run.info.run_id
    try:
        local = Path(tracker.download_model(run_id, dst))
    except TrackingError as err:
        raise TrackingError(
            f"{err}; retrain it, or evaluate a saved model with checkpoint=<path.keras>"
        ) from err
    found = sorted(local.rglob("*.keras"))
    if not found:
        raise TrackingError(
            f"run_id={run_id}: its logged model holds no .keras file (not saved by convnets); "
            "evaluate a saved model with checkpoint=<path.keras>"
        )
    # Named as the user knows it (the run and its artifact), not by the temporary copy.
    artifact = f"{run.data.tags.get(MODEL_URI_TAG)}, file {found[0].relative_to(local)}"
    retrain = (
        f"retrain it ({command('train')} reproduce={run_id}), or evaluate a copy saved "
        "elsewhere with checkpoint=<path.keras>"
    )
    if not is_keras_archive(found[0]):
        raise TrackingError(
            f"run_id={run_id}: its logged model (artifact {artifact}) is not a Keras archive: "
            f"it was damaged after it was logged; {retrain}"
        )
    model = load_keras_model(
        found[0], f"run_id={run_id}: its logged model (artifact {artifact})", retrain
    )
    return model, model_metadata(local)


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
    tracker: Tracker,
    run_id: str,
    out_dir: str | Path,
    *,
    batch_size: int | None = None,
    dataset_overrides: Mapping[str, Any] | None = None,
) -> EvalReport:
    """``python evaluate.py run_id=...``: evaluate a run's logged model on its test split.

    Loads the model (Keras safe mode) and the run's ``config.yaml``, rebuilds the test split
    with the run's dataset config, seed and ``trainer.batch_size`` (unless ``batch_size``),
    and logs to the same run: the :func:`evaluate_model` metrics (``eval_*``) and the
    figures under ``evaluation/``. ``dataset_overrides`` (``{"dataset.path": ...}``: where
    the data lives on this machine) apply over the recorded dataset. Only FINISHED runs: a
    failed or killed run has no final model, a running one may not have logged it yet.
    """
    run = tracker.get_run(run_id)
    if run.info.status in ("RUNNING", "SCHEDULED"):
        folder = run.data.tags.get("checkpoint_dir")
        raise TrackingError(
            f"run_id={run_id}: the run is {run.info.status} (its model is logged when it "
            "ends); wait until it finishes"
            + (
                ", or evaluate the model.keras it saves in its checkpoint folder with "
                f"checkpoint={Path(folder) / 'model.keras'}"
                if folder
                else ""
            )
        )
    if not run_is_finished(run):
        reason = run.data.tags.get("failure_reason")
        raise TrackingError(
            f"run_id={run_id}: the run is {run.info.status}"
            + (f" ({reason.splitlines()[0][:200]})" if reason else "")
            + "; evaluate a FINISHED run (rerun it with python train.py reproduce=<id>)"
        )
    cfg = tracker.load_config(
        run_id,
        require=("dataset",),
        then="so the data to test its model on is unknown; evaluate the model with "
        "checkpoint=<its model.keras> dataset=<name>",
    )
    _apply(cfg, dataset_overrides or {})
    with tempfile.TemporaryDirectory() as tmp:
        model, trained = _load_logged_model(tracker, run, Path(tmp))
    bundle = _bundle(cfg, batch_size)
    check_input_shape(model, bundle, cfg.dataset.name, f"run_id={run_id}")
    check_trained_on(trained, bundle, cfg.dataset.name, f"run_id={run_id}")
    recorded = run.data.tags.get("data_digest.test")
    if recorded and bundle.digests.get("test") not in (None, recorded):
        warn(
            f"run_id={run_id}: these test images differ from the ones the run was tested on "
            "(test digest changed), so eval_accuracy, logged to the run, measures other data "
            "than its test_accuracy"
        )
    report = evaluate_model(
        model, bundle, out_dir, analysis=_analysis(cfg, bundle), title=run.info.run_name or ""
    )
    logged = {k: v for k, v in report.metrics.items() if k.startswith("eval_")}
    tracker.log_metrics_to(run_id, logged)
    tracker.log_artifacts_to(run_id, out_dir, EVAL_DIR)
    return report


def checkpoint_config(
    path: str | Path, dataset: Any = None, dataset_overrides: Mapping[str, Any] | None = None
) -> DictConfig:
    """The config of a local ``.keras`` model: ``config.yaml`` next to it, else ``dataset``.

    ``config.yaml`` (e.g. a run's downloaded artifact, or Hydra's resolved config) gives the
    dataset, trainer.batch_size/seed and the model stack (for the theoretical receptive
    field). Without one, ``dataset=<name>`` on the command line says which test split to
    use; the receptive-field box is then left out of the ERF figure. ``dataset_overrides``
    (``dataset.<key>`` values given without a ``dataset=<name>``) apply over the recorded one.
    """
    path = Path(path)
    checkpoints.check_model_file(path)
    beside = path.parent / CONFIG_ARTIFACT
    if beside.is_file():
        cfg = read_run_config(beside, f"checkpoint={path}", ("dataset",))
        if dataset is not None:
            cfg.dataset = dataset
        elif dataset_overrides:
            _apply(cfg, dataset_overrides)
            check_dataset(cfg)
        return cfg
    if dataset is None:
        given = f" ({', '.join(dataset_overrides)} alone cannot say)" if dataset_overrides else ""
        raise ConfigError(
            f"checkpoint={path}: no {CONFIG_ARTIFACT} next to it, so the dataset is unknown"
            f"{given}; add dataset=<name> (e.g. dataset=digits) or put the run's "
            f"{CONFIG_ARTIFACT} beside it"
        )
    return OmegaConf.create({"dataset": dataset})


def _apply(cfg: DictConfig, overrides: Mapping[str, Any]) -> None:
    """``{"dataset.path": ...}`` values over a recorded config."""
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value, merge=False)


def checkpoint_trained_on(path: str | Path) -> dict[str, Any]:
    """What a local ``.keras`` model was trained on, where that is recorded beside it: the
    metadata of a downloaded logged model (its ``MLmodel``, beside the file or above its
    ``data/`` folder), else the pixel range of the run's ``config.yaml`` beside it."""
    path = Path(path)
    folders = [path.parent, *([path.parent.parent] if path.parent.name == "data" else [])]
    for folder in folders:
        metadata = model_metadata(folder)
        if metadata:
            return metadata
    beside = path.parent / CONFIG_ARTIFACT
    if beside.is_file():
        recorded = read_run_config(beside, f"checkpoint={path}", ("dataset",))
        value = OmegaConf.select(recorded, "dataset.max_pixel_value")
        if value is not None:
            return {"max_pixel_value": value}
    return {}


def evaluate_checkpoint(
    path: str | Path,
    out_dir: str | Path,
    *,
    dataset: Any = None,
    dataset_overrides: Mapping[str, Any] | None = None,
    batch_size: int | None = None,
) -> EvalReport:
    """``python evaluate.py checkpoint=<path.keras>``: figures and metrics, written locally."""
    check_keras_archive(path)  # before asking for the dataset a model would need
    cfg = checkpoint_config(path, dataset, dataset_overrides)
    model = load_keras_model(path)
    bundle = _bundle(cfg, batch_size)
    check_input_shape(model, bundle, cfg.dataset.name, f"checkpoint={path}")
    check_trained_on(checkpoint_trained_on(path), bundle, cfg.dataset.name, f"checkpoint={path}")
    return evaluate_model(
        model, bundle, out_dir, analysis=_analysis(cfg, bundle), title=Path(path).name
    )
