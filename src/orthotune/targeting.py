"""Which modules a config adapts: peft 0.21.2's matching rules, in one place for the library and the CLI.

A list of ``target_modules`` matches a module whose full name equals an entry or ends with ``.entry``; a string
is a regex the full name must match; ``"all-linear"`` takes every linear layer (``nn.Linear``, transformers'
``Conv1D``, a quantized linear) but the output head. ``exclude_modules`` and ``modules_to_save`` win over the
targets; ``layers_to_transform`` narrows a list to some layer indices. A config without targets uses peft's
default for the model type. :func:`target_module_names` answers the whole question for a model.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator

import torch
from torch import nn

from orthotune.adapter_layer import AdapterLayer
from orthotune.base_layer import LayerKind, is_transformers_conv1d
from orthotune.config import ALL_LINEAR, AdapterConfig
from orthotune.integrations.quantized import quantized_backend
from orthotune.modules_to_save import ModulesToSaveWrapper

__all__ = [
    "DEFAULT_TARGET_MODULES",
    "TASK_MODULES_TO_SAVE",
    "is_target_module",
    "module_name",
    "name_matches",
    "resolved_config",
    "target_module_names",
    "top_level_modules",
    "trained_biases",
]

#: ``target_modules`` when a config gives none, by transformers ``model_type`` (peft's choices).
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    **dict.fromkeys(
        [
            "llama",
            "mistral",
            "mixtral",
            "qwen2",
            "qwen3",
            "gemma",
            "gemma2",
            "opt",
            "bart",
            "gptj",
            "gpt_neo",
            "stablelm",
        ],
        ["q_proj", "v_proj"],
    ),
    **dict.fromkeys(["bert", "roberta", "xlm-roberta", "electra", "layoutlm"], ["query", "value"]),
    **dict.fromkeys(["t5", "mt5"], ["q", "v"]),
    **dict.fromkeys(["gpt2", "gpt_bigcode"], ["c_attn"]),
    **dict.fromkeys(["bloom", "gpt_neox", "falcon"], ["query_key_value"]),
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
}
#: Heads that peft trains in full for a task type (added to ``modules_to_save``).
TASK_MODULES_TO_SAVE = {
    "SEQ_CLS": ["classifier", "score"],
    "TOKEN_CLS": ["classifier", "score"],
    "QUESTION_ANS": ["qa_outputs"],
}


# ------------------------------------------------------------------------------------------------ matching
def name_matches(names: list[str] | set[str] | str, key: str) -> bool:
    if isinstance(names, str):
        return re.fullmatch(names, key) is not None
    return any(key == name or key.endswith(f".{name}") for name in names)


def _contains_module(outer: str, key: str) -> bool:
    """Whether ``key`` is the module ``outer`` (a name or dotted suffix) or lies inside it."""
    return f".{outer}." in f".{key}."


def _layer_index(key: str, layers_pattern: list[str] | str | None) -> int | None:
    """The layer number in a module name, as peft finds it: the first ``<name>.<digits>.`` segment (after at
    least one dot) or, with ``layers_pattern``, the first ``<pattern>.<digits>.``."""
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(\d+)\.", key)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        match = next(
            (found for pattern in patterns if (found := re.match(rf"(?:^|.*?\.){pattern}\.(\d+)\.", key))), None
        )
    return int(match.group(1)) if match else None


def is_target_module(config: AdapterConfig, key: str) -> bool:
    """Whether the module named ``key`` is adapted under ``config`` (peft 0.21.2's rules).

    ``exclude_modules`` and ``modules_to_save`` win; a list of ``target_modules`` then matches by name or
    dotted suffix and is narrowed by ``layers_to_transform``; a string is a regex for the whole name.
    """
    if config.exclude_modules and name_matches(config.exclude_modules, key):
        return False
    if config.modules_to_save and any(_contains_module(name, key) for name in config.modules_to_save):
        return False
    targets = config.target_modules
    if targets is None:
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
    if not name_matches(targets, key):
        return False
    layers = config.layers_to_transform
    if layers is None or layers == []:
        return True
    index = _layer_index(key, config.layers_pattern)
    if index is None:
        return False
    return index == layers if isinstance(layers, int) else index in layers


def _is_linear(module: nn.Module) -> bool:
    if isinstance(module, AdapterLayer):
        return module.kind in (LayerKind.LINEAR, LayerKind.CONV1D)
    # A quantized linear layer need not subclass nn.Linear (HQQ's HQQLinear does not).
    return isinstance(module, nn.Linear) or is_transformers_conv1d(module) or quantized_backend(module) is not None


def module_name(model: nn.Module, target: nn.Module | None) -> str | None:
    if target is None:
        return None
    return next((name for name, module in model.named_modules() if module is target), None)


def _all_linear(model: nn.Module, config: AdapterConfig) -> list[str]:
    """Every linear layer (``nn.Linear``, ``Conv1D``, an adapted one) except the output head, as peft."""
    heads: set[str | None] = set()
    get_output_embeddings = getattr(model, "get_output_embeddings", None)
    output = get_output_embeddings() if callable(get_output_embeddings) else None
    if output is not None:
        heads.add(module_name(model, output))
    elif config.task_type == "SEQ_CLS":
        heads.update(module_name(model, getattr(model, name, None)) for name in TASK_MODULES_TO_SAVE["SEQ_CLS"])
    names = [name for name, module in top_level_modules(model) if _is_linear(module) and name not in heads]
    return sorted(names)


def top_level_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Named modules, not descending into adapter layers and ``modules_to_save`` wrappers (yielded themselves)."""
    inside: tuple[str, ...] = ()
    for name, module in model.named_modules():
        if not name or name.startswith(inside):
            continue
        if isinstance(module, (AdapterLayer, ModulesToSaveWrapper)):
            inside = (*inside, f"{name}.")
        yield name, module


def resolved_config(model: nn.Module, config: AdapterConfig) -> AdapterConfig:
    """A copy of ``config`` with the task's heads in ``modules_to_save`` and ``target_modules`` made explicit."""
    config = copy.deepcopy(config)
    heads = TASK_MODULES_TO_SAVE.get(config.task_type or "")
    if heads:
        config.modules_to_save = list(dict.fromkeys([*(config.modules_to_save or []), *heads]))
    if config.target_modules is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in DEFAULT_TARGET_MODULES:
            raise ValueError(
                f"target_modules=None and orthotune knows no default targets for model_type={model_type!r}; "
                "pass target_modules, e.g. ['q_proj', 'v_proj'] or 'all-linear'"
            )
        config.target_modules = set(DEFAULT_TARGET_MODULES[model_type])
    elif isinstance(config.target_modules, str) and config.target_modules.lower() == ALL_LINEAR:
        config.target_modules = set(_all_linear(model, config))
    return config


def target_module_names(model: nn.Module, config: AdapterConfig) -> list[str]:
    """The names of the modules of ``model`` that ``config`` adapts (its defaults and ``"all-linear"`` resolved)."""
    config = resolved_config(model, config)
    return [name for name, _ in top_level_modules(model) if is_target_module(config, name)]


def trained_biases(model: nn.Module, bias: str, adapter_name: str) -> dict[str, torch.Tensor]:
    """The biases of ``model`` (by name in it) that train, and are saved, with an adapter of ``bias`` mode.

    ``"all"``: every bias of the model except those inside ``modules_to_save`` wrappers (their copies train
    whole); ``"<method>_only"``: the biases of the layers the adapter ``adapter_name`` adapts; ``"none"``: none.
    """
    if bias == "all":
        return {
            name: parameter
            for name, parameter in model.named_parameters()
            if name.rpartition(".")[2] == "bias"
            and ".modules_to_save." not in f".{name}"
            and ".original_module." not in f".{name}"
        }
    if bias == "none":
        return {}
    biases = {}
    for name, module in top_level_modules(model):
        if not isinstance(module, AdapterLayer) or adapter_name not in module.adapter_names:
            continue
        base_bias = getattr(module.get_base_layer(), "bias", None)
        if isinstance(base_bias, torch.Tensor):
            biases[f"{name}.base_layer.bias"] = base_bias
    return biases
