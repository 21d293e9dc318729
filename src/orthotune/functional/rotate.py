"""Block-diagonal rotations, applied to activations or to weights without building ``d × d`` matrices.

A block-diagonal rotation ``R = diag(R_1, …, R_D)`` of ``D`` blocks of size ``b`` acts on a row vector
``x = [x_1 … x_D]`` as ``x R = [x_1 R_1 … x_D R_D]``. One shared block (OFT's ``block_share``) is passed as a
``(1, b, b)`` tensor and repeated over the whole width.

For a linear layer ``y = x Wᵀ`` (``W`` of shape ``(out, d)``) the input-centric form ``y = (x R) Wᵀ`` costs
``n·d·b`` extra multiply-adds per ``n`` tokens, against ``n·d·out`` for the layer itself; the equivalent
weight-centric form ``W ↦ W Rᵀ`` (used for merging) costs ``out·d·b``.

A rotation of a layer's *outputs* (LyCORIS's ``diag-oft``), with an optional per-output scale ``s``, is the same
product on the other side: the outputs ``y = x Wᵀ`` become ``(y R) ⊙ s``, which is an activation rotation of
``y`` (:func:`rotate_outputs`), and the weight merges as ``W ↦ s ⊙ (Rᵀ W)``, ``s`` scaling rows
(:func:`rotate_weight_outputs`): ``x (s ⊙ Rᵀ W)ᵀ = (x Wᵀ R) ⊙ s``.
"""

from __future__ import annotations

from typing import Any

import torch

#: Blocks narrower than this are multiplied as block-diagonal tiles of about this width: a batched matmul of
#: many tiny (say 8 × 8) matrices runs at a fraction of the speed of fewer 32 × 32 ones, and the extra zeros
#: cost far less than they save.
TILE_WIDTH = 32


def tile_blocks(blocks: torch.Tensor, width: int = TILE_WIDTH) -> torch.Tensor:
    """Group ``(D, b, b)`` blocks into ``(D/k, k·b, k·b)`` block-diagonal tiles, ``k·b ≤ width`` (``k | D``).

    The tiled rotation is the same matrix: ``rotate_activations(x, tile_blocks(B)) == rotate_activations(x, B)``.
    """
    num_blocks, block_size, _ = blocks.shape
    per_tile = max(k for k in range(1, max(1, width // block_size) + 1) if num_blocks % k == 0)
    if per_tile == 1:
        return blocks
    diagonal = torch.arange(per_tile, device=blocks.device)
    tiles = blocks.new_zeros(num_blocks // per_tile, per_tile, block_size, per_tile, block_size)
    tiles[:, diagonal, :, diagonal, :] = blocks.view(-1, per_tile, block_size, block_size).transpose(0, 1)
    return tiles.view(num_blocks // per_tile, per_tile * block_size, per_tile * block_size)


class _BlockDiagonalProduct(torch.autograd.Function):
    """``x R`` for ``x: (m, D·b)`` and blocks ``(D, b, b)``, as one batched matmul over blocks, without copies.

    Forward computes the transpose, ``(x R)ᵀ`` block by block (``R_jᵀ x_jᵀ``), into a contiguous ``(D·b, m)``
    buffer and returns its transposed view: an ``(m, D·b)`` tensor in column-major layout, which a linear
    layer's matmul reads as it is (BLAS takes a transpose flag), so neither the input nor the output is copied
    into a block-major layout. Backward reads both ``x`` and the gradient in place as strided ``(D, ·, ·)``
    batches; only the input gradient is made row-major again, so that the rest of the model sees the usual
    layout. Autograd's own rule for a view-bmm-view chain multiplied block by block with a copy per block, and
    reshaping the column-major gradient into blocks would copy it (an activation-sized buffer at the backward
    peak). Only ``x`` itself is saved, so layers that share an input (``q``, ``k``, ``v``) share what backward
    keeps.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, blocks)
        rows, width = x.shape
        transposed = torch.bmm(blocks.transpose(1, 2), _block_view(x, blocks.shape[0]).transpose(1, 2))
        return transposed.view(width, rows).t()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        x, blocks = ctx.saved_tensors
        num_blocks = blocks.shape[0]
        # The base layer's matmul hands back the gradient in the layout of its input, column-major: read its
        # transpose as contiguous (D, b, m) blocks. A row-major gradient is read as a strided view instead.
        if grad.t().is_contiguous():
            grad_by_block = grad.t().view(num_blocks, -1, grad.shape[0]).transpose(1, 2)
        else:
            grad_by_block = _block_view(grad, num_blocks)
        grad_x = grad_blocks = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.bmm(grad_by_block, blocks.transpose(1, 2)).transpose(0, 1).reshape(x.shape)
        if ctx.needs_input_grad[1]:
            grad_blocks = torch.bmm(_block_view(x, num_blocks).transpose(1, 2), grad_by_block)
        return grad_x, grad_blocks


def _block_view(x: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """``(m, D·b) → (D, m, b)``, a view where ``x`` allows: block index first, as ``bmm`` wants its batch."""
    return x.reshape(x.shape[0], num_blocks, -1).transpose(0, 1)


def rotate_activations(x: torch.Tensor, blocks: torch.Tensor, row_major: bool = True) -> torch.Tensor:
    """``x R`` for block-diagonal ``R``.

    Args:
        x: ``(..., D·b)``.
        blocks: ``(D, b, b)``, or ``(1, b, b)`` for one block shared over the width.
        row_major: ``False`` lets the result come in the layout the product leaves it in, column-major with
            more than one block (see ``_BlockDiagonalProduct``), which a matmul reads as it is; the layers use
            that to save a copy. ``True`` gives a contiguous tensor.

    Returns:
        ``(..., D·b)``, the dtype of ``x`` (``blocks`` should be cast to it beforehand).
    """
    num_blocks, block_size, _ = blocks.shape
    if num_blocks == 1:
        return (x.reshape(-1, block_size) @ blocks[0]).reshape(x.shape)
    if x.shape[-1] != num_blocks * block_size:
        raise ValueError(
            f"x has {x.shape[-1]} features but the rotation has {num_blocks} blocks of {block_size}; "
            "the last dimension of x must be num_blocks * block_size"
        )
    if block_size < TILE_WIDTH:
        blocks = tile_blocks(blocks)
    rotated = _BlockDiagonalProduct.apply(x.reshape(-1, x.shape[-1]), blocks).reshape(x.shape)
    return rotated.contiguous() if row_major else rotated


def rotate_weight(weight: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``W Rᵀ``: merge the rotation into a weight used as ``y = x Wᵀ``.

    Args:
        weight: ``(out, D·b)``.
        blocks: ``(D, b, b)`` or ``(1, b, b)``.

    Returns:
        ``(out, D·b)`` such that ``x (W Rᵀ)ᵀ == (x R) Wᵀ``.
    """
    return rotate_activations(weight, blocks.transpose(-1, -2))


def unrotate_weight(weight: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rotate_weight`: ``W' (Rᵀ)⁻¹``, by a linear solve per block.

    For an exactly orthogonal ``R`` this equals ``W' R``; solving keeps unmerge exact also for the slightly
    non-orthogonal rotations of a truncated Neumann series.
    """
    num_blocks, block_size, _ = blocks.shape
    by_block = weight.reshape(-1, weight.shape[-1] // block_size, block_size).transpose(0, 1)
    restored = torch.linalg.solve(blocks.transpose(-1, -2), by_block, left=False)
    return restored.transpose(0, 1).reshape(weight.shape)


def block_diagonal(blocks: torch.Tensor, num_blocks: int | None = None) -> torch.Tensor:
    """The dense ``(D·b, D·b)`` matrix of a block-diagonal rotation (for merging and inspection only).

    Args:
        blocks: ``(D, b, b)``, or ``(1, b, b)`` repeated ``num_blocks`` times.
        num_blocks: total number of blocks; defaults to ``blocks.shape[0]``.
    """
    if num_blocks is None:
        num_blocks = blocks.shape[0]
    eye = torch.eye(num_blocks * blocks.shape[-1], dtype=blocks.dtype, device=blocks.device)
    return rotate_activations(eye, blocks)


def _scaled_blocks(blocks: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """Blocks of ``R diag(s)``: scaling the outputs of a block product scales the columns of each block."""
    if scale is None:
        return blocks
    block_size = blocks.shape[-1]
    num_blocks = scale.shape[-1] // block_size
    return blocks.expand(num_blocks, -1, -1) * scale.reshape(num_blocks, 1, block_size)


def rotate_outputs(y: torch.Tensor, blocks: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """``(y R) ⊙ s``: rotate a layer's outputs by a block-diagonal ``R``, then scale each output.

    The same product as :func:`rotate_activations` (the scale is folded into the blocks' columns), returned
    row-major, since what reads a layer's outputs may assume that layout.

    Args:
        y: ``(..., D·b)`` outputs of a layer.
        blocks: ``(D, b, b)``, or ``(1, b, b)`` for one block shared over the width, in the dtype of ``y``.
        scale: ``(D·b,)`` per-output scale ``s``, or ``None``.

    Returns:
        ``(..., D·b)``, contiguous.
    """
    return rotate_activations(y, _scaled_blocks(blocks, scale), row_major=True)


def rotate_weight_outputs(
    weight: torch.Tensor, blocks: torch.Tensor, scale: torch.Tensor | None = None
) -> torch.Tensor:
    """``s ⊙ (Rᵀ W)``: merge an output rotation (and scale) into a weight used as ``y = x Wᵀ``.

    Args:
        weight: ``(D·b, d)``, one row per output (a Conv2d weight flattened to ``(out, in·kh·kw)``).
        blocks: ``(D, b, b)`` or ``(1, b, b)``.
        scale: ``(D·b,)`` or ``None``.

    Returns:
        ``(D·b, d)`` such that ``x (s ⊙ Rᵀ W)ᵀ == rotate_outputs(x Wᵀ, R, s)``.
    """
    outputs, features = weight.shape
    block_size = blocks.shape[-1]
    by_block = weight.reshape(outputs // block_size, block_size, features)
    rotated = torch.matmul(_scaled_blocks(blocks, scale).transpose(-1, -2), by_block)
    return rotated.reshape(outputs, features)


def unrotate_weight_outputs(
    weight: torch.Tensor, blocks: torch.Tensor, scale: torch.Tensor | None = None
) -> torch.Tensor:
    """Inverse of :func:`rotate_weight_outputs`: ``(Rᵀ)⁻¹ (W' / s)``, by a linear solve per block.

    A solve rather than ``R W' / s`` keeps unmerge exact also for the slightly non-orthogonal rotations of a
    truncated Neumann series.
    """
    outputs, features = weight.shape
    block_size = blocks.shape[-1]
    if scale is not None:
        weight = weight / scale.reshape(outputs, 1)
    by_block = weight.reshape(outputs // block_size, block_size, features)
    return torch.linalg.solve(blocks.transpose(-1, -2), by_block).reshape(outputs, features)
