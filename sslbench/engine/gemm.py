"""GEMM kernels shared by the engine, and the rounding of the products they rely on."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING

from sslbench.engine.device import torch_module

if TYPE_CHECKING:
    from torch import Tensor


#: Unit roundoffs: bfloat16 keeps 8 significant bits, float32 24.
BF16_UNIT = 2.0**-8
FP32_UNIT = 2.0**-24
#: The smallest normal float32 (and bfloat16): below it a GEMM may flush operands, products and
#: results to zero (AVX512-BF16 does), so error bounds carry absolute terms of this size.
TINY = 2.0**-126


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX), where a bfloat16 GEMM runs at
    twice the float32 rate; elsewhere it is emulated and no faster."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


GRAM_BLOCK = 512


def gram_width(d: int) -> int:
    """Width of the column blocks of a ``d × d`` Gram product: at most four blocks, ``GRAM_BLOCK`` wide
    at least."""
    return -(-d // max(1, min(4, d // GRAM_BLOCK)))


def upper_gram(x: Tensor, out: Tensor) -> None:
    """The upper block triangle of ``xᵀx`` into ``out`` (the rest is left as it was): one GEMM per
    block row of columns, ``(d/b + 1)/(2d/b)`` of a full product's flops (0.625 of it for 4 blocks),
    through torch's BLAS and thread pool — scipy's ``syrk`` halves the flops but runs on its own
    pool, whose threads spin for cores a competing process holds (6.6× slower under load)."""
    d = x.shape[1]
    width = gram_width(d)
    for start in range(0, d, width):
        stop = min(start + width, d)
        torch_module().mm(x[:, start:stop].T, x[:, start:], out=out[start:stop, start:])


def symmetric_gram(rows: Tensor) -> Tensor:
    """``rows @ rows.T``: its upper block triangle by :func:`upper_gram` (0.625 of the flops for four
    blocks), the rest mirrored from it."""
    n = len(rows)
    gram = torch_module().empty((n, n), dtype=rows.dtype, device=rows.device)
    upper_gram(rows.T, gram)
    width = gram_width(n)
    for start in range(0, n, width):
        stop = min(start + width, n)
        gram[stop:, start:stop] = gram[start:stop, stop:].T
    return gram
