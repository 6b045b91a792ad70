"""``python -m convnets.upload <unsent_metrics.jsonl> [tracking.uri=URI]``: send a run the
epochs its MLflow store did not take while it trained (the store stopped answering and had not
come back by the end; see :mod:`convnets.outbox`).

The file names its run and its store; ``tracking.uri=`` reaches the same store another way
(the server moved). Only what the run lacks is sent: a (metric, step) it has already is left
as it is, so uploading twice, or after ``resume=`` sent the same epochs from the checkpoint,
adds nothing.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from convnets.cli import quiet_library_logs
from convnets.credentials import credentials_in
from convnets.errors import ConfigError, ConvnetsError, TrackingError, warn
from convnets.outbox import UNSENT_FILE, read_unsent


@dataclass(frozen=True)
class Uploaded:
    run_id: str
    tracking_uri: str  # as shown (no credentials)
    sent: int  # metric values sent
    had: int  # values of the file the run had already
    status: str  # the run's, after: RUNNING when its end was never recorded


def upload(path: str | Path, uri: str | None = None) -> Uploaded:
    """Send the epochs kept in ``path`` to their run, in the store the file names or ``uri``."""
    from convnets.tracking import describe_error, open_store, redact, store_failure

    try:
        entries = read_unsent(Path(path))
    except OSError as err:
        raise ConfigError(f"{path}: cannot be read ({err.strerror or err})") from err
    except ValueError as err:
        raise ConfigError(f"{path}: {err}; give the run's {UNSENT_FILE}") from err
    runs = sorted({run_id for run_id, _, _ in entries})
    if len(runs) != 1:
        found = "no epoch" if not runs else f"epochs of {len(runs)} runs ({', '.join(runs)})"
        raise ConfigError(f"{path}: holds {found}; give the {UNSENT_FILE} of one run")
    [run_id] = runs
    uris = sorted({store for _, store, _ in entries})
    if uri is None and len(uris) != 1:
        raise ConfigError(f"{path}: names {len(uris)} stores; say which with tracking.uri=...")
    uri = uri or uris[0]
    tracker = open_store(uri)
    run = tracker.get_run(run_id)
    if run.info.lifecycle_stage == "deleted":
        raise TrackingError(f"run {run_id} is deleted in {redact(uri)}; restore it first")
    keys = sorted({key for _, _, epoch in entries for key in epoch.metrics})
    known = tracker.metric_steps(run_id, keys)
    missing, had = [], 0
    for _, _, epoch in entries:
        new = {k: v for k, v in epoch.metrics.items() if (k, epoch.step) not in known}
        had += len(epoch.metrics) - len(new)
        known |= {(key, epoch.step) for key in new}  # a step kept twice is sent once
        if new:
            missing.append((epoch.step, epoch.timestamp_ms, new))
    try:
        if missing:
            tracker.log_steps(run_id, missing)
    except Exception as err:
        if not store_failure(err):
            raise
        raise TrackingError(
            f"tracking.uri={redact(uri)}: the MLflow store did not take the epochs "
            f"({describe_error(err)}); nothing is lost, try again once it answers"
        ) from err
    sent = sum(len(m) for _, _, m in missing)
    return Uploaded(run_id, redact(uri), sent, had, run.info.status)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="python -m convnets.upload",
        description=f"Send a run the epochs its MLflow store did not take ({UNSENT_FILE}).",
    )
    parser.add_argument("file", help=f"the run's {UNSENT_FILE}")
    parser.add_argument(
        "store", nargs="?", metavar="tracking.uri=URI", help="the store, if not the file's"
    )
    args = parser.parse_args(argv)
    quiet_library_logs()
    try:
        refusal = credentials_in(argv)
        if refusal is not None:
            raise ConfigError(refusal)
        uri = None
        if args.store is not None:
            key, _, uri = args.store.partition("=")
            if key != "tracking.uri" or not uri:
                raise ConfigError(f"{args.store}: only tracking.uri=<store> may follow the file")
        done = upload(args.file, uri)
    except ConvnetsError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return err.exit_code
    print(
        f"uploaded: {done.sent} metric values to run {done.run_id} in {done.tracking_uri}"
        f" ({done.had} of the file's it had already)",
        flush=True,
    )
    if done.status == "RUNNING":  # the store was gone when the run ended: nobody ended it
        from convnets.recording import resume_command

        warn(
            f"run {done.run_id} is still RUNNING: its epochs are in, but its test metrics and "
            "model were never recorded (the store was gone when it ended); finish it with: "
            f"{resume_command(done.run_id, uri or done.tracking_uri)}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
