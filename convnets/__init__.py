"""convnets: config-driven research on Conv2D stacks.

From Python: ``convnets.train([...]) -> Run``, ``convnets.evaluate(...)``,
``convnets.compare(...)``, ``convnets.inspect(...)`` (:mod:`convnets.api`); refusals raise
:class:`ConfigError` and the other errors below. Importing the package loads neither
TensorFlow nor MLflow: each call loads what it needs.

Data flows one way: config -> architecture check -> model + data -> strategy -> trainer ->
tracking. ``architecture`` is pure Python (no TensorFlow); nothing below ``job`` knows Hydra.
"""

from convnets.api import compare, evaluate, inspect, train
from convnets.errors import ConfigError, ConvnetsError, DataError, TrackingError, TrainingFailed

__version__ = "0.1.0"
__all__ = [
    "ConfigError",
    "ConvnetsError",
    "DataError",
    "Run",
    "TrackingError",
    "TrainingFailed",
    "compare",
    "evaluate",
    "inspect",
    "train",
]


def __getattr__(name: str):
    if name == "Run":  # the job module loads MLflow: only when asked for
        from convnets.job import Run

        return Run
    raise AttributeError(f"module 'convnets' has no attribute {name!r}")
