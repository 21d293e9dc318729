"""Multiplicative dropout for orthogonal blocks (BOFT paper, §3.4).

Additive dropout would break orthogonality; instead, during training a random set of whole blocks is
replaced by the identity, so the rotation stays orthogonal and a dropped block simply does not rotate.
As in peft, exactly ``floor(p · D)`` of the ``D`` blocks are dropped per call.
"""

from __future__ import annotations

import torch


def drop_blocks_to_identity(blocks: torch.Tensor, p: float) -> torch.Tensor:
    """Replace ``floor(p · D)`` randomly chosen blocks of ``(D, b, b)`` with the identity.

    Args:
        blocks: ``(D, b, b)`` rotations.
        p: fraction of blocks to drop, in ``[0, 1)``.

    Returns:
        ``(D, b, b)``: the kept blocks unchanged (and still differentiable), the dropped ones ``I``.
    """
    num_blocks = blocks.shape[0]
    num_dropped = int(p * num_blocks)
    if num_dropped == 0:
        return blocks
    dropped = torch.zeros(num_blocks, dtype=torch.bool, device=blocks.device)
    dropped[torch.randperm(num_blocks, device=blocks.device)[:num_dropped]] = True
    eye = torch.eye(blocks.shape[-1], dtype=blocks.dtype, device=blocks.device)
    return torch.where(dropped[:, None, None], eye, blocks)
