"""Where the engine computes: torch (imported only when used) and the device a user asked for."""

from __future__ import annotations

from types import ModuleType

from sslbench.errors import SSLBenchError


def torch_module() -> ModuleType:
    """torch, imported only when the backend is used."""
    import torch

    return torch


def resolve_device(device: str) -> str:
    torch = torch_module()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SSLBenchError(f"backend 'torch' was asked for device '{device}' but torch sees no CUDA GPU")
    return device
