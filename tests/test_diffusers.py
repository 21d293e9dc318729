"""OFT, COFT and BOFT in a diffusers ``UNet2DConditionModel`` built from a config (nothing downloaded).

The targets mix ``nn.Linear`` (the attention projections) and ``nn.Conv2d`` (the 3×3 resnet convolutions, run on
8×8 latents so the input is larger than the kernel, and the 1×1 ``proj_in``). The truths are the base UNet
(identity at init, untouched base weights), the trained model in memory (what a file must give back), the
unmerged model (what merging must keep), diffusers' own save/load of a plain UNet, and peft's files and outputs.

A pipeline needs no tokenizer or text encoder when it is given ``prompt_embeds``, nor a VAE when it returns
latents: :func:`_pipeline` is a ``StableDiffusionPipeline`` around the UNet and a ``DDIMScheduler`` only.

Tolerances: a whole UNet (two dozen adapted layers, GroupNorm, attention, three DDIM steps with guidance)
accumulates float32 rounding; measured differences are ≤ 1e-6 relative, checked at 1e-5.
"""

from __future__ import annotations

import contextlib
import json
import os

import pytest
import torch
from references import document_upstream_defect, rel_err
from safetensors.torch import load_file

import orthotune
from orthotune import AdapterLayer, BOFTConfig, OFTConfig

diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed; these tests adapt a diffusers UNet")

TOLERANCE = 1e-5
#: Attention projections (Linear), the 1×1 ``proj_in`` and the resnets' 3×3 convolutions (Conv2d).
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1", "conv2"]
#: Block size 8 divides every rotated width here: 32, 64 (Linear, 1×1) and 32·9 … 128·9 (3×3 convolutions).
CONFIGS = {
    "oft-exact": (OFTConfig, {"oft_block_size": 8, "use_cayley_neumann": False}),
    "oft-neumann": (OFTConfig, {"oft_block_size": 8}),
    "coft": (OFTConfig, {"oft_block_size": 8, "coft": True, "eps": 0.1}),
    "boft-m2": (BOFTConfig, {"boft_block_size": 8, "boft_n_butterfly_factor": 2}),
}
ADAPTER_KEYS = (".oft_R.", ".boft_R.", ".boft_s.")
WEIGHTS = "adapter_model.safetensors"


def tiny_unet():
    """A two-level conditional UNet (cross-attention in the outer level and the middle), ~0.8M parameters."""
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


def _config(name: str, **overrides):
    config_class, options = CONFIGS[name]
    return config_class(target_modules=TARGETS, **{**options, **overrides})


def _inputs(batch: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(batch, 4, 8, 8, generator=generator)
    timestep = torch.tensor([10, 700][:batch])
    text = torch.randn(batch, 5, 32, generator=generator)
    return sample, timestep, text


def _denoise(unet: torch.nn.Module) -> torch.Tensor:
    sample, timestep, text = _inputs()
    with torch.no_grad():
        return unet(sample, timestep, encoder_hidden_states=text).sample


def _pipeline(unet: torch.nn.Module):
    scheduler = diffusers.DDIMScheduler(steps_offset=1, clip_sample=False, set_alpha_to_one=False)
    pipe = diffusers.StableDiffusionPipeline(
        vae=None,
        text_encoder=None,
        tokenizer=None,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _latents(pipe) -> torch.Tensor:
    """Three DDIM steps with classifier-free guidance (the UNet sees a batch of 2), as latents."""
    generator = torch.Generator().manual_seed(0)
    text = torch.randn(1, 5, 32, generator=generator)
    return pipe(
        prompt_embeds=text,
        negative_prompt_embeds=torch.zeros_like(text),
        guidance_scale=5.0,
        num_inference_steps=3,
        output_type="latent",
        generator=generator,
    ).images


def _train_one_step(model: orthotune.OrthoModel) -> None:
    """One AdamW step on the denoising loss; leaves the gradients in place and the model in eval mode."""
    model.train()
    optimizer = torch.optim.AdamW([parameter for parameter in model.parameters() if parameter.requires_grad], lr=1e-2)
    sample, timestep, text = _inputs()
    noise = torch.randn(sample.shape, generator=torch.Generator().manual_seed(1))
    prediction = model(sample, timestep, encoder_hidden_states=text).sample
    torch.nn.functional.mse_loss(prediction, noise).backward()
    optimizer.step()
    model.eval()


def _layout(directory: str | os.PathLike[str]) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in load_file(os.path.join(directory, WEIGHTS)).items()}


def _adapted_kinds(unet: torch.nn.Module) -> dict[str, int]:
    kinds: dict[str, int] = {}
    for module in unet.modules():
        if isinstance(module, AdapterLayer):
            kind = type(module.get_base_layer()).__name__
            kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


@pytest.mark.parametrize("name", CONFIGS)
def test_adapters_start_as_the_identity_in_conv2d_and_linear_layers(name) -> None:
    expected = _denoise(tiny_unet())
    model = orthotune.get_peft_model(tiny_unet(), _config(name)).eval()
    # 4 transformer blocks × 2 attentions × 4 projections; 4 proj_in and 8 resnets × (conv1, conv2).
    assert _adapted_kinds(model.get_base_model()) == {"Linear": 32, "Conv2d": 20}
    assert torch.equal(_denoise(model), expected)


@pytest.mark.parametrize("name", CONFIGS)
def test_one_training_step_moves_only_the_rotations(name) -> None:
    base = tiny_unet()
    model = orthotune.get_peft_model(tiny_unet(), _config(name))
    before = {key: value.detach().clone() for key, value in model.named_parameters() if value.requires_grad}
    assert before and all(any(part in f"{key}." for part in ADAPTER_KEYS) for key in before)

    _train_one_step(model)

    parameters = dict(model.named_parameters())
    assert {key for key, value in parameters.items() if value.grad is not None} == set(before)
    assert all(parameters[key].grad.abs().sum() > 0 for key in before)
    assert all(not torch.equal(parameters[key], value) for key, value in before.items())
    # Every base tensor, under its original name, is bit-for-bit the fresh UNet's.
    base_tensors = {
        key.replace(".base_layer.", "."): tensor
        for key, tensor in model.get_base_model().state_dict().items()
        if not any(part in f"{key}." for part in ADAPTER_KEYS)
    }
    reference = base.state_dict()
    assert base_tensors.keys() == reference.keys()
    assert all(torch.equal(base_tensors[key], reference[key]) for key in reference)
    assert rel_err(_denoise(model), _denoise(base)) > 1e-3


@pytest.mark.parametrize("name", ["oft-exact", "boft-m2"])
def test_gradient_checkpointing_gives_the_same_gradients(name) -> None:
    """diffusers' gradient checkpointing recomputes the blocks in backward; the rotations' gradients must not change."""
    gradients, calls = [], []
    for checkpointing in (False, True):
        unet = tiny_unet()
        if checkpointing:
            unet.enable_gradient_checkpointing()
        model = orthotune.get_peft_model(unet, _config(name, init_weights=False)).train()
        layer = unet.get_submodule("down_blocks.0.resnets.0.conv1")
        layer.register_forward_hook(lambda *_, checkpointing=checkpointing: calls.append(checkpointing))
        sample, timestep, text = _inputs()
        model(sample, timestep, encoder_hidden_states=text).sample.square().mean().backward()
        gradients.append({key: value.grad for key, value in model.named_parameters() if value.requires_grad})
    assert calls == [False, True, True], "checkpointing must run the adapted layer again in backward"
    assert gradients[1].keys() == gradients[0].keys()
    assert all(
        gradients[1][key] is not None and rel_err(gradients[1][key], gradients[0][key]) <= TOLERANCE
        for key in gradients[0]
    )


@pytest.mark.parametrize("name", CONFIGS)
def test_trained_adapter_loads_into_a_pipeline_unet_with_one_call(name, tmp_path) -> None:
    trained = orthotune.get_peft_model(tiny_unet(), _config(name))
    _train_one_step(trained)
    trained.save_pretrained(tmp_path)
    expected = _latents(_pipeline(trained.get_base_model()))
    assert rel_err(expected, _latents(_pipeline(tiny_unet()))) > 1e-3

    pipe = _pipeline(tiny_unet())
    unet = pipe.unet
    adapted = orthotune.PeftModel.from_pretrained(pipe.unet, tmp_path)  # the one call

    # In place: the pipeline keeps its UNet2DConditionModel, which now holds the adapter.
    assert pipe.unet is unet and type(pipe.unet) is diffusers.UNet2DConditionModel
    assert adapted.get_base_model() is unet
    assert pipe.config["unet"] == ("diffusers", "UNet2DConditionModel")
    assert torch.equal(_latents(pipe), expected)
    # peft's idiom, the wrapper itself as the pipeline's UNet, gives the same latents.
    assert torch.equal(_latents(_pipeline(orthotune.PeftModel.from_pretrained(tiny_unet(), tmp_path))), expected)


def test_diffusers_lora_loaders_do_not_apply_oft_files_but_orthotune_does(tmp_path) -> None:
    """Why a loader of our own: diffusers' loaders read LoRA (and Custom Diffusion) files only."""
    model = orthotune.get_peft_model(tiny_unet(), _config("oft-exact", init_weights=False)).eval()
    model.save_pretrained(tmp_path)
    expected, base = _denoise(model), _denoise(tiny_unet())
    attempts = {
        "load_lora_adapter": lambda unet: unet.load_lora_adapter(tmp_path, weight_name=WEIGHTS),
        "load_lora_adapter(prefix=None)": lambda unet: unet.load_lora_adapter(
            tmp_path, weight_name=WEIGHTS, prefix=None
        ),
        "load_attn_procs": lambda unet: unet.load_attn_procs(tmp_path, weight_name=WEIGHTS),
    }
    applied = []
    for attempt in attempts.values():
        unet = tiny_unet()
        with contextlib.suppress(Exception):  # diffusers raises for some and warns for others
            attempt(unet)
        applied.append(not torch.equal(_denoise(unet), base))
        # Whatever diffusers did or refused, orthotune then loads the file into the same UNet exactly.
        orthotune.PeftModel.from_pretrained(unet, tmp_path)
        assert rel_err(_denoise(unet), expected) <= TOLERANCE
    outcome = dict(zip(attempts, applied, strict=True))
    document_upstream_defect(not any(applied), f"a diffusers loader now applies OFT files: {outcome}")


@pytest.mark.parametrize("name", CONFIGS)
def test_merged_unet_gives_the_unmerged_latents(name, tmp_path) -> None:
    pipe = _pipeline(tiny_unet())
    base = _latents(pipe)
    model = orthotune.get_peft_model(pipe.unet, _config(name, init_weights=False)).eval()
    unmerged = _latents(pipe)
    assert rel_err(unmerged, base) > 1e-3

    merged_unet = model.merge_and_unload()
    assert merged_unet is pipe.unet and not _adapted_kinds(merged_unet)
    merged = _latents(pipe)
    assert rel_err(merged, unmerged) <= TOLERANCE
    if name == "oft-exact":  # an exact rotation of each output row's inputs keeps the row's norm
        original = tiny_unet().state_dict()
        for key, weight in merged_unet.state_dict().items():
            if key.endswith(("conv1.weight", "to_q.weight")):
                norms = torch.linalg.vector_norm(weight.flatten(1), dim=1)
                assert rel_err(norms, torch.linalg.vector_norm(original[key].flatten(1), dim=1)) < 1e-5

    # The merged UNet is a plain diffusers model: its own checkpoint gives the same latents.
    merged_unet.save_pretrained(tmp_path)
    pipe.unet = diffusers.UNet2DConditionModel.from_pretrained(tmp_path)
    assert torch.equal(_latents(pipe), merged)


def test_adapter_config_names_the_diffusers_base_model(tmp_path) -> None:
    """diffusers keeps a loaded model's path in ``config._name_or_path`` (peft writes null); a UNet built from a
    config has none."""
    tiny_unet().save_pretrained(tmp_path / "unet")
    for unet, name in (
        (diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "unet"), str(tmp_path / "unet")),
        (tiny_unet(), None),
    ):
        orthotune.get_peft_model(unet, _config("oft-exact")).save_pretrained(tmp_path / "adapter")
        written = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
        assert written["base_model_name_or_path"] == name
        assert written["auto_mapping"]["base_model_class"] == "UNet2DConditionModel"


@pytest.mark.usefixtures("peft_boft_without_cuda")
@pytest.mark.parametrize("name", ["oft-exact", "oft-neumann", "boft-m2"])
def test_unet_files_are_peft_files(name, tmp_path) -> None:
    peft = pytest.importorskip("peft")
    model = orthotune.get_peft_model(tiny_unet(), _config(name, init_weights=False)).eval()
    model.save_pretrained(tmp_path / "ours")
    config_class, options = CONFIGS[name]
    theirs_config = getattr(peft, config_class.__name__)(target_modules=TARGETS, init_weights=False, **options)
    peft.get_peft_model(tiny_unet(), theirs_config).save_pretrained(tmp_path / "theirs")
    assert _layout(tmp_path / "ours") == _layout(tmp_path / "theirs")
    # peft's OFT Conv2d is not its merged layer on inputs larger than a 3×3 kernel (docs/math.md), so for OFT
    # the outputs are compared with the Linear and 1×1 targets only; peft's BOFT Conv2d is exact.
    if config_class is OFTConfig:
        linear_targets = TARGETS[:5]
        model = orthotune.get_peft_model(
            tiny_unet(), OFTConfig(target_modules=linear_targets, init_weights=False, **options)
        )
        model.eval().save_pretrained(tmp_path / "linear")
        directory = tmp_path / "linear"
    else:
        directory = tmp_path / "ours"
    theirs = peft.PeftModel.from_pretrained(tiny_unet(), directory).eval()
    assert rel_err(_denoise(theirs), _denoise(model)) <= TOLERANCE
