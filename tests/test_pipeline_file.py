"""One call loads a Stable Diffusion LyCORIS file into a diffusers pipeline's UNet and text encoders.

The file is made by lycoris-lora 4.1.3 itself, with the name prefixes kohya's training scripts give it
(``lora_unet_`` for the UNet, ``lora_te_`` or ``lora_te1_``/``lora_te2_`` for the text encoders), on a tiny
``UNet2DConditionModel`` and tiny CLIP text encoders built from configs (nothing downloaded). The truth is
LyCORIS's own networks on copies of the same components: their outputs, and their weights after LyCORIS's
own ``merge_to``. Every LyCORIS layer of these models is a ``Linear`` or ``Conv2d`` (83 in the UNet: attention
projections, feed-forwards, 3×3 and 1×1 convolutions, the time embedding; 12 in a text encoder).

Tolerance: a UNet with 83 rotated layers (GroupNorm, attention, skip connections) accumulates float32 rounding,
and LyCORIS inverts in float32 where orthotune solves in float64; measured differences are ≤ 3e-6 relative
(UNet) and ≤ 7e-7 (text encoder), checked at 1e-5.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from references import rel_err
from safetensors.torch import save_file

import orthotune
from orthotune.checkpoint import AdapterFileError

diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed; these tests load into a pipeline")
pytest.importorskip("lycoris")
from lycoris import create_lycoris  # noqa: E402
from lycoris.wrapper import LycorisNetwork  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

logging.getLogger("LyCORIS").setLevel(logging.ERROR)
TOLERANCE = 1e-5


def tiny_unet() -> torch.nn.Module:
    torch.manual_seed(1234)
    return diffusers.UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    ).eval()


def tiny_text_encoder(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=99,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=32,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )
    return CLIPTextModel(config).eval()


def pipeline(unet: torch.nn.Module, text_encoder: torch.nn.Module):
    return diffusers.StableDiffusionPipeline(
        vae=None,
        text_encoder=text_encoder,
        tokenizer=None,
        unet=unet,
        scheduler=diffusers.DDIMScheduler(steps_offset=1, clip_sample=False, set_alpha_to_one=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def outputs(components: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    sample, text = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 5, 32, generator=generator)
    tokens = torch.randint(3, 99, (2, 7), generator=generator)
    results = {}
    with torch.no_grad():
        for name, module in components.items():
            if name == "unet":
                results[name] = module(sample, torch.tensor([10, 700]), encoder_hidden_states=text).sample
            else:
                results[name] = module(tokens).last_hidden_state
    return results


def lycoris_state(module: torch.nn.Module, prefix: str, algo: str, seed: int, merge: bool = False):
    """LyCORIS's network on ``module`` (applied in place) under ``prefix``, with random blocks and scales."""
    saved = LycorisNetwork.LORA_PREFIX
    LycorisNetwork.LORA_PREFIX = prefix
    try:
        network = create_lycoris(module, 1.0, linear_dim=4, linear_alpha=1, algo=algo, constraint=0.05, rescaled=True)
    finally:
        LycorisNetwork.LORA_PREFIX = saved
    network.apply_to()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lora in network.loras:
            lora.oft_blocks.copy_(torch.randn(lora.oft_blocks.shape, generator=generator) * 0.2)
            lora.rescale.copy_(torch.rand(lora.rescale.shape, generator=generator) * 0.2 + 0.9)
    return network


def snapshot(module: torch.nn.Module):
    return (
        {key: value.clone() for key, value in module.state_dict().items()},
        {name: type(child) for name, child in module.named_modules()},
    )


@pytest.mark.parametrize("algo", ["diag-oft", "boft"])
def test_one_call_loads_unet_and_text_encoder_with_lycoris_outputs(algo: str, tmp_path) -> None:
    unet, text_encoder = tiny_unet(), tiny_text_encoder()
    theirs = {"unet": copy.deepcopy(unet), "text_encoder": copy.deepcopy(text_encoder)}
    networks = {
        "unet": lycoris_state(theirs["unet"], "lora_unet", algo, seed=1),
        "text_encoder": lycoris_state(theirs["text_encoder"], "lora_te", algo, seed=2),
    }
    expected = outputs(theirs)
    state = {key: value for network in networks.values() for key, value in network.state_dict().items()}
    assert any(key.startswith("lora_unet_") for key in state) and any(key.startswith("lora_te_") for key in state)
    path = tmp_path / "sd.safetensors"
    save_file(state, str(path))
    for network in networks.values():
        network.restore()
        network.merge_to()
    merged = outputs(theirs)

    pipe = pipeline(unet, text_encoder)
    models = orthotune.from_file(pipe, path)
    assert sorted(models) == ["text_encoder", "unet"]
    assert pipe.unet is unet and models["unet"].get_base_model() is unet  # adapted in place, as peft does
    assert len(list(models["unet"].adapter_layers())) == len(networks["unet"].loras)
    ours = outputs({"unet": pipe.unet, "text_encoder": pipe.text_encoder})
    for name in expected:
        assert rel_err(ours[name], expected[name]) <= TOLERANCE, name
        assert rel_err(ours[name], merged[name]) <= TOLERANCE, name
    plain = {name: model.merge_and_unload() for name, model in models.items()}
    for name, output in outputs(plain).items():
        assert rel_err(output, merged[name]) <= TOLERANCE, name


def test_a_misfit_in_one_component_leaves_every_component_unchanged(tmp_path) -> None:
    unet, text_encoder = tiny_unet(), tiny_text_encoder()
    state = lycoris_state(copy.deepcopy(unet), "lora_unet", "diag-oft", seed=1).state_dict()
    te_state = lycoris_state(copy.deepcopy(text_encoder), "lora_te", "diag-oft", seed=2).state_dict()
    key = "lora_te_encoder_layers_1_mlp_fc2.oft_blocks"
    te_state[key] = torch.zeros(4, 4, 4)  # fc2 writes 32 features; 4 blocks of 4 are 16
    del te_state["lora_te_encoder_layers_1_mlp_fc2.rescale"]
    path = tmp_path / "misfit.safetensors"
    save_file(state | te_state, str(path))
    pipe = pipeline(unet, text_encoder)
    before = {"unet": snapshot(unet), "text_encoder": snapshot(text_encoder)}
    with pytest.raises(AdapterFileError, match=r"lora_te_encoder_layers_1_mlp_fc2.*16 output features.*32 out"):
        orthotune.from_file(pipe, path)
    for name, module in (("unet", unet), ("text_encoder", text_encoder)):
        state_after, types_after = snapshot(module)
        assert types_after == before[name][1]
        assert all(torch.equal(value, before[name][0][key]) for key, value in state_after.items())


def test_sdxl_prefixes_reach_both_text_encoders_and_unknown_ones_are_listed(tmp_path) -> None:
    first, second = tiny_text_encoder(0), tiny_text_encoder(1)
    theirs = {"text_encoder": copy.deepcopy(first), "text_encoder_2": copy.deepcopy(second)}
    state = lycoris_state(theirs["text_encoder"], "lora_te1", "boft", seed=3).state_dict()
    state |= lycoris_state(theirs["text_encoder_2"], "lora_te2", "boft", seed=4).state_dict()
    expected = outputs(theirs)
    path = tmp_path / "sdxl.safetensors"
    save_file(state, str(path))
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=None,
        text_encoder=first,
        text_encoder_2=second,
        tokenizer=None,
        tokenizer_2=None,
        unet=tiny_unet(),
        scheduler=diffusers.DDIMScheduler(steps_offset=1, clip_sample=False, set_alpha_to_one=False),
    )
    models = orthotune.load_pipeline_file(pipe, path)
    assert sorted(models) == ["text_encoder", "text_encoder_2"]
    ours = outputs({"text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2})
    for name in expected:
        assert rel_err(ours[name], expected[name]) <= TOLERANCE, name

    sd15 = pipeline(tiny_unet(), tiny_text_encoder(0))  # no text_encoder_2: the lora_te2_ layers match nothing
    with pytest.raises(AdapterFileError, match=r"match no module of the model: lora_te2_encoder_layers_0"):
        orthotune.from_file(sd15, path)
    assert sorted(orthotune.from_file(sd15, path, ignore_unmatched=True)) == ["text_encoder"]
