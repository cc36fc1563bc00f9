"""An evaluation inside a training loop leaves the training exactly as it was.

:func:`untouched_training` puts every submodule of the model in eval mode for the evaluation and then
gives back, exactly, what an evaluation could change in the process and that a training reads: the
train/eval mode of every submodule (each its own: a frozen BatchNorm inside a training model stays in
eval mode), ``requires_grad`` of every parameter, the buffers (BatchNorm's running statistics: a model
whose forward updates a buffer even in eval mode gets it back), grad mode, the autocast state of the CPU
and CUDA, torch's intra-op thread count (sslbench's stages set it for their products) and the random
states of Python, NumPy's global generator, torch's CPU generator and every initialised CUDA device's
(a ``DataLoader`` draws its base seed from torch's generator even with ``shuffle=False``).

Parameters are not copied: the evaluation runs the model under ``torch.inference_mode``, where no
optimiser step or in-place update of a parameter can happen unless the forward itself writes one.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

#: The devices whose autocast state is kept.
AUTOCAST_DEVICES = ("cpu", "cuda")


def unwrapped(model: Any) -> Any:
    """The module inside a ``DistributedDataParallel`` (or ``DataParallel``) wrapper, else ``model``:
    the evaluation embeds different numbers of batches on each rank, and the wrapper's forward would
    meet the other ranks in collectives (buffer broadcasts) they never reach."""
    import torch

    wrappers = (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)
    return model.module if isinstance(model, wrappers) else model


@dataclass(frozen=True)
class TrainingState:
    """What :func:`untouched_training` gives back (see the module's notes)."""

    modes: tuple[tuple[Any, bool], ...]
    requires_grad: tuple[tuple[Any, bool], ...]
    buffers: tuple[tuple[Any, Any], ...]
    grad_enabled: bool
    autocast: tuple[tuple[str, bool, Any], ...]
    autocast_cache: bool
    threads: int
    python_rng: Any
    numpy_rng: Any
    torch_rng: Any
    cuda_rng: tuple[Any, ...]

    @classmethod
    def capture(cls, model: Any) -> TrainingState:
        import torch

        root = model if isinstance(model, torch.nn.Module) else torch.nn.Module()
        return cls(
            modes=tuple((m, m.training) for m in root.modules()),
            requires_grad=tuple((p, p.requires_grad) for p in root.parameters()),
            buffers=tuple((b, b.detach().clone()) for b in root.buffers()),
            grad_enabled=torch.is_grad_enabled(),
            autocast=tuple((device, *_autocast(device)) for device in AUTOCAST_DEVICES),
            autocast_cache=torch.is_autocast_cache_enabled(),
            threads=torch.get_num_threads(),
            python_rng=random.getstate(),
            numpy_rng=np.random.get_state(),
            torch_rng=torch.get_rng_state(),
            cuda_rng=tuple(torch.cuda.get_rng_state_all()) if torch.cuda.is_initialized() else (),
        )

    def restore(self) -> None:
        import torch

        for module, training in self.modes:
            module.training = training  # each module its own mode (``train()`` would set its children's)
        for parameter, wanted in self.requires_grad:
            if parameter.requires_grad != wanted:
                parameter.requires_grad_(wanted)
        with torch.no_grad():
            for buffer, saved in self.buffers:
                if not torch.equal(buffer, saved):
                    buffer.copy_(saved)
        torch.set_grad_enabled(self.grad_enabled)
        for device, enabled, dtype in self.autocast:
            _set_autocast(device, enabled, dtype)
        torch.set_autocast_cache_enabled(self.autocast_cache)
        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        random.setstate(self.python_rng)
        np.random.set_state(self.numpy_rng)
        torch.set_rng_state(self.torch_rng)
        if self.cuda_rng:
            torch.cuda.set_rng_state_all(list(self.cuda_rng))


def _autocast(device: str) -> tuple[bool, Any]:
    """(enabled, dtype) of ``device``'s autocast (torch < 2.4 names CUDA's ``gpu`` and has no device
    argument)."""
    import torch

    if hasattr(torch, "get_autocast_dtype"):
        return torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)
    if device == "cpu":
        return torch.is_autocast_cpu_enabled(), torch.get_autocast_cpu_dtype()
    return torch.is_autocast_enabled(), torch.get_autocast_gpu_dtype()


def _set_autocast(device: str, enabled: bool, dtype: Any) -> None:
    import torch

    if hasattr(torch, "set_autocast_dtype"):
        torch.set_autocast_enabled(device, enabled)
        torch.set_autocast_dtype(device, dtype)
    elif device == "cpu":
        torch.set_autocast_cpu_enabled(enabled)
        torch.set_autocast_cpu_dtype(dtype)
    else:
        torch.set_autocast_enabled(enabled)
        torch.set_autocast_gpu_dtype(dtype)


@contextmanager
def untouched_training(model: Any) -> Iterator[None]:
    """Inside: every submodule of ``model`` (a ``torch.nn.Module``; any other callable is left alone) in
    eval mode. After, whatever the exit path: the :class:`TrainingState` captured on entry."""
    import torch

    state = TrainingState.capture(model)
    try:
        if isinstance(model, torch.nn.Module):
            model.eval()
        yield
    finally:
        state.restore()
