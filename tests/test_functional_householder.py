"""HRA's math (:mod:`orthotune.functional.householder`) against peft 0.21.2, textbook loops and dense products.

The references here are written from peft's ``get_delta_weight`` as a reader would transcribe it (one dense
reflection after another, Gram–Schmidt one vector at a time), and peft's own layer where a layer is needed.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import HRAConfig as PeftHRAConfig
from peft.tuners.hra.layer import HRALinear as PeftHRALinear
from references import randn, rel_err

from orthotune.functional import (
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

FAST = settings(max_examples=25, deadline=None)
seeds = st.integers(0, 2**31 - 1)
DTYPES = {"fp32": (torch.float32, 2e-5), "fp64": (torch.float64, 1e-12)}


def sequential_reference(u: torch.Tensor) -> torch.Tensor:
    """peft's ``apply_GS=False`` matrix, transcribed: ``H ← H − 2 H u_i u_iᵀ`` for unit ``u_i``, in column order."""
    u = u.double()
    h = torch.eye(u.shape[0], dtype=torch.float64)
    for i in range(u.shape[1]):
        unit = (u[:, i] / u[:, i].norm()).view(-1, 1)
        h = h - 2 * h @ unit @ unit.t()
    return h


def gram_schmidt_reference(u: torch.Tensor) -> torch.Tensor:
    """peft's Gram–Schmidt, transcribed: subtract the projections on the previous vectors, then normalise."""
    u = u.double()
    basis: list[torch.Tensor] = []
    for i in range(u.shape[1]):
        vector = u[:, i].view(-1, 1)
        for previous in basis:
            vector = vector - (previous.t() @ vector) * previous
        basis.append(vector / vector.norm())
    return torch.cat(basis, dim=1)


def reference(u: torch.Tensor, apply_gs: bool) -> torch.Tensor:
    """peft's ``H`` in float64 (merged weight ``W H``)."""
    if apply_gs:
        q = gram_schmidt_reference(u)
        return torch.eye(u.shape[0], dtype=torch.float64) - 2 * q @ q.t()
    return sequential_reference(u)


def wy_dense(v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return torch.eye(v.shape[0], dtype=v.dtype) - v @ t @ v.t()


shapes = st.integers(1, 20).flatmap(lambda d: st.tuples(st.just(d), st.integers(1, d)))


# ------------------------------------------------------------------------------------------ WY form
@FAST
@given(
    shape=shapes,
    apply_gs=st.booleans(),
    dtype=st.sampled_from(sorted(DTYPES)),
    scale=st.sampled_from([1e-3, 1.0, 1e3]),
    seed=seeds,
)
def test_wy_form_is_orthogonal_and_equals_sequential_reflections_and_dense(
    shape: tuple[int, int], apply_gs: bool, dtype: str, scale: float, seed: int
) -> None:
    d, r = shape
    torch_dtype, tolerance = DTYPES[dtype]
    u = randn(d, r, seed=seed, dtype=torch_dtype, scale=scale)
    v, t = householder_wy(u, apply_gs)
    h = wy_dense(v.double(), t.double())
    eye = torch.eye(d, dtype=torch.float64)
    assert (h.t() @ h - eye).abs().max() <= 10 * tolerance
    expected = reference(u, apply_gs)
    assert rel_err(h, expected) <= 10 * tolerance
    assert rel_err(householder_dense(u, apply_gs), expected) <= 10 * tolerance


@FAST
@given(d=st.integers(1, 12), extra=st.integers(1, 6), seed=seeds)
def test_more_reflections_than_features_still_make_the_sequential_product(d: int, extra: int, seed: int) -> None:
    u = randn(d, d + extra, seed=seed)
    v, t = householder_wy(u)
    assert rel_err(wy_dense(v, t), sequential_reference(u)) <= 1e-10


@FAST
@given(shape=shapes, seed=seeds)
def test_t_is_upper_triangular_and_folds_the_normalisation(shape: tuple[int, int], seed: int) -> None:
    d, r = shape
    u = randn(d, r, seed=seed)
    v, t = householder_wy(u)
    assert torch.equal(v, u)  # the vectors are used as stored; 2/‖u_i‖² lives in T
    assert torch.equal(t, torch.triu(t))
    assert torch.allclose(torch.diagonal(t), 2 / (u * u).sum(0), rtol=1e-12)
    # Schreiber–Van Loan with unit vectors: the same H, T's diagonal all 2.
    unit_v, unit_t = householder_wy(householder_unit_vectors(u))
    assert torch.allclose(torch.diagonal(unit_t), torch.full((r,), 2.0, dtype=torch.float64))
    assert rel_err(wy_dense(unit_v, unit_t), wy_dense(v, t)) <= 1e-12
    column_scales = randn(r, seed=seed + 1).abs() + 0.1
    assert rel_err(wy_dense(*householder_wy(u * column_scales)), wy_dense(v, t)) <= 1e-12


@FAST
@given(shape=shapes, seed=seeds)
def test_gram_schmidt_equals_the_column_by_column_process(shape: tuple[int, int], seed: int) -> None:
    d, r = shape
    u = randn(d, r, seed=seed)
    q = householder_gram_schmidt(u)
    assert rel_err(q, gram_schmidt_reference(u)) <= 1e-10
    v, t = householder_wy(u, apply_gs=True)
    assert torch.equal(v, q) and torch.equal(t, 2 * torch.eye(r, dtype=torch.float64))


def test_gram_schmidt_of_equal_columns_stays_orthonormal_where_peft_is_not() -> None:
    """The identity init repeats every vector: peft's Gram-Schmidt then normalises rounding noise."""
    half = randn(16, 2, seed=3, dtype=torch.float32)
    u = torch.repeat_interleave(half, 2, dim=1)
    q = householder_gram_schmidt(u)
    assert (q.t() @ q - torch.eye(4)).abs().max() <= 1e-5
    assert rel_err(q[:, 0], householder_unit_vectors(half)[:, 0]) <= 1e-5
    assert rel_err(q @ (q.t() @ half), half) <= 1e-5  # span(Q) holds every vector of u


def test_gram_schmidt_refuses_more_vectors_than_features() -> None:
    with pytest.raises(ValueError, match=r"r=5 .* d=4"):
        householder_gram_schmidt(torch.randn(4, 5))


@pytest.mark.parametrize("apply_gs", [False, True])
@pytest.mark.parametrize("r", [3, 4])
def test_dense_equals_peft_get_delta_weight(apply_gs: bool, r: int) -> None:
    config = PeftHRAConfig(r=r, apply_GS=apply_gs, init_weights=False, target_modules=["x"])
    peft_layer = PeftHRALinear(torch.nn.Linear(10, 3), "default", config=config, r=r)
    u = peft_layer.hra_u["default"].detach()
    v, t = householder_wy(u, apply_gs)
    assert rel_err(householder_dense(u, apply_gs), peft_layer.get_delta_weight("default")) <= 1e-5
    assert rel_err(wy_dense(v, t), peft_layer.get_delta_weight("default")) <= 1e-5
    assert rel_err(wy_dense(v, t).t(), peft_layer.get_delta_weight("default", reverse=True)) <= 1e-5


@FAST
@given(
    d=st.integers(2, 16),
    ranks=st.lists(st.integers(1, 5), min_size=1, max_size=3),
    gs=st.lists(st.booleans(), min_size=3, max_size=3),
    seed=seeds,
)
def test_compose_is_the_product_in_order(d: int, ranks: list[int], gs: list[bool], seed: int) -> None:
    factors, product = [], torch.eye(d, dtype=torch.float64)
    for index, rank in enumerate(ranks):
        u = randn(d, min(rank, d), seed=seed + index)
        factors.append(householder_wy(u, gs[index]))
        product = product @ reference(u, gs[index])
    v, t = householder_compose(factors)
    assert v.shape == (d, sum(min(rank, d) for rank in ranks))
    assert rel_err(wy_dense(v, t), product) <= 1e-10


def test_compose_needs_a_factor() -> None:
    with pytest.raises(ValueError, match="at least one"):
        householder_compose([])


# --------------------------------------------------------------------------------------- application
@FAST
@given(
    shape=shapes,
    batch=st.lists(st.integers(1, 4), min_size=1, max_size=2),
    out_features=st.integers(1, 6),
    apply_gs=st.booleans(),
    dtype=st.sampled_from(sorted(DTYPES)),
    seed=seeds,
)
def test_activation_route_equals_weight_route_and_dense(
    shape: tuple[int, int], batch: list[int], out_features: int, apply_gs: bool, dtype: str, seed: int
) -> None:
    d, r = shape
    torch_dtype, tolerance = DTYPES[dtype]
    u = randn(d, r, seed=seed, dtype=torch_dtype)
    x = randn(*batch, d, seed=seed + 1, dtype=torch_dtype)
    weight = randn(out_features, d, seed=seed + 2, dtype=torch_dtype)
    h = reference(u, apply_gs)
    v, t = (tensor.to(torch_dtype) for tensor in householder_wy(u, apply_gs))
    rotated = householder_rotate_activations(x, v, t)
    assert rotated.shape == x.shape and rotated.dtype == torch_dtype and rotated.is_contiguous()
    assert rel_err(rotated, x.double() @ h.t()) <= 10 * tolerance
    merged = householder_rotate_weight(weight, v, t)
    assert rel_err(merged, weight.double() @ h) <= 10 * tolerance
    # unmerged == merged: (x Hᵀ) Wᵀ == x (W H)ᵀ
    assert rel_err(rotated @ weight.t(), x @ merged.t()) <= 10 * tolerance
    assert rel_err(householder_unrotate_weight(merged, v, t), weight) <= 10 * tolerance


@pytest.mark.parametrize("apply_gs", [False, True])
def test_bf16_activations_stay_close_to_the_fp64_product(apply_gs: bool) -> None:
    u = randn(64, 6, seed=0)
    x = randn(5, 64, seed=1)
    v, t = householder_wy(u.float(), apply_gs)
    rotated = householder_rotate_activations(x.bfloat16(), v.bfloat16(), t.bfloat16())
    assert rotated.dtype == torch.bfloat16
    assert rel_err(rotated, x @ reference(u, apply_gs).t()) <= 3e-2


def test_rotate_activations_rejects_a_wrong_width() -> None:
    v, t = householder_wy(torch.randn(6, 2))
    with pytest.raises(ValueError, match="x has 5 features"):
        householder_rotate_activations(torch.randn(3, 5), v, t)


# ------------------------------------------------------------------------------------------ backward
@pytest.mark.parametrize("route", [householder_rotate_activations, householder_rotate_weight])
def test_custom_backward_passes_gradcheck(route) -> None:
    x = randn(3, 2, 7, seed=0).requires_grad_(True)
    v, t = householder_wy(randn(7, 3, seed=1))
    v, t = v.detach().requires_grad_(True), t.detach().requires_grad_(True)
    assert torch.autograd.gradcheck(route, (x, v, t))


@FAST
@given(
    shape=shapes,
    apply_gs=st.booleans(),
    x_needs_grad=st.booleans(),
    scale=st.sampled_from([0.1, 1.0, 10.0]),
    seed=seeds,
)
def test_gradients_equal_autograd_through_the_dense_reference(
    shape: tuple[int, int], apply_gs: bool, x_needs_grad: bool, scale: float, seed: int
) -> None:
    d, r = shape
    u = randn(d, r, seed=seed, scale=scale).requires_grad_(True)
    x = randn(4, d, seed=seed + 1).requires_grad_(x_needs_grad)
    upstream = randn(4, d, seed=seed + 2)
    u_ref, x_ref = u.detach().clone().requires_grad_(True), x.detach().clone().requires_grad_(x_needs_grad)

    ours = householder_rotate_activations(x, *householder_wy(u, apply_gs))
    (ours * upstream).sum().backward()
    (x_ref @ reference(u_ref, apply_gs).t() * upstream).sum().backward()

    # ∂L/∂u vanishes where H does not depend on u (d = 1: H = −1 for every u), hence an absolute tolerance too.
    torch.testing.assert_close(u.grad, u_ref.grad, rtol=1e-9, atol=1e-10)
    if x_needs_grad:
        assert rel_err(x.grad, x_ref.grad) <= 1e-10
    else:
        assert x.grad is None


def test_backward_keeps_only_x_and_the_small_tensors() -> None:
    n, d, r = 32, 24, 4
    x = randn(2, n // 2, d, seed=0).requires_grad_(True)
    v, t = householder_wy(randn(d, r, seed=1))
    v, t = v.detach().requires_grad_(True), t.detach().requires_grad_(True)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda tensor: saved.append(tensor) or tensor, lambda tensor: tensor):
        householder_rotate_activations(x, v, t)
    activation_sized = [tensor for tensor in saved if tensor.numel() >= n * d]
    assert len(activation_sized) == 1 and activation_sized[0].data_ptr() == x.data_ptr()
    assert sum(tensor.numel() for tensor in saved) == x.numel() + v.numel() + t.numel()


# ---------------------------------------------------------------------------------------- on the span
@FAST
@given(
    d=st.integers(1, 16),
    r=st.integers(1, 20),
    apply_gs=st.booleans(),
    paired=st.booleans(),
    scale=st.sampled_from([1e-3, 1.0, 1e3]),
    seed=seeds,
)
def test_on_span_holds_the_eigenvalues_orthogonality_and_distance_of_the_dense_h(
    d: int, r: int, apply_gs: bool, paired: bool, scale: float, seed: int
) -> None:
    """``B`` has ``H``'s eigenvalues (the rest are ones), its ``‖HᵀH − I‖₂`` and its ``‖H − I‖_F``, also for more
    vectors than features and for the rank-deficient pairs of the identity initialisation."""
    if apply_gs:
        r = min(r, d)
    u = randn(d, r, seed=seed, scale=scale)
    if paired:
        u = torch.repeat_interleave(u[:, : (r + 1) // 2], 2, dim=1)[:, :r]
    h = reference(u, apply_gs) if not (apply_gs and paired) else None
    if h is None:  # Gram-Schmidt of equal columns is undefined in peft's form; ours is the truth's stand-in
        h = householder_dense(u, apply_gs=True)
    b = householder_on_span(*householder_wy(u, apply_gs))
    assert b.shape == (min(d, r), min(d, r))
    eye_b, eye_h = torch.eye(b.shape[0], dtype=torch.float64), torch.eye(d, dtype=torch.float64)
    angles = torch.linalg.eigvals(b).angle().abs()
    expected = torch.linalg.eigvals(h).angle().abs()
    padded = torch.cat([angles, torch.zeros(d - b.shape[0], dtype=torch.float64)])
    torch.testing.assert_close(padded.sort().values, expected.sort().values, rtol=0, atol=1e-6)
    assert abs(torch.linalg.matrix_norm(b - eye_b) - torch.linalg.matrix_norm(h - eye_h)) < 1e-9
    gap = torch.linalg.matrix_norm(b.T @ b - eye_b, ord=2) - torch.linalg.matrix_norm(h.T @ h - eye_h, ord=2)
    assert abs(gap) < 1e-12


def test_on_span_sees_a_non_orthogonal_t() -> None:
    """The orthogonality error is measured, not assumed: a ``T`` that makes no orthogonal ``H`` shows up in full."""
    u = randn(10, 3, seed=0)
    v, t = householder_wy(u)
    broken = 1.1 * t
    b = householder_on_span(v, broken)
    dense = torch.eye(10, dtype=torch.float64) - v @ broken @ v.t()
    error = torch.linalg.matrix_norm(dense.T @ dense - torch.eye(10, dtype=torch.float64), ord=2)
    assert error > 0.1
    assert torch.linalg.matrix_norm(b.T @ b - torch.eye(3, dtype=torch.float64), ord=2) == pytest.approx(error)
