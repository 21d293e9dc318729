"""Multiplicative dropout for orthogonal blocks (BOFT paper, §3.4).

Additive dropout would break orthogonality; instead, during training a random set of whole blocks is
replaced by the identity, so the rotation stays orthogonal and a dropped block simply does not rotate.
As in peft, exactly ``floor(p · D)`` of the ``D`` blocks are dropped per call. Everything stays on the
tensor side (no ``.item()``), so dropout compiles without graph breaks.
"""

from __future__ import annotations

import torch


def _dropped_blocks(num_blocks: int, p: float, device: torch.device) -> torch.Tensor:
    """``(D,)`` bool mask with exactly ``floor(p · D)`` randomly placed ``True``."""
    ranks = torch.randperm(num_blocks, device=device)
    return ranks < int(p * num_blocks)


def drop_blocks_to_identity(blocks: torch.Tensor, p: float) -> torch.Tensor:
    """Replace ``floor(p · D)`` randomly chosen blocks of ``(D, b, b)`` with the identity.

    Returns:
        ``(D, b, b)``: the kept blocks unchanged (and still differentiable), the dropped ones ``I``.
    """
    dropped = _dropped_blocks(blocks.shape[0], p, blocks.device)
    eye = torch.eye(blocks.shape[-1], dtype=blocks.dtype, device=blocks.device)
    return torch.where(dropped[:, None, None], eye, blocks)


def drop_factor_blocks_to_identity(blocks: torch.Tensor, p: float) -> torch.Tensor:
    """For ``(m, D, b, b)`` butterfly factors: drop ``floor(p · D)`` blocks of one random factor (peft's rule)."""
    num_factors, num_blocks = blocks.shape[:2]
    factor = torch.randint(num_factors, (1,), device=blocks.device)
    in_factor = torch.arange(num_factors, device=blocks.device)[:, None] == factor
    dropped = in_factor & _dropped_blocks(num_blocks, p, blocks.device)[None, :]
    eye = torch.eye(blocks.shape[-1], dtype=blocks.dtype, device=blocks.device)
    return torch.where(dropped[..., None, None], eye, blocks)
