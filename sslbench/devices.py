"""The one place where a device name is checked and resolved, for ``sslbench run``/``extract`` (a spec's
``device``) and for the Python API (``device=``): the same names, the same availability checks, the
same messages."""

from __future__ import annotations

import re

#: What a device may be called: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
DEVICE_PATTERN = r"^(auto|cpu|cuda(:[0-9]{1,4})?|mps)$"


def is_device_name(device: object) -> bool:
    return isinstance(device, str) and re.match(DEVICE_PATTERN, device) is not None


def missing_device(device: str) -> str | None:
    """Why ``device`` cannot be used here (``"torch sees no CUDA GPU"`` …), or ``None`` when it can
    (``auto`` and ``cpu`` always can; torch is imported only for the others)."""
    if device in ("auto", "cpu"):
        return None
    import torch

    if device == "mps":
        return None if torch.backends.mps.is_available() else "torch has no MPS device here"
    if not torch.cuda.is_available():
        return "torch sees no CUDA GPU"
    count = torch.cuda.device_count()
    index = int(device.partition(":")[2] or 0)
    return None if index < count else f"torch sees {count} CUDA GPU(s), numbered from 0"


def unavailable(device: str, missing: str) -> str:
    """The message for a device that :func:`missing_device` refuses."""
    return f"'{device}' was asked for but {missing}; use auto or cpu"


def resolve_device(device: str) -> str:
    """``auto`` becomes ``cuda`` when a GPU is visible, else ``cpu``; a device that is not here is a
    one-line :class:`~sslbench.errors.SSLBenchError`."""
    import torch

    from sslbench.errors import SSLBenchError

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    missing = missing_device(device)
    if missing is not None:
        raise SSLBenchError(f"device: {unavailable(device, missing)}")
    return device
