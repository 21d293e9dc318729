"""The Cayley transform: skew-symmetric generators to orthogonal rotations.

Convention (one for the whole library, the OFT paper's):

    R = (I + Q)(I - Q)⁻¹,        Q skew-symmetric,

and a rotation acts on activations as a row vector, ``x ↦ x R``, so a linear layer ``y = x Wᵀ`` becomes
``y = x R Wᵀ`` and merges as ``W ↦ W Rᵀ``.

``(I - Q)`` is always invertible (the eigenvalues of ``Q`` are imaginary), ``R`` is orthogonal with
``det R = 1``, and ``(I + Q)`` and ``(I - Q)⁻¹`` commute, so the order of the product does not matter.

The Cayley-Neumann series replaces ``(I - Q)⁻¹`` with its Neumann series ``Σ_k Qᵏ`` truncated to ``n - 1``
terms:

    R_n = (I + Q) Σ_{k=0}^{n-2} Qᵏ = I + 2Q + 2Q² + … + 2Q^{n-2} + Q^{n-1}.

Its error is exact and small: ``R - R_n = Q^{n-1} R``, so ``‖R - R_n‖₂ = ‖Q‖₂^{n-1}`` and
``‖R_nᵀR_n - I‖₂ ≤ 2‖Q‖₂^{n-1} + ‖Q‖₂^{2(n-1)}``. The series converges only while ``‖Q‖₂ < 1``; for a skew
``Q``, ``‖Q‖₂ ≤ ‖Q‖_F / √2``, which equals the Euclidean norm of its packed upper triangle.

peft 0.21.2's Neumann path approximates this same ``R`` (for ``n ≥ 4`` term by term), but its exact path
computes ``(I - Q)(I + Q)⁻¹ = Rᵀ``: the two modes of peft mean transposed rotations for the same parameters.
Here both modes mean ``R``.
"""

from __future__ import annotations

import torch

#: The series diverges at ``‖Q‖₂ = 1``; above this bound on ``‖Q‖₂`` we warn.
NEUMANN_WARN_NORM = 0.9


def _identity_like(q: torch.Tensor) -> torch.Tensor:
    return torch.eye(q.shape[-1], dtype=q.dtype, device=q.device).expand_as(q)


def _solve_dtype(q: torch.Tensor) -> torch.dtype:
    """float64 wherever the device has it: an fp32 LU solve of a 128-wide block with ‖Q‖ ~ 10 is off from
    orthogonal by ~1e-4, the float64 one rounded to fp32 by ~1e-7, for a cost that is tiny next to the layer."""
    return q.dtype if q.device.type == "mps" else torch.float64


class _CayleyExact(torch.autograd.Function):
    """``R = (I - Q)⁻¹(I + Q)`` by one LU solve, with a backward that needs no second solve.

    ``R + I = 2(I - Q)⁻¹``, so with ``A = (R + I)/2`` the differential is ``dR = 2 A dQ A`` and the gradient
    is ``∂L/∂Q = 2 Aᵀ G Aᵀ``: two small matmuls instead of autograd's transposed solve.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, q: torch.Tensor) -> torch.Tensor:
        work = q.to(_solve_dtype(q))
        eye = _identity_like(work)
        # (I + Q)(I - Q)⁻¹ = (I - Q)⁻¹(I + Q): a left solve, the form LAPACK handles best.
        rotation = torch.linalg.solve(eye - work, eye + work).to(q.dtype)
        ctx.save_for_backward(rotation)
        return rotation

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> torch.Tensor:
        (rotation,) = ctx.saved_tensors
        inverse_t = ((rotation + _identity_like(rotation)) * 0.5).transpose(-1, -2)  # ((I - Q)⁻¹)ᵀ
        return 2.0 * inverse_t @ grad @ inverse_t


def cayley_exact(q: torch.Tensor) -> torch.Tensor:
    """Exact Cayley transform ``R = (I + Q)(I - Q)⁻¹`` of a batch of skew-symmetric matrices.

    Computed with ``torch.linalg.solve`` (an LU solve), never an explicit inverse, in float64 (where the
    device supports it) and rounded once to the dtype of ``q``, so that ``‖RᵀR - I‖`` stays at the rounding
    level of that dtype for generators of any size. Differentiable once (the backward reuses ``R``).

    Args:
        q: ``(..., b, b)`` skew-symmetric.

    Returns:
        ``(..., b, b)`` orthogonal, same dtype as ``q``.
    """
    return _CayleyExact.apply(q)


def cayley_neumann(q: torch.Tensor, num_terms: int) -> torch.Tensor:
    """Cayley-Neumann approximation ``(I + Q) Σ_{k=0}^{n-2} Qᵏ`` of :func:`cayley_exact`.

    Args:
        q: ``(..., b, b)`` skew-symmetric, ``‖Q‖₂ < 1`` for the series to converge.
        num_terms: ``n ≥ 2``; ``n = 2`` gives ``I + Q``, and the result tends to :func:`cayley_exact` as ``n``
            grows.

    Returns:
        ``(..., b, b)``, orthogonal up to ``2‖Q‖₂^{n-1}``.
    """
    if num_terms < 2:
        raise ValueError(
            f"num_cayley_neumann_terms={num_terms} is too few: the series needs at least 2 terms (I + Q); use 5"
        )
    series = _identity_like(q)  # Σ_{k=0}^{n-2} Qᵏ, built term by term
    power = series
    for _ in range(num_terms - 2):
        power = power @ q
        series = series + power
    return series + q @ series  # (I + Q) · series


def cayley_transform(q: torch.Tensor, use_neumann: bool = False, num_neumann_terms: int = 5) -> torch.Tensor:
    """:func:`cayley_exact` or :func:`cayley_neumann`, both meaning ``R = (I + Q)(I - Q)⁻¹``."""
    return cayley_neumann(q, num_neumann_terms) if use_neumann else cayley_exact(q)


def neumann_norm_bound(packed: torch.Tensor) -> torch.Tensor:
    """Upper bound on ``‖Q‖₂`` per block, from packed generators ``(..., b(b-1)/2)``.

    For skew ``Q``, ``‖Q‖₂ ≤ ‖Q‖_F / √2 = ‖packed‖₂``; the Neumann series converges below 1.
    """
    return torch.linalg.vector_norm(packed, dim=-1)


def orthogonality_error(rotation: torch.Tensor) -> torch.Tensor:
    """``max ‖RᵀR - I‖₂`` (spectral norm) over a batch ``(..., b, b)``; zero for an exact rotation."""
    gram = rotation.transpose(-1, -2) @ rotation
    return torch.linalg.matrix_norm(gram - _identity_like(gram), ord=2).max()
