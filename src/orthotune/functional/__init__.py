"""Pure tensor math of orthogonal fine-tuning: no modules, no state.

- :mod:`~orthotune.functional.skew`: packed strict upper triangles ↔ skew-symmetric generators.
- :mod:`~orthotune.functional.cayley`: the Cayley transform, exact and Cayley-Neumann, and its convention.
- :mod:`~orthotune.functional.coft`: the COFT projection.
- :mod:`~orthotune.functional.rotate`: block-diagonal rotations of activations and of weights.
- :mod:`~orthotune.functional.butterfly`: BOFT's butterfly permutations and products.
- :mod:`~orthotune.functional.lycoris_butterfly`: LyCORIS's butterfly, which rotates a layer's outputs.
- :mod:`~orthotune.functional.dropout`: multiplicative (block-to-identity) dropout.
- :mod:`~orthotune.functional.householder`: HRA's products of Householder reflections (compact WY form).
- :mod:`~orthotune.functional.strength`: an adapter at a strength ``t``: ``R(t·Q)`` and BOFT's scale ``s^t``.
- :mod:`~orthotune.functional.compose`: the one generator of a product of rotations (adapter composition).
- :mod:`~orthotune.functional.lowrank`: truncated SVD of a weight change, and the rank a tolerance needs.
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
    CAYLEY_INVERSE_MIN_DISTANCE,
    NEUMANN_WARN_NORM,
    cayley_exact,
    cayley_inverse,
    cayley_neumann,
    cayley_transform,
    neumann_norm_bound,
    orthogonality_error,
)
from orthotune.functional.coft import (
    LYCORIS_NORM_EPS,
    coft_radius,
    lycoris_radius,
    project_coft,
    project_packed_jointly,
    project_skew_jointly,
    project_to_ball,
)
from orthotune.functional.compose import composed_generator, rotation_product
from orthotune.functional.dropout import drop_blocks_to_identity, drop_factor_blocks_to_identity
from orthotune.functional.householder import (
    householder_compose,
    householder_dense,
    householder_gram_schmidt,
    householder_on_span,
    householder_rotate_activations,
    householder_rotate_weight,
    householder_unit_vectors,
    householder_unrotate_weight,
    householder_wy,
)
from orthotune.functional.lowrank import low_rank_factors, rank_for_tolerance, truncation_errors
from orthotune.functional.lycoris_butterfly import (
    lycoris_butterfly_dense,
    lycoris_butterfly_fits,
    lycoris_butterfly_max_factors,
    lycoris_butterfly_rotate_activations,
    lycoris_butterfly_rotate_weight,
    lycoris_butterfly_unrotate_activations,
    lycoris_butterfly_unrotate_weight,
)
from orthotune.functional.precision import multiplies_natively, rotation_compute_dtype
from orthotune.functional.rotate import (
    block_diagonal,
    rotate_activations,
    rotate_outputs,
    rotate_samples,
    rotate_weight,
    rotate_weight_outputs,
    unrotate_weight,
    unrotate_weight_outputs,
)
from orthotune.functional.skew import (
    block_size_from_packed,
    boft_generators,
    packed_from_skew,
    packed_size,
    skew_from_packed,
    skew_part,
)
from orthotune.functional.strength import generator_at_strength, output_scale_at_strength, rotation_at_strength

__all__ = [
    "LYCORIS_NORM_EPS",
    "CAYLEY_INVERSE_MIN_DISTANCE",
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
    "cayley_inverse",
    "cayley_neumann",
    "coft_radius",
    "composed_generator",
    "drop_blocks_to_identity",
    "drop_factor_blocks_to_identity",
    "householder_compose",
    "householder_dense",
    "householder_gram_schmidt",
    "householder_on_span",
    "householder_rotate_activations",
    "householder_rotate_weight",
    "householder_unit_vectors",
    "householder_unrotate_weight",
    "householder_wy",
    "lycoris_butterfly_dense",
    "lycoris_butterfly_fits",
    "lycoris_butterfly_max_factors",
    "lycoris_butterfly_rotate_activations",
    "lycoris_butterfly_rotate_weight",
    "lycoris_butterfly_unrotate_activations",
    "lycoris_butterfly_unrotate_weight",
    "lycoris_radius",
    "generator_at_strength",
    "low_rank_factors",
    "multiplies_natively",
    "neumann_norm_bound",
    "orthogonality_error",
    "output_scale_at_strength",
    "packed_from_skew",
    "packed_size",
    "project_coft",
    "project_packed_jointly",
    "project_skew_jointly",
    "project_to_ball",
    "rank_for_tolerance",
    "rotate_activations",
    "rotate_outputs",
    "rotation_compute_dtype",
    "rotate_samples",
    "rotate_weight",
    "rotate_weight_outputs",
    "rotation_at_strength",
    "rotation_product",
    "skew_from_packed",
    "skew_part",
    "truncation_errors",
    "unrotate_weight",
    "unrotate_weight_outputs",
]
