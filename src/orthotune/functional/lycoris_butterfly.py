"""LyCORIS's butterfly rotation (its ``boft`` algorithm), which rotates a layer's *outputs*.

LyCORIS 4.1.3 mixes ``d`` outputs in ``m`` stages. Stage ``i`` (``i = 0 … m-1``, in that order) splits the width
into chunks of ``2k`` features, ``k = 2^i · b/2``, interleaves each chunk's two halves (a chunk read as a
``(2, k)`` grid, transposed to ``(k, 2)``), rotates consecutive groups of ``b`` features by that stage's blocks,
and undoes the interleave. As a row vector::

    y ↦ y M,        M = F_0 F_1 ⋯ F_{m-1},        F_i = P_i B_i P_iᵀ,

``B_i`` block-diagonal with ``D = d/b`` blocks and ``P_i`` the interleave. Unlike peft's butterfly
(:mod:`~orthotune.functional.butterfly`), stage 0 is interleaved too (it pairs feature ``j`` with ``j + b/2``),
the stages run from the finest to the coarsest, and nothing is built as an index or a matrix: every
permutation here is a reshape and a transpose, as in LyCORIS.

The blocks ``B_i`` are in this library's convention (``z ↦ z B`` on a row ``z`` of ``b`` features). LyCORIS's own
``get_r`` blocks ``r`` act as ``z ↦ z rᵀ``, so ``B = rᵀ``; :mod:`orthotune.formats.lycoris` converts its files.

Merged (LyCORIS's ``make_weight``): a weight ``W`` of ``y = x Wᵀ`` becomes ``s ⊙ (Mᵀ W)``, ``s`` scaling rows.
"""

from __future__ import annotations

import torch

from orthotune.functional.rotate import rotate_activations


def lycoris_butterfly_fits(features: int, block_size: int, num_factors: int) -> bool:
    """Whether ``num_factors`` LyCORIS stages of blocks of ``block_size`` fit ``features``.

    Every stage interleaves halves of blocks, so ``b`` is even, and the last stage's chunk ``b · 2^(m-1)``
    divides the width.
    """
    if block_size < 2 or block_size % 2 or num_factors < 1:
        return False
    return features % (block_size * 2 ** (num_factors - 1)) == 0


def lycoris_butterfly_max_factors(features: int, block_size: int) -> int:
    """The most stages that fit (LyCORIS makes ``log2(D) + 1`` for ``D = d/b`` blocks, a power of two)."""
    factors = 0
    while lycoris_butterfly_fits(features, block_size, factors + 1):
        factors += 1
    return factors


def _check(features: int, blocks: torch.Tensor) -> None:
    num_factors, num_blocks, block_size, _ = blocks.shape
    if num_blocks * block_size != features or not lycoris_butterfly_fits(features, block_size, num_factors):
        raise ValueError(
            f"LyCORIS butterfly blocks of shape {tuple(blocks.shape)} do not fit {features} features: the blocks "
            f"must cover the width (num_blocks · block_size) with an even block_size, and block_size · "
            f"2^(factors-1) must divide it (here at most {lycoris_butterfly_max_factors(features, block_size)} "
            "factors)"
        )


def _interleave(x: torch.Tensor, half: int) -> torch.Tensor:
    """``x P_i``: each chunk of ``2·half`` features, read as ``(2, half)``, becomes ``(half, 2)`` (a copy)."""
    return x.unflatten(-1, (-1, 2, half)).transpose(-2, -1).flatten(-3)


def _deinterleave(x: torch.Tensor, half: int) -> torch.Tensor:
    """``x P_iᵀ``, the inverse of :func:`_interleave`."""
    return x.unflatten(-1, (-1, half, 2)).transpose(-2, -1).flatten(-3)


def _half(block_size: int, factor: int) -> int:
    return 2**factor * (block_size // 2)


def lycoris_butterfly_rotate_activations(
    y: torch.Tensor, blocks: torch.Tensor, scale: torch.Tensor | None = None
) -> torch.Tensor:
    """``(y M) ⊙ s`` for LyCORIS's butterfly ``M``, stage by stage, reshapes only.

    Args:
        y: ``(..., d)``, e.g. a layer's outputs.
        blocks: ``(m, D, b, b)`` orthogonal blocks of each stage (this library's convention), in the dtype of
            ``y``.
        scale: ``(d,)`` per-feature scale ``s`` applied after the rotation, or ``None``. It is folded into the
            last stage's blocks, which saves a pass over ``y``.

    Returns:
        ``(..., d)``, contiguous.
    """
    _check(y.shape[-1], blocks)
    num_factors, _, block_size, _ = blocks.shape
    for factor in range(num_factors):
        half = _half(block_size, factor)
        stage = blocks[factor]
        if scale is not None and factor == num_factors - 1:
            # (z B) P_iᵀ ⊙ s = (z B diag(s P_i)) P_iᵀ: the scale, interleaved, scales the blocks' columns.
            stage = stage * _interleave(scale, half).reshape(stage.shape[0], 1, block_size)
        rotated = rotate_activations(_interleave(y, half), stage, row_major=False)
        y = _deinterleave(rotated, half)
    return y.contiguous()


def lycoris_butterfly_unrotate_activations(
    y: torch.Tensor, blocks: torch.Tensor, scale: torch.Tensor | None = None
) -> torch.Tensor:
    """Inverse of :func:`lycoris_butterfly_rotate_activations`: ``(y / s) M⁻¹``, a linear solve per block.

    Solving rather than multiplying by the transposes keeps the inverse exact also for blocks that are
    orthogonal only to rounding.
    """
    _check(y.shape[-1], blocks)
    num_factors, num_blocks, block_size, _ = blocks.shape
    if scale is not None:
        y = y / scale
    for factor in reversed(range(num_factors)):
        half = _half(block_size, factor)
        z = _interleave(y, half)
        by_block = z.reshape(-1, num_blocks, block_size).transpose(0, 1)
        restored = torch.linalg.solve(blocks[factor], by_block, left=False)  # z B⁻¹, block by block
        y = _deinterleave(restored.transpose(0, 1).reshape(z.shape), half)
    return y.contiguous()


def lycoris_butterfly_rotate_weight(
    weight: torch.Tensor, blocks: torch.Tensor, scale: torch.Tensor | None = None
) -> torch.Tensor:
    """``s ⊙ (Mᵀ W)``: merge the output rotation into a weight ``(d, in)`` used as ``y = x Wᵀ``.

    Then ``x (s ⊙ Mᵀ W)ᵀ == lycoris_butterfly_rotate_activations(x Wᵀ, blocks, s)``: the outputs of ``W`` are
    the columns of ``Wᵀ``, rotated like activations.
    """
    return lycoris_butterfly_rotate_activations(weight.t(), blocks, scale).t().contiguous()


def lycoris_butterfly_unrotate_weight(
    weight: torch.Tensor, blocks: torch.Tensor, scale: torch.Tensor | None = None
) -> torch.Tensor:
    """Inverse of :func:`lycoris_butterfly_rotate_weight`, by linear solves (exact for unmerging)."""
    return lycoris_butterfly_unrotate_activations(weight.t(), blocks, scale).t().contiguous()


def lycoris_butterfly_dense(blocks: torch.Tensor) -> torch.Tensor:
    """The dense ``(d, d)`` matrix ``M`` (inspection and tests only): ``I M``."""
    features = blocks.shape[1] * blocks.shape[2]
    eye = torch.eye(features, dtype=blocks.dtype, device=blocks.device)
    return lycoris_butterfly_rotate_activations(eye, blocks)
