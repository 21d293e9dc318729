"""Adapter strength (``set_scale``, ``scale_layer``, ``unscale_layer``): ``R(t·Q)`` stays a rotation.

Truths: the textbook Cayley transform of ``t·Q`` in float64 (``references.cayley_reference``), eigenvalues of
``Q`` (the angle ``2·arctan(tω)``), dense forward references built from the packed parameters, peft 0.21.2's
LoRA layer for the meaning of the three methods, and round trips (merge → unmerge, ``t`` then ``-t``).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from references import cayley_reference, rel_err, rotation_reference, skew_reference
from torch import nn

import orthotune
from orthotune import boft, oft
from orthotune.functional import (
    butterfly_dense,
    butterfly_permutations,
    orthogonality_error,
    output_scale_at_strength,
    packed_size,
    rotation_at_strength,
)

FAST = settings(max_examples=25, deadline=None)


def random_skew(batch: int, size: int, scale: float, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    packed = torch.randn(batch, packed_size(size), generator=generator, dtype=torch.float64) * scale
    return skew_reference(packed, size)


# ------------------------------------------------------------------------------------------- functional
@FAST
@given(
    size=st.integers(2, 10),
    scale=st.sampled_from([0.01, 0.3, 3.0, 30.0]),
    strength=st.floats(-5, 5, allow_nan=False),
    seed=st.integers(0, 2**20),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_rotation_at_strength_is_the_cayley_transform_of_t_q_and_orthogonal(
    size: int, scale: float, strength: float, seed: int, dtype: torch.dtype
) -> None:
    q = random_skew(3, size, scale, seed)
    rotation = rotation_at_strength(q.to(dtype), strength)
    assert rotation.dtype == dtype
    assert rel_err(rotation, cayley_reference(strength * q)) < (1e-5 if dtype == torch.float32 else 1e-10)
    assert float(orthogonality_error(rotation.double())) < (1e-5 if dtype == torch.float32 else 1e-12)


def test_strength_zero_one_minus_one() -> None:
    q = random_skew(4, 6, 0.7, seed=1)
    eye = torch.eye(6, dtype=torch.float64).expand(4, 6, 6)
    assert torch.equal(rotation_at_strength(q, 0.0), eye)
    assert torch.equal(rotation_at_strength(q, 1.0), rotation_at_strength(q, 1))
    forward, backward = rotation_at_strength(q, 1.0), rotation_at_strength(q, -1.0)
    assert rel_err(backward, forward.transpose(-1, -2)) < 1e-12  # R(-Q) = R(Q)ᵀ = R(Q)⁻¹
    assert rel_err(forward @ backward, eye) < 1e-12


@FAST
@given(omega=st.floats(0.05, 5.0), strength=st.floats(-4, 4), seed=st.integers(0, 2**20))
def test_the_cayley_curve_turns_each_plane_of_q_by_two_arctan_t_omega(omega: float, strength: float, seed: int) -> None:
    """In an orthonormal basis where Q turns a plane at rate ω, R(tQ) turns it by 2·arctan(tω), nothing else."""
    basis, _ = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    plane = torch.zeros(4, 4, dtype=torch.float64)
    plane[0, 1], plane[1, 0] = omega, -omega  # the other plane does not turn
    q = basis @ plane @ basis.T
    angles = torch.linalg.eigvals(rotation_at_strength(q, strength)).angle().abs().sort().values
    expected = abs(2 * math.atan(strength * omega))
    assert angles[-1].item() == pytest.approx(expected, abs=1e-9)
    assert angles[:2].abs().max().item() < 1e-7


def test_twice_the_strength_is_not_the_square_of_the_rotation() -> None:
    """R(2Q) goes twice as far along the Cayley curve; R(Q)² is a different rotation (angles not linear in t)."""
    q = random_skew(1, 4, 0.8, seed=2)
    twice, squared = rotation_at_strength(q, 2.0), rotation_at_strength(q, 1.0) @ rotation_at_strength(q, 1.0)
    assert float(orthogonality_error(twice)) < 1e-12 and float(orthogonality_error(squared)) < 1e-12
    assert (twice - squared).abs().max() > 0.1
    assert rel_err(twice @ rotation_at_strength(q, 1.0), rotation_at_strength(q, 1.0) @ twice) < 1e-12  # same planes
    small = random_skew(1, 4, 1e-3, seed=2)  # to first order in ‖Q‖ the two agree
    second = rotation_at_strength(small, 1.0) @ rotation_at_strength(small, 1.0)
    assert (rotation_at_strength(small, 2.0) - second).abs().max() < 1e-7


def test_linear_blends_of_lycoris_and_comfyui_are_not_rotations() -> None:
    """LyCORIS: I + s(R − I); ComfyUI: I + s²(R − I). Neither is orthogonal for s = 0.5 or 2; ComfyUI's −s is +s."""
    q = random_skew(1, 6, 0.5, seed=3)[0]
    rotation, eye = cayley_reference(q), torch.eye(6, dtype=torch.float64)
    for s in (0.5, 2.0, -1.0):
        lycoris = eye + s * (rotation - eye)
        assert torch.linalg.matrix_norm(lycoris.T @ lycoris - eye) > 1e-2
        ours = rotation_at_strength(q, s)
        assert torch.linalg.matrix_norm(ours.T @ ours - eye) < 1e-12
    comfy = {s: eye + s * s * (rotation - eye) for s in (0.5, -0.5)}
    assert torch.equal(comfy[0.5], comfy[-0.5])  # no way to invert an adapter
    assert torch.linalg.matrix_norm(comfy[0.5].T @ comfy[0.5] - eye) > 1e-2


def test_output_scale_at_strength() -> None:
    s = torch.tensor([0.5, 1.0, 2.0, 3.0, -0.5, 0.0])
    assert torch.equal(output_scale_at_strength(s, 1.0), s)
    assert torch.equal(output_scale_at_strength(s, 0.0), torch.ones(6))
    positive = s[:4]
    assert torch.allclose(output_scale_at_strength(positive, 2.5), positive**2.5)
    assert torch.allclose(output_scale_at_strength(positive, -1.0) * positive, torch.ones(4))  # s⁻¹ undoes s
    assert torch.allclose(  # s^a s^b = s^(a+b)
        output_scale_at_strength(positive, 0.3) * output_scale_at_strength(positive, 1.2),
        output_scale_at_strength(positive, 1.5),
    )
    assert torch.allclose(output_scale_at_strength(s[4:], 2.0), 1 + 2.0 * (s[4:] - 1))  # s ≤ 0: linear blend
    scale = torch.tensor([0.7, -0.2], requires_grad=True)
    output_scale_at_strength(scale, 0.5).sum().backward()
    assert torch.isfinite(scale.grad).all()


# ---------------------------------------------------------------------------------------------- layers
D = 12


def _oft_layer(kind: str, **options) -> oft.OFTLayer:
    torch.manual_seed(0)
    if kind == "linear":
        return oft.Linear(nn.Linear(D, 5), "a", r=0, oft_block_size=4, init_weights=False, **options)
    if kind == "conv2d":
        return oft.Conv2d(nn.Conv2d(2, 3, (3, 2), padding=1), "a", r=0, oft_block_size=4, init_weights=False, **options)
    return oft.Embedding(nn.Embedding(7, D), "a", r=0, oft_block_size=4, init_weights=False, **options)


def _oft_input(kind: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(5)
    if kind == "linear":
        return torch.randn(2, 3, D, generator=generator)
    if kind == "conv2d":
        return torch.randn(2, 2, 5, 4, generator=generator)
    return torch.randint(0, 7, (2, 3), generator=generator)


def _oft_reference(layer: oft.OFTLayer, x: torch.Tensor, strength: float) -> torch.Tensor:
    """The base layer with the dense float64 rotation R(t·Q) applied where the layer applies it."""
    rotation = rotation_reference(strength * layer.oft_R["a"].weight.detach(), 4, D // 4)
    base = layer.base_layer
    if isinstance(base, nn.Linear):
        return x.double() @ rotation @ base.weight.double().T + base.bias.double()
    if isinstance(base, nn.Embedding):
        return base.weight.double()[x] @ rotation
    weight = (base.weight.double().reshape(3, -1) @ rotation.T).reshape(base.weight.shape)
    return torch.nn.functional.conv2d(x.double(), weight, base.bias.double(), padding=1)


@pytest.mark.parametrize("kind", ["linear", "conv2d", "embedding"])
@pytest.mark.parametrize("strength", [0.0, 0.5, -1.0, 2.0])
def test_oft_layer_at_strength_equals_dense_reference_merged_and_unmerged(kind: str, strength: float) -> None:
    layer = _oft_layer(kind, use_cayley_neumann=False)
    x = _oft_input(kind)
    original = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        base_output = layer.base_layer(x)
    layer.set_scale("a", strength)
    assert layer.scaling["a"] == strength
    with torch.no_grad():
        unmerged = layer(x)
        assert rel_err(unmerged, _oft_reference(layer, x, strength)) < 1e-5
        if strength == 0:
            assert rel_err(unmerged, base_output) < 1e-6
        layer.merge()
        assert rel_err(layer(x), unmerged) < 1e-5
        layer.unmerge()
    assert rel_err(layer.base_layer.weight, original) < 1e-6


def test_oft_get_delta_weight_uses_the_strength() -> None:
    layer = _oft_layer("linear", use_cayley_neumann=False)
    layer.set_scale("a", -0.7)
    expected = rotation_reference(-0.7 * layer.oft_R["a"].weight.detach(), 4, D // 4)
    assert rel_err(layer.get_delta_weight("a"), expected) < 1e-6


def test_a_merged_adapter_keeps_its_strength_until_unmerged() -> None:
    layer = _oft_layer("linear", use_cayley_neumann=False)
    layer.set_scale("a", 0.5)
    layer.merge()
    with pytest.raises(ValueError, match="merged at strength 0.5.*unmerge"):
        layer.set_scale("a", 2.0)
    with pytest.raises(ValueError, match="merged"):
        layer.scale_layer(3.0)
    layer.set_scale("a", 0.5)  # the same value is no change
    layer.unmerge()
    layer.set_scale("a", 2.0)
    for bad in (math.nan, math.inf, "1", True):
        with pytest.raises(ValueError, match="finite real number"):
            layer.set_scale("a", bad)
    with pytest.raises(ValueError, match="non-zero"):
        layer.unscale_layer(0)


def test_scale_methods_mean_what_peft_lora_means() -> None:
    """The same calls on peft's LoRA layer and on ours leave the same multiple of the initial scale."""
    from peft import LoraConfig
    from peft.tuners.lora import Linear as LoraLinear

    lora = LoraLinear(nn.Linear(D, 5), "a", r=4, lora_alpha=8, config=LoraConfig(r=4, lora_alpha=8))
    lora.update_layer("b", r=4, lora_alpha=8, config=LoraConfig(r=4, lora_alpha=8))
    ours = _oft_layer("linear")
    ours.update_layer("b", r=0, oft_block_size=4)
    for layer in (lora, ours):
        layer.set_adapter(["a", "b"])
    calls = [
        ("set_scale", ("a", 0.5)),
        ("scale_layer", (3.0,)),
        ("set_scale", ("missing", 9.0)),
        ("unscale_layer", (2.0,)),
        ("scale_layer", (1,)),
        ("set_scale", ("b", -1.5)),
    ]
    for method, args in calls:
        getattr(lora, method)(*args)
        getattr(ours, method)(*args)
        for name in ("a", "b"):
            assert ours.scaling[name] == pytest.approx(lora.scaling[name] / 2.0)  # lora_alpha / r = 2
    lora.unscale_layer(None)
    ours.unscale_layer(None)
    assert ours.scaling == {"a": 1.0, "b": 1.0} and lora.scaling == {"a": 2.0, "b": 2.0}
    ours.set_adapter("a")
    ours.scale_layer(4.0)  # active adapters only
    assert ours.scaling == {"a": 4.0, "b": 1.0}
    ours.delete_adapter("b")
    assert "b" not in ours.scaling


def test_neumann_mode_scales_q_and_warns_when_the_strength_nears_divergence() -> None:
    layer = _oft_layer("linear", use_cayley_neumann=True, num_cayley_neumann_terms=6)
    with torch.no_grad():
        layer.oft_R["a"].weight.mul_(0.2 / layer.oft_R["a"].weight.norm(dim=-1, keepdim=True))  # ‖Q‖₂ ≤ 0.2
    x = _oft_input("linear")
    for strength in (0.0, 1.0, -2.0):
        layer.set_scale("a", strength)
        # The series at t·Q is off from the exact R(t·Q) by ‖tQ‖₂^(n-1) at most.
        bound = (abs(strength) * 0.2) ** 5
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            output = layer(x)
        assert rel_err(output, _oft_reference(layer, x, strength)) < 10 * bound + 1e-6
    layer.set_scale("a", 5.0)  # ‖5Q‖₂ up to 1: checked on the very next call, not 32 calls later
    with pytest.warns(UserWarning, match="at strength 5.*smaller strength"):
        layer(x)


# ------------------------------------------------------------------------------------------------ BOFT
def _boft_layer(kind: str, factors: int) -> boft.BOFTLayer:
    torch.manual_seed(0)
    base = nn.Linear(8, 5) if kind == "linear" else nn.Conv2d(2, 3, 2, padding=1)
    layer = (boft.Linear if kind == "linear" else boft.Conv2d)(
        base, "a", boft_block_size=2, boft_n_butterfly_factor=factors, init_weights=False, boft_dropout=0.0
    )
    return layer


def _boft_reference(layer: boft.BOFTLayer, x: torch.Tensor, strength: float) -> torch.Tensor:
    """Dense float64: x M(t) Wᵀ scaled by s^t (bias unscaled), from the stored parameters."""
    squares = layer.boft_R["a"].detach().double()
    blocks = cayley_reference(strength * 0.5 * (squares.transpose(-1, -2) - squares))
    m = layer.boft_R["a"].shape[0]
    rotation = butterfly_dense(blocks, butterfly_permutations(8, 2, m))
    stored = layer.boft_s["a"].detach().double().reshape(-1)
    scale = stored.abs() ** strength  # every stored scale is positive here
    base = layer.base_layer
    weight = (base.weight.double().reshape(base.weight.shape[0], -1) @ rotation.T) * scale[:, None]
    if isinstance(base, nn.Linear):
        return x.double() @ weight.T + base.bias.double()
    return torch.nn.functional.conv2d(x.double(), weight.reshape(base.weight.shape), base.bias.double(), padding=1)


@pytest.mark.parametrize(("kind", "factors"), [("linear", 1), ("linear", 3), ("conv2d", 2)])
@pytest.mark.parametrize("strength", [0.0, 0.6, -1.0, 2.0])
def test_boft_layer_at_strength_equals_dense_reference(kind: str, factors: int, strength: float) -> None:
    layer = _boft_layer(kind, factors)
    assert (layer.boft_s["a"] > 0).all()
    x = torch.randn(2, 3, 8) if kind == "linear" else torch.randn(2, 2, 3, 4)
    original = layer.base_layer.weight.detach().clone()
    layer.set_scale("a", strength)
    with torch.no_grad():
        unmerged = layer(x)
        assert rel_err(unmerged, _boft_reference(layer, x, strength)) < 1e-5
        if strength == 0:
            assert rel_err(unmerged, layer.base_layer(x)) < 1e-6
        layer.merge()
        assert rel_err(layer(x), unmerged) < 1e-5
        layer.unmerge()
    assert rel_err(layer.base_layer.weight, original) < 1e-6


def test_boft_one_factor_at_minus_one_undoes_the_adapter() -> None:
    """Two adapters with the same parameters, one at strength -1: together they are the base layer."""
    layer = _boft_layer("linear", 1)
    layer.update_layer("inverse", boft_block_size=2, boft_dropout=0.0)
    with torch.no_grad():
        layer.boft_R["inverse"].copy_(layer.boft_R["a"])
        layer.boft_s["inverse"].copy_(layer.boft_s["a"])
    layer.set_scale("inverse", -1.0)
    layer.set_adapter(["a", "inverse"])
    x = torch.randn(4, 8)
    with torch.no_grad():
        assert rel_err(layer(x), layer.base_layer(x)) < 1e-5


# ----------------------------------------------------------------------------------------------- model
def test_model_set_scale_reaches_every_layer_and_checks_first() -> None:
    from tiny_models import tiny_llama, token_batch

    config = orthotune.OFTConfig(
        oft_block_size=8, target_modules=["q_proj", "v_proj"], init_weights=False, use_cayley_neumann=False
    )
    model = orthotune.get_peft_model(tiny_llama(), config)
    tokens = token_batch()
    with torch.no_grad():
        trained = model(input_ids=tokens).logits
        with model.disable_adapter():
            base = model(input_ids=tokens).logits
        model.set_scale("default", 0.0)
        assert rel_err(model(input_ids=tokens).logits, base) < 1e-6
        model.set_scale("default", 1.0)
        assert torch.equal(model(input_ids=tokens).logits, trained)
    layers = [module for module in model.modules() if isinstance(module, orthotune.AdapterLayer)]
    layers[-1].merge()  # one merged layer: the model refuses before changing any layer
    with pytest.raises(ValueError, match="merged"):
        model.set_scale("default", 0.3)
    assert all(layer.scaling["default"] == 1.0 for layer in layers)
    with pytest.raises(ValueError, match="adapters"):
        model.set_scale("missing", 1.0)
