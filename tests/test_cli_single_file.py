"""``orthotune inspect FILE.safetensors`` and ``orthotune convert`` of single-file adapters.

Truths: LyCORIS 4.1.3 itself (the rotations its own modules build, ``get_r``, for the angles; its own loader
for the files ``convert`` writes, which must give the outputs of the network the source file came from), peft
0.21.2's loader for the directories ``convert --to peft`` writes, and the files' own shapes. An input-side
single-file format is a stand-in defined here (none of the formats read today is input-side), registered in
:data:`orthotune.formats.FORMATS` for the test: it checks the plumbing any such format gets.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import types
from pathlib import Path

import pytest
import torch
from references import rel_err, run_cli
from safetensors.torch import load_file, save_file
from torch import nn

import orthotune
from orthotune import formats
from orthotune.formats import LayerAdapter, match_lycoris_names

pytest.importorskip("lycoris")
from lycoris import create_lycoris  # noqa: E402
from lycoris.wrapper import LycorisNetwork, create_lycoris_from_weights  # noqa: E402

logging.getLogger("LyCORIS").setLevel(logging.ERROR)
TOLERANCE = 1e-5


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.down_blocks = nn.ModuleList([nn.Linear(8, 16)])
        self.conv = nn.Conv2d(3, 8, 3, padding=1)


def run_tiny(model: nn.Module) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    x, image = torch.randn(2, 3, 8, generator=generator), torch.randn(2, 3, 5, 6, generator=generator)
    with torch.no_grad():
        return {"down_blocks.0": model.down_blocks[0](x), "conv": model.conv(image)}


def lycoris_network(model: nn.Module, algo: str, prefix: str = "lycoris", constraint: float = 0.05):
    saved = LycorisNetwork.LORA_PREFIX
    LycorisNetwork.LORA_PREFIX = prefix
    try:
        network = create_lycoris(
            model, 1.0, linear_dim=4, linear_alpha=1, algo=algo, constraint=constraint, rescaled=True
        )
    finally:
        LycorisNetwork.LORA_PREFIX = saved
    network.apply_to()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in network.loras:
            module.oft_blocks.copy_(torch.randn(module.oft_blocks.shape, generator=generator) * 0.3)
            module.rescale.copy_(torch.rand(module.rescale.shape, generator=generator) + 0.5)
    return network


def max_angle(rotations: torch.Tensor) -> float:
    return math.degrees(float(torch.linalg.eigvals(rotations.double()).angle().abs().max()))


# ------------------------------------------------------------------------------------------------ inspect
@pytest.mark.parametrize("algo", ["diag-oft", "boft"])
def test_inspect_describes_a_lycoris_file_as_lycoris_builds_it(algo: str, tmp_path: Path, capsys) -> None:
    network = lycoris_network(Tiny(), algo, prefix="lora_unet")
    path = tmp_path / "file.safetensors"
    save_file(network.state_dict(), str(path))
    status, out, err = run_cli(capsys, "inspect", str(path), "--json")
    assert status == 0, err
    report = json.loads(out)
    assert report["format"] == "lycoris" and report["peft_type"] == ("OFT" if algo == "diag-oft" else "BOFT")
    layers = {layer["name"]: layer for layer in report["layers"]}
    assert sorted(layers) == sorted(module.lora_name for module in network.loras)
    for module in network.loras:
        layer = layers[module.lora_name]
        blocks = module.oft_blocks
        assert layer["rotation_side"] == "output" and layer["block_size"] == blocks.shape[-1]
        assert layer["num_blocks"] == blocks.shape[-3] and layer["butterfly_factors"] == (
            blocks.shape[0] if blocks.ndim == 4 else 1
        )
        assert layer["constraint"] == pytest.approx(0.05) and layer["constraint_scale"] < 1  # it binds here
        with torch.no_grad():
            theirs = module.get_r()  # LyCORIS's rotations, its constraint applied
        assert layer["max_angle_degrees"] == pytest.approx(max_angle(theirs), rel=1e-4)
        assert layer["orthogonality_error"] < 1e-6
        assert layer["output_scale_range"] == pytest.approx(
            [float(module.rescale.detach().min()), float(module.rescale.detach().max())]
        )
    status, out, err = run_cli(capsys, "inspect", str(path))
    assert status == 0, err
    assert "(lycoris: " in out and "output side" in out and "binds ×" in out


def test_inspect_refuses_what_it_cannot_read_on_one_line(tmp_path: Path, capsys) -> None:
    path = tmp_path / "lora.safetensors"
    save_file({"lora_unet_x.lora_up.weight": torch.zeros(4, 2)}, str(path))
    status, _, err = run_cli(capsys, "inspect", str(path))
    assert status == 2 and "not an OFT/BOFT file of a known format" in err and len(err.strip().splitlines()) == 1
    status, _, err = run_cli(capsys, "inspect", str(path), "--base", str(tmp_path))
    assert status == 2


# ------------------------------------------------------------------------------------------------ convert
def test_convert_a_legacy_oft_diag_file_to_lycoris_gives_the_same_outputs_in_lycoris(tmp_path: Path, capsys) -> None:
    """Pre-2024 files store the rotation blocks; LyCORIS 4.1.3 reads only their generators: convert makes them."""
    model = Tiny()
    original = copy.deepcopy(model)
    network = lycoris_network(model, "diag-oft", prefix="lora_unet", constraint=0.0)
    expected = run_tiny(model)
    legacy = {}
    with torch.no_grad():
        for module in network.loras:
            legacy[f"{module.lora_name}.oft_diag"] = module.get_r().detach().clone()
            legacy[f"{module.lora_name}.rescale"] = module.rescale.detach().clone()
    source, target = tmp_path / "legacy.safetensors", tmp_path / "modern.safetensors"
    save_file(legacy, str(source))
    status, out, err = run_cli(capsys, "convert", str(source), "--to", "lycoris", "--output", str(target))
    assert status == 0, err
    assert "saved:" in out
    converted = load_file(str(target))
    assert {key.split(".")[0] for key in converted} == {key.split(".")[0] for key in legacy}  # names kept
    LycorisNetwork.LORA_PREFIX = "lora_unet"  # LyCORIS's loader names modules with its class-wide prefix
    try:
        network, _ = create_lycoris_from_weights(1.0, "", original, weights_sd=converted)
    finally:
        LycorisNetwork.LORA_PREFIX = "lycoris"
    network.apply_to()
    assert len(network.loras) == len(legacy) // 2
    for name, output in run_tiny(original).items():
        assert rel_err(output, expected[name]) <= TOLERANCE, name
    status, _, err = run_cli(capsys, "convert", str(source), "--to", "lycoris", "--output", str(target))
    assert status == 2 and "already exists" in err  # and --overwrite replaces it
    assert run_cli(capsys, "convert", str(source), "--to", "lycoris", "--output", str(target), "--overwrite")[0] == 0


def test_convert_refuses_to_change_sides_with_the_reason(tmp_path: Path, capsys) -> None:
    network = lycoris_network(Tiny(), "boft")
    source = tmp_path / "lycoris.safetensors"
    save_file(network.state_dict(), str(source))
    status, _, err = run_cli(capsys, "convert", str(source), "--to", "peft", "--output", str(tmp_path / "peft"))
    assert status == 2 and len(err.strip().splitlines()) == 1
    assert "rotates a layer's outputs but peft files rotate its inputs" in err and "orthotune merge" in err
    assert not (tmp_path / "peft").exists()
    status, _, err = run_cli(capsys, "convert", str(source), "--to", "kohya-lora", "--output", str(tmp_path / "x"))
    assert status == 2 and "--to kohya-lora: not one of ['peft', 'lycoris'" in err


# --------------------------------------------------------------------------- an input-side single-file format
def _input_side_format() -> types.ModuleType:
    """A stand-in single-file format whose files rotate inputs: ``inp_<module>.oft_R`` holds packed generators."""
    module = types.ModuleType("input_side_format")
    module.NAME, module.PIPELINE_PREFIXES, module.ROTATION_SIDE = "input-side", {"inp": ""}, "input"
    module.detect = lambda state_dict: all(key.startswith("inp_") for key in state_dict)

    def read(state_dict, module_names, prefixes=None, ignore_unmatched=False):
        names = match_lycoris_names({key.split(".")[0] for key in state_dict}, module_names, prefixes or {"inp": ""})
        adapters = {}
        for name, target in names.items():
            packed = state_dict[f"{name}.oft_R"].float()
            block_size = round((1 + math.sqrt(1 + 8 * packed.shape[1])) / 2)
            adapters[target] = LayerAdapter("oft", packed, block_size, packed.shape[0], source=name)
        return adapters

    module.read = read
    return module


def test_convert_an_input_side_file_to_peft_loads_in_peft_with_the_same_outputs(
    tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    monkeypatch.setattr(formats, "FORMATS", (*formats.FORMATS, _input_side_format()))
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    base = tmp_path / "base"
    transformers.BertModel(config).save_pretrained(base)
    names = ["encoder.layer.0.attention.self.query", "encoder.layer.0.output.dense"]  # widths 16 and 32
    generator = torch.Generator().manual_seed(2)
    file = {
        f"inp_{name.replace('.', '_')}.oft_R": torch.randn(width // 4, 6, generator=generator) * 0.3
        for name, width in zip(names, (16, 32), strict=True)
    }
    source = tmp_path / "input.safetensors"
    save_file(file, str(source))
    status, _, err = run_cli(capsys, "convert", str(source), "--output", str(tmp_path / "peft"))
    assert status == 2 and "pass --base" in err
    status, out, err = run_cli(capsys, "convert", str(source), "--base", str(base), "--output", str(tmp_path / "peft"))
    assert status == 0, err
    ids = torch.tensor([[2, 5, 6, 7, 3]])
    expected = orthotune.from_file(transformers.BertModel.from_pretrained(base).eval(), source)
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(transformers.BertModel.from_pretrained(base).eval(), tmp_path / "peft")
        assert rel_err(theirs(ids).last_hidden_state, expected(ids).last_hidden_state) <= TOLERANCE
    status, _, err = run_cli(capsys, "convert", str(source), "--to", "lycoris", "--output", str(tmp_path / "l.st"))
    assert status == 2 and "rotates a layer's inputs but lycoris files rotate its outputs" in err


def test_convert_an_output_side_directory_to_lycoris_with_the_base(tmp_path: Path, capsys) -> None:
    """A peft-format directory holding an output-side adapter (orthotune no longer writes them) becomes a LyCORIS
    file that LyCORIS loads with the adapter's outputs."""
    transformers = pytest.importorskip("transformers")
    from orthotune.checkpoint import to_peft_convention

    torch.manual_seed(0)
    bert = transformers.BertConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    base = tmp_path / "base"
    transformers.BertModel(bert).save_pretrained(base)
    config = orthotune.OFTConfig(
        oft_block_size=4, rotation_side="output", rescale=True, target_modules=["query"], init_weights=False
    )
    wrapped = orthotune.get_peft_model(transformers.BertModel.from_pretrained(base).eval(), config)
    directory = tmp_path / "adapter"
    directory.mkdir()
    (directory / "adapter_config.json").write_text(config.to_json_string())
    tensors = {
        f"base_model.model.encoder.layer.0.attention.self.query.{key}": value.detach()
        for key, value in wrapped.get_submodule("base_model.model.encoder.layer.0.attention.self.query")
        .adapter_tensors("default")
        .items()
    }
    save_file(to_peft_convention(config, tensors), str(directory / "adapter_model.safetensors"))
    target = tmp_path / "out.safetensors"
    status, _, err = run_cli(capsys, "convert", str(directory), "--to", "lycoris", "--output", str(target))
    assert status == 2 and "pass --base" in err
    status, _, err = run_cli(
        capsys, "convert", str(directory), "--to", "lycoris", "--base", str(base), "--output", str(target)
    )
    assert status == 0, err
    ids = torch.tensor([[2, 5, 6, 7, 3]])
    with torch.no_grad():
        expected = wrapped.eval()(ids).last_hidden_state
    model = transformers.BertModel.from_pretrained(base).eval()
    network, _ = create_lycoris_from_weights(1.0, "", model, weights_sd=load_file(str(target)))
    network.apply_to()
    with torch.no_grad():
        assert rel_err(model(ids).last_hidden_state, expected) <= TOLERANCE
    status, _, err = run_cli(capsys, "convert", str(directory), "--output", str(tmp_path / "peft"))
    assert status == 2 and "peft's files cannot express" in err
