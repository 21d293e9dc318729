"""Whole models: find the layers to adapt, wrap them in OFT/BOFT layers, and give peft's model API.

    get_peft_model(model, OFTConfig(r=8, target_modules=["q_proj", "v_proj"]))
      └─ OrthoModel                                  (peft's PeftModel: save, load, merge, adapters by name)
           └─ base_model: OrthoTuner                 (peft's tuner: holds the model)
                └─ model: the user's model, each target replaced in place:
                     q_proj ─► oft.Linear(base_layer=q_proj, oft_R={"default": …})

The structure, and with it every state-dict key, is peft's: ``base_model.model.<path>.base_layer.weight``,
``base_model.model.<path>.oft_R.<adapter>.weight``. Matching of ``target_modules`` follows peft 0.21.2: a list
matches a module whose full name equals an entry or ends with ``.entry``, a string is a regex the full name
must match, ``"all-linear"`` takes every ``nn.Linear`` and transformers ``Conv1D`` but the output head.

Nothing of the model changes until an adapter is known to fit: layers are built beside the model first
(they only reference the base layers), loaded files are checked against them, and only then are they put in.

This module imports neither transformers nor peft; transformers models are handled through their methods.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import inspect
import logging
import math
import os
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from orthotune import boft, oft
from orthotune.adapter_layer import BASE_ADAPTER_NAME, ActiveAdapters, AdapterLayer
from orthotune.base_layer import LayerKind, is_transformers_conv1d, layer_kind
from orthotune.checkpoint import (
    MODEL_PREFIX,
    check_tensors,
    convert_legacy_oft,
    copy_tensors,
    layer_tensors,
    module_tensors,
    read_adapter_files,
    save_adapter_files,
    to_peft_convention,
)
from orthotune.config import ALL_LINEAR, AdapterConfig, BOFTConfig, OFTConfig
from orthotune.modules_to_save import ModulesToSaveWrapper
from orthotune.quantized import quantized_backend

logger = logging.getLogger(__name__)

__all__ = ["OrthoModel", "OrthoTuner", "PeftModel", "get_peft_model", "is_target_module"]

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
#: Embedding layers whose base weights peft saves with an adapter that targets them by name.
EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")


# ------------------------------------------------------------------------------------------------ matching
def _name_matches(names: list[str] | str, key: str) -> bool:
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
    if config.exclude_modules and _name_matches(config.exclude_modules, key):
        return False
    if config.modules_to_save and any(_contains_module(name, key) for name in config.modules_to_save):
        return False
    targets = config.target_modules
    if targets is None:
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
    if not _name_matches(targets, key):
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


def _refuse_partitioned(tensors: dict[str, torch.Tensor]) -> None:
    """Refuse to write DeepSpeed ZeRO-3 placeholders (empty tensors standing for partitioned parameters)."""
    empty = [key for key, value in tensors.items() if hasattr(value, "ds_id") and value.numel() == 0]
    if empty:
        raise ValueError(
            f"cannot save {empty[0]!r} (and {len(empty) - 1} more): DeepSpeed ZeRO-3 has partitioned it and this "
            "process holds an empty placeholder; gather the adapter first, on every rank: "
            "`with deepspeed.zero.GatheredParameters([p for p in model.parameters() if p.requires_grad]): "
            "model.save_pretrained(path, is_main_process=rank == 0)`"
        )


def _module_name(model: nn.Module, target: nn.Module | None) -> str | None:
    if target is None:
        return None
    return next((name for name, module in model.named_modules() if module is target), None)


def _all_linear(model: nn.Module, config: AdapterConfig) -> list[str]:
    """Every linear layer (``nn.Linear``, ``Conv1D``, an adapted one) except the output head, as peft."""
    heads: set[str | None] = set()
    output = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    if output is not None:
        heads.add(_module_name(model, output))
    elif config.task_type == "SEQ_CLS":
        heads.update(_module_name(model, getattr(model, name, None)) for name in TASK_MODULES_TO_SAVE["SEQ_CLS"])
    names = [name for name, module in _top_level_modules(model) if _is_linear(module) and name not in heads]
    return sorted(names)


def _top_level_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Named modules, not descending into adapter layers and ``modules_to_save`` wrappers (yielded themselves)."""
    inside: tuple[str, ...] = ()
    for name, module in model.named_modules():
        if not name or name.startswith(inside):
            continue
        if isinstance(module, (AdapterLayer, ModulesToSaveWrapper)):
            inside = (*inside, f"{name}.")
        yield name, module


def _resolved_config(model: nn.Module, config: AdapterConfig) -> AdapterConfig:
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
        config.target_modules = list(DEFAULT_TARGET_MODULES[model_type])
    elif isinstance(config.target_modules, str) and config.target_modules.lower() == ALL_LINEAR:
        config.target_modules = _all_linear(model, config)
    return config


# --------------------------------------------------------------------------------------------------- layers
def _adapter_kwargs(config: AdapterConfig) -> dict[str, Any]:
    """The arguments of ``update_layer`` that a config decides."""
    if isinstance(config, OFTConfig):
        return {
            "r": config.r,
            "oft_block_size": config.oft_block_size,
            "module_dropout": config.module_dropout,
            "coft": config.coft,
            "eps": config.eps,
            "block_share": config.block_share,
            "init_weights": config.init_weights,
            "use_cayley_neumann": config.use_cayley_neumann,
            "num_cayley_neumann_terms": config.num_cayley_neumann_terms,
            "inference_mode": config.inference_mode,
        }
    assert isinstance(config, BOFTConfig)
    return {
        "boft_block_size": config.boft_block_size,
        "boft_block_num": config.boft_block_num,
        "boft_n_butterfly_factor": config.boft_n_butterfly_factor,
        "boft_dropout": config.boft_dropout,
        "init_weights": config.init_weights,
        "inference_mode": config.inference_mode,
    }


def _new_layer(config: AdapterConfig, adapter_name: str, base: nn.Module, name: str) -> AdapterLayer:
    """A new OFT/BOFT layer around ``base`` holding one adapter (``base`` itself is not modified)."""
    try:
        kind = layer_kind(base)
    except (TypeError, ValueError) as error:
        raise type(error)(f"target_modules matched {name!r}, which cannot be adapted: {error}") from error
    layer_class: type[AdapterLayer]
    if isinstance(config, OFTConfig):
        layer_class = {LayerKind.EMBEDDING: oft.Embedding, LayerKind.CONV2D: oft.Conv2d}.get(kind, oft.Linear)
    elif kind is LayerKind.EMBEDDING:
        raise TypeError(
            f"target_modules matched the embedding {name!r}, which BOFT cannot adapt (neither can peft); use "
            "OFTConfig for embeddings, or leave it out of target_modules"
        )
    else:
        layer_class = boft.Conv2d if kind is LayerKind.CONV2D else boft.Linear
    # A layer freezes its base; a plan must leave the model untouched until it is committed (which freezes it).
    trainable = [parameter for parameter in base.parameters() if parameter.requires_grad]
    try:
        # The weight layout is detected per layer, so a single config serves Linear and GPT-2's Conv1D alike.
        return layer_class(base, adapter_name, fan_in_fan_out=kind is LayerKind.CONV1D, **_adapter_kwargs(config))
    finally:
        for parameter in trainable:
            parameter.requires_grad_(True)


@dataclass
class _Plan:
    """An adapter ready to be put into a model: built, checked and loaded beside it, nothing changed yet.

    Attributes:
        layers: module name → a new layer around the current base module, holding only this adapter.
        existing: module name → the adapter layer already there (the adapter is added to it on commit).
        copies: module name → the adapter's trainable copy of a ``modules_to_save`` module.
        wrappers: module name → a new wrapper for a module not wrapped yet.
    """

    adapter_name: str
    config: AdapterConfig
    layers: dict[str, AdapterLayer] = field(default_factory=dict)
    existing: dict[str, AdapterLayer] = field(default_factory=dict)
    copies: dict[str, nn.Module] = field(default_factory=dict)
    wrappers: dict[str, ModulesToSaveWrapper] = field(default_factory=dict)

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        """File keys of everything the adapter owns (its rotations and module copies)."""
        tensors: dict[str, torch.Tensor] = {}
        for name, layer in self.layers.items():
            tensors.update(layer_tensors(name, layer, self.adapter_name))
        for name, module in self.copies.items():
            tensors.update(module_tensors(name, module))
        return tensors


# ----------------------------------------------------------------------------------------------- the model
class _ForwardsAttributes(nn.Module):
    """Attributes this module lacks are read from the module it wraps (named by ``_inner``)."""

    _inner: str

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == self._inner:
                raise
            return getattr(getattr(self, self._inner), name)


class OrthoTuner(_ForwardsAttributes):
    """Holds the adapted model as ``model``: peft's ``PeftModel.base_model``, which makes the keys peft's."""

    _inner = "model"

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)


class OrthoModel(ActiveAdapters, _ForwardsAttributes):
    """A model with named OFT/BOFT adapters and peft's ``PeftModel`` API (also exported as ``PeftModel``).

    Calls and attributes not defined here go to the wrapped model (``model.config``, ``generate``,
    ``gradient_checkpointing_enable``, …). Build one with :func:`get_peft_model` or :meth:`from_pretrained`.

    Args:
        model: the model to adapt (modified in place when an adapter is added).
        peft_config: the first adapter's config, or ``None`` to start without adapters.
        adapter_name: the first adapter's name.
    """

    _inner = "base_model"

    def __init__(self, model: nn.Module, peft_config: AdapterConfig | None = None, adapter_name: str = "default"):
        super().__init__()
        if isinstance(model, OrthoModel):
            raise TypeError("the model is already an OrthoModel; add adapters with add_adapter(name, config)")
        adapted = [name for name, module in model.named_modules() if isinstance(module, AdapterLayer)]
        if adapted:
            # Adapting in place (as from_pretrained(pipe.unet, ...) does) twice leaves the first adapters in the
            # layers, inactive but still there; peft warns about the same thing.
            warnings.warn(
                f"the model already holds orthotune adapter layers ({adapted[0]!r} and {len(adapted) - 1} more): "
                "the new adapter is added next to the old ones, which stay in the model; keep the first "
                "OrthoModel and call add_adapter / load_adapter on it, or unload() it before wrapping again",
                stacklevel=2,
            )
        self.base_model = OrthoTuner(model)
        self.peft_config: dict[str, AdapterConfig] = {}
        self._active_adapters: list[str] = []
        # The forward signature is the wrapped model's, so that tools that inspect it (transformers' Trainer
        # keeps only the batch columns forward accepts) see input_ids, labels, … and not *args, **kwargs.
        forward = functools.partial(type(self).forward, self)
        with contextlib.suppress(TypeError, ValueError):
            forward.__signature__ = inspect.signature(model.forward)  # type: ignore[attr-defined]
        self.forward = forward  # type: ignore[method-assign]
        if peft_config is not None:
            self.add_adapter(adapter_name, peft_config)

    # ------------------------------------------------------------------------------------- pass-through
    def get_base_model(self) -> nn.Module:
        """The wrapped model itself, with its adapted layers in place."""
        return self.base_model.model

    def forward(self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
        """The wrapped model's forward; ``adapter_names`` (inference only) gives each sample its own adapter,
        ``"__base__"`` for none."""
        with self._adapter_names_applied(adapter_names):
            return self.base_model(*args, **kwargs)

    def generate(self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
        """The wrapped model's ``generate``, with ``adapter_names`` as in :meth:`forward`."""
        with self._adapter_names_applied(adapter_names):
            return self.get_base_model().generate(*args, **kwargs)

    @contextlib.contextmanager
    def _adapter_names_applied(self, adapter_names: Sequence[str] | None) -> Iterator[None]:
        """Pass ``adapter_names`` to every adapter layer and wrapper for the duration of one call."""
        if adapter_names is None:
            yield
            return
        if isinstance(adapter_names, str):
            raise TypeError(f"adapter_names={adapter_names!r} must be a list with one adapter name per sample")
        adapter_names = list(adapter_names)
        unknown = sorted(set(adapter_names) - set(self.peft_config) - {BASE_ADAPTER_NAME})
        if unknown:
            raise ValueError(
                f"adapter_names has unknown adapters {unknown}; this model has {list(self.peft_config)} and "
                f"{BASE_ADAPTER_NAME!r} for the base model"
            )
        if self.get_base_model().training:
            raise RuntimeError("adapter_names (one adapter per sample) works in inference only; call model.eval()")
        merged = sorted({name for _, layer in self._adapter_layers() for name in layer.merged_adapters})
        if merged:
            raise ValueError(f"adapter_names cannot be used while adapters {merged} are merged; call unmerge_adapter()")

        def pass_names(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            return args, {**kwargs, "adapter_names": adapter_names}

        handles = [
            module.register_forward_pre_hook(pass_names, with_kwargs=True)
            for _, module in _top_level_modules(self.get_base_model())
            if isinstance(module, (AdapterLayer, ModulesToSaveWrapper))
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    # ----------------------------------------------------------------------------------------- adapters
    @property
    def active_peft_config(self) -> AdapterConfig:
        return self.peft_config[self._active_adapters[0]]

    @property
    def modules_to_save(self) -> set[str] | None:
        names = {name for config in self.peft_config.values() for name in config.modules_to_save or []}
        return names or None

    def _adapter_layers(self) -> Iterator[tuple[str, AdapterLayer]]:
        for name, module in _top_level_modules(self.get_base_model()):
            if isinstance(module, AdapterLayer):
                yield name, module

    def _wrappers(self) -> Iterator[tuple[str, ModulesToSaveWrapper]]:
        for name, module in _top_level_modules(self.get_base_model()):
            if isinstance(module, ModulesToSaveWrapper):
                yield name, module

    def add_adapter(self, adapter_name: str, peft_config: AdapterConfig) -> None:
        """Add an adapter (inactive unless it is the first; activate it with :meth:`set_adapter`)."""
        config = _as_orthotune_config(peft_config)
        self._check_new_adapter(adapter_name, config)
        self._commit(self._plan(adapter_name, config))

    def _check_new_adapter(self, adapter_name: str, config: AdapterConfig) -> None:
        if not isinstance(adapter_name, str) or not adapter_name or adapter_name == BASE_ADAPTER_NAME:
            raise ValueError(f"adapter_name={adapter_name!r} must be a non-empty name other than {BASE_ADAPTER_NAME!r}")
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter_name={adapter_name!r} already exists; delete_adapter() it or pick another name")
        types = {existing.peft_type for existing in self.peft_config.values()}
        if types and config.peft_type not in types:
            raise ValueError(
                f"cannot add a {config.peft_type} adapter to a model with {sorted(types)} adapters (peft cannot "
                "either); use one method per model"
            )

    def _plan(self, adapter_name: str, config: AdapterConfig) -> _Plan:
        model = self.get_base_model()
        plan = _Plan(adapter_name, _resolved_config(model, config))
        config = plan.config
        for name, module in _top_level_modules(model):
            to_save = _name_matches(config.modules_to_save or [], name)
            if isinstance(module, ModulesToSaveWrapper):
                if to_save:
                    plan.copies[name] = module.make_copy()
                continue
            if to_save:
                plan.wrappers[name] = ModulesToSaveWrapper(module)
                plan.copies[name] = plan.wrappers[name].make_copy()
                continue
            if not is_target_module(config, name):
                continue
            if isinstance(module, AdapterLayer):
                plan.existing[name] = module
                module = module.get_base_layer()
            plan.layers[name] = _new_layer(config, adapter_name, module, name)
        if not plan.layers:
            examples = [name for name, _ in model.named_modules() if name][:8]
            raise ValueError(
                f"target_modules={config.target_modules!r} matched no module of {type(model).__name__} (module "
                f"names look like {examples}); check the names, or the model the adapter was made for"
            )
        return plan

    def _commit(self, plan: _Plan) -> None:
        """Put a checked plan into the model. Nothing here can fail on a plan that :meth:`_plan` made."""
        model = self.get_base_model()
        first = not self.peft_config
        for name, layer in plan.layers.items():
            existing = plan.existing.get(name)
            if existing is None:
                model.set_submodule(name, layer)
                continue
            with warnings.catch_warnings():  # the plan's layer has already said what it adjusted
                warnings.simplefilter("ignore")
                existing.update_layer(plan.adapter_name, **_adapter_kwargs(plan.config))
            source = layer_tensors(name, layer, plan.adapter_name)
            with torch.no_grad():
                for key, tensor in layer_tensors(name, existing, plan.adapter_name).items():
                    tensor.copy_(source[key])
        for name, module in plan.copies.items():
            wrapper = plan.wrappers.get(name)
            if wrapper is not None:
                model.set_submodule(name, wrapper)
            else:
                wrapper = model.get_submodule(name)
            wrapper.add_adapter(plan.adapter_name, module)
        self.peft_config[plan.adapter_name] = plan.config
        if first:
            for parameter in model.parameters():
                parameter.requires_grad_(False)
            self._active_adapters = [plan.adapter_name]
        self._apply_active_adapters()

    def set_adapter(self, adapter_name: str | Sequence[str], inference_mode: bool | None = None) -> None:
        """Make ``adapter_name`` (or several, applied in order) the active adapters; only they train.

        Args:
            inference_mode: freeze them; by default as their configs say (``True`` after loading without
                ``is_trainable``).
        """
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        unknown = [name for name in names if name not in self.peft_config]
        if unknown or not names:
            raise ValueError(f"adapter_name={adapter_name!r}: this model has adapters {list(self.peft_config)}")
        self._active_adapters = names
        self._apply_active_adapters(inference_mode)

    def _apply_active_adapters(self, inference_mode: bool | None = None) -> None:
        active = self._active_adapters
        if inference_mode is None:
            inference_mode = all(self.peft_config[name].inference_mode for name in active)
        for _, layer in self._adapter_layers():
            layer.set_adapter([name for name in active if name in layer.adapter_names], inference_mode=inference_mode)
        for _, wrapper in self._wrappers():
            wrapper.set_adapter(active, inference_mode=inference_mode)
        if inference_mode:
            return
        for name in active:
            for _, bias in self._trained_biases(self.peft_config[name].bias, name).items():
                bias.requires_grad_(True)

    def _trained_biases(self, bias: str, adapter_name: str) -> dict[str, torch.Tensor]:
        """Model names of the biases that train (and are saved) with ``bias="all"`` or ``"<method>_only"``."""
        if bias == "all":
            return {
                name: parameter
                for name, parameter in self.get_base_model().named_parameters()
                if name.rpartition(".")[2] == "bias"
                and ".modules_to_save." not in f".{name}"
                and ".original_module." not in f".{name}"
            }
        if bias == "none":
            return {}
        biases = {}
        for name, layer in self._adapter_layers():
            base_bias = getattr(layer.get_base_layer(), "bias", None)
            if adapter_name in layer.adapter_names and isinstance(base_bias, torch.Tensor):
                biases[f"{name}.base_layer.bias"] = base_bias
        return biases

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter everywhere; it must not be merged."""
        if adapter_name not in self.peft_config:
            raise ValueError(f"adapter_name={adapter_name!r}: this model has adapters {list(self.peft_config)}")
        merged = [name for name, layer in self._adapter_layers() if adapter_name in layer.merged_adapters]
        if merged:
            raise ValueError(f"adapter {adapter_name!r} is merged into {merged[:3]}; call unmerge_adapter() first")
        for _, layer in self._adapter_layers():
            if adapter_name in layer.adapter_names:
                layer.delete_adapter(adapter_name)
        for _, wrapper in self._wrappers():
            wrapper.delete_adapter(adapter_name)
        del self.peft_config[adapter_name]
        remaining = [name for name in self._active_adapters if name != adapter_name]
        self._active_adapters = remaining or list(self.peft_config)[:1]
        self._apply_active_adapters()

    # ----------------------------------------------------------------------------------------- strength
    def set_scale(self, adapter_name: str, scale: float) -> None:
        """Apply ``adapter_name`` at strength ``scale`` in every layer it adapts: its rotations become ``R(t·Q)``.

        0 gives the base model, 1 the trained adapter, -1 its inverse rotation (for BOFT with one butterfly
        factor; with more, the product of the inverse factors in the same order), 2 twice as far along the
        Cayley curve ``t ↦ R(t·Q)``; see :mod:`orthotune.functional.strength`. BOFT's output scale becomes
        ``s^t``. Forward and merge both use the strength; a merged adapter must be unmerged first.
        """
        if adapter_name not in self.peft_config:
            raise ValueError(f"adapter_name={adapter_name!r}: this model has adapters {list(self.peft_config)}")
        layers = [layer for _, layer in self._adapter_layers() if adapter_name in layer.adapter_names]
        for layer in layers:  # every layer accepts the value before any changes
            layer.check_strength(adapter_name, scale)
        for layer in layers:
            layer.set_scale(adapter_name, scale)

    def add_weighted_adapter(self, adapters: Sequence[str], weights: Sequence[float], adapter_name: str) -> None:
        """Add ``adapter_name``: one adapter equal to ``adapters`` active together, each at its weight as strength.

        The new adapter gives the outputs of ``set_adapter(adapters)`` with each adapter's strength multiplied by
        its weight (as peft's LoRA ``add_weighted_adapter`` folds in ``scaling``). Per layer, the sources' exact
        rotations ``R(w·t·Q)`` are multiplied block by block in the order the layer applies them, and the
        product's generator is its inverse Cayley transform (:func:`~orthotune.functional.cayley_inverse`): an
        exact, not an averaged, composition. The new adapter is in exact Cayley mode without COFT (sources in
        Cayley-Neumann mode contribute the exact rotations their parameters stand for; the result generally
        lies outside a COFT ball), has strength 1, is not activated, and takes its ``modules_to_save`` copies
        from the first source that has one (the copy ``set_adapter(adapters)`` runs).

        Args:
            adapters: existing adapters, in ``set_adapter`` order (the first sits next to the base layer).
            weights: one finite strength multiplier per adapter (negative inverts that adapter's rotation).
            adapter_name: the new adapter's name.

        Raises:
            ValueError: for unknown adapters or bad weights; if in some layer the sources differ in block size,
                block count or butterfly factors (naming the layer and what differs); for several BOFT sources
                with more than one butterfly factor (not exactly composable); or if a product turns some plane
                by 180°. Nothing is added then.
        """
        adapters, weights = list(adapters), list(weights)
        unknown = [name for name in adapters if name not in self.peft_config]
        if not adapters or unknown:
            raise ValueError(f"adapters={adapters!r}: list some of this model's adapters {list(self.peft_config)}")
        if len(weights) != len(adapters):
            raise ValueError(f"weights has {len(weights)} entries for {len(adapters)} adapters; pass one weight each")
        bad = [w for w in weights if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w)]
        if bad:
            raise ValueError(f"weights={weights!r}: {bad[0]!r} is not a finite number; pass e.g. [1.0, 0.5]")
        config = self._composed_config(adapters)
        self._check_new_adapter(adapter_name, config)
        parts: dict[str, dict[str, torch.Tensor]] = {}
        for name, layer in self._adapter_layers():
            present = [
                (source, weight)
                for source, weight in zip(adapters, weights, strict=True)
                if source in layer.adapter_names
            ]
            if not present:
                continue
            strengths = [float(weight) * layer.strength(source) for source, weight in present]
            try:
                with torch.no_grad():
                    parts[name] = layer.composed_parameters([source for source, _ in present], strengths)
            except ValueError as error:
                raise ValueError(f"add_weighted_adapter: layer {name!r}: {error}") from error
        plan = self._plan(adapter_name, config)
        if set(plan.layers) != set(parts):
            different = sorted(set(plan.layers) ^ set(parts))
            raise ValueError(
                f"add_weighted_adapter: the new adapter's config would adapt other layers than its sources "
                f"({different[:3]}); pass adapters whose configs target the same modules"
            )
        with torch.no_grad():
            for name, tensors in parts.items():
                for attribute, value in tensors.items():
                    target = plan.layers[name].adapter_parameter(attribute, adapter_name)
                    if target.shape != value.shape:
                        raise ValueError(
                            f"add_weighted_adapter: layer {name!r}: the composed {attribute} has shape "
                            f"{tuple(value.shape)} but {config.peft_type} config {config} makes {tuple(target.shape)}"
                        )
                    target.copy_(value)
            for name, copied in plan.copies.items():
                wrapper = self.get_base_model().get_submodule(name)
                source = next((a for a in adapters if a in getattr(wrapper, "modules_to_save", {})), None)
                if isinstance(wrapper, ModulesToSaveWrapper) and source is not None:
                    copied.load_state_dict(wrapper.modules_to_save[source].state_dict())
        self._commit(plan)

    def _composed_config(self, adapters: list[str]) -> AdapterConfig:
        """The config of a composition of ``adapters``: the first one's, with what composing changes."""
        configs = [self.peft_config[name] for name in adapters]
        first = configs[0]
        changes: dict[str, Any] = {"init_weights": True}
        targeting = ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern")
        if any(
            getattr(config, field_name) != getattr(first, field_name) for config in configs for field_name in targeting
        ):
            adapted = [name for name, layer in self._adapter_layers() if set(adapters) & set(layer.adapter_names)]
            changes.update(target_modules=adapted, exclude_modules=None, layers_to_transform=None, layers_pattern=None)
        saved = [name for config in configs for name in config.modules_to_save or []]
        changes["modules_to_save"] = list(dict.fromkeys(saved)) or None
        if isinstance(first, OFTConfig):
            changes.update(
                coft=False,
                use_cayley_neumann=False,
                block_share=all(isinstance(config, OFTConfig) and config.block_share for config in configs),
            )
        return dataclasses.replace(first, **changes)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Within the block the model is the base model (merged adapters are unmerged first)."""
        trainable = {parameter: parameter.requires_grad for parameter in self.parameters()}
        for _, layer in self._adapter_layers():
            layer.enable_adapters(False)
        for _, wrapper in self._wrappers():
            wrapper.disable_adapters = True
        try:
            yield
        finally:
            for _, layer in self._adapter_layers():
                layer.enable_adapters(True)
            for _, wrapper in self._wrappers():
                wrapper.disable_adapters = False
            for parameter, requires_grad in trainable.items():
                parameter.requires_grad_(requires_grad)

    # ----------------------------------------------------------------------------------------- counting
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """``(trainable, all)`` parameter counts, each shared parameter counted once."""
        trainable = total = 0
        for parameter in self.parameters():
            total += parameter.numel()
            trainable += parameter.numel() if parameter.requires_grad else 0
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        percent = 100 * trainable / total
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {percent:.4f}")

    # ------------------------------------------------------------------------------------------ merging
    def merge_adapter(self, adapter_names: Sequence[str] | None = None, safe_merge: bool = False) -> None:
        """Merge adapters into the base weights (default: the active ones, in order)."""
        self._merge_layers(adapter_names, safe_merge, around=lambda layer: contextlib.nullcontext())

    def _merge_layers(
        self,
        adapter_names: Sequence[str] | None,
        safe_merge: bool,
        around: Callable[[AdapterLayer], contextlib.AbstractContextManager[Any]],
    ) -> None:
        """Merge layer by layer, each inside ``around(layer)`` (a distributed wrapper gathers the layer there)."""
        names = None if adapter_names is None else list(adapter_names)
        unknown = [name for name in names or [] if name not in self.peft_config]
        if unknown:
            raise ValueError(f"adapter_names={unknown}: this model has adapters {list(self.peft_config)}")
        to_merge = []
        for name, layer in self._adapter_layers():
            wanted = layer.active_adapters if names is None else [a for a in names if a in layer.adapter_names]
            if wanted:
                to_merge.append((name, layer, wanted))
        self._check_untied([(name, layer) for name, layer, _ in to_merge])
        for _, layer, wanted in to_merge:
            with around(layer):
                layer.merge(safe_merge=safe_merge, adapter_names=wanted)

    def _check_untied(self, layers: list[tuple[str, AdapterLayer]]) -> None:
        """Refuse to merge into a weight that another module shares (tied input and output embeddings)."""
        users: dict[int, list[str]] = {}
        for name, parameter in self.get_base_model().named_parameters(remove_duplicate=False):
            users.setdefault(id(parameter), []).append(name)
        for name, layer in layers:
            weight = getattr(layer.get_base_layer(), "weight", None)
            others = [other for other in users.get(id(weight), []) if not other.startswith(f"{name}.base_layer.")]
            if others:
                raise ValueError(
                    f"cannot merge into {name!r}: its weight is tied to {others[0]!r}, which merging would change "
                    "as well; keep the adapter unmerged, or untie the weights first"
                )

    def unmerge_adapter(self) -> None:
        """Undo every merge, giving back the original base weights."""
        for _, layer in self._adapter_layers():
            if layer.merged:
                layer.unmerge()

    def merge_and_unload(
        self, progressbar: bool = False, safe_merge: bool = False, adapter_names: Sequence[str] | None = None
    ) -> nn.Module:
        """Merge the adapters and return the plain model: the same outputs, no adapter layers left.

        ``modules_to_save`` modules become the active adapter's trained copy.
        """
        self.merge_adapter(adapter_names, safe_merge=safe_merge)
        return self._unload(keep_trained_copies=True)

    def unload(self) -> nn.Module:
        """Remove every adapter (unmerging first) and return the original model."""
        self.unmerge_adapter()
        return self._unload(keep_trained_copies=False)

    def _unload(self, keep_trained_copies: bool) -> nn.Module:
        model = self.get_base_model()
        for name, module in list(_top_level_modules(model)):
            if isinstance(module, AdapterLayer):
                model.set_submodule(name, module.get_base_layer())
            elif isinstance(module, ModulesToSaveWrapper):
                model.set_submodule(name, module.active_module if keep_trained_copies else module.original_module)
        self.peft_config.clear()
        self._active_adapters = []
        return model

    # ------------------------------------------------------------------------------------- saving
    def save_pretrained(
        self,
        save_directory: str | os.PathLike[str],
        safe_serialization: bool = True,
        selected_adapters: Sequence[str] | None = None,
        save_embedding_layers: bool | str = "auto",
        is_main_process: bool = True,
        state_dict: dict[str, torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> None:
        """Write each adapter as peft does: ``default`` into ``save_directory``, others into subdirectories.

        Args:
            safe_serialization: must be ``True``; orthotune writes safetensors only.
            selected_adapters: adapters to save (default: all).
            save_embedding_layers: also save the base weights of targeted embedding layers; ``"auto"`` does so
                when ``target_modules`` names ``embed_tokens`` or ``lm_head``, as peft does.
            is_main_process: only the main process writes (distributed training).
            state_dict: the model's state dict to take values from (e.g. gathered by a distributed wrapper).
        """
        if not safe_serialization:
            raise ValueError("safe_serialization=False would write a pickle; orthotune writes safetensors only")
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory={os.fspath(save_directory)!r} is a file; pass a directory")
        names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
        unknown = [name for name in names if name not in self.peft_config]
        if unknown:
            raise ValueError(f"selected_adapters={unknown}: this model has adapters {list(self.peft_config)}")
        own_keys = {id(value): key for key, value in self.state_dict(keep_vars=True).items()} if state_dict else {}
        files = {}
        for name in names:
            tensors = self._adapter_file_tensors(name, save_embedding_layers)
            if state_dict is not None:
                tensors = {key: state_dict.get(own_keys.get(id(value), ""), value) for key, value in tensors.items()}
            _refuse_partitioned(tensors)  # on every process, so that all of them stop, not only the writer
            files[name] = tensors
        if not is_main_process:
            return
        for name, tensors in files.items():
            directory = save_directory if name == "default" else os.path.join(save_directory, name)
            save_adapter_files(directory, self._config_for_file(name), tensors)

    def _adapter_file_tensors(self, adapter_name: str, save_embedding_layers: bool | str) -> dict[str, torch.Tensor]:
        """File keys of one adapter: its own tensors, the biases it trains, and embeddings as asked."""
        config = self.peft_config[adapter_name]
        tensors = self._own_file_tensors(adapter_name)
        for name, bias in self._trained_biases(config.bias, adapter_name).items():
            tensors[f"{MODEL_PREFIX}{name}"] = bias
        # peft's rule: with an embedding named in target_modules, "auto" saves the base weights of the targeted
        # embedding layers; asked explicitly otherwise, it saves the input and output embeddings whole.
        targeted = isinstance(config.target_modules, list) and any(
            name in config.target_modules for name in EMBEDDING_LAYER_NAMES
        )
        if save_embedding_layers is True or (save_embedding_layers == "auto" and targeted):
            for name, module in self._embedding_modules().items():
                if isinstance(module, AdapterLayer):
                    tensors.update(module_tensors(f"{name}.base_layer", module.get_base_layer()))
                elif not targeted:
                    tensors.update(module_tensors(name, module))
        return tensors

    def _own_file_tensors(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """File keys of what only the adapter holds: its rotations and its ``modules_to_save`` copies."""
        tensors: dict[str, torch.Tensor] = {}
        for name, layer in self._adapter_layers():
            if adapter_name in layer.adapter_names:
                tensors.update(layer_tensors(name, layer, adapter_name))
        for name, wrapper in self._wrappers():
            if adapter_name in wrapper.modules_to_save:
                tensors.update(module_tensors(name, wrapper.modules_to_save[adapter_name]))
        return tensors

    def _embedding_modules(self) -> dict[str, nn.Module]:
        """The input and output embedding modules by name (transformers models only)."""
        model = self.get_base_model()
        found = {}
        for getter in ("get_input_embeddings", "get_output_embeddings"):
            method = getattr(model, getter, None)
            module = method() if callable(method) else None
            name = _module_name(model, module)
            if name:
                found[name] = module
        return found

    def _config_for_file(self, adapter_name: str) -> AdapterConfig:
        config = copy.deepcopy(self.peft_config[adapter_name])
        model = self.get_base_model()
        config.inference_mode = True
        if config.base_model_name_or_path is None:
            # transformers models carry name_or_path; diffusers models keep it in their config (peft writes null).
            model_config = getattr(model, "config", None)
            name = getattr(model, "name_or_path", None) or getattr(model_config, "_name_or_path", None)
            name = os.fspath(name) if isinstance(name, os.PathLike) else name
            config.base_model_name_or_path = name if isinstance(name, str) and name else None
        if config.task_type is None:
            config.auto_mapping = {"base_model_class": type(model).__name__, "parent_library": type(model).__module__}
        return config

    # ------------------------------------------------------------------------------------- loading
    def load_adapter(
        self,
        model_id: str | os.PathLike[str],
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: AdapterConfig | None = None,
        subfolder: str | None = None,
        **kwargs: Any,
    ) -> None:
        """Load an adapter directory (written by orthotune or peft) as a new adapter ``adapter_name``.

        Everything is checked before the model is touched: on any error the model is exactly as before.

        Args:
            model_id: a local directory with ``adapter_config.json`` and ``adapter_model.safetensors``.
            is_trainable: ``False`` (default) freezes the adapter and puts the model in eval mode, as peft.
            config: use this config instead of the directory's.
            subfolder: a subdirectory of ``model_id``.
        """
        directory = os.path.join(model_id, subfolder) if subfolder else os.fspath(model_id)
        file = read_adapter_files(directory)
        if config is not None:
            config = _as_orthotune_config(config)
            file.tensors = to_peft_convention(config, to_peft_convention(file.config, file.tensors))
            file.config = copy.deepcopy(config)
        file.config.inference_mode = not is_trainable
        self._check_new_adapter(adapter_name, file.config)
        plan = self._plan(adapter_name, file.config)
        if file.legacy_oft is not None:
            convert_legacy_oft(file, plan.layers)
        required = plan.adapter_tensors()
        optional = self._optional_file_tensors(plan)
        check_tensors(file, required, optional)
        copy_tensors(file, required)  # into the plan's own tensors: the model is not touched yet
        self._commit(plan)
        copy_tensors(file, optional)
        if not is_trainable:
            self.eval()

    def _optional_file_tensors(self, plan: _Plan) -> dict[str, torch.Tensor]:
        """Base-model tensors a file may carry besides the adapter's own: biases, embedding weights."""
        optional: dict[str, torch.Tensor] = {}
        for name, layer in plan.layers.items():
            optional.update(module_tensors(f"{name}.base_layer", layer.get_base_layer()))
        for name, module in self._embedding_modules().items():
            optional.update(module_tensors(name, module))
        if plan.config.bias == "all":
            for name, parameter in self.get_base_model().named_parameters():
                if name.rpartition(".")[2] == "bias":
                    optional[f"{MODEL_PREFIX}{name}"] = parameter
        return optional

    def load_adapter_weights(self, model_id: str | os.PathLike[str], adapter_name: str | None = None) -> None:
        """Overwrite an existing adapter's weights from a directory (resuming training), checked first."""
        adapter_name = adapter_name or self._active_adapters[0]
        if adapter_name not in self.peft_config:
            raise ValueError(f"adapter_name={adapter_name!r}: this model has adapters {list(self.peft_config)}")
        file = read_adapter_files(model_id)
        if file.config.peft_type != self.peft_config[adapter_name].peft_type or file.legacy_oft is not None:
            raise ValueError(f"{model_id} holds a {file.config.peft_type} adapter, not one like {adapter_name!r}")
        file.tensors = to_peft_convention(self.peft_config[adapter_name], to_peft_convention(file.config, file.tensors))
        required = self._own_file_tensors(adapter_name)
        optional = self._adapter_file_tensors(adapter_name, save_embedding_layers=True)
        check_tensors(file, required, optional)
        copy_tensors(file, optional)

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | os.PathLike[str],
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: AdapterConfig | None = None,
        **kwargs: Any,
    ) -> OrthoModel:
        """Wrap ``model`` and load the adapter in ``model_id`` (see :meth:`load_adapter`).

        As in peft, the adapter layers go into ``model`` itself: a pipeline component stays what it was, so
        ``PeftModel.from_pretrained(pipe.unet, path)`` is all a diffusers pipeline needs; keep the returned
        wrapper to merge (``merge_and_unload()`` returns that same, now plain, ``pipe.unet``), unload or save.
        """
        wrapped = cls(model)
        wrapped.load_adapter(model_id, adapter_name, is_trainable=is_trainable, config=config, **kwargs)
        return wrapped


#: peft's name for the wrapper class.
PeftModel = OrthoModel


def _as_orthotune_config(config: Any) -> AdapterConfig:
    """An orthotune config, also from a peft ``OFTConfig``/``BOFTConfig`` (through its dict)."""
    if isinstance(config, AdapterConfig):
        return config
    peft_type = getattr(config, "peft_type", None)
    peft_type = getattr(peft_type, "value", peft_type)  # peft's PeftType enum
    if peft_type in ("OFT", "BOFT") and callable(getattr(config, "to_dict", None)):
        data = {
            key: sorted(value) if isinstance(value, set) else getattr(value, "value", value)  # peft's enums
            for key, value in config.to_dict().items()
        }
        return AdapterConfig.from_dict(data)
    raise TypeError(f"expected an orthotune OFTConfig or BOFTConfig, got {type(config).__name__}")


def get_peft_model(
    model: nn.Module,
    peft_config: AdapterConfig,
    adapter_name: str = "default",
    mixed: bool = False,
    autocast_adapter_dtype: bool = True,
    revision: str | None = None,
    low_cpu_mem_usage: bool = False,
) -> OrthoModel:
    """Wrap ``model`` and add the adapter ``adapter_name`` described by ``peft_config`` (peft's entry point).

    ``autocast_adapter_dtype`` and ``low_cpu_mem_usage`` are accepted for peft's sake: adapter parameters are
    always float32 and small. ``revision`` is recorded in the config.

    Example:
        >>> model = get_peft_model(model, OFTConfig(r=8, target_modules=["q_proj", "v_proj"]))  # doctest: +SKIP
        >>> model.print_trainable_parameters()  # doctest: +SKIP
    """
    if mixed:
        raise NotImplementedError("mixed=True (adapters of different methods in one model) is not supported")
    config = _as_orthotune_config(peft_config)
    if revision is not None:
        config = copy.deepcopy(config)
        config.revision = revision
    return OrthoModel(model, config, adapter_name)
