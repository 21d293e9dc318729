"""Adapter strength that stays a rotation: ``R(t·Q)`` instead of ``I + t(R − I)``.

An adapter trained to the rotation ``R = R(Q)`` (the Cayley transform of its skew generator ``Q``) is applied
at strength ``t`` as ``R(t·Q)``:

- every ``t`` gives an orthogonal matrix (exact Cayley mode): a strength never turns a rotation into
  something that stretches or shrinks the features;
- ``t = 0`` is the identity (the base model), ``t = 1`` the trained adapter, ``t = -1`` its inverse
  (``R(-Q) = R(Q)ᵀ = R(Q)⁻¹``);
- ``t = 2`` goes twice as far *along the Cayley curve* ``t ↦ R(t·Q)``. That curve keeps the invariant planes
  of ``Q``: where ``Q`` acts on a plane as ``ω·J`` (``J`` the 90° turn), ``R(t·Q)`` turns that plane by
  ``θ(t) = 2·arctan(t·ω)``. The angles are monotone in ``t``, approach 180° without reaching it, and are
  *not* linear in ``t``: ``R(2Q) ≠ R(Q)²`` in general (``R(Q)²`` turns by ``4·arctan ω``, ``R(2Q)`` by
  ``2·arctan 2ω``). The two agree to first order in ``ω`` only.

The alternatives blend matrices linearly: LyCORIS applies ``I + s(R − I)`` (``r·scale + (1 − scale)·I``)
and ComfyUI multiplies ``R − I`` by the strength twice, ``I + s²(R − I)``. Neither blend is orthogonal for
``s ∉ {0, 1}`` (ComfyUI's for ``s ∉ {0, ±1}``), and ComfyUI's cannot invert an adapter: ``-s`` acts as ``+s``.
``docs/math.md`` ("Strength") compares them.

BOFT's output scale ``s`` (one positive number per output, ``1`` at initialisation) is interpolated
geometrically, ``s^t``: ``t = 0`` gives 1 (the base model), ``t = 1`` gives ``s``, and ``s^a · s^b = s^(a+b)``,
so an adapter at ``-1`` applied after the same adapter at ``1`` is exactly the identity (for one butterfly
factor), and a scale never crosses zero (which would flip an output's sign). A linear blend ``1 + t(s − 1)``
has neither property: at ``t = -1`` it gives ``2 − s``, not ``1/s``, and it reaches zero or below for
``|t|`` large enough. Entries ``s ≤ 0``, which training can produce but which have no real power, fall back
to the linear blend, the one rule that is defined for them and still gives ``1`` at ``0`` and ``s`` at ``1``.
"""

from __future__ import annotations

import torch

from orthotune.functional.cayley import cayley_transform


def generator_at_strength(q: torch.Tensor, strength: float) -> torch.Tensor:
    """``t·Q``; ``Q`` itself (no new tensor) at the default strength 1, so training pays nothing for it."""
    return q if strength == 1 else q * strength


def rotation_at_strength(
    q: torch.Tensor, strength: float, use_neumann: bool = False, num_neumann_terms: int = 5
) -> torch.Tensor:
    """``R(t·Q)``, the Cayley transform of the generator scaled by the strength ``t``.

    Args:
        q: ``(..., b, b)`` skew-symmetric generators.
        strength: ``t``; any real number (0: identity, 1: ``R(Q)``, -1: ``R(Q)ᵀ``).
        use_neumann, num_neumann_terms: the Cayley-Neumann series instead of the exact transform. It converges
            only while ``|t|·‖Q‖₂ < 1``: a strength above 1 brings a series closer to divergence.

    Returns:
        ``(..., b, b)``, orthogonal for the exact transform.
    """
    return cayley_transform(generator_at_strength(q, strength), use_neumann, num_neumann_terms)


def output_scale_at_strength(scale: torch.Tensor, strength: float) -> torch.Tensor:
    """BOFT's output scale at strength ``t``: ``s^t`` for ``s > 0``, ``1 + t(s − 1)`` for ``s ≤ 0``.

    Args:
        scale: the stored scale ``s``, any shape.
        strength: ``t``.

    Returns:
        The same shape and dtype; equal to ``scale`` (the same tensor) at ``t = 1`` and to ones at ``t = 0``.
    """
    if strength == 1:
        return scale
    positive = scale > 0
    # exp(t·log s) on a clamped copy keeps the gradient finite where the other branch is taken.
    geometric = torch.exp(strength * torch.log(torch.where(positive, scale, torch.ones_like(scale))))
    return torch.where(positive, geometric, 1 + strength * (scale - 1))
