"""Constrained OFT (COFT): keep each generator inside a Frobenius ball.

COFT (Qiu et al., 2023, §3.3) bounds how far a rotation may move from the identity by keeping each block's
skew generator ``Q`` within ``‖Q‖_F ≤ ε``. peft uses the radius ``eps / √r`` for ``r`` separate blocks and
``eps`` for one shared block; so do we.

peft projects by writing into the parameter inside ``forward`` (which breaks FSDP's sharded parameters and
``torch.compile``). Here the projection is a pure, differentiable function of the parameter, applied on the
way to the Cayley transform: outputs are the same for the same stored parameters, and the stored parameter
is never modified.

LyCORIS (``diag-oft``, ``boft``) constrains differently: all of a layer's generators *together*,
``‖[Q_1 … Q_r]‖_F ≤ alpha · d`` for a layer rotating ``d`` features (``alpha`` is the ``alpha`` tensor of its
files, ``0`` for no constraint), scaling every generator by the same factor. Its generators are ``A - Aᵀ`` of
its stored matrices, the same matrices as ours (see :mod:`orthotune.formats.lycoris`), so the same norm.
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


#: LyCORIS adds this to the norm before comparing and dividing (``‖Q‖ + 1e-8``); kept so that the same stored
#: generators give the same rotation to the last bit of fp32, also right at the radius.
LYCORIS_NORM_EPS = 1e-8


def lycoris_radius(alpha: float, features: int) -> float:
    """LyCORIS's bound on the joint Frobenius norm of a layer's generators: ``alpha · features`` (0: none)."""
    return alpha * features


def _joint_scale(frobenius: torch.Tensor, radius: float) -> torch.Tensor:
    # LyCORIS scales by radius / (‖Q‖ + eps) exactly when ‖Q‖ + eps > radius; elsewhere the ratio is ≥ 1.
    return torch.clamp(radius / (frobenius + LYCORIS_NORM_EPS), max=1.0)


def project_skew_jointly(skew: torch.Tensor, radius: float) -> torch.Tensor:
    """LyCORIS's constraint on full skew generators ``(..., b, b)``: scale all of them so ``‖Q‖_F ≤ radius``.

    The norm is taken over the whole tensor (every block of every factor). ``radius ≤ 0`` means no constraint.
    """
    if radius <= 0:
        return skew
    return skew * _joint_scale(torch.linalg.vector_norm(skew), radius)


def project_packed_jointly(packed: torch.Tensor, radius: float) -> torch.Tensor:
    """:func:`project_skew_jointly` on packed generators ``(r, b(b-1)/2)`` (``‖Q‖_F = √2 ‖packed‖₂``)."""
    if radius <= 0:
        return packed
    return packed * _joint_scale(math.sqrt(2.0) * torch.linalg.vector_norm(packed), radius)
