"""Each epoch's metrics sent to the store from a thread, so that training never waits on it,
and kept while the store does not answer.

:class:`Outbox` takes an epoch at once (:meth:`Outbox.put`); its thread sends what it holds,
oldest first, every epoch waiting in one call. A call that fails is tried again after a pause
that grows to :data:`MAX_RETRY_S`, so the epochs wait out an outage of any length in memory.
:meth:`Outbox.flush` waits, at most so long, until everything is sent; :meth:`Outbox.close`
stops the thread and hands back what is still unsent, which :func:`keep_unsent` appends to
:data:`UNSENT_FILE` in the run's folder for ``python -m convnets.upload`` to send later.

An epoch keeps the time it was put as its timestamp, so a call sent again after its answer
was lost sends the very rows the store may hold already (MLflow ignores such a row).

MLflow's own asynchronous logging (``log_batch(..., synchronous=False)``) does not do this: a
batch is given up once its HTTP retries are spent (about four minutes; the batch is then only
logged as an error), and its flush waits without a bound. No MLflow or TensorFlow here: what
sends is given to the outbox.
"""

from __future__ import annotations

import json
import shlex
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

UNSENT_FILE = "unsent_metrics.jsonl"
FIRST_RETRY_S = 0.5
MAX_RETRY_S = 5.0  # how late, at most, the epochs follow a store that answers again


@dataclass(frozen=True)
class Epoch:
    """One epoch's metrics as they are sent: its step, when it ended, its values."""

    step: int
    timestamp_ms: int
    metrics: dict[str, float]

    @classmethod
    def now(cls, step: int, metrics: dict[str, float]) -> Epoch:
        return cls(step, int(time.time() * 1000), dict(metrics))


class Outbox:
    """A thread that sends the epochs put in it with ``send(epochs)``, retrying until it
    succeeds or the outbox is closed. ``failing(error)`` is called when sending starts to fail,
    ``recovered(count)`` when it succeeds again (``count`` epochs sent then)."""

    def __init__(
        self,
        send: Callable[[list[Epoch]], None],
        *,
        failing: Callable[[Exception], None] | None = None,
        recovered: Callable[[int], None] | None = None,
        first_retry_s: float = FIRST_RETRY_S,
        max_retry_s: float = MAX_RETRY_S,
    ):
        self._send, self._failing, self._recovered = send, failing, recovered
        self._first_retry_s, self._max_retry_s = first_retry_s, max_retry_s
        self._pending: list[Epoch] = []
        self._cond = threading.Condition()
        self._closed = False
        self.error: Exception | None = None  # the last failed call's; None once one succeeds
        self._thread = threading.Thread(target=self._run, name="epoch-sender", daemon=True)
        self._thread.start()

    def put(self, epoch: Epoch) -> None:
        """Queue ``epoch``; returns at once."""
        with self._cond:
            if self._closed:
                raise RuntimeError("the outbox is closed")
            self._pending.append(epoch)
            self._cond.notify_all()

    def pending(self) -> list[Epoch]:
        """The epochs not sent yet, oldest first."""
        with self._cond:
            return list(self._pending)

    def flush(self, timeout_s: float) -> bool:
        """Wait at most ``timeout_s`` until every epoch put is sent; whether it was."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._pending, timeout=timeout_s)

    def close(self, timeout_s: float = 0.0) -> list[Epoch]:
        """Stop sending once everything is sent or ``timeout_s`` has passed; the epochs left
        unsent. A call under way when it stops may still land: sending those epochs again
        adds nothing to the store."""
        self.flush(timeout_s)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            return list(self._pending)

    def _run(self) -> None:
        pause = self._first_retry_s
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending or self._closed)
                if self._closed:
                    return
                batch = list(self._pending)
            try:
                self._send(batch)
            except Exception as err:  # noqa: BLE001 - whatever the store says, try again later
                with self._cond:
                    first, self.error = self.error is None, err
                    closed = self._closed
                if first and not closed and self._failing is not None:
                    self._failing(err)
                with self._cond:  # the pause, cut short by close()
                    self._cond.wait_for(lambda: self._closed, timeout=pause)
                pause = min(2 * pause, self._max_retry_s)
                continue
            with self._cond:
                del self._pending[: len(batch)]
                was_failing, self.error = self.error is not None, None
                closed = self._closed
                self._cond.notify_all()
            pause = self._first_retry_s
            if was_failing and not closed and self._recovered is not None:
                self._recovered(len(batch))


def upload_command(path: Path) -> str:
    """The command that sends an :data:`UNSENT_FILE` to its run (:mod:`convnets.upload`)."""
    return f"python -m convnets.upload {shlex.quote(str(path))}"


def keep_unsent(folder: Path, run_id: str, tracking_uri: str, epochs: Sequence[Epoch]) -> Path:
    """Append ``epochs`` to ``folder``/:data:`UNSENT_FILE`, one JSON object a line (the run,
    its store, the step, its time, its metrics); the file's path."""
    path = Path(folder) / UNSENT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as out:
        for epoch in epochs:
            line = {
                "run_id": run_id,
                "tracking_uri": tracking_uri,
                "step": epoch.step,
                "timestamp_ms": epoch.timestamp_ms,
                "metrics": epoch.metrics,
            }
            out.write(json.dumps(line) + "\n")
    return path


def read_unsent(path: Path) -> list[tuple[str, str, Epoch]]:
    """``(run id, tracking URI, epoch)`` for each line of an :data:`UNSENT_FILE`; ValueError
    naming the line that is not one."""
    found = []
    for number, text in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not text.strip():
            continue
        try:
            line = json.loads(text)
            epoch = Epoch(
                int(line["step"]),
                int(line["timestamp_ms"]),
                {str(k): float(v) for k, v in line["metrics"].items()},
            )
            found.append((str(line["run_id"]), str(line["tracking_uri"]), epoch))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"line {number} is not an unsent epoch ({err})") from err
    return found
