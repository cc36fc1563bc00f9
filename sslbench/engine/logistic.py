"""The linear probe: L2-regularised multinomial logistic regression on frozen features, CPU or GPU.

For one ``C`` the solver minimises scikit-learn's ``LogisticRegression(C=C, solver="lbfgs")`` objective,
``C · Σᵢ cross-entropyᵢ + ½‖W‖²`` with the intercept unpenalised: a softmax over all classes, or for two
classes scikit-learn's binary model (one weight vector, the probability of the second class a sigmoid).
The optimiser is scikit-learn's own, scipy's L-BFGS-B with its stopping rules; the objective and its
gradient are computed here, one streamed pass over the rows per evaluation (two GEMMs per chunk,
:class:`~sslbench.arrays.RowReader`), so a memory-mapped ImageNet split is fitted in bounded memory and
the passes run on the GPU when asked. A fit's first iterations take float32 passes (summed in float64),
its last ones float64 passes, on which convergence is judged (:func:`_minimise`).

:func:`linear_probe` runs DINOv2's protocol (facebookresearch/dinov2, ``dinov2/eval/log_regression.py``
at commit 05c66df0cfa837710197d4769158c87e36afad2c): ``C = 10^t`` for 45 values of ``t`` evenly spaced in
[−6, 5] (``10 ** torch.linspace(-6, 5, 45)``, float32 values as there), tolerance 1e-12, at most 1,000
iterations; ``C`` chosen by top-1 on a held-out tenth of train (``torch.manual_seed(0)``,
``torch.randperm(n)``, the first ``n // 10`` permuted rows held out), then refitted on all of train and
scored on the eval split (top-1, top-5). DINOv2 fits each ``C`` from scratch with cuML; here the ``C``
values are swept from the smallest up, each fit starting at the previous solution (a warm start: the
objective and its minimiser do not depend on the start; where a C stops at ``max_iter`` the iterate, and so
its held-out score, does, and the fit is reported as not converged), held-out rows riding along in every
pass with weight zero.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from sslbench.arrays import RowReader
from sslbench.engine.device import resolve_device, torch_module
from sslbench.engine.rows import CHUNK_ROWS, DeviceRows
from sslbench.errors import SSLBenchError
from sslbench.interfaces import iter_chunks
from sslbench.threads import torch_threads

if TYPE_CHECKING:
    from torch import Tensor


def dinov2_c_values() -> tuple[float, ...]:
    """DINOv2's grid, ``10 ** torch.linspace(-6, 5, 45)``: float32 values computed by torch as there."""
    torch = torch_module()
    return tuple((10 ** torch.linspace(-6, 5, 45)).tolist())


#: scipy's L-BFGS-B (scikit-learn's lbfgs) stops when an iteration lowers the objective by less than
#: this share of it; scikit-learn sets ``ftol = 64 · eps``.
FTOL = 64 * float(np.finfo(np.float64).eps)


#: The float32 phase of a fit stops at this relative reduction, or after this many evaluations of a line
#: search, for float64 products to take over: below it float32 rounding of the logits is most of what an
#: iteration would see, and scipy's line search would spend its 50 evaluations on rounding noise.
FAST_FTOL = 1e-10
FAST_MAXLS = 20


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
        description="float32 products until L-BFGS-B stalls, then float64 ones to the end (they judge convergence)",
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
    #: Whether L-BFGS-B stopped on a tolerance (not on ``max_iter``, its evaluation cap or a failed line
    #: search), and scipy's reason.
    converged: bool
    stop_reason: str
    #: Whether the fit classifies every training row correctly: then the training set is linearly
    #: separated, no finite minimiser exists without the penalty, and the weights grow with C.
    separable: bool


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

    @property
    def chunk_work(self) -> int:
        """Floating-point operations of one chunk's two products (what sizes the thread count: a small
        problem runs on one thread, where a second one only adds a wake-up and a barrier per operation)."""
        return 4 * min(self.chunk_rows, len(self.rows)) * self.dims * self.width

    def split(self, theta: Tensor) -> tuple[Tensor, Tensor]:
        """(weights ``(width, d)``, intercepts ``(width,)``) of the flat parameter vector."""
        coef = theta[: self.width * self.dims].view(self.width, self.dims)
        return coef, theta[self.width * self.dims :]

    def logits(self, x: Tensor, coef: Tensor, intercept: Tensor) -> Tensor:
        """Every class's logit of rows ``x`` in their dtype (a zero first column for the binary model)."""
        torch = torch_module()
        z = torch.addmm(intercept, x, coef.T)
        return torch.nn.functional.pad(z, (1, 0)) if self.width == 1 else z

    def evaluate(
        self, theta: Tensor, weights: Tensor, C: float, with_gradient: bool = True, exact: bool = True
    ) -> tuple[float, Tensor | None, float, Tensor]:
        """``C·Σ wᵢ·CEᵢ + ½‖W‖²``, its gradient (``None`` without), the weighted count of rows
        predicted right, and every row's correctness (1/0, float64).

        ``exact`` computes in float64; without it the two products and the softmax run in float32 on
        the float32 rows (about three times the rate on a CPU), and only each row's cross-entropy and
        each chunk's gradient are summed in float64: value and gradient are then off by float32
        rounding (about 1e-7 of each logit), which steers an optimiser as well as exact ones until its
        steps get that small (see :func:`_minimise`)."""
        torch = torch_module()
        coef, intercept = self.split(theta)
        dtype = torch.float64 if exact else torch.float32
        coef_p, intercept_p = coef.to(dtype), intercept.to(dtype)
        grad_coef = torch.zeros_like(coef)
        grad_intercept = torch.zeros_like(intercept)
        loss = torch.zeros((), dtype=torch.float64, device=self.device)
        correct = torch.empty(len(self.rows), dtype=torch.float64, device=self.device)
        for rows in iter_chunks(len(self.rows), self.chunk_rows):
            x = self.rows.rows(rows).to(dtype)
            w = weights[rows]
            codes = self.codes[rows][:, None]
            z = self.logits(x, coef_p, intercept_p)
            best, predicted = z.max(dim=1)
            picked = z.gather(1, codes)[:, 0]
            correct[rows] = (predicted == codes[:, 0]).double()
            # One exponential pass serves the log-normaliser and the probabilities (shifted by the
            # row's largest logit: no overflow).
            shifted = z.sub_(best[:, None]).exp_()
            total = shifted.sum(dim=1)
            loss += torch.dot(w, (best - picked).double() + total.double().log())
            if with_gradient:
                residual = shifted.div_(total[:, None])
                residual.scatter_add_(1, codes, torch.full_like(picked, -1.0)[:, None])
                residual.mul_(w.to(dtype)[:, None])
                if self.width == 1:
                    residual = residual[:, 1:]
                grad_coef.add_(residual.T @ x)
                grad_intercept += residual.sum(dim=0, dtype=torch.float64)
        objective = C * float(loss) + 0.5 * float(torch.dot(coef.flatten(), coef.flatten()))
        gradient = None
        if with_gradient:
            gradient = torch.cat([(C * grad_coef + coef).flatten(), C * grad_intercept])
        return objective, gradient, float(torch.dot(correct, weights)), correct


def _minimise(
    problem: _Problem, weights: Tensor, C: float, theta: Tensor, max_iter: int, tol: float, fast_products: bool
) -> tuple[int, bool, str]:
    """scipy's L-BFGS-B, as scikit-learn calls it (``maxls`` 50, ``gtol = tol``, ``ftol = 64·eps``), on
    scikit-learn's mean objective ``objective / (C·n)`` from ``theta`` (updated in place), each evaluation
    one streamed pass on the device; returns (iterations, whether it stopped on a tolerance, scipy's reason).

    With ``fast_products`` the descent starts on float32 products (:meth:`_Problem.evaluate`) and,
    wherever it stops short of ``max_iter`` (its tolerances met, or a line search lost in float32
    rounding), goes on from that point on exact float64 ones with the iterations left: the stopping
    rules are always judged on float64 passes, so the minimiser is scikit-learn's."""
    from scipy.optimize import minimize

    torch = torch_module()
    scale = 1.0 / (C * float(weights.sum()))
    iterations = 0
    for exact in (False, True) if fast_products else (True,):

        def objective(flat: np.ndarray, exact: bool = exact) -> tuple[float, np.ndarray]:
            theta.copy_(torch.from_numpy(flat))
            value, gradient, _, _ = problem.evaluate(theta, weights, C, exact=exact)
            assert gradient is not None
            return value * scale, gradient.cpu().numpy() * scale

        found = minimize(
            objective,
            theta.cpu().numpy(),
            jac=True,
            method="L-BFGS-B",
            options={
                "maxiter": max_iter - iterations,
                "maxls": 50 if exact else FAST_MAXLS,
                "gtol": tol,
                "ftol": FTOL if exact else FAST_FTOL,
            },
        )
        theta.copy_(torch.from_numpy(found.x))
        iterations += int(found.nit)
        if iterations >= max_iter:
            break
    return iterations, found.status == 0, str(found.message)


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


def _check_finite(problem: _Problem, what: str) -> None:
    torch = torch_module()
    for rows in iter_chunks(len(problem.rows), problem.chunk_rows):
        if not bool(torch.isfinite(problem.rows.rows(rows)).all()):
            raise SSLBenchError(f"linear probe: {what} features contain NaN or inf (rows from {rows.start})")


def _fit(
    problem: _Problem,
    weights: Tensor,
    classes: np.ndarray,
    C: float,
    theta: Tensor,
    max_iter: int,
    tol: float,
    fast_products: bool,
) -> tuple[LogisticFit, Tensor]:
    """Minimise at ``C`` from ``theta`` (in place); the fit, and every row's correctness at it."""
    if not (C > 0 and math.isfinite(C)):
        raise SSLBenchError(f"linear probe: C must be a positive number, got {C}")
    iterations, converged, reason = _minimise(problem, weights, C, theta, max_iter, tol, fast_products)
    objective, gradient, right, correct = problem.evaluate(theta, weights, C)
    assert gradient is not None
    n = float(weights.sum())
    coef, intercept = problem.split(theta)
    fit = LogisticFit(
        classes=classes,
        coef=coef.cpu().numpy().copy(),
        intercept=intercept.cpu().numpy().copy(),
        C=C,
        objective=objective,
        gradient_max=float(gradient.abs().max()) / (C * n),
        iterations=iterations,
        converged=converged,
        stop_reason=reason,
        separable=right == n,
    )
    return fit, correct


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
) -> LogisticFit:
    """scikit-learn's ``LogisticRegression(C=C, solver="lbfgs", tol=tol, max_iter=max_iter)`` on
    ``features`` (an array or a memory-mapped file, streamed) and integer ``labels``, from zero weights
    (``fast_products``: :func:`_minimise`)."""
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
    with torch_threads(problem.chunk_work):
        fit, _ = _fit(problem, weights, classes, C, theta, max_iter, tol, fast_products)
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
    # The sweep's model knows only the classes of its own rows (as scikit-learn fitted on them would);
    # held-out rows of other classes are scored wrong.
    codes = np.searchsorted(sweep_classes, data.labels).clip(max=len(sweep_classes) - 1)
    problem = _Problem(data.rows, codes, len(sweep_classes), opts.chunk_rows, device)
    _check_finite(problem, "train")
    fit_weights = torch.from_numpy(in_sweep.astype(np.float64)).to(device)
    held_index = torch.from_numpy(held).to(device)
    held_known = torch.from_numpy(np.isin(data.labels[held], sweep_classes).astype(np.float64)).to(device)
    theta = torch.zeros(problem.width * (problem.dims + 1), dtype=torch.float64, device=device)
    sweep: list[SweepPoint] = []
    fits: dict[float, LogisticFit] = {}
    warnings: list[str] = []
    with torch_threads(problem.chunk_work):
        for C in sorted(opts.c_values):
            fit, correct = _fit(
                problem, fit_weights, sweep_classes, C, theta, opts.max_iter, opts.tol, opts.fast_products
            )
            held_top1 = float(torch.dot(correct[held_index], held_known)) / len(held)
            point = SweepPoint(C, held_top1, fit.objective, fit.iterations, fit.converged, fit.separable)
            sweep.append(point)
            fits[C] = fit
            if on_fit:
                on_fit(point)
        best = max(sweep, key=lambda p: p.held_out_top1)  # the first (smallest C) among ties
        full = _Problem(data.rows, _codes(data.labels, classes), len(classes), opts.chunk_rows, device)
        theta = torch.zeros(full.width * (full.dims + 1), dtype=torch.float64, device=device)
        if np.array_equal(classes, sweep_classes):
            start = fits[best.C]
            theta.copy_(torch.from_numpy(np.concatenate([start.coef.ravel(), start.intercept])).to(device))
        all_rows = torch.ones(n, dtype=torch.float64, device=device)
        fit, _ = _fit(full, all_rows, classes, best.C, theta, opts.max_iter, opts.tol, opts.fast_products)
        top1, top5 = _top_k(fit, eval_features, eval_labels, device, opts.chunk_rows)
    data.reader.release()
    for done in [*fits.values(), fit]:
        if not done.converged:
            what = "refit" if done is fit else "sweep"
            warnings.append(
                f"{what} at C={done.C:.3g}: L-BFGS-B did not converge in {done.iterations} iterations "
                f"({done.stop_reason})"
            )
    separated = [p.C for p in sweep if p.separable]
    if separated:
        warnings.append(
            f"train rows are linearly separated from C={min(separated):.3g} on: without the penalty no finite "
            "optimum exists, and the weights grow with C"
        )
    return LinearProbeResult(top1, top5, best.C, tuple(sweep), fit, time.perf_counter() - started, tuple(warnings))
