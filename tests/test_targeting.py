"""Which modules a config adapts (:mod:`orthotune.targeting`) against peft 0.21.2's own matching.

Two truths from peft: its name test ``peft.tuners.tuners_utils.check_target_module_exists`` asked about every
module name of a tiny model (property tests over target lists, suffixes, ``exclude_modules``,
``modules_to_save``, ``layers_to_transform`` and ``layers_pattern``), and the modules that ``peft.get_peft_model``
actually adapts and wraps for the same options (regexes, ``"all-linear"``, the defaults for a model type, task
heads). The command line's targeted layers must be the library's, which must be the layers it adapts.

peft's OFT layer refuses transformers' ``Conv1D``, so on GPT-2 peft's LoRA stands in for it: target matching
is peft's ``BaseTuner`` code, the same for every method.
"""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft.tuners.tuners_utils import BaseTunerLayer, check_target_module_exists
from peft.utils.constants import (
    TRANSFORMERS_MODELS_TO_BOFT_TARGET_MODULES_MAPPING,
    TRANSFORMERS_MODELS_TO_OFT_TARGET_MODULES_MAPPING,
)
from tiny_models import tiny_bert, tiny_gpt2, tiny_llama

import orthotune
from orthotune import AdapterLayer
from orthotune.cli.finetune import _targeted_layers
from orthotune.modules_to_save import ModulesToSaveWrapper
from orthotune.targeting import DEFAULT_TARGET_MODULES, is_target_module, target_module_names

MODELS = {"llama": tiny_llama, "bert": tiny_bert, "gpt2": tiny_gpt2}


def ours_config(**options) -> orthotune.OFTConfig:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return orthotune.OFTConfig(oft_block_size=4, **options)


def peft_config(method: str = "OFT", **options):
    if method == "LORA":
        return peft.LoraConfig(r=2, **options)
    return peft.OFTConfig(r=0, oft_block_size=4, **options)


# ------------------------------------------------------------------------------ name by name, peft's test
LLAMA_NAMES = [name for name, _ in tiny_llama().named_modules() if name]
SUFFIXES = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj", "self_attn.q_proj", "mlp.up_proj", "mlp", "lm_head"]
FULL_NAMES = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "model.embed_tokens"]
EXCLUDE_REGEXES = [r".*\.layers\.1\..*", r".*(k|v)_proj", r"model\.layers\.0\.self_attn\.q_proj"]


@st.composite
def list_configs(draw: st.DrawFn) -> dict:
    layers = draw(st.one_of(st.none(), st.integers(0, 2), st.lists(st.integers(0, 2), max_size=2, unique=True)))
    # A target equal to a module's whole name (a full name, or a top-level one like lm_head) with
    # layers_to_transform is the one known difference (test below): such targets come without layer indices.
    pool = [name for name in SUFFIXES if name not in LLAMA_NAMES] if layers is not None else SUFFIXES + FULL_NAMES
    options: dict = {"target_modules": draw(st.lists(st.sampled_from(pool), min_size=1, max_size=4, unique=True))}
    options["exclude_modules"] = draw(
        st.one_of(
            st.none(),
            st.lists(st.sampled_from(SUFFIXES + FULL_NAMES), min_size=1, max_size=2, unique=True),
            st.sampled_from(EXCLUDE_REGEXES),
        )
    )
    options["modules_to_save"] = draw(st.one_of(st.none(), st.just(["mlp"]), st.just(["self_attn", "lm_head"])))
    options["layers_to_transform"] = layers
    if layers is not None:
        options["layers_pattern"] = draw(st.sampled_from([None, "layers", ["h", "layers"], "h"]))
    return options


@settings(max_examples=40, deadline=None)
@given(options=list_configs())
def test_list_targets_match_the_names_peft_matches(options: dict) -> None:
    ours, theirs = ours_config(**options), peft_config(**options)
    for name in LLAMA_NAMES:
        assert is_target_module(ours, name) == bool(check_target_module_exists(theirs, name)), name


@settings(max_examples=25, deadline=None)
@given(
    pattern=st.sampled_from([r".*\.(q|k)_proj", r"model\.layers\.0\..*proj", r".*mlp\..*", r"lm_head", r"q_proj"]),
    exclude=st.one_of(st.none(), st.just(["q_proj"]), st.just(r".*layers\.1\..*")),
)
def test_regex_targets_match_the_names_peft_matches(pattern: str, exclude) -> None:
    ours = ours_config(target_modules=pattern, exclude_modules=exclude)
    theirs = peft_config(target_modules=pattern, exclude_modules=exclude)
    for name in LLAMA_NAMES:
        assert is_target_module(ours, name) == bool(check_target_module_exists(theirs, name)), name


@pytest.mark.xfail(
    strict=True,
    reason="peft adapts a target equal to a module's whole name (model.layers.0.self_attn.q_proj, or a top-level "
    "lm_head) whatever layers_to_transform says: check_target_module_exists skips the layer test on an exact name; "
    "orthotune applies it",
)
def test_a_full_name_with_layers_to_transform_matches_peft() -> None:
    options = {"target_modules": ["model.layers.0.self_attn.q_proj", "v_proj"], "layers_to_transform": [1]}
    ours, theirs = ours_config(**options), peft_config(**options)
    assert [n for n in LLAMA_NAMES if is_target_module(ours, n)] == [
        n for n in LLAMA_NAMES if check_target_module_exists(theirs, n)
    ]


# ------------------------------------------------------------------------------ whole models, peft's inject
def peft_adapted(model_name: str, options: dict, method: str = "OFT") -> tuple[set[str], set[str]]:
    """Names of the modules peft adapts, and of those it wraps as modules_to_save."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(MODELS[model_name](), peft_config(method, **options)).get_base_model()
    adapted = {name for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)}
    saved = {name for name, module in model.named_modules() if type(module).__name__ == "ModulesToSaveWrapper"}
    return adapted, saved


def ours_adapted(model_name: str, options: dict) -> tuple[list[str], set[str], set[str], list[str]]:
    """What the library says it will adapt, what it adapts and wraps, and what the command line would adapt."""
    config = ours_config(**options)
    planned = target_module_names(MODELS[model_name](), config)
    cli_layers = [name for name, _ in _targeted_layers(MODELS[model_name](), config)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = orthotune.get_peft_model(MODELS[model_name](), config).get_base_model()
    adapted = {name for name, module in model.named_modules() if isinstance(module, AdapterLayer)}
    saved = {name for name, module in model.named_modules() if isinstance(module, ModulesToSaveWrapper)}
    return planned, adapted, saved, cli_layers


MODEL_CASES = {
    "llama-list": ("llama", {"target_modules": ["q_proj", "v_proj"]}),
    "llama-suffixes": (
        "llama",
        {"target_modules": ["self_attn.q_proj", "mlp.up_proj", "model.layers.1.mlp.down_proj"]},
    ),
    "llama-regex": ("llama", {"target_modules": r".*\.(q|k)_proj"}),
    "llama-regex-layer": ("llama", {"target_modules": r"model\.layers\.0\..*proj"}),
    "llama-exclude-list": (
        "llama",
        {"target_modules": ["q_proj", "v_proj", "down_proj"], "exclude_modules": ["model.layers.0.self_attn.q_proj"]},
    ),
    "llama-exclude-regex": (
        "llama",
        {"target_modules": ["q_proj", "v_proj", "down_proj"], "exclude_modules": r".*layers\.1\..*"},
    ),
    "llama-layers": ("llama", {"target_modules": ["q_proj", "v_proj"], "layers_to_transform": [1]}),
    "llama-layer-int": ("llama", {"target_modules": ["q_proj", "o_proj"], "layers_to_transform": 0}),
    "llama-layers-pattern": (
        "llama",
        {"target_modules": ["q_proj", "v_proj"], "layers_to_transform": [1], "layers_pattern": ["h", "layers"]},
    ),
    "llama-all-linear": ("llama", {"target_modules": "all-linear"}),  # lm_head excluded
    "llama-all-linear-exclude": ("llama", {"target_modules": "all-linear", "exclude_modules": ["down_proj"]}),
    "llama-default": ("llama", {"target_modules": None}),
    "bert-all-linear": ("bert", {"target_modules": "all-linear"}),
    "bert-seq-cls-all-linear": ("bert", {"target_modules": "all-linear", "task_type": "SEQ_CLS"}),  # classifier out
    "bert-seq-cls-default": ("bert", {"target_modules": None, "task_type": "SEQ_CLS"}),
    "bert-modules-to-save": ("bert", {"target_modules": ["query", "dense"], "modules_to_save": ["pooler"]}),
}


@pytest.mark.parametrize("case", sorted(MODEL_CASES))
def test_the_adapted_modules_are_peft_s(case: str) -> None:
    model_name, options = MODEL_CASES[case]
    theirs, theirs_saved = peft_adapted(model_name, options)
    planned, adapted, saved, cli_layers = ours_adapted(model_name, options)
    assert theirs, "the case adapts something"
    assert set(planned) == theirs
    assert adapted == theirs
    assert saved == theirs_saved
    assert cli_layers == planned
    if options.get("target_modules") == "all-linear":
        head = "classifier" if model_name == "bert" and options.get("task_type") else "lm_head"
        assert head not in adapted
        linears = {name for name, module in MODELS[model_name]().named_modules() if isinstance(module, torch.nn.Linear)}
        assert head in linears or model_name == "bert"


@pytest.mark.parametrize("options", [{"target_modules": "all-linear"}, {"target_modules": ["c_attn", "c_fc"]}])
def test_gpt2_conv1d_layers_are_the_ones_peft_adapts(options: dict) -> None:
    theirs, _ = peft_adapted("gpt2", options, method="LORA")
    planned, adapted, _, cli_layers = ours_adapted("gpt2", options)
    assert theirs and set(planned) == adapted == theirs
    assert cli_layers == planned
    assert "lm_head" not in adapted


def test_default_targets_are_peft_s_for_every_model_type() -> None:
    for model_type, targets in DEFAULT_TARGET_MODULES.items():
        assert targets == TRANSFORMERS_MODELS_TO_OFT_TARGET_MODULES_MAPPING[model_type], model_type
        assert targets == TRANSFORMERS_MODELS_TO_BOFT_TARGET_MODULES_MAPPING[model_type], model_type


def test_unknown_model_type_without_targets_names_the_fix() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    with pytest.raises(ValueError, match=r"target_modules=None .* model_type=None.*pass target_modules"):
        target_module_names(model, ours_config(target_modules=None))
