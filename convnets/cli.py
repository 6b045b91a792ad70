"""What every entry point shares: user errors as one line, no traceback."""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from convnets.errors import ConvnetsError

log = logging.getLogger("convnets")


def report_user_errors(task: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a :class:`ConvnetsError` into ``error: <message>`` on stderr and a non-zero exit.

    Hydra would print the exception with part of its traceback; the user needs only the
    line that names the key and the fix. ``HYDRA_FULL_ERROR=1`` re-raises for debugging.
    """

    @functools.wraps(task)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return task(*args, **kwargs)
        except ConvnetsError as err:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            print(f"error: {err}", file=sys.stderr, flush=True)
            sys.exit(err.exit_code)

    return wrapper
