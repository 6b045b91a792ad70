"""Mistakes that used to reach TensorFlow (a traceback after seconds) or say too little, each
refused in one ``error:`` line (exit 2 for a config, 1 for a store), before a store file
exists: through the real CLI where the shell's or the command line's part matters, the others
in this process (``convnets.train`` raises the same message)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import CLI_ENV, REPO, command, sqlite_store

import convnets
from convnets.errors import ConvnetsError

CASES = {
    "list index past the end": (
        ["model.layers.5.filters=8"],
        "error: model.layers.5: there is no entry 5: model.layers has 4 (indices 0-3); to add "
        "one, give the whole list (model.layers=[...])",
    ),
    "channel statistics": (
        ["dataset.mean=[0.1,0.2]"],
        "error: dataset.mean has 2 values but the digits images have 1 channel: give one value "
        "or one per channel",
    ),
    "empty store": (
        ["tracking.uri="],
        "error: tracking.uri= is empty: give a store, e.g. sqlite:///mlflow.db (the default) or "
        "http://host:5000",
    ),
    "uneven batch split": (
        ["distribute=mirrored", "distribute.cpu_replicas=3"],
        "error: trainer.batch_size=64 (the global batch) does not split evenly over 3 replicas "
        "(distribute.cpu_replicas=3): use a multiple of 3, e.g. 63 or 66",
    ),
    "batch smaller than the replicas": (
        ["distribute=mirrored", "distribute.devices=[/cpu:0,/cpu:1]", "trainer.batch_size=1"],
        "error: trainer.batch_size=1 (the global batch) does not split evenly over 2 replicas "
        "(distribute.devices has 2): use a multiple of 2, e.g. 2",
    ),
    "a path the shell split at its space": (
        ["checkpoint_dir=/data/my", "runs/a1"],
        "error: runs/a1: not an override (key=value): the shell split checkpoint_dir= at a "
        "space; quote the whole value: \"checkpoint_dir='/data/my runs/a1'\"",
    ),
    "an unset environment variable": (
        ["tracking.experiment=${oc.env:CONVNETS_TEST_UNSET}"],
        "error: tracking.experiment: its ${...} cannot be resolved (Environment variable "
        "'CONVNETS_TEST_UNSET' not found); set what it refers to (an environment variable, a key "
        "of the config), or give an environment variable a default: ${oc.env:NAME,default}",
    ),
    "an empty run id (an unset shell variable)": (
        ["resume="],
        "error: resume= is empty: give a run id (resume=<run id>), or leave resume out to train "
        "a new run",
    ),
    "a checkpoint folder without resume=": (
        ["checkpoint_dir=/data/copy"],
        "error: checkpoint_dir=/data/copy says where resume=<run id> finds a copy of that run's "
        "checkpoint folder; a new or reproduced run keeps its checkpoints in <its run "
        "dir>/checkpoints/<run id>: leave checkpoint_dir out",
    ),
    "a forgotten '='": (
        ["trainer.verbose=0", "model.width", "2"],
        "error: model.width: an override needs its value: write model.width=<value> (no space "
        "around '=')",
    ),
    "a search path that is not there": (
        ["hydra.searchpath=[file:///no/such/configs]", "model=mine"],
        "error: hydra.searchpath: file:///no/such/configs is not a folder here; give the folder "
        "that holds your config groups (model/, experiment/, local/), e.g. "
        "hydra.searchpath=[file:///home/me/my_configs]",
    ),
    "a sweep without -m": (
        ["model.layer_defaults.kernel_size=3,5"],
        "error: model.layer_defaults.kernel_size=3,5: a comma sweeps, and this is not a sweep "
        "(-m); add -m to sweep over the values, or write model.layer_defaults.kernel_size=[3,5] "
        "for a list, or quote it for a string",
    ),
    "a sweep without -m of a number": (
        ["trainer.seed=1,2"],
        "error: trainer.seed=1,2: a comma sweeps, and this is not a sweep (-m); add -m to sweep "
        "over the values, or give one value",
    ),
    "a sweep without -m of a name": (
        ["tracking.experiment=a,b"],
        "error: tracking.experiment=a,b: a comma sweeps, and this is not a sweep (-m); add -m to "
        "sweep over the values, or quote it for one value holding a comma "
        "('tracking.experiment=\"a,b\"')",
    ),
    "a fraction for a whole number": (
        ["trainer.epochs=1.5"],
        "error: trainer.epochs: Value '1.5' of type 'float' could not be converted to Integer; "
        "give a whole number",
    ),
    "a word for a switch": (
        ["trainer.deterministic=maybe"],
        "error: trainer.deterministic: Value 'maybe' is not a valid bool (type str); give true or "
        "false",
    ),
    "a value holding '='": (
        ["tracking.experiment=lr=0.1"],
        "error: tracking.experiment=lr=0.1: Hydra reads a value holding '=' only when it is "
        "quoted; write \"tracking.experiment='lr=0.1'\"",
    ),
    "a path with non-ASCII letters": (
        ["checkpoint_dir=/data/été/a1"],
        "error: checkpoint_dir=/data/été/a1: Hydra reads a value with spaces or non-ASCII "
        "letters only when it is quoted; write it as \"checkpoint_dir='/data/été/a1'\"",
    ),
}


# Arguments as the shell split them, and one of the config's own checks, through train.py.
THROUGH_THE_COMMAND_LINE = {
    "list index past the end",
    "a path the shell split at its space",
    "a forgotten '='",
    "a path with non-ASCII letters",
    "a value holding '='",
}


@pytest.mark.parametrize("case", list(CASES))
def test_refused_in_one_line_before_anything_exists(tmp_path, monkeypatch, case):
    overrides, line = CASES[case]
    monkeypatch.chdir(tmp_path)  # an empty folder: whatever a store would leave shows
    if case in THROUGH_THE_COMMAND_LINE:
        result = command(
            "train.py", *overrides, f"hydra.run.dir={tmp_path / 'out'}", cwd=tmp_path, timeout=120
        )
        assert result.returncode == 2, result.stderr[-2000:]
        assert result.stderr.strip().splitlines() == [line]
    else:
        with pytest.raises(ConvnetsError) as refused:
            convnets.train(overrides, output_dir=tmp_path / "out")
        assert refused.value.exit_code == 2 and f"error: {refused.value}" == line
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()


def test_a_stack_that_cannot_fit_in_memory_is_refused_before_tensorflow(tmp_path):
    result = command(
        "train.py",
        "model.layers=[{filters:100000},{filters:100000}]",
        f"hydra.run.dir={tmp_path / 'out'}",
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: model.layers: this stack needs ~")
    assert "GiB for a batch of 64" in line and "more than this machine's" in line
    assert not (tmp_path / "mlflow.db").exists()


@contextlib.contextmanager
def memory_cgroup(limit: int):
    """A fresh memory control group of ``limit`` bytes (cgroup v1's memory hierarchy, or v2's
    where the memory controller is delegated to children); yields a ``preexec_fn`` that moves
    a child process into it. Skips where this process may not make one (not root, no such
    hierarchy), as inside most containers."""
    root = Path("/sys/fs/cgroup")
    candidates = [(root / "memory", "memory.limit_in_bytes"), (root, "memory.max")]
    for base, name in candidates:
        group = base / f"convnets-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            group.mkdir()
        except OSError:
            continue
        try:
            (group / name).write_text(str(limit))
        except OSError:
            group.rmdir()
            continue
        try:
            yield lambda group=group: (group / "cgroup.procs").write_text(str(os.getpid()))
        finally:
            for _ in range(50):  # the group can go once its last process has exited
                try:
                    group.rmdir()
                    break
                except OSError:
                    time.sleep(0.1)
        return
    pytest.skip("cannot create a memory control group here (not root, or none delegated)")


def train_limited(limit: Callable[[], None], *args: str, cwd: Path, timeout: float = 120):
    """``python train.py ARGS`` whose process runs ``limit`` first (a memory limit)."""
    return subprocess.run(
        [sys.executable, str(REPO / "train.py"), *args],
        cwd=cwd,
        env=CLI_ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=limit,
    )


def address_space(limit: int) -> Callable[[], None]:
    import resource

    return lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def test_a_stack_over_its_control_groups_memory_is_refused_before_tensorflow(tmp_path):
    """A container, a Slurm or Kubernetes job: the kernel would kill the training mid-epoch
    without a word; the machine's 20+ GiB are not what the process may use."""
    stack = "model.layers=[{filters:2048},{filters:2048}]"  # ~3.6 GiB for a batch of 256
    with memory_cgroup(2 * 2**30) as enter:
        result = train_limited(
            enter, stack, "trainer.batch_size=256", f"hydra.run.dir={tmp_path / 'out'}",
            cwd=tmp_path,
        )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: model.layers: this stack needs ~3.6 GiB for a batch of 256")
    assert line.endswith(
        "more than the 2.0 GiB its control group allows; lower trainer.batch_size, model.width "
        "or the filters"
    )
    assert not (tmp_path / "mlflow.db").exists()


def test_a_stack_over_the_address_space_limit_is_refused_before_tensorflow(tmp_path):
    result = train_limited(
        address_space(6 * 2**30), "model.layers=[{filters:2048},{filters:2048}]",
        "trainer.batch_size=1024", f"hydra.run.dir={tmp_path / 'out'}", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    [line] = result.stderr.strip().splitlines()
    assert "needs ~12.6 GiB" in line
    assert "more than the 6.0 GiB address space ulimit -v allows" in line
    assert not (tmp_path / "mlflow.db").exists()


def test_a_control_groups_limit_is_read_from_the_group_or_any_group_above_it(tmp_path):
    from convnets.memory_limit import cgroup_limit

    def hierarchy(lines: str, files: dict[str, str]) -> int | None:
        for name, text in files.items():
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name).write_text(text)
        (tmp_path / "cgroup").write_text(lines)
        return cgroup_limit(tmp_path / "fs", tmp_path / "cgroup")

    v1_none = str(9223372036854771712)
    assert (
        hierarchy("4:memory:/job/step\n", {"fs/memory/job/step/memory.limit_in_bytes": v1_none})
        is None
    )
    assert (
        hierarchy("4:memory:/job/step\n", {"fs/memory/job/memory.limit_in_bytes": "8589934592"})
        == 2**33
    )
    assert hierarchy("0::/\n", {"fs/memory.max": "max"}) is None  # a container without a limit
    assert hierarchy("0::/\n", {"fs/memory.max": "4294967296"}) == 2**32
    assert hierarchy("0::/a\n", {"fs/unified/a/memory.max": "1073741824"}) == 2**30  # hybrid
    assert cgroup_limit(tmp_path / "fs", tmp_path / "no-such-file") is None


def test_the_memory_estimate_warns_above_half_the_machine():
    from convnets.architecture import analyze, resolve_stack
    from convnets.checks import check_memory, training_memory
    from convnets.memory_limit import MemoryLimit

    analysis = analyze(resolve_stack({"layers": [{"filters": 64}]}), [32, 32, 3], 10)
    need = training_memory(analysis, 64)
    # conv + batch-norm outputs of 32x32x64 per image, 6 float32 copies, 64 images; params x 4
    assert need == (2 * 32 * 32 * 64 + 64 + 10) * 64 * 6 * 4 + analysis.param_count * 4 * 4
    machine = lambda size: MemoryLimit(size, "this machine's")  # noqa: E731
    assert check_memory(analysis, 64, machine(4 * need)) is None
    assert "over half of this machine's" in check_memory(analysis, 64, machine(int(1.5 * need)))
    with pytest.raises(Exception, match="more than this machine's"):
        check_memory(analysis, 64, machine(need - 1))


def test_no_batch_is_estimated_larger_than_the_training_set(tmp_path):
    """A batch size over the number of training images trains in batches of all of them, and
    the estimate counts those: digits' ~1,150 images at ``batch_size=1000000`` once asked for
    ~196 GB and were refused."""
    from convnets.architecture import analyze, resolve_stack
    from convnets.checks import check_memory, training_memory
    from convnets.memory_limit import MemoryLimit

    analysis = analyze(resolve_stack({"layers": [{"filters": 64}]}), [8, 8, 1], 10)
    limit = MemoryLimit(training_memory(analysis, 3000), "this machine's")
    with pytest.raises(Exception, match="for a batch of 1000000 "):
        check_memory(analysis, 1_000_000, limit)
    assert check_memory(analysis, 1_000_000, limit, train_images=1000) is None
    warned = check_memory(analysis, 1_000_000, limit, train_images=1600)
    assert "for a batch of all 1600 training images (trainer.batch_size=1000000)" in warned

    run = convnets.train(
        ["model.layers=[{filters:64}]", "trainer.batch_size=1000000", "trainer.epochs=1",
         "trainer.verbose=0", "tracking.log_model=false", f"tracking.uri={sqlite_store(tmp_path)}"],
        output_dir=tmp_path / "out",
    )  # fmt: skip
    assert run.metrics["epochs_completed"] == 1


def test_an_output_folder_that_cannot_be_created_is_one_line(tmp_path):
    (tmp_path / "taken").write_text("a file, not a folder")
    result = command("train.py", f"hydra.run.dir={tmp_path / 'taken'}", cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'taken'}: File exists; the command's output folder cannot be "
        "created there: run from a writable folder or pick another with hydra.run.dir=... "
        "(hydra.sweep.dir=... for -m)"
    ]


def test_a_local_config_without_its_package_line_says_how_to_fix_it(tmp_path):
    (tmp_path / "configs" / "local").mkdir(parents=True)
    (tmp_path / "configs" / "local" / "default.yaml").write_text("tracking:\n  uri: x\n")
    result = command(
        "train.py", f"hydra.searchpath=[file://{tmp_path / 'configs'}]", cwd=tmp_path, timeout=120
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: local/default.yaml: its keys land under 'local.' (Hydra's package for a file in "
        "local/); make '# @package _global_' its first line so they set top-level keys such as "
        "tracking.uri"
    ]


def test_a_store_folder_without_write_permission_says_so(tmp_path):
    folder = tmp_path / "shared"
    folder.mkdir()
    folder.chmod(0o555)
    # root ignores permissions: the command runs without the capability that lets it
    as_user = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]
    if os.geteuid() == 0 and shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: permissions cannot apply")
    result = subprocess.run(
        [*(as_user if os.geteuid() == 0 else []), sys.executable, str(REPO / "train.py")]
        + [f"tracking.uri=sqlite:///{folder}/mlflow.db", f"hydra.run.dir={tmp_path / 'out'}"],
        cwd=tmp_path,
        env=CLI_ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [
        f"error: tracking.uri=sqlite:///{folder}/mlflow.db: cannot write in {folder} "
        "(Permission denied); SQLite and our lock write beside mlflow.db, so its folder must "
        "be writable by this user: fix its permissions or record elsewhere with "
        "tracking.uri=sqlite:///<writable folder>/mlflow.db"
    ]
    assert list(folder.iterdir()) == []


@pytest.mark.slow
def test_running_out_of_memory_in_training_is_one_line_and_a_failed_run(tmp_path):
    """A stack the estimate lets through (~3.6 GiB of the 4.5 GiB address space: a warning)
    that does not fit beside TensorFlow's own ~3 GiB of address space, which the estimate
    leaves out."""
    from mlflow.tracking import MlflowClient

    uri = sqlite_store(tmp_path)

    def train():
        return train_limited(
            address_space(9 * 2**29), f"tracking.uri={uri}",  # 4.5 GiB
            "model.layers=[{filters:2048},{filters:2048}]", "trainer.batch_size=256",
            f"hydra.run.dir={tmp_path / 'out'}", "trainer.verbose=0", cwd=tmp_path, timeout=300,
        )  # fmt: skip

    result = train()
    crashes = 0
    if result.returncode == -signal.SIGSEGV:
        # TensorFlow's own crash, not this test's subject: on a Xeon with AMX, oneDNN's
        # kernels now and then dereference an allocation that failed instead of reporting it
        # (2 runs of 32 here, under load), and a process that segfaults can say nothing. The run
        # it left RUNNING is ended KILLED by the next command (liveness); that next command
        # is this retry, which must then report the failure it is about.
        crashes, result = 1, train()
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: out of memory"), last
    assert last.endswith("lower trainer.batch_size (now 256), model.width or the filters")
    run, *crashed = MlflowClient(uri).search_runs(["1"], order_by=["attributes.start_time DESC"])
    assert run.info.status == "FAILED"
    assert run.data.tags["failure_reason"] == last.removeprefix("error: ")
    assert [r.info.status for r in crashed] == ["KILLED"] * crashes
