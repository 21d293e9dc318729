"""Butterfly products of block-diagonal rotations (BOFT, Liu et al., ICLR 2024).

BOFT's rotation of ``d`` features is a product of ``m`` butterfly factors,

    M = F_{m-1} ⋯ F_1 F_0,        F_i = P_i B_i P_iᵀ,

where each ``B_i`` is block-diagonal with ``D`` orthogonal blocks of size ``b`` and ``P_i`` is a permutation
that makes the blocks of factor ``i`` mix features ``b·2^(i-1)`` apart. Activations are row vectors, ``x ↦ x M``.

The permutations are index vectors (``O(d)`` memory), never ``d × d`` matrices: ``x P_i`` is
``x[..., inverse(p_i)]`` and ``y P_iᵀ`` is ``y[..., p_i]``. Consecutive gathers are composed into one.

``p_i`` is peft 0.21.2's ``block_butterfly_perm``, so the same ``boft_R`` means the same rotation here and
there: within each chunk of ``b·2^i`` features, split into ``2^(i+1)`` groups of ``b/2``, the even groups come
first and the odd groups after. ``p_0`` is always the identity.
"""

from __future__ import annotations

from typing import Any

import torch

from orthotune.functional.rotate import rotate_activations


def butterfly_permutation(features: int, block_size: int, factor: int) -> torch.Tensor:
    """Index vector ``p_factor`` of the butterfly permutation ``P_factor`` (``P[j, p[j]] = 1``).

    Args:
        features: ``d``, a multiple of ``block_size · 2^factor``.
        block_size: ``b``, even when ``factor > 0``.
        factor: ``i ≥ 0``; factor 0 is the identity.

    Returns:
        ``(d,)`` long tensor, a permutation of ``arange(d)``.
    """
    indices = torch.arange(features)
    if factor == 0:
        return indices
    chunk = block_size * 2**factor
    if block_size % 2 or features % chunk:
        raise ValueError(
            f"butterfly factor {factor} needs an even block size dividing features / 2^{factor}; "
            f"got block_size={block_size}, features={features}"
        )
    half = block_size // 2
    groups = chunk // half  # 2^(factor+1) groups of b/2 per chunk: evens first, then odds
    return indices.view(features // chunk, groups // 2, 2, half).transpose(1, 2).reshape(features)


def butterfly_permutations(features: int, block_size: int, num_factors: int) -> torch.Tensor:
    """``(m, d)``: the index vectors of all ``m`` factors (all identities when ``m == 1``, as in peft)."""
    if num_factors == 1:
        return torch.arange(features).unsqueeze(0)
    return torch.stack([butterfly_permutation(features, block_size, i) for i in range(num_factors)])


def _inverse(permutation: torch.Tensor) -> torch.Tensor:
    return torch.argsort(permutation)


class _PermuteFeatures(torch.autograd.Function):
    """``x[..., index]`` whose backward is a gather by the inverse index, not a scatter-add.

    The gradient of a permutation is the inverse permutation; autograd's generic rule for indexing would
    accumulate into zeros instead, several times slower.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index)
        return x.index_select(-1, index)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (index,) = ctx.saved_tensors
        return grad.index_select(-1, _inverse(index)), None


def permute_features(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[..., index]`` for a permutation ``index`` of the last dimension."""
    return _PermuteFeatures.apply(x, index)


def _then(first: torch.Tensor | None, second: torch.Tensor | None) -> torch.Tensor | None:
    """The single gather equal to gathering by ``first`` and then by ``second``."""
    if first is None:
        return second
    if second is None:
        return first
    return first[second]


def _apply_factors(
    x: torch.Tensor, steps: list[tuple[torch.Tensor, torch.Tensor | None]], row_major: bool | None = None
) -> torch.Tensor:
    """Apply ``x ↦ x P B Pᵀ`` for each ``(B, p)`` in order; ``p=None`` marks the identity permutation."""
    pending: torch.Tensor | None = None  # gather owed to x before the next block product
    for blocks, permutation in steps:
        gather = _then(pending, None if permutation is None else _inverse(permutation))
        if gather is not None:
            x = permute_features(x, gather)
        x = rotate_activations(x, blocks, row_major=row_major)
        pending = permutation
    return x if pending is None else permute_features(x, pending)


def _steps(
    blocks: torch.Tensor, permutations: torch.Tensor, transpose: bool
) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    num_factors = blocks.shape[0]
    if permutations.shape[0] != num_factors:
        raise ValueError(
            f"{num_factors} butterfly factors of blocks but {permutations.shape[0]} permutations; "
            "build them with butterfly_permutations(d, b, m) for the same m"
        )
    perms = [None if i == 0 or num_factors == 1 else permutations[i] for i in range(num_factors)]
    if transpose:  # x Mᵀ = x F_0ᵀ F_1ᵀ ⋯ F_{m-1}ᵀ,  F_iᵀ = P_i B_iᵀ P_iᵀ
        return [(blocks[i].transpose(-1, -2), perms[i]) for i in range(num_factors)]
    return [(blocks[i], perms[i]) for i in reversed(range(num_factors))]  # x M = x F_{m-1} ⋯ F_0


def butterfly_rotate_activations(
    x: torch.Tensor, blocks: torch.Tensor, permutations: torch.Tensor, row_major: bool | None = True
) -> torch.Tensor:
    """``x M`` for the butterfly rotation ``M = F_{m-1} ⋯ F_0``, factor by factor.

    Args:
        x: ``(..., d)``.
        blocks: ``(m, D, b, b)`` orthogonal blocks of each factor, in the dtype of ``x`` or a wider one to
            multiply in (as in :func:`~orthotune.functional.rotate_activations`).
        permutations: ``(m, d)`` from :func:`butterfly_permutations`.
        row_major: as in :func:`~orthotune.functional.rotate_activations`, for every factor's product: ``False``
            may leave the result column-major, for a matmul to read without a copy; ``None`` picks by whether a
            gradient flows.

    Returns:
        ``(..., d)``.
    """
    rotated = _apply_factors(x, _steps(blocks, permutations, transpose=False), row_major)
    return rotated.contiguous() if row_major else rotated


def butterfly_rotate_weight(weight: torch.Tensor, blocks: torch.Tensor, permutations: torch.Tensor) -> torch.Tensor:
    """``W Mᵀ`` for a weight ``(out, d)`` used as ``y = x Wᵀ``: then ``x (W Mᵀ)ᵀ == (x M) Wᵀ``."""
    return _apply_factors(weight, _steps(blocks, permutations, transpose=True))


def butterfly_dense(blocks: torch.Tensor, permutations: torch.Tensor) -> torch.Tensor:
    """The dense ``(d, d)`` matrix ``M`` (for merging and inspection only): ``I M``."""
    features = permutations.shape[-1]
    eye = torch.eye(features, dtype=blocks.dtype, device=blocks.device)
    return butterfly_rotate_activations(eye, blocks, permutations)
