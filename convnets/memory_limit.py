"""How much memory this process may use: the machine's, or less where a control group (a
container, a Slurm or Kubernetes job) or an address-space limit (``ulimit -v``) says so.

Read by hand: psutil reports the machine's memory only, and no maintained library reads a
process's control-group limit. A stack that needs more than a control group allows is killed
by the kernel mid-training without a word (SIGKILL), and one past the address-space limit
fails in TensorFlow's kernels, where oneDNN sometimes crashes instead of reporting it; checked
before TensorFlow loads, either is one line instead.
"""

from __future__ import annotations

import resource
from pathlib import Path
from typing import NamedTuple

# cgroup v1 writes "no limit" as the largest page-aligned counter (9223372036854771712).
_UNLIMITED = 2**62


class MemoryLimit(NamedTuple):
    bytes: int
    what: str  # e.g. "this machine's 23.5 GiB", for "more than ..." and "over half of ..."


def memory_limit() -> MemoryLimit:
    """The smallest of the machine's memory, this process's control-group limit and its
    address-space limit, with words that say which it is."""
    import psutil

    gib = 2**30
    total = psutil.virtual_memory().total
    best = MemoryLimit(total, f"this machine's {total / gib:.1f} GiB")
    group = cgroup_limit(Path("/sys/fs/cgroup"), Path("/proc/self/cgroup"))
    if group is not None and group < best.bytes:
        best = MemoryLimit(group, f"the {group / gib:.1f} GiB its control group allows")
    space = resource.getrlimit(resource.RLIMIT_AS)[0]
    if space != resource.RLIM_INFINITY and space < best.bytes:
        best = MemoryLimit(space, f"the {space / gib:.1f} GiB address space ulimit -v allows")
    return best


def cgroup_limit(root: Path, cgroups: Path) -> int | None:
    """The memory limit of this process's control group or of any group above it (a limit
    applies to everything below it): cgroup v2's ``memory.max`` (also under ``unified/`` on a
    hybrid mount), v1's ``memory.limit_in_bytes``. None when no group sets one."""
    try:
        lines = cgroups.read_text().splitlines()
    except OSError:
        return None
    limits = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            places = [(root, "memory.max"), (root / "unified", "memory.max")]
        elif "memory" in controllers.split(","):
            places = [(root / "memory", "memory.limit_in_bytes")]
        else:
            continue
        for base, name in places:
            folder = base / path.lstrip("/")
            while True:
                limits.append(_read_limit(folder / name))
                if folder == base or base not in folder.parents:
                    break
                folder = folder.parent
    found = [limit for limit in limits if limit is not None and limit < _UNLIMITED]
    return min(found) if found else None


def _read_limit(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:  # not this hierarchy, or a group a container does not show
        return None
    return int(text) if text.isdigit() else None  # v2 writes "max" for no limit
