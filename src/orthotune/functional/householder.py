"""Products of Householder reflections (HRA; Yuan et al., NeurIPS 2024, arXiv:2405.17484), never as ``d × d``.

HRA's adapter is ``r`` vectors ``u_i``, the columns of ``U: (d, r)``. peft 0.21.2 turns them into

    apply_GS=False:  H = H_0 H_1 ⋯ H_{r−1},   H_i = I − 2 u_i u_iᵀ / ‖u_i‖²
    apply_GS=True:   H = I − 2 Q Qᵀ,           Q = Gram–Schmidt(U) (orthonormal columns, in column order)

and merges it as ``W ↦ W H`` (``W: (out, d)`` of ``y = x Wᵀ + b``). Both are orthogonal; the second is also
symmetric, and equals the product of the reflections in the ``q_i`` (they commute, being orthogonal).

**Compact WY form.** Any such ``H`` is ``I − V T Vᵀ`` with ``V: (d, k)`` and a small ``T: (k, k)``
(Schreiber & Van Loan, 1989). For the product of reflections, ``V = U`` (unnormalised) and ``T`` is upper
triangular with

    T⁻¹ = striu(UᵀU) + ½ diag(UᵀU)

(Puglisi 1992; Joffrain et al. 2006): the normalisation ``2/‖u_i‖²`` is folded into ``T``, so ``U`` is never
divided. For Gram–Schmidt, ``V = Q`` and ``T = 2I``. Two products compose in the same form:
``(I − V_1 T_1 V_1ᵀ)(I − V_2 T_2 V_2ᵀ) = I − [V_1 V_2] [[T_1, −T_1 V_1ᵀV_2 T_2], [0, T_2]] [V_1 V_2]ᵀ``.

**Which side the activations see.** orthotune writes a rotation ``R`` as acting on row vectors, ``x ↦ x R``,
with merged weight ``W Rᵀ`` (docs/math.md). peft's merged weight is ``W H``, so ``R = Hᵀ``::

    y = x (W H)ᵀ + b = (x Hᵀ) Wᵀ + b,     x Hᵀ = x − (x V) Tᵀ Vᵀ

Forward therefore rotates the activations by ``Hᵀ``: two thin ``(n, d)·(d, k)`` and ``(n, k)·(k, d)``
products, ``2·n·d·k`` multiply-adds, the cost of a LoRA adapter of rank ``k``. Merging costs ``2·out·d·k``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = [
    "householder_compose",
    "householder_dense",
    "householder_gram_schmidt",
    "householder_on_span",
    "householder_rotate_activations",
    "householder_rotate_weight",
    "householder_unit_vectors",
    "householder_unrotate_weight",
    "householder_wy",
]


def _compute_dtype(u: torch.Tensor) -> torch.dtype:
    """fp32, or fp64 for fp64 vectors: ``T`` inverts a Gram matrix, which bf16 would not survive."""
    return torch.float64 if u.dtype == torch.float64 else torch.float32


def householder_unit_vectors(u: torch.Tensor) -> torch.Tensor:
    """``u_i / ‖u_i‖``, peft's normalisation with ``apply_GS=False``.

    Args:
        u: ``(d, r)``, one vector per column.

    Returns:
        ``(d, r)`` unit columns (a zero column gives NaN, as in peft: it defines no reflection).
    """
    return u / torch.linalg.vector_norm(u, dim=0)


def householder_gram_schmidt(u: torch.Tensor) -> torch.Tensor:
    """peft's ``apply_GS=True`` orthonormalisation: Gram–Schmidt of the columns of ``u``, in column order.

    Computed as a QR factorisation whose ``R`` has a positive diagonal, which is exactly what Gram–Schmidt
    produces (the same ``Q``, column by column, for ``u`` of full column rank), with Householder QR's better
    rounding. For a rank-deficient ``u`` Gram–Schmidt divides by zero (peft's result is then rounding noise,
    not even orthonormal); here ``Q`` stays orthonormal but its extra columns are arbitrary, and its gradient
    is not defined.

    Args:
        u: ``(d, r)`` with ``r ≤ d``.

    Returns:
        ``Q: (d, r)``, ``QᵀQ = I``, ``span(Q[:, :i]) = span(u[:, :i])`` for every ``i``.
    """
    if u.shape[-1] > u.shape[-2]:
        raise ValueError(
            f"Gram-Schmidt of r={u.shape[-1]} vectors in d={u.shape[-2]} dimensions: at most d vectors are "
            f"orthonormal; use r ≤ {u.shape[-2]} or apply_GS=False"
        )
    q, r = torch.linalg.qr(u)
    signs = torch.where(torch.diagonal(r, dim1=-2, dim2=-1) < 0, -1.0, 1.0).to(q.dtype)
    return q * signs.unsqueeze(-2)


def householder_wy(u: torch.Tensor, apply_gs: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Compact WY form ``H = I − V T Vᵀ`` of peft's HRA matrix (see the module docstring).

    Args:
        u: ``(d, r)`` Householder vectors (any scale; ``hra_u`` as stored).
        apply_gs: peft's ``apply_GS``.

    Returns:
        ``(V, T)`` in fp32 (fp64 for fp64 ``u``): ``V = u`` and upper-triangular ``T: (r, r)`` without
        Gram–Schmidt; ``V = Q`` (orthonormal) and ``T = 2I`` with it. Differentiable (autograd) in ``u``.
    """
    u = u.to(_compute_dtype(u))
    rank = u.shape[-1]
    eye = torch.eye(rank, dtype=u.dtype, device=u.device)
    if apply_gs:
        return householder_gram_schmidt(u), 2 * eye
    gram = u.t() @ u
    # T⁻¹ = striu(G) + diag(G)/2: upper triangular with positive diagonal ‖u_i‖²/2, so always invertible.
    t_inverse = torch.triu(gram, diagonal=1) + torch.diag_embed(torch.diagonal(gram) / 2)
    return u, torch.linalg.solve_triangular(t_inverse, eye, upper=True)


def householder_compose(factors: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """One WY form for the product ``H_1 H_2 ⋯ H_k`` of several WY forms, in the order given.

    Args:
        factors: ``(V_j: (d, r_j), T_j: (r_j, r_j))`` pairs, all of one dtype and device.

    Returns:
        ``(V: (d, Σ r_j), T: (Σ r_j, Σ r_j))`` with ``I − V T Vᵀ = ∏_j (I − V_j T_j V_jᵀ)``.
    """
    if not factors:
        raise ValueError("householder_compose needs at least one (V, T) factor")
    v, t = factors[0]
    for v_next, t_next in factors[1:]:
        coupling = -(t @ (v.t() @ v_next) @ t_next)
        lower = t.new_zeros(t_next.shape[0], t.shape[1])
        t = torch.cat([torch.cat([t, coupling], dim=1), torch.cat([lower, t_next], dim=1)], dim=0)
        v = torch.cat([v, v_next], dim=1)
    return v, t


class _LowRankUpdate(torch.autograd.Function):
    """``y = x − (x V) M Vᵀ`` for ``x: (n, d)``, ``V: (d, k)``, ``M: (k, k)``, as thin products only.

    Backward keeps ``x`` (the one activation-sized tensor, shared with whatever else saved it) and the small
    ``Vᵀ`` and ``M``; it recomputes ``x V`` (``n·d·k``) rather than keep it. With ``a = x V``, ``b = a M``,
    ``c = g V`` and ``e = c Mᵀ``:

        ∂L/∂x = g − e Vᵀ,    ∂L/∂V = −(gᵀ b + xᵀ e),    ∂L/∂M = −aᵀ c.

    Every thin product is computed in its transposed form, with the ``k``-row operand first and row-major:
    ``aᵀ = Vᵀ xᵀ`` rather than ``x V``, ``(∂L/∂V)ᵀ = bᵀ g + eᵀ x`` rather than ``gᵀ b + xᵀ e``. CPU BLAS runs
    these skinny shapes at very different speeds by layout: at ``n = 512, d = 1024, k = 8`` on one thread
    (AVX2), ``x V`` with a row-major ``V`` took 3× and ``xᵀ e`` 10× as long as the forms used here, which read
    ``x`` and ``g`` in place like a LoRA adapter's ``A`` and ``B`` do. ``Vᵀ`` is copied once (``k·d``) so that
    it is row-major. ``x − (·) Vᵀ`` and ``g − (·) Vᵀ`` are one ``addmm`` each: the subtraction rides on the
    product instead of taking another pass over an ``(n, d)`` tensor.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, v: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        v_t = v.t().contiguous()  # (k, d)
        ctx.save_for_backward(x, v_t, m)
        b_t = (m.t() @ v_t) @ x.t()  # bᵀ = Mᵀ Vᵀ xᵀ: (k, n)
        return torch.addmm(x, b_t.t(), v_t, alpha=-1)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        x, v_t, m = ctx.saved_tensors
        grad_x = grad_v = grad_m = None
        c_t = v_t @ grad.t()  # (k, n)
        e_t = m @ c_t  # (k, n)
        if ctx.needs_input_grad[0]:
            grad_x = torch.addmm(grad, e_t.t(), v_t, alpha=-1)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            a_t = v_t @ x.t()  # (k, n), recomputed
            if ctx.needs_input_grad[1]:
                grad_v_t = torch.mm(m.t() @ a_t, grad)  # bᵀ g: (k, d)
                grad_v = grad_v_t.addmm_(e_t, x).neg_().t()
            if ctx.needs_input_grad[2]:
                grad_m = torch.mm(a_t, c_t.t()).neg_()
        return grad_x, grad_v, grad_m


def _low_rank_update(x: torch.Tensor, v: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``x − (x V) M Vᵀ`` over the last dimension of ``x: (..., d)``."""
    if x.shape[-1] != v.shape[0]:
        raise ValueError(
            f"x has {x.shape[-1]} features but the Householder vectors have {v.shape[0]}; the last dimension "
            "of x must be d of V: (d, k)"
        )
    return _LowRankUpdate.apply(x.reshape(-1, x.shape[-1]), v, m).reshape(x.shape)


def householder_rotate_activations(x: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``x Hᵀ`` for ``H = I − V T Vᵀ``: what a layer with merged weight ``W H`` does to its input.

    Derivation: ``y = x (W H)ᵀ + b = (x Hᵀ) Wᵀ + b``, and ``x Hᵀ = x (I − V Tᵀ Vᵀ) = x − (x V) Tᵀ Vᵀ``. So the
    unmerged layer ``base(x Hᵀ)`` equals the merged one, computed with two thin products (no ``d × d``
    matrix); backward keeps only ``x``, ``V`` and ``T`` (see ``_LowRankUpdate``).

    Args:
        x: ``(..., d)``.
        v: ``(d, k)``, in the dtype of ``x``.
        t: ``(k, k)``, in the dtype of ``x``.

    Returns:
        ``(..., d)``, row-major, the dtype of ``x``.
    """
    return _low_rank_update(x, v, t.t())


def householder_rotate_weight(weight: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``W H = W − (W V) T Vᵀ``: peft's merged weight, for ``W: (out, d)`` of ``y = x Wᵀ``.

    Returns:
        ``(out, d)`` such that ``x (W H)ᵀ == householder_rotate_activations(x, v, t) Wᵀ``.
    """
    return _low_rank_update(weight, v, t)


def householder_unrotate_weight(weight: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``W' Hᵀ``, the inverse of :func:`householder_rotate_weight` (``H`` is orthogonal: ``H⁻¹ = Hᵀ``).

    ``H`` is orthogonal to rounding for both of peft's forms (exact reflections, or ``I − 2QQᵀ`` with an
    orthonormal ``Q``), so the transpose undoes a merge up to the rounding of the merge itself.
    """
    return _low_rank_update(weight, v, t.t())


def householder_on_span(v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``H = I − V T Vᵀ`` restricted to ``span(V)``: the small matrix ``B = Pᵀ H P`` in an orthonormal basis ``P``.

    ``H`` maps ``span(V)`` into itself and is the identity on its orthogonal complement, so everything
    inspection asks of the ``d × d`` matrix is in ``B``: its eigenvalues are ``B``'s and ``d − k`` ones,
    ``‖HᵀH − I‖₂ = ‖BᵀB − I‖₂`` and ``‖H − I‖_F = ‖B − I‖_F``. With ``V = P R`` (reduced QR),
    ``B = I − R T Rᵀ``: ``d·k²`` work instead of the ``d³`` of an eigendecomposition of ``H``. A rank-deficient
    ``V`` (HRA's identity initialisation pairs equal vectors) is fine: ``span(P)`` then also holds directions
    orthogonal to ``span(V)``, on which ``B`` is the identity, as ``H`` is.

    Args:
        v: ``(d, k)``.
        t: ``(k, k)``.

    Returns:
        ``B: (m, m)`` with ``m = min(d, k)``, in the dtype of ``v``.
    """
    r = torch.linalg.qr(v, mode="r").R  # (m, k)
    return torch.eye(r.shape[0], dtype=v.dtype, device=v.device) - r @ t @ r.t()


def householder_dense(u: torch.Tensor, apply_gs: bool = False) -> torch.Tensor:
    """peft's dense ``(d, d)`` matrix ``H`` (merged weight ``W H``), for inspection and tests only.

    Built another way than :func:`householder_wy`: as the product of the ``r`` dense reflections
    ``I − 2 v_i v_iᵀ`` of the unit vectors, left to right in column order, or as ``I − 2QQᵀ`` with
    Gram–Schmidt. Costs ``r·d²`` multiply-adds (each reflection is applied as a rank-one update).
    """
    u = u.to(_compute_dtype(u))
    d = u.shape[0]
    h = torch.eye(d, dtype=u.dtype, device=u.device)
    if apply_gs:
        q = householder_gram_schmidt(u)
        return h - 2 * q @ q.t()
    for unit in householder_unit_vectors(u).unbind(dim=1):
        h = h - 2 * torch.outer(h @ unit, unit)  # h (I − 2 v vᵀ)
    return h
