"""How many CPUs this process may really use: the thread count llama.cpp should get.

``os.cpu_count()`` is the host's core count. In a Kubernetes pod with ``limits.cpu: 2`` on a 64-core
node it says 64, and llama.cpp with 64 threads under a 2-CPU CFS quota spends most of each period
throttled: every thread of a step must finish before the step does, so one throttled thread stalls
them all. The usable count is the smallest of

* the CPU affinity mask (``os.sched_getaffinity``; cpusets, ``taskset``, static CPU manager pods),
* cgroup v2 ``cpu.max`` (``"200000 100000"`` = 2 CPUs, ``"max 100000"`` = no limit) of the process's
  own cgroup and of every ancestor (a parent's limit binds its children too),
* cgroup v1 ``cpu.cfs_quota_us / cpu.cfs_period_us`` (quota ``-1`` = no limit), likewise.

A quota is rounded up (1.5 CPUs -> 2 threads: the half CPU is still worth a thread, and rounding down
would leave it idle), with a floor of 1. A file that is missing or unreadable means no limit from it:
outside a container, or on a kernel without the controller, the affinity mask decides.

The cgroup paths come from ``/proc/self/cgroup``. With a cgroup namespace (the default on cgroup v2)
the process sees ``0::/`` and its own cgroup is the mount's root; without one it sees the host's path
(``/kubepods/.../<container>``) while the container may still have its own cgroup mounted at the
root. Walking from that path up to the root reads whichever of those exists.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

__all__ = ["CpuLimits", "available_cpus", "cgroup_cpu_quota", "cpu_limits"]

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_SELF_CGROUP = Path("/proc/self/cgroup")


@dataclass(frozen=True)
class CpuLimits:
    """What bounds this process's CPUs; ``usable`` is the thread count to give llama.cpp."""

    affinity: int
    """CPUs in the affinity mask (or ``os.cpu_count()`` where the platform has no mask)."""
    quota: float | None
    """CPUs the cgroup quota allows per period (may be fractional); None: no quota."""

    @property
    def usable(self) -> int:
        if self.quota is None:
            return max(1, self.affinity)
        return max(1, min(self.affinity, math.ceil(self.quota)))

    def describe(self) -> str:
        quota = "no cgroup CPU quota" if self.quota is None else f"cgroup quota {self.quota:g} CPUs"
        return f"{self.usable} (CPU affinity {self.affinity}, {quota})"


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _ancestors(root: Path, cgroup_path: str) -> list[Path]:
    """``root/a/b/c``, ``root/a/b``, ``root/a``, ``root``: the process's cgroup first, then upwards."""
    parts = [p for p in PurePosixPath(cgroup_path).parts if p not in ("/", "", ".")]
    if ".." in parts:  # a cgroup outside this namespace's root: only the root is ours to read
        return [root]
    return [root.joinpath(*parts[:n]) for n in range(len(parts), -1, -1)]


def _v2_quota(directory: Path) -> float | None:
    text = _read(directory / "cpu.max")
    if text is None:
        return None
    fields = text.split()
    if not fields or fields[0] == "max":
        return None
    try:
        quota = int(fields[0])
        period = int(fields[1]) if len(fields) > 1 else 100_000
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def _v1_quota(directory: Path) -> float | None:
    quota_text = _read(directory / "cpu.cfs_quota_us")
    period_text = _read(directory / "cpu.cfs_period_us")
    if quota_text is None or period_text is None:
        return None
    try:
        quota, period = int(quota_text), int(period_text)
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def _smallest(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return min(known) if known else None


def cgroup_cpu_quota(
    cgroup_root: Path = CGROUP_ROOT, proc_self_cgroup: Path = PROC_SELF_CGROUP
) -> float | None:
    """The tightest CPU quota (in CPUs, maybe fractional) of this process's cgroups; None: no quota."""
    table = _read(proc_self_cgroup)
    if table is None:
        return None
    found: list[float | None] = []
    for line in table.splitlines():
        hierarchy, sep, rest = line.partition(":")
        controllers, sep2, path = rest.partition(":")
        if not (sep and sep2):
            continue
        if hierarchy == "0" and controllers == "":
            # cgroup v2 (unified); in hybrid mode the cpu controller is on v1 and cpu.max is absent
            found.extend(_v2_quota(d) for d in _ancestors(cgroup_root, path))
        elif "cpu" in controllers.split(","):
            # cgroup v1: mounted as "cpu,cpuacct" (often with a "cpu" symlink) or as "cpu" alone
            for mount in dict.fromkeys((controllers, "cpu")):
                found.extend(_v1_quota(d) for d in _ancestors(cgroup_root / mount, path))
    return _smallest(found)


def _affinity() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS and Windows have no affinity mask
        return os.cpu_count() or 1


def cpu_limits(
    cgroup_root: Path = CGROUP_ROOT,
    proc_self_cgroup: Path = PROC_SELF_CGROUP,
    affinity: int | None = None,
) -> CpuLimits:
    """The affinity mask and the cgroup quota of this process (``affinity`` overrides the mask)."""
    return CpuLimits(
        affinity=_affinity() if affinity is None else affinity,
        quota=cgroup_cpu_quota(cgroup_root, proc_self_cgroup),
    )


def available_cpus(
    cgroup_root: Path = CGROUP_ROOT,
    proc_self_cgroup: Path = PROC_SELF_CGROUP,
    affinity: int | None = None,
) -> int:
    """The CPUs this process may use (at least 1): the default thread count for llama.cpp."""
    return cpu_limits(cgroup_root, proc_self_cgroup, affinity).usable
