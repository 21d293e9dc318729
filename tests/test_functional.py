"""Pure math of :mod:`orthotune.functional` (OFT parts) against definitions, dense formulas and peft 0.21.2."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from peft.tuners.oft.layer import OFTRotationModule as PeftRotation
from references import cayley_reference, dense_block_diag, randn, rel_err, skew_reference

from orthotune.functional import (
    block_diagonal,
    block_size_from_packed,
    cayley_exact,
    cayley_neumann,
    cayley_transform,
    coft_radius,
    drop_blocks_to_identity,
    neumann_norm_bound,
    orthogonality_error,
    packed_from_skew,
    packed_size,
    project_to_ball,
    rotate_activations,
    rotate_weight,
    skew_from_packed,
    skew_part,
    unrotate_weight,
)

FAST = settings(max_examples=25, deadline=None)
seeds = st.integers(0, 2**31 - 1)


def spectral_norm(m: torch.Tensor) -> torch.Tensor:
    """Largest singular value per matrix, in float64."""
    return torch.linalg.matrix_norm(m.double(), ord=2)


def peft_rotation(num_blocks: int, block_size: int) -> PeftRotation:
    """peft's rotation module, used only for its ``_cayley_batch`` and ``_project_batch`` math."""
    return PeftRotation(num_blocks, packed_size(block_size), block_size, num_blocks * block_size)


# ------------------------------------------------------------------------------------------------ skew
@FAST
@given(block_size=st.integers(2, 12), batch=st.lists(st.integers(1, 3), max_size=2))
def test_skew_packing_is_row_major_strict_upper_triangle_like_triu_indices(block_size: int, batch: list[int]) -> None:
    n = packed_size(block_size)
    packed = torch.arange(1, n + 1, dtype=torch.float64).expand(*batch, n).clone()
    q = skew_from_packed(packed, block_size)
    assert torch.equal(q, skew_reference(packed, block_size))
    rows, cols = torch.triu_indices(block_size, block_size, 1)
    assert torch.equal(q[..., rows, cols], packed)
    assert torch.equal(q, -q.transpose(-1, -2))


@FAST
@given(block_size=st.integers(2, 16), r=st.integers(1, 4), seed=seeds)
def test_skew_packing_round_trips_both_ways(block_size: int, r: int, seed: int) -> None:
    packed = randn(r, packed_size(block_size), seed=seed, dtype=torch.float32)
    assert torch.equal(packed_from_skew(skew_from_packed(packed, block_size)), packed)
    a = randn(r, block_size, block_size, seed=seed + 1)
    skew = a - a.transpose(-1, -2)
    assert torch.equal(skew_from_packed(packed_from_skew(skew), block_size), skew)


def test_skew_part_is_half_the_antisymmetric_difference() -> None:
    a = torch.randn(3, 5, 5, dtype=torch.float64)
    assert torch.equal(skew_part(a), 0.5 * (a - a.transpose(-1, -2)))


@pytest.mark.parametrize("block_size", [1, 2, 3, 8, 64, 129])
def test_block_size_from_packed_inverts_packed_size(block_size: int) -> None:
    assert packed_size(block_size) == block_size * (block_size - 1) // 2
    if block_size > 1:
        assert block_size_from_packed(packed_size(block_size)) == block_size


@pytest.mark.parametrize("n_elements", [2, 4, 5, 7, 27])
def test_block_size_from_packed_rejects_non_triangular_numbers(n_elements: int) -> None:
    with pytest.raises(ValueError, match="n_elements"):
        block_size_from_packed(n_elements)


def test_skew_from_packed_rejects_wrong_block_size() -> None:
    with pytest.raises(ValueError, match="block_size"):
        skew_from_packed(torch.zeros(2, 6), 5)


# ---------------------------------------------------------------------------------------------- cayley
@FAST
@given(block_size=st.integers(2, 128), scale=st.floats(0.01, 10.0), seed=seeds)
@example(block_size=128, scale=1.0, seed=0)
@example(block_size=128, scale=10.0, seed=0)
@example(block_size=64, scale=10.0, seed=1)
def test_cayley_exact_fp32_is_orthogonal_far_from_zero(block_size: int, scale: float, seed: int) -> None:
    q = skew_from_packed(randn(1, packed_size(block_size), seed=seed, dtype=torch.float32, scale=scale), block_size)
    rotation = cayley_exact(q)
    assert rotation.dtype == torch.float32
    r64 = rotation.double()  # measure RᵀR - I in float64 so only R's own error counts
    gram = r64.transpose(-1, -2) @ r64 - torch.eye(block_size, dtype=torch.float64)
    gram_error = torch.linalg.eigvalsh(gram).abs().max()  # spectral norm of a symmetric matrix
    assert gram_error <= 1e-5, f"‖RᵀR - I‖₂ = {gram_error:.2e} for b={block_size}, scale={scale}"


@FAST
@given(block_size=st.integers(2, 48), scale=st.floats(0.01, 10.0), seed=seeds)
def test_cayley_exact_has_determinant_plus_one(block_size: int, scale: float, seed: int) -> None:
    q = skew_from_packed(randn(3, packed_size(block_size), seed=seed, scale=scale), block_size)
    det = torch.linalg.det(cayley_exact(q))
    torch.testing.assert_close(det, torch.ones_like(det), atol=1e-9, rtol=0)


@FAST
@given(
    block_size=st.integers(2, 64),
    r=st.integers(1, 3),
    scale=st.floats(0.01, 10.0),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=seeds,
)
def test_cayley_exact_equals_dense_inverse_formula(
    block_size: int, r: int, scale: float, dtype: torch.dtype, seed: int
) -> None:
    q = skew_from_packed(randn(r, packed_size(block_size), seed=seed, dtype=dtype, scale=scale), block_size)
    tolerance = 2e-5 if dtype == torch.float32 else 1e-11
    assert rel_err(cayley_exact(q), cayley_reference(q)) <= tolerance


def _skew_with_spectral_norm(block_size: int, norm: float, seed: int) -> torch.Tensor:
    q = skew_from_packed(randn(packed_size(block_size), seed=seed), block_size)
    return q * (norm / spectral_norm(q))


@FAST
@given(
    block_size=st.integers(2, 24),
    norm=st.floats(0.01, 0.97),
    num_terms=st.integers(2, 14),
    seed=seeds,
)
def test_cayley_neumann_error_is_spectral_norm_to_the_n_minus_1(
    block_size: int, norm: float, num_terms: int, seed: int
) -> None:
    q = _skew_with_spectral_norm(block_size, norm, seed)
    error = spectral_norm(cayley_neumann(q, num_terms) - cayley_reference(q)).item()
    bound = norm ** (num_terms - 1)
    assert error <= bound * (1 + 1e-9) + 1e-13
    # The documented bound is attained: R - R_n = Q^{n-1} R with R orthogonal and Q normal.
    assert error == pytest.approx(bound, rel=1e-7, abs=1e-13)


@FAST
@given(block_size=st.integers(2, 16), blocks=st.integers(1, 4), num_terms=st.integers(2, 9), seed=seeds)
def test_cayley_neumann_gradient_equals_autograd_through_the_textbook_series(
    block_size: int, blocks: int, num_terms: int, seed: int
) -> None:
    """The hand-written backward (it keeps only Q) against autograd through I + 2Q + … + 2Q^{n-2} + Q^{n-1}."""
    q = (randn(blocks, block_size, block_size, seed=seed) * 0.3).requires_grad_(True)
    upstream = randn(blocks, block_size, block_size, seed=seed + 1)
    q_ref = q.detach().requires_grad_(True)
    eye = torch.eye(block_size, dtype=torch.float64)
    powers = [eye.expand_as(q_ref)]
    for _ in range(num_terms - 1):
        powers.append(powers[-1] @ q_ref)
    textbook = sum((1.0 if k in (0, num_terms - 1) else 2.0) * power for k, power in enumerate(powers))
    (expected,) = torch.autograd.grad((textbook * upstream).sum(), q_ref)
    (actual,) = torch.autograd.grad((cayley_neumann(q, num_terms) * upstream).sum(), q)
    assert rel_err(actual, expected) <= 1e-12


def test_cayley_neumann_keeps_only_its_input_for_backward() -> None:
    q = (randn(16, 32, 32, seed=0) * 0.1).requires_grad_(True)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        cayley_neumann(q, 5)
    assert sum(t.numel() for t in saved) == q.numel()


@FAST
@given(block_size=st.integers(2, 24), norm=st.floats(0.05, 0.9), seed=seeds)
def test_cayley_neumann_converges_to_exact_as_terms_grow(block_size: int, norm: float, seed: int) -> None:
    q = _skew_with_spectral_norm(block_size, norm, seed)
    exact = cayley_exact(q)
    errors = [spectral_norm(cayley_neumann(q, n) - exact).item() for n in range(2, 12)]
    assert all(later < earlier for earlier, later in zip(errors, errors[1:], strict=False))
    assert spectral_norm(cayley_neumann(q, 120) - exact) < 1e-5  # ≤ 0.9^119 ≈ 4e-6
    assert torch.equal(cayley_transform(q, use_neumann=True, num_neumann_terms=7), cayley_neumann(q, 7))
    assert torch.equal(cayley_transform(q), exact)


@FAST
@given(
    block_size=st.integers(2, 16),
    r=st.integers(1, 4),
    num_terms=st.integers(4, 10),
    scale=st.floats(0.0, 0.3),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=seeds,
)
def test_cayley_neumann_equals_peft_for_four_or_more_terms(
    block_size: int, r: int, num_terms: int, scale: float, dtype: torch.dtype, seed: int
) -> None:
    packed = randn(r, packed_size(block_size), seed=seed, dtype=dtype, scale=scale)
    ours = cayley_neumann(skew_from_packed(packed, block_size), num_terms)
    theirs = peft_rotation(r, block_size)._cayley_batch(
        packed, block_size, use_cayley_neumann=True, num_neumann_terms=num_terms
    )
    assert rel_err(ours, theirs) <= (1e-5 if dtype == torch.float32 else 1e-13)


@FAST
@given(block_size=st.integers(2, 16), r=st.integers(1, 4), scale=st.floats(0.01, 3.0), seed=seeds)
def test_peft_exact_mode_is_our_rotation_of_minus_q_which_is_its_transpose(
    block_size: int, r: int, scale: float, seed: int
) -> None:
    """Documents the peft defect: its exact path is (I - Q)(I + Q)⁻¹ = R(-Q) = R(Q)ᵀ, not R(Q)."""
    packed = randn(r, packed_size(block_size), seed=seed, dtype=torch.float32, scale=scale)
    peft_exact = peft_rotation(r, block_size)._cayley_batch(packed, block_size, use_cayley_neumann=False)
    q = skew_from_packed(packed, block_size)
    torch.testing.assert_close(peft_exact, cayley_exact(-q), atol=1e-5, rtol=0)
    torch.testing.assert_close(peft_exact, cayley_exact(q).transpose(-1, -2), atol=1e-5, rtol=0)


def test_cayley_neumann_rejects_fewer_than_two_terms() -> None:
    with pytest.raises(ValueError, match="num_cayley_neumann_terms=1"):
        cayley_neumann(torch.zeros(1, 3, 3), 1)


@FAST
@given(block_size=st.integers(2, 24), scale=st.floats(0.01, 5.0), seed=seeds)
def test_neumann_norm_bound_bounds_the_spectral_norm(block_size: int, scale: float, seed: int) -> None:
    packed = randn(3, packed_size(block_size), seed=seed, scale=scale)
    q = skew_reference(packed, block_size)
    assert (spectral_norm(q) <= neumann_norm_bound(packed) * (1 + 1e-12)).all()
    torch.testing.assert_close(neumann_norm_bound(packed), torch.linalg.matrix_norm(q) / math.sqrt(2))


def test_orthogonality_error_is_max_spectral_norm_of_gram_minus_identity() -> None:
    m = torch.eye(4, dtype=torch.float64).repeat(3, 1, 1)
    m[1, 0, 0] = 1.5  # gram entry 2.25 → error 1.25
    m[2, 1, 1] = 0.5  # gram entry 0.25 → error 0.75
    assert orthogonality_error(m).item() == pytest.approx(1.25)


# ------------------------------------------------------------------------------------------------ coft
@FAST
@given(
    block_size=st.integers(2, 16),
    r=st.integers(1, 6),
    log_scale=st.floats(-7.0, 1.0),
    eps=st.sampled_from([6e-5, 1e-3, 0.1, 1.0]),
    seed=seeds,
)
def test_project_to_ball_bounds_norm_keeps_inside_and_equals_peft(
    block_size: int, r: int, log_scale: float, eps: float, seed: int
) -> None:
    packed = randn(r, packed_size(block_size), seed=seed, dtype=torch.float32, scale=10**log_scale)
    radius = coft_radius(eps, r)
    assert radius == pytest.approx(eps / math.sqrt(r), rel=1e-12)
    projected = project_to_ball(packed, radius)
    frobenius_before = torch.linalg.matrix_norm(skew_reference(packed, block_size))
    frobenius_after = torch.linalg.matrix_norm(skew_reference(projected, block_size))
    assert (frobenius_after <= radius * (1 + 1e-5)).all()
    inside = frobenius_before <= radius
    assert torch.equal(projected[inside], packed[inside])
    # outside: same direction, on the sphere
    torch.testing.assert_close(frobenius_after[~inside], torch.full_like(frobenius_after[~inside], radius))
    cosine = torch.nn.functional.cosine_similarity(projected[~inside], packed[~inside], dim=-1)
    torch.testing.assert_close(cosine, torch.ones_like(cosine))
    theirs = peft_rotation(r, block_size)._project_batch(packed.clone(), eps=eps)
    torch.testing.assert_close(projected, theirs, atol=1e-7 * max(radius, 1.0), rtol=1e-5)


def test_project_to_ball_has_finite_gradient_at_zero() -> None:
    packed = torch.zeros(2, 6, requires_grad=True)
    project_to_ball(packed, 1e-3).sum().backward()
    assert torch.isfinite(packed.grad).all()


# ---------------------------------------------------------------------------------------------- rotate
DTYPE_TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}
dtypes = st.sampled_from(list(DTYPE_TOLERANCE))


@FAST
@given(
    num_blocks=st.integers(1, 5),
    block_size=st.integers(1, 8),
    batch=st.lists(st.integers(1, 4), min_size=0, max_size=2),
    dtype=dtypes,
    seed=seeds,
)
def test_rotate_activations_equals_dense_block_diagonal_product(
    num_blocks: int, block_size: int, batch: list[int], dtype: torch.dtype, seed: int
) -> None:
    x = randn(*batch, num_blocks * block_size, seed=seed, dtype=dtype)
    blocks = randn(num_blocks, block_size, block_size, seed=seed + 1, dtype=dtype)
    out = rotate_activations(x, blocks)
    assert out.dtype == dtype and out.shape == x.shape
    assert rel_err(out, x.double() @ dense_block_diag(blocks.double())) <= DTYPE_TOLERANCE[dtype]


@FAST
@given(
    num_blocks=st.integers(2, 5),
    block_size=st.sampled_from([1, 3, 8, 32, 40]),
    batch=st.lists(st.integers(1, 4), min_size=1, max_size=2),
    into_linear=st.booleans(),
    seed=seeds,
)
def test_rotate_activations_gradients_equal_the_dense_products(
    num_blocks: int, block_size: int, batch: list[int], into_linear: bool, seed: int
) -> None:
    """rotate_activations has a hand-written backward; autograd through the dense product is the truth.

    ``into_linear``: the column-major product feeds a matmul, as in the layers, and its gradient comes back
    column-major, which backward reads by another path.
    """
    width = num_blocks * block_size
    x = randn(*batch, width, seed=seed, dtype=torch.float64).requires_grad_(True)
    blocks = randn(num_blocks, block_size, block_size, seed=seed + 1, dtype=torch.float64).requires_grad_(True)
    weight = randn(7, width, seed=seed + 2, dtype=torch.float64) if into_linear else None
    upstream = randn(*batch, 7 if into_linear else width, seed=seed + 3, dtype=torch.float64)

    def gradients(rotate: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, ...]:
        inputs = x.detach().requires_grad_(True), blocks.detach().requires_grad_(True)
        out = rotate(*inputs)
        if weight is not None:
            out = torch.nn.functional.linear(out, weight)
        return torch.autograd.grad((out * upstream).sum(), inputs)

    actual = gradients(lambda x_, b_: rotate_activations(x_, b_, row_major=not into_linear))
    expected = gradients(lambda x_, b_: x_ @ torch.block_diag(*b_.unbind(0)))
    assert rel_err(actual[0], expected[0]) <= 1e-12
    assert rel_err(actual[1], expected[1]) <= 1e-12


def test_rotate_activations_is_row_major_unless_asked_to_keep_the_product_layout() -> None:
    x = randn(3, 4, 24, seed=0, dtype=torch.float32)
    blocks = randn(3, 8, 8, seed=1, dtype=torch.float32)
    row_major = rotate_activations(x, blocks)
    as_computed = rotate_activations(x, blocks, row_major=False)
    assert row_major.is_contiguous() and not as_computed.is_contiguous()
    assert rel_err(row_major, as_computed) <= 1e-6  # two kernels (tiled or not), one product
    assert rel_err(row_major, x.double() @ dense_block_diag(blocks.double())) <= 1e-5


def test_rotate_activations_backward_passes_gradcheck_and_gradgradcheck() -> None:
    x = randn(3, 2, 12, seed=0, dtype=torch.float64).requires_grad_(True)
    blocks = randn(3, 4, 4, seed=1, dtype=torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(rotate_activations, (x, blocks))
    assert torch.autograd.gradgradcheck(rotate_activations, (x, blocks))


@FAST
@given(num_blocks=st.integers(1, 6), block_size=st.integers(1, 8), rows=st.integers(1, 5), dtype=dtypes, seed=seeds)
def test_rotate_activations_with_one_shared_block_repeats_it_over_the_width(
    num_blocks: int, block_size: int, rows: int, dtype: torch.dtype, seed: int
) -> None:
    x = randn(rows, num_blocks * block_size, seed=seed, dtype=dtype)
    block = randn(1, block_size, block_size, seed=seed + 1, dtype=dtype)
    reference = x.double() @ dense_block_diag(block.double(), num_blocks)
    assert rel_err(rotate_activations(x, block), reference) <= DTYPE_TOLERANCE[dtype]


@FAST
@given(
    num_blocks=st.integers(1, 5),
    block_size=st.integers(1, 8),
    out_features=st.integers(1, 6),
    shared=st.booleans(),
    dtype=dtypes,
    seed=seeds,
)
def test_rotate_weight_equals_w_times_dense_transpose(
    num_blocks: int, block_size: int, out_features: int, shared: bool, dtype: torch.dtype, seed: int
) -> None:
    weight = randn(out_features, num_blocks * block_size, seed=seed, dtype=dtype)
    blocks = randn(1 if shared else num_blocks, block_size, block_size, seed=seed + 1, dtype=dtype)
    reference = weight.double() @ dense_block_diag(blocks.double(), num_blocks).T
    assert rel_err(rotate_weight(weight, blocks), reference) <= DTYPE_TOLERANCE[dtype]


@FAST
@given(
    num_blocks=st.integers(1, 5),
    block_size=st.integers(1, 8),
    out_features=st.integers(1, 6),
    shared=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=seeds,
)
def test_unrotate_weight_inverts_rotate_weight_also_for_non_orthogonal_blocks(
    num_blocks: int, block_size: int, out_features: int, shared: bool, dtype: torch.dtype, seed: int
) -> None:
    weight = randn(out_features, num_blocks * block_size, seed=seed, dtype=dtype)
    eye = torch.eye(block_size, dtype=dtype)
    blocks = eye + 0.2 * randn(1 if shared else num_blocks, block_size, block_size, seed=seed + 1, dtype=dtype)
    restored = unrotate_weight(rotate_weight(weight, blocks), blocks)
    assert rel_err(restored, weight) <= (1e-5 if dtype == torch.float32 else 1e-12)


@pytest.mark.parametrize("shared", [False, True])
def test_block_diagonal_equals_torch_block_diag(shared: bool) -> None:
    blocks = torch.randn(1 if shared else 4, 3, 3)
    assert torch.equal(block_diagonal(blocks, 4), dense_block_diag(blocks, 4))


def test_rotate_activations_rejects_width_that_is_not_blocks_times_size() -> None:
    with pytest.raises(ValueError, match="num_blocks"):
        rotate_activations(torch.zeros(2, 10), torch.zeros(3, 3, 3))


# --------------------------------------------------------------------------------------------- dropout
def _is_identity(block: torch.Tensor) -> bool:
    return torch.equal(block, torch.eye(block.shape[-1], dtype=block.dtype))


@FAST
@given(num_blocks=st.integers(1, 16), p=st.floats(0.0, 0.999), block_size=st.integers(2, 5), seed=seeds)
def test_drop_blocks_to_identity_drops_floor_p_d_blocks_and_keeps_the_rest_bit_identical(
    num_blocks: int, p: float, block_size: int, seed: int
) -> None:
    blocks = randn(num_blocks, block_size, block_size, seed=seed, dtype=torch.float32) + 3.0  # never the identity
    torch.manual_seed(seed)
    out = drop_blocks_to_identity(blocks, p)
    dropped = [i for i in range(num_blocks) if _is_identity(out[i])]
    assert len(dropped) == math.floor(p * num_blocks)
    for i in set(range(num_blocks)) - set(dropped):
        assert torch.equal(out[i], blocks[i])


def test_drop_blocks_to_identity_chooses_different_blocks_on_different_calls() -> None:
    blocks = torch.randn(10, 3, 3) + 3.0
    masks = {tuple(_is_identity(b) for b in drop_blocks_to_identity(blocks, 0.5)) for _ in range(10)}
    assert len(masks) > 1


def test_drop_blocks_to_identity_keeps_gradients_of_kept_blocks() -> None:
    blocks = (torch.randn(6, 3, 3) + 3.0).requires_grad_()
    out = drop_blocks_to_identity(blocks, 0.5)
    out.sum().backward()
    kept = torch.tensor([not _is_identity(b) for b in out.detach()])
    assert torch.equal(blocks.grad[kept], torch.ones_like(blocks.grad[kept]))
    assert torch.equal(blocks.grad[~kept], torch.zeros_like(blocks.grad[~kept]))


@pytest.mark.parametrize("block_size", [2, 5, 16])
def test_cayley_exact_gradient_matches_finite_differences(block_size: int) -> None:
    # cayley_exact has a hand-written backward (dR = 2 A dQ A with A = (I - Q)⁻¹); check it numerically.
    packed = (torch.randn(3, block_size * (block_size - 1) // 2, dtype=torch.float64) * 0.7).requires_grad_()
    assert torch.autograd.gradcheck(lambda p: cayley_exact(skew_from_packed(p, block_size)), (packed,))
