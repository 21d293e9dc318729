"""Single-file adapters in whole models (:func:`orthotune.from_file`, ``OrthoModel.save_file``) against LyCORIS.

The truths: lycoris-lora 4.1.3 itself (its networks on the same model, their default forward and their own
``merge_to``, its own saver writing the files read here and its own loader reading the files written here), the
model's state before a refused load (a refusal changes nothing), and peft 0.21.2's own loader (for why output-side
adapters are never written in peft's format). LyCORIS does not adapt transformers' ``Conv1D``; its model for a
GPT-2 layer is the ``nn.Linear`` with the transposed weight, so the LyCORIS side runs a twin model with that
``Linear`` where ours has the ``Conv1D``.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from references import document_upstream_defect, rel_err
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

import orthotune
from orthotune import BOFTConfig, OFTConfig, get_peft_model
from orthotune.checkpoint import AdapterFileError
from orthotune.formats import detect_format

lycoris = pytest.importorskip("lycoris")
from lycoris import create_lycoris  # noqa: E402
from lycoris.wrapper import LycorisNetwork, create_lycoris_from_weights  # noqa: E402

logging.getLogger("LyCORIS").setLevel(logging.ERROR)
TOLERANCE = 1e-5  # fp32 end to end; LyCORIS inverts in fp32, orthotune solves in fp64
LAYERS = {"conv": "Conv2d", "proj": "Linear", "blocks.0": "Linear", "c_attn": "Conv1D"}


class Mixed(nn.Module):
    """A 3×3 convolution, two linear layers (one in a ModuleList) and GPT-2's Conv1D, in one forward."""

    def __init__(self, conv1d_as_linear: bool = False) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(7)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.proj = nn.Linear(8, 16)
        self.blocks = nn.ModuleList([nn.Linear(16, 32)])
        self.c_attn = nn.Linear(32, 16) if conv1d_as_linear else Conv1D(16, 32)
        with torch.no_grad():
            for parameter in self.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)

    def forward(self, image: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.conv(image)  # (B, 8, H, W), the image larger than the kernel
        hidden = features.mean((2, 3))[:, None, :] + tokens  # (B, T, 8): batch > 1, 3-D input
        return features, self.c_attn(torch.tanh(self.blocks[0](self.proj(hidden))))


def twin_with_linear(model: Mixed) -> Mixed:
    """The same model with ``c_attn`` an ``nn.Linear`` (``weight = Conv1D.weight.T``): LyCORIS's model of it."""
    twin = Mixed(conv1d_as_linear=True)
    twin.load_state_dict({**model.state_dict(), "c_attn.weight": model.c_attn.weight.detach().T.clone()})
    return twin


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(2, 3, 7, 6, generator=generator), torch.randn(2, 5, 8, generator=generator)


def layer_outputs(model: nn.Module, root: str = "") -> dict[str, torch.Tensor]:
    """Each adapted layer's output and the model's, from one forward."""
    outputs: dict[str, torch.Tensor] = {}
    hooks = [
        model.get_submodule(f"{root}{name}").register_forward_hook(
            lambda module, args, output, name=name: outputs.__setitem__(name, output.detach().clone())
        )
        for name in LAYERS
    ]
    with torch.no_grad():
        features, hidden = model(*inputs())
    for hook in hooks:
        hook.remove()
    return {**outputs, "model.features": features, "model.hidden": hidden}


@pytest.fixture(autouse=True)
def _lycoris_prefix():
    """LyCORIS keeps its name prefix in a class attribute; every test starts from and leaves its default."""
    saved = LycorisNetwork.LORA_PREFIX
    LycorisNetwork.LORA_PREFIX = "lycoris"
    yield
    LycorisNetwork.LORA_PREFIX = saved


def lycoris_network(model: nn.Module, algo: str, constraint: float = 0.0, rescaled: bool = False, seed: int = 0):
    """A LyCORIS network applied to ``model``, with random non-zero blocks (and scales)."""
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


def lycoris_file(tmp_path, algo: str, constraint: float = 0.0, rescaled: bool = False):
    """``(model, path, LyCORIS's outputs, LyCORIS's merged outputs)``: a LyCORIS file saved by LyCORIS."""
    model = Mixed()
    twin = twin_with_linear(model)
    network = lycoris_network(twin, algo, constraint, rescaled)
    assert sorted(module.lora_name for module in network.loras) == sorted(
        f"lycoris_{name.replace('.', '_')}" for name in LAYERS
    )
    expected = layer_outputs(twin)
    path = tmp_path / f"{algo}.safetensors"
    network.save_weights(str(path), None, None)
    network.restore()
    network.merge_to()
    return model, path, expected, layer_outputs(twin)


def snapshot(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, type], dict[str, bool]]:
    return (
        {key: value.detach().clone() for key, value in model.state_dict().items()},
        {name: type(module) for name, module in model.named_modules()},
        {name: parameter.requires_grad for name, parameter in model.named_parameters()},
    )


def assert_unchanged(model: nn.Module, before) -> None:
    state, types, trainable = snapshot(model)
    assert types == before[1] and trainable == before[2]
    assert state.keys() == before[0].keys() and all(torch.equal(state[key], before[0][key]) for key in state)


# ----------------------------------------------------------------------------------- LyCORIS → orthotune
@pytest.mark.parametrize(("constraint", "rescaled"), [(0.0, False), (0.05, True)])
@pytest.mark.parametrize("algo", ["diag-oft", "boft"])
def test_from_file_gives_lycoris_outputs_for_every_layer_kind(algo: str, constraint: float, rescaled: bool, tmp_path):
    model, path, expected, merged = lycoris_file(tmp_path, algo, constraint, rescaled)
    assert detect_format(load_file(str(path))).NAME == "lycoris"
    wrapped = orthotune.from_file(model, path)
    assert isinstance(wrapped, orthotune.OrthoModel) and not wrapped.training
    assert wrapped.peft_config["default"].peft_type == ("OFT" if algo == "diag-oft" else "BOFT")
    assert wrapped.peft_config["default"].rotation_side == "output"
    assert not any(parameter.requires_grad for parameter in wrapped.parameters())  # is_trainable=False
    ours = layer_outputs(wrapped, "base_model.model.")
    for name in expected:
        assert rel_err(ours[name], expected[name]) <= TOLERANCE, name
        assert rel_err(ours[name], merged[name]) <= TOLERANCE, name
    plain = wrapped.merge_and_unload()
    for name, output in layer_outputs(plain).items():
        assert rel_err(output, expected[name]) <= TOLERANCE, name


def test_is_trainable_leaves_the_adapter_trainable(tmp_path) -> None:
    model, path, _, _ = lycoris_file(tmp_path, "diag-oft", rescaled=True)
    wrapped = orthotune.from_file(model, path, is_trainable=True)
    trainable = {name for name, parameter in wrapped.named_parameters() if parameter.requires_grad}
    assert trainable and all(".oft_R.default." in name for name in trainable)
    assert any(name.endswith("rescale") for name in trainable)


def test_a_file_joins_an_orthomodel_as_a_second_adapter(tmp_path) -> None:
    """An existing OFT adapter keeps its outputs; the file's adapter, activated, gives LyCORIS's."""
    model, path, expected, _ = lycoris_file(tmp_path, "diag-oft", 0.05, True)
    wrapped = get_peft_model(
        model, OFTConfig(oft_block_size=4, target_modules=["proj", "blocks.0"], init_weights=False)
    )
    first = layer_outputs(wrapped, "base_model.model.")
    assert orthotune.from_file(wrapped, path, adapter_name="lyco") is wrapped
    assert wrapped.active_adapters == ["default"]
    assert all(torch.equal(output, first[name]) for name, output in layer_outputs(wrapped, "base_model.model.").items())
    wrapped.set_adapter("lyco")
    ours = layer_outputs(wrapped, "base_model.model.")
    assert all(rel_err(ours[name], expected[name]) <= TOLERANCE for name in expected)
    with pytest.raises(ValueError, match="'lyco' already exists"):
        orthotune.from_file(wrapped, path, adapter_name="lyco")


# ------------------------------------------------------------------------------ refusals change nothing
def misfits(model: Mixed) -> dict[str, tuple[dict[str, torch.Tensor], str]]:
    blocks = torch.randn(4, 4, 4) * 0.1
    good = {"lycoris_proj.oft_blocks": blocks, "lycoris_proj.alpha": torch.tensor(0.0)}
    return {
        "too many blocks": (
            {**good, "lycoris_conv.oft_blocks": torch.randn(4, 4, 4)},
            r"lycoris_conv.*module 'conv'.*4 blocks of 4×4 \(16 output features\).*Conv2d with 8 out features",
        ),
        "too many butterfly factors": (
            {"lycoris_proj.oft_blocks": torch.randn(4, 4, 4, 4) * 0.1},
            r"lycoris_proj.*shape \(4, 4, 4, 4\): 4 factors of 4 blocks of 4×4.*at most boft_n_butterfly_factor=3",
        ),
        "blocks of the wrong size": (
            {"lycoris_blocks_0.oft_blocks": torch.randn(2, 2, 8, 8)},
            r"lycoris_blocks_0.*\(2, 2, 8, 8\): 2 factors of 2 blocks of 8×8 \(16 output.*Linear with 32 out",
        ),
        "a linear rescale on a convolution": (
            {**good, "lycoris_conv.oft_blocks": torch.randn(4, 2, 2), "lycoris_conv.rescale": torch.ones(8, 1)},
            r"lycoris_conv.*rescale is shaped for a 2-d weight, but Conv2d has a 4-d weight",
        ),
        "a layer that cannot be adapted": (
            {**good, "lycoris_blocks.oft_blocks": torch.randn(4, 4, 4)},
            r"lycoris_blocks.*cannot wrap ModuleList",
        ),
    }


@pytest.mark.parametrize("case", list(misfits(Mixed())))
def test_a_file_that_does_not_fit_is_refused_naming_layer_and_shapes_and_nothing_changes(case: str, tmp_path) -> None:
    model = Mixed()
    tensors, message = misfits(model)[case]
    path = tmp_path / "misfit.safetensors"
    save_file(tensors, str(path))
    before = snapshot(model)
    with pytest.raises(AdapterFileError, match=message):
        orthotune.from_file(model, path)
    assert_unchanged(model, before)
    butterfly = any(tensor.ndim == 4 for key, tensor in tensors.items() if key.endswith(".oft_blocks"))
    config = BOFTConfig(target_modules=["proj"]) if butterfly else OFTConfig(oft_block_size=4, target_modules=["proj"])
    wrapped = get_peft_model(model, config)  # and an OrthoModel with an adapter of the file's method
    before = snapshot(wrapped)
    with pytest.raises(AdapterFileError, match=message):
        orthotune.from_file(wrapped, path, adapter_name="lyco")
    assert_unchanged(wrapped, before)
    assert list(wrapped.peft_config) == ["default"]


def test_keys_that_match_no_module_are_listed_or_skipped_on_request(tmp_path) -> None:
    model, path, expected, _ = lycoris_file(tmp_path, "diag-oft")
    tensors = load_file(str(path))
    tensors |= {"lycoris_gone.oft_blocks": torch.zeros(4, 4, 4), "lycoris_missing.oft_blocks": torch.zeros(2, 2, 2)}
    save_file(tensors, str(path))
    before = snapshot(model)
    with pytest.raises(AdapterFileError, match=r"match no module of the model: lycoris_gone, lycoris_missing"):
        orthotune.from_file(model, path)
    assert_unchanged(model, before)
    ours = layer_outputs(orthotune.from_file(model, path, ignore_unmatched=True), "base_model.model.")
    assert all(rel_err(ours[name], expected[name]) <= TOLERANCE for name in expected)


def test_files_that_are_not_single_file_adapters_are_refused(tmp_path) -> None:
    model = Mixed()
    pickled = tmp_path / "adapter.ckpt"
    torch.save({"lycoris_proj.oft_blocks": torch.zeros(4, 4, 4)}, pickled)
    with pytest.raises(AdapterFileError, match="pickle file, which orthotune never loads"):
        orthotune.from_file(model, pickled)
    with pytest.raises(FileNotFoundError, match="is a directory; a peft adapter directory is loaded with"):
        orthotune.from_file(model, tmp_path)
    peft_keys = tmp_path / "peft.safetensors"
    save_file({"base_model.model.proj.oft_R.weight": torch.zeros(4, 6)}, str(peft_keys))
    with pytest.raises(AdapterFileError, match="not an OFT/BOFT file of a known format.*it has peft's keys"):
        orthotune.from_file(model, peft_keys)
    lora = tmp_path / "lora.safetensors"
    save_file({"lycoris_proj.lora_up.weight": torch.zeros(16, 4)}, str(lora))
    with pytest.raises(AdapterFileError, match="not an OFT/BOFT file of a known format"):
        orthotune.from_file(model, lora)


# ----------------------------------------------------------------------------------- orthotune → LyCORIS
def trained_output_side(model: nn.Module, config) -> orthotune.OrthoModel:
    wrapped = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in wrapped.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return wrapped


@pytest.mark.parametrize(
    "config",
    [
        OFTConfig(oft_block_size=2, rotation_side="output", rescale=True, constraint=0.05, use_cayley_neumann=False),
        BOFTConfig(boft_block_size=2, boft_n_butterfly_factor=2, rotation_side="output", constraint=0.05),
    ],
    ids=["oft", "boft"],
)
def test_save_file_is_read_by_lycoris_with_our_outputs(config, tmp_path) -> None:
    model = Mixed()
    twin = twin_with_linear(model)
    config.target_modules = list(LAYERS)
    wrapped = trained_output_side(model, config)
    expected = layer_outputs(wrapped, "base_model.model.")
    path = tmp_path / "out.safetensors"
    wrapped.save_file(path)
    tensors = load_file(str(path))
    network, _ = create_lycoris_from_weights(1.0, "", twin, weights_sd=tensors)
    network.apply_to()
    theirs = layer_outputs(twin)
    for name in expected:
        assert rel_err(theirs[name], expected[name]) <= TOLERANCE, name
    back = layer_outputs(orthotune.from_file(Mixed(), path), "base_model.model.")
    assert all(rel_err(back[name], expected[name]) <= TOLERANCE for name in expected)


def test_save_file_warns_with_the_size_of_the_neumann_difference(tmp_path, caplog) -> None:
    config = OFTConfig(oft_block_size=4, rotation_side="output", target_modules=["proj"], num_cayley_neumann_terms=5)
    wrapped = trained_output_side(Mixed(), config)
    with caplog.at_level(logging.WARNING, logger="orthotune"):
        wrapped.save_file(tmp_path / "neumann.safetensors")
    (record,) = [r for r in caplog.records if "Cayley-Neumann" in r.getMessage()]
    layer = wrapped.get_submodule("base_model.model.proj")
    rotation = layer.oft_R["default"]
    exact = torch.linalg.solve(  # (I - Q)⁻¹ on the right: R = (I + Q)(I - Q)⁻¹, solved as Rᵀ = (I - Q)⁻ᵀ (I + Q)ᵀ
        (torch.eye(4) - rotation.generators().detach()).transpose(-1, -2).double(),
        (torch.eye(4) + rotation.generators().detach()).transpose(-1, -2).double(),
    ).transpose(-1, -2)
    gap = float((rotation.rotation_blocks().detach().double() - exact).abs().max())
    assert gap > 1e-4 and f"up to {gap:.2g}" in record.getMessage() and "proj" in record.getMessage()


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (OFTConfig(oft_block_size=4, target_modules=["proj"]), "rotates its inputs"),
        (
            OFTConfig(oft_block_size=4, rotation_side="output", target_modules=["proj"], modules_to_save=["conv"]),
            "modules_to_save=.*single-file adapter cannot hold",
        ),
        (OFTConfig(oft_block_size=8, rotation_side="output", target_modules=["proj"]), "block size ≤ 4"),
    ],
    ids=["input-side", "modules_to_save", "not loadable by LyCORIS"],
)
def test_save_file_refuses_what_lycoris_cannot_hold_and_keeps_the_old_file(config, message: str, tmp_path) -> None:
    wrapped = (
        trained_output_side(Mixed(), config) if config.rotation_side == "output" else get_peft_model(Mixed(), config)
    )
    path = tmp_path / "old.safetensors"
    path.write_bytes(b"previous")
    with pytest.raises(ValueError, match=message):
        wrapped.save_file(path)
    assert path.read_bytes() == b"previous" and [p.name for p in tmp_path.iterdir()] == ["old.safetensors"]
    with pytest.raises(ValueError, match=r"format='kohya_lora' is not one of \['lycoris'"):
        wrapped.save_file(path, format="kohya_lora")


# ------------------------------------------------------------------------------------ never misread by peft
def test_save_pretrained_refuses_output_side_adapters_before_writing_anything(tmp_path) -> None:
    model = Mixed()
    wrapped = get_peft_model(model, OFTConfig(oft_block_size=4, target_modules=["proj"]))
    wrapped.add_adapter("out", OFTConfig(oft_block_size=4, target_modules=["blocks.0"], rotation_side="output"))
    with pytest.raises(ValueError, match=r"adapter 'out'.*rotation_side='output'.*save_file\(path, format='lycoris'\)"):
        wrapped.save_pretrained(tmp_path / "both")
    assert not (tmp_path / "both").exists() or not any((tmp_path / "both").rglob("*"))
    wrapped.save_pretrained(tmp_path / "input", selected_adapters=["default"])  # the input-side one is peft's
    assert (tmp_path / "input" / "adapter_model.safetensors").is_file()


def test_peft_would_load_an_output_side_directory_as_another_model(tmp_path) -> None:
    """Why save_pretrained refuses: peft 0.21.2 drops rotation_side with a warning and, where a layer's widths give
    the same shapes, loads the tensors as an input-side adapter, silently computing another model."""
    peft = pytest.importorskip("peft")
    from orthotune.checkpoint import save_adapter_files, to_peft_convention

    square = nn.Sequential(nn.Linear(16, 16))
    config = OFTConfig(oft_block_size=4, rotation_side="output", target_modules=["0"], use_cayley_neumann=False)
    wrapped = trained_output_side(copy.deepcopy(square), config)
    tensors = {
        f"base_model.model.0.{key}": value
        for key, value in wrapped.base_model.model[0].adapter_tensors("default").items()
    }
    with pytest.raises(ValueError, match="rotation_side='output'"):  # the low-level writer refuses too
        save_adapter_files(tmp_path, config, tensors)
    (tmp_path / "adapter_config.json").write_text(config.to_json_string())  # written by hand, as a foreign tool might
    in_peft_convention = to_peft_convention(config, {key: value.detach() for key, value in tensors.items()})
    save_file(in_peft_convention, str(tmp_path / "adapter_model.safetensors"))
    x = torch.randn(3, 16)
    with pytest.warns(UserWarning, match="rotation_side"):
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(square), tmp_path)
    with torch.no_grad():
        gap = rel_err(theirs(x), wrapped(x))  # peft's outputs, not the adapter's
    document_upstream_defect(gap > 1e-2, "peft 0.21.2 loads an output-side OFT directory as an input-side adapter")
    assert rel_err(orthotune.OrthoModel.from_pretrained(copy.deepcopy(square), tmp_path)(x), wrapped(x)) <= 1e-6


def test_renaming_between_formats_follows_the_pipeline_component() -> None:
    """Prefixes map by the component they address; SDXL's two text encoders get LyCORIS's numbered prefixes."""
    import types

    from orthotune.formats import LayerAdapter, lycoris
    from orthotune.single_file import renamed_for_format

    other = types.SimpleNamespace(
        NAME="other",
        PIPELINE_PREFIXES={"oft_unet": "unet", "oft_te": "text_encoder", "oft_te2": "text_encoder_2", "oft": ""},
    )
    adapter = LayerAdapter("oft", torch.zeros(2, 1), 2, 2, rotation_side="output")
    sd15 = renamed_for_format({"oft_unet.a_b": adapter, "oft_te.c": adapter, "oft.d": adapter}, other, lycoris)
    assert sorted(sd15) == ["lora_te.c", "lora_unet.a_b", "lycoris.d"]
    sdxl = renamed_for_format({"oft_te.c": adapter, "oft_te2.c": adapter}, other, lycoris)
    assert sorted(sdxl) == ["lora_te1.c", "lora_te2.c"]
    assert renamed_for_format({"lora_te.c": adapter}, lycoris, lycoris) == {"lora_te.c": adapter}
    with pytest.raises(ValueError, match="'oft_vae' addresses 'vae', for which lycoris has no prefix"):
        other.PIPELINE_PREFIXES["oft_vae"] = "vae"
        renamed_for_format({"oft_vae.x": adapter}, other, lycoris)
