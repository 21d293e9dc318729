"""Each foreign-format reader recognises its own files and no other's.

The key sets are built the way each tool names its tensors (see docs/file-format.md): LyCORIS's ``diag-oft``,
``boft`` and legacy ``oft_diag`` under its own and kohya's prefixes; kohya's ``networks/oft.py``
(``oft_unet_…``); OneTrainer's ``oft_R`` tensors under kohya-style, internal dotted and module-path names; and
files that are none of these (peft's adapter files, a kohya LoRA). A file must be claimed by exactly its reader.
"""

from __future__ import annotations

import pytest
import torch

from orthotune.formats import detect_lycoris, kohya, onetrainer

DETECTORS = {"lycoris": detect_lycoris, "kohya": kohya.detect, "onetrainer": onetrainer.detect}


def blocks(*shape: int) -> torch.Tensor:
    return torch.zeros(shape)


FILES: dict[str, tuple[set[str], dict[str, torch.Tensor]]] = {
    "lycoris diag-oft": (
        {"lycoris"},
        {"lycoris_proj.oft_blocks": blocks(2, 4, 4), "lycoris_proj.alpha": torch.tensor(0.0)},
    ),
    "lycoris diag-oft, kohya prefixes": (
        {"lycoris"},
        {
            "lora_unet_down_blocks_0_attn_to_q.oft_blocks": blocks(2, 4, 4),
            "lora_unet_down_blocks_0_attn_to_q.alpha": torch.tensor(1e-3),
            "lora_unet_down_blocks_0_attn_to_q.rescale": blocks(8, 1),
            "lora_te1_text_model_encoder_layers_0_mlp_fc1.oft_blocks": blocks(4, 2, 2),
        },
    ),
    "lycoris boft": ({"lycoris"}, {"lycoris_proj.oft_blocks": blocks(3, 4, 2, 2)}),
    "lycoris legacy oft_diag": ({"lycoris"}, {"lora_unet_proj.oft_diag": blocks(2, 4, 4)}),
    "kohya oft.py": (
        {"kohya"},
        {
            "oft_unet_down_blocks_0_attentions_0_proj_in.oft_blocks": blocks(4, 80, 80),
            "oft_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(1e-3),
            "oft_unet_down_blocks_0_resnets_0_conv1.oft_blocks": blocks(4, 80, 80),
            "oft_unet_down_blocks_0_resnets_0_conv1.alpha": torch.tensor(1e-3),
        },
    ),
    "kohya oft_flux.py": ({"kohya"}, {"oft_unet_double_blocks_0_img_attn_qkv.oft_blocks.0": blocks(4, 2, 2)}),
    "onetrainer kohya-style": (
        {"onetrainer"},
        {
            "lora_unet_down_blocks_0_attn_to_q.oft_R.weight": blocks(2, 6),
            "lora_unet_down_blocks_0_attn_to_q.oft_R.scaled_oft": torch.tensor(True),
            "lora_unet_down_blocks_0_attn_to_q.oft_R.clipped_oft": torch.tensor(0.95),
            "lora_te1_text_model_encoder_layers_0_mlp_fc1.oft_R.weight": blocks(2, 6),
            "lora_te1_text_model_encoder_layers_0_mlp_fc1.oft_R.cans_oft": torch.tensor(True),
        },
    ),
    "onetrainer internal": (
        {"onetrainer"},
        {"lora_transformer.transformer_blocks.0.attn.to_q.oft_R.weight": blocks(2, 6)},
    ),
    "onetrainer module paths": (
        {"onetrainer"},
        {"transformer.transformer_blocks.0.attn1.to_k.oft_R.weight": blocks(1, 6)},
    ),
    "peft oft": (set(), {"base_model.model.model.layers.0.self_attn.q_proj.oft_R.weight": blocks(2, 6)}),
    "peft boft": (
        set(),
        {"base_model.model.query.boft_R": blocks(1, 2, 4, 4), "base_model.model.query.boft_s": blocks(8, 1)},
    ),
    "kohya lora": (
        set(),
        {
            "lora_unet_proj.lora_down.weight": blocks(4, 8),
            "lora_unet_proj.lora_up.weight": blocks(8, 4),
            "lora_unet_proj.alpha": torch.tensor(4.0),
        },
    ),
    "empty": (set(), {}),
}


@pytest.mark.parametrize("file", list(FILES))
def test_exactly_its_own_reader_claims_a_file(file: str) -> None:
    owners, state_dict = FILES[file]
    claimed = {name for name, detect in DETECTORS.items() if detect(state_dict)}
    assert claimed == owners


def test_modules_name_themselves() -> None:
    assert (kohya.NAME, onetrainer.NAME) == ("kohya", "onetrainer")
