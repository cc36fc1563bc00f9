"""The thread policy of CPU compute: never more threads than the cores this process may use, one
thread for small products, and threads that sleep rather than spin while they wait.

Measured on a 2-core EPYC (``benchmarks/under_load.py``): beside one busy process the worst clustering
stage took 1.64× its idle time with sleeping threads and 2.17× spinning; beside two or three, spinning
made a 2-thread k-means fit 74× slower than without the competitor, where sleeping threads took 1.02×. Sleeping costs up
to 29 % idle. Small products gain nothing from a second thread even on an idle machine: each parallel
region costs a wake-up and a barrier, and under load the barrier waits for a thread the scheduler parked.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from pathlib import Path

#: Floating-point operations below which one product runs on one thread (≈ 0.5 ms at 2 × 100 GFLOP/s).
SMALL_WORK = 1 << 27


def prefer_sleeping_threads() -> None:
    """Ask OpenMP (torch's and MKL's thread pool) to put waiting threads to sleep instead of spinning,
    unless the user chose a policy. Only effective before torch is imported: the CLI calls it first."""
    if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"


@functools.cache
def available_cores() -> int:
    """Cores this process may run on: its CPU affinity, capped by a cgroup CPU quota (containers)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    quota = _cgroup_quota()
    if quota is not None:
        cores = min(cores, max(1, int(quota + 0.5)))
    return max(1, cores)


def _cgroup_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs allowed by the cgroup v2 ``cpu.max`` (or v1 ``cfs_quota_us``) under ``root``, if any."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        try:
            quota = (root / "cpu" / "cpu.cfs_quota_us").read_text().strip()
            period = (root / "cpu" / "cpu.cfs_period_us").read_text().strip()
        except OSError:
            return None
    if quota in ("max", "-1"):
        return None
    try:
        cpus = float(quota) / float(period)
    except (ValueError, ZeroDivisionError):
        return None
    return cpus if cpus > 0 else None


def compute_threads(work: float, configured: int) -> int:
    """Threads for products of ``work`` floating-point operations each, given the ``configured``
    count (the user's or the library's default): one for small products, else the configured count
    capped at the available cores."""
    return 1 if work < SMALL_WORK else max(1, min(configured, available_cores()))


@contextlib.contextmanager
def torch_threads(work: float) -> Iterator[int]:
    """Run torch's CPU compute inside on :func:`compute_threads` threads, restoring the count after."""
    import torch

    before = torch.get_num_threads()
    wanted = compute_threads(work, before)
    if wanted != before:
        torch.set_num_threads(wanted)
    try:
        yield wanted
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)
