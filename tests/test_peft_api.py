"""peft's model API beyond the spec's examples, called the same way on peft 0.21.2 and on orthotune.

Each test runs one call on both libraries, on tiny transformers models holding the same adapter weights (an
orthotune adapter with random weights, saved once and loaded by both), and compares what comes back: types,
keys, values, which parameters train, outputs. peft's answer is the truth, except where docs/migration.md says
orthotune keeps its own behaviour (each such place is asserted here, with peft's behaviour beside it).
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
import warnings

import pytest
import torch
from references import rel_err
from tiny_models import tiny_bert, tiny_llama, token_batch

import orthotune

peft = pytest.importorskip("peft")
LIBRARIES = {"peft": peft, "orthotune": orthotune}


@pytest.fixture(autouse=True)
def _quiet() -> None:
    warnings.filterwarnings("ignore", message=".*(embedding layers|base_model_name_or_path|Already unmerged).*")


def _key(name: str) -> str:
    # peft names an embedding's rotation oft_embedding_R in memory, orthotune oft_R (in files both write peft's)
    return name.replace(".oft_embedding_R.", ".oft_R.")


def _trainable(model: torch.nn.Module) -> set[str]:
    return {_key(name) for name, parameter in model.named_parameters() if parameter.requires_grad}


def _meta(model: torch.nn.Module) -> set[str]:
    return {_key(name) for name, parameter in model.named_parameters() if parameter.is_meta}


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(token_batch()).logits


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory) -> str:
    """An exact-Cayley OFT adapter on q_proj and the input embedding (so peft's file convention and embeddings
    both matter), with random weights."""
    directory = tmp_path_factory.mktemp("adapter")
    config = orthotune.OFTConfig(
        oft_block_size=8, target_modules=["q_proj", "embed_tokens"], init_weights=False, use_cayley_neumann=False
    )
    orthotune.get_peft_model(tiny_llama(), config).save_pretrained(directory)
    return str(directory)


def _config(lib, **options):
    return lib.OFTConfig(oft_block_size=8, **options)


# ---------------------------------------------------------------------------------------------- adapters
def test_load_adapter_returns_peft_s_load_result_and_trainability(adapter_dir) -> None:
    results, trainable, logits = {}, {}, {}
    for name, lib in LIBRARIES.items():
        model = lib.get_peft_model(tiny_llama(), _config(lib, target_modules=["v_proj"], init_weights=False))
        model.add_adapter("extra", _config(lib, target_modules=["k_proj"]))
        before_load = _trainable(model)
        results[name] = model.load_adapter(adapter_dir, "other", is_trainable=True)
        trainable[name] = (before_load, _trainable(model))
        model.set_adapter("other")
        logits[name] = _logits(model)
    assert type(results["orthotune"]) is type(results["peft"])
    assert results["orthotune"].missing_keys == results["peft"].missing_keys == []
    assert results["orthotune"].unexpected_keys == results["peft"].unexpected_keys == []
    # adding keeps what trained; loading a non-active adapter with is_trainable=True makes it train too
    assert trainable["orthotune"] == trainable["peft"]
    assert any(".other." in name for name in trainable["peft"][1]) and any(
        ".default." in n for n in trainable["peft"][1]
    )
    assert rel_err(logits["orthotune"], logits["peft"]) <= 1e-5


def test_set_requires_grad_matches_peft(adapter_dir) -> None:
    trainable = {}
    for name, lib in LIBRARIES.items():
        model = lib.PeftModel.from_pretrained(tiny_llama(), adapter_dir)
        model.add_adapter("b", _config(lib, target_modules=["k_proj"]))
        steps = [_trainable(model)]
        model.set_requires_grad("b")
        steps.append(_trainable(model))
        model.set_requires_grad(["default", "b"], requires_grad=True)
        steps.append(_trainable(model))
        model.base_model.set_requires_grad("default", False)
        steps.append(_trainable(model))
        trainable[name] = steps
    assert trainable["orthotune"] == trainable["peft"]
    assert [len(step) for step in trainable["peft"]] == [0, 2, 5, 2]


def test_load_adapter_into_an_existing_name_fills_it_and_low_cpu_mem_usage_makes_meta_adapters(adapter_dir) -> None:
    meta, logits = {}, {}
    for name, lib in LIBRARIES.items():
        model = lib.get_peft_model(tiny_llama(), _config(lib, target_modules=["v_proj"]))
        config = _config(lib, target_modules=["q_proj", "embed_tokens"], use_cayley_neumann=False)
        model.add_adapter("other", config, low_cpu_mem_usage=True, autocast_adapter_dtype=True)
        meta[name] = _meta(model)
        result = model.load_adapter(adapter_dir, "other", low_cpu_mem_usage=True)
        assert not any(parameter.is_meta for parameter in model.parameters())
        assert result.unexpected_keys == []
        model.set_adapter("other")
        logits[name] = _logits(model)
    assert meta["orthotune"] == meta["peft"] and len(meta["peft"]) == 3
    assert rel_err(logits["orthotune"], logits["peft"]) <= 1e-5
    direct = orthotune.PeftModel.from_pretrained(tiny_llama(), adapter_dir, low_cpu_mem_usage=True)
    assert rel_err(_logits(direct), logits["peft"]) <= 1e-5


def test_a_meta_adapter_refuses_to_compute_until_loaded() -> None:
    model = orthotune.get_peft_model(
        tiny_llama(), _config(orthotune, target_modules=["q_proj"]), low_cpu_mem_usage=True
    )
    assert all(parameter.is_meta for name, parameter in model.named_parameters() if ".oft_R." in name)
    with pytest.raises(RuntimeError, match="meta device.*low_cpu_mem_usage=True.*load"):
        model(token_batch())
    with pytest.raises(RuntimeError, match="meta device"):
        model.merge_adapter()
    with model.disable_adapter():  # the base model needs no adapter weights
        torch.testing.assert_close(_logits(model), _logits(tiny_llama()))


def test_disable_adapter_layers_and_the_context_restore_the_previous_state(adapter_dir) -> None:
    states = {}
    for name, lib in LIBRARIES.items():
        model = lib.PeftModel.from_pretrained(tiny_llama(), adapter_dir)
        adapted, base = _logits(model), _logits(tiny_llama())
        model.disable_adapter_layers()
        off = _logits(model)
        with model.disable_adapter():
            inside = _logits(model)
        after = _logits(model)  # peft: layers that were off before the block stay off after it
        model.enable_adapter_layers()
        on = _logits(model)
        layers = [m for m in model.modules() if hasattr(m, "disable_adapters") and hasattr(m, "merged_adapters")]
        states[name] = [layer.disable_adapters for layer in layers]
        for value in (off, inside, after):
            assert rel_err(value, base) <= 1e-6
        assert rel_err(on, adapted) <= 1e-6
        with model.disable_adapter():
            pass
        # orthotune keeps a frozen (loaded for inference) adapter frozen; peft makes it train (docs/migration.md)
        assert bool(_trainable(model)) == (lib is peft)
    assert states["orthotune"] == states["peft"] == [False] * 3


def test_base_model_is_peft_s_tuner(adapter_dir) -> None:
    seen = {}
    for name, lib in LIBRARIES.items():
        model = lib.PeftModel.from_pretrained(tiny_llama(), adapter_dir, adapter_name="a")
        model.load_adapter(adapter_dir, "b")
        tuner = model.base_model
        assert tuner.peft_config is model.peft_config
        tuner.set_adapter("b")
        tuner.merge_adapter()
        merged_logits = _logits(model)
        tuner.unmerge_adapter()
        tuner.delete_adapter("a")
        seen[name] = (
            model.prefix,
            tuner.prefix,
            list(tuner.peft_config),
            model.active_adapters,
            tuner.active_adapters,
            sorted(tuner.targeted_module_names),
            sorted(map(_key, model.state_dict())) == sorted(map(_key, tuner.state_dict(prefix="base_model."))),
        )
        plain = tuner.merge_and_unload()
        assert rel_err(_logits(plain), merged_logits) <= 1e-5
    assert seen["orthotune"] == seen["peft"]
    assert seen["peft"][:5] == ("oft_", "oft_", ["b"], ["b"], ["b"])
    boft = orthotune.get_peft_model(tiny_llama(), orthotune.BOFTConfig(boft_block_size=4, target_modules=["q_proj"]))
    their_boft = peft.get_peft_model(tiny_llama(), peft.BOFTConfig(boft_block_size=4, target_modules=["q_proj"]))
    assert boft.prefix == boft.base_model.prefix == their_boft.prefix == "boft_"


def test_layers_skip_active_names_they_do_not_hold(adapter_dir, tmp_path) -> None:
    config = orthotune.OFTConfig(oft_block_size=8, target_modules=["v_proj"], init_weights=False)
    orthotune.get_peft_model(tiny_llama(), config).save_pretrained(tmp_path)
    logits = {}
    for name, lib in LIBRARIES.items():
        model = lib.PeftModel.from_pretrained(tiny_llama(), adapter_dir, adapter_name="a")
        model.load_adapter(str(tmp_path), "v")
        only_a = _logits(model)
        model.base_model.set_adapter(["a", "v"])  # each adapter's layers hold only one of the two names
        assert model.base_model.model.model.layers[0].self_attn.q_proj.active_adapters == ["a", "v"]
        both = _logits(model)
        model.base_model.model.model.layers[0].self_attn.v_proj.set_adapter(["zzz", "a"])  # holds neither
        logits[name] = (only_a, both, _logits(model))
        assert rel_err(both, only_a) > 1e-4
    for ours, theirs in zip(logits["orthotune"], logits["peft"], strict=True):
        assert rel_err(ours, theirs) <= 1e-5


# ---------------------------------------------------------------------------------------------- refusals
def test_second_adapter_with_bias_is_refused_as_in_peft() -> None:
    for lib in LIBRARIES.values():
        model = lib.get_peft_model(tiny_llama(), _config(lib, target_modules=["q_proj"], bias="all"))
        with pytest.raises(ValueError, match="supports only 1 adapter with bias"):
            model.add_adapter("b", _config(lib, target_modules=["k_proj"], bias="oft_only"))
        assert list(model.peft_config) == ["default"]
        model.add_adapter("c", _config(lib, target_modules=["k_proj"]))  # bias="none" is fine


def test_two_active_adapters_sharing_modules_to_save_are_refused_as_in_peft() -> None:
    for lib in LIBRARIES.values():
        model = lib.get_peft_model(tiny_bert(), _config(lib, target_modules=["query"], task_type="SEQ_CLS"))
        model.add_adapter("z", _config(lib, target_modules=["value"], task_type="SEQ_CLS"))
        with pytest.raises(ValueError, match="Only one adapter can be set at a time for"):
            model.base_model.set_adapter(["default", "z"])
    model.base_model.set_adapter(["z"])
    assert model.active_adapters == ["z"]


# ---------------------------------------------------------------------------------------- free functions
def test_state_dict_functions_match_peft(adapter_dir) -> None:
    got = {}
    for name, lib in LIBRARIES.items():
        model = lib.PeftModel.from_pretrained(tiny_llama(), adapter_dir)
        state = lib.get_peft_model_state_dict(model, adapter_name="default", unwrap_compiled=True)
        from_dict = lib.get_peft_model_state_dict(model, state_dict=model.state_dict())
        model.add_adapter("other", _config(lib, target_modules=["q_proj", "embed_tokens"], use_cayley_neumann=False))
        result = lib.set_peft_model_state_dict(model, state, adapter_name="other")
        model.set_adapter("other")
        extra = {**state, "base_model.model.zzz.oft_R.weight": torch.zeros(2)}
        result_extra = lib.set_peft_model_state_dict(model, extra, adapter_name="other")
        got[name] = (state, from_dict, result, result_extra, _logits(model))
    theirs, ours = got["peft"], got["orthotune"]
    assert sorted(ours[0]) == sorted(theirs[0]) and len(theirs[0]) == 4  # no adapter name, the embedding included
    for key, value in theirs[0].items():
        torch.testing.assert_close(ours[0][key], value, rtol=0, atol=0)  # exact mode: peft's sign, as in files
        torch.testing.assert_close(ours[1][key], value, rtol=0, atol=0)
    assert type(ours[2]) is type(theirs[2])
    assert sorted(map(_key, ours[2].missing_keys)) == sorted(map(_key, theirs[2].missing_keys))
    assert ours[2].unexpected_keys == []
    assert ours[3].unexpected_keys == theirs[3].unexpected_keys == ["base_model.model.zzz.oft_R.weight"]
    assert rel_err(ours[4], theirs[4]) <= 1e-5


def test_inject_adapter_in_model_matches_peft(adapter_dir) -> None:
    got = {}
    for name, lib in LIBRARIES.items():
        state = lib.get_peft_model_state_dict(lib.PeftModel.from_pretrained(tiny_llama(), adapter_dir))
        state = {key.removeprefix("base_model.model."): value for key, value in state.items()}
        config = _config(lib, target_modules=["q_proj", "embed_tokens"], use_cayley_neumann=False)
        model = tiny_llama()
        injected = lib.inject_adapter_in_model(config, model, low_cpu_mem_usage=True)
        assert injected is model and list(model.peft_config) == ["default"]
        meta = _meta(model)
        result = lib.set_peft_model_state_dict(model, state, low_cpu_mem_usage=True)
        again = lib.get_peft_model_state_dict(model)
        logits = _logits(model)
        lib.inject_adapter_in_model(_config(lib, target_modules=["v_proj"]), model, adapter_name="x")
        second = (list(model.peft_config), _trainable(model), model.model.layers[0].self_attn.q_proj.active_adapters)
        by_keys = tiny_llama()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            lib.inject_adapter_in_model(_config(lib, target_modules=["v_proj"]), by_keys, state_dict=state)
        adapted = sorted(n for n, m in by_keys.named_modules() if hasattr(m, "base_layer"))
        warned = any("inconsistency" in str(warning.message) for warning in caught)
        got[name] = (meta, result, again, logits, second, adapted, warned, _trainable(by_keys))
    theirs, ours = got["peft"], got["orthotune"]
    assert ours[0] == theirs[0] and len(theirs[0]) == 3
    assert sorted(map(_key, ours[1].missing_keys)) == sorted(map(_key, theirs[1].missing_keys))
    assert ours[1].unexpected_keys == []
    assert sorted(ours[2]) == sorted(theirs[2]) == sorted(state)
    assert rel_err(ours[3], theirs[3]) <= 1e-5
    assert ours[4] == theirs[4]  # the second injection is the active one; what trained before still trains
    assert (
        ours[5]
        == theirs[5]
        == ["model.embed_tokens", "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    )
    assert ours[6] and theirs[6] and ours[7] == theirs[7]


def test_top_level_exports() -> None:
    for name in ("get_peft_model_state_dict", "set_peft_model_state_dict", "inject_adapter_in_model", "PeftType"):
        assert name in orthotune.__all__ and getattr(orthotune, name) is not None
    assert orthotune.PeftType.OFT == peft.PeftType.OFT == "OFT" and orthotune.PeftType("BOFT").value == "BOFT"


# ------------------------------------------------------------------------------------------------ configs
def test_configs_are_peft_s(tmp_path) -> None:
    ours, theirs = orthotune.OFTConfig(target_modules=["q", "v"]), peft.OFTConfig(target_modules=["q", "v"])
    assert ours.peft_type.value == theirs.peft_type.value == "OFT" and ours.peft_type == "OFT"
    assert ours.target_modules == theirs.target_modules == {"q", "v"}
    assert ours.peft_version == theirs.peft_version == "0.21.2"
    ours.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "OFT"
    assert json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"] == ["q", "v"]
    path = str(tmp_path / "adapter_config.json")
    assert orthotune.OFTConfig.from_json_file(path) == peft.OFTConfig.from_json_file(path)

    (tmp_path / "adapter_config.json").write_text(json.dumps({"boft_block_size": 8, "target_modules": ["q"]}))
    read = {name: lib.BOFTConfig.from_pretrained(str(tmp_path)) for name, lib in LIBRARIES.items()}
    assert read["orthotune"].boft_block_size == read["peft"].boft_block_size == 8
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 4, "target_modules": ["q"]}))
    for lib in LIBRARIES.values():
        with pytest.raises(TypeError, match=r"BOFTConfig config that is trying to be loaded is missing required keys"):
            lib.BOFTConfig.from_pretrained(str(tmp_path))


def test_the_config_passed_is_the_model_s_config(adapter_dir) -> None:
    resolved = {}
    for name, lib in LIBRARIES.items():
        config = _config(lib, target_modules=["q_proj", "embed_tokens"], use_cayley_neumann=False)
        model = lib.PeftModel.from_pretrained(tiny_llama(), adapter_dir, config=config, is_trainable=True)
        assert model.peft_config["default"] is config and config.inference_mode is False
        assert _trainable(model)
        config = _config(lib, target_modules="all-linear", task_type="SEQ_CLS")
        model = lib.get_peft_model(tiny_bert(), config, revision="v1")
        assert model.peft_config["default"] is config and config.revision == "v1"
        resolved[name] = (config.target_modules, config.modules_to_save)  # resolved in place
    assert resolved["orthotune"][0] == resolved["peft"][0] and "bert.pooler.dense" in resolved["peft"][0]
    assert set(resolved["orthotune"][1]) == set(resolved["peft"][1]) == {"classifier", "score"}


def test_mismatched_shapes_in_a_state_dict(adapter_dir) -> None:
    results = {}
    for name, lib in LIBRARIES.items():
        model = lib.PeftModel.from_pretrained(tiny_llama(), adapter_dir)
        state = lib.get_peft_model_state_dict(model)
        key = "base_model.model.model.layers.0.self_attn.q_proj.oft_R.weight"
        wrong = {**{k: torch.zeros_like(v) for k, v in state.items()}, key: torch.zeros(3, 3)}
        with pytest.raises(RuntimeError, match="size mismatch|do not fit"):
            lib.set_peft_model_state_dict(model, wrong)
        if lib is orthotune:  # nothing was loaded; peft (torch's load_state_dict) copied the fitting tensors first
            assert all(torch.equal(state[k], v) for k, v in lib.get_peft_model_state_dict(model).items())
        with pytest.warns(UserWarning, match="shape"):
            results[name] = lib.set_peft_model_state_dict(model, wrong, ignore_mismatched_sizes=True)
        after = lib.get_peft_model_state_dict(model)
        assert (
            torch.equal(after[key], state[key])
            and not after["base_model.model.model.embed_tokens.oft_embedding_R.weight"].any()
        )
    assert sorted(map(_key, results["orthotune"].missing_keys)) == sorted(map(_key, results["peft"].missing_keys))


# ------------------------------------------------------------------------------------- model card and hub
def _named_llama():
    model = tiny_llama()
    model.config._name_or_path = model.name_or_path = "org/tiny-llama"
    return model


def test_model_card_carries_peft_s_metadata_and_keeps_a_user_card(tmp_path) -> None:
    from huggingface_hub import ModelCard

    cards = {}
    for name, lib in LIBRARIES.items():
        model = lib.get_peft_model(_named_llama(), _config(lib, target_modules=["q_proj"], task_type="CAUSAL_LM"))
        model.save_pretrained(tmp_path / name, save_embedding_layers=False)  # "auto" makes peft ask the Hub
        cards[name] = ModelCard.load(tmp_path / name / "README.md")
    ours, theirs = cards["orthotune"], cards["peft"]
    for key in ("library_name", "base_model", "pipeline_tag"):
        assert ours.data.get(key) == theirs.data.get(key) is not None, key
    assert set(theirs.data.tags) <= set(ours.data.tags)
    assert "- PEFT 0.21.2" in theirs.text.splitlines() and "- PEFT 0.21.2" in ours.text.splitlines()

    user = tmp_path / "user"
    user.mkdir()
    (user / "README.md").write_text("---\nlicense: mit\ntags:\n- mine\n---\n\n# My adapter\n\nIt is good.\n")
    model = orthotune.get_peft_model(_named_llama(), _config(orthotune, target_modules=["q_proj"]))
    model.save_pretrained(user)
    first = (user / "README.md").read_text()
    model.save_pretrained(user)
    assert (user / "README.md").read_text() == first  # a second save adds nothing
    card = ModelCard.load(user / "README.md")
    assert card.data.license == "mit" and "mine" in card.data.tags and card.data.library_name == "peft"
    assert "# My adapter\n\nIt is good." in card.text and card.text.count("- PEFT 0.21.2") == 1


def test_push_to_hub_uploads_the_saved_adapter(tmp_path, monkeypatch) -> None:
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError

    calls = {}

    class Repo:
        repo_id = "me/adapter"

    def download(self, repo_id, filename, **kwargs):
        if "remote_card" not in calls:
            raise EntryNotFoundError("no README")
        return calls["remote_card"]

    def upload(self, *, repo_id, folder_path, **kwargs):
        calls["upload"] = (repo_id, kwargs)
        calls["files"] = {name: (pathlib.Path(folder_path) / name).read_bytes() for name in os.listdir(folder_path)}
        return "commit"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, repo_id, **kwargs: Repo())
    monkeypatch.setattr(huggingface_hub.HfApi, "hf_hub_download", download)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload)
    model = orthotune.get_peft_model(_named_llama(), _config(orthotune, target_modules=["q_proj"], init_weights=False))
    assert model.push_to_hub("adapter", private=True, tags=["extra-tag"], commit_message="first") == "commit"
    model.save_pretrained(tmp_path / "local")
    assert calls["upload"][0] == "me/adapter" and calls["upload"][1]["commit_message"] == "first"
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert calls["files"][name] == (tmp_path / "local" / name).read_bytes()
    assert b"extra-tag" in calls["files"]["README.md"]

    remote = tmp_path / "remote_README.md"
    remote.write_text("---\nlicense: mit\n---\n\n# Kept\n")
    calls["remote_card"] = str(remote)
    model.push_to_hub("adapter")
    assert b"# Kept" in calls["files"]["README.md"] and b"- PEFT 0.21.2" in calls["files"]["README.md"]


def test_push_to_hub_fails_clearly_without_hub_or_network(monkeypatch) -> None:
    import huggingface_hub

    model = orthotune.get_peft_model(tiny_llama(), _config(orthotune, target_modules=["q_proj"]))

    def offline(self, repo_id, **kwargs):
        raise ConnectionError("network unreachable")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", offline)
    with pytest.raises(RuntimeError, match="could not create or reach the Hub repository 'me/x'.*network"):
        model.push_to_hub("me/x")
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(ImportError, match="pip install huggingface_hub"):
        model.push_to_hub("me/x")


def test_model_card_without_huggingface_hub_updates_only_the_text(tmp_path, monkeypatch) -> None:
    front = "---\nlicense: mit\ntags:\n- mine\n---\n"
    (tmp_path / "README.md").write_text(front + "\n# My adapter\n")
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    orthotune.get_peft_model(_named_llama(), _config(orthotune, target_modules=["q_proj"])).save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    assert card.startswith(front + "\n# My adapter\n") and "### Framework versions\n\n- PEFT 0.21.2\n" in card
