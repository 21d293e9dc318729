"""Output-side rotations (``rotation_side="output"``): functional math and OFT/BOFT layers against dense references.

An output-side adapter computes ``y = (x Wᵀ) R ⊙ s + b`` (the bias is not rotated) and merges as
``W ↦ s ⊙ (Rᵀ W)``. References here are dense float64 products written from that definition: rotations from
``references`` (``torch.linalg.inv``, ``torch.block_diag``), LyCORIS's butterfly from permutation matrices built by
Python loops, Conv2d outputs rotated channel by channel after ``F.conv2d``. LyCORIS's own outputs are compared in
``test_lycoris_formats.py``.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from references import cayley_reference, dense_block_diag, randn, rel_err, rotation_reference, skew_reference
from torch import nn
from transformers.pytorch_utils import Conv1D

from orthotune import boft, oft
from orthotune.config import BOFTConfig, OFTConfig
from orthotune.functional import (
    cayley_exact,
    cayley_inverse,
    lycoris_butterfly_dense,
    lycoris_butterfly_fits,
    lycoris_butterfly_max_factors,
    lycoris_butterfly_rotate_activations,
    lycoris_butterfly_rotate_weight,
    lycoris_butterfly_unrotate_activations,
    lycoris_butterfly_unrotate_weight,
    packed_size,
    project_packed_jointly,
    project_skew_jointly,
    rotate_outputs,
    rotate_weight_outputs,
    skew_from_packed,
    unrotate_weight_outputs,
)

FAST = settings(max_examples=25, deadline=None)
seeds = st.integers(0, 2**31 - 1)


# ------------------------------------------------------------------------------- dense LyCORIS butterfly
def interleave_matrix(features: int, half: int) -> torch.Tensor:
    """``P`` with ``(y P)_j = y_π(j)``: in each chunk of ``2·half``, position ``2·t + g`` reads ``g·half + t``."""
    matrix = torch.zeros(features, features, dtype=torch.float64)
    for chunk in range(0, features, 2 * half):
        for t in range(half):
            for g in range(2):
                matrix[chunk + g * half + t, chunk + 2 * t + g] = 1.0
    return matrix


def lycoris_butterfly_reference(blocks: torch.Tensor) -> torch.Tensor:
    """Dense ``M = Π_i P_i diag(B_i) P_iᵀ`` (stage 0 leftmost), from permutation matrices."""
    num_factors, num_blocks, block_size, _ = blocks.shape
    features = num_blocks * block_size
    total = torch.eye(features, dtype=torch.float64)
    for factor in range(num_factors):
        permutation = interleave_matrix(features, 2**factor * (block_size // 2))
        total = total @ permutation @ dense_block_diag(blocks[factor].double()) @ permutation.T
    return total


# ---------------------------------------------------------------------------------------- functional
@FAST
@given(
    num_blocks=st.integers(1, 5),
    block_size=st.integers(1, 8),
    batch=st.lists(st.integers(1, 3), max_size=2),
    shared=st.booleans(),
    scaled=st.booleans(),
    seed=seeds,
)
def test_rotate_outputs_and_merged_weight_equal_dense_products(
    num_blocks: int, block_size: int, batch: list[int], shared: bool, scaled: bool, seed: int
) -> None:
    width = num_blocks * block_size
    y = randn(*batch, width, seed=seed)
    blocks = randn(1 if shared else num_blocks, block_size, block_size, seed=seed + 1)
    scale = randn(width, seed=seed + 2) if scaled else None
    dense = dense_block_diag(blocks, num_blocks)
    expected = y @ dense * (1.0 if scale is None else scale)
    out = rotate_outputs(y, blocks, scale)
    assert out.is_contiguous() and rel_err(out, expected) <= 1e-12
    weight = randn(width, 7, seed=seed + 3)
    merged = rotate_weight_outputs(weight, blocks, scale)
    dense_merged = dense.T @ weight * (1.0 if scale is None else scale[:, None])
    assert rel_err(merged, dense_merged) <= 1e-12
    x = randn(3, 7, seed=seed + 4)
    assert rel_err(x @ merged.T, rotate_outputs(x @ weight.T, blocks, scale)) <= 1e-12


@FAST
@given(
    num_blocks=st.integers(1, 5),
    block_size=st.integers(1, 6),
    shared=st.booleans(),
    scaled=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=seeds,
)
def test_unrotate_weight_outputs_inverts_the_merge_also_for_non_orthogonal_blocks(
    num_blocks: int, block_size: int, shared: bool, scaled: bool, dtype: torch.dtype, seed: int
) -> None:
    width = num_blocks * block_size
    weight = randn(width, 5, seed=seed, dtype=dtype)
    blocks = torch.eye(block_size, dtype=dtype) + 0.2 * randn(
        1 if shared else num_blocks, block_size, block_size, seed=seed + 1, dtype=dtype
    )
    scale = (1.0 + 0.3 * randn(width, seed=seed + 2)).to(dtype) if scaled else None
    restored = unrotate_weight_outputs(rotate_weight_outputs(weight, blocks, scale), blocks, scale)
    assert rel_err(restored, weight) <= (1e-5 if dtype == torch.float32 else 1e-12)


@FAST
@given(
    log_blocks=st.integers(0, 3),
    half=st.integers(1, 3),
    batch=st.lists(st.integers(1, 3), max_size=2),
    scaled=st.booleans(),
    data=st.data(),
    seed=seeds,
)
def test_lycoris_butterfly_equals_permutation_matrix_reference(
    log_blocks: int, half: int, batch: list[int], scaled: bool, data: st.DataObject, seed: int
) -> None:
    block_size, num_blocks = 2 * half, 2**log_blocks
    num_factors = data.draw(st.integers(1, log_blocks + 1))
    width = num_blocks * block_size
    blocks = randn(num_factors, num_blocks, block_size, block_size, seed=seed)
    y = randn(*batch, width, seed=seed + 1)
    scale = randn(width, seed=seed + 2) if scaled else None
    dense = lycoris_butterfly_reference(blocks)
    expected = y @ dense * (1.0 if scale is None else scale)
    assert rel_err(lycoris_butterfly_rotate_activations(y, blocks, scale), expected) <= 1e-12
    assert rel_err(lycoris_butterfly_dense(blocks), dense) <= 1e-12
    weight = randn(width, 5, seed=seed + 3)
    merged = lycoris_butterfly_rotate_weight(weight, blocks, scale)
    assert rel_err(merged, dense.T @ weight * (1.0 if scale is None else scale[:, None])) <= 1e-12
    if scale is not None:
        scale = scale.abs() + 0.5  # invertible
    restored = lycoris_butterfly_unrotate_activations(
        lycoris_butterfly_rotate_activations(y, blocks, scale), blocks, scale
    )
    assert rel_err(restored, y) <= 1e-9
    merged = lycoris_butterfly_rotate_weight(weight, blocks, scale)
    assert rel_err(lycoris_butterfly_unrotate_weight(merged, blocks, scale), weight) <= 1e-9


def test_lycoris_butterfly_interleaves_even_the_first_stage_unlike_peft() -> None:
    """Stage 0 pairs feature j with j + b/2: with b = 2 it mixes features 0 and 1 through the block as written."""
    block = torch.tensor([[[[0.0, 1.0], [-1.0, 0.0]]]], dtype=torch.float64)  # (1, 1, 2, 2)
    y = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    assert torch.equal(lycoris_butterfly_rotate_activations(y, block), y @ block[0, 0])
    blocks = torch.zeros(1, 1, 4, 4, dtype=torch.float64)
    blocks[0, 0] = torch.eye(4)[[1, 0, 2, 3]]  # swaps the block's first two (interleaved) features
    y = torch.arange(4.0, dtype=torch.float64)[None]
    # interleaved order is [y0, y2, y1, y3]: swapping its first two swaps y0 and y2
    assert torch.equal(lycoris_butterfly_rotate_activations(y, blocks), torch.tensor([[2.0, 1.0, 0.0, 3.0]]).double())


def test_lycoris_butterfly_fit_rules_and_errors() -> None:
    assert lycoris_butterfly_fits(32, 4, 4) and not lycoris_butterfly_fits(32, 4, 5)
    assert not lycoris_butterfly_fits(12, 3, 1)  # odd blocks cannot be interleaved
    assert lycoris_butterfly_max_factors(32, 4) == 4 and lycoris_butterfly_max_factors(24, 4) == 2
    with pytest.raises(ValueError, match="at most 2 factors"):
        lycoris_butterfly_rotate_activations(torch.randn(2, 24), torch.randn(3, 6, 4, 4))


@FAST
@given(block_size=st.integers(2, 10), batch=st.integers(1, 4), scale=st.sampled_from([0.1, 1.0, 10.0]), seed=seeds)
def test_cayley_inverse_inverts_cayley_exact_both_ways(block_size: int, batch: int, scale: float, seed: int) -> None:
    packed = randn(batch, packed_size(block_size), seed=seed, scale=scale)
    q = skew_reference(packed, block_size)
    rotation = cayley_reference(q)
    assert rel_err(cayley_inverse(rotation), q) <= 1e-8
    assert rel_err(cayley_exact(cayley_inverse(rotation)), rotation) <= 1e-10


def test_cayley_inverse_refuses_a_half_turn() -> None:
    half_turn = torch.diag(torch.tensor([-1.0, -1.0, 1.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="eigenvalue at -1"):
        cayley_inverse(half_turn)


@FAST
@given(rows=st.integers(1, 4), block_size=st.integers(2, 6), radius=st.sampled_from([0.0, 0.1, 1.0, 100.0]), seed=seeds)
def test_joint_projection_bounds_the_norm_of_all_generators_together(
    rows: int, block_size: int, radius: float, seed: int
) -> None:
    packed = randn(rows, packed_size(block_size), seed=seed)
    skew = skew_reference(packed, block_size)
    projected = project_packed_jointly(packed, radius)
    assert rel_err(skew_reference(projected, block_size), project_skew_jointly(skew, radius)) <= 1e-12
    norm = torch.linalg.vector_norm(skew)
    if radius == 0 or norm + 1e-8 <= radius:
        assert torch.equal(projected, packed)
    else:  # one common factor for every block: LyCORIS's radius / (‖Q‖ + 1e-8)
        factor = radius / (norm + 1e-8)
        assert rel_err(projected, packed * factor) <= 1e-12
        assert torch.linalg.vector_norm(skew_reference(projected, block_size)) <= radius


# ------------------------------------------------------------------------------------------- layers
OUT = 16  # every test layer rotates 16 outputs


def oft_rotation_reference(rotation: oft.OFTRotationModule) -> torch.Tensor:
    """Dense float64 R of an OFT adapter, projections applied by their definitions."""
    packed = rotation.weight.detach().double()
    if rotation.constraint:
        norm = math.sqrt(2.0) * packed.norm()
        radius = rotation.constraint * rotation.in_features
        packed = packed * min(1.0, radius / (float(norm) + 1e-8))
    return rotation_reference(packed, rotation.block_size, rotation.num_blocks)


def lycoris_boft_reference(layer: boft.BOFTLayer, name: str) -> torch.Tensor:
    a = layer.boft_R[name].detach().double()
    q = 0.5 * (a.transpose(-1, -2) - a)
    constraint = layer.boft_constraint[name]
    if constraint:
        q = q * min(1.0, constraint * layer.out_features / (float(q.norm()) + 1e-8))
    return lycoris_butterfly_reference(cayley_reference(q))


def make_base(kind: str) -> tuple[nn.Module, torch.Tensor]:
    if kind == "linear":
        return nn.Linear(10, OUT), torch.randn(2, 3, 10)
    if kind == "conv1d":
        base = Conv1D(OUT, 10)  # transformers' GPT-2 layer: y = x W + b, W (in, out)
        nn.init.normal_(base.weight, std=0.3)
        nn.init.normal_(base.bias)
        return base, torch.randn(4, 10)
    if kind == "conv2d":
        return nn.Conv2d(3, OUT, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(2, 1)), torch.randn(2, 3, 9, 8)
    raise AssertionError(kind)


def bias_free_output(base: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x Wᵀ`` of the base layer in float64 with the output features last."""
    if isinstance(base, nn.Conv2d):
        out = F.conv2d(x.double(), base.weight.double(), None, base.stride, base.padding, base.dilation, base.groups)
        return out.movedim(1, -1)
    if isinstance(base, Conv1D):
        return x.double() @ base.weight.double()
    return x.double() @ base.weight.double().T


def output_side_reference(base: nn.Module, x: torch.Tensor, rotation: torch.Tensor, scale) -> torch.Tensor:
    out = bias_free_output(base, x) @ rotation
    if scale is not None:
        out = out * scale.double()
    out = out + base.bias.double()
    return out.movedim(-1, 1) if isinstance(base, nn.Conv2d) else out


def oft_layer(kind: str, **kwargs) -> tuple[oft.OFTLayer, nn.Module, torch.Tensor]:
    base, x = make_base(kind)
    original = copy.deepcopy(base)
    cls = oft.Conv2d if kind == "conv2d" else oft.Linear
    kwargs.setdefault("oft_block_size", 4)
    if kind == "conv1d":
        kwargs["fan_in_fan_out"] = True
    layer = cls(base, "a", r=0, rotation_side="output", init_weights=False, **kwargs)
    with torch.no_grad():
        layer.oft_R["a"].weight.normal_(0, 0.4)
    return layer, original, x


def boft_layer(kind: str, **kwargs) -> tuple[boft.BOFTLayer, nn.Module, torch.Tensor]:
    base, x = make_base(kind)
    original = copy.deepcopy(base)
    cls = boft.Conv2d if kind == "conv2d" else boft.Linear
    kwargs.setdefault("boft_block_size", 2)
    kwargs.setdefault("boft_n_butterfly_factor", 3)
    if kind == "conv1d":
        kwargs["fan_in_fan_out"] = True
    layer = cls(base, "a", rotation_side="output", boft_dropout=0.0, init_weights=False, **kwargs)
    with torch.no_grad():
        layer.boft_R["a"].normal_(0, 0.4)
    return layer, original, x


KINDS = ["linear", "conv1d", "conv2d"]
OFT_SETTINGS = {
    "exact": {},
    "rescale": {"rescale": True},
    "constraint": {"constraint": 0.05, "rescale": True},
    "neumann": {"use_cayley_neumann": True, "rescale": True},
    "shared": {"block_share": True},
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("setting", list(OFT_SETTINGS))
def test_oft_output_side_equals_dense_reference_merged_and_unmerged(kind: str, setting: str) -> None:
    kwargs = dict(OFT_SETTINGS[setting])
    if setting == "neumann":
        kwargs["num_cayley_neumann_terms"] = 12  # the series is then exact to fp32 for these small generators
    layer, original, x = oft_layer(kind, **kwargs)
    if setting == "neumann":
        with torch.no_grad():
            layer.oft_R["a"].weight.mul_(0.1)  # ‖Q‖₂ ≲ 0.15: truncation error ≲ 0.15^11
    rotation = layer.oft_R["a"]
    assert rotation.in_features == OUT and layer.r["a"] == OUT // 4
    expected = output_side_reference(original, x, oft_rotation_reference(rotation), rotation.rescale)
    assert rel_err(layer(x), expected) <= 2e-6
    layer.merge()
    assert rel_err(layer(x), expected) <= 2e-6
    layer.unmerge()
    assert rel_err(layer.base_layer.weight, original.weight) <= 1e-6


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("constraint", [0.0, 0.05])
def test_boft_output_side_equals_lycoris_butterfly_reference_merged_and_unmerged(kind: str, constraint: float) -> None:
    layer, original, x = boft_layer(kind, constraint=constraint)
    scale = layer.boft_s["a"].detach().flatten()
    expected = output_side_reference(original, x, lycoris_boft_reference(layer, "a"), scale)
    assert rel_err(layer(x), expected) <= 2e-6
    layer.merge()
    assert rel_err(layer(x), expected) <= 2e-6
    layer.unmerge()
    assert rel_err(layer.base_layer.weight, original.weight) <= 1e-6


@pytest.mark.parametrize("method", ["oft", "boft"])
@pytest.mark.parametrize("kind", KINDS)
def test_the_bias_is_not_rotated(method: str, kind: str) -> None:
    layer, original, x = oft_layer(kind, rescale=True) if method == "oft" else boft_layer(kind)
    zeros = torch.zeros_like(x)
    bias = original.bias.detach()
    expected = (
        bias.view(1, -1, 1, 1).expand_as(original(zeros)) if kind == "conv2d" else bias.expand_as(original(zeros))
    )
    assert rel_err(layer(zeros), expected) <= 1e-6
    assert not torch.allclose(layer(x), original(x), atol=1e-3)  # the adapter does act on the rest


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_outputs_keep_their_norm_without_rescale_even_with_dropout(kind: str) -> None:
    layer, original, x = oft_layer(kind, module_dropout=0.5)
    layer.train()
    centred = layer(x) - original.bias
    reference = bias_free_output(original, x)
    assert rel_err(centred.norm(dim=-1), reference.norm(dim=-1)) <= 1e-5
    assert not torch.allclose(centred.double(), reference, atol=1e-3)


def test_output_rotation_with_coft_uses_the_projected_generators() -> None:
    layer, original, x = oft_layer("linear", coft=True, eps=0.5)
    rotation = layer.oft_R["a"]
    packed = rotation.weight.detach().double()
    radius = 0.5 / math.sqrt(packed.shape[0])
    norms = math.sqrt(2.0) * packed.norm(dim=-1, keepdim=True)
    projected = packed * torch.clamp(radius / norms, max=1.0)
    dense = rotation_reference(projected, 4, OUT // 4)
    assert rel_err(layer(x), output_side_reference(original, x, dense, None)) <= 2e-6


def test_gradients_equal_autograd_through_the_dense_reference() -> None:
    layer, original, x = oft_layer("linear", rescale=True, constraint=0.1)
    rotation = layer.oft_R["a"]
    with torch.no_grad():
        rotation.rescale.uniform_(0.5, 1.5)
    upstream = torch.randn(2, 3, OUT, dtype=torch.float64)
    (layer(x).double() * upstream).sum().backward()

    packed = rotation.weight.detach().double().requires_grad_(True)
    scale = rotation.rescale.detach().double().requires_grad_(True)
    radius = 0.1 * OUT
    norm = math.sqrt(2.0) * packed.norm()
    constrained = packed * torch.clamp(radius / (norm + 1e-8), max=1.0)
    rows, cols = torch.triu_indices(4, 4, 1)
    upper = torch.zeros(OUT // 4, 4, 4, dtype=torch.float64)
    upper[:, rows, cols] = constrained
    q = upper - upper.transpose(-1, -2)
    eye = torch.eye(4, dtype=torch.float64)
    blocks = (eye + q) @ torch.linalg.inv(eye - q)
    reference = (x.double() @ original.weight.double().T) @ torch.block_diag(*blocks) * scale + original.bias.double()
    (reference * upstream).sum().backward()
    assert rel_err(rotation.weight.grad, packed.grad) <= 1e-5
    assert rel_err(rotation.rescale.grad, scale.grad) <= 1e-5


def test_boft_gradients_equal_autograd_through_the_dense_reference() -> None:
    layer, original, x = boft_layer("linear", boft_n_butterfly_factor=2)
    upstream = torch.randn(2, 3, OUT, dtype=torch.float64)
    (layer(x).double() * upstream).sum().backward()
    a = layer.boft_R["a"].detach().double().requires_grad_(True)
    scale = layer.boft_s["a"].detach().double().flatten().requires_grad_(True)
    q = 0.5 * (a.transpose(-1, -2) - a)
    eye = torch.eye(2, dtype=torch.float64)
    blocks = (eye + q) @ torch.linalg.inv(eye - q)
    dense = lycoris_butterfly_reference(blocks)
    reference = (x.double() @ original.weight.double().T) @ dense * scale + original.bias.double()
    (reference * upstream).sum().backward()
    assert rel_err(layer.boft_R["a"].grad, a.grad) <= 1e-5
    assert rel_err(layer.boft_s["a"].grad.flatten(), scale.grad) <= 1e-5


def test_rotation_blocks_are_orthogonal_and_the_merged_weight_keeps_column_norms() -> None:
    layer, original, _ = oft_layer("linear", constraint=0.2)
    blocks = layer.oft_R["a"].rotation_blocks().double()
    assert rel_err(blocks.transpose(-1, -2) @ blocks, torch.eye(4, dtype=torch.float64).expand_as(blocks)) <= 1e-6
    layer.merge()
    # Rᵀ W mixes the rows of W inside each block: every column's norm within a block is kept.
    merged = layer.base_layer.weight.detach().double().view(OUT // 4, 4, -1)
    assert rel_err(merged.norm(dim=1), original.weight.double().view(OUT // 4, 4, -1).norm(dim=1)) <= 1e-6


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_mixed_input_and_output_adapters_merge_to_what_forward_computes(kind: str) -> None:
    base, x = make_base(kind)
    cls = oft.Conv2d if kind == "conv2d" else oft.Linear
    layer = cls(base, "in", r=0, oft_block_size=2, init_weights=False)
    layer.update_layer("out1", r=0, oft_block_size=4, rotation_side="output", rescale=True, init_weights=False)
    layer.update_layer("out2", r=0, oft_block_size=8, rotation_side="output", init_weights=False)
    layer.update_layer("in2", r=0, oft_block_size=5 if kind == "linear" else 6, init_weights=False)
    for name in layer.adapter_names:
        with torch.no_grad():
            layer.oft_R[name].weight.normal_(0, 0.5)
    layer.set_adapter(["out1", "in", "out2", "in2"])
    unmerged = layer(x)
    original = base.weight.detach().clone()
    layer.merge()
    assert rel_err(layer(x), unmerged) <= 2e-6
    layer.unmerge()
    assert rel_err(base.weight, original) <= 1e-6


def test_boft_mixed_sides_merge_to_what_forward_computes() -> None:
    base, x = make_base("linear")
    layer = boft.Linear(base, "in", boft_block_size=2, boft_n_butterfly_factor=1, boft_dropout=0.0, init_weights=False)
    layer.update_layer("out", boft_block_size=4, boft_n_butterfly_factor=2, rotation_side="output", init_weights=False)
    layer.set_adapter(["in", "out"])
    unmerged = layer(x)
    layer.merge()
    assert rel_err(layer(x), unmerged) <= 2e-6


def test_output_side_in_half_precision_keeps_dtype_and_is_close() -> None:
    layer, original, x = oft_layer("linear", rescale=True)
    expected = output_side_reference(original, x, oft_rotation_reference(layer.oft_R["a"]), layer.oft_R["a"].rescale)
    layer.base_layer.to(torch.bfloat16)
    out = layer(x.bfloat16())
    assert out.dtype == torch.bfloat16 and layer.oft_R["a"].weight.dtype == torch.float32
    assert rel_err(out, expected) <= 3e-2


# ------------------------------------------------------------------------------------ configuration
def test_blocks_divide_out_features_on_the_output_side() -> None:
    layer = oft.Linear(nn.Linear(10, 12), "a", r=0, oft_block_size=4, rotation_side="output")
    assert layer.r["a"] == 3 and layer.oft_R["a"].in_features == 12
    with pytest.warns(UserWarning, match="does not divide the layer's 10 features"):
        oft.Linear(nn.Linear(12, 10), "a", r=0, oft_block_size=4, rotation_side="output")
    with pytest.raises(ValueError, match="even on the output side"):
        boft.Linear(nn.Linear(10, 12), "a", boft_block_size=3, boft_n_butterfly_factor=1, rotation_side="output")


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: oft.Linear(nn.Linear(4, 4), "a", r=2, rotation_side="sideways"), "rotation_side='sideways'"),
        (lambda: oft.Linear(nn.Linear(4, 4), "a", r=2, rescale=True), "rescale=True .* rotation_side='output'"),
        (lambda: oft.Linear(nn.Linear(4, 4), "a", r=2, constraint=-1.0), "constraint=-1.0"),
        (lambda: oft.Embedding(nn.Embedding(5, 4), "a", r=2, rotation_side="output"), "not for nn.Embedding"),
        (lambda: OFTConfig(rescale=True), "rescale=True .* rotation_side='output'"),
        (lambda: OFTConfig(rotation_side="out"), "rotation_side='out'"),
        (lambda: BOFTConfig(constraint="big"), "constraint='big'"),
    ],
)
def test_invalid_output_side_settings_are_refused_naming_the_argument(make, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()


def test_config_files_say_nothing_of_the_new_fields_at_their_defaults() -> None:
    """Input-side configs are saved exactly as peft saves them; an output-side one round-trips."""
    assert not {"rotation_side", "rescale", "constraint"} & set(OFTConfig().to_dict())
    assert not {"rotation_side", "constraint"} & set(BOFTConfig().to_dict())
    config = OFTConfig(oft_block_size=4, rotation_side="output", rescale=True, constraint=0.01)
    data = config.to_dict()
    assert (data["rotation_side"], data["rescale"], data["constraint"]) == ("output", True, 0.01)
    assert OFTConfig.from_dict(data) == config
    boft_config = BOFTConfig(rotation_side="output", constraint=0.5)
    assert BOFTConfig.from_dict(boft_config.to_dict()) == boft_config


def test_rescale_is_a_trainable_parameter_saved_with_the_adapter() -> None:
    layer, _, x = oft_layer("linear", rescale=True)
    rescale = layer.oft_R["a"].rescale
    assert isinstance(rescale, nn.Parameter) and rescale.requires_grad and rescale.shape == (OUT,)
    layer(x).sum().backward()
    assert rescale.grad is not None and rescale.grad.abs().sum() > 0
    assert "oft_R.a.rescale" in layer.state_dict()
    layer.update_layer("a", r=0, oft_block_size=4, rotation_side="output")  # replaced without rescale
    assert layer.oft_R["a"].rescale is None


def test_skew_from_packed_matches_what_the_rotation_module_uses() -> None:
    """Guard for the dense references above: the layer's generators are skew_reference of its parameters."""
    layer, _, _ = oft_layer("linear")
    rotation = layer.oft_R["a"]
    assert torch.equal(rotation.generators(), skew_from_packed(rotation.weight.float(), 4))
    assert rel_err(rotation.generators(), skew_reference(rotation.weight.detach(), 4)) == 0


@pytest.mark.parametrize(
    "config",
    [
        OFTConfig(oft_block_size=4, rotation_side="output", rescale=True, constraint=0.1, use_cayley_neumann=False),
        BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2, rotation_side="output"),
    ],
    ids=["oft", "boft"],
)
def test_a_model_config_makes_output_side_layers_that_save_and_reload(config, tmp_path) -> None:
    """peft's files cannot hold an output-side adapter (save_pretrained refuses, naming save_file); a LyCORIS
    file can, and loads back to the same outputs."""
    from orthotune import from_file, get_peft_model

    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16))
    original = copy.deepcopy(model)
    config.target_modules, config.init_weights = ["0", "2"], False
    wrapped = get_peft_model(model, config)
    layer = wrapped.get_submodule("base_model.model.0")
    assert layer.out_features == 16 and (
        layer.oft_R["default"].rescale is not None
        if isinstance(layer, oft.OFTLayer)
        else layer.rotation_side["default"] == "output"
    )
    with torch.no_grad():
        for parameter in wrapped.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter) * 0.2)
    x = torch.randn(3, 8)
    expected = wrapped(x)
    with pytest.raises(ValueError, match=r"rotation_side='output'.*save_file\(path, format='lycoris'\)"):
        wrapped.save_pretrained(tmp_path)
    assert not any(tmp_path.iterdir())
    wrapped.save_file(tmp_path / "adapter.safetensors")
    assert rel_err(from_file(original, tmp_path / "adapter.safetensors")(x), expected) <= 1e-6
