"""evaluate.py on a tiny two-job digits sweep: evaluate / compare / bad input.

One sweep (a real ``train.py -m``, 2 jobs, 2 epochs, a 2-layer stack: multiruns are
command-line only) is shared by every test of the module. What is about the command itself
runs it in a subprocess: comparing recorded runs without loading TensorFlow, an unknown run id
as one ``error:`` line. Evaluating a run's model (its record, metrics and figures) and the
error paths run in this process (``convnets.evaluate``, ``evaluate_job.run``).
"""

import csv
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from conftest import imported, sqlite_store
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

import convnets
from convnets import comparison, evaluate_job
from convnets.config import EvaluateConfig, TrackingConfig
from convnets.errors import ConfigError, TrackingError
from convnets.evaluation import checkpoint_config
from convnets.tracking import Tracker

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONWARNINGS": "ignore"}
EXPERIMENT = "evaltest"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FIGURES = {
    "confusion_matrix.png",
    "misclassified.png",
    "filters.png",
    "feature_maps.png",
    "effective_receptive_field.png",
}

# One ~30 s training sweep for the module, then ~4 s per CLI call (no TensorFlow); the xdist
# group keeps the module on one worker (`--dist loadgroup`), so the sweep is trained once.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("evaluate_cli")]


def cli(script, *args, cwd):
    """``python -X importtime SCRIPT ARGS`` (:func:`conftest.imported` reads what it loaded)."""
    return subprocess.run(
        [sys.executable, "-X", "importtime", str(REPO / script), *args],
        cwd=cwd,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A sqlite store holding one finished 2-job sweep: (uri, parent run id, child runs, tmp)."""
    tmp = tmp_path_factory.mktemp("evaluate_cli")
    uri = sqlite_store(tmp)
    result = cli(
        "train.py",
        "-m",
        "trainer.epochs=2",
        "trainer.verbose=0",
        "optimizer.lr=0.01",
        "model.layers=[{filters:4},{filters:8,pool:max}]",
        "model.layer_defaults.kernel_size=3,5",
        f"tracking.uri={uri}",
        f"tracking.experiment={EXPERIMENT}",
        f"hydra.sweep.dir={tmp / 'sweep'}",
        cwd=tmp,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    mlflow.set_tracking_uri(uri)
    children = mlflow.search_runs(
        experiment_names=[EXPERIMENT], filter_string="tags.`mlflow.parentRunId` != ''"
    )
    assert len(children) == 2 and set(children["status"]) == {"FINISHED"}
    parent = children["tags.mlflow.parentRunId"].iloc[0]
    return uri, parent, children.sort_values("tags.sweep_job").reset_index(drop=True), tmp


def eval_cfg(uri, **keys):
    cfg = OmegaConf.structured(EvaluateConfig(tracking=TrackingConfig(uri=uri)))
    return OmegaConf.merge(cfg, keys)


def is_png(path):
    data = Path(path).read_bytes()
    return data[:8] == PNG_SIGNATURE and len(data) > 5000


def test_evaluate_run_reproduces_test_accuracy_and_logs_figures(store, tmp_path):
    uri, _, children, _ = store
    run_id = children["run_id"][0]
    report = convnets.evaluate(run_id=run_id, output_dir=tmp_path, **{"tracking.uri": uri})
    client = MlflowClient(uri)
    metrics = client.get_run(run_id).data.metrics
    assert metrics["eval_accuracy"] == metrics["test_accuracy"]  # same weights, data, order
    assert metrics["eval_loss"] == pytest.approx(metrics["test_loss"], rel=1e-5)
    per_class = {k: v for k, v in metrics.items() if k.startswith("eval_accuracy_class_")}
    assert sorted(per_class) == [f"eval_accuracy_class_{d}" for d in range(10)]
    assert all(0.0 <= v <= 1.0 for v in per_class.values())
    assert report.metrics == {k: metrics[k] for k in report.metrics}  # returned as recorded
    assert {"eval_accuracy", "eval_loss", *per_class} <= set(report.metrics)
    logged = {Path(a.path).name for a in client.list_artifacts(run_id, "evaluation")}
    assert logged == FIGURES
    assert {Path(p).name for p in report.figures.values()} == FIGURES
    assert all(is_png(tmp_path / "evaluation" / name) for name in FIGURES)  # written locally
    local = mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path="evaluation", dst_path=str(tmp_path / "dl"), tracking_uri=uri
    )
    assert all(is_png(Path(local) / name) for name in FIGURES)


def test_compare_sweep_parent_writes_plots_csv_and_logs_them(store, tmp_path):
    uri, parent, children, _ = store
    out = tmp_path / "report"
    result = cli(
        "evaluate.py",
        f"compare={parent}",
        f"tracking.uri={uri}",
        f"output_dir={out}",
        f"hydra.run.dir={tmp_path}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "tensorflow" not in imported(result)  # comparing recorded runs needs no TensorFlow
    table = pd.read_csv(out / "runs.csv")
    assert set(table["run_id"]) == set(children["run_id"])
    assert sorted(table["model.layer_defaults.kernel_size"]) == [3, 5]  # the param that differs
    assert (table["receptive_field"].sort_values().tolist()) == [6, 10]
    assert table["effective_receptive_field"].between(1, 8).all()
    for name in ("accuracy_vs_params", "accuracy_vs_receptive_field"):
        assert is_png(out / f"{name}.png")
    logged = {Path(a.path).name for a in MlflowClient(uri).list_artifacts(parent, "compare")}
    assert {"runs.csv", "accuracy_vs_params.png", "accuracy_vs_receptive_field.png"} <= logged


def test_compare_experiment_name_leaves_out_the_sweep_parent(store, tmp_path):
    uri, parent, children, _ = store
    report = comparison.compare(Tracker(uri), EXPERIMENT, tmp_path)
    assert set(report.table["run_id"]) == set(children["run_id"])
    assert report.parent_run_id is None
    # The Pareto flags in runs.csv, against a brute force over its rows: a run is on the front
    # unless another has >= accuracy and <= cost, one of them strictly.
    with open(tmp_path / "runs.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(children)
    for flag, cost in (("pareto_params", "param_count"), ("pareto_rf", "receptive_field")):
        points = [(float(r["test_accuracy"]), float(r[cost])) for r in rows]
        expected = [
            not any(a >= acc and c <= cst and (a > acc or c < cst) for a, c in points)
            for acc, cst in points
        ]
        assert [r[flag] for r in rows] == [str(e) for e in expected], (flag, points)
    assert any(r["pareto_params"] == "True" for r in rows)  # a non-empty set has a front


def test_unknown_run_id_is_one_line_without_traceback(store, tmp_path):
    uri = store[0]
    result = cli(
        "evaluate.py",
        "run_id=0123456789abcdef0123456789abcdef",
        f"tracking.uri={uri}",
        f"hydra.run.dir={tmp_path}",
        cwd=tmp_path,
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "run_id=0123456789abcdef0123456789abcdef" in errors[0]
    assert "no such run" in errors[0]
    assert "tensorflow" not in imported(result)  # refused before TensorFlow loads


def test_bad_input_in_process(store, tmp_path):
    uri, _, children, tmp = store
    client = MlflowClient(uri)
    experiment_id = children["experiment_id"][0]

    failed = client.create_run(experiment_id, tags={"failure_reason": "loss became nan"})
    client.set_terminated(failed.info.run_id, status="FAILED")
    with pytest.raises(TrackingError, match=r"is FAILED \(loss became nan\)"):
        evaluate_job.run(eval_cfg(uri, run_id=failed.info.run_id), tmp_path)

    no_model = client.create_run(experiment_id)
    client.log_text(no_model.info.run_id, "dataset: {name: digits}\n", "config.yaml")
    client.set_terminated(no_model.info.run_id, status="FINISHED")
    with pytest.raises(ConfigError, match="no logged model"):
        evaluate_job.run(eval_cfg(uri, run_id=no_model.info.run_id), tmp_path)

    parent = store[1]
    with pytest.raises(ConfigError, match=rf"run_id={parent} is the parent run of a sweep"):
        evaluate_job.run(eval_cfg(uri, run_id=parent), tmp_path)
    with pytest.raises(ConfigError, match=rf"init_from={parent} is the parent run of a sweep"):
        convnets.train([f"init_from={parent}", f"tracking.uri={uri}"], output_dir=tmp_path / "i")
    with pytest.raises(ConfigError, match=r"baseline=g1 names the group .*: add compare="):
        evaluate_job.run(eval_cfg(uri, run_id=parent, baseline="g1"), tmp_path)

    with pytest.raises(ConfigError, match=r"exactly one of .* \(given: none\)"):
        evaluate_job.run(eval_cfg(uri), tmp_path)
    with pytest.raises(ConfigError, match=r"\(given: run_id, compare\)"):
        evaluate_job.run(eval_cfg(uri, run_id="x", compare="y"), tmp_path)

    client.create_experiment("empty")
    with pytest.raises(TrackingError, match="experiment 'empty' has no FINISHED runs"):
        evaluate_job.run(eval_cfg(uri, compare="empty"), tmp_path)
    with pytest.raises(TrackingError, match="no experiment of that name"):
        evaluate_job.run(eval_cfg(uri, compare="nope"), tmp_path)

    with pytest.raises(ConfigError, match="no such file"):
        evaluate_job.run(eval_cfg(uri, checkpoint=str(tmp_path / "missing.keras")), tmp_path)

    deleted = children["run_id"][0]
    client.delete_run(deleted)
    try:
        with pytest.raises(TrackingError, match=r"the run is deleted in .*mlflow runs restore"):
            evaluate_job.run(eval_cfg(uri, run_id=deleted), tmp_path)
    finally:
        client.restore_run(deleted)

    damaged = client.create_run(experiment_id)
    client.log_text(damaged.info.run_id, "dataset: {name: [digits\n", "config.yaml")
    client.set_terminated(damaged.info.run_id, status="FINISHED")
    with pytest.raises(ConfigError) as refused:  # the artifact, not its temporary copy
        Tracker(uri).load_config(damaged.info.run_id, key="reproduce")
    assert str(refused.value) == (
        f"reproduce={damaged.info.run_id}: its config.yaml artifact is not readable YAML at "
        "line 2, so the run cannot be rerun from its record"
    )

    zipped = tmp_path / "zip" / "model.keras"  # a zip archive, but not one Keras wrote
    zipped.parent.mkdir()
    with zipfile.ZipFile(zipped, "w") as archive:
        archive.writestr("readme.txt", "hello")
    with pytest.raises(ConfigError, match="not a Keras archive"):
        evaluate_job.run(eval_cfg(uri, checkpoint=str(zipped)), tmp_path)
    (zipped.parent / "config.yaml").write_text("- a list\n")
    with pytest.raises(ConfigError, match=r"config.yaml is not a run's config \(it is not a map"):
        checkpoint_config(zipped)
    (zipped.parent / "config.yaml").write_text("model: {width: 1}\n")
    with pytest.raises(ConfigError, match=r"config.yaml is not a run's config \(it has no data"):
        checkpoint_config(zipped)


def test_checkpoint_with_config_beside_it_gives_the_runs_accuracy(store, tmp_path):
    """A run's model and config.yaml downloaded into one folder evaluate like the run."""
    uri, _, children, _ = store
    run = children.iloc[1]
    folder = tmp_path / "ckpt"
    mlflow.artifacts.download_artifacts(
        run_id=run["run_id"], artifact_path="config.yaml", dst_path=str(folder), tracking_uri=uri
    )
    model = mlflow.artifacts.download_artifacts(
        artifact_uri=run["tags.model_uri"], dst_path=str(tmp_path / "m"), tracking_uri=uri
    )
    keras_file = folder / "model.keras"
    keras_file.write_bytes(next(Path(model).rglob("*.keras")).read_bytes())

    report = evaluate_job.run(eval_cfg(uri, checkpoint=str(keras_file)), tmp_path / "out")
    assert report.metrics["eval_accuracy"] == run["metrics.test_accuracy"]
    assert {p.name for p in (tmp_path / "out" / "evaluation").iterdir()} == FIGURES

    alone = tmp_path / "alone.keras"
    alone.write_bytes(keras_file.read_bytes())
    with pytest.raises(ConfigError, match="add dataset=<name>"):
        evaluate_job.run(eval_cfg(uri, checkpoint=str(alone)), tmp_path / "out2")


def test_compare_of_a_single_run_says_what_to_compare_instead(store, tmp_path):
    """Not "the sweep parent run has no FINISHED child runs": it is no parent at all."""
    uri, _, children, _ = store
    job = children["run_id"].iloc[0]
    with pytest.raises(ConfigError) as refused:  # the wrong kind of run: exit status 2
        comparison.compare(Tracker(uri), job, tmp_path)
    assert str(refused.value) == (
        f"compare={job}: that is a single run, not a sweep's or search's parent run; compare "
        f"the runs of its experiment with \"compare='{EXPERIMENT}'\", or evaluate this one with "
        f"run_id={job}"
    )
