"""kohya sd-scripts' OFT files (:mod:`orthotune.formats.kohya`) against a reference transcribed from kohya.

sd-scripts is not installable as a package, so the reference below restates, in our own words, what
``networks/oft.py`` computes (kohya-ss/sd-scripts at commit 077f6a4ff2ae39d43db738644b9ac6419e8812aa):
``OFTModule.__init__`` (``constraint = alpha * out_dim``, ``block_size = out_dim // num_blocks``),
``OFTModule.get_weight`` (the clamp and the Cayley transform, with ``multiplier = 1``), ``OFTModule.forward`` (the
rotated weight used by ``F.linear``/``F.conv2d`` with the original bias) and ``OFTInfModule.merge_to`` (the
merged weight). Random kohya-format state dicts are read by orthotune, put into output-side OFT layers, and
their outputs and merged weights compared with the reference for Linear, 1×1 and 3×3 Conv2d layers, several
blocks, the clamp binding and not binding, and kohya's ``alpha = 0``.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from references import rel_err
from torch import nn

from orthotune import oft
from orthotune.formats import LayerAdapter, add_layer_adapter, kohya

TOLERANCE = 1e-5  # fp32: kohya inverts I - Q in fp32, orthotune solves in fp64 and rounds once


# --------------------------------------------------------------------------- reference (kohya's networks/oft.py)
def kohya_rotation_blocks(oft_blocks: torch.Tensor, alpha: float, out_dim: int) -> torch.Tensor:
    """``OFTModule.get_weight`` with ``multiplier = 1``: ``(D, b, b)`` blocks ``(I + Q)(I - Q)⁻¹`` of
    ``Q = A - Aᵀ``, all of them scaled together by ``(min(‖Q‖, alpha·out) + 1e-8) / (‖Q‖ + 1e-8)``."""
    blocks = oft_blocks.float()
    skew = blocks - blocks.transpose(1, 2)
    norm = torch.norm(skew.flatten())
    limited = torch.clamp(norm, max=alpha * out_dim)
    skew = skew * ((limited + 1e-8) / (norm + 1e-8))
    eye = torch.eye(blocks.shape[-1]).expand_as(skew)
    return torch.matmul(eye + skew, (eye - skew).float().inverse())


def kohya_rotated_weight(weight: torch.Tensor, oft_blocks: torch.Tensor, alpha: float) -> torch.Tensor:
    """The weight ``OFTModule.forward`` gives ``F.linear``/``F.conv2d`` (and ``OFTInfModule.merge_to`` writes):
    output rows grouped into ``D`` blocks of ``b``, block ``k`` replaced by ``r_kᵀ W_k``."""
    num_blocks, block_size = oft_blocks.shape[0], oft_blocks.shape[-1]
    out_dim = weight.shape[0]
    rotation = kohya_rotation_blocks(oft_blocks, alpha, out_dim)
    grouped = weight.float().reshape(num_blocks, block_size, *weight.shape[1:])
    rotated = torch.einsum("knm,kn...->km...", rotation, grouped)
    return rotated.reshape(weight.shape)


def kohya_forward(module: nn.Module, oft_blocks: torch.Tensor, alpha: float, x: torch.Tensor) -> torch.Tensor:
    """``OFTModule.forward``: the base op with the rotated weight and the original bias (not rotated)."""
    weight = kohya_rotated_weight(module.weight.detach(), oft_blocks, alpha).to(x.dtype)
    if isinstance(module, nn.Conv2d):
        return F.conv2d(x, weight, module.bias, module.stride, module.padding, module.dilation, module.groups)
    return F.linear(x, weight, module.bias)


# ----------------------------------------------------------------------------------------------- helpers
class UNetLike(nn.Module):
    """Module paths like a U-Net's: a linear attention projection, a 1×1 and a 3×3 convolution."""

    def __init__(self) -> None:
        super().__init__()
        self.down_blocks = nn.ModuleList([nn.Module()])
        block = self.down_blocks[0]
        block.attn = nn.Module()
        block.attn.to_q = nn.Linear(6, 12)
        block.proj_in = nn.Conv2d(4, 8, 1)
        block.conv1 = nn.Conv2d(3, 12, 3, padding=1)


INPUTS = {
    "down_blocks.0.attn.to_q": (2, 5, 6),
    "down_blocks.0.proj_in": (2, 4, 5, 3),
    "down_blocks.0.conv1": (2, 3, 7, 6),  # larger than the kernel
}


def kohya_state_dict(
    model: nn.Module, num_blocks: int, alpha: float, scale: float = 0.3, seed: int = 0, dtype=torch.float32
) -> dict[str, torch.Tensor]:
    """A file as kohya's ``OFTNetwork.save_weights`` writes it: ``oft_unet_<path with _>.oft_blocks`` and
    ``.alpha`` for every layer, one ``dim`` (number of blocks) for all of them."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name in INPUTS:
        out_dim = dict(model.named_modules())[name].weight.shape[0]
        block_size = out_dim // num_blocks
        key = "oft_unet_" + name.replace(".", "_")
        blocks = torch.randn(num_blocks, block_size, block_size, generator=generator) * scale
        state[f"{key}.oft_blocks"] = blocks.to(dtype)
        state[f"{key}.alpha"] = torch.tensor(alpha, dtype=dtype)
    return state


def orthotune_layers(model: nn.Module, adapters: dict[str, LayerAdapter]) -> dict[str, oft.OFTLayer]:
    modules = dict(copy.deepcopy(model).named_modules())
    layers: dict[str, oft.OFTLayer] = {}
    for name, adapter in adapters.items():
        base = modules[name]
        cls = oft.Conv2d if isinstance(base, nn.Conv2d) else oft.Linear
        layer = cls(base, "kohya", r=adapter.num_blocks, rotation_side="output")
        add_layer_adapter(layer, "kohya", adapter)
        layers[name] = layer
    return layers


def module_names(model: nn.Module) -> list[str]:
    return [name for name, _ in model.named_modules()]


# ------------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("alpha", [1.0, 0.02, 0.0])
@pytest.mark.parametrize("num_blocks", [2, 4])
def test_kohya_file_gives_kohya_outputs_and_merged_weights(num_blocks: int, alpha: float, dtype) -> None:
    model = UNetLike()
    state = kohya_state_dict(model, num_blocks, alpha, dtype=dtype)
    assert kohya.detect(state)
    adapters = kohya.read(state, module_names(model))
    assert sorted(adapters) == sorted(INPUTS)
    alpha = float(next(iter(value for key, value in state.items() if key.endswith(".alpha"))))  # as stored
    modules = dict(model.named_modules())
    for name, adapter in adapters.items():
        assert adapter.method == "oft" and adapter.rotation_side == "output"
        assert adapter.num_blocks == num_blocks and adapter.constraint == pytest.approx(alpha)
        blocks = state["oft_unet_" + name.replace(".", "_") + ".oft_blocks"].float()
        norm = float((blocks - blocks.transpose(1, 2)).norm())
        radius = alpha * modules[name].weight.shape[0]
        # The cases are what their names say: 1.0 never binds, 0.02 always does.
        assert (norm < radius) if alpha > 0.5 else (norm > radius), (name, norm, radius)

    layers = orthotune_layers(model, adapters)
    generator = torch.Generator().manual_seed(5)
    for name, shape in INPUTS.items():
        x = torch.randn(shape, generator=generator)
        with torch.no_grad():
            expected = kohya_forward(modules[name], state_oft_blocks(state, name), alpha, x)
            assert rel_err(layers[name](x), expected) <= TOLERANCE, name
            layers[name].merge()
            merged = kohya_rotated_weight(modules[name].weight.detach(), state_oft_blocks(state, name), alpha)
            assert rel_err(layers[name].base_layer.weight, merged) <= TOLERANCE, name
            assert rel_err(layers[name](x), expected) <= TOLERANCE, name
            assert torch.equal(layers[name].base_layer.bias, modules[name].bias)  # kohya never rotates the bias


def state_oft_blocks(state: dict[str, torch.Tensor], module: str) -> torch.Tensor:
    return state["oft_unet_" + module.replace(".", "_") + ".oft_blocks"]


def test_kohya_alpha_zero_is_the_identity_to_rounding() -> None:
    """kohya's ``alpha = 0`` clamps every generator to norm ~1e-8 (our constraint 0 would mean none)."""
    model = UNetLike()
    state = kohya_state_dict(model, 2, 0.0)
    adapters = kohya.read(state, module_names(model))
    for name, adapter in adapters.items():
        assert adapter.constraint == 0.0
        assert float(adapter.generators.norm()) * 2**0.5 == pytest.approx(1e-8, rel=1e-3)
        reference = kohya_rotation_blocks(state_oft_blocks(state, name), 0.0, 12)
        assert (reference - torch.eye(reference.shape[-1])).abs().max() < 1e-7


@settings(max_examples=25, deadline=None)
@given(
    num_blocks=st.integers(1, 4),
    block_size=st.integers(1, 5),
    in_features=st.integers(1, 5),
    kernel=st.sampled_from([0, 1, 3]),
    alpha=st.sampled_from([1e-3, 0.05, 1.0]),
    scale=st.sampled_from([0.01, 0.3, 2.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_kohya_reference_equals_ours_across_shapes(
    num_blocks: int, block_size: int, in_features: int, kernel: int, alpha: float, scale: float, seed: int
) -> None:
    """The same comparison for one layer, across block counts and sizes, kernels (0: linear), alphas (1e-3 is
    kohya's default) and generator scales (2.0: far from the identity)."""
    generator = torch.Generator().manual_seed(seed)
    out_dim = num_blocks * block_size
    base = nn.Linear(in_features, out_dim) if kernel == 0 else nn.Conv2d(in_features, out_dim, kernel, padding=1)
    x = torch.randn((3, in_features) if kernel == 0 else (2, in_features, 5, 4), generator=generator)
    blocks = torch.randn(num_blocks, block_size, block_size, generator=generator) * scale
    name = "oft_unet_layer"
    adapters = kohya.read({f"{name}.oft_blocks": blocks, f"{name}.alpha": torch.tensor(alpha)}, ["", "layer"])
    cls = oft.Conv2d if kernel else oft.Linear
    layer = cls(copy.deepcopy(base), "k", r=num_blocks, rotation_side="output")
    add_layer_adapter(layer, "k", adapters["layer"])
    with torch.no_grad():
        assert rel_err(layer(x), kohya_forward(base, blocks, alpha, x)) <= 2 * TOLERANCE


def test_kohya_names_under_a_pipeline_prefix() -> None:
    pipeline = nn.Module()
    pipeline.unet = UNetLike()
    state = kohya_state_dict(pipeline.unet, 2, 1e-3)
    names = module_names(pipeline)
    with pytest.raises(ValueError, match="kohya OFT layers match no module.*prefixes="):
        kohya.read(state, names)
    adapters = kohya.read(state, names, prefixes={"oft_unet": "unet"})
    assert sorted(adapters) == sorted("unet." + name for name in INPUTS)
    assert kohya.read(state, names, ignore_unmatched=True) == {}


def test_kohya_takes_the_first_alpha_for_every_layer(caplog: pytest.LogCaptureFixture) -> None:
    """``create_network_from_weights`` reads ``alpha`` from the first ``.alpha`` key and builds every layer
    with it."""
    model = UNetLike()
    state = kohya_state_dict(model, 2, 0.02)
    state["oft_unet_down_blocks_0_conv1.alpha"] = torch.tensor(0.5)
    with caplog.at_level(logging.WARNING, logger="orthotune.formats.kohya"):
        adapters = kohya.read(state, module_names(model))
    assert [adapter.constraint for adapter in adapters.values()] == pytest.approx([0.02] * 3)
    assert "different alphas" in caplog.text


def test_kohya_refuses_what_it_cannot_read_exactly() -> None:
    model = UNetLike()
    names = module_names(model)
    state = kohya_state_dict(model, 2, 1e-3)
    without_alpha = {key: value for key, value in state.items() if not key.endswith(".alpha")}
    with pytest.raises(ValueError, match="no '<layer>.alpha'"):
        kohya.read(without_alpha, names)
    flux = {"oft_unet_double_blocks_0_img_attn_qkv.oft_blocks.0": torch.zeros(2, 3, 3), **state}
    assert kohya.detect(flux)
    with pytest.raises(ValueError, match="oft_flux.py"):
        kohya.read(flux, names)
    extra = {**state, "oft_unet_down_blocks_0_conv1.rescale": torch.ones(12, 1, 1, 1)}
    assert not kohya.detect(extra)
    with pytest.raises(ValueError, match=r"holds \['rescale'\]"):
        kohya.read(extra, names)
    wrong_width = {"oft_unet_down_blocks_0_proj_in.oft_blocks": torch.zeros(3, 2, 2), "x.alpha": torch.tensor(1.0)}
    adapter = kohya.read(wrong_width, names, ignore_unmatched=True)["down_blocks.0.proj_in"]
    layer = oft.Conv2d(nn.Conv2d(4, 8, 1), "k", r=2, rotation_side="output")
    with pytest.raises(ValueError, match="give 6 features but the layer has 8"):
        add_layer_adapter(layer, "k", adapter)


def test_from_file_reads_a_kohya_file_into_a_model_with_kohyas_outputs(tmp_path) -> None:
    """The whole path: a kohya file on disk, detected among every format, loaded into a model by
    ``orthotune.from_file``; every layer gives kohya's forward, merged or not."""
    from safetensors.torch import save_file

    import orthotune

    model = UNetLike()
    state = kohya_state_dict(model, num_blocks=2, alpha=0.02)
    path = tmp_path / "kohya_oft.safetensors"
    save_file(state, str(path))
    originals = {name: copy.deepcopy(module) for name, module in model.named_modules() if name in INPUTS}
    adapted = orthotune.from_file(model, path)
    for merged in (False, True):
        if merged:
            adapted.merge_adapter()
        for name, shape in INPUTS.items():
            x = torch.randn(shape)
            blocks = state["oft_unet_" + name.replace(".", "_") + ".oft_blocks"]
            expected = kohya_forward(originals[name], blocks, 0.02, x)
            assert rel_err(adapted.get_base_model().get_submodule(name)(x), expected) <= 1e-5
