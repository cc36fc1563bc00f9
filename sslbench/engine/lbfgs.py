"""Limited-memory BFGS on a smooth convex objective, in torch float64 on the objective's device.

scipy's L-BFGS-B (what scikit-learn's ``lbfgs`` solver calls) forgets its correction pairs whenever it
is called again; the linear probe changes how it evaluates the objective part-way through a fit
(float32 products, then float64 ones that judge convergence), and every restart cost it dozens of
iterations to rebuild its model of the curvature. Here the pairs survive such a change: the caller
swaps the evaluation and goes on. The stopping rules are scikit-learn's (scipy's ``ftol`` test on the
relative reduction of the objective, and a test on the gradient's largest entry supplied by the caller);
the line search backtracks from the unit step under Armijo's condition, which on a convex objective keeps
every accepted pair's curvature ``sᵀy`` non-negative.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import Tensor

#: Armijo's sufficient-decrease constant (scipy's L-BFGS-B line search uses 1e-3; any small value works).
ARMIJO = 1e-4


@dataclass(frozen=True)
class Evaluation:
    """The objective and its gradient at a point."""

    value: float
    gradient: Tensor


class CurvaturePairs:
    """The last ``memory`` steps ``s`` and gradient changes ``y``: the inverse-Hessian model of L-BFGS."""

    def __init__(self, memory: int) -> None:
        self.pairs: deque[tuple[Tensor, Tensor, float]] = deque(maxlen=memory)

    def __len__(self) -> int:
        return len(self.pairs)

    def clear(self) -> None:
        self.pairs.clear()

    def add(self, step: Tensor, change: Tensor) -> None:
        """Keep a pair whose curvature is safely positive (a flat direction would divide by ~0)."""
        curvature = float(step @ change)
        if curvature > 1e-12 * float(change @ change):
            self.pairs.append((step, change, 1.0 / curvature))

    def direction(self, gradient: Tensor) -> Tensor:
        """``−H·gradient`` by the two-loop recursion (Nocedal & Wright, Algorithm 7.4)."""
        q = gradient.clone()
        alphas = []
        for step, change, rho in reversed(self.pairs):
            alpha = rho * float(step @ q)
            q.sub_(change, alpha=alpha)
            alphas.append(alpha)
        if self.pairs:
            step, change, rho = self.pairs[-1]
            q.mul_(1.0 / (rho * float(change @ change)))
        for (step, change, rho), alpha in zip(self.pairs, reversed(alphas), strict=True):
            beta = rho * float(change @ q)
            q.add_(step, alpha=alpha - beta)
        return q.neg_()


@dataclass(frozen=True)
class Step:
    """The outcome of one iteration: the accepted point, or ``None`` where the line search failed."""

    point: Tensor | None
    evaluation: Evaluation | None
    evaluations: int


def iterate(
    evaluate: Callable[[Tensor], Evaluation], point: Tensor, at: Evaluation, pairs: CurvaturePairs, max_steps: int
) -> Step:
    """One L-BFGS iteration from ``point`` (where the objective is ``at``): a direction from ``pairs``
    (steepest descent when they give no descent), a backtracking line search of at most ``max_steps``
    evaluations from the unit step (from ``1/‖d‖`` without pairs, as L-BFGS-B), and the new pair."""
    direction = pairs.direction(at.gradient)
    slope = float(at.gradient @ direction)
    if not slope < 0:
        pairs.clear()
        direction = at.gradient.neg()
        slope = -float(at.gradient @ at.gradient)
        if slope == 0:
            return Step(None, None, 0)
    length = 1.0 if len(pairs) else min(1.0, 1.0 / float(direction.norm()))
    for tried in range(1, max_steps + 1):
        candidate = point + length * direction
        evaluation = evaluate(candidate)
        if math.isfinite(evaluation.value) and evaluation.value <= at.value + ARMIJO * length * slope:
            pairs.add(candidate - point, evaluation.gradient - at.gradient)
            return Step(candidate, evaluation, tried)
        rise = evaluation.value - at.value - slope * length
        # The minimum of the quadratic through the two values and the slope, kept within [0.1, 0.5]
        # of the step (a non-finite or non-convex reading halves it).
        guess = -slope * length * length / (2 * rise) if math.isfinite(rise) and rise > 0 else 0.5 * length
        length = min(max(guess, 0.1 * length), 0.5 * length)
    return Step(None, None, max_steps)


def relative_reduction(before: float, after: float) -> float:
    """scipy's L-BFGS-B ``ftol`` measure: ``(f_k − f_{k+1}) / max(|f_k|, |f_{k+1}|, 1)``."""
    return (before - after) / max(abs(before), abs(after), 1.0)
