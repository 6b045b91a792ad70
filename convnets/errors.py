"""User-facing errors: each carries one line that names the key, layer or path and the fix.

Entry points print ``error: <message>`` and exit non-zero for these, without a traceback
(set ``HYDRA_FULL_ERROR=1`` to see one). Anything else is a bug and keeps its traceback
in the log.
"""

import errno
import re
import shlex
import sys
from pathlib import Path


def warn(message: str) -> None:
    """The one ``warning: <message>`` line on stderr: the run goes on, the user may act."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


class ConvnetsError(Exception):
    """An error the user can fix; ``str(err)`` is the single line they see."""

    exit_code = 1


class ConfigError(ConvnetsError):
    """The command is wrong: a bad key or type, an impossible stack, or a run of the wrong
    kind for its key (a sweep's parent to resume, a run without a model to start from).
    Exit status 2; the other errors (1) say the command was right but the store, the data,
    a checkpoint or the training failed it."""

    exit_code = 2


class DataError(ConvnetsError):
    """A dataset is missing, not prepared, or unreadable."""


class TrackingError(ConvnetsError):
    """The MLflow store is unreachable or invalid, or a run id is unknown."""


class CheckpointError(ConvnetsError):
    """A checkpoint folder that cannot be trusted: a weights file swapped, changed, missing, or
    named outside the folder."""


class DiskFull(ConvnetsError):
    """A write ran out of space (or quota): ``path`` names the file that could not be written
    (its partial copy is removed); ``hint`` says what was kept and how to continue."""

    def __init__(self, path: str | Path, hint: str = ""):
        self.path = str(path)
        super().__init__(f"{path}: no space left on device{hint}")


def out_of_space(err: BaseException) -> bool:
    """Whether ``err`` is a write that failed for lack of space or quota on its disk."""
    return isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)


class StorageLost(ConvnetsError):
    """The Optuna storage of a search stopped answering (its server went down, the network
    failed): the study keeps what it recorded, and rerunning the command continues it."""


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


# A path or URI Hydra and the shell both read as is: the "/" keeps Hydra from reading it as a
# number, a bool or null.
_PLAIN = re.compile(r"[\w.:@%+-]*/[\w/.:@%+-]*", re.ASCII)


def hydra_override(key: str, value: object) -> str:
    """``key=value`` as Hydra reads it back as the string ``value``: quoted when Hydra's
    override grammar would refuse it unquoted (spaces around, non-ASCII letters, parentheses,
    ``=``, ``,`` for a sweep) or read it as another type; the quote and the backslashes
    before it escaped."""
    text = str(value)
    if _PLAIN.fullmatch(text):
        return f"{key}={text}"
    escaped = re.sub(r"(\\*)('|$)", lambda m: m[1] * 2 + ("\\'" if m[2] else ""), text)
    return f"{key}='{escaped}'"


def shell_override(key: str, value: object) -> str:
    """:func:`hydra_override` as one shell word, for printed commands. No library function
    quotes for both: ``shlex.quote`` knows only the shell."""
    word = hydra_override(key, value)
    if _PLAIN.fullmatch(str(value)):
        return word
    if not re.search(r"[\"$`\\!]", word):
        return f'"{word}"'  # readable: "checkpoint='/runs/été 1/model.keras'"
    return shlex.quote(word)
