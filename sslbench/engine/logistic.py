"""The linear probe: L2-regularised multinomial logistic regression on frozen features, CPU or GPU.

For one ``C`` the solver minimises scikit-learn's ``LogisticRegression(C=C, solver="lbfgs")`` objective,
``C · Σᵢ cross-entropyᵢ + ½‖W‖²`` with the intercept unpenalised: a softmax over all classes, or for two
classes scikit-learn's binary model (one weight vector, the probability of the second class a sigmoid).
The optimiser is L-BFGS (:mod:`sslbench.engine.lbfgs`) with the stopping rules of scikit-learn's solver,
scipy's L-BFGS-B (a relative reduction of ``64·eps``, or every gradient entry at most ``tol``); the objective and its
gradient are computed here, one streamed pass over the rows per evaluation (two GEMMs per chunk,
:class:`~sslbench.arrays.RowReader`), so a memory-mapped ImageNet split is fitted in bounded memory and
the passes run on the GPU when asked. Three things make a fit take fewer and cheaper passes than
scikit-learn's without changing what it converges to: the search runs in coordinates that whiten the
rows (:class:`_Conditioner`), or, once the probabilities have sharpened, each class's own curvature
(:mod:`sslbench.engine.class_blocks`), and keeps 50 correction pairs instead of 10; a fit's iterations take
float32 passes (summed in float64), first plain, then anchored (the products of the step from a point
whose float64 logits and gradient are held, exact to float64 precision near it), and its last ones
float64 passes, on which convergence is judged (:func:`_minimise`); along the C path each fit starts
from the solution path extrapolated in log C (:func:`_predict_start`), and one in blocks carried from
the last C with the correction pairs that fit ended with (:class:`_CarriedBlocks`).

:func:`linear_probe` runs DINOv2's protocol (facebookresearch/dinov2, ``dinov2/eval/log_regression.py``
at commit 05c66df0cfa837710197d4769158c87e36afad2c): ``C = 10^t`` for 45 values of ``t`` evenly spaced in
[−6, 5] (``10 ** torch.linspace(-6, 5, 45)``, float32 values as there), tolerance 1e-12, at most 1,000
iterations; ``C`` chosen by top-1 on a held-out tenth of train (``torch.manual_seed(0)``,
``torch.randperm(n)``, the first ``n // 10`` permuted rows held out), then refitted on all of train and
scored on the eval split (top-1, top-5). DINOv2 fits each ``C`` from scratch with cuML; here the ``C``
values are swept from the smallest up, each fit starting from the previous solutions (a warm start: the
objective and its minimiser do not depend on the start; where a C stops at ``max_iter`` the iterate, and so
its held-out score, does, and the fit is reported as not converged). The sweep streams its own copies of the
fitted and the held-out rows where both fit :data:`SWEEP_COPY_BYTES`; else all of train, the held-out
rows at weight zero in every pass (:func:`_sweep_rows`)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from sslbench.arrays import RowReader
from sslbench.engine.class_blocks import ClassBlocks, class_blocks_bytes
from sslbench.engine.device import resolve_device, torch_module
from sslbench.engine.lbfgs import CurvaturePairs, Evaluation, iterate, relative_reduction
from sslbench.engine.rows import CHUNK_ROWS, DeviceRows
from sslbench.errors import SSLBenchError
from sslbench.interfaces import iter_chunks
from sslbench.threads import torch_threads

if TYPE_CHECKING:
    import torch
    from torch import Tensor


def dinov2_c_values() -> tuple[float, ...]:
    """DINOv2's grid, ``10 ** torch.linspace(-6, 5, 45)``: float32 values computed by torch as there."""
    torch = torch_module()
    return tuple((10 ** torch.linspace(-6, 5, 45)).tolist())


#: scipy's L-BFGS-B (scikit-learn's lbfgs) stops when an iteration lowers the objective by at most
#: this share of it; scikit-learn sets ``ftol = 64 · eps``.
FTOL = 64 * float(np.finfo(np.float64).eps)


#: The float32 phase of a fit stops at this relative reduction, or after this many evaluations of a line
#: search, for anchored (or float64) products to take over: below it float32 rounding of the logits is
#: most of what an iteration would see, and a line search spends its evaluations on rounding noise
#: (50,000 × 768 × 100 rows, four C values: searches of 5 to 20 evaluations were a fifth of the float32
#: passes with 20 allowed; with 6, 9 % less time for the same fits).
FAST_FTOL = 1e-10
FAST_MAXLS = 6
#: An anchored line search that needs more evaluations than this has met the rounding of a step that
#: has grown far from its anchor (the float32 product of the step carries ~1e-7 of it): anchored again
#: where it stands, the next search starts precise. Its first search after an anchor gets the full 50,
#: and only those that fail stop the float32 passes. (10,000 × 128 × 10 rows, the 45-C sweep: a fifth
#: of all passes were such searches, ending at reductions below 1e-9 of the objective.) Others succeed
#: at their first or second evaluation, or read rounding from then on (100,000 × 768 × 100, C = 10 and
#: 17.8: of 110 searches one took 3 evaluations, two failed at 6 on values some 1e-11 of the objective
#: above their start), and a new anchor costs about two passes: the benchmark's whole protocol took
#: 702.0 / 647.9 / 621.2 / 671.1 s allowing 6 / 3 / 2 / 1 (benchmarks/README.md).
ANCHORED_MAXLS = 2
#: Memory the anchor of float32 passes may take (16 bytes per row and class: 100,000 rows × 100 classes
#: take 160 MB; 1.28M × 1,000 do not fit, and their fits go from float32 to float64 passes directly).
ANCHOR_BYTES = 1 << 30
#: Memory the sweep may take, on the CPU, for its own float32 copy of the rows it fits on and of the
#: held-out rows (and the temporaries of converting other dtypes): then its passes skip the held-out
#: rows instead of carrying them at weight zero (a tenth less work per pass with DINOv2's share).
#: 100,000 × 768 float32 rows take 307 MB; an ImageNet split does not fit, and is streamed as it is.
SWEEP_COPY_BYTES = 1 << 30
#: Rows whose weighted softmax curvature ``w·p(1 − p)`` in a class is at most this (1 % of its largest
#: value) enter that class's block as a whole, not one by one (:meth:`_Problem.class_curvature`): at
#: 90,000 × 768 × 100, C = 0.316, a build then sums 302,780 row-class pairs one by one instead of 9M.
CURVATURE_FLOOR = 0.0025
#: A sweep's fits start in per-class blocks (:mod:`sslbench.engine.class_blocks`) from the first fit
#: after one that took at least this many iterations (a refit, where the fit it starts from did): a
#: build costs some 10 passes (2.3 s at 90,000 × 768 × 100: 1.5 s summing the blocks, 0.8 s factoring
#: them), which short fits, near uniform probabilities where the whitening is exact, do not win back.
BLOCKS_AFTER_ITERATIONS = 25
#: A sweep leaves the blocks for its remaining C values once a fit's iterations in them reach
#: ``BLOCKS_LEFT_AFTER`` and exceed ``BLOCKS_GROWTH`` times those of the previous fit in them
#: (short fits vary more from one C to the next: 600 digit images, 24 then 47 at C = 1 and 3.2): a
#: guard for features whose curvature the blocks model worse than the whitening does. (Blocks that
#: left out the rows below :data:`CURVATURE_FLOOR` altogether did so at large C: 100,000 × 768 × 100,
#: 139, 215, 249 iterations at C = 17.8 to 56 against 130, 131, 89 whitened; with those rows entered
#: as a whole, 61, 64, 68.) Only the pace changes: every fit ends at scikit-learn's minimum either way.
BLOCKS_GROWTH = 1.5
BLOCKS_LEFT_AFTER = 100
#: A sweep keeps its blocks from one C to the next (:class:`_CarriedBlocks`) until a fit in them takes
#: more than this many times the iterations of the first fit in them.
BLOCKS_STALE = 1.25
#: The most the sums of the blocks may cost, in passes' products: where more row-class pairs pass the
#: floor (probabilities spread over many classes, as at small C) the whitening serves. At 90,000 × 768
#: × 100, C = 0.316, 302,780 pairs cost 13 passes; at C = 0.0056 nearly all 9M would cost 380.
BLOCK_BUILD_PASSES = 25
#: Memory the blocks may take (12 bytes per class and squared dimension: 710 MB at 100 × 768; 1,000
#: classes × 1,024 dims take 12.6 GB and are built on a GPU only, within a quarter of its free memory).
BLOCK_BYTES = 1 << 30


class LogisticOptions(BaseModel):
    """The linear probe's protocol: DINOv2's by default."""

    model_config = ConfigDict(extra="forbid", strict=True)

    c_values: tuple[float, ...] = Field(
        default_factory=dinov2_c_values, min_length=1, description="inverse regularisation strengths swept"
    )
    held_out_share: float = Field(0.1, gt=0.0, lt=1.0, description="share of train held out to choose C")
    held_out_seed: int = Field(0, ge=0, description="seed of the held-out permutation (torch.randperm)")
    max_iter: int = Field(1000, ge=1, description="L-BFGS iterations at most, per C")
    tol: float = Field(1e-12, ge=0.0, description="stop when every gradient entry (of the mean objective) is below")
    chunk_rows: int = Field(CHUNK_ROWS, ge=1, description="rows per streamed product")
    fast_products: bool = Field(
        True,
        description="float32 products until L-BFGS stalls, then float64 ones to the end (they judge convergence)",
    )
    precondition: bool = Field(
        True,
        description="L-BFGS in coordinates that whiten the rows (same objective and minimiser, fewer iterations)",
    )
    predict_path: bool = Field(
        True,
        description="start each C of the sweep where the last solutions extrapolate to in log C (else at the last one)",
    )
    class_blocks: bool = Field(
        True,
        description=(
            "once probabilities have sharpened, L-BFGS in coordinates that whiten each class's own curvature "
            "(same objective and minimiser; needs precondition)"
        ),
    )
    memory: int = Field(
        50,
        ge=1,
        description=(
            "L-BFGS's stored correction pairs (scikit-learn's L-BFGS-B: 10); each holds two parameter vectors, "
            "16·classes·(dims + 1) bytes"
        ),
    )


@dataclass(frozen=True)
class LogisticFit:
    """One fitted model: ``classes[argmax(x @ coef.T + intercept)]`` predicts (for two classes, as
    scikit-learn's, one row of ``coef``: the second class's logit against a zero first)."""

    classes: np.ndarray
    coef: np.ndarray
    intercept: np.ndarray
    C: float
    #: ``C · Σ cross-entropy + ½‖coef‖²`` at the fit: scikit-learn's objective.
    objective: float
    #: The largest entry of the gradient of the mean objective (``objective / (C·n)``) at the fit.
    gradient_max: float
    iterations: int
    #: Whether L-BFGS stopped on a tolerance (not on ``max_iter`` or a failed line search), and why.
    converged: bool
    stop_reason: str
    #: Whether the fit classifies every training row correctly: then the training set is linearly
    #: separated, no finite minimiser exists without the penalty, and the weights grow with C.
    separable: bool
    #: The fit's iterations in per-class blocks (:mod:`sslbench.engine.class_blocks`).
    class_blocks_iterations: int = 0


@dataclass(frozen=True)
class SweepPoint:
    """One ``C`` of the sweep: top-1 on the held-out rows, and how its fit went."""

    C: float
    held_out_top1: float
    objective: float
    iterations: int
    converged: bool
    separable: bool


@dataclass(frozen=True)
class LinearProbeResult:
    """The protocol's outcome: eval top-1 and top-5 (fractions) of the model refitted at the chosen C."""

    top1: float
    top5: float
    C: float
    sweep: tuple[SweepPoint, ...]
    fit: LogisticFit
    seconds: float
    #: Non-convergence and separation, one line each (nothing is hidden; the probe reports them).
    warnings: tuple[str, ...]


def held_out_rows(n: int, share: float, seed: int) -> np.ndarray:
    """DINOv2's held-out rows: the first ``int(n·share)`` of ``torch.randperm(n)`` after
    ``torch.manual_seed(seed)`` (drawn from a private generator seeded alike: the same permutation)."""
    torch = torch_module()
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return np.sort(order[: int(n * share)].numpy())


@dataclass(frozen=True)
class _Pass:
    """One streamed pass over the rows at one parameter vector."""

    objective: float
    gradient: Tensor | None
    #: The weighted count of rows predicted right, and each row's correctness (1/0, float64).
    right: float
    correct: Tensor
    #: The weighted mean of each row's softmax curvature ``1 − Σ p²`` per class-space unit (1/k at
    #: uniform probabilities): the scale :class:`_Conditioner` gives the data's second moment. 0 unless
    #: asked for.
    curvature: float


@dataclass(frozen=True)
class _Anchor:
    """A point with every row's float64 logits and weighted residuals there and ``Σ residualsᵀ·x``:
    what float32 passes add the products of a step to (:meth:`_Problem.evaluate`)."""

    theta: Tensor
    logits: Tensor
    residuals: Tensor
    gradient: Tensor


@dataclass(frozen=True)
class _Moments:
    """The weighted mean and centred scatter of the rows (float64), eigendecomposed: what whitens them;
    and their scatter about their own classes' means."""

    total: float
    mean: Tensor
    #: Eigenvalues and eigenvectors (columns) of ``Σ wᵢ (xᵢ − μ)(xᵢ − μ)ᵀ``.
    spectrum: Tensor
    basis: Tensor
    #: ``Σ wᵢ (xᵢ − μ_yᵢ)(xᵢ − μ_yᵢ)ᵀ``, each row about its own class's mean: the spread of rows
    #: around where they cluster (:meth:`_Problem.class_curvature`).
    within: Tensor


class _Conditioner:
    """A change of variables under which L-BFGS sees a well-conditioned problem with the same values.

    The objective's Hessian is ``C·Σᵢ wᵢ Sᵢ ⊗ x̄ᵢx̄ᵢᵀ + I ⊗ R`` (``Sᵢ = diag(pᵢ) − pᵢpᵢᵀ``, ``x̄ = (x, 1)``,
    ``R`` the penalty on the weights only). Replacing every ``Sᵢ`` by ``s·(I − 11ᵀ/k)``, ``s`` the rows'
    mean curvature at the start, leaves a matrix that centring the rows (the intercept absorbs the mean)
    and one eigendecomposition of their scatter invert exactly; the solver works in coordinates ``φ`` with
    ``θ = L(φ)``, ``L`` that matrix's inverse square root on the class contrasts (``I − 11ᵀ/k``) and the
    identity on the class mean, which only the penalty sees. Features have a mean far from zero and a
    spectrum spanning decades, where L-BFGS in the weights themselves zig-zags (600 digit images at
    C = 1: 144 iterations, 63 here); the values and the minimiser are scikit-learn's, only the path to
    them changes. The model is exact at zero weights and drifts as probabilities sharpen, so
    :func:`_fit` rebuilds it when the curvature has moved by more than a factor of two. Products with
    ``L`` cost ``2·k·d²``, nothing beside a pass's ``4·n·d·k``."""

    def __init__(self, moments: _Moments, scale: float, width: int, dims: int) -> None:
        torch = torch_module()
        self.moments, self.width, self.dims = moments, width, dims
        curvature = scale * moments.spectrum.clamp_min(0.0)
        self.root = (moments.basis * (curvature + 1.0).rsqrt()) @ moments.basis.T
        self.inverse_root = (moments.basis * (curvature + 1.0).sqrt()) @ moments.basis.T
        self.intercept_root = float(torch.tensor(scale * moments.total).clamp_min(1e-12).rsqrt())

    def _split(self, flat: Tensor) -> tuple[Tensor, Tensor]:
        return flat[: self.width * self.dims].view(self.width, self.dims), flat[self.width * self.dims :]

    def _contrasts(self, matrix: Tensor, transform: Callable[[Tensor], Tensor]) -> Tensor:
        """``transform`` applied to the class contrasts of ``matrix``'s rows, its class mean kept."""
        if self.width == 1:
            return transform(matrix)
        mean = matrix.mean(dim=0, keepdim=True)
        return transform(matrix - mean) + mean

    def weights(self, phi: Tensor) -> Tensor:
        """``θ = L(φ)``: the model's flat parameters."""
        torch = torch_module()
        coords, intercept_coords = self._split(phi)
        coef = self._contrasts(coords, lambda m: m @ self.root)
        centred = self._contrasts(intercept_coords[:, None], lambda m: m * self.intercept_root)[:, 0]
        return torch.cat([coef.flatten(), centred - coef @ self.moments.mean])

    def coordinates(self, theta: Tensor) -> Tensor:
        """``φ = L⁻¹(θ)``."""
        torch = torch_module()
        coef, intercept = self._split(theta)
        centred = (intercept + coef @ self.moments.mean)[:, None]
        coords = self._contrasts(coef, lambda m: m @ self.inverse_root)
        intercept_coords = self._contrasts(centred, lambda m: m / self.intercept_root)[:, 0]
        return torch.cat([coords.flatten(), intercept_coords])

    def gradient(self, gradient: Tensor) -> Tensor:
        """The gradient in ``φ``: ``L``'s adjoint applied to the gradient in ``θ``."""
        torch = torch_module()
        grad_coef, grad_intercept = self._split(gradient)
        held = grad_coef - grad_intercept[:, None] * self.moments.mean[None, :]
        coords = self._contrasts(held, lambda m: m @ self.root)
        intercept_coords = self._contrasts(grad_intercept[:, None], lambda m: m * self.intercept_root)[:, 0]
        return torch.cat([coords.flatten(), intercept_coords])


class _Problem:
    """The objective over the rows of a reader with per-row weights (0 leaves a row out), streamed."""

    def __init__(self, rows: DeviceRows, codes: np.ndarray, n_classes: int, chunk_rows: int, device: str) -> None:
        torch = torch_module()
        self.rows, self.device, self.chunk_rows = rows, device, chunk_rows
        self.n_classes = n_classes
        #: Rows of weight: two classes take scikit-learn's binary model (one logit against a zero).
        self.width = 1 if n_classes == 2 else n_classes
        self.codes = torch.from_numpy(codes).to(device)
        self.dims = rows.dims
        self._scratch: dict[tuple[str, int], Tensor] = {}

    def float64_rows(self, rows: slice) -> Tensor:
        """The rows in float64, in a buffer the next call overwrites (a fresh conversion costs five
        times the copy: the allocator hands back untouched pages every chunk)."""
        x = self.rows.rows(rows)
        return self.scratch("rows", torch_module().float64, len(x), self.dims).copy_(x)

    def scratch(self, name: str, dtype: torch.dtype, rows: int, columns: int) -> Tensor:
        """A ``rows × columns`` buffer of ``dtype`` kept across chunks and passes under ``name``: a chunk's
        logits and residuals (6.5 MB per 8,192 rows and 100 classes in float64) are freshly allocated
        otherwise, and glibc hands blocks that size back as untouched pages, one page fault per 4 KiB."""
        torch = torch_module()
        key = (name, columns)
        buffer = self._scratch.get(key)
        if buffer is None or buffer.dtype != dtype or len(buffer) < rows:
            buffer = torch.empty(
                (max(rows, min(self.chunk_rows, len(self.rows))), columns), dtype=dtype, device=self.device
            )
            self._scratch[key] = buffer
        return buffer[:rows]

    @property
    def chunk_work(self) -> int:
        """Floating-point operations of one chunk's two products (what sizes the thread count: a small
        problem runs on one thread, where a second one only adds a wake-up and a barrier per operation)."""
        return 4 * min(self.chunk_rows, len(self.rows)) * self.dims * self.width

    def moments(self, weights: Tensor) -> _Moments:
        """The weighted mean and centred scatter of the rows, and their scatter about their own classes'
        means, one streamed pass (float64). The sums are
        taken about the first chunk's mean, near the rows' own, so that removing the mean afterwards
        cancels nothing the features' offset would otherwise put in every entry."""
        torch = torch_module()
        total = float(weights.sum())
        shift: Tensor | None = None
        first = torch.zeros(self.dims, dtype=torch.float64, device=self.device)
        second = torch.zeros((self.dims, self.dims), dtype=torch.float64, device=self.device)
        # One buffer for the pass's weighted chunks (a fresh 50 MB block per chunk page-faults in again each
        # time); local, not among the passes' kept buffers: moments are taken once a sweep or fit.
        buffer = torch.empty((min(self.chunk_rows, len(self.rows)), self.dims), dtype=torch.float64, device=self.device)
        class_first = torch.zeros((self.n_classes, self.dims), dtype=torch.float64, device=self.device)
        class_total = torch.zeros(self.n_classes, dtype=torch.float64, device=self.device)
        for rows in iter_chunks(len(self.rows), self.chunk_rows):
            x = self.float64_rows(rows)
            if shift is None:
                shift = x.mean(dim=0)
            shifted = x.sub_(shift)
            weighted = torch.mul(shifted, weights[rows][:, None], out=buffer[: len(shifted)])
            first += weighted.sum(dim=0)
            second.addmm_(weighted.T, shifted)
            class_first.index_add_(0, self.codes[rows], weighted)
            class_total.index_add_(0, self.codes[rows], weights[rows])
        assert shift is not None
        scatter = second - torch.outer(first, first) / total
        spectrum, basis = torch.linalg.eigh(scatter)
        class_means = class_first / class_total.clamp_min(1e-300)[:, None]
        within = second - class_means.T @ class_first
        return _Moments(total, shift + first / total, spectrum, basis, within)

    def _class_curvatures(self, theta: Tensor, weights: Tensor) -> Iterator[tuple[Tensor, Tensor]]:
        """Chunk by chunk (float32 products), the rows and every row's weighted curvature in each class,
        ``wᵢ·pᵢc(1 − pᵢc)`` (for two classes the one logit's ``p(1 − p)``)."""
        torch = torch_module()
        coef, intercept = self.split(theta)
        coef32, intercept32 = coef.float(), intercept.float()
        columns = 2 if self.width == 1 else self.width
        for rows in iter_chunks(len(self.rows), self.chunk_rows):
            x = self.rows.rows(rows).to(torch.float32)
            z = self.logits(x, coef32, intercept32, self.scratch("step", torch.float32, len(x), columns))
            p = torch.softmax(z, dim=1)
            # ``1 − p`` of a row's likeliest class is the sum of the others (``1 − p`` itself cancels
            # to float32 rounding when the row is confident).
            likeliest = p.argmax(dim=1, keepdim=True)
            rest = (1.0 - p).scatter_(1, likeliest, p.scatter(1, likeliest, 0.0).sum(dim=1, keepdim=True))
            curvature = p.mul_(rest)[:, 1:] if self.width == 1 else p.mul_(rest)
            yield x, curvature.mul_(weights[rows].float()[:, None])

    def class_curvature(self, theta: Tensor, weights: Tensor, moments: _Moments, max_pairs: float) -> Tensor | None:
        """Every class's ``Σᵢ wᵢ·pᵢc(1 − pᵢc)·x̄ᵢx̄ᵢᵀ`` at ``theta`` (``x̄ = (x − μ, 1)``, ``μ`` the
        ``moments``' mean), ``(width, d + 1, d + 1)`` float32: the scatter of
        :class:`~sslbench.engine.class_blocks.ClassBlocks`, a preconditioner. Rows whose weighted curvature
        in a class is at most :data:`CURVATURE_FLOOR` are summed there as a whole: their summed curvature
        ``s``, their curvature-weighted mean ``m`` (exact, ``s·m·mᵀ``) and, for their spread about it,
        ``s`` times the rows' spread about their own classes' means (``moments.within``). Few, each, but
        at large C together a fifth of a block's curvature (100,000 × 768 × 100, C = 56: 80 of 368):
        left out, the blocks miss the confident rows' curvature and a fit takes four times the
        iterations. ``None`` where more than ``max_pairs`` row-class pairs pass the floor
        (probabilities still spread over many classes: the build would cost more than it saves); one
        float32 forward pass counts them, a second one sums."""
        torch = torch_module()
        pairs = sum(int((curvature > CURVATURE_FLOOR).sum()) for _, curvature in self._class_curvatures(theta, weights))
        if pairs > max_pairs:
            return None
        size = self.dims + 1
        scatter = torch.zeros((self.width, size, size), dtype=torch.float32, device=self.device)
        #: Each class's ``Σ wᵢ·pᵢc(1 − pᵢc)·x̄ᵢ`` over the rows below the floor (its last entry their ``s``).
        below_first = torch.zeros((self.width, size), dtype=torch.float64, device=self.device)
        centre = moments.mean.float()
        for x, curvature in self._class_curvatures(theta, weights):
            augmented = self.scratch("augmented", torch.float32, len(x), size)
            torch.sub(x, centre, out=augmented[:, : self.dims])
            augmented[:, self.dims] = 1.0
            kept = curvature > CURVATURE_FLOOR
            below_first += (curvature.masked_fill(kept, 0.0).T @ augmented).double()
            for c in range(self.width):
                keep = torch.nonzero(kept[:, c])[:, 0]
                if len(keep):
                    picked = torch.index_select(
                        augmented, 0, keep, out=self.scratch("picked", torch.float32, len(keep), size)
                    ).mul_(curvature[keep, c].sqrt()[:, None])
                    scatter[c].addmm_(picked.T, picked)
        below = below_first[:, self.dims]
        spread = moments.within / moments.total
        for c in range(self.width):
            if float(below[c]) > 0:
                background = torch.outer(below_first[c], below_first[c]).div_(below[c])
                background[: self.dims, : self.dims] += below[c] * spread
                scatter[c] += background.float()
        return scatter

    def blocks_within_budget(self) -> bool:
        """Whether :class:`~sslbench.engine.class_blocks.ClassBlocks` fits :data:`BLOCK_BYTES` (on a GPU, a
        quarter of its free memory)."""
        budget = BLOCK_BYTES
        if self.device.startswith("cuda"):
            torch = torch_module()
            budget = torch.cuda.mem_get_info(torch.device(self.device))[0] // 4
        return class_blocks_bytes(self.width, self.dims) <= budget

    def penalty(self, theta: Tensor) -> float:
        """``½‖W‖²`` (the intercept is not penalised)."""
        coef, _ = self.split(theta)
        return 0.5 * float(coef.square().sum())

    def split(self, theta: Tensor) -> tuple[Tensor, Tensor]:
        """(weights ``(width, d)``, intercepts ``(width,)``) of the flat parameter vector."""
        coef = theta[: self.width * self.dims].view(self.width, self.dims)
        return coef, theta[self.width * self.dims :]

    def logits(self, x: Tensor, coef: Tensor, intercept: Tensor, out: Tensor | None = None) -> Tensor:
        """Every class's logit of rows ``x`` in their dtype (a zero first column for the binary model),
        into ``out`` where given."""
        torch = torch_module()
        if self.width == 1:
            z = torch.nn.functional.pad(torch.addmm(intercept, x, coef.T), (1, 0))
            return z if out is None else out.copy_(z)
        return torch.addmm(intercept, x, coef.T) if out is None else torch.addmm(intercept, x, coef.T, out=out)

    def evaluate(
        self,
        theta: Tensor,
        weights: Tensor,
        C: float,
        with_gradient: bool = True,
        exact: bool = True,
        *,
        anchor: _Anchor | None = None,
        record: _Anchor | None = None,
        with_curvature: bool = False,
    ) -> _Pass:
        """``C·Σ wᵢ·CEᵢ + ½‖W‖²``, its gradient (``None`` without), the weighted count of rows
        predicted right, every row's correctness (1/0, float64) and (with the gradient) the weighted
        mean curvature of the softmax (:class:`_Pass`; ``with_curvature``, else 0).

        ``exact`` computes in float64; without it the two products and the softmax run in float32 on
        the float32 rows (about three times the rate on a CPU), and only each row's cross-entropy and
        each chunk's gradient are summed in float64: value and gradient are then off by float32
        rounding (about 1e-7 of each logit), which steers an optimiser as well as exact ones until its
        steps get that small (see :func:`_minimise`). With an ``anchor`` (and not ``exact``) the float32
        products are those of the step from the anchor, added in float64 to its logits and gradient:
        the rounding is that of the step, and values stay exact to a few units in the last place of
        float64 while the step is small. An exact pass with ``record`` (same weights) fills it at the
        pass's ``theta``."""
        torch = torch_module()
        coef, intercept = self.split(theta)
        anchored = anchor is not None and not exact
        if record is not None:
            record.theta.copy_(theta)
        if anchored:
            assert anchor is not None
            coef_p, intercept_p = self.split((theta - anchor.theta).float())
        else:
            dtype = torch.float64 if exact else torch.float32
            coef_p, intercept_p = coef.to(dtype), intercept.to(dtype)
        grad_coef = torch.zeros_like(coef)
        grad_intercept = torch.zeros_like(intercept)
        loss = torch.zeros((), dtype=torch.float64, device=self.device)
        curvature = torch.zeros((), dtype=torch.float64, device=self.device)
        correct = torch.empty(len(self.rows), dtype=torch.float64, device=self.device)
        columns = 2 if self.width == 1 else self.width
        for rows in iter_chunks(len(self.rows), self.chunk_rows):
            w = weights[rows]
            codes = self.codes[rows][:, None]
            m = len(w)
            if exact:
                x = self.float64_rows(rows)
                z = self.logits(x, coef_p, intercept_p, self.scratch("z", torch.float64, m, columns))
                if record is not None:
                    record.logits[rows] = z
            else:
                x = self.rows.rows(rows).to(torch.float32)
                z = self.logits(x, coef_p, intercept_p, self.scratch("step", torch.float32, m, columns))
                if anchored:
                    assert anchor is not None
                    # Every dtype conversion goes through a reused buffer: torch converts the operands of a
                    # mixed-dtype operation into a fresh block, which page-faults like any other.
                    z = self.scratch("z", torch.float64, m, columns).copy_(z).add_(anchor.logits[rows])
            best, predicted = z.max(dim=1)
            picked = z.gather(1, codes)[:, 0]
            correct[rows] = predicted == codes[:, 0]
            # One exponential pass serves the log-normaliser and the probabilities (shifted by the
            # row's largest logit: no overflow).
            shifted = z.sub_(best[:, None]).exp_()
            total = shifted.sum(dim=1)
            loss += torch.dot(w, (best - picked).double() + total.double().log())
            if with_gradient:
                residual = shifted.div_(total[:, None])
                if with_curvature:  # 1 − Σ p²: the trace of the row's softmax Hessian diag(p) − ppᵀ
                    curvature += torch.dot(w, 1.0 - residual.square().sum(dim=1, dtype=torch.float64))
                residual.scatter_add_(1, codes, torch.full_like(picked, -1.0)[:, None])
                residual.mul_(w.to(residual.dtype)[:, None])
                if self.width == 1:
                    residual = residual[:, 1:]
                if residual.dtype == torch.float64:
                    grad_intercept += residual.sum(dim=0)
                else:
                    wide = self.scratch("wide", torch.float64, m, self.width)
                    grad_intercept += wide.copy_(residual).sum(dim=0)
                if anchored:
                    assert anchor is not None
                    step = residual.sub_(anchor.residuals[rows])
                    step = self.scratch("delta", torch.float32, m, self.width).copy_(step)
                    grad_coef.add_(step.T @ x)
                else:
                    grad_coef.add_(residual.T @ x)
                    if record is not None:
                        record.residuals[rows] = residual
        if anchored:
            assert anchor is not None
            grad_coef += anchor.gradient
        elif record is not None:
            record.gradient.copy_(grad_coef)
        objective = C * float(loss) + 0.5 * float(torch.dot(coef.flatten(), coef.flatten()))
        gradient = None
        if with_gradient:
            gradient = torch.cat([(C * grad_coef + coef).flatten(), C * grad_intercept])
        # Per unit of the class-space factor the preconditioner assumes: (k − 1) for the softmax, whose
        # Hessian at uniform probabilities is (I − 11ᵀ/k)/k; 2 for the binary model's p(1 − p).
        mean_curvature = float(curvature) / (float(weights.sum()) * (2 if self.width == 1 else self.n_classes - 1))
        return _Pass(objective, gradient, float(torch.dot(correct, weights)), correct, mean_curvature)

    def anchor_at(self, theta: Tensor) -> _Anchor | None:
        """An empty :class:`_Anchor` (shaped for parameters like ``theta``) for an exact pass to fill at
        its own point, or ``None`` where its logits and residuals (16 bytes per row and class) exceed
        :data:`ANCHOR_BYTES` (on a GPU, a quarter of its free memory)."""
        torch = torch_module()
        columns = 2 if self.width == 1 else self.width
        size = len(self.rows) * (columns + self.width) * 8
        budget = ANCHOR_BYTES
        if self.device.startswith("cuda"):
            budget = torch.cuda.mem_get_info(torch.device(self.device))[0] // 4
        if size > budget:
            return None
        n, options = len(self.rows), {"dtype": torch.float64, "device": self.device}
        return _Anchor(
            torch.empty_like(theta),
            torch.empty((n, columns), **options),
            torch.empty((n, self.width), **options),
            torch.empty((self.width, self.dims), **options),
        )


def _minimise(
    problem: _Problem,
    weights: Tensor,
    C: float,
    theta: Tensor,
    max_iter: int,
    tol: float,
    fast_products: bool,
    conditioner: _Conditioner | ClassBlocks | None,
    pairs: CurvaturePairs,
) -> tuple[int, bool, str, _Pass | None]:
    """L-BFGS (:mod:`sslbench.engine.lbfgs`) with scikit-learn's stopping rules (a relative reduction
    of at most ``64·eps``, or every gradient entry at most ``tol``) on scikit-learn's mean objective
    ``objective / (C·n)`` from ``theta`` (updated in place) and the correction ``pairs`` (updated in
    place: empty, or a previous fit's in the same coordinates), each evaluation one streamed pass on the
    device; returns (iterations, whether it stopped on a tolerance, the reason, the float64 pass at the
    final ``theta`` with the rows' curvature where the last float64 pass was there, else ``None``).

    With a ``conditioner`` the search runs in its coordinates (same objective values; the gradient test
    stays on the model's own gradient, as scikit-learn's). With ``fast_products`` the descent starts on
    float32 products (:meth:`_Problem.evaluate`); where it stalls (a relative reduction below
    :data:`FAST_FTOL`, or a line search lost in float32 rounding) one float64 pass anchors it there and
    float32 passes go on with the products of the step only (re-anchored wherever such a phase stalls
    after moving, or its line search needs more than :data:`ANCHORED_MAXLS` evaluations), while the
    anchor fits :data:`ANCHOR_BYTES`; then float64 passes, which hand back to anchored ones where they
    keep making progress, keeping the curvature pairs throughout. The stopping rules are always judged
    on float64 passes, so the minimiser is scikit-learn's; the float64 passes usually only confirm it
    (on 10,000 × 128 Gaussian rows, 10 classes, the 45-C sweep and refit: 411 float64 passes, 227 of
    them filling the anchor, beside 7,256 float32 ones). No float64 pass is repeated at one point: a
    float64 phase past its first step fills the anchor as it goes (16 bytes per row and class written
    beside each pass; where the phase keeps making progress it is anchored at its last accepted pass),
    a phase handed over at its anchor starts from the anchor's pass, and the float64 pass at the point
    a search ends on is returned for the fit to report."""
    scale = 1.0 / (C * float(weights.sum()))
    exact = not fast_products
    anchor: _Anchor | None = None
    #: The largest entry of the model's own (mean objective's) gradient at the last evaluation.
    largest_entry = math.inf
    #: The last evaluation's float64 pass with its parameters (``None`` after a float32 pass), and the
    #: float64 pass at the current point where there is one: a fit that ends there needs no pass to
    #: report it, and a phase that hands over there needs none to start from.
    latest: tuple[Tensor, _Pass] | None = None
    here: tuple[Tensor, _Pass] | None = None
    #: The memory of this search's anchors, allocated once (each anchor overwrites the last).
    buffer: _Anchor | None = None
    iterations, phase_start = 0, 0
    #: Whether float32 passes may be anchored (the anchor fits its budget).
    anchoring = fast_products

    def anchor_memory() -> _Anchor | None:
        nonlocal buffer
        if buffer is None:
            buffer = problem.anchor_at(theta)
        return buffer

    def evaluate(point: Tensor, record: _Anchor | None = None) -> Evaluation:
        nonlocal largest_entry, latest
        if record is None and exact and anchoring and iterations - phase_start >= 1:
            # A float64 phase past its first step: its next accepted point is where it would be
            # anchored again if it keeps making progress, so the pass fills the anchor as it goes.
            record = anchor_memory()
        theta.copy_(conditioner.weights(point) if conditioner else point)
        precise = exact or record is not None
        evaluated = problem.evaluate(
            theta, weights, C, exact=precise, anchor=anchor, record=record, with_curvature=precise
        )
        latest = (theta.clone(), evaluated) if precise else None
        assert evaluated.gradient is not None
        largest_entry = float(evaluated.gradient.abs().max()) * scale
        gradient = conditioner.gradient(evaluated.gradient) if conditioner else evaluated.gradient
        return Evaluation(evaluated.objective * scale, gradient * scale)

    point = conditioner.coordinates(theta) if conditioner else theta.clone()
    at = evaluate(point)
    here = latest
    converged, reason = False, ""
    while True:
        if exact and largest_entry <= tol:
            converged, reason = True, "every gradient entry at most tol"
            break
        if iterations >= max_iter:
            reason = f"max_iter ({max_iter}) reached"
            break
        precise = exact or anchor is not None
        fresh = anchor is not None and iterations == phase_start
        max_steps = 50 if exact or fresh else ANCHORED_MAXLS if anchor is not None else FAST_MAXLS
        step = iterate(evaluate, point, at, pairs, max_steps)
        if step.point is not None and step.evaluation is not None:
            iterations += 1
            reduction = relative_reduction(at.value, step.evaluation.value)
            point, at, here = step.point, step.evaluation, latest
            if reduction > (FTOL if precise else FAST_FTOL):
                if exact and anchoring and iterations - phase_start >= 2:
                    # float64 passes still making progress: the float32 phase stopped short of the
                    # minimum (on a poor direction, not at it); anchored here, float32 passes go on.
                    anchor = anchor_memory()
                    anchoring = anchor is not None
                    if anchor is not None:
                        if not bool(torch_module().equal(anchor.theta, theta)):
                            at = evaluate(point, anchor)  # (the accepted pass normally filled it)
                            here = latest
                        exact, phase_start = False, iterations
                continue
            converged, reason = True, "relative reduction of the objective at most ftol"
        else:
            converged, reason = False, "the line search found no decrease"
        if exact:
            break
        # A float32 phase stalled. Anchored here (one float64 pass), float32 passes see the step from
        # here only. An anchored phase is anchored again where it stopped if its line search gave up
        # after it had moved, or if it moved more than two steps before its reduction fell below
        # ftol; one that stalls at its anchor hands over to float64 passes.
        steps = iterations - phase_start
        moved = anchor is None or (steps > 2 if converged else steps > 0)
        anchor = None  # its memory is the next one's: one anchor at a time
        record = anchor_memory() if moved else None
        if record is not None:
            at = evaluate(point, record)
            anchor, phase_start, here = record, iterations, latest
            continue
        anchoring = anchoring and not moved  # a moved phase found no room for an anchor
        exact, phase_start = True, iterations
        if here is not None:  # a phase whose first search failed: ``at`` is still its anchor's pass
            assert here[1].gradient is not None
            largest_entry = float(here[1].gradient.abs().max()) * scale
        else:
            at = evaluate(point)
            here = latest
    theta.copy_(conditioner.weights(point) if conditioner else point)
    final = here[1] if here is not None and bool(torch_module().equal(here[0], theta)) else None
    return iterations, converged, reason, final


class _Features:
    """Train rows on the device with their class codes."""

    def __init__(self, features: np.ndarray, labels: np.ndarray, device: str, what: str) -> None:
        if features.ndim != 2:
            raise SSLBenchError(f"linear probe: {what} features must be a 2-D array, got shape {features.shape}")
        labels = np.asarray(labels)
        if labels.ndim != 1 or len(labels) != len(features):
            raise SSLBenchError(
                f"linear probe: {what} has {len(features)} feature rows but labels of shape {labels.shape}"
            )
        if not np.issubdtype(labels.dtype, np.integer):
            raise SSLBenchError(f"linear probe: {what} labels must be integers, got {labels.dtype}")
        self.reader = RowReader(features)
        self.rows = DeviceRows(self.reader, device)
        self.labels = labels.astype(np.int64)


class _SweepRows(NamedTuple):
    """The rows the sweep fits on, their weights, and how a solution scores the held-out rows."""

    problem: _Problem
    weights: Tensor
    #: Held-out top-1 of the parameters at which the closing pass (on ``problem``) was made.
    held_out_top1: Callable[[Tensor, _Pass], float]


def _sweep_rows(
    data: _Features,
    codes: np.ndarray,
    n_classes: int,
    in_sweep: np.ndarray,
    known: np.ndarray,
    opts: LogisticOptions,
    device: str,
) -> _SweepRows:
    """The sweep's rows: a copy of the fitted rows and one of the held-out rows where both fit
    :data:`SWEEP_COPY_BYTES` (read once, streamed from there; the held-out rows scored by one float64
    forward pass per C), else every train row, the held-out ones at weight zero, scored by each fit's
    closing pass for free. Rows already resident on a GPU are not copied (a second resident set would
    take the card's memory for a tenth of the work). ``codes`` are every train row's class codes,
    ``in_sweep`` whether a row is fitted (else held out), ``known`` whether a held-out row's class is
    among the fitted rows' (others count as wrong)."""
    torch = torch_module()
    fitted, held = np.flatnonzero(in_sweep), np.flatnonzero(~in_sweep)
    known_weights = torch.from_numpy(known.astype(np.float64)).to(device)
    dtype = data.reader.array.dtype
    copy_bytes = len(codes) * data.rows.dims * (4 + (0 if dtype == np.float32 else dtype.itemsize))
    if data.rows.resident is not None or copy_bytes > SWEEP_COPY_BYTES:
        held_index = torch.from_numpy(held).to(device)
        return _SweepRows(
            _Problem(data.rows, codes, n_classes, opts.chunk_rows, device),
            torch.from_numpy(in_sweep.astype(np.float64)).to(device),
            lambda theta, final: float(torch.dot(final.correct[held_index], known_weights)) / len(held),
        )
    copies = [RowReader(data.reader.gather(rows)) for rows in (fitted, held)]
    problem = _Problem(DeviceRows(copies[0], device), codes[fitted], n_classes, opts.chunk_rows, device)
    held_problem = _Problem(DeviceRows(copies[1], device), codes[held], n_classes, opts.chunk_rows, device)
    held_rows = torch.ones(len(held), dtype=torch.float64, device=device)

    def held_out_top1(theta: Tensor, final: _Pass) -> float:
        scored = held_problem.evaluate(theta, held_rows, 1.0, with_gradient=False)
        return float(torch.dot(scored.correct, known_weights)) / len(held)

    return _SweepRows(problem, torch.ones(len(fitted), dtype=torch.float64, device=device), held_out_top1)


def _check_finite(problem: _Problem, what: str) -> None:
    torch = torch_module()
    for rows in iter_chunks(len(problem.rows), problem.chunk_rows):
        if not bool(torch.isfinite(problem.rows.rows(rows)).all()):
            raise SSLBenchError(f"linear probe: {what} features contain NaN or inf (rows from {rows.start})")


@dataclass(frozen=True)
class _Settings:
    """How every fit of a probe runs (from :class:`LogisticOptions`)."""

    max_iter: int
    tol: float
    fast_products: bool
    precondition: bool
    memory: int
    class_blocks: bool


def _conditioner(
    problem: _Problem, weights: Tensor, C: float, theta: Tensor, moments: _Moments, curvature: float, blocks: bool
) -> _Conditioner | ClassBlocks:
    """The per-class blocks at ``theta`` where asked and they fit in memory, else the whitening at the
    rows' mean ``curvature``."""
    if blocks and problem.blocks_within_budget():
        # A pass's products cost 4·n·d·k; a row-class pair's share of a block 2·(d + 1)².
        max_pairs = (
            BLOCK_BUILD_PASSES * 4 * len(problem.rows) * problem.dims * problem.width / (2 * (problem.dims + 1) ** 2)
        )
        scatter = problem.class_curvature(theta, weights, moments, max_pairs)
        if scatter is not None:
            try:
                return ClassBlocks(scatter, C, moments.mean)
            except ValueError:  # a block lost to float32 rounding: the whitening serves
                pass
    return _Conditioner(moments, C * curvature, problem.width, problem.dims)


@dataclass
class _CarriedBlocks:
    """Per-class blocks a sweep carries from one C to the next (a build costs some 10 passes; the
    blocks of the last C serve the next as well as fresh ones: 100,000 × 768 × 100, C = 31.6 and 56.2
    in those built at 17.8, 60 and 55 iterations, in their own 64 and 68), with the iterations of the
    first fit in them, against which later fits tell when they have gone stale, and L-BFGS's correction
    pairs in their coordinates as the last fit left them. The pairs model the Hessian of the mean
    objective ``objective / (C·n)``, ``A/n + P/(C·n)`` (``A`` the data's curvature, ``P`` the penalty's):
    from one C to the next only the penalty's share moves, and it is the smaller one where the blocks
    serve, so the next fit starts with a model of its curvature instead of a steepest-descent step
    (C = 17.8, 31.6, 56.2 from 10: 36, 30, 27 iterations instead of 54, 52, 55; correcting the
    pairs for the penalty's change, 34, 32, 29, and two maps per pair)."""

    blocks: ClassBlocks | None = None
    first_fit: int = 0
    pairs: CurvaturePairs | None = None

    def drop(self) -> None:
        """Forget the blocks and the pairs in their coordinates: the next fit in blocks builds them."""
        self.blocks, self.pairs, self.first_fit = None, None, 0


def _fit(
    problem: _Problem,
    weights: Tensor,
    classes: np.ndarray,
    C: float,
    theta: Tensor,
    settings: _Settings,
    moments: _Moments | None,
    curvature: float,
    blocks_first: bool = False,
    carried: _CarriedBlocks | None = None,
) -> tuple[LogisticFit, _Pass]:
    """Minimise at ``C`` from ``theta`` (in place), preconditioned by ``moments`` and the rows' mean
    ``curvature`` at ``theta`` when given, or (``blocks_first``, and with ``settings.class_blocks``) by
    the per-class blocks at ``theta`` (those ``carried`` over from an earlier C where there are some,
    and with them the correction pairs the last fit in them ended with; blocks built here are left in
    it, and this fit's pairs beside them); a rebuild where the curvature drifted takes fresh blocks
    whenever ``settings.class_blocks``, and fresh pairs. The fit, and the pass at it."""
    if not (C > 0 and math.isfinite(C)):
        raise SSLBenchError(f"linear probe: C must be a positive number, got {C}")
    iterations = blocks_iterations = 0
    blocks = blocks_first and settings.class_blocks
    conditioner: _Conditioner | ClassBlocks | None = None
    pairs: CurvaturePairs | None = None
    while True:
        del conditioner, pairs  # a rebuild's blocks and pairs are not held beside the last ones
        if blocks and carried is not None and carried.blocks is not None and iterations == 0:
            conditioner = carried.blocks
            pairs = carried.pairs if carried.pairs is not None else CurvaturePairs(settings.memory)
        else:
            if carried is not None and blocks:
                carried.drop()
            conditioner = _conditioner(problem, weights, C, theta, moments, curvature, blocks) if moments else None
            pairs = CurvaturePairs(settings.memory)
            if carried is not None and isinstance(conditioner, ClassBlocks):
                carried.blocks = conditioner
        if carried is not None and carried.blocks is not None and conditioner is carried.blocks:
            carried.pairs = pairs  # (updated in place by the fit: the next C starts from its last pairs)
        done, converged, reason, final_pass = _minimise(
            problem,
            weights,
            C,
            theta,
            settings.max_iter - iterations,
            settings.tol,
            settings.fast_products,
            conditioner,
            pairs,
        )
        iterations += done
        if isinstance(conditioner, ClassBlocks):
            blocks_iterations += done
        final = final_pass or problem.evaluate(theta, weights, C, with_curvature=True)
        # A preconditioner built on a curvature the fit has since left (probabilities sharpen as the
        # weights grow) can stall L-BFGS far from the minimum: rebuilt at the curvature reached (in
        # per-class blocks, which model sharpened probabilities), the search goes on; it ends where the
        # two agree.
        drifted = moments is not None and not (0.5 <= final.curvature / max(curvature, 1e-300) <= 2.0)
        if not (drifted and converged) or iterations >= settings.max_iter:
            break
        curvature = final.curvature
        blocks = settings.class_blocks
    assert final.gradient is not None
    n = float(weights.sum())
    coef, intercept = problem.split(theta)
    fit = LogisticFit(
        classes=classes,
        coef=coef.cpu().numpy().copy(),
        intercept=intercept.cpu().numpy().copy(),
        C=C,
        objective=final.objective,
        gradient_max=float(final.gradient.abs().max()) / (C * n),
        iterations=iterations,
        converged=converged,
        stop_reason=reason,
        separable=final.right == n,
        class_blocks_iterations=blocks_iterations,
    )
    return fit, final


class _Solved(NamedTuple):
    """A solution of the sweep: its C, parameters and (unscaled, weighted) cross-entropy sum."""

    C: float
    theta: Tensor
    loss: float


def _predict_start(problem: _Problem, weights: Tensor, C: float, theta: Tensor, path: list[_Solved]) -> None:
    """Move ``theta`` (the last solution) to the best of the solution path's polynomial extrapolations in
    log C through the last 2, 3 and 4 solutions, where the objective at ``C`` is lower than at the last
    solution (one float32 forward pass each: a choice of start needs no more). The path is smooth in
    log C, and from moderate C on it runs off at a steady pace (the weights grow as the rows separate)
    that a plain warm start makes L-BFGS walk again at every C (600 digit images, 9 C values from 0.01
    to 100: fewer iterations in all, test_logistic.py; the sweeps in benchmarks/README.md)."""
    last = path[-1]
    best, best_value = last.theta, C * last.loss + problem.penalty(last.theta)
    at = math.log(C)
    for order in (2, 3, 4):
        if len(path) < order:
            continue
        points = path[-order:]
        logs = [math.log(point.C) for point in points]
        guess = torch_module().zeros_like(last.theta)
        for i, point in enumerate(points):
            weight = math.prod((at - logs[j]) / (logs[i] - logs[j]) for j in range(order) if j != i)
            guess += weight * point.theta
        value = problem.evaluate(guess, weights, C, with_gradient=False, exact=False).objective
        if value < best_value:
            best, best_value = guess, value
    theta.copy_(best)


def _uniform_curvature(problem: _Problem) -> float:
    """:attr:`_Pass.curvature` at zero weights (every probability ``1/k``)."""
    return 0.25 if problem.width == 1 else 1.0 / problem.n_classes


def _codes(labels: np.ndarray, classes: np.ndarray) -> np.ndarray:
    return np.searchsorted(classes, labels)


def fit_logistic(
    features: np.ndarray,
    labels: np.ndarray,
    C: float,
    *,
    max_iter: int = 1000,
    tol: float = 1e-12,
    device: str = "cpu",
    chunk_rows: int = CHUNK_ROWS,
    fast_products: bool = True,
    precondition: bool = True,
    memory: int = 50,
    class_blocks: bool = True,
) -> LogisticFit:
    """scikit-learn's ``LogisticRegression(C=C, solver="lbfgs", tol=tol, max_iter=max_iter)`` on
    ``features`` (an array or a memory-mapped file, streamed) and integer ``labels``, from zero weights
    (``fast_products``: :func:`_minimise`; ``precondition``: :class:`_Conditioner`, and with ``class_blocks``
    the per-class blocks where the fit's probabilities have sharpened, :func:`_fit`)."""
    torch = torch_module()
    device = resolve_device(device)
    data = _Features(features, labels, device, "train")
    classes = np.unique(data.labels)
    if len(classes) < 2:
        raise SSLBenchError(f"linear probe: train needs at least 2 classes, got {len(classes)}")
    problem = _Problem(data.rows, _codes(data.labels, classes), len(classes), chunk_rows, device)
    _check_finite(problem, "train")
    theta = torch.zeros(problem.width * (problem.dims + 1), dtype=torch.float64, device=device)
    weights = torch.ones(len(data.labels), dtype=torch.float64, device=device)
    settings = _Settings(max_iter, tol, fast_products, precondition, memory, class_blocks)
    with torch_threads(problem.chunk_work):
        moments = problem.moments(weights) if precondition else None
        fit, _ = _fit(problem, weights, classes, C, theta, settings, moments, _uniform_curvature(problem))
    data.reader.release()
    return fit


def _class_logits(
    fit: LogisticFit, features: np.ndarray, device: str, chunk_rows: int
) -> Iterator[tuple[slice, Tensor]]:
    """Every class's logits of ``fit``, chunk by chunk of ``features`` (streamed), float64."""
    torch = torch_module()
    reader = RowReader(features)
    rows = DeviceRows(reader, device)
    coef = torch.from_numpy(fit.coef).to(device)
    intercept = torch.from_numpy(fit.intercept).to(device)
    for chunk in iter_chunks(len(reader), chunk_rows):
        z = torch.addmm(intercept, rows.rows(chunk).double(), coef.T)
        yield chunk, torch.nn.functional.pad(z, (1, 0)) if len(fit.classes) == 2 else z
    reader.release()


def predict_proba(
    fit: LogisticFit, features: np.ndarray, *, device: str = "cpu", chunk_rows: int = CHUNK_ROWS
) -> np.ndarray:
    """Class probabilities of every row (columns in the order of ``fit.classes``), float64."""
    torch = torch_module()
    out = np.empty((len(features), len(fit.classes)), dtype=np.float64)
    for chunk, z in _class_logits(fit, features, resolve_device(device), chunk_rows):
        out[chunk] = torch.softmax(z, dim=1).cpu().numpy()
    return out


def _top_k(
    fit: LogisticFit, features: np.ndarray, labels: np.ndarray, device: str, chunk_rows: int
) -> tuple[float, float]:
    """Top-1 and top-5 (fractions) of ``fit`` on labelled rows; labels outside its classes count as wrong."""
    torch = torch_module()
    classes = torch.from_numpy(fit.classes).to(device)
    truth = torch.from_numpy(np.array(labels, dtype=np.int64)).to(device)
    top1 = top5 = 0
    for chunk, z in _class_logits(fit, features, device, chunk_rows):
        ranked = classes[z.topk(min(5, z.shape[1]), dim=1).indices]
        hits = ranked == truth[chunk][:, None]
        top1 += int(hits[:, 0].sum())
        top5 += int(hits.any(dim=1).sum())
    return top1 / len(labels), top5 / len(labels)


def linear_probe(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    eval_features: np.ndarray,
    eval_labels: np.ndarray,
    options: LogisticOptions | None = None,
    *,
    device: str = "cpu",
    on_fit: Callable[[SweepPoint], None] | None = None,
) -> LinearProbeResult:
    """DINOv2's linear probe (see the module): sweep ``options.c_values`` on the rows left after the
    held-out share, choose C by held-out top-1 (the smallest C among ties), refit on all of train at it,
    and score the eval split. ``on_fit`` is called after each C of the sweep."""
    torch = torch_module()
    started = time.perf_counter()
    opts = options or LogisticOptions()
    device = resolve_device(device)
    data = _Features(train_features, train_labels, device, "train")
    eval_labels = np.asarray(eval_labels)
    if eval_features.ndim != 2 or eval_features.shape[1] != data.rows.dims or len(eval_labels) != len(eval_features):
        raise SSLBenchError(
            f"linear probe: eval features {eval_features.shape} and labels {eval_labels.shape} do not match "
            f"train's {data.rows.dims} dimensions"
        )
    n = len(data.labels)
    held = held_out_rows(n, opts.held_out_share, opts.held_out_seed)
    if len(held) == 0 or len(held) == n:
        raise SSLBenchError(f"linear probe: held_out_share {opts.held_out_share} of {n} rows leaves no rows on a side")
    in_sweep = np.ones(n, dtype=bool)
    in_sweep[held] = False
    classes = np.unique(data.labels)
    sweep_classes = np.unique(data.labels[in_sweep])
    if len(sweep_classes) < 2:
        raise SSLBenchError(f"linear probe: train needs at least 2 classes, got {len(sweep_classes)}")
    full = _Problem(data.rows, _codes(data.labels, classes), len(classes), opts.chunk_rows, device)
    _check_finite(full, "train")
    # The sweep's model knows only the classes of its own rows (as scikit-learn fitted on them would);
    # held-out rows of other classes are scored wrong.
    codes = np.searchsorted(sweep_classes, data.labels).clip(max=len(sweep_classes) - 1)
    known = np.isin(data.labels[held], sweep_classes)
    problem, fit_weights, held_out_top1 = _sweep_rows(data, codes, len(sweep_classes), in_sweep, known, opts, device)
    theta = torch.zeros(problem.width * (problem.dims + 1), dtype=torch.float64, device=device)
    sweep: list[SweepPoint] = []
    fits: dict[float, LogisticFit] = {}
    warnings: list[str] = []
    settings = _Settings(opts.max_iter, opts.tol, opts.fast_products, opts.precondition, opts.memory, opts.class_blocks)
    curvature: dict[float, float] = {}
    with torch_threads(problem.chunk_work):
        moments = problem.moments(fit_weights) if opts.precondition else None
        start_curvature = _uniform_curvature(problem)
        path: list[_Solved] = []
        #: Whether the next fit starts in per-class blocks: from the first long fit on, probabilities
        #: have sharpened past what the whitening models (and they only sharpen as C grows: a short fit
        #: in the blocks does not send the next one back); until fits in the blocks lengthen fast.
        long_fit, blocks_iterations, sweep_settings = False, 0, settings
        carried = _CarriedBlocks()
        for C in sorted(opts.c_values):
            if opts.predict_path and path:
                _predict_start(problem, fit_weights, C, theta, path)
            fit, final = _fit(
                problem,
                fit_weights,
                sweep_classes,
                C,
                theta,
                sweep_settings,
                moments,
                start_curvature,
                long_fit,
                carried,
            )
            in_blocks = fit.class_blocks_iterations
            long_fit = long_fit or fit.iterations >= BLOCKS_AFTER_ITERATIONS
            if in_blocks:
                if (
                    blocks_iterations
                    and in_blocks >= BLOCKS_LEFT_AFTER
                    and in_blocks > BLOCKS_GROWTH * blocks_iterations
                ):
                    sweep_settings = replace(sweep_settings, class_blocks=False)
                    carried.drop()
                blocks_iterations = in_blocks
                # Blocks kept from an earlier C are rebuilt at the next once a fit in them runs longer
                # than the first one did by a quarter.
                if not carried.first_fit:
                    carried.first_fit = in_blocks
                elif in_blocks > BLOCKS_STALE * carried.first_fit:
                    carried.drop()
            # The next C starts here, with these probabilities (they do not depend on C).
            start_curvature = curvature[C] = final.curvature
            path = [*path[-3:], _Solved(C, theta.clone(), (final.objective - problem.penalty(theta)) / C)]
            score = held_out_top1(theta, final)
            point = SweepPoint(C, score, fit.objective, fit.iterations, fit.converged, fit.separable)
            sweep.append(point)
            fits[C] = fit
            if on_fit:
                on_fit(point)
        best = max(sweep, key=lambda p: p.held_out_top1)  # the first (smallest C) among ties
        del problem, fit_weights, held_out_top1, carried  # the sweep's copies of the rows (if made), its blocks
        theta = torch.zeros(full.width * (full.dims + 1), dtype=torch.float64, device=device)
        start_curvature = _uniform_curvature(full)
        long_fit = False
        if np.array_equal(classes, sweep_classes):
            start = fits[best.C]
            long_fit = start.iterations >= BLOCKS_AFTER_ITERATIONS
            theta.copy_(torch.from_numpy(np.concatenate([start.coef.ravel(), start.intercept])).to(device))
            start_curvature = curvature[best.C]
        all_rows = torch.ones(n, dtype=torch.float64, device=device)
        moments = full.moments(all_rows) if opts.precondition else None
        fit, _ = _fit(full, all_rows, classes, best.C, theta, settings, moments, start_curvature, long_fit)
        top1, top5 = _top_k(fit, eval_features, eval_labels, device, opts.chunk_rows)
    data.reader.release()
    for done in [*fits.values(), fit]:
        if not done.converged:
            what = "refit" if done is fit else "sweep"
            warnings.append(
                f"{what} at C={done.C:.3g}: L-BFGS did not converge in {done.iterations} iterations "
                f"({done.stop_reason})"
            )
    separated = [p.C for p in sweep if p.separable]
    if separated:
        warnings.append(
            f"train rows are linearly separated from C={min(separated):.3g} on: without the penalty no finite "
            "optimum exists, and the weights grow with C"
        )
    return LinearProbeResult(top1, top5, best.C, tuple(sweep), fit, time.perf_counter() - started, tuple(warnings))
