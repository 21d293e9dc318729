"""Skew-symmetric generators and their packed storage.

A skew-symmetric ``b × b`` matrix ``Q`` (``Qᵀ = -Q``) has ``b(b-1)/2`` free entries: its strict upper
triangle. OFT stores exactly those, row-major in the order of ``torch.triu_indices(b, b, 1)`` (peft's
layout), so an adapter of ``r`` blocks is a ``(r, b(b-1)/2)`` tensor.

BOFT stores unconstrained square matrices ``A`` instead and takes their skew part.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch


def packed_size(block_size: int) -> int:
    """Number of free entries of a ``block_size × block_size`` skew-symmetric matrix."""
    return block_size * (block_size - 1) // 2


def block_size_from_packed(n_elements: int) -> int:
    """Inverse of :func:`packed_size`: the ``b`` with ``b(b-1)/2 == n_elements``.

    Raises:
        ValueError: if ``n_elements`` is not a triangular number.
    """
    b = (1 + math.isqrt(1 + 8 * n_elements)) // 2
    if packed_size(b) != n_elements:
        raise ValueError(
            f"n_elements={n_elements} is not b(b-1)/2 for any block size b; "
            "a packed OFT row must hold the strict upper triangle of a square block"
        )
    return b


@functools.cache
def _skew_gather_index(block_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each entry of a flattened ``b × b`` skew matrix comes from in ``[0, packed, -packed]``, and the
    flat positions of the strict upper triangle (in packed order)."""
    rows, cols = torch.triu_indices(block_size, block_size, 1)
    count = rows.numel()
    source = torch.zeros(block_size, block_size, dtype=torch.long)
    source[rows, cols] = torch.arange(1, count + 1)
    source[cols, rows] = torch.arange(count + 1, 2 * count + 1)
    return source.view(-1).to(device), (rows * block_size + cols).to(device)


class _SkewFromPacked(torch.autograd.Function):
    """One gather forward; backward reads the upper triangle of ``G - Gᵀ`` (autograd's rule for an index_put
    into zeros followed by ``U - Uᵀ`` took four kernels and a scatter)."""

    @staticmethod
    def forward(ctx: Any, packed: torch.Tensor, block_size: int) -> torch.Tensor:
        # Compiled graphs make the index themselves (dynamo traces past an lru_cache, with a warning).
        index = _skew_gather_index.__wrapped__ if torch.compiler.is_compiling() else _skew_gather_index
        source, upper = index(block_size, packed.device)
        ctx.save_for_backward(upper)
        ctx.block_size = block_size
        padded = torch.cat([packed.new_zeros(*packed.shape[:-1], 1), packed, -packed], dim=-1)
        return padded.index_select(-1, source).view(*packed.shape[:-1], block_size, block_size)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (upper,) = ctx.saved_tensors
        antisymmetric = grad - grad.transpose(-1, -2)
        return antisymmetric.reshape(*grad.shape[:-2], -1).index_select(-1, upper), None


def skew_from_packed(packed: torch.Tensor, block_size: int) -> torch.Tensor:
    """Unpack strict upper triangles into skew-symmetric matrices.

    Args:
        packed: ``(..., b(b-1)/2)``, row-major order of ``torch.triu_indices(b, b, 1)``.
        block_size: ``b``.

    Returns:
        ``(..., b, b)`` with ``Q[i, j] = packed[k]`` for the ``k``-th pair ``i < j`` and ``Q[j, i] = -Q[i, j]``.
    """
    if packed.shape[-1] != packed_size(block_size):
        raise ValueError(
            f"packed has {packed.shape[-1]} entries per block but block_size={block_size} needs "
            f"{packed_size(block_size)}; pass the block size the parameters were made for"
        )
    return _SkewFromPacked.apply(packed, block_size)


def packed_from_skew(skew: torch.Tensor) -> torch.Tensor:
    """Strict upper triangles of ``(..., b, b)`` matrices, ``(..., b(b-1)/2)``: inverse of :func:`skew_from_packed`."""
    b = skew.shape[-1]
    rows, cols = torch.triu_indices(b, b, 1, device=skew.device)
    return skew[..., rows, cols]


def skew_part(square: torch.Tensor) -> torch.Tensor:
    """``(A - Aᵀ) / 2`` for ``(..., b, b)`` matrices: the skew-symmetric part of an unconstrained matrix."""
    return 0.5 * (square - square.transpose(-1, -2))


def boft_generators(square: torch.Tensor) -> torch.Tensor:
    """BOFT's generators ``Q = (Aᵀ - A)/2`` of stored matrices ``A`` ``(..., b, b)``.

    The sign is the one under which peft's ``boft_R`` files mean the same rotation with this library's Cayley
    convention (peft computes ``(I - S)(I + S)⁻¹`` with ``S = (A - Aᵀ)/2``, which is ``R(-S)``).
    """
    return skew_part(square.transpose(-1, -2))
