"""OFTConfig / BOFTConfig: peft 0.21.2's fields and defaults, early and named validation, and the JSON file."""

from __future__ import annotations

import dataclasses
import json

import pytest

from orthotune import BOFTConfig, OFTConfig
from orthotune.config import AdapterConfig

peft = pytest.importorskip("peft")

SHARED_FIELDS = (
    "target_modules",
    "exclude_modules",
    "layers_to_transform",
    "layers_pattern",
    "modules_to_save",
    "bias",
    "init_weights",
    "fan_in_fan_out",
    "task_type",
    "inference_mode",
    "base_model_name_or_path",
    "revision",
)


def _peft_fields(config_class: type) -> dict:
    fields = dataclasses.fields(config_class)
    return {item.name: item.default for item in fields if item.default is not dataclasses.MISSING}


@pytest.mark.parametrize(
    ("ours", "theirs", "own_fields"),
    [
        (
            OFTConfig,
            "OFTConfig",
            ("r", "module_dropout", "coft", "eps", "block_share", "use_cayley_neumann", "num_cayley_neumann_terms"),
        ),
        (BOFTConfig, "BOFTConfig", ("boft_block_size", "boft_block_num", "boft_n_butterfly_factor", "boft_dropout")),
    ],
)
def test_defaults_are_peft_defaults(ours, theirs, own_fields) -> None:
    peft_defaults = _peft_fields(getattr(peft, theirs))
    ours_defaults = ours()
    for name in SHARED_FIELDS + own_fields:
        assert getattr(ours_defaults, name) == peft_defaults[name], name


def test_every_field_peft_writes_is_a_field_here(tmp_path) -> None:
    for ours, theirs in ((OFTConfig(), peft.OFTConfig()), (BOFTConfig(), peft.BOFTConfig())):
        theirs.save_pretrained(tmp_path)
        written = json.loads((tmp_path / "adapter_config.json").read_text())
        assert set(written) == set(ours.to_dict()), type(ours).__name__


def test_block_size_defaults_to_32_only_without_r() -> None:
    assert OFTConfig().oft_block_size == 32 and OFTConfig().r == 0
    config = OFTConfig(r=8, target_modules=["q_proj"])  # no need to clear oft_block_size, unlike peft
    assert (config.r, config.oft_block_size) == (8, 0)
    assert config.to_dict()["oft_block_size"] == 0  # concrete integers on disk, like peft
    assert OFTConfig(oft_block_size=16).r == 0


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: OFTConfig(r=8, oft_block_size=16), "oft_block_size=16"),
        (lambda: OFTConfig(r=0, oft_block_size=0), "oft_block_size=0"),
        (lambda: OFTConfig(r=-1), "r=-1"),
        (lambda: OFTConfig(r=2.5), "r=2.5"),
        (lambda: OFTConfig(module_dropout=1.0), "module_dropout=1.0"),
        (lambda: OFTConfig(eps=0.0), "eps=0.0"),
        (lambda: OFTConfig(num_cayley_neumann_terms=3), "num_cayley_neumann_terms=3"),
        (lambda: OFTConfig(coft="yes"), "coft='yes'"),
        (lambda: OFTConfig(bias="boft_only"), "bias='boft_only'"),
        (lambda: OFTConfig(task_type="CAUSAL"), "task_type='CAUSAL'"),
        (lambda: OFTConfig(layers_pattern="layers"), "layers_pattern='layers'"),
        (lambda: OFTConfig(target_modules=[1, 2]), "target_modules=[1, 2]"),
        (lambda: OFTConfig(init_weights="gaussian"), "init_weights='gaussian'"),
        (lambda: BOFTConfig(boft_block_size=0), "boft_block_size=0"),
        (lambda: BOFTConfig(boft_block_size=4, boft_block_num=8), "boft_block_num=8"),
        (lambda: BOFTConfig(boft_n_butterfly_factor=0), "boft_n_butterfly_factor=0"),
        (lambda: BOFTConfig(boft_dropout=-0.1), "boft_dropout=-0.1"),
        (lambda: BOFTConfig(bias="oft_only"), "bias='oft_only'"),
    ],
)
def test_invalid_values_are_refused_naming_the_field(make, field) -> None:
    with pytest.raises(ValueError, match=field.replace("[", r"\[").replace("]", r"\]")):
        make()


def test_neumann_term_limit_applies_only_to_the_series() -> None:
    assert OFTConfig(use_cayley_neumann=False, num_cayley_neumann_terms=2).num_cayley_neumann_terms == 2


def test_regex_with_layers_to_transform_warns_that_peft_ignores_it() -> None:
    with pytest.warns(UserWarning, match="layers_to_transform"):
        OFTConfig(target_modules=r".*q_proj", layers_to_transform=[0])


def test_target_lists_become_sets_as_in_peft() -> None:
    assert OFTConfig(target_modules=["v", "q", "v"]).target_modules == {"v", "q"}
    assert OFTConfig(exclude_modules=("v",)).exclude_modules == {"v"}
    assert OFTConfig(modules_to_save=["b", "a", "b"]).modules_to_save == ["b", "a"]  # peft keeps this one a list


@pytest.mark.parametrize(
    "config",
    [
        OFTConfig(
            r=4,
            target_modules=["q_proj", "v_proj"],
            coft=True,
            eps=1e-3,
            block_share=True,
            use_cayley_neumann=False,
            layers_to_transform=[0, 1],
            layers_pattern="layers",
            task_type="CAUSAL_LM",
        ),
        BOFTConfig(
            boft_block_num=8,
            boft_block_size=0,
            boft_n_butterfly_factor=2,
            target_modules=".*query",
            modules_to_save=["classifier"],
            bias="boft_only",
            boft_dropout=0.1,
        ),
    ],
)
def test_json_round_trip_here_and_through_peft(config, tmp_path) -> None:
    config.save_pretrained(tmp_path)
    again = AdapterConfig.from_pretrained(tmp_path)
    assert again == config and type(again) is type(config)
    # peft reads the file into the same values, and what peft writes back reads into the same config
    theirs = peft.PeftConfig.from_pretrained(str(tmp_path))
    assert theirs.peft_type == config.peft_type
    for name, value in config.to_dict().items():
        if name in ("peft_version", "peft_type"):
            continue
        their_value = getattr(theirs, name)
        their_value = sorted(their_value) if isinstance(their_value, set) else their_value
        assert their_value == (sorted(value) if isinstance(value, list) and name == "target_modules" else value), name
    theirs.save_pretrained(tmp_path / "back")
    back = AdapterConfig.from_pretrained(tmp_path / "back")
    assert back.to_dict() | {"target_modules": None} == config.to_dict() | {"target_modules": None}


def test_unknown_keys_are_kept_and_written_back() -> None:
    data = OFTConfig(r=4).to_dict() | {"some_future_option": [1, 2]}
    with pytest.warns(UserWarning, match="some_future_option"):
        config = AdapterConfig.from_dict(data)
    assert config.to_dict()["some_future_option"] == [1, 2]


@pytest.mark.parametrize("peft_type", ["LORA", None])
def test_other_peft_types_are_refused_by_name(peft_type) -> None:
    data = {"peft_type": peft_type, "r": 8} if peft_type else {"r": 8}
    with pytest.raises(ValueError, match="peft_type"):
        AdapterConfig.from_dict(data)
    with pytest.raises(ValueError, match="BOFT"):
        OFTConfig.from_dict(BOFTConfig().to_dict())


def test_damaged_json_is_reported(tmp_path) -> None:
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "OFT", ')
    with pytest.raises(ValueError, match="not valid JSON"):
        AdapterConfig.from_pretrained(tmp_path)
