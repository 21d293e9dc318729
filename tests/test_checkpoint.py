"""Adapter files: atomic saves, loads that fail cleanly (the model exactly as before), no unpickling, and the
conversion of old peft (≤ 0.15) OFT files checked against that OFT's formula written out densely."""

from __future__ import annotations

import json
import math
import os
import pickle
import warnings

import pytest
import safetensors.torch
import torch
from references import rel_err
from safetensors.torch import load_file, save_file
from tiny_models import tiny_bert, tiny_llama, token_batch

import orthotune
from orthotune import BOFTConfig, HRAConfig, OFTConfig, get_peft_model
from orthotune.checkpoint import AdapterFileError, adapted_module_names, read_adapter_files

PREFIX = "base_model.model.model.layers.0.self_attn."


def _logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=tokens).logits


def _saved(tmp_path, config=None, make_model=tiny_llama) -> str:
    config = config or OFTConfig(oft_block_size=8, target_modules=["q_proj", "v_proj"], init_weights=False)
    directory = str(tmp_path / "adapter")
    get_peft_model(make_model(), config).save_pretrained(directory)
    return directory


def _snapshot(model: torch.nn.Module) -> dict:
    return {
        "tensors": {key: value.clone() for key, value in model.state_dict().items()},
        "requires_grad": {name: parameter.requires_grad for name, parameter in model.named_parameters()},
        "modules": [(name, type(module)) for name, module in model.named_modules()],
        "training": [module.training for module in model.modules()],
    }


def _assert_unchanged(model: torch.nn.Module, snapshot: dict) -> None:
    now = _snapshot(model)
    assert now["modules"] == snapshot["modules"]
    assert now["requires_grad"] == snapshot["requires_grad"]
    assert now["training"] == snapshot["training"]
    assert now["tensors"].keys() == snapshot["tensors"].keys()
    for key, value in snapshot["tensors"].items():
        assert torch.equal(now["tensors"][key], value), key


# ------------------------------------------------------------------------------------------------ saving
def test_files_are_peft_s_and_name_free(tmp_path) -> None:
    model = get_peft_model(tiny_llama(), OFTConfig(oft_block_size=8, target_modules=["q_proj"]), adapter_name="mine")
    model.add_adapter("other", OFTConfig(oft_block_size=4, target_modules=["v_proj"]))
    model.save_pretrained(tmp_path)
    # peft's layout: adapters other than "default" go into subdirectories named after them, a card beside them
    assert sorted(os.listdir(tmp_path)) == ["README.md", "mine", "other"]
    keys = set(load_file(tmp_path / "mine" / "adapter_model.safetensors"))
    assert keys == {f"base_model.model.model.layers.{i}.self_attn.q_proj.oft_R.weight" for i in (0, 1)}
    config = json.loads((tmp_path / "mine" / "adapter_config.json").read_text())
    assert config["inference_mode"] is True and config["auto_mapping"]["base_model_class"] == "LlamaForCausalLM"
    assert config["peft_type"] == "OFT" and config["oft_block_size"] == 8 and config["r"] == 0

    again = orthotune.PeftModel.from_pretrained(tiny_llama(), tmp_path / "mine", adapter_name="mine")
    again.load_adapter(tmp_path / "other", adapter_name="other")
    assert set(again.peft_config) == {"mine", "other"}


def test_a_crash_while_saving_keeps_the_previous_files(tmp_path, monkeypatch) -> None:
    model = get_peft_model(tiny_llama(), OFTConfig(oft_block_size=8, target_modules=["q_proj"], init_weights=False))
    model.save_pretrained(tmp_path)
    before = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(1.0)

    def crash(tensors, path, metadata=None):
        with open(path, "wb") as handle:
            handle.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(tmp_path)
    assert {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)} == before  # no temp files left

    monkeypatch.undo()
    real_replace = os.replace
    calls = []

    def crash_on_config(source, target):
        calls.append(target)
        if str(target).endswith("adapter_config.json") and len(calls) > 1:
            raise KeyboardInterrupt
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", crash_on_config)
    model.peft_config["default"].module_dropout = 0.1
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_config.json").read_bytes() == before["adapter_config.json"]
    assert sorted(os.listdir(tmp_path)) == sorted(before)


def test_pickle_is_neither_written_nor_read(tmp_path, monkeypatch) -> None:
    directory = _saved(tmp_path)
    with pytest.raises(ValueError, match="safetensors only"):
        model = get_peft_model(tiny_llama(), OFTConfig(target_modules=["q_proj"]))
        model.save_pretrained(tmp_path, safe_serialization=False)

    def refuse(*args, **kwargs):
        raise AssertionError("unpickling during a load")

    for module, name in ((pickle, "load"), (pickle, "loads"), (torch, "load")):
        monkeypatch.setattr(module, name, refuse)
    orthotune.PeftModel.from_pretrained(tiny_llama(), directory)

    os.remove(os.path.join(directory, "adapter_model.safetensors"))
    with open(os.path.join(directory, "adapter_model.bin"), "wb") as handle:
        handle.write(b"pickled")
    with pytest.raises(FileNotFoundError, match="pickle"):
        orthotune.PeftModel.from_pretrained(tiny_llama(), directory)


# ------------------------------------------------------------------------------------------------ failed loads
def _damage_truncate(directory: str) -> None:
    path = os.path.join(directory, "adapter_model.safetensors")
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])


def _damage_tensors(change):
    def damage(directory: str) -> None:
        path = os.path.join(directory, "adapter_model.safetensors")
        tensors = load_file(path)
        change(tensors)
        save_file(tensors, path)

    return damage


def _damage_config(change):
    def damage(directory: str) -> None:
        path = os.path.join(directory, "adapter_config.json")
        config = json.loads(open(path).read())
        change(config)
        open(path, "w").write(json.dumps(config))

    return damage


DAMAGES = {
    "truncated": (_damage_truncate, "safetensors"),
    "missing-key": (_damage_tensors(lambda t: t.pop(f"{PREFIX}q_proj.oft_R.weight")), "missing keys"),
    "extra-key": (
        _damage_tensors(lambda t: t.update({f"{PREFIX}k_proj.oft_R.weight": torch.zeros(4, 28)})),
        "unexpected keys",
    ),
    "wrong-shape": (_damage_tensors(lambda t: t.update({f"{PREFIX}q_proj.oft_R.weight": torch.zeros(8, 6)})), "shape"),
    "nan": (_damage_tensors(lambda t: t[f"{PREFIX}q_proj.oft_R.weight"].fill_(float("nan"))), "NaN"),
    "integer": (
        _damage_tensors(lambda t: t.update({f"{PREFIX}q_proj.oft_R.weight": torch.zeros(4, 28).long()})),
        "dtype",
    ),
    "unknown-peft-type": (_damage_config(lambda c: c.update(peft_type="LORA")), "LORA"),
    "other-block-size": (_damage_config(lambda c: c.update(oft_block_size=4)), "shape"),
    "bad-value": (_damage_config(lambda c: c.update(module_dropout=2.0)), "module_dropout"),
    "bad-json": (lambda d: open(os.path.join(d, "adapter_config.json"), "w").write("{"), "JSON"),
    "no-config": (lambda d: os.remove(os.path.join(d, "adapter_config.json")), "adapter config"),
    "other-model": (_damage_config(lambda c: c.update(target_modules=["query"])), "matched no module"),
}


@pytest.mark.parametrize("damage", list(DAMAGES), ids=list(DAMAGES))
def test_a_failed_load_leaves_the_model_exactly_as_it_was(damage, tmp_path) -> None:
    directory = _saved(tmp_path)
    change, message = DAMAGES[damage]
    change(directory)
    # a model that already has adapters: loading one more must fail without a trace
    model = get_peft_model(
        tiny_llama(), OFTConfig(oft_block_size=8, target_modules=["q_proj", "o_proj"], init_weights=False)
    )
    before = _snapshot(model)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        model.load_adapter(directory, adapter_name="second")
    _assert_unchanged(model, before)
    assert list(model.peft_config) == ["default"]
    # a bare model given to from_pretrained: not even frozen
    bare = tiny_llama()
    before = _snapshot(bare)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        orthotune.PeftModel.from_pretrained(bare, directory)
    _assert_unchanged(bare, before)


def test_an_adapter_for_another_model_is_refused(tmp_path) -> None:
    directory = _saved(tmp_path, BOFTConfig(boft_block_size=4, target_modules=["query", "value"]), tiny_bert)
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    wider = BertForSequenceClassification(
        BertConfig(vocab_size=96, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    )
    before = _snapshot(wider)
    with pytest.raises(AdapterFileError, match="another model"):
        orthotune.PeftModel.from_pretrained(wider, directory)
    _assert_unchanged(wider, before)


@pytest.mark.parametrize(
    "config",
    [
        OFTConfig(oft_block_size=8, target_modules=["query", "value", "word_embeddings"], bias="oft_only"),
        BOFTConfig(boft_block_size=4, target_modules=["key", "dense"], task_type="SEQ_CLS"),
        HRAConfig(r=2, target_modules=["query", "dense"], bias="all", task_type="SEQ_CLS"),
    ],
    ids=["oft", "boft", "hra"],
)
def test_adapted_module_names_are_read_from_any_method_s_file(config, tmp_path) -> None:
    """The names come from the file alone (no model), and exclude saved heads, biases and embeddings."""
    model = get_peft_model(tiny_bert(), config)
    model.save_pretrained(tmp_path, save_embedding_layers=True)
    file = read_adapter_files(tmp_path)
    assert any(not key.startswith(tuple(f"base_model.model.{n}.{config.prefix}" for n, _ in model.adapter_layers()))
               for key in file.tensors)  # fmt: skip
    assert sorted(adapted_module_names(file)) == sorted(name for name, _ in model.adapter_layers())


def test_load_adapter_weights_overwrites_an_existing_adapter(tmp_path) -> None:
    trained = get_peft_model(
        tiny_llama(),
        OFTConfig(oft_block_size=8, target_modules=["q_proj"], init_weights=False, use_cayley_neumann=False),
    )
    trained.save_pretrained(tmp_path)
    fresh = get_peft_model(
        tiny_llama(), OFTConfig(oft_block_size=8, target_modules=["q_proj"], use_cayley_neumann=False)
    )
    fresh.load_adapter_weights(tmp_path)
    tokens = token_batch()
    torch.testing.assert_close(_logits(fresh.eval(), tokens), _logits(trained.eval(), tokens), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ old peft OFT
def _old_rotation(blocks: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """peft 0.14–0.15: M = diag((I - S)(I + S)^-1), S = (A - Aᵀ)/2, a shared block repeated (float64)."""
    blocks = blocks.double()
    skew = 0.5 * (blocks - blocks.transpose(-1, -2))
    eye = torch.eye(blocks.shape[-1], dtype=torch.float64)
    rotations = (eye - skew) @ torch.linalg.inv(eye + skew)
    if rotations.shape[0] == 1:
        rotations = rotations.expand(num_blocks, -1, -1)
    return torch.block_diag(*rotations)


def _write_old_file(directory, options: dict, layers: dict[str, tuple[torch.Tensor, torch.Tensor | None]]) -> None:
    os.makedirs(directory, exist_ok=True)
    config = {
        "peft_type": "OFT",
        "task_type": None,
        "base_model_name_or_path": None,
        "revision": None,
        "inference_mode": True,
        "r": 0,
        "oft_block_size": 8,
        "module_dropout": 0.0,
        "coft": False,
        "eps": 6e-5,
        "block_share": False,
        "target_modules": ["q_proj", "v_proj"],
        "fan_in_fan_out": False,
        "bias": "none",
        "init_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "modules_to_save": None,
        "exclude_modules": None,
        **options,
    }
    open(os.path.join(directory, "adapter_config.json"), "w").write(json.dumps(config))
    tensors = {}
    for name, (blocks, scale) in layers.items():
        tensors[f"base_model.model.{name}.oft_r"] = blocks
        if scale is not None:
            tensors[f"base_model.model.{name}.oft_s"] = scale
    save_file(tensors, os.path.join(directory, "adapter_model.safetensors"))


@pytest.mark.parametrize(
    "options",
    [{}, {"block_share": True}, {"coft": True, "eps": 2e-3}, {"r": 4, "oft_block_size": 0, "coft": True, "eps": 1e-2}],
    ids=["plain", "block-share", "coft", "r-coft"],
)
def test_old_peft_oft_files_convert_exactly(options, tmp_path) -> None:
    generator = torch.Generator().manual_seed(3)
    reference = tiny_llama()
    layers = {}
    for index in (0, 1):
        for projection in ("q_proj", "v_proj"):
            name = f"model.layers.{index}.self_attn.{projection}"
            linear = reference.get_submodule(name)
            stored = 1 if options.get("block_share") else 4
            blocks = 0.1 * torch.randn(stored, 8, 8, generator=generator)
            scale = 1 + 0.1 * torch.randn(linear.out_features, 1, generator=generator)
            scale = None if projection == "v_proj" else scale  # oft_s is optional
            layers[name] = (blocks, scale)
            # the old forward, written out: project (COFT), rotate W's inputs, scale its outputs
            if options.get("coft"):
                radius = options["eps"] * math.ceil(linear.out_features / 4) ** 2 / math.sqrt(stored)
                norms = torch.linalg.matrix_norm(blocks, keepdim=True)
                blocks = torch.where(norms <= radius, blocks, blocks * radius / norms)
            weight = linear.weight.double() @ _old_rotation(blocks, 4).T
            if scale is not None:
                weight = weight * scale.double()
            with torch.no_grad():
                linear.weight.copy_(weight)
    _write_old_file(tmp_path, options, layers)

    model = orthotune.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert isinstance(model.peft_config["default"], BOFTConfig)  # one-factor BOFT is that OFT exactly
    tokens = token_batch()
    expected = _logits(reference, tokens)
    assert rel_err(expected, _logits(tiny_llama(), tokens)) > 1e-3
    assert rel_err(_logits(model, tokens), expected) < 1e-5


def test_oft_files_older_than_peft_0_14_are_refused(tmp_path) -> None:
    _write_old_file(tmp_path, {}, {"model.layers.0.self_attn.q_proj": (torch.zeros(4, 8, 8), None)})
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    del config["oft_block_size"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    model = tiny_llama()
    with pytest.raises(AdapterFileError, match="peft ≤ 0.13"):
        orthotune.PeftModel.from_pretrained(model, tmp_path)
    assert not any("base_layer" in name for name, _ in model.named_modules())


def test_peft_2_term_neumann_files_are_refused(tmp_path) -> None:
    directory = _saved(tmp_path)
    _damage_config(lambda c: c.update(num_cayley_neumann_terms=2))(directory)
    with pytest.raises(AdapterFileError, match="I \\+ 2Q"):
        orthotune.PeftModel.from_pretrained(tiny_llama(), directory)


def test_neumann_files_from_peft_before_0_18_warn(tmp_path) -> None:
    """peft < 0.18 doubled every term of its series; peft itself warns and applies the new one, as we do."""
    directory = _saved(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        orthotune.PeftModel.from_pretrained(tiny_llama(), directory)  # our own file: no warning
    _damage_config(lambda c: c.pop("peft_version"))(directory)
    with pytest.warns(UserWarning, match="peft < 0.18"):
        orthotune.PeftModel.from_pretrained(tiny_llama(), directory)


def test_saved_files_get_the_permissions_of_any_new_file(tmp_path) -> None:
    # The atomic writer goes through mkstemp, whose files are private (0600) unless widened.
    model = get_peft_model(tiny_llama(), OFTConfig(r=4, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path)
    umask = os.umask(0)
    os.umask(umask)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask
