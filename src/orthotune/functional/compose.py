"""One rotation for several: the generator of a product of block-diagonal rotations.

Rotations that act on the same features one after another, ``x ↦ x R_1 ↦ x R_1 R_2 ↦ …``, act together as
``P = R_1 R_2 ⋯ R_k``. When they share one block structure (``D`` blocks of size ``b``), ``P`` has it too,
block by block: ``P_j = R_{1,j} R_{2,j} ⋯ R_{k,j}``; it is orthogonal with ``det P = +1``, and unless a block
turns some plane by exactly 180° it is the Cayley transform of one skew generator,
``Q = cayley_inverse(P)``. So any number of OFT adapters of one block structure fold into a single adapter
of that structure, exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from orthotune.functional.cayley import cayley_inverse
from orthotune.functional.skew import skew_part


def rotation_product(rotations: Sequence[torch.Tensor]) -> torch.Tensor:
    """``R_1 R_2 ⋯ R_k`` of ``(..., b, b)`` rotations given in the order they act on a row vector.

    Computed in float64 and returned in the dtype of the first rotation.
    """
    if not rotations:
        raise ValueError("rotations is empty; pass at least one (..., b, b) rotation")
    product = rotations[0].double()
    for rotation in rotations[1:]:
        product = product @ rotation.double()
    return product.to(rotations[0].dtype)


def composed_generator(rotations: Sequence[torch.Tensor]) -> torch.Tensor:
    """The skew generator ``Q`` whose exact Cayley transform is ``R_1 R_2 ⋯ R_k`` (acting order).

    Args:
        rotations: ``(..., b, b)`` orthogonal blocks, one tensor per rotation, all of one shape.

    Returns:
        ``(..., b, b)`` skew-symmetric, float64.

    Raises:
        ValueError: from :func:`~orthotune.functional.cayley.cayley_inverse` if the product turns some plane
            by 180°.
    """
    shapes = {tuple(rotation.shape) for rotation in rotations}
    if len(shapes) > 1:
        raise ValueError(f"rotations of different shapes {sorted(shapes)} have no blockwise product")
    product = rotation_product([rotation.double() for rotation in rotations])
    return skew_part(cayley_inverse(product))
