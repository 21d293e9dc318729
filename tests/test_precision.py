"""Where the rotation is multiplied: in fp32 for half-precision activations on hardware that emulates half
precision matmuls, in the activation dtype where they are native; and the product's two layouts, its one-row
path and the small math pieces the fast paths rely on (skew unpacking, the Horner form of the Neumann series).

The truths: float64 dense products (``torch.block_diag``), autograd through textbook formulas, gradcheck, and
the two compute paths against each other (they must agree to bf16 rounding).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from references import dense_block_diag, rel_err, skew_reference
from torch import nn

from orthotune import boft, oft
from orthotune.functional import (
    cayley_neumann,
    multiplies_natively,
    precision,
    rotate_activations,
    rotation_compute_dtype,
    skew_from_packed,
)
from orthotune.functional.precision import ROTATION_DTYPE_ENV

FAST = settings(max_examples=25, deadline=None)
seeds = st.integers(0, 2**31 - 1)


def randn(*shape: int, seed: int, dtype: torch.dtype = torch.float64, scale: float = 1.0) -> torch.Tensor:
    return (scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)).to(dtype)


# ----------------------------------------------------------------------------------------- the dtype rule
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_full_precision_is_computed_in_its_own_dtype(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    for choice in ("auto", "float32", "input"):
        monkeypatch.setenv(ROTATION_DTYPE_ENV, choice)
        assert rotation_compute_dtype("cpu", dtype) is dtype


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("native", [True, False])
def test_half_precision_follows_the_hardware_unless_overridden(
    dtype: torch.dtype, native: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(ROTATION_DTYPE_ENV, raising=False)
    monkeypatch.setattr(precision, "_cpu_multiplies_natively", lambda _: native)
    monkeypatch.setattr(precision, "_cpu_half_product_is_faster", lambda _: True)
    assert rotation_compute_dtype("cpu", dtype) is (dtype if native else torch.float32)
    monkeypatch.setattr(precision, "_cpu_half_product_is_faster", lambda _: False)
    assert rotation_compute_dtype("cpu", dtype) is torch.float32  # native, but measured slower
    monkeypatch.setenv(ROTATION_DTYPE_ENV, "float32")
    assert rotation_compute_dtype("cpu", dtype) is torch.float32
    monkeypatch.setenv(ROTATION_DTYPE_ENV, "input")
    assert rotation_compute_dtype(torch.device("cpu"), dtype) is dtype


def test_this_cpu_is_asked_the_way_torch_picks_its_native_half_precision_gemm() -> None:
    probes = {torch.bfloat16: "_is_mkldnn_bf16_supported", torch.float16: "_is_mkldnn_fp16_supported"}
    for dtype, probe in probes.items():
        expected = torch.backends.mkldnn.is_available() and bool(getattr(torch.ops.mkldnn, probe)())
        assert multiplies_natively("cpu", dtype) is expected
    assert multiplies_natively("cpu", torch.float32) and multiplies_natively("meta", torch.bfloat16)


def test_the_measurement_runs_once_and_answers_a_boolean() -> None:
    precision._cpu_half_product_is_faster.cache_clear()
    first = precision._cpu_half_product_is_faster(torch.bfloat16)
    assert isinstance(first, bool)
    assert precision._cpu_half_product_is_faster(torch.bfloat16) is first
    assert precision._cpu_half_product_is_faster.cache_info().hits >= 1


def test_unknown_override_names_the_variable_and_the_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ROTATION_DTYPE_ENV, "fp8")
    with pytest.raises(ValueError, match=rf"{ROTATION_DTYPE_ENV}='fp8'.*'float32'"):
        rotation_compute_dtype("cpu", torch.bfloat16)


# ------------------------------------------------------------------------------------- the mixed product
@FAST
@given(
    num_blocks=st.integers(1, 5),
    block_size=st.sampled_from([2, 5, 8, 32]),
    rows=st.integers(1, 6),
    row_major=st.sampled_from([True, False, None]),
    shared=st.booleans(),
    seed=seeds,
)
def test_bf16_activations_times_fp32_blocks_equal_the_dense_product(
    num_blocks: int, block_size: int, rows: int, row_major: bool | None, shared: bool, seed: int
) -> None:
    x = randn(rows, num_blocks * block_size, seed=seed, dtype=torch.bfloat16)
    stored = 1 if shared else num_blocks
    blocks = randn(stored, block_size, block_size, seed=seed + 1, dtype=torch.float32)
    out = rotate_activations(x, blocks, row_major=row_major)
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    reference = x.double() @ dense_block_diag(blocks.double(), num_blocks)
    assert rel_err(out, reference) <= 2**-8  # one bf16 rounding of the result


@FAST
@given(
    num_blocks=st.integers(2, 4),
    block_size=st.sampled_from([3, 8, 32]),
    rows=st.integers(1, 5),
    into_linear=st.booleans(),
    seed=seeds,
)
def test_mixed_product_gradients_equal_the_upcast_dense_products(
    num_blocks: int, block_size: int, rows: int, into_linear: bool, seed: int
) -> None:
    """bf16 x, fp32 blocks: the gradients are those of the fp32 dense product, rounded to each input's dtype."""
    width = num_blocks * block_size
    x = randn(rows, width, seed=seed, dtype=torch.bfloat16)
    blocks = randn(num_blocks, block_size, block_size, seed=seed + 1, dtype=torch.float32)
    weight = randn(5, width, seed=seed + 2, dtype=torch.bfloat16)
    upstream = randn(rows, 5 if into_linear else width, seed=seed + 3, dtype=torch.bfloat16)

    x_, b_ = x.clone().requires_grad_(True), blocks.clone().requires_grad_(True)
    out = rotate_activations(x_, b_, row_major=None)
    if into_linear:
        out = nn.functional.linear(out, weight)
    (out.float() * upstream.float()).sum().backward()
    assert x_.grad.dtype == torch.bfloat16 and b_.grad.dtype == torch.float32

    xd, bd = x.double().requires_grad_(True), blocks.double().requires_grad_(True)
    ref = xd @ torch.block_diag(*bd.unbind(0))
    if into_linear:
        ref = ref.to(torch.bfloat16).double() @ weight.double().t()  # the base layer reads bf16 activations
    (ref * upstream.double()).sum().backward()
    assert rel_err(x_.grad, xd.grad) <= 2e-2
    assert rel_err(b_.grad, bd.grad) <= 2e-2


def test_mixed_product_keeps_only_the_half_precision_input_for_backward() -> None:
    x = torch.randn(64, 96).to(torch.bfloat16).requires_grad_(True)
    blocks = torch.randn(3, 32, 32, requires_grad=True)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        rotate_activations(x, blocks, row_major=None)
    assert saved, "the product saved nothing for backward"
    assert all(t.dtype == torch.bfloat16 or t.numel() <= blocks.numel() for t in saved)
    assert max(t.numel() for t in saved if t.dtype == torch.float32) <= blocks.numel()


def test_layout_follows_whether_a_gradient_flows() -> None:
    x = torch.randn(6, 64)
    blocks = torch.randn(2, 32, 32)
    with torch.no_grad():
        assert rotate_activations(x, blocks, row_major=None).is_contiguous()
    trained = blocks.clone().requires_grad_(True)
    column_major = rotate_activations(x, trained, row_major=None)
    assert column_major.t().is_contiguous() and not column_major.is_contiguous()
    for layout in (True, False):
        with torch.no_grad():
            out = rotate_activations(x, blocks, row_major=layout)
        assert out.is_contiguous() is layout
        assert rel_err(out, x.double() @ dense_block_diag(blocks.double())) <= 1e-5


@pytest.mark.parametrize("native", [True, False])
def test_half_precision_training_layout_follows_the_hardware(native: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where bf16 matmuls are emulated the base layer's GEMM is far slower on column-major input: row-major."""
    monkeypatch.setattr(precision, "_cpu_multiplies_natively", lambda _: native)
    x = torch.randn(6, 64).to(torch.bfloat16)
    blocks = torch.randn(2, 32, 32, requires_grad=True)
    out = rotate_activations(x, blocks.to(rotation_compute_dtype("cpu", torch.bfloat16)), row_major=None)
    assert out.is_contiguous() is not native
    assert rel_err(out, x.double() @ dense_block_diag(blocks.detach().double())) <= 2e-2  # bf16 blocks if native


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("rows", [1, 3, 16, 17])
@pytest.mark.parametrize("block_size", [8, 32])
def test_few_rows_path_equals_the_dense_product(grad: bool, rows: int, block_size: int) -> None:
    """A few tokens (generation) take a shorter path without gradients; all paths are the same product."""
    x = torch.randn(rows, 1, 3 * block_size, dtype=torch.float64)
    blocks = torch.randn(3, block_size, block_size, dtype=torch.float64, requires_grad=grad)
    out = rotate_activations(x, blocks, row_major=None)
    assert out.is_contiguous() is (not grad or rows == 1)  # one row is both layouts at once
    assert rel_err(out, x @ torch.block_diag(*blocks.detach().unbind(0))) <= 1e-12
    mixed = rotate_activations(x.float().to(torch.bfloat16), blocks.detach().float(), row_major=None)
    assert mixed.dtype == torch.bfloat16 and rel_err(mixed, out) <= 2**-7


def test_one_strided_row() -> None:
    blocks = torch.randn(3, 32, 32, dtype=torch.float64)
    strided = torch.randn(1, 192, dtype=torch.float64)[:, ::2]  # one row whose features are not contiguous
    with torch.no_grad():
        assert rel_err(rotate_activations(strided, blocks), strided @ torch.block_diag(*blocks.unbind(0))) <= 1e-12


# --------------------------------------------------------------------------- the layers, both compute paths
def _bf16_step(
    layer_factory: Callable[[], nn.Module], monkeypatch: pytest.MonkeyPatch, choice: str, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], torch.Tensor]:
    monkeypatch.setenv(ROTATION_DTYPE_ENV, choice)
    layer = layer_factory()
    inputs = x.clone().requires_grad_(True)
    out = layer(inputs)
    out.float().square().mean().backward()
    with torch.no_grad():
        inference = layer.eval()(x)
    grads = [p.grad for p in layer.parameters() if p.requires_grad]
    return out, inputs.grad, grads, inference


def _oft() -> nn.Module:
    torch.manual_seed(3)
    return oft.Linear(nn.Linear(64, 48).to(torch.bfloat16), "default", r=0, oft_block_size=16, init_weights=False)


def _boft() -> nn.Module:
    torch.manual_seed(3)
    return boft.Linear(
        nn.Linear(64, 48).to(torch.bfloat16), "default", boft_block_size=8, boft_n_butterfly_factor=2,
        boft_dropout=0.0, init_weights=False,
    )  # fmt: skip


@pytest.mark.parametrize("factory", [_oft, _boft], ids=["oft", "boft"])
def test_both_compute_paths_agree_to_bf16_rounding(
    factory: Callable[[], nn.Module], monkeypatch: pytest.MonkeyPatch
) -> None:
    x = torch.randn(4, 5, 64).to(torch.bfloat16)
    upcast = _bf16_step(factory, monkeypatch, "float32", x)
    native = _bf16_step(factory, monkeypatch, "input", x)
    for a, b in zip(upcast[:2], native[:2], strict=True):
        assert a.dtype == b.dtype == torch.bfloat16
        assert rel_err(a, b) <= 3e-2
    for a, b in zip(upcast[2], native[2], strict=True):
        assert a.dtype == b.dtype == torch.float32
        assert rel_err(a, b) <= 5e-2
    assert rel_err(upcast[3], native[3]) <= 3e-2
    assert rel_err(upcast[0], upcast[3]) <= 1e-2  # the training forward and the cached inference forward


# ---------------------------------------------------------------------------------- the small math pieces
@FAST
@given(block_size=st.integers(1, 9), batch=st.lists(st.integers(1, 3), max_size=2), seed=seeds)
def test_skew_from_packed_equals_the_loop_reference(block_size: int, batch: list[int], seed: int) -> None:
    packed = randn(*batch, block_size * (block_size - 1) // 2, seed=seed)
    assert torch.equal(skew_from_packed(packed, block_size), skew_reference(packed, block_size))


def test_skew_from_packed_passes_gradcheck_and_gradgradcheck() -> None:
    packed = randn(3, 10, seed=0).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda p: skew_from_packed(p, 5), (packed,))
    assert torch.autograd.gradgradcheck(lambda p: skew_from_packed(p, 5), (packed,))


@pytest.mark.parametrize("num_terms", [2, 3, 4, 5, 8])
def test_neumann_series_passes_gradcheck(num_terms: int) -> None:
    q = randn(2, 3, 4, 4, seed=num_terms, scale=0.3)
    q = (q - q.transpose(-1, -2)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: cayley_neumann(t, num_terms), (q,))
    eye = torch.eye(4, dtype=torch.float64)
    textbook = (eye + q) @ sum(torch.linalg.matrix_power(q, k) for k in range(num_terms - 1))
    assert rel_err(cayley_neumann(q, num_terms), textbook) <= 1e-13


def test_bf16_layer_compiles_without_graph_breaks() -> None:
    """The hardware decisions run once while tracing (constants), and the product takes no strided out= there."""
    torch.manual_seed(0)
    layer = oft.Linear(nn.Linear(64, 32).to(torch.bfloat16), "default", r=0, oft_block_size=16, init_weights=False)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(20, 64).to(torch.bfloat16)
    inputs = x.clone().requires_grad_(True)
    out = compiled(inputs)
    out.float().square().sum().backward()
    assert rel_err(out, layer(x)) == 0 and inputs.grad is not None
    layer.eval()
    with torch.no_grad():
        assert rel_err(compiled(x), layer(x)) == 0
