"""Per-class curvature blocks: the linear probe's change of variables once probabilities have sharpened.

The Hessian of ``C·Σᵢ wᵢ·CEᵢ + ½‖W‖²`` in class ``c``'s own weights and intercept is
``C·Σᵢ wᵢ·pᵢc(1 − pᵢc)·x̄ᵢx̄ᵢᵀ + I`` (``x̄ = (x − μ, 1)``, the intercept absorbing the mean ``μ``, the
penalty's identity on the weights and a unit scale on the intercept). The whitening of
:class:`~sslbench.engine.logistic._Conditioner` replaces every ``pᵢc(1 − pᵢc)`` by one mean curvature,
which is exact at uniform probabilities; as a sweep moves to larger C each class's curvature concentrates
on the rows near its own margins, in directions the scatter of all rows does not single out, and L-BFGS
spends its iterations finding them (90,000 × 768 Gaussian rows, 100 classes, C = 0.316 from the solution
at 0.178: 163 iterations whitened, 47 in these blocks' coordinates; benchmarks/README.md). The blocks
keep each class's curvature over every dimension and drop only the coupling between classes. Rows of
little curvature in a class (confident rows, most of them at large C) enter its block as a whole:
their total curvature, their curvature-weighted mean and the rows' spread about their classes' means,
one GEMM per chunk instead of one product per row.

:class:`ClassBlocks` takes the blocks' scatter (summed by a streamed pass over the rows,
``_Problem.class_curvature``) and works in coordinates ``φ`` with ``θ̄_c = M_c·φ_c``, ``M_c = L_c⁻ᵀ`` for
the Cholesky factor ``L_c`` of block ``c``: each block becomes the identity. ``M`` is applied by
batched triangular solves with the factors (``k·(d + 1)²`` float64 numbers), ``L_cᵀ`` for the
parameters and ``L_c`` for the gradient, so the two maps are exact adjoints of each other and the objective's values and
minimiser are untouched: only the path to the minimiser changes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sslbench.engine.device import torch_module

if TYPE_CHECKING:
    from torch import Tensor


def class_blocks_bytes(width: int, dims: int) -> int:
    """Memory of building and holding the blocks: the float32 scatter and the float64 maps."""
    return width * (dims + 1) ** 2 * (4 + 8)


class ClassBlocks:
    """The change of variables ``θ = T(φ)`` that makes every class's curvature block the identity.

    With more than two classes the softmax sees only the class contrasts (a vector added to every class's
    weights changes no probability), so ``T`` acts on the contrasts alone, ``T = Q·M·Q + E`` (``Q`` takes
    away the mean over classes, ``E`` keeps only it, ``M`` the blocks' maps): the class mean, which only
    the penalty sees, stays in the model's own coordinates as in the whitening, and a step with no class
    mean (every gradient of a start without one) adds none."""

    def __init__(self, scatter: Tensor, C: float, mean: Tensor) -> None:
        """``scatter``: ``(width, d + 1, d + 1)``, each class's ``Σᵢ wᵢ·pᵢc(1 − pᵢc)·x̄ᵢx̄ᵢᵀ``."""
        torch = torch_module()
        width, size = scatter.shape[0], scatter.shape[1]
        self.dims, self.width, self.mean = size - 1, width, mean
        self.contrasts = width > 1
        #: Each block's Cholesky factor ``L_c`` (lower): ``M_c = L_c⁻ᵀ`` is applied by triangular solves,
        #: which read half the numbers a product with an inverse would (and no inverse is formed).
        self.factors = torch.empty((width, size, size), dtype=torch.float64, device=scatter.device)
        #: ``Σ_c L_cᵀ`` (upper triangular): what recovers the coordinates of a point's class contrasts.
        self.factor_sum = torch.zeros((size, size), dtype=torch.float64, device=scatter.device)
        for c in range(width):  # one class at a time: the float64 blocks are never all held twice
            block = scatter[c].to(torch.float64).mul_(C)
            block.diagonal().add_(1.0)
            factor, info = torch.linalg.cholesky_ex(block)
            if int(info) != 0:
                raise ValueError(f"class block {c} is not positive definite (order {int(info)} minor)")
            self.factors[c] = factor
            self.factor_sum += factor.T

    def _split(self, flat: Tensor) -> Tensor:
        """``(width, d + 1)``: each class's weights beside its intercept."""
        torch = torch_module()
        return torch.cat(
            [flat[: self.width * self.dims].view(self.width, self.dims), flat[self.width * self.dims :, None]], 1
        )

    def _flat(self, stacked: Tensor) -> Tensor:
        torch = torch_module()
        return torch.cat([stacked[:, : self.dims].flatten(), stacked[:, self.dims]])

    def _map(self, stacked: Tensor, transposed: bool) -> Tensor:
        """``M_c`` (``Mᵀ_c`` when ``transposed``) on each class's row of ``stacked``."""
        torch = torch_module()
        factors = self.factors if transposed else self.factors.transpose(1, 2)
        return torch.linalg.solve_triangular(factors, stacked[:, :, None], upper=not transposed)[:, :, 0]

    def _apply(self, stacked: Tensor, transposed: bool) -> Tensor:
        """``Q·M·Q + E`` (with two classes, ``M``; ``Mᵀ`` when ``transposed``) on ``stacked``."""
        if not self.contrasts:
            return self._map(stacked, transposed)
        class_mean = stacked.mean(dim=0, keepdim=True)
        mapped = self._map(stacked - class_mean, transposed)
        return mapped - mapped.mean(dim=0, keepdim=True) + class_mean

    def weights(self, phi: Tensor) -> Tensor:
        """``θ = T(φ)``: the model's flat parameters (weights, then intercepts)."""
        centred = self._apply(self._split(phi), transposed=False)
        torch = torch_module()
        coef = centred[:, : self.dims]
        return torch.cat([coef.flatten(), centred[:, self.dims] - coef @ self.mean])

    def coordinates(self, theta: Tensor) -> Tensor:
        """``φ = T⁻¹(θ)``: with contrasts, ``M·φ`` is the point's contrasts plus one vector ``v`` for
        every class, the one that leaves ``φ``'s contrasts without a class mean: ``(Σ_c L_cᵀ)·v =
        −Σ_c L_cᵀ·q_c`` (``q`` the contrasts, ``M_c⁻¹ = L_cᵀ``)."""
        torch = torch_module()
        stacked = self._split(theta)
        stacked[:, self.dims] += stacked[:, : self.dims] @ self.mean
        inverse_maps = self.factors.transpose(1, 2)  # M_c⁻¹ = L_cᵀ
        if not self.contrasts:
            return self._flat(torch.bmm(inverse_maps, stacked[:, :, None])[:, :, 0])
        class_mean = stacked.mean(dim=0, keepdim=True)
        lifted = torch.bmm(inverse_maps, (stacked - class_mean)[:, :, None])[:, :, 0]
        shift = -torch.linalg.solve_triangular(self.factor_sum, lifted.sum(dim=0)[:, None], upper=True)[:, 0]
        shifted = torch.matmul(inverse_maps, shift)
        return self._flat(lifted + shifted + class_mean)

    def gradient(self, gradient: Tensor) -> Tensor:
        """The gradient in ``φ``: ``T``'s adjoint applied to the gradient in ``θ``."""
        stacked = self._split(gradient)
        stacked[:, : self.dims] -= stacked[:, self.dims, None] * self.mean[None, :]
        return self._flat(self._apply(stacked, transposed=True))
