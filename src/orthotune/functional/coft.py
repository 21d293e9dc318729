"""Constrained OFT (COFT): keep each generator inside a Frobenius ball.

COFT (Qiu et al., 2023, §3.3) bounds how far a rotation may move from the identity by keeping each block's
skew generator ``Q`` within ``‖Q‖_F ≤ ε``. peft uses the radius ``eps / √r`` for ``r`` separate blocks and
``eps`` for one shared block; so do we.

peft projects by writing into the parameter inside ``forward`` (which breaks FSDP's sharded parameters and
``torch.compile``). Here the projection is a pure, differentiable function of the parameter, applied on the
way to the Cayley transform: outputs are the same for the same stored parameters, and the stored parameter
is never modified.
"""

from __future__ import annotations

import math

import torch


def coft_radius(eps: float, num_stored_blocks: int) -> float:
    """peft's radius for ``num_stored_blocks`` stored generators: ``eps / √num_stored_blocks``."""
    return eps / math.sqrt(num_stored_blocks)


def project_coft(packed: torch.Tensor, eps: float) -> torch.Tensor:
    """COFT-project ``(r, b(b-1)/2)`` packed generators with peft's radius for ``r`` stored rows.

    The radius is ``eps / √r`` (``eps`` for one shared block): see :func:`coft_radius`.
    """
    return project_to_ball(packed, coft_radius(eps, packed.shape[0]))


def project_to_ball(packed: torch.Tensor, radius: float) -> torch.Tensor:
    """Scale each packed generator so that its skew matrix has ``‖Q‖_F ≤ radius``.

    Args:
        packed: ``(..., b(b-1)/2)`` packed strict upper triangles; ``‖Q‖_F = √2 ‖packed‖₂``.
        radius: the bound on ``‖Q‖_F``.

    Returns:
        ``packed`` where inside the ball, ``packed · radius / ‖Q‖_F`` where outside.
    """
    frobenius = math.sqrt(2.0) * torch.linalg.vector_norm(packed, dim=-1, keepdim=True)
    # clamp_min keeps the gradient finite at Q = 0, where the factor is 1 anyway.
    return packed * torch.clamp(radius / frobenius.clamp_min(torch.finfo(packed.dtype).tiny), max=1.0)
