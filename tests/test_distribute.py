"""convnets.distribute: strategies from config, and real multi-replica training on CPU.

Logical CPU devices can only be set before TensorFlow starts, and a multi-worker cluster needs
one process per worker, so the training tests run tests/multiworker_worker.py in subprocesses
(bounded by timeouts so they can never hang).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import tensorflow as tf
from conftest import CLI_ENV, sqlite_store
from omegaconf import OmegaConf

from convnets.config import DistributeConfig
from convnets.distribute import configure_devices, make_strategy
from convnets.errors import ConfigError
from convnets.pipeline import last_batch_leaves_a_replica_empty

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "multiworker_worker.py"
ENV = {
    **os.environ,
    "TF_CPP_MIN_LOG_LEVEL": "3",
    "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
}
# Replicas reduce the same per-example gradients as one device, only summed in another
# order: float32 round-off (~1e-7 relative per step) that Adam amplifies over 38 steps to
# ~1e-6. 1e-4 leaves room for that and still fails on any real difference (a wrong
# per-replica batch or a loss scaled by the replica count moves losses by >1e-2).
RTOL = 1e-4


def cfg(**kwargs):
    return OmegaConf.structured(DistributeConfig(**kwargs))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_worker(mode: str, tmp_path: Path, name: str, env=None) -> subprocess.Popen:
    """Start the helper; its output goes to NAME.log, its result to NAME.json."""
    with open(tmp_path / f"{name}.log", "w") as log:
        return subprocess.Popen(
            [sys.executable, WORKER, mode, tmp_path / "ckpt", tmp_path / f"{name}.json"],
            cwd=REPO,
            env={**ENV, **(env or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def wait(procs: list[subprocess.Popen], tmp_path: Path, timeout: float) -> None:
    """Wait for every process (killing all on timeout); each must exit 0."""
    try:
        for proc in procs:
            proc.wait(timeout=timeout)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    logs = "\n".join(log.read_text()[-3000:] for log in sorted(tmp_path.glob("*.log")))
    assert all(proc.returncode == 0 for proc in procs), logs


def assert_same_run(a: dict, b: dict) -> None:
    for key in ("loss", "val_loss"):
        assert a["history"][key] == pytest.approx(b["history"][key], rel=RTOL), key
    assert a["test"]["loss"] == pytest.approx(b["test"]["loss"], rel=RTOL)
    # One of 300 test images flipping is 0.0033.
    assert a["test"]["accuracy"] == pytest.approx(b["test"]["accuracy"], abs=0.01)


@pytest.mark.slow
def test_two_cpu_replicas_match_one_device(tmp_path):
    """MirroredStrategy over 2 logical CPUs trains like one device (global batch split in two);
    with batch norm, synchronized statistics make the replicas match one device too."""
    wait([run_worker("mirrored", tmp_path, "mirrored")], tmp_path, timeout=300)
    runs = json.loads((tmp_path / "mirrored.json").read_text())
    assert runs["mirrored/None"]["num_replicas"] == 2
    assert runs["one_device/None"]["num_replicas"] == 1
    assert_same_run(runs["mirrored/None"], runs["one_device/None"])
    assert_same_run(runs["mirrored/sync"], runs["one_device/plain"])
    assert (
        runs["mirrored/None"]["history"]["loss"][-1] < runs["mirrored/None"]["history"]["loss"][0]
    )
    # The package's rule for a last batch that leaves a replica empty is the strategy's split.
    assert runs["split_mismatches"] == []
    # 1153 training images in batches of 64: the last batch, 1 image, is left out, so every
    # replica's batch norm sees images; kept, the weights went NaN (or oneDNN raised).
    uneven = runs["mirrored/uneven"]
    assert uneven["train_dropped_per_epoch"] == 1
    assert uneven["weights_finite"], uneven
    assert uneven["history"]["loss"][-1] < uneven["history"]["loss"][0]
    # Per-replica batch norm: what the run measured is what the saved model scores (each
    # replica evaluated with its own drifted statistics, the checkpoint held the first's).
    # Summed in another order: ~1e-7 apart; the drifted statistics moved the losses ~2e-5.
    copy = uneven["one_device_copy"]
    assert copy["test"]["loss"] == pytest.approx(uneven["test"]["loss"], rel=2e-6)
    assert copy["test"]["accuracy"] == pytest.approx(uneven["test"]["accuracy"], abs=1e-9)
    assert copy["val_loss"] == pytest.approx(uneven["history"]["val_loss"][-1], rel=2e-6)


@pytest.mark.slow
def test_two_workers_train_to_the_same_model(tmp_path):
    """A 2-worker MultiWorkerMirroredStrategy cluster on 127.0.0.1 completes, both workers end
    with bit-identical weights, and only the chief writes the checkpoint."""
    workers = [f"127.0.0.1:{free_port()}" for _ in range(2)]
    procs = []
    for index in range(2):
        tf_config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
        procs.append(
            run_worker("multi_worker", tmp_path, f"w{index}", {"TF_CONFIG": json.dumps(tf_config)})
        )
    wait(procs, tmp_path, timeout=240)
    w0, w1 = (json.loads((tmp_path / f"w{i}.json").read_text()) for i in range(2))
    assert w0["num_replicas"] == w1["num_replicas"] == 2
    assert w0["epochs_completed"] == w1["epochs_completed"] == 2
    assert w0["weights_sha256"] == w1["weights_sha256"]
    assert w0["history"] == w1["history"]
    assert w0["test"] == w1["test"]
    state = json.loads((tmp_path / "ckpt" / "state.json").read_text())
    assert state["epoch"] == 2
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "best-0002.weights.h5",
        "epoch-0002.weights.h5",
        "state.json",
    ]


@pytest.mark.parametrize(
    ("num_examples", "batch_size", "replicas", "empty"),
    [
        (17, 4, 2, True),  # a last batch of 1 on 2 replicas: 1 and 0
        (18, 4, 2, False),  # 2: 1 and 1
        (19, 4, 2, False),  # 3: 2 and 1
        (16, 4, 2, False),  # no short batch
        (17, 4, 1, False),  # one replica never starves
        (13, 8, 4, True),  # 5 on 4 replicas: 2, 2, 1, 0 (observed with TensorFlow 2.21)
        (12, 8, 4, False),  # 4: 1, 1, 1, 1
        (16, 12, 3, True),  # 4 on 3: 2, 2, 0
        (21, 12, 3, False),  # 9 on 3: 3, 3, 3
    ],
)
def test_a_last_batch_that_would_starve_a_replica(num_examples, batch_size, replicas, empty):
    assert last_batch_leaves_a_replica_empty(num_examples, batch_size, replicas) is empty


def test_an_evaluation_split_is_read_in_batches_that_reach_every_replica():
    from convnets.pipeline import evaluation_batch_size

    assert evaluation_batch_size(365, 8, 1) == 8  # one device: the training batch
    assert evaluation_batch_size(364, 8, 4) == 8  # no short batch
    # 365 in 8s on 4 replicas ends with 5 (2, 2, 1, 0); in 4s with 1, in 12s with 5 again;
    # in 16s with 13 (4, 4, 4, 1)
    assert evaluation_batch_size(365, 8, 4) == 16
    assert evaluation_batch_size(5, 8, 4) is None  # 5 images over 4 replicas: never


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["distribute=mirrored", "distribute.cpu_replicas=2", "trainer.steps_per_execution=3"],
         "trainer.steps_per_execution=3 with 2 replicas (distribute.cpu_replicas=2): TensorFlow "
         "runs several steps per call on one device only; set trainer.steps_per_execution=1"),
        (["distribute=mirrored", "distribute.cpu_replicas=2", "trainer.jit_compile=true"],
         "trainer.jit_compile=true with several CPU replicas (distribute.cpu_replicas=2): XLA "
         "cannot reach a variable of one logical CPU device from another"),
        (["distribute=one_device", "distribute.cpu_replicas=2"],
         "distribute.cpu_replicas=2 splits the CPU for distribute=mirrored, and this run uses "
         "distribute=one_device"),
    ],
)  # fmt: skip
def test_what_several_replicas_cannot_do_is_refused_before_training(
    tmp_path, monkeypatch, overrides, message
):
    """Each failed after the data loaded with a TensorFlow traceback (or, for one_device,
    trained on one device without a word)."""
    import convnets

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=re.escape(message)):
        convnets.train([*overrides, f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"])
    assert not (tmp_path / "mlflow.db").exists()


def test_auto_and_one_device_on_cpu():
    if tf.config.list_logical_devices("GPU"):
        pytest.skip("CPU-only expectations")
    for strategy in (
        make_strategy(cfg(strategy="auto")),
        make_strategy(cfg(strategy="one_device")),
    ):
        # the default strategy, as hand-written Keras: no distributed-iterator overhead
        assert strategy is tf.distribute.get_strategy()
        assert strategy.num_replicas_in_sync == 1 and strategy.extended.should_checkpoint
    strategy = make_strategy(cfg(strategy="one_device", devices=["/cpu:0"]))
    assert strategy.extended.worker_devices[0].endswith("CPU:0")


def test_configure_devices_is_idempotent_and_refuses_a_late_change():
    have = len(tf.config.list_logical_devices("CPU"))  # starts TensorFlow's runtime
    configure_devices(cfg(cpu_replicas=0))
    configure_devices(cfg(cpu_replicas=have))
    with pytest.raises(ConfigError, match=r"distribute.cpu_replicas=\d+ cannot be applied"):
        configure_devices(cfg(cpu_replicas=have + 1))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"strategy": "mirrored", "devices": ["/gpu:7"]}, r"distribute.devices: '/gpu:7' does"),
        ({"strategy": "mirrored", "devices": ["bogus"]}, r"distribute.devices: 'bogus' does"),
        ({"strategy": "one_device", "devices": ["/cpu:0", "/cpu:0"]}, "exactly one"),
    ],
)
def test_config_errors(kwargs, match):
    untyped = OmegaConf.create(OmegaConf.to_container(cfg()) | kwargs)
    with pytest.raises(ConfigError, match=match):
        make_strategy(untyped)


@pytest.mark.parametrize(
    "tf_config, match",
    [
        (None, "needs TF_CONFIG"),
        ("{not json", "TF_CONFIG is invalid"),
        ('{"cluster": {}}', "TF_CONFIG is invalid"),
        (
            '{"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "worker", "index": 3}}',
            "task worker:3 is not in its cluster",
        ),
    ],
)
def test_multi_worker_needs_a_valid_tf_config(monkeypatch, tf_config, match):
    if tf_config is None:
        monkeypatch.delenv("TF_CONFIG", raising=False)
    else:
        monkeypatch.setenv("TF_CONFIG", tf_config)
    with pytest.raises(ConfigError, match=match):
        make_strategy(cfg(strategy="multi_worker"))


@pytest.mark.slow
def test_two_worker_train_py_is_one_recorded_run(tmp_path):
    """``python train.py distribute=multi_worker`` on two processes: both train in lockstep,
    only the chief records, so the store holds exactly one run with each epoch once."""
    uri = sqlite_store(tmp_path)
    workers = [f"127.0.0.1:{free_port()}" for _ in range(2)]
    procs = []
    for index in range(2):
        tf_config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
        procs.append(
            subprocess.Popen(
                [sys.executable, str(REPO / "train.py"), "distribute=multi_worker",
                 "model.layers=[{filters:8},{filters:8,pool:max}]", "trainer.epochs=2",
                 "trainer.verbose=0", f"tracking.uri={uri}", f"hydra.run.dir={tmp_path / str(index)}"],
                cwd=REPO,
                env={**CLI_ENV, "TF_CONFIG": json.dumps(tf_config)},
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )  # fmt: skip
    outputs = []
    for proc in procs:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out[-3000:]
        outputs.append(out)
    assert "done: test_accuracy=" in outputs[0]
    assert "done (worker, not recording)" in outputs[1]
    client = mlflow.MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("digits").experiment_id])
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2]


# ---------------------------------------------------------------- the Keras workaround's pin

WORKAROUND = """
import tensorflow as tf
from convnets.distribute import _MultiWorkerMirroredStrategy
strategy = _MultiWorkerMirroredStrategy()  # one worker: no TF_CONFIG, no ports
scalar = strategy.run(lambda: tf.constant(2.0))
try:
    tf.distribute.MultiWorkerMirroredStrategy.reduce(strategy, "MEAN", scalar, axis=0)
except ValueError:
    print("plain: rejected")
else:
    print("plain: accepted")
print("ours:", float(strategy.reduce("MEAN", scalar, axis=0)))
"""


def test_keras_still_reduces_multi_worker_metrics_with_axis_0(monkeypatch):
    """What _MultiWorkerMirroredStrategy.reduce works around: Keras's TensorFlow trainer reduces
    each metric of a multi-worker step with strategy.reduce("MEAN", v, axis=0), scalars
    included. If this fails, Keras changed that call: re-check whether the workaround in
    convnets/distribute.py is still needed, then update it and the keras pin."""
    from keras.src.backend.tensorflow import trainer as keras_trainer

    calls = []

    class Spy(tf.distribute.MultiWorkerMirroredStrategy):
        def __init__(self):  # no cluster: only records what Keras asks of it
            pass

        def reduce(self, reduce_op, value, axis=None):
            calls.append((reduce_op, axis))
            return value

    monkeypatch.setattr(keras_trainer, "_collective_all_reduce_multi_worker", lambda s: True)
    keras_trainer.reduce_per_replica({"loss": tf.constant(1.0)}, Spy(), reduction="auto")
    assert calls == [("MEAN", 0)]


def test_multi_worker_reduce_workaround_is_still_needed():
    """TF's MultiWorkerMirroredStrategy still rejects that call on a scalar, and ours accepts
    it. If TF starts accepting it ("plain: accepted"), the workaround has gone stale: remove
    _MultiWorkerMirroredStrategy.reduce (the two-worker test shows whether training works)."""
    proc = subprocess.run(
        [sys.executable, "-c", WORKAROUND],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines() == ["plain: rejected", "ours: 2.0"], proc.stdout
