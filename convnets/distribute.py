"""Config -> ``tf.distribute`` strategy: the one place that decides where training runs.

Two steps, because TensorFlow fixes its device layout the first time anything touches a
device: :func:`configure_devices` (logical CPU replicas, GPU memory growth) must run before
any tensor is created, then :func:`make_strategy` builds the strategy the trainer uses.
``trainer.batch_size`` is the global batch: Keras splits each batch across the replicas.
"""

from __future__ import annotations

import json
import logging
import os

import tensorflow as tf

from convnets.errors import ConfigError

log = logging.getLogger(__name__)


def configure_devices(dist_cfg) -> None:
    """Split the CPU into ``dist_cfg.cpu_replicas`` logical devices and let GPU memory grow.

    Idempotent. Raises :class:`ConfigError` when TensorFlow has already initialised its
    devices with a different CPU layout (it cannot be changed inside a running process).
    """
    replicas = int(dist_cfg.cpu_replicas or 0)  # >= 0: checked in the config
    if replicas > 0:
        _split_cpu(replicas)
    for gpu in tf.config.list_physical_devices("GPU"):
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:
            # Devices already initialised: memory growth is a convenience, not a contract,
            # so the existing setting stays.
            log.debug("GPU memory growth left unchanged on %s: devices initialised", gpu.name)


def _split_cpu(replicas: int) -> None:
    cpu = tf.config.list_physical_devices("CPU")[0]
    wanted = [tf.config.LogicalDeviceConfiguration() for _ in range(replicas)]
    current = tf.config.get_logical_device_configuration(cpu)
    if current is not None and len(current) == replicas:
        return
    try:
        tf.config.set_logical_device_configuration(cpu, wanted)
    except RuntimeError as err:
        have = len(tf.config.list_logical_devices("CPU"))
        if have == replicas:
            return
        raise ConfigError(
            f"distribute.cpu_replicas={replicas} cannot be applied: TensorFlow already "
            f"initialised {have} logical CPU device(s) in this process; set it before any "
            f"TensorFlow op runs (configure_devices first) or start a new process"
        ) from err


def make_strategy(dist_cfg) -> tf.distribute.Strategy:
    """The strategy named by ``distribute.strategy`` (docs/reference.md, Distribution)."""
    name = dist_cfg.strategy
    if name == "multi_worker":
        # Before anything lists logical devices: that would start TensorFlow's runtime, and the
        # collective ops this strategy needs can only be configured before it starts.
        _check_tf_config()
        return _MultiWorkerMirroredStrategy()
    gpus = [d.name for d in tf.config.list_logical_devices("GPU")]
    if name == "auto":
        if len(gpus) >= 2:
            return tf.distribute.MirroredStrategy(gpus)
        return _single_device()
    if name == "mirrored":
        devices = _requested_devices(dist_cfg) or gpus or _cpu_replicas(dist_cfg)
        return tf.distribute.MirroredStrategy(devices)
    devices = _requested_devices(dist_cfg)
    if len(devices) > 1:
        raise ConfigError(
            f"distribute.devices={devices} names {len(devices)} devices but one_device uses "
            f"exactly one; give one device or use distribute=mirrored"
        )
    return tf.distribute.OneDeviceStrategy(devices[0]) if devices else _single_device()


def describe(strategy: tf.distribute.Strategy) -> str:
    """One line naming the devices a run trains on, e.g. ``1 replica on /device:CPU:0``."""
    devices = [d.rsplit("/", 1)[-1] if "/device:" in d else d for d in _worker_devices(strategy)]
    replicas = strategy.num_replicas_in_sync
    text = f"{replicas} replica{'s' if replicas > 1 else ''} on {', '.join(devices)}"
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        text += " per worker"
    return text


def _worker_devices(strategy: tf.distribute.Strategy) -> list[str]:
    if strategy is tf.distribute.get_strategy() and not tf.distribute.has_strategy():
        gpus = tf.config.list_logical_devices("GPU")
        return [gpus[0].name if gpus else tf.config.list_logical_devices("CPU")[0].name]
    return list(strategy.extended.worker_devices)


def _single_device() -> tf.distribute.Strategy:
    """TensorFlow's default strategy: what hand-written Keras runs under (GPU:0 when there is
    one, else the CPU). OneDeviceStrategy would cost ~55% of throughput on the same work:
    Keras then feeds the tf.data pipeline through the strategy's distributed iterator
    (benchmarks/README.md)."""
    return tf.distribute.get_strategy()


class _MultiWorkerMirroredStrategy(tf.distribute.MultiWorkerMirroredStrategy):
    """MultiWorkerMirroredStrategy whose ``reduce`` takes what Keras 3's ``fit`` passes it.

    Keras 3.15's TensorFlow trainer calls ``strategy.reduce`` in two ways that TF 2.21's
    MultiWorkerMirroredStrategy rejects (MirroredStrategy accepts both): on a whole ``(x, y)``
    batch (a nested structure; ``_maybe_symbolic_build``) and with ``axis=0`` on each scalar
    metric (``reduce_per_replica``). Reducing element by element, and a scalar across replicas
    (it has no axis 0), is what both calls mean.
    """

    def reduce(self, reduce_op, value, axis):
        reduce_one = super().reduce

        def one(v):
            local = self.experimental_local_results(v)[0]
            scalar = getattr(local, "shape", None) is not None and local.shape.rank == 0
            return reduce_one(reduce_op, v, None if scalar else axis)

        return tf.nest.map_structure(one, value)


def _requested_devices(dist_cfg) -> list[str]:
    """``distribute.devices``, each checked against the devices this process has."""
    requested = list(dist_cfg.devices or [])
    known = {_canonical(d.name) for d in tf.config.list_logical_devices()}
    for device in requested:
        try:
            canonical = _canonical(device)
        except ValueError:  # TensorFlow cannot parse it as a device name at all
            canonical = None
        if canonical not in known:
            raise ConfigError(
                f"distribute.devices: {device!r} does not exist here; available: "
                f"{', '.join(sorted(known))}"
            )
    return requested


def _canonical(device: str) -> str:
    """'/gpu:0', '/device:GPU:0' and 'GPU:0' name the same device."""
    spec = tf.DeviceSpec.from_string(device)
    return f"{(spec.device_type or '').upper()}:{spec.device_index or 0}"


def _cpu_replicas(dist_cfg) -> list[str]:
    cpus = [d.name for d in tf.config.list_logical_devices("CPU")]
    if dist_cfg.cpu_replicas and len(cpus) != dist_cfg.cpu_replicas:
        raise ConfigError(
            f"distribute.cpu_replicas={dist_cfg.cpu_replicas} but this process has "
            f"{len(cpus)} logical CPU(s); configure_devices must run before TensorFlow starts"
        )
    return cpus


def _check_tf_config() -> None:
    """MultiWorkerMirroredStrategy reads TF_CONFIG; refuse early with a clear line."""
    raw = os.environ.get("TF_CONFIG")
    hint = (
        'set TF_CONFIG=\'{"cluster": {"worker": ["host1:port", "host2:port"]}, '
        '"task": {"type": "worker", "index": 0}}\' on every worker (README: Several machines)'
    )
    if not raw:
        raise ConfigError(f"distribute.strategy=multi_worker needs TF_CONFIG; {hint}")
    try:
        spec = json.loads(raw)
        workers = spec["cluster"]["worker"]
        task_type, index = spec["task"]["type"], int(spec["task"]["index"])
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"TF_CONFIG is invalid ({err!r}); {hint}") from err
    members = spec["cluster"].get(task_type)
    if not workers or not members or not 0 <= index < len(members):
        raise ConfigError(
            f"TF_CONFIG task {task_type}:{index} is not in its cluster "
            f"{sorted(spec['cluster'])}; {hint}"
        )
