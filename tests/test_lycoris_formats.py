"""LyCORIS files (:mod:`orthotune.formats.lycoris`) against lycoris-lora 4.1.3 itself.

LyCORIS builds ``diag-oft`` and ``boft`` networks on tiny models, fills them with random non-zero blocks (and
scales), computes its outputs (its default forward, and the base layers after its own ``merge_to``) and saves
its file with its own saver; orthotune reads that file, builds output-side layers from it and must give the
same outputs. The other way, orthotune writes a file from its own adapters and LyCORIS's own loader must give
orthotune's outputs. Layer names are matched as LyCORIS's own loaders match them.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from references import rel_err
from safetensors.torch import load_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from orthotune import boft, oft
from orthotune.formats import (
    LayerAdapter,
    add_layer_adapter,
    config_for_layer_adapters,
    detect_lycoris,
    layer_adapter,
    lycoris_name,
    match_lycoris_names,
    read_lycoris,
    write_lycoris,
)

lycoris = pytest.importorskip("lycoris")
from lycoris import create_lycoris  # noqa: E402
from lycoris.functional import boft as lycoris_boft  # noqa: E402
from lycoris.functional import diag_oft as lycoris_diag_oft  # noqa: E402
from lycoris.kohya import create_network_from_weights  # noqa: E402
from lycoris.wrapper import LycorisNetwork, create_lycoris_from_weights  # noqa: E402

logging.getLogger("LyCORIS").setLevel(logging.ERROR)
TOLERANCE = 1e-5  # fp32 end to end; LyCORIS inverts in fp32, orthotune solves in fp64


class Tiny(nn.Module):
    """One of each layer kind LyCORIS adapts: linear layers (one inside a ModuleList) and a 3×3 convolution."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 16)
        self.blocks = nn.ModuleList([nn.Linear(16, 32)])
        self.conv = nn.Conv2d(3, 8, 3, padding=1)


def inputs() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return {
        "proj": torch.randn(2, 3, 8, generator=generator),
        "blocks.0": torch.randn(5, 16, generator=generator),
        "conv": torch.randn(2, 3, 7, 6, generator=generator),  # larger than the kernel
    }


def run(model: nn.Module) -> dict[str, torch.Tensor]:
    modules = dict(model.named_modules())
    with torch.no_grad():
        return {name: modules[name](x) for name, x in inputs().items()}


@pytest.fixture(autouse=True)
def _lycoris_prefix():
    """LyCORIS keeps its name prefix in a class attribute; every test starts from and leaves its default."""
    saved = LycorisNetwork.LORA_PREFIX
    LycorisNetwork.LORA_PREFIX = "lycoris"
    yield
    LycorisNetwork.LORA_PREFIX = saved


def lycoris_network(model: nn.Module, algo: str, constraint: float, rescaled: bool, seed: int = 0):
    network = create_lycoris(
        model, 1.0, linear_dim=4, linear_alpha=1, algo=algo, constraint=constraint, rescaled=rescaled
    )
    network.apply_to()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in network.loras:
            module.oft_blocks.copy_(torch.randn(module.oft_blocks.shape, generator=generator) * 0.3)
            if rescaled:
                module.rescale.copy_(torch.rand(module.rescale.shape, generator=generator) + 0.5)
    return network


def orthotune_layers(original: nn.Module, adapters: dict[str, LayerAdapter]) -> dict[str, nn.Module]:
    """Our output-side layers around copies of the original base modules, built from the parsed adapters."""
    modules = dict(copy.deepcopy(original).named_modules())
    layers = {}
    for name, adapter in adapters.items():
        base = modules[name]
        if adapter.method == "oft":
            cls = oft.Conv2d if isinstance(base, nn.Conv2d) else oft.Linear
            layer = cls(
                base, "lyco", r=adapter.num_blocks, rotation_side="output", fan_in_fan_out=isinstance(base, Conv1D)
            )
        else:
            cls = boft.Conv2d if isinstance(base, nn.Conv2d) else boft.Linear
            layer = cls(
                base,
                "lyco",
                boft_block_size=adapter.block_size,
                boft_n_butterfly_factor=adapter.num_factors,
                boft_dropout=0.0,
                rotation_side="output",
            )
        add_layer_adapter(layer, "lyco", adapter)
        layers[name] = layer
    return layers


def run_layers(layers: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return {name: layers[name](x) for name, x in inputs().items()}


# ----------------------------------------------------------------------------------- LyCORIS → orthotune
@pytest.mark.parametrize("rescaled", [False, True])
@pytest.mark.parametrize("constraint", [0.0, 0.05])
@pytest.mark.parametrize("algo", ["diag-oft", "boft"])
def test_lycoris_file_gives_lycoris_outputs_forward_and_merged(
    algo: str, constraint: float, rescaled: bool, tmp_path
) -> None:
    model = Tiny()
    original = copy.deepcopy(model)
    network = lycoris_network(model, algo, constraint, rescaled)
    expected = run(model)  # LyCORIS's default (non-bypass) forward
    path = tmp_path / "lycoris.safetensors"
    network.save_weights(str(path), None, None)
    network.restore()
    network.merge_to()
    merged = run(model)  # the base layers after LyCORIS's own merge

    state_dict = load_file(str(path))
    assert detect_lycoris(state_dict)
    adapters = read_lycoris(state_dict, [name for name, _ in original.named_modules()])
    assert sorted(adapters) == ["blocks.0", "conv", "proj"]
    method = "oft" if algo == "diag-oft" else "boft"
    assert all(a.method == method and a.rotation_side == "output" for a in adapters.values())
    assert all(
        (a.rescale is not None) == rescaled and a.constraint == pytest.approx(constraint) for a in adapters.values()
    )
    if constraint:  # the constraint binds for these generators: the test exercises it
        blocks = state_dict["lycoris_proj.oft_blocks"]
        assert (blocks - blocks.transpose(-1, -2)).norm() > constraint * 16

    layers = orthotune_layers(original, adapters)
    ours = run_layers(layers)
    for name in expected:
        assert rel_err(ours[name], expected[name]) <= TOLERANCE, name
        assert rel_err(ours[name], merged[name]) <= TOLERANCE, name
    for name, layer in layers.items():
        layer.merge()
        assert rel_err(layer.base_layer.weight, dict(model.named_modules())[name].weight) <= TOLERANCE, name
    for name, output in run_layers(layers).items():
        assert rel_err(output, expected[name]) <= TOLERANCE, name


@settings(max_examples=25, deadline=None)
@given(
    algo=st.sampled_from(["diag-oft", "boft"]),
    half=st.integers(1, 4),
    log_blocks=st.integers(0, 3),
    in_features=st.integers(1, 5),
    constraint=st.sampled_from([0.0, 0.01, 1.0]),
    rescaled=st.booleans(),
    data=st.data(),
)
def test_lycoris_functional_weight_and_output_routes_equal_ours_across_shapes(
    algo: str, half: int, log_blocks: int, in_features: int, constraint: float, rescaled: bool, data: st.DataObject
) -> None:
    """LyCORIS's own functional ``diff_weight`` (merged weight) and ``bypass_forward_diff`` (rotated outputs,
    here of a bias-free layer) against an orthotune layer read from the same tensors."""
    block_size, num_blocks = 2 * half, 2**log_blocks
    if algo == "diag-oft":
        num_blocks = data.draw(st.integers(1, 6))
        if data.draw(st.booleans()):
            block_size = data.draw(st.integers(1, 5))  # any block size for diag-oft
    out_features = block_size * num_blocks
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    if algo == "boft":
        shape = (data.draw(st.integers(1, log_blocks + 1)), num_blocks, block_size, block_size)
    else:
        shape = (num_blocks, block_size, block_size)
    blocks = torch.randn(shape, generator=generator) * 0.4
    rescale = torch.rand(out_features, 1, generator=generator) + 0.5 if rescaled else None
    base = nn.Linear(in_features, out_features, bias=False)
    x = torch.randn(3, in_features, generator=generator)
    weight = base.weight.detach()
    functional = lycoris_diag_oft if algo == "diag-oft" else lycoris_boft
    radius = constraint * out_features  # what LyCORIS's modules pass as ``constraint``
    merged = weight + functional.diff_weight(weight, blocks, rescale, constraint=radius)
    if algo == "diag-oft":
        outputs = functional.bypass_forward_diff(x, x @ weight.T, blocks, rescale, constraint=radius)
    else:
        outputs = functional.bypass_forward_diff(x @ weight.T, blocks, rescale, constraint=radius)
    outputs = outputs + x @ weight.T

    state_dict = {"lycoris_.oft_blocks": blocks, "lycoris_.alpha": torch.tensor(constraint)}
    if rescale is not None:
        state_dict["lycoris_.rescale"] = rescale
    (layer,) = orthotune_layers(base, read_lycoris(state_dict, [""])).values()
    assert rel_err(layer(x), outputs) <= TOLERANCE
    layer.merge()
    assert rel_err(layer.base_layer.weight, merged) <= TOLERANCE


@pytest.mark.parametrize("algo", ["diag-oft", "boft"])
def test_lycoris_bypass_forward_rotates_the_bias_and_orthotune_does_not(algo: str) -> None:
    """LyCORIS's bypass mode computes R(Wx + b): it differs from its merged weight, and from us, only by the bias."""
    model = Tiny()
    original = copy.deepcopy(model)
    network = lycoris_network(model, algo, 0.0, True)
    adapters = read_lycoris(network.state_dict(), [name for name, _ in original.named_modules()])
    layers = orthotune_layers(original, adapters)
    for module in network.loras:
        module.bypass_mode = True
    bypass = run(model)
    rotated_bias = {name: torch.zeros_like(x) for name, x in inputs().items()}
    modules = dict(model.named_modules())
    with torch.no_grad():
        rotated_bias = {name: modules[name](x) for name, x in rotated_bias.items()}  # bypass(0): the rotated bias
    ours = run_layers(layers)
    for name in bypass:
        bias = dict(original.named_modules())[name].bias
        shape = (1, -1, 1, 1) if name == "conv" else (-1,)
        assert rel_err(bypass[name] - rotated_bias[name], ours[name] - bias.view(shape)) <= TOLERANCE
        assert (rotated_bias[name] - bias.view(shape)).abs().max() > 1e-2  # LyCORIS really rotates the bias


def test_conv1d_of_gpt2_reads_the_file_of_the_equivalent_linear() -> None:
    """LyCORIS does not adapt transformers' Conv1D; the same weights as an nn.Linear are its model."""
    twin = nn.Module()
    twin.c_attn = nn.Linear(8, 16)
    gpt2 = nn.Module()
    gpt2.c_attn = Conv1D(16, 8)
    with torch.no_grad():
        gpt2.c_attn.weight.copy_(twin.c_attn.weight.T)
        gpt2.c_attn.bias.copy_(twin.c_attn.bias)
    network = lycoris_network(twin, "diag-oft", 0.05, True)
    x = torch.randn(3, 8)
    with torch.no_grad():
        expected = twin.c_attn(x)
    adapters = read_lycoris(network.state_dict(), [name for name, _ in gpt2.named_modules()])
    layer = orthotune_layers(gpt2, adapters)["c_attn"]
    assert rel_err(layer(x), expected) <= TOLERANCE
    layer.merge()
    assert rel_err(layer(x), expected) <= TOLERANCE


def test_legacy_oft_diag_file_holding_the_rotation_gives_the_same_model() -> None:
    model = Tiny()
    original = copy.deepcopy(model)
    network = lycoris_network(model, "diag-oft", 0.0, True)
    expected = run(model)
    legacy = {}
    for module in network.loras:  # pre-2024 files stored LyCORIS's rotation blocks themselves
        with torch.no_grad():
            legacy[f"{module.lora_name}.oft_diag"] = module.get_r().detach().clone()
            legacy[f"{module.lora_name}.rescale"] = module.rescale.detach().clone()
    assert detect_lycoris(legacy)
    adapters = read_lycoris(legacy, [name for name, _ in original.named_modules()])
    ours = run_layers(orthotune_layers(original, adapters))
    for name in expected:
        assert rel_err(ours[name], expected[name]) <= TOLERANCE, name


def test_legacy_oft_diag_that_is_not_a_rotation_is_refused() -> None:
    blocks = torch.linalg.qr(torch.randn(4, 4, 4))[0] * 1.1
    with pytest.raises(ValueError, match=r"lycoris_proj.oft_diag is not a rotation: ‖RᵀR - I‖₂ = 0.21"):
        read_lycoris({"lycoris_proj.oft_diag": blocks}, ["", "proj"])


# ----------------------------------------------------------------------------------- orthotune → LyCORIS
def random_output_side_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Our own output-side layers, trained-looking (random generators and scales), on the model's modules."""
    modules = dict(model.named_modules())
    layers = {
        "proj": oft.Linear(
            modules["proj"], "a", r=0, oft_block_size=4, rotation_side="output", rescale=True, constraint=0.05
        ),
        "blocks.0": boft.Linear(
            modules["blocks.0"],
            "a",
            boft_block_size=4,
            boft_n_butterfly_factor=2,
            boft_dropout=0.0,
            rotation_side="output",
        ),
        "conv": oft.Conv2d(modules["conv"], "a", r=0, oft_block_size=2, rotation_side="output", coft=True, eps=0.5),
    }
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in layers.values():
            for parameter in layer.parameters():
                if parameter.requires_grad:
                    parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return layers


def test_orthotune_file_gives_orthotune_outputs_in_lycoris() -> None:
    model = Tiny()
    layers = random_output_side_layers(copy.deepcopy(model))
    expected = run_layers(layers)
    adapters = {name: layer_adapter(layer, "a") for name, layer in layers.items()}
    state_dict = write_lycoris(adapters)
    assert state_dict["lycoris_blocks_0.oft_blocks"].shape == (4, 8, 4, 4)  # padded to LyCORIS's log2(8)+1 stages
    assert state_dict["lycoris_proj.rescale"].shape == (16, 1) and "lycoris_conv.rescale" not in state_dict

    network, _ = create_lycoris_from_weights(1.0, "", model, weights_sd=state_dict)
    network.apply_to()
    assert sorted(module.lora_name for module in network.loras) == sorted(lycoris_name(n) for n in layers)
    assert sorted(network.state_dict()) == sorted(state_dict)  # what LyCORIS would save again
    for name, output in run(model).items():
        assert rel_err(output, expected[name]) <= TOLERANCE, name


def test_write_then_read_gives_the_same_outputs() -> None:
    model = Tiny()
    layers = random_output_side_layers(copy.deepcopy(model))
    expected = run_layers(layers)
    adapters = read_lycoris(
        write_lycoris({name: layer_adapter(layer, "a") for name, layer in layers.items()}),
        [name for name, _ in model.named_modules()],
    )
    assert torch.equal(adapters["proj"].generators, layers["proj"].oft_R["a"].weight.detach())
    ours = run_layers(orthotune_layers(model, adapters))
    for name in expected:
        assert rel_err(ours[name], expected[name]) <= TOLERANCE, name


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: oft.Linear(nn.Linear(4, 8), "a", r=2), "rotates its inputs"),
        (lambda: oft.Linear(nn.Linear(4, 16), "a", r=2, rotation_side="output"), "block size ≤ 4"),
        (lambda: boft.Linear(nn.Linear(4, 24), "a", boft_block_size=4, rotation_side="output"), "power of two"),
        (
            lambda: oft.Linear(nn.Linear(4, 8), "a", r=4, block_share=True, constraint=0.1, rotation_side="output"),
            "no LyCORIS form",
        ),
    ],
)
def test_adapters_lycoris_cannot_load_are_refused_with_the_reason(make, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        write_lycoris({"x": layer_adapter(make(), "a")})


# ---------------------------------------------------------------------------------------------- names
def test_stable_diffusion_prefixes_map_like_lycoris_kohya_loader() -> None:
    """Names written by LyCORIS with kohya's prefixes go where LyCORIS's own kohya loader puts them."""

    def sub_model() -> nn.Module:
        module = nn.Module()
        module.down_blocks = nn.ModuleList([nn.Linear(8, 8)])
        module.to_q = nn.Linear(8, 8)
        return module

    pipeline = nn.Module()
    pipeline.unet, pipeline.text_encoder, pipeline.text_encoder_2 = sub_model(), sub_model(), sub_model()
    state_dict = {}
    for prefix, part in (("lora_unet", "unet"), ("lora_te1", "text_encoder"), ("lora_te2", "text_encoder_2")):
        LycorisNetwork.LORA_PREFIX = prefix
        state_dict |= lycoris_network(copy.deepcopy(getattr(pipeline, part)), "diag-oft", 0.0, False).state_dict()
    assert detect_lycoris(state_dict) and any(key.startswith("lora_te1_down_blocks_0.") for key in state_dict)

    network, _ = create_network_from_weights(
        1.0, "", None, [pipeline.text_encoder, pipeline.text_encoder_2], pipeline.unet, weights_sd=state_dict
    )
    by_identity = {id(module): name for name, module in pipeline.named_modules()}
    theirs = {m.lora_name: by_identity[id(m.org_module[0])] for m in network.unet_loras + network.text_encoder_loras}
    names = {key.split(".")[0] for key in state_dict}
    prefixes = {"lora_unet": "unet", "lora_te1": "text_encoder", "lora_te2": "text_encoder_2"}
    ours = match_lycoris_names(names, [name for name, _ in pipeline.named_modules()], prefixes)
    assert ours == theirs and len(ours) == 6


def test_unmatched_layers_are_listed_or_skipped_on_request() -> None:
    state_dict = {
        "lycoris_proj.oft_blocks": torch.zeros(4, 4, 4),
        "lycoris_missing_one.oft_blocks": torch.zeros(4, 4, 4),
        "lora_te2_gone.oft_blocks": torch.zeros(4, 4, 4),
    }
    names = [name for name, _ in Tiny().named_modules()]
    with pytest.raises(ValueError, match="lycoris_missing_one, lora_te2_gone"):
        read_lycoris(state_dict, names)
    assert list(read_lycoris(state_dict, names, ignore_unmatched=True)) == ["proj"]


def test_root_module_and_longest_prefix_first() -> None:
    assert lycoris_name("") == "lycoris_" and lycoris_name("a.b_c", "lora_te1") == "lora_te1_a_b_c"
    matched = match_lycoris_names(
        ["lycoris_", "lora_te1_x", "lora_te_x"], ["", "x", "te1.x"], {"lycoris": "", "lora_te": "", "lora_te1": "te1"}
    )
    assert matched == {"lycoris_": "", "lora_te1_x": "te1.x", "lora_te_x": "x"}
    with pytest.raises(ValueError, match="same LyCORIS name"):
        match_lycoris_names(["lycoris_a_b"], ["a_b", "a", "a.b"])


def test_detection_tells_lycoris_from_other_tools() -> None:
    blocks = torch.zeros(2, 4, 4)
    assert detect_lycoris({"lora_unet_x.oft_blocks": blocks, "lora_unet_x.alpha": torch.tensor(0.0)})
    assert not detect_lycoris({"oft_unet_x.oft_blocks": blocks, "oft_unet_x.alpha": torch.tensor(0.0)})  # kohya's OFT
    assert not detect_lycoris({"base_model.model.x.oft_R.weight": torch.zeros(2, 6)})  # peft
    assert not detect_lycoris({"lycoris_x.lora_up.weight": torch.zeros(4, 2)})  # a LyCORIS LoRA


def test_other_algorithms_are_refused_naming_their_tensors() -> None:
    state_dict = {"lycoris_proj.lora_up.weight": torch.zeros(16, 4), "lycoris_proj.lora_down.weight": torch.zeros(4, 8)}
    with pytest.raises(ValueError, match=r"lycoris_proj.*lora_down.weight.*diag-oft and boft only"):
        read_lycoris(state_dict, ["", "proj"])


def test_config_describes_the_file() -> None:
    model = Tiny()
    network = lycoris_network(model, "boft", 0.05, True)
    adapters = read_lycoris(network.state_dict(), [name for name, _ in Tiny().named_modules()])
    config = config_for_layer_adapters(adapters)
    assert config.peft_type == "BOFT" and config.target_modules == {"blocks.0", "conv", "proj"}
    assert (config.rotation_side, config.constraint) == ("output", pytest.approx(0.05))
    assert config.boft_block_size == 4 and config.boft_n_butterfly_factor in {a.num_factors for a in adapters.values()}
    diag = read_lycoris(
        lycoris_network(Tiny(), "diag-oft", 0.0, True).state_dict(), [n for n, _ in Tiny().named_modules()]
    )
    oft_config = config_for_layer_adapters(diag)
    assert oft_config.peft_type == "OFT" and oft_config.rescale and not oft_config.use_cayley_neumann
    with pytest.raises(ValueError, match="mix methods"):
        config_for_layer_adapters({"a": adapters["proj"], "b": diag["proj"]})
