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

from typing import Any

import torch

#: The series diverges at ``‖Q‖₂ = 1``; above this bound on ``‖Q‖₂`` we warn.
NEUMANN_WARN_NORM = 0.9
#: The fewest terms the Cayley-Neumann series can have: ``I + Q``.
MIN_NEUMANN_TERMS = 2


def check_neumann_terms(num_terms: int) -> None:
    """The series needs at least :data:`MIN_NEUMANN_TERMS` terms; a ``ValueError`` that says so otherwise."""
    if isinstance(num_terms, bool) or not isinstance(num_terms, int) or num_terms < MIN_NEUMANN_TERMS:
        raise ValueError(
            f"num_cayley_neumann_terms={num_terms!r} is too few: the series needs at least {MIN_NEUMANN_TERMS} "
            "terms (I + Q); use 5"
        )


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
    def forward(ctx: Any, q: torch.Tensor) -> torch.Tensor:
        work = q.to(_solve_dtype(q))
        eye = _identity_like(work)
        # (I + Q)(I - Q)⁻¹ = (I - Q)⁻¹(I + Q): a left solve, the form LAPACK handles best.
        rotation = torch.linalg.solve(eye - work, eye + work).to(q.dtype)
        ctx.save_for_backward(rotation)
        return rotation

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
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


def _neumann_coefficients(num_terms: int) -> list[float]:
    """``c_k`` of ``R_n = Σ_{k=0}^{n-1} c_k Qᵏ``: ``1, 2, …, 2, 1`` (``1, 1`` for ``n = 2``)."""
    return [1.0] + [2.0] * (num_terms - 2) + [1.0]


def _horner_tail(q: torch.Tensor, coefficients: list[float]) -> list[torch.Tensor]:
    """``[T_{K}, …, T_1]`` of Horner's rule ``T_k = c_k I + Q T_{k+1}``, ``T_{K+1} = c_{K+1} I`` (``K + 2`` terms).

    ``q`` is ``(B, b, b)``; ``T_0`` (the polynomial itself) is left to the caller.
    """
    eye = _identity_like(q)
    last = len(coefficients) - 1
    tail = [torch.add(coefficients[last - 1] * eye, q, alpha=coefficients[last])]  # T_{K}
    for k in range(last - 2, 0, -1):
        tail.append(torch.baddbmm(eye, q, tail[-1], beta=coefficients[k]))
    return tail


class _CayleyNeumann(torch.autograd.Function):
    """The series ``R = Σ_{k=0}^{n-1} c_k Qᵏ`` (``c = 1, 2, …, 2, 1``) by Horner's rule, saving only ``Q``.

    Forward: ``T_k = c_k I + Q T_{k+1}``, ``R = T_0``: one fused multiply-add per term. Backward recomputes the
    ``T_k`` (autograd would keep all of them, per layer, until backward) and runs Horner's rule in reverse:
    with ``H_0 = G`` and ``H_{k+1} = Qᵀ H_k``, ``∂L/∂Q = Σ_k H_k T_{k+1}ᵀ``.
    """

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, num_terms: int) -> torch.Tensor:
        ctx.save_for_backward(q)
        ctx.num_terms = num_terms
        batch = q.reshape(-1, *q.shape[-2:])
        coefficients = _neumann_coefficients(num_terms)
        if num_terms == 2:
            return torch.add(_identity_like(q), q)
        tail = _horner_tail(batch, coefficients)
        return torch.baddbmm(_identity_like(batch), batch, tail[-1], beta=coefficients[0]).view(q.shape)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (q,) = ctx.saved_tensors
        coefficients = _neumann_coefficients(ctx.num_terms)
        batch = q.reshape(-1, *q.shape[-2:])
        h = grad.reshape(batch.shape)
        if ctx.num_terms == 2:
            return grad.clone(), None
        tail = _horner_tail(batch, coefficients)  # T_K … T_1
        q_t = batch.transpose(-1, -2)
        total = torch.bmm(h, tail[-1].transpose(-1, -2))  # H_0 T_1ᵀ
        for t_next in reversed(tail[:-1]):  # T_2 … T_K
            h = torch.bmm(q_t, h)
            total = torch.baddbmm(total, h, t_next.transpose(-1, -2))
        h = torch.bmm(q_t, h)  # H_K; T_{K+1} = c_{K+1} I
        total = total.add_(h, alpha=coefficients[-1])
        return total.view(q.shape), None


def cayley_neumann(q: torch.Tensor, num_terms: int) -> torch.Tensor:
    """Cayley-Neumann approximation ``(I + Q) Σ_{k=0}^{n-2} Qᵏ`` of :func:`cayley_exact`.

    Args:
        q: ``(..., b, b)`` skew-symmetric, ``‖Q‖₂ < 1`` for the series to converge.
        num_terms: ``n ≥ 2``; ``n = 2`` gives ``I + Q``, and the result tends to :func:`cayley_exact` as ``n``
            grows.

    Returns:
        ``(..., b, b)``, orthogonal up to ``2‖Q‖₂^{n-1}``. Differentiable once; backward keeps only ``Q``.
    """
    check_neumann_terms(num_terms)
    return _CayleyNeumann.apply(q, num_terms)


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


#: ``cayley_inverse`` refuses a rotation with an eigenvalue closer than this to -1 (a turn within about
#: 2e-6 rad of 180°): its generator would exceed 1e6 in norm, every digit of it rounding noise.
CAYLEY_INVERSE_MIN_DISTANCE = 1e-6


def cayley_inverse(rotation: torch.Tensor) -> torch.Tensor:
    """The generator ``Q`` with ``cayley_exact(Q) == R``: ``Q = (R - I)(R + I)⁻¹``, the exact inverse map.

    From ``R = (I + Q)(I - Q)⁻¹``: ``R - I = (R + I)Q``, and ``(R - I)`` and ``(R + I)⁻¹`` commute (both are
    functions of ``R``). Computed with one ``torch.linalg.solve`` in float64 (where the device has it) and
    rounded once to the dtype of ``rotation``. For an orthogonal ``R`` the result is skew-symmetric up to
    rounding; pass the result through :func:`~orthotune.functional.skew.skew_part` to make it exactly so.

    Args:
        rotation: ``(..., b, b)`` orthogonal with ``det R = +1`` and no eigenvalue ``-1``.

    Returns:
        ``(..., b, b)`` skew-symmetric ``Q``, same dtype as ``rotation``.

    Raises:
        ValueError: if some ``R`` has an eigenvalue at (or within :data:`CAYLEY_INVERSE_MIN_DISTANCE` of) -1:
            a turn by 180°, which no Cayley generator reaches (``θ = 2·arctan ω`` stays below 180°).
    """
    work = rotation.to(_solve_dtype(rotation))
    eye = _identity_like(work)
    plus = work + eye
    # For an orthogonal R, R + I is normal: its singular values are |1 + λ| over the eigenvalues λ of R.
    distance = torch.linalg.svdvals(plus).amin(dim=-1) if plus.numel() else plus.new_ones(plus.shape[:-2])
    if bool((distance <= CAYLEY_INVERSE_MIN_DISTANCE).any()):
        worst = float(distance.min())
        raise ValueError(
            f"cayley_inverse: a rotation has an eigenvalue at -1 (smallest |1 + λ| = {worst:.2g}): it turns some "
            "plane by 180°, which no Cayley generator reaches (the angle 2·arctan ω of R(Q) stays below 180°); "
            "the rotation has no generator. When composing adapters, lower a weight so the combined turn stays "
            "under 180°"
        )
    return torch.linalg.solve(plus, work - eye).to(rotation.dtype)
