"""No password in any URI the commands are given: it would reach the run's files and the console.

A user name alone is fine (``postgresql://alice@host/db``): the password comes from the
environment. Checked twice, before anything is written: the command line before Hydra composes
(:func:`credentials_in`, by :func:`convnets.cli.run_main` and :mod:`convnets.api`), and the
composed config with its interpolations resolved (:class:`RefuseCredentials`, a Hydra callback,
and the API), which also sees config files, ``configs/local/`` and ``${oc.env:...}``.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from typing import Any

from hydra.experimental.callback import Callback

from convnets.errors import ConfigError

# scheme://user:password@ (a user name alone, e.g. postgresql://alice@host/db, is fine: the
# password then comes from the environment or ~/.pgpass)
_PASSWORD = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*)://[^/@:\s]*:[^/@\s]*@")
_DATABASE_SCHEMES = ("postgresql", "postgres", "mysql", "mssql", "oracle")


def credentials_in(args: Sequence[str]) -> str | None:
    """The refusal for the first argument that puts ``user:password@`` in a URI, or None.

    Checked before Hydra composes: Hydra writes every override into the run dir
    (``.hydra/overrides.yaml``, ``config.yaml``, ``hydra.yaml``) before the task starts, even
    one that is then refused, and MLflow prints the tracking URI; a password given there would
    reach disk and the console. The message never repeats the value.
    """
    for arg in args:
        if (found := _PASSWORD.search(arg)) is not None:
            key = arg.split("=", 1)[0] if "=" in arg else "an argument"
            return password_refusal(key, found["scheme"])
    return None


def credentials_in_config(cfg: Any) -> str | None:
    """The refusal for the first value of the composed config (interpolations resolved: an
    ``${oc.env:...}`` too) that holds ``user:password@``: from a config file, ``configs/local/``
    or a searchpath file, which the command line check cannot see. Hydra's own node is
    checked for the search's storage (``hydra.sweeper.storage``)."""
    from omegaconf import OmegaConf

    def walk(node: Any, path: str) -> str | None:
        if isinstance(node, dict):
            for key, value in node.items():
                found = walk(value, f"{path}.{key}" if path else str(key))
                if found:
                    return found
        elif isinstance(node, list):
            for index, value in enumerate(node):
                found = walk(value, f"{path}.{index}")
                if found:
                    return found
        elif isinstance(node, str) and (match := _PASSWORD.search(node)) is not None:
            return password_refusal(path, match["scheme"])
        return None

    for key in cfg:
        if key == "hydra":
            storage = OmegaConf.select(cfg, "hydra.sweeper.storage", default=None)
            found = walk(storage, "hydra.sweeper.storage")
        else:
            found = (
                walk(OmegaConf.to_container(cfg[key], resolve=True), str(key))
                if (OmegaConf.is_config(cfg[key]))
                else walk(cfg[key], str(key))
            )
        if found:
            return found
    return None


def password_refusal(key: str, scheme: str) -> str:
    """Where the password goes instead, for the URI's scheme."""
    if scheme.split("+", 1)[0].lower() in _DATABASE_SCHEMES:
        where = (
            "give the user in the URI (postgresql://user@host/db) and the password through "
            "libpq: PGPASSWORD or ~/.pgpass (PGUSER for the user)"
        )
    else:
        where = "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD instead"
    return (
        f"{key}: a URI with user:password@ would be written to the run's files and printed; "
        f"drop the password from the URI and {where}"
    )


class RefuseCredentials(Callback):
    """Hydra callback (``hydra.callbacks`` in the command configs): refuse a password in the
    composed config before Hydra writes ``.hydra/*.yaml`` or a job starts. ``on_run_start``
    and ``on_multirun_start`` run after composition and before ``run_job`` writes them."""

    def on_run_start(self, config: Any, **kwargs: Any) -> None:
        self._check(config)

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        self._check(config)

    @staticmethod
    def _check(config: Any) -> None:
        try:
            message = credentials_in_config(config)
        except Exception:  # noqa: BLE001 - an interpolation that fails is reported by the task
            return
        if message is not None:
            print(f"error: {message}", file=sys.stderr, flush=True)
            sys.exit(ConfigError.exit_code)
