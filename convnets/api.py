"""convnets from Python: the commands as functions that return values and raise errors.

    import convnets
    run = convnets.train(["trainer.epochs=2", "model.width=0.5"])
    run.test_accuracy, run.run_id, run.ui_url
    convnets.evaluate(run_id=run.run_id)
    convnets.compare("digits").table
    convnets.inspect(["model=vgg_small", "dataset=cifar10"]).receptive_field

Each call composes the same configs as the command line (the package's ``configs/``, your
own through ``hydra.searchpath=[file://DIR]`` among the overrides), runs the same checks and
leaves the same MLflow record. A refusal raises the project's typed errors
(:class:`convnets.ConfigError`, :class:`convnets.DataError`, :class:`convnets.TrackingError`)
instead of exiting; nothing is recorded for a refused config. Calls do not share state: each
composes afresh, and a training run clears the previous one's Keras state first. The
caller's own settings are as they were after each call: MLflow's tracking URI (and its
``MLFLOW_TRACKING_URI`` variable), Keras's dtype policy, TensorFlow's op determinism, and a
Hydra the caller initialised. What stays process-wide is TensorFlow's own (e.g.
``distribute.cpu_replicas`` applies in a process that has not run a TensorFlow op yet).
Multiruns (``-m``: sweeps, searches) are command-line only.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf, open_dict

from convnets.errors import ConfigError, ConvnetsError, TrackingError, hydra_override

if TYPE_CHECKING:
    from convnets.architecture import Analysis
    from convnets.comparison import CompareReport
    from convnets.evaluation import EvalReport
    from convnets.job import Run
    from convnets.recording import Recorder

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def train(
    overrides: Sequence[str] = (),
    *,
    output_dir: str | Path | None = None,
    recorder: Recorder | None = None,
) -> Run:
    """Train and record one run, as ``python train.py OVERRIDES`` does; return it.

    ``output_dir``: where the checkpoints and the final model go (default: the config's
    ``hydra.run.dir``, ``outputs/<date>/<time>`` under the working folder). ``recorder``:
    where the run is recorded (default: MLflow at ``tracking.uri``;
    ``convnets.recording.MemoryRecorder()`` keeps the record in this process instead).
    """
    from convnets.checks import check_config

    overrides = _listed(overrides)  # once: an iterator would be spent by the composition
    cfg, hydra_cfg = _compose("train", overrides)
    check_config(cfg)  # before the store is touched: a refused config records nothing
    _refuse_a_callers_active_run()
    from convnets import job

    folder = Path(output_dir) if output_dir is not None else Path(hydra_cfg.run.dir)
    with _callers_mlflow(), _callers_tensorflow():
        if "keras" in sys.modules:  # a previous run in this process: its graphs and names
            sys.modules["keras"].utils.clear_session(free_memory=True)
        try:
            made = _save_config(folder, cfg, overrides)
        except OSError as err:
            raise ConfigError(
                f"output_dir={folder}: {err.strerror or type(err).__name__} ({err.filename}); "
                "the run's folder cannot be created there: pass a writable folder as output_dir"
            ) from err
        context = job.JobContext(overrides=tuple(overrides), output_dir=folder)
        try:
            return job.train(cfg, context, recorder)
        except ConvnetsError:
            _unsave_config(folder, made)
            raise


def evaluate(overrides: Sequence[str] = (), **keys: Any) -> EvalReport:
    """Evaluate a logged run's model or a local ``.keras`` file, as ``python evaluate.py``:
    ``evaluate(run_id=...)`` or ``evaluate(checkpoint="model.keras")``, any other key of
    ``configs/evaluate.yaml`` as a keyword (``tracking_uri=`` for ``tracking.uri``) or an
    override. Returns the metrics and figures."""
    from convnets import evaluate_job

    given = [*_listed(overrides), *_as_overrides(keys)]
    cfg, hydra_cfg = _compose("evaluate", given)
    if cfg.compare:
        raise ConfigError("compare=: use convnets.compare(target) for a comparison")
    with _callers_mlflow(), _callers_tensorflow():
        return evaluate_job.run(cfg, hydra_cfg.run.dir, overrides=given)


def compare(target: str, overrides: Sequence[str] = (), **keys: Any) -> CompareReport:
    """The comparison of an experiment's runs (its name) or a sweep's jobs (the parent run
    id), as ``python evaluate.py compare=TARGET``: ``.table`` (a DataFrame, one row a run),
    ``.csv`` and ``.figures`` (paths); e.g. ``compare("digits", tracking_uri=...)``."""
    from convnets import evaluate_job
    from convnets.config import override_key

    if not isinstance(target, str) or not target.strip():
        raise ConfigError(
            f"target={target!r}: give the experiment's name or a sweep's parent run id, "
            "e.g. compare('digits')"
        )
    overrides = _listed(overrides)
    again = [o for o in overrides if override_key(o) == "compare"] + (
        ["compare="] if "compare" in keys else []
    )
    if again:
        raise ConfigError(
            f"{again[0]}: compare() takes what to compare as its first argument "
            f"({target!r}) only; drop the other"
        )
    keys = {"compare": target, **keys}
    cfg, hydra_cfg = _compose("evaluate", [*overrides, *_as_overrides(keys)])
    with _callers_mlflow():
        return evaluate_job.run(cfg, hydra_cfg.run.dir)


def inspect(overrides: Sequence[str] = (), *, quiet: bool = True) -> Analysis:
    """The analysis of a model config (shapes, params, MACs, receptive field per layer), as
    ``python -m convnets.inspect OVERRIDES``, without TensorFlow; ``quiet=False`` also prints
    the table."""
    from convnets.architecture import format_table
    from convnets.inspection import analysis_of

    cfg, _ = _compose("inspect", overrides)
    _, analysis = analysis_of(cfg)
    if not quiet:
        print(format_table(analysis))
    return analysis


# ---------------------------------------------------------------- composition


def _compose(config_name: str, overrides: Sequence[str]) -> tuple[DictConfig, DictConfig]:
    """``(cfg, hydra)``: the config the command would get, and its ``hydra`` node apart."""
    from hydra import compose, initialize_config_dir

    import convnets.config  # noqa: F401  (registers the schemas)
    from convnets.checks import check_interpolations
    from convnets.cli import config_error_line, missing_searchpath
    from convnets.credentials import credentials_in, credentials_in_config

    overrides = _listed(overrides)
    refused = credentials_in(overrides) or missing_searchpath(overrides)
    if refused is not None:
        raise ConfigError(refused)
    if any(o.lstrip().startswith("-") for o in overrides):
        flags = [o for o in overrides if o.lstrip().startswith("-")]
        raise ConfigError(f"{' '.join(flags)}: flags are for the command line; pass overrides only")
    try:
        with (  # the second is made once the caller's Hydra is set aside
            _callers_hydra_set_aside(),
            initialize_config_dir(str(CONFIG_DIR), version_base="1.3", job_name=config_name),
        ):
            cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
    except Exception as err:
        line = config_error_line(err, overrides)
        if line is None:
            raise
        raise ConfigError(line) from err
    check_interpolations(cfg)
    try:
        refused = credentials_in_config(cfg)  # config files, interpolations: resolved
    except Exception as err:  # noqa: BLE001 - an interpolation that cannot resolve
        raise ConfigError(config_error_line(err, overrides) or str(err).splitlines()[0]) from err
    if refused is not None:
        raise ConfigError(refused)
    hydra_cfg = cfg.hydra
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg, hydra_cfg


@contextlib.contextmanager
def _callers_hydra_set_aside() -> Iterator[None]:
    """A Hydra the caller initialised (``initialize_config_dir`` in a notebook) set aside
    while the package composes its own, and put back after. Hydra's global instance allows
    one initialisation at a time; ``clear`` and ``initialize`` are its public way out."""
    from hydra.core.global_hydra import GlobalHydra

    instance = GlobalHydra.instance()
    callers = instance.hydra if instance.is_initialized() else None
    if callers is not None:
        instance.clear()
    try:
        yield
    finally:
        if callers is not None:
            GlobalHydra.instance().clear()
            GlobalHydra.instance().initialize(callers)


@contextlib.contextmanager
def _callers_mlflow() -> Iterator[None]:
    """MLflow's tracking URI as the caller had it, after a call that records or reads the
    package's store (which sets the URI and ``MLFLOW_TRACKING_URI`` for its own calls).
    Unset, then the variable put back: the URI the caller's next call finds is the one it
    set, or the one its environment names."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        yield
    finally:
        if "mlflow" in sys.modules:
            sys.modules["mlflow"].set_tracking_uri(None)  # None: MLflow unsets its own
        if before is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = before


@contextlib.contextmanager
def _callers_tensorflow() -> Iterator[None]:
    """Keras's dtype policy and TensorFlow's op determinism, both process-wide, as the caller
    had them: its next models keep their precision, its own code its speed and XLA. Read
    before anything of the run's clears or sets them."""
    keras = sys.modules.get("keras")
    policy = keras.mixed_precision.global_policy().name if keras else "float32"
    deterministic = _op_determinism()
    try:
        yield
    finally:
        if "keras" in sys.modules:  # a refusal may come before Keras loads
            sys.modules["keras"].mixed_precision.set_global_policy(policy)
        if _op_determinism() != deterministic:
            from convnets.trainer import set_op_determinism

            set_op_determinism(deterministic)


def _op_determinism() -> bool:
    if "tensorflow" not in sys.modules:
        return False  # nothing has loaded TensorFlow, so nothing has turned it on
    from convnets.trainer import op_determinism

    return op_determinism()


def _refuse_a_callers_active_run() -> None:
    """A training records its own run, which MLflow cannot start beside a run the caller has
    open in this thread (``mlflow.start_run()``): refused before anything loads, instead of
    MLflow's untyped error after the data."""
    mlflow = sys.modules.get("mlflow")
    active = mlflow.active_run() if mlflow is not None else None
    if active is not None:
        raise TrackingError(
            f"an MLflow run is active in this process ({active.info.run_id}, from "
            "mlflow.start_run()); end it with mlflow.end_run() before convnets.train, which "
            "records a run of its own"
        )


def _listed(overrides: Sequence[str] | None) -> list[str]:
    """The overrides as a list of strings; ``None`` is none. A single string is refused:
    iterated, it would give one override per letter."""
    if isinstance(overrides, str | bytes):
        raise ConfigError(
            f"overrides={overrides!r}: give a list of overrides, e.g. [{str(overrides)!r}]"
        )
    if overrides is not None and not isinstance(overrides, Iterable):
        raise ConfigError(
            f"overrides={overrides!r}: give a list of overrides (key=value strings), "
            "e.g. ['trainer.epochs=2']"
        )
    listed = list(overrides or ())
    for index, override in enumerate(listed):
        if not isinstance(override, str | Path):
            raise ConfigError(
                f"overrides[{index}]={override!r}: each override is a key=value string, "
                f"e.g. 'trainer.epochs=2'"
            )
    return [str(o) for o in listed]


def _as_overrides(keys: dict[str, Any]) -> list[str]:
    """Keyword arguments as overrides; a path or string quoted for Hydra when it needs it
    (spaces, non-ASCII letters), so ``checkpoint=Path("runs/été 1/model.keras")`` works.
    ``tracking_uri=`` (a keyword cannot hold a dot) is ``tracking.uri``."""
    keys = {("tracking.uri" if key == "tracking_uri" else key): v for key, v in keys.items()}
    return [
        hydra_override(key, value) if isinstance(value, str | Path) else f"{key}={value}"
        for key, value in keys.items()
        if value is not None
    ]


def _save_config(folder: Path, cfg: DictConfig, overrides: Sequence[str]) -> list[Path]:
    """The composed config and the overrides beside the run's files, as Hydra's ``.hydra/``;
    returns the folders this made, deepest first."""
    hydra_dir = folder / ".hydra"
    made = [p for p in (hydra_dir, *hydra_dir.parents) if not p.exists()]
    hydra_dir.mkdir(parents=True, exist_ok=True)
    (hydra_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    (hydra_dir / "overrides.yaml").write_text(OmegaConf.to_yaml(list(overrides)))
    return made


def _unsave_config(folder: Path, made: list[Path]) -> None:
    """A refused run leaves no folder behind: what :func:`_save_config` made goes again when
    nothing else was written beside it (a run that started keeps its folder and checkpoints)."""
    if not made or any(path.name != ".hydra" for path in folder.iterdir()):
        return
    shutil.rmtree(made[0], ignore_errors=True)  # .hydra/
    for path in made[1:]:  # the output folder and parents this made, when empty
        with contextlib.suppress(OSError):
            path.rmdir()
