"""llama.cpp's default thread count is what the container may use, read from fake cgroup trees.

Every test builds its own ``/sys/fs/cgroup`` and ``/proc/self/cgroup`` under ``tmp_path`` and passes
the affinity count in, so nothing depends on the machine the suite runs on.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from parallama_runtime.engine.cpu import available_cpus, cgroup_cpu_quota, cpu_limits


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "sys" / "fs" / "cgroup"


@pytest.fixture
def proc(tmp_path: Path) -> Path:
    return tmp_path / "proc" / "self" / "cgroup"


def test_v2_nested_cgroup_quota(root: Path, proc: Path) -> None:
    """A pod's container cgroup without a cgroup namespace: the path is read from /proc/self/cgroup."""
    path = "kubepods.slice/kubepods-burstable.slice/pod1.slice/cri-containerd-abc.scope"
    _write(proc, f"0::/{path}")
    _write(root / path / "cpu.max", "200000 100000")
    _write(root / "kubepods.slice" / "cpu.max", "max 100000")
    assert cgroup_cpu_quota(root, proc) == 2.0
    assert available_cpus(root, proc, affinity=64) == 2


def test_v2_namespaced_root(root: Path, proc: Path) -> None:
    """With a cgroup namespace the process sees ``0::/`` and its cgroup is the mount's root."""
    _write(proc, "0::/")
    _write(root / "cpu.max", "300000 100000")
    assert available_cpus(root, proc, affinity=16) == 3


def test_v2_max_is_no_limit(root: Path, proc: Path) -> None:
    _write(proc, "0::/app")
    _write(root / "app" / "cpu.max", "max 100000")
    assert cgroup_cpu_quota(root, proc) is None
    assert available_cpus(root, proc, affinity=12) == 12


def test_a_parents_limit_binds_the_child(root: Path, proc: Path) -> None:
    _write(proc, "0::/parent/child")
    _write(root / "parent" / "cpu.max", "100000 100000")
    _write(root / "parent" / "child" / "cpu.max", "400000 100000")
    assert available_cpus(root, proc, affinity=8) == 1


def test_the_path_seen_from_outside_falls_back_to_the_mount_root(root: Path, proc: Path) -> None:
    """Docker without a cgroup namespace: /proc says /docker/<id>, the container's files are at /."""
    _write(proc, "0::/docker/0123abcd")
    _write(root / "cpu.max", "200000 100000")
    assert available_cpus(root, proc, affinity=32) == 2


def test_fractional_quota_rounds_up(root: Path, proc: Path) -> None:
    _write(proc, "0::/")
    _write(root / "cpu.max", "150000 100000")
    assert cgroup_cpu_quota(root, proc) == 1.5
    assert available_cpus(root, proc, affinity=8) == 2


def test_tiny_quota_still_gets_one_thread(root: Path, proc: Path) -> None:
    _write(proc, "0::/")
    _write(root / "cpu.max", "10000 100000")  # limits.cpu: 100m
    assert available_cpus(root, proc, affinity=8) == 1


def test_affinity_below_the_quota_wins(root: Path, proc: Path) -> None:
    _write(proc, "0::/")
    _write(root / "cpu.max", "800000 100000")
    assert available_cpus(root, proc, affinity=3) == 3


def test_v1_cpu_cpuacct(root: Path, proc: Path) -> None:
    _write(
        proc,
        "\n".join(
            [
                "12:memory:/kubepods/pod1/abc",
                "4:cpu,cpuacct:/kubepods/pod1/abc",
                "3:cpuset:/kubepods/pod1/abc",
                "1:name=systemd:/kubepods/pod1/abc",
                "0::/",
            ]
        ),
    )
    cgroup = root / "cpu,cpuacct" / "kubepods" / "pod1" / "abc"
    _write(cgroup / "cpu.cfs_quota_us", "250000")
    _write(cgroup / "cpu.cfs_period_us", "100000")
    assert cgroup_cpu_quota(root, proc) == 2.5
    assert available_cpus(root, proc, affinity=48) == 3


def test_v1_no_quota_and_a_mount_named_cpu(root: Path, proc: Path) -> None:
    _write(proc, "5:cpuacct,cpu:/\n0::/")
    _write(root / "cpu" / "cpu.cfs_quota_us", "-1")
    _write(root / "cpu" / "cpu.cfs_period_us", "100000")
    assert cgroup_cpu_quota(root, proc) is None
    _write(root / "cpu" / "cpu.cfs_quota_us", "50000")
    assert available_cpus(root, proc, affinity=4) == 1


def test_hybrid_v1_cpu_with_an_empty_unified_tree(root: Path, proc: Path) -> None:
    _write(proc, "1:cpu:/\n2:cpuacct:/\n0::/")
    _write(root / "cpu" / "cpu.cfs_quota_us", "200000")
    _write(root / "cpu" / "cpu.cfs_period_us", "100000")
    (root / "unified").mkdir(parents=True)
    assert available_cpus(root, proc, affinity=6) == 2


@pytest.mark.parametrize(
    "content",
    [
        None,  # no /proc/self/cgroup at all (not Linux)
        "0::/",  # no cpu.max file (the host's root cgroup, or the controller is off)
        "garbage without colons",
    ],
)
def test_missing_or_odd_files_mean_no_limit(root: Path, proc: Path, content: str | None) -> None:
    if content is not None:
        _write(proc, content)
    assert cgroup_cpu_quota(root, proc) is None
    assert available_cpus(root, proc, affinity=5) == 5


@pytest.mark.parametrize("cpu_max", ["", "lots 100000", "200000 0", "-5 100000"])
def test_unparsable_cpu_max_means_no_limit(root: Path, proc: Path, cpu_max: str) -> None:
    _write(proc, "0::/")
    _write(root / "cpu.max", cpu_max)
    assert available_cpus(root, proc, affinity=7) == 7


def test_unreadable_file_means_no_limit(root: Path, proc: Path) -> None:
    _write(proc, "0::/")
    (root / "cpu.max").mkdir(parents=True)  # reading a directory fails like a permission error
    assert cgroup_cpu_quota(root, proc) is None


def test_a_path_outside_the_namespace_reads_only_the_root(root: Path, proc: Path) -> None:
    _write(proc, "0::/../sibling")
    _write(root / "sibling" / "cpu.max", "100000 100000")  # not ours: must not be read
    _write(root / "cpu.max", "400000 100000")
    assert available_cpus(root, proc, affinity=16) == 4


def test_the_real_machine_gives_a_sane_count() -> None:
    limits = cpu_limits()
    assert 1 <= limits.usable <= limits.affinity
    assert str(limits.usable) in limits.describe()
