"""User-facing errors: each carries one line that names the key, layer or path and the fix.

Entry points print ``error: <message>`` and exit non-zero for these, without a traceback
(set ``HYDRA_FULL_ERROR=1`` to see one). Anything else is a bug and keeps its traceback
in the log.
"""

import sys
from pathlib import Path


class ConvnetsError(Exception):
    """An error the user can fix; ``str(err)`` is the single line they see."""

    exit_code = 1


class ConfigError(ConvnetsError):
    """A config value is invalid (bad key, bad type, an impossible stack)."""

    exit_code = 2


class DataError(ConvnetsError):
    """A dataset is missing, not prepared, or unreadable."""


class TrackingError(ConvnetsError):
    """The MLflow store is unreachable or invalid, or a run id is unknown."""


class CheckpointError(ConvnetsError):
    """A checkpoint folder that cannot be trusted: a weights file swapped, changed, missing, or
    named outside the folder."""


class TrainingFailed(ConvnetsError):
    """Training stopped for a recorded reason (e.g. NaN loss)."""


class Interrupted(KeyboardInterrupt):
    """A stop signal other than Ctrl-C (SIGTERM, SIGHUP: what Slurm, Kubernetes and a closed
    terminal send), raised where the program is so that it is handled exactly like Ctrl-C:
    the last epoch's checkpoint kept, the run ended KILLED with the signal's name."""

    def __init__(self, signum: int):
        import signal

        self.signum = signum
        super().__init__(signal.Signals(signum).name)


def command(name: str) -> str:
    """How the user runs ``name`` (train, evaluate), for printed hints: the console script
    when they ran one (``convnets-train``), else the repository's ``python train.py``."""
    started = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    return f"convnets-{name}" if started.startswith("convnets-") else f"python {name}.py"
