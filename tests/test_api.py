"""``convnets.train / evaluate / compare / inspect`` in this process: the same composition,
checks and MLflow record as the commands, errors raised as typed exceptions."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from conftest import sqlite_store  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

import convnets  # noqa: E402

TINY = "model.layers=[{filters:8},{filters:8,pool:max}]"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    folder = tmp_path_factory.mktemp("api")
    return folder, sqlite_store(folder)


@pytest.fixture(scope="module")
def two_runs(store):
    folder, uri = store
    common = [TINY, "trainer.verbose=0", f"tracking.uri={uri}", "trainer.epochs=2"]
    first = convnets.train(common, output_dir=folder / "first")
    second = convnets.train(
        [*common, "model.width=0.5", "tracking.run_name=half width"], output_dir=folder / "second"
    )
    return first, second


@pytest.mark.slow
@pytest.mark.xdist_group("api")
def test_a_run_is_a_value_equal_to_its_record(store, two_runs):
    _, uri = store
    run, other = two_runs
    recorded = MlflowClient(uri).get_run(run.run_id)
    assert run.test_accuracy == recorded.data.metrics["test_accuracy"]
    assert run.metrics == recorded.data.metrics and run.params == recorded.data.params
    assert run.params["trainer.epochs"] == "2"
    assert run.model_path.is_file() and run.model_path.name == "model.keras"
    assert run.model_uri == recorded.data.tags["model_uri"]
    assert run.ui_url.endswith(f"/#/experiments/{run.experiment_id}/runs/{run.run_id}")
    # the objective: the validation accuracy of the epoch tested, the restored best one
    assert run.objective == recorded.data.metrics["selected_val_accuracy"]
    assert run.objective == recorded.data.metrics["best_val_accuracy"]
    # a second call is a second run, with its own overrides and nothing of the first's
    assert other.run_id != run.run_id
    assert other.params["model.width"] == "0.5" and run.params["model.width"] == "1.0"
    assert other.tags["mlflow.runName"] == "half width"  # tracking.run_name names the run
    assert recorded.data.tags["hydra_overrides"].startswith("model.layers=")


@pytest.mark.slow
@pytest.mark.xdist_group("api")
def test_evaluate_and_compare_in_process(store, two_runs):
    folder, uri = store
    run, other = two_runs
    report = convnets.evaluate(run_id=run.run_id, output_dir=folder / "eval", tracking_uri=uri)
    assert report.metrics["eval_accuracy"] == pytest.approx(run.test_accuracy, abs=1e-6)
    comparison = convnets.compare("digits", tracking_uri=uri, output_dir=folder / "compare")
    assert isinstance(comparison.table, pd.DataFrame)
    assert {run.run_id, other.run_id} <= set(comparison.table["run_id"])
    assert comparison.csv.is_file() and all(p.is_file() for p in comparison.figures.values())


def test_a_refused_config_raises_and_records_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(convnets.ConfigError, match=r"trainer\.epochz: unknown key"):
        convnets.train(["trainer.epochz=2", f"tracking.uri={uri}"])
    with pytest.raises(convnets.ConfigError, match=r"model\.layers\[0\]"):
        convnets.train(
            ["model.layers=[{filters:8,kernel_size:9,padding:valid}]", f"tracking.uri={uri}"]
        )
    with pytest.raises(convnets.ConfigError, match="MLFLOW_TRACKING_USERNAME") as refused:
        convnets.train(["tracking.uri=http://alice:s3cret@127.0.0.1:1"])
    assert "s3cret" not in str(refused.value)
    with pytest.raises(convnets.ConfigError, match=r"give a list of overrides, e\.g\. \['trainer"):
        convnets.train(f"trainer.epochs=1 tracking.uri={uri}")  # a string, not a list
    with pytest.raises(convnets.ConfigError, match=r"give a list of overrides"):
        convnets.evaluate("run_id=0123456789abcdef0123456789abcdef")
    (tmp_path / "a_file").touch()
    with pytest.raises(convnets.ConfigError, match=r"output_dir=.*a_file: Not a directory"):
        convnets.train([f"tracking.uri={uri}"], output_dir=tmp_path / "a_file")
    # Refused once the data is looked at: its output folder, made for it, goes again.
    with pytest.raises(convnets.DataError, match="dataset.val_fraction"):
        convnets.train(
            ["dataset.val_fraction=0.999", f"tracking.uri={uri}"], output_dir=tmp_path / "r/run"
        )
    assert not (tmp_path / "r").exists()
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "outputs").exists()


def test_arguments_python_gets_wrong_are_refused_as_the_command_line_would_be(tmp_path):
    """What only a Python caller can get wrong (types, a target given twice) and what the
    command line refuses (a format outside its set, a list for one value) raise ConfigError
    naming the argument, before anything is read or recorded."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(convnets.ConfigError, match=r"overrides=5: give a list of overrides"):
        convnets.train(5)
    with pytest.raises(convnets.ConfigError, match=r"overrides\[1\]=None: each override is a"):
        convnets.train(["trainer.epochs=1", None])
    with pytest.raises(convnets.ConfigError, match=r"target=None: give the experiment's name"):
        convnets.compare(None, tracking_uri=uri)
    with pytest.raises(convnets.ConfigError, match=r"target='': give the experiment's name"):
        convnets.compare("", tracking_uri=uri)
    for twice in ({"overrides": ["compare=edge"]}, {"compare": "edge"}):
        with pytest.raises(convnets.ConfigError, match=r"compare=.*: compare\(\) takes what"):
            convnets.compare("seeds", tracking_uri=uri, **twice)
    with pytest.raises(convnets.ConfigError, match=r"baseline: a list where one value belongs"):
        convnets.compare("seeds", ["baseline=[g1]"], tracking_uri=uri)
    with pytest.raises(convnets.ConfigError, match=r"format must be table or json, got 'xml'"):
        convnets.inspect(["format=xml"])
    assert not (tmp_path / "mlflow.db").exists()


def test_a_mixed_precision_run_leaves_the_callers_dtype_policy_as_it_was(tmp_path):
    import keras

    keras.mixed_precision.set_global_policy("float32")
    run = convnets.train(
        ["model.layers=[{filters:4,pool:max}]", "trainer.epochs=1", "trainer.verbose=0",
         "trainer.precision=mixed_bfloat16", "tracking.log_model=false",
         f"tracking.uri={sqlite_store(tmp_path)}"],
        output_dir=tmp_path / "run",
    )  # fmt: skip
    assert run.params["trainer.precision"] == "mixed_bfloat16"
    assert keras.mixed_precision.global_policy().name == "float32"  # a notebook's next model


def test_inspect_returns_the_analysis():
    analysis = convnets.inspect(["model=vgg_small", "dataset=cifar10"])
    assert analysis.param_count > 0 and analysis.receptive_field > 0
    assert analysis.feature_shape[-1] > 0
    assert convnets.inspect(None).param_count == convnets.inspect().param_count  # None: none
    with pytest.raises(convnets.ConfigError, match="Could not find 'model/nope'"):
        convnets.inspect(["model=nope"])


def test_importing_convnets_loads_neither_tensorflow_nor_mlflow():
    from conftest import heavy_modules_loaded

    assert heavy_modules_loaded("convnets", ("tensorflow", "keras", "mlflow", "optuna")) == []


def test_a_call_leaves_the_callers_process_as_it_was(tmp_path, monkeypatch):
    """A notebook's own MLflow store and run, Keras dtype policy, op determinism and Hydra
    are as it had them after each call; overrides given as an iterator are recorded."""
    import keras
    import mlflow
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from tensorflow.python.framework import config as tf_config

    mine = sqlite_store(tmp_path / "mine")
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "mine.yaml").write_text("answer: 42\n")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mine)
    mlflow.set_tracking_uri(mine)
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    initialize_config_dir(str(tmp_path / "conf"), version_base="1.3")
    uri = sqlite_store(tmp_path / "package")
    overrides = [TINY, "trainer.epochs=1", "trainer.verbose=0", "trainer.deterministic=true",
                 "tracking.log_model=false", f"tracking.uri={uri}"]  # fmt: skip
    try:
        run = convnets.train(iter(overrides), output_dir=tmp_path / "run")
        assert run.tags["hydra_overrides"] == " ".join(overrides)
        assert run.tracking_uri == uri  # absolute: a notebook may change its folder
        convnets.compare("digits", tracking_uri=uri, output_dir=tmp_path / "compare")
        assert mlflow.get_tracking_uri() == mine and os.environ["MLFLOW_TRACKING_URI"] == mine
        assert keras.mixed_precision.global_policy().name == "mixed_bfloat16"
        assert not tf_config.is_op_determinism_enabled()
        assert compose("mine").answer == 42  # the caller's Hydra, initialised still

        with (  # the caller's own run, open: refused, untouched
            mlflow.start_run() as active,
            pytest.raises(convnets.TrackingError, match="an MLflow run is active"),
        ):
            convnets.train(overrides, output_dir=tmp_path / "refused")
        assert MlflowClient(mine).get_run(active.info.run_id).info.status == "FINISHED"
        (tmp_path / "a_file").touch()
        with pytest.raises(convnets.ConfigError, match="output_dir="):  # None: no overrides
            convnets.train(None, output_dir=tmp_path / "a_file")
    finally:
        GlobalHydra.instance().clear()
        keras.mixed_precision.set_global_policy("float32")
        mlflow.set_tracking_uri(None)
