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

from orthotune.functional.precision import multiplies_natively

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


def _block_product(x: torch.Tensor, blocks: torch.Tensor, row_major: bool) -> torch.Tensor:
    """``x R`` for ``x: (m, D·b)``, one batched matmul over the ``D`` blocks, no autograd.

    ``row_major=False`` computes the transpose, ``R_jᵀ x_jᵀ`` for every block, into a contiguous ``(D·b, m)``
    buffer and returns its transposed view: an ``(m, D·b)`` tensor in column-major layout, which a linear
    layer's matmul reads as it is (BLAS takes a transpose flag). ``row_major=True`` writes ``x_j R_j`` for every
    block straight into its place in a row-major ``(m, D, b)`` buffer. Neither copies ``x`` into a block-major
    layout; both read it in place as a strided ``(D, m, b)`` batch. Blocks in a wider dtype than ``x`` make the
    product run in the blocks' dtype, the result rounded back to ``x``'s.
    """
    rows, width = x.shape
    num_blocks = blocks.shape[0]
    work = _block_view(x.to(blocks.dtype), num_blocks)
    if row_major:
        if torch.compiler.is_compiling():  # dynamo takes no strided out=; the copy is inductor's to fuse
            return torch.bmm(work, blocks).transpose(0, 1).reshape(rows, width).to(x.dtype)
        out = work.new_empty(rows, num_blocks, width // num_blocks)
        torch.bmm(work, blocks, out=out.transpose(0, 1))
        return out.view(rows, width).to(x.dtype)
    transposed = torch.bmm(blocks.transpose(1, 2), work.transpose(1, 2))
    return transposed.view(width, rows).t().to(x.dtype)  # .to keeps the column-major strides


class _BlockDiagonalProduct(torch.autograd.Function):
    """:func:`_block_product` with a hand-written backward that copies nothing activation-sized but the result.

    Backward reads both ``x`` and the gradient in place as strided ``(D, ·, ·)`` batches and writes the input
    gradient straight into a row-major buffer, so that the rest of the model sees the usual layout. Autograd's
    own rule for a view-bmm-view chain multiplied block by block with a copy per block, and reshaping a
    column-major gradient into blocks would copy it (an activation-sized buffer at the backward peak). Only
    ``x`` itself is saved, so layers that share an input (``q``, ``k``, ``v``) share what backward keeps; with
    blocks in a wider dtype (fp32 blocks for bf16 activations where bf16 matmuls are emulated, see
    :mod:`~orthotune.functional.precision`) backward upcasts the saved ``x`` again rather than keeping an fp32
    copy of it.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, blocks: torch.Tensor, row_major: bool) -> torch.Tensor:
        ctx.save_for_backward(x, blocks)
        return _block_product(x, blocks, row_major)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x, blocks = ctx.saved_tensors
        num_blocks = blocks.shape[0]
        rows, width = x.shape
        grad = grad.to(blocks.dtype)
        # G_jᵀ as a (D, b, m) batch. A matmul after a column-major product hands back its gradient column-major,
        # whose transpose is contiguous (D, b, m) blocks; a row-major gradient is read strided.
        if grad.t().is_contiguous():
            grad_t = grad.t().view(num_blocks, -1, rows)
        else:
            grad_t = _block_view(grad, num_blocks).transpose(1, 2)
        grad_x = grad_blocks = None
        if ctx.needs_input_grad[0]:
            if torch.is_grad_enabled() or torch.compiler.is_compiling():  # out= is neither differentiable nor
                # traceable with strides: G_j R_jᵀ per block, then one copy into the row-major layout
                grad_x = torch.bmm(grad_t.transpose(1, 2), blocks.transpose(1, 2)).transpose(0, 1).reshape(x.shape)
            else:  # G_j R_jᵀ written block by block into its place in a row-major (m, D, b) buffer
                grad_x = grad.new_empty(rows, num_blocks, width // num_blocks)
                torch.bmm(grad_t.transpose(1, 2), blocks.transpose(1, 2), out=grad_x.transpose(0, 1))
                grad_x = grad_x.view(rows, width)
            grad_x = grad_x.to(x.dtype)
        if ctx.needs_input_grad[1]:
            # x_jᵀ G_j = (G_jᵀ x_j)ᵀ: this operand order reads both strided batches fastest (measured ~1.5x).
            grad_blocks = torch.bmm(grad_t, _block_view(x.to(blocks.dtype), num_blocks)).transpose(1, 2)
        return grad_x, grad_blocks, None


#: Up to this many rows, a no-grad product takes the path with the fewest kernels (:func:`_few_rows_product`).
FEW_ROWS = 16


def _few_rows_product(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``x R`` for at most :data:`FEW_ROWS` rows (any leading shape), row-major, no autograd, untiled.

    Token-by-token generation calls this once per token and adapted layer, where the number of kernels, not
    their arithmetic, sets the cost; a product of a few rows gains nothing from tiling narrow blocks.
    """
    work = x if x.dtype == blocks.dtype else x.to(blocks.dtype)
    rows = x.numel() // x.shape[-1]
    if rows == 1:
        out = torch.bmm(work.reshape(blocks.shape[0], 1, -1), blocks).view(x.shape)
    else:
        by_block = work.reshape(rows, blocks.shape[0], -1).transpose(0, 1)
        # reshape may keep the transposed strides (a block size of 1 does): row-major is promised
        out = torch.bmm(by_block, blocks).transpose(0, 1).reshape(x.shape).contiguous()
    return out if out.dtype == x.dtype else out.to(x.dtype)


def _block_view(x: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """``(m, D·b) → (D, m, b)``, a view where ``x`` allows: block index first, as ``bmm`` wants its batch."""
    return x.reshape(x.shape[0], num_blocks, -1).transpose(0, 1)


def rotate_activations(x: torch.Tensor, blocks: torch.Tensor, row_major: bool | None = True) -> torch.Tensor:
    """``x R`` for block-diagonal ``R``.

    Args:
        x: ``(..., D·b)``.
        blocks: ``(D, b, b)``, or ``(1, b, b)`` for one block shared over the width; in the dtype of ``x``, or in
            a wider one to multiply in (see :func:`~orthotune.functional.precision.rotation_compute_dtype`).
        row_major: ``True`` gives a contiguous result, ``False`` a column-major one (with more than one block,
            see ``_block_product``), which a matmul reads as it is; neither makes a copy. ``None`` picks for
            a matmul that follows: column-major when a gradient flows back through the result and the device
            multiplies ``x``'s dtype natively (the transposed product reads the gradient the base layer hands
            back fastest), row-major otherwise: without a gradient the row-major product is the faster one for
            the few rows of token-by-token generation (~2× at one row), and where bf16 matmuls are emulated (an
            AVX2 CPU) torch's fallback bf16 GEMM ran ~10× slower on a column-major input at d = 1024, in forward
            and in the input-gradient product alike (BENCHMARKS.md).

    Returns:
        ``(..., D·b)``, the dtype of ``x``.
    """
    num_blocks, block_size, _ = blocks.shape
    if num_blocks == 1 and blocks.dtype == x.dtype:
        return (x.reshape(-1, block_size) @ blocks[0]).reshape(x.shape)
    if num_blocks == 1 and x.shape[-1] % block_size == 0:
        # A shared block in a wider dtype: repeat it (a view) so that the product, not autograd, keeps x.
        num_blocks = x.shape[-1] // block_size
        blocks = blocks.expand(num_blocks, -1, -1)
    if x.shape[-1] != num_blocks * block_size:
        raise ValueError(
            f"x has {x.shape[-1]} features but the rotation has {num_blocks} blocks of {block_size}; "
            "the last dimension of x must be num_blocks * block_size"
        )
    gradient_flows = torch.is_grad_enabled() and (x.requires_grad or blocks.requires_grad)
    if row_major is None:
        row_major = not gradient_flows or not multiplies_natively(x.device, x.dtype)
    if row_major and not gradient_flows and x.numel() <= FEW_ROWS * x.shape[-1]:
        return _few_rows_product(x, blocks)
    if block_size < TILE_WIDTH:
        blocks = tile_blocks(blocks)
    rows = x.reshape(-1, x.shape[-1])
    if gradient_flows:
        rotated = _BlockDiagonalProduct.apply(rows, blocks, row_major)
    else:  # inference: the autograd.Function's own overhead is most of the cost of a one-token call
        rotated = _block_product(rows, blocks, row_major)
    return rotated.reshape(x.shape)


def rotate_samples(x: torch.Tensor, blocks: list[torch.Tensor]) -> torch.Tensor:
    """``x_i R_i`` for every sample ``i`` of ``x`` (its first dimension), each by its own block-diagonal rotation.

    One batched product for the whole batch: for a mixed-adapter batch of a few rows (generation), where one
    product per adapter would cost a kernel launch and a gather per group. The blocks of all samples are
    stacked, so memory grows with the batch: meant for small batches.

    Args:
        x: ``(N, ..., D·b)``.
        blocks: ``N`` tensors ``(D, b, b)`` (views welcome: an expanded shared block, an expanded identity), all in
            one dtype, the dtype of ``x`` or a wider one to multiply in.

    Returns:
        ``(N, ..., D·b)`` in the dtype of ``x``.
    """
    stacked = torch.stack(blocks)  # (N, D, b, b)
    samples, num_blocks, block_size, _ = stacked.shape
    if samples != x.shape[0] or num_blocks * block_size != x.shape[-1]:
        raise ValueError(
            f"x of shape {tuple(x.shape)} needs one (D, b, b) rotation per sample with D·b = {x.shape[-1]}; "
            f"got {samples} of shape {tuple(stacked.shape[1:])}"
        )
    work = x if x.dtype == stacked.dtype else x.to(stacked.dtype)
    rows = x[0].numel() // x.shape[-1]
    if rows == 1:
        out = torch.bmm(work.reshape(samples * num_blocks, 1, block_size), stacked.view(-1, block_size, block_size))
        out = out.view(x.shape)
    else:
        by_block = work.reshape(samples, rows, num_blocks, block_size).transpose(1, 2)  # (N, D, rows, b)
        out = torch.matmul(by_block, stacked).transpose(1, 2).reshape(x.shape)
    return out if out.dtype == x.dtype else out.to(x.dtype)


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
