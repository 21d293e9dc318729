"""Whole models: injection, target_modules matching, the wrapper's API, merging, mixed batches, training.

Truths used: peft 0.21.2 (which modules it adapts, its state-dict keys, its parameter counts), the base model
(adapters disabled or unloaded), per-sample runs (mixed batches), runs without checkpointing, and transformers'
own save/load (merged models).
"""

from __future__ import annotations

import inspect
import subprocess
import sys
import warnings

import pytest
import torch
from references import rel_err
from tiny_models import tiny_bert, tiny_gpt2, tiny_llama, token_batch
from torch import nn

import orthotune
from orthotune import BOFTConfig, HRAConfig, OFTConfig, get_peft_model
from orthotune.adapter_layer import AdapterLayer

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def _logits(model: torch.nn.Module, tokens: torch.Tensor, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=tokens, **kwargs).logits


def _adapted_names(model: torch.nn.Module, layer_type: type) -> set[str]:
    return {name for name, module in model.named_modules() if isinstance(module, layer_type)}


def _two_adapter_llama() -> orthotune.OrthoModel:
    model = get_peft_model(
        tiny_llama(),
        OFTConfig(oft_block_size=8, target_modules=["q_proj", "v_proj"], init_weights=False),
        adapter_name="a",
    )
    model.add_adapter(
        "b",
        OFTConfig(
            oft_block_size=4,
            target_modules=["q_proj", "o_proj", "embed_tokens"],
            init_weights=False,
            use_cayley_neumann=False,
        ),
    )
    return model.eval()


# ------------------------------------------------------------------------------------------------ injection
@pytest.mark.parametrize(
    ("make_model", "options"),
    [
        (tiny_llama, {"target_modules": ["q_proj", "v_proj"]}),
        (
            tiny_llama,
            {"target_modules": ["self_attn.q_proj", "down_proj"], "exclude_modules": ["layers.1.mlp.down_proj"]},
        ),
        (tiny_llama, {"target_modules": r"model\.layers\.\d\.self_attn\.(k|v)_proj"}),
        (tiny_llama, {"target_modules": ["q_proj", "v_proj"], "exclude_modules": r".*layers\.0.*"}),
        (tiny_llama, {"target_modules": ["q_proj", "up_proj"], "layers_to_transform": 1}),
        (tiny_llama, {"target_modules": ["q_proj", "up_proj"], "layers_to_transform": [0], "layers_pattern": "layers"}),
        (tiny_llama, {"target_modules": ["q_proj"], "layers_to_transform": [0], "layers_pattern": "blocks"}),
        (tiny_llama, {"target_modules": "all-linear"}),
        (tiny_llama, {"target_modules": ["embed_tokens", "lm_head", "gate_proj"]}),
        (tiny_bert, {"target_modules": ["query", "value"], "layers_to_transform": [1]}),
        (tiny_bert, {"target_modules": "all-linear", "task_type": "SEQ_CLS"}),
        (tiny_bert, {"target_modules": ["dense"], "modules_to_save": ["pooler"]}),
        (tiny_bert, {"target_modules": None}),
    ],
)
def test_adapts_exactly_the_modules_peft_adapts(make_model, options) -> None:
    def build(library):
        return library.get_peft_model(make_model(), library.OFTConfig(oft_block_size=4, **options))

    try:
        theirs = build(peft)
    except ValueError:  # peft finds no target: so must we
        with pytest.raises(ValueError, match="matched no module"):
            build(orthotune)
        return
    ours = build(orthotune)
    assert _adapted_names(ours, AdapterLayer) == _adapted_names(theirs, peft.tuners.tuners_utils.BaseTunerLayer)
    # the whole state dict has peft's keys: base weights under base_layer, adapters by name (an embedding's
    # rotation is oft_R here, oft_embedding_R in peft: adapter files map it)
    their_keys = {key.replace(".oft_embedding_R.", ".oft_R.") for key in theirs.state_dict()}
    assert set(ours.state_dict()) == their_keys


def test_all_linear_takes_gpt2_conv1d_but_not_the_head() -> None:
    model = get_peft_model(tiny_gpt2(), OFTConfig(oft_block_size=8, target_modules="all-linear"))
    expected = {
        name for name, module in tiny_gpt2().named_modules() if type(module).__name__ in ("Linear", "Conv1D")
    } - {"lm_head"}
    assert {name.removeprefix("base_model.model.") for name in _adapted_names(model, AdapterLayer)} == expected
    assert len(expected) == 8
    assert model.peft_config["default"].target_modules == expected  # resolved into a set, as peft does


def test_unmatched_or_unsupported_targets_raise_and_leave_the_model_alone() -> None:
    model = tiny_llama()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    with pytest.raises(ValueError, match="matched no module"):
        get_peft_model(model, OFTConfig(target_modules=["query"]))
    with pytest.raises(TypeError, match="input_layernorm"):
        get_peft_model(model, OFTConfig(target_modules=["q_proj", "input_layernorm"]))
    with pytest.raises(TypeError, match="embed_tokens.*BOFT cannot adapt"):
        get_peft_model(model, BOFTConfig(target_modules=["embed_tokens"]))
    assert not _adapted_names(model, AdapterLayer)
    assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items())
    assert all(parameter.requires_grad for parameter in model.parameters())


def test_peft_config_objects_are_accepted() -> None:
    model = get_peft_model(tiny_llama(), peft.BOFTConfig(boft_block_size=4, target_modules=["q_proj"]))
    assert isinstance(model.peft_config["default"], BOFTConfig)
    assert _adapted_names(model.get_base_model(), orthotune.boft.Linear) == {
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.self_attn.q_proj",
    }


# ------------------------------------------------------------------------------------------------ the wrapper
def test_passes_calls_and_attributes_through() -> None:
    base = tiny_llama()
    model = get_peft_model(base, OFTConfig(oft_block_size=8, target_modules=["q_proj"]))
    assert model.config is base.config and model.get_base_model() is base
    assert "input_ids" in inspect.signature(model.forward).parameters  # transformers' Trainer reads it
    tokens = token_batch()
    torch.testing.assert_close(_logits(model, tokens), _logits(tiny_llama(), tokens))  # identity at init


def test_trainable_parameter_counts_match_peft(capsys) -> None:
    config = {"oft_block_size": 8, "target_modules": ["q_proj", "v_proj", "embed_tokens"], "block_share": True}
    ours = get_peft_model(tiny_llama(), OFTConfig(**config))
    theirs = peft.get_peft_model(tiny_llama(), peft.OFTConfig(**config))
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    trainable, total = ours.get_nb_trainable_parameters()
    ours.print_trainable_parameters()
    assert capsys.readouterr().out.strip() == (
        f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
    )


def test_adapters_by_name() -> None:
    model = _two_adapter_llama()
    tokens = token_batch()
    assert model.active_adapter == "a" and model.active_adapters == ["a"]
    only_a = _logits(model, tokens)
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert trainable and all(".a." in name for name in trainable)

    model.set_adapter("b")
    only_b = _logits(model, tokens)
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert trainable and all(".b." in name for name in trainable)
    assert rel_err(only_a, only_b) > 1e-3

    model.delete_adapter("a")
    assert list(model.peft_config) == ["b"] and model.active_adapter == "b"
    torch.testing.assert_close(_logits(model, tokens), only_b)
    with pytest.raises(ValueError, match="adapter_name='a'"):
        model.set_adapter("a")
    with pytest.raises(ValueError, match="already exists"):
        model.add_adapter("b", OFTConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="cannot add a BOFT adapter"):
        model.add_adapter("c", BOFTConfig(target_modules=["q_proj"]))


def test_disable_adapter_gives_the_base_model_and_restores_everything() -> None:
    model = _two_adapter_llama()
    tokens = token_batch()
    adapted = _logits(model, tokens)
    flags = {name: parameter.requires_grad for name, parameter in model.named_parameters()}
    model.merge_adapter()
    with model.disable_adapter():
        torch.testing.assert_close(_logits(model, tokens), _logits(tiny_llama(), tokens), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(_logits(model, tokens), adapted, rtol=1e-5, atol=1e-6)
    assert flags == {name: parameter.requires_grad for name, parameter in model.named_parameters()}


# ------------------------------------------------------------------------------------------------ merging
def test_merge_and_unmerge_adapter() -> None:
    model = _two_adapter_llama()
    model.set_adapter(["a", "b"])
    tokens = token_batch()
    adapted = _logits(model, tokens)
    original = {key: value.clone() for key, value in tiny_llama().state_dict().items()}
    model.merge_adapter()
    torch.testing.assert_close(_logits(model, tokens), adapted, rtol=1e-5, atol=1e-5)
    model.unmerge_adapter()
    for key, value in model.get_base_model().state_dict().items():
        plain = key.replace(".base_layer", "")
        if plain in original:
            torch.testing.assert_close(value, original[plain], rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("make_model", "config", "auto_class"),
    [
        (
            tiny_llama,
            OFTConfig(oft_block_size=8, target_modules=["q_proj", "embed_tokens"], init_weights=False),
            "AutoModelForCausalLM",
        ),
        (
            tiny_gpt2,
            OFTConfig(
                oft_block_size=8, target_modules=["c_attn", "c_fc"], init_weights=False, use_cayley_neumann=False
            ),
            "AutoModelForCausalLM",
        ),
        (
            tiny_bert,
            BOFTConfig(
                boft_block_size=4,
                boft_n_butterfly_factor=2,
                target_modules=["query", "dense"],
                init_weights=False,
                task_type="SEQ_CLS",
            ),
            "AutoModelForSequenceClassification",
        ),
        (
            tiny_gpt2,
            HRAConfig(r=4, target_modules=["c_attn", "c_proj", "c_fc"], init_weights=False),
            "AutoModelForCausalLM",
        ),
    ],
)
def test_merge_and_unload_gives_a_plain_model_with_the_same_outputs(make_model, config, auto_class, tmp_path) -> None:
    model = get_peft_model(make_model(), config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".modules_to_save." in name:
                parameter.add_(torch.randn_like(parameter))
    tokens = token_batch()
    adapted = _logits(model, tokens)
    assert rel_err(adapted, _logits(make_model(), tokens)) > 1e-3
    merged = model.merge_and_unload()
    assert type(merged) is type(make_model())
    assert not any(isinstance(module, AdapterLayer) for module in merged.modules())
    assert set(merged.state_dict()) == set(make_model().state_dict())
    assert rel_err(_logits(merged, tokens), adapted) < 1e-5
    merged.save_pretrained(tmp_path)  # transformers alone from here on
    reloaded = getattr(transformers, auto_class).from_pretrained(tmp_path).eval()
    assert rel_err(_logits(reloaded, tokens), adapted) < 1e-5


def test_unload_gives_back_the_original_model() -> None:
    model = _two_adapter_llama()
    model.merge_adapter()
    base = model.unload()
    tokens = token_batch()
    torch.testing.assert_close(_logits(base, tokens), _logits(tiny_llama(), tokens), rtol=1e-5, atol=1e-6)
    assert set(base.state_dict()) == set(tiny_llama().state_dict())


def test_merging_into_tied_weights_is_refused() -> None:
    model = get_peft_model(
        tiny_llama(tie_word_embeddings=True),
        OFTConfig(oft_block_size=8, target_modules=["embed_tokens"], init_weights=False),
    ).eval()
    tokens = token_batch()
    adapted = _logits(model, tokens)
    with pytest.raises(ValueError, match="tied"):
        model.merge_and_unload()
    torch.testing.assert_close(_logits(model, tokens), adapted, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ mixed batches
@pytest.mark.parametrize("method", ["OFT", "BOFT", "HRA"])
def test_mixed_batch_equals_per_sample_runs(method) -> None:
    if method == "HRA":
        configs = {
            "a": HRAConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS", init_weights=False),
            "b": HRAConfig(r=3, target_modules=["key", "value"], task_type="SEQ_CLS", init_weights=False),
        }
    elif method == "OFT":
        configs = {
            "a": OFTConfig(
                oft_block_size=8, target_modules=["query", "value"], task_type="SEQ_CLS", init_weights=False
            ),
            "b": OFTConfig(
                oft_block_size=4,
                target_modules=["key"],
                task_type="SEQ_CLS",
                init_weights=False,
                use_cayley_neumann=False,
            ),
        }
    else:
        configs = {
            "a": BOFTConfig(boft_block_size=4, target_modules=["query"], task_type="SEQ_CLS", init_weights=False),
            "b": BOFTConfig(
                boft_block_size=2,
                boft_n_butterfly_factor=2,
                target_modules=["query", "value"],
                task_type="SEQ_CLS",
                init_weights=False,
            ),
        }
    model = get_peft_model(tiny_bert(), configs["a"], adapter_name="a")
    model.add_adapter("b", configs["b"])
    model.eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".modules_to_save." in name:
                parameter.add_(torch.randn_like(parameter))
    tokens = token_batch(batch=5)
    names = ["a", "__base__", "b", "a", "b"]
    mixed = _logits(model, tokens, adapter_names=names)

    expected = []
    for row, name in enumerate(names):
        if name == "__base__":
            with model.disable_adapter():
                expected.append(_logits(model, tokens[row : row + 1]))
        else:
            model.set_adapter(name)
            expected.append(_logits(model, tokens[row : row + 1]))
    torch.testing.assert_close(mixed, torch.cat(expected), rtol=1e-5, atol=1e-6)


def test_mixed_batch_is_checked() -> None:
    model = _two_adapter_llama()
    tokens = token_batch(batch=2)
    with pytest.raises(ValueError, match="unknown adapters"):
        model(input_ids=tokens, adapter_names=["a", "c"])
    with pytest.raises(ValueError, match="one adapter name per sample"):
        model(input_ids=tokens, adapter_names=["a", "b", "a"])
    model.merge_adapter()
    with pytest.raises(ValueError, match="merged"):
        model(input_ids=tokens, adapter_names=["a", "b"])
    model.unmerge_adapter()
    model.train()
    with pytest.raises(RuntimeError, match="inference only"):
        model(input_ids=tokens, adapter_names=["a", "b"])


def test_generate_passes_through_with_mixed_adapters() -> None:
    model = _two_adapter_llama()
    tokens = token_batch(batch=2, length=4)
    options = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    mixed = model.generate(input_ids=tokens, adapter_names=["b", "a"], **options)
    assert mixed.shape == (2, 8)
    model.set_adapter("b")
    first = model.generate(input_ids=tokens[:1], **options)
    model.set_adapter("a")
    second = model.generate(input_ids=tokens[1:], **options)
    torch.testing.assert_close(mixed, torch.cat([first, second]))
    # with beams the batch grows inside generate; each sample's beams keep its adapter
    beams = model.generate(input_ids=tokens, adapter_names=["b", "a"], num_beams=2, **options)
    assert torch.equal(beams[1:], model.generate(input_ids=tokens[1:], num_beams=2, **options))


# ------------------------------------------------------------------------------------------------ training
def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    tokens = token_batch(batch=2, length=6)

    def gradients(checkpointing: bool) -> dict[str, torch.Tensor]:
        model = get_peft_model(
            tiny_llama(), OFTConfig(oft_block_size=8, target_modules=["q_proj", "down_proj"], init_weights=False)
        )
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        model.train()
        model(input_ids=tokens, labels=tokens).loss.backward()
        return {name: parameter.grad for name, parameter in model.named_parameters() if parameter.grad is not None}

    plain, checkpointed = gradients(False), gradients(True)
    assert plain.keys() == checkpointed.keys() and len(plain) == 4
    assert all(".oft_R." in name for name in plain)
    for name, gradient in plain.items():
        torch.testing.assert_close(checkpointed[name], gradient, rtol=1e-5, atol=1e-7)


def test_loaded_adapters_are_frozen_unless_trainable(tmp_path) -> None:
    get_peft_model(tiny_llama(), OFTConfig(oft_block_size=8, target_modules=["q_proj"])).save_pretrained(tmp_path)
    frozen = orthotune.PeftModel.from_pretrained(tiny_llama().train(), tmp_path)
    assert not frozen.training and not any(parameter.requires_grad for parameter in frozen.parameters())
    trainable = orthotune.PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    names = {name for name, parameter in trainable.named_parameters() if parameter.requires_grad}
    assert names == {f"base_model.model.model.layers.{i}.self_attn.q_proj.oft_R.default.weight" for i in (0, 1)}


def test_importing_orthotune_imports_neither_transformers_nor_peft() -> None:
    code = (
        "import sys, orthotune, orthotune.model, orthotune.checkpoint, orthotune.config\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'peft'))\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_wrapping_a_model_that_already_holds_adapters_warns_and_keeps_both() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8))
    config = OFTConfig(r=0, oft_block_size=4, target_modules=["0"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        first = get_peft_model(model, config)  # a fresh model: no warning
    with pytest.warns(UserWarning, match="already holds orthotune adapter layers"):
        second = orthotune.PeftModel(first.get_base_model(), config, adapter_name="other")
    assert set(second.get_base_model()[0].adapter_names) == {"default", "other"}
