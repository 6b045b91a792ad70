"""How fast are user errors refused? Seconds from start to the one ``error:`` line.

    python benchmarks/failfast.py [--repeats 1]

The tests check that these errors are one line naming the fix (tests/test_train_cli.py,
test_data_cli.py, test_tracking.py, test_data.py); how long they take is measured here:

- ``tracking_unreachable`` (CLI): ``python train.py tracking.uri=http://127.0.0.1:<closed
  port>``. MLflow on its own retries for minutes; target < 60 s (Python + TensorFlow start-up
  on a loaded 2-core machine dominates).
- ``tfds_offline`` (CLI): ``dataset=mnist`` with an empty data dir and the TFDS download host
  unreachable (simulated, as in tests/test_data_cli.py). TFDS on its own retries the download
  for minutes; target < 60 s.
- ``image_folder_missing`` (CLI): ``dataset=image_folder dataset.path=<missing>``; < 60 s.
- ``tracker_unreachable`` (in-process): ``Tracker(uri, http_timeout_s=5).check_store()`` on a
  closed port; target < 5 s.
- ``tfds_offline_check`` (in-process): ``convnets.data.check_available`` for the offline MNIST
  case above; target < 10 s.

Medians over ``--repeats``. Prints a table, then one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGETS_S = {
    "tracking_unreachable": 60,
    "tfds_offline": 60,
    "image_folder_missing": 60,
    "tracker_unreachable": 5,
    "tfds_offline_check": 10,
}
IN_PROCESS = ("tracker_unreachable", "tfds_offline_check")
OFFLINE_TRAIN = (  # train.py with the TFDS download host unreachable (tests/test_data_cli.py)
    "import runpy, sys; import convnets.data; convnets.data._reachable = lambda host: False; "
    "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
)


def closed_port_uri() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def cli_case(name: str, tmp: Path) -> tuple[float, bool]:
    """Seconds until ``python train.py`` exits, and whether it exited with one error line."""
    overrides = [f"tracking.uri=sqlite:///{tmp}/m.db", f"hydra.run.dir={tmp}/hydra"]
    prefix: list[str] = []
    if name == "tracking_unreachable":
        overrides[0] = f"tracking.uri={closed_port_uri()}"
    elif name == "tfds_offline":
        (tmp / "tfds").mkdir(exist_ok=True)
        overrides += ["dataset=mnist", f"dataset.data_dir={tmp / 'tfds'}"]
        prefix = ["-c", OFFLINE_TRAIN]
    else:
        overrides += ["dataset=image_folder", f"dataset.path={tmp / 'missing'}"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    env.pop("HYDRA_FULL_ERROR", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, *prefix, "train.py", *overrides],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    elapsed = time.monotonic() - started
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    return elapsed, proc.returncode != 0 and len(errors) == 1


def in_process_case(name: str, tmp: Path) -> tuple[float, bool]:
    from omegaconf import OmegaConf

    from convnets import data
    from convnets.config import DatasetConfig
    from convnets.errors import DataError, TrackingError
    from convnets.tracking import Tracker

    started = time.monotonic()
    try:
        if name == "tracker_unreachable":
            Tracker(closed_port_uri(), http_timeout_s=5).check_store()
        else:
            reachable = data._reachable
            data._reachable = lambda host: False
            try:
                cfg = OmegaConf.merge(
                    OmegaConf.structured(DatasetConfig),
                    OmegaConf.load(ROOT / "configs" / "dataset" / "mnist.yaml"),
                    {"data_dir": str(tmp)},
                )
                data.check_available(cfg)
            finally:
                data._reachable = reachable
    except (TrackingError, DataError):
        return time.monotonic() - started, True
    return time.monotonic() - started, False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()

    results = {}
    for name in TARGETS_S:
        times, refused = [], True
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory() as tmp:
                case = in_process_case if name in IN_PROCESS else cli_case
                elapsed, ok = case(name, Path(tmp))
            times.append(elapsed)
            refused = refused and ok
        seconds = statistics.median(times)
        results[name] = {
            "seconds": round(seconds, 2),
            "target_s": TARGETS_S[name],
            "refused_with_one_line": refused,
            "meets_target": refused and seconds < TARGETS_S[name],
        }

    print(f"{'case':<22} {'seconds':>8} {'target':>7}  refused  meets")
    for name, r in results.items():
        print(
            f"{name:<22} {r['seconds']:>8.2f} {r['target_s']:>7}  "
            f"{str(r['refused_with_one_line']):<7}  {r['meets_target']}"
        )
    summary = {
        "repeats": args.repeats,
        "cases": results,
        "meets_targets": all(r["meets_target"] for r in results.values()),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
