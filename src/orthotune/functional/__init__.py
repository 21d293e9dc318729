"""Pure tensor math of orthogonal fine-tuning: no modules, no state.

- :mod:`~orthotune.functional.skew`: packed strict upper triangles ↔ skew-symmetric generators.
- :mod:`~orthotune.functional.cayley`: the Cayley transform, exact and Cayley-Neumann, and its convention.
- :mod:`~orthotune.functional.coft`: the COFT projection.
- :mod:`~orthotune.functional.rotate`: block-diagonal rotations of activations and of weights.
- :mod:`~orthotune.functional.butterfly`: BOFT's butterfly permutations and products.
- :mod:`~orthotune.functional.dropout`: multiplicative (block-to-identity) dropout.
- :mod:`~orthotune.functional.precision`: the dtype a rotation is applied in, and the layout, per device.
"""

from orthotune.functional.butterfly import (
    butterfly_dense,
    butterfly_permutation,
    butterfly_permutations,
    butterfly_rotate_activations,
    butterfly_rotate_weight,
)
from orthotune.functional.cayley import (
    NEUMANN_WARN_NORM,
    cayley_exact,
    cayley_neumann,
    cayley_transform,
    neumann_norm_bound,
    orthogonality_error,
)
from orthotune.functional.coft import coft_radius, project_coft, project_to_ball
from orthotune.functional.dropout import drop_blocks_to_identity, drop_factor_blocks_to_identity
from orthotune.functional.precision import multiplies_natively, rotation_compute_dtype
from orthotune.functional.rotate import (
    block_diagonal,
    rotate_activations,
    rotate_samples,
    rotate_weight,
    unrotate_weight,
)
from orthotune.functional.skew import (
    block_size_from_packed,
    boft_generators,
    packed_from_skew,
    packed_size,
    skew_from_packed,
    skew_part,
)

__all__ = [
    "NEUMANN_WARN_NORM",
    "block_diagonal",
    "block_size_from_packed",
    "boft_generators",
    "butterfly_dense",
    "butterfly_permutation",
    "butterfly_permutations",
    "butterfly_rotate_activations",
    "butterfly_rotate_weight",
    "cayley_transform",
    "cayley_exact",
    "cayley_neumann",
    "coft_radius",
    "drop_blocks_to_identity",
    "drop_factor_blocks_to_identity",
    "multiplies_natively",
    "neumann_norm_bound",
    "orthogonality_error",
    "packed_from_skew",
    "packed_size",
    "project_coft",
    "project_to_ball",
    "rotate_activations",
    "rotation_compute_dtype",
    "rotate_samples",
    "rotate_weight",
    "skew_from_packed",
    "skew_part",
    "unrotate_weight",
]
