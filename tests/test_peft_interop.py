"""Adapter files move between orthotune and real peft 0.21.2 in both directions, giving the same outputs.

Each case builds a tiny transformers model from a config, trains nothing, but starts from random adapter
weights (``init_weights=False``), so a wrong sign, layout or key would change the logits. peft's outputs are the
truth; the tolerance is the issue's: ≤ 1e-6 relative in fp32.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from references import document_upstream_defect, rel_err
from safetensors.torch import load_file
from tiny_models import tiny_bert, tiny_gpt2, tiny_llama, token_batch

import orthotune

peft = pytest.importorskip("peft")

TOLERANCE = 1e-6

OFT_CASES = {
    "llama-neumann": (tiny_llama, {"oft_block_size": 8, "target_modules": ["q_proj", "v_proj"]}),
    "llama-exact": (
        tiny_llama,
        {"oft_block_size": 8, "target_modules": ["q_proj", "v_proj", "down_proj"], "use_cayley_neumann": False},
    ),
    "llama-r-exact": (tiny_llama, {"r": 4, "target_modules": ["k_proj", "o_proj"], "use_cayley_neumann": False}),
    "llama-coft": (tiny_llama, {"oft_block_size": 8, "target_modules": ["q_proj", "v_proj"], "coft": True, "eps": 1.0}),
    "llama-coft-exact": (
        tiny_llama,
        {"oft_block_size": 8, "target_modules": ["q_proj"], "coft": True, "eps": 1.0, "use_cayley_neumann": False},
    ),
    "llama-block-share": (
        tiny_llama,
        {
            "oft_block_size": 8,
            "target_modules": ["q_proj", "up_proj"],
            "block_share": True,
            "use_cayley_neumann": False,
        },
    ),
    "llama-embedding": (tiny_llama, {"oft_block_size": 8, "target_modules": ["embed_tokens", "q_proj"]}),
    "llama-embedding-exact": (
        tiny_llama,
        {"oft_block_size": 4, "target_modules": ["embed_tokens"], "use_cayley_neumann": False},
    ),
    "gpt2-embedding-head": (
        tiny_gpt2,
        {"oft_block_size": 8, "target_modules": ["wte", "lm_head"], "use_cayley_neumann": False},
    ),
    "gpt2-bias-all": (tiny_gpt2, {"oft_block_size": 8, "target_modules": ["wte"], "bias": "all"}),
    "bert-seq-cls": (tiny_bert, {"oft_block_size": 8, "target_modules": ["query", "value"], "task_type": "SEQ_CLS"}),
}
BOFT_CASES = {
    "llama-m1": (tiny_llama, {"boft_block_size": 4, "target_modules": ["q_proj", "v_proj"]}),
    "llama-m2": (
        tiny_llama,
        {"boft_block_size": 4, "boft_n_butterfly_factor": 2, "target_modules": ["q_proj", "o_proj"]},
    ),
    "llama-m3-block-num": (
        tiny_llama,
        {
            "boft_block_size": 0,
            "boft_block_num": 4,
            "boft_n_butterfly_factor": 3,
            "target_modules": ["gate_proj", "v_proj"],
        },
    ),
    "gpt2-head-m2": (tiny_gpt2, {"boft_block_size": 4, "boft_n_butterfly_factor": 2, "target_modules": ["lm_head"]}),
    "bert-seq-cls-m2": (
        tiny_bert,
        {
            "boft_block_size": 4,
            "boft_n_butterfly_factor": 2,
            "target_modules": ["query", "value"],
            "task_type": "SEQ_CLS",
        },
    ),
    "bert-bias-only": (
        tiny_bert,
        {"boft_block_size": 8, "target_modules": ["key", "dense"], "bias": "boft_only", "task_type": "SEQ_CLS"},
    ),
}

HRA_CASES = {
    "llama": (tiny_llama, {"r": 4, "target_modules": ["q_proj", "v_proj", "down_proj"]}),
    "llama-odd-r": (tiny_llama, {"r": 5, "target_modules": ["k_proj", "up_proj"]}),
    "llama-gram-schmidt": (tiny_llama, {"r": 4, "apply_GS": True, "target_modules": ["q_proj", "o_proj"]}),
    "llama-all-linear": (tiny_llama, {"r": 2, "target_modules": "all-linear"}),
    "bert-seq-cls": (tiny_bert, {"r": 4, "target_modules": ["query", "value"], "task_type": "SEQ_CLS"}),
    "bert-bias-only": (
        tiny_bert,
        {"r": 6, "target_modules": ["key", "dense"], "bias": "hra_only", "task_type": "SEQ_CLS"},
    ),
}


def _outputs(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=tokens).logits


def _perturb_heads(model: torch.nn.Module) -> None:
    """Make trained classifier copies and trained biases differ from the base model's, so saving them matters."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".modules_to_save." in name or (parameter.requires_grad and name.endswith(".bias")):
                parameter.add_(0.5 * torch.randn_like(parameter))


def _configs(method: str, options: dict) -> tuple[object, object]:
    ours = getattr(orthotune, f"{method}Config")(init_weights=False, **options)
    theirs_options = dict(options)
    if method == "OFT" and "oft_block_size" not in options:
        theirs_options["oft_block_size"] = 0  # peft needs it cleared to use r
    theirs = getattr(peft, f"{method}Config")(init_weights=False, **theirs_options)
    return ours, theirs


def _layout(directory: str) -> dict[str, tuple[int, ...]]:
    tensors = load_file(os.path.join(directory, "adapter_model.safetensors"))
    return {key: tuple(tensor.shape) for key, tensor in tensors.items()}


def _cases() -> list:
    return (
        [pytest.param("OFT", *case, id=f"oft-{name}") for name, case in OFT_CASES.items()]
        + [pytest.param("BOFT", *case, id=f"boft-{name}") for name, case in BOFT_CASES.items()]
        + [pytest.param("HRA", *case, id=f"hra-{name}") for name, case in HRA_CASES.items()]
    )


@pytest.mark.usefixtures("peft_boft_without_cuda")
@pytest.mark.parametrize(("method", "make_model", "options"), _cases())
def test_orthotune_file_loads_in_peft_with_the_same_outputs(method, make_model, options, tmp_path) -> None:
    ours_config, theirs_config = _configs(method, options)
    tokens = token_batch()
    base = _outputs(make_model(), tokens)
    ours = orthotune.get_peft_model(make_model(), ours_config).eval()
    _perturb_heads(ours)
    expected = _outputs(ours, tokens)
    assert rel_err(expected, base) > 1e-3, "the adapter must change the outputs for this test to mean anything"
    ours.save_pretrained(tmp_path / "ours")

    theirs = peft.PeftModel.from_pretrained(make_model(), tmp_path / "ours").eval()
    assert rel_err(_outputs(theirs, tokens), expected) <= TOLERANCE

    # The file is laid out exactly as peft lays out its own for the same config.
    peft.get_peft_model(make_model(), theirs_config).save_pretrained(tmp_path / "theirs")
    assert _layout(tmp_path / "ours") == _layout(tmp_path / "theirs")


@pytest.mark.usefixtures("peft_boft_without_cuda")
@pytest.mark.parametrize(("method", "make_model", "options"), _cases())
def test_peft_file_loads_in_orthotune_with_the_same_outputs(method, make_model, options, tmp_path) -> None:
    _, theirs_config = _configs(method, options)
    tokens = token_batch()
    theirs = peft.get_peft_model(make_model(), theirs_config).eval()
    _perturb_heads(theirs)
    expected = _outputs(theirs, tokens)
    assert rel_err(expected, _outputs(make_model(), tokens)) > 1e-3
    theirs.save_pretrained(tmp_path)

    ours = orthotune.PeftModel.from_pretrained(make_model(), tmp_path)
    assert rel_err(_outputs(ours, tokens), expected) <= TOLERANCE
    # Saving again writes the same tensors peft wrote (the exact-mode sign mapped back out).
    ours.save_pretrained(tmp_path / "again")
    written, original = (
        load_file(tmp_path / "again" / "adapter_model.safetensors"),
        load_file(tmp_path / "adapter_model.safetensors"),
    )
    assert written.keys() == original.keys()
    for key, tensor in original.items():
        torch.testing.assert_close(written[key], tensor, rtol=0, atol=0)


def test_exact_mode_files_hold_peft_sign(tmp_path) -> None:
    """In exact Cayley mode peft's oft_R means R(-Q): the file holds minus our generators."""
    ours = orthotune.get_peft_model(
        tiny_llama(),
        orthotune.OFTConfig(oft_block_size=8, target_modules=["q_proj"], init_weights=False, use_cayley_neumann=False),
    )
    ours.save_pretrained(tmp_path)
    stored = load_file(tmp_path / "adapter_model.safetensors")
    layer = ours.base_model.model.model.layers[0].self_attn.q_proj
    torch.testing.assert_close(
        stored["base_model.model.model.layers.0.self_attn.q_proj.oft_R.weight"], -layer.oft_R["default"].weight.detach()
    )
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "OFT" and config["use_cayley_neumann"] is False and config["peft_version"] == "0.21.2"


def test_peft_three_term_neumann_is_our_four_term_series(tmp_path) -> None:
    """peft's 3-term series is I + 2Q + 2Q² + Q³, the 4-term truncation: such files load exactly."""
    tokens = token_batch()
    theirs = peft.get_peft_model(
        tiny_llama(),
        peft.OFTConfig(oft_block_size=8, target_modules=["q_proj"], init_weights=False, num_cayley_neumann_terms=3),
    ).eval()
    expected = _outputs(theirs, tokens)
    theirs.save_pretrained(tmp_path)
    ours = orthotune.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert ours.peft_config["default"].num_cayley_neumann_terms == 4
    assert rel_err(_outputs(ours, tokens), expected) <= TOLERANCE


def test_peft_cannot_adapt_gpt2_conv1d_but_orthotune_can() -> None:
    try:
        peft.get_peft_model(tiny_gpt2(), peft.OFTConfig(oft_block_size=8, target_modules=["c_attn"]))
        raised = False
    except TypeError:
        raised = True
    document_upstream_defect(raised, "peft's OFT rejects GPT-2's Conv1D with a TypeError")
    model = orthotune.get_peft_model(tiny_gpt2(), orthotune.OFTConfig(oft_block_size=8, target_modules=["c_attn"]))
    assert isinstance(model.base_model.model.transformer.h[0].attn.c_attn, orthotune.oft.Linear)
