"""The C allocator's settings for CPU extraction: large freed blocks kept for the next batch.

glibc's ``malloc`` serves every block above its mmap threshold (128 KiB at first, adjusted up to
32 MiB) with a fresh ``mmap`` and unmaps it at ``free``, and gives the top of its heap back to the
system above 128 KiB free. A forward pass allocates and frees the same activation buffers batch after
batch, so every batch page-faults them in again: the kernel's time about equals the forward's own
(``benchmarks/extraction_throughput.py``). Raising the threshold cannot help: the largest glibc
accepts, 32 MiB, is below one activation of a batch of 64 at 224 px (64 × 32 × 112 × 112 float32 is
103 MB). :func:`tune_allocator` therefore sets, through ``mallopt``:

- ``M_MMAP_MAX = 0``: large blocks come from the heap, reused after ``free`` like small ones;
- ``M_TRIM_THRESHOLD = -1``: the heap's free top is never given back at ``free`` (mallopt(3): "disables
  trimming completely"; a threshold of 1 GiB still let the top of a 2 GB heap go after every batch of
  EfficientNet-Lite0 at 64 × 224 px, and the page faults with it);
- ``M_TOP_PAD = 64 MiB``: the heap grows in large steps.

The cost is memory: the heap is not given back while a model extracts, and with large blocks in the
heap rather than in mappings of their own its peak can be higher (measured in benchmarks/README.md);
:func:`trim_allocator` returns its free pages once a model is done. Numbers are unchanged: only where
memory comes from differs.

The CLI applies it at start-up (and so every ``torchrun`` rank, each a CLI process), an extraction's
DataLoader workers apply it in their own process. The Python API leaves the caller's process as it
is: a program that wants it calls :func:`tune_allocator` itself. ``SSLBENCH_MALLOC=system`` turns it
off everywhere. Other C libraries (musl, macOS) are left alone.
"""

from __future__ import annotations

import ctypes
import functools
import os

from sslbench.errors import SSLBenchError

#: The environment variable that chooses the allocator's settings: ``tuned`` (the default) or ``system``.
ENV = "SSLBENCH_MALLOC"
CHOICES = ("tuned", "system")

# mallopt parameters, from glibc's malloc.h.
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4
SETTINGS = ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1), (M_TOP_PAD, 64 << 20))


def allocator_choice() -> str:
    """``tuned`` or ``system``, as ``SSLBENCH_MALLOC`` says (``tuned`` when unset)."""
    choice = os.environ.get(ENV, "tuned").strip().lower() or "tuned"
    if choice not in CHOICES:
        raise SSLBenchError(f"{ENV}={os.environ[ENV]!r}: use one of {', '.join(CHOICES)}")
    return choice


@functools.cache
def glibc_version() -> str | None:
    """The running glibc's version (``"2.36"``), ``None`` under another C library."""
    try:
        version = ctypes.CDLL(None).gnu_get_libc_version
    except (AttributeError, OSError):
        return None
    version.restype = ctypes.c_char_p
    found: bytes = version()
    return found.decode()


_tuned = False


def tune_allocator() -> bool:
    """Keep large freed blocks for reuse in this process (see the module's notes); ``True`` when the
    allocator is tuned now, ``False`` under another C library or with ``SSLBENCH_MALLOC=system``.
    Idempotent; affects allocations made after the call."""
    global _tuned
    if _tuned:
        return True
    if allocator_choice() == "system" or glibc_version() is None:
        return False
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    _tuned = all(mallopt(parameter, value) == 1 for parameter, value in SETTINGS)
    return _tuned


def trim_allocator() -> None:
    """Give the free pages of a tuned allocator's heap back to the system (glibc's ``malloc_trim``);
    nothing when this process is not tuned."""
    if _tuned:
        ctypes.CDLL(None).malloc_trim(0)


def allocator_tuned() -> bool:
    """Whether :func:`tune_allocator` tuned this process."""
    return _tuned
