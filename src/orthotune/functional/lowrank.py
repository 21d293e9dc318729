"""Low-rank approximation of a weight change, for tools that only read LoRA: ``ΔW ≈ B A``.

A merged orthogonal adapter changes a weight by ``ΔW = W' − W = W(Rᵀ − I)``, which generally has full rank.
Its best rank-``k`` approximation in the Frobenius norm is the truncated SVD (Eckart-Young):
with ``ΔW = U Σ Vᵀ``,

    B = U_k Σ_k^{1/2}   (out, k),        A = Σ_k^{1/2} V_kᵀ   (k, d),        ‖ΔW − B A‖_F = √(Σ_{i>k} σ_i²).

The square root of ``Σ`` is split evenly between the factors so that neither holds all the scale (as a LoRA
adapter's ``lora_B`` and ``lora_A`` would after training).
"""

from __future__ import annotations

import torch


def truncation_errors(singular_values: torch.Tensor) -> torch.Tensor:
    """``‖ΔW − ΔW_k‖_F`` for every rank ``k = 0 … n``, from the ``n`` singular values (any order), in float64.

    Returns:
        ``(n + 1,)``, non-increasing, ``[‖ΔW‖_F, …, 0]``.
    """
    energy = singular_values.double().square().sort(descending=True).values
    # tail[k] = Σ_{i ≥ k} σ_i², summed from the smallest up so that small tails keep their digits.
    tail = energy.flip(0).cumsum(0).flip(0)
    return torch.cat([tail, tail.new_zeros(1)]).sqrt()


def rank_for_tolerance(singular_values: torch.Tensor, max_error: float) -> int:
    """The smallest ``k`` with ``‖ΔW − ΔW_k‖_F ≤ max_error`` (0 when ``‖ΔW‖_F`` itself is within it)."""
    if not max_error >= 0:
        raise ValueError(f"max_error={max_error} must be a non-negative Frobenius norm")
    errors = truncation_errors(singular_values)
    return int((errors > max_error).sum())


def low_rank_factors(
    u: torch.Tensor, singular_values: torch.Tensor, vh: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA factors ``(B, A)`` of the rank-``k`` truncation of ``U Σ Vᵀ`` (``torch.linalg.svd``'s output).

    Args:
        u: ``(out, n)``; singular_values: ``(n,)`` in descending order; vh: ``(n, d)``.
        rank: ``k``, ``0 ≤ k ≤ n``.

    Returns:
        ``B: (out, k)`` and ``A: (k, d)`` with ``B A = U_k Σ_k V_kᵀ``, in the dtype of ``u``.
    """
    available = singular_values.shape[-1]
    if not 0 <= rank <= available:
        raise ValueError(f"rank={rank} must lie in [0, {available}] for a matrix with {available} singular values")
    root = singular_values[:rank].clamp_min(0).sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]
