"""Putting an adapter into a model: build its layers beside the model, check them, then swap them in.

Nothing of the model changes until an adapter is known to fit: :func:`plan_adapter` builds the new layers
around the current base modules (they only reference them) and the ``modules_to_save`` copies, a loader
checks a file against the plan and copies its tensors into the plan's own, and only :func:`commit_plan` puts
the layers into the model. A layer is replaced in place, keeping the original as ``base_layer``, so state-dict
keys are peft's.
"""

from __future__ import annotations

import warnings
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from orthotune.adapter_layer import AdapterLayer
from orthotune.base_layer import LayerKind, layer_kind
from orthotune.checkpoint import layer_tensors, module_tensors
from orthotune.config import AdapterConfig
from orthotune.modules_to_save import ModulesToSaveWrapper
from orthotune.targeting import is_target_module, name_matches, resolved_config, top_level_modules

__all__ = ["AdapterPlan", "commit_plan", "new_layer", "plan_adapter"]


def new_layer(config: AdapterConfig, adapter_name: str, base: nn.Module, name: str) -> AdapterLayer:
    """A new layer of the config's method around ``base`` holding one adapter (``base`` itself is not modified)."""
    try:
        layer_class = config.layer_class(layer_kind(base))
    except (TypeError, ValueError) as error:
        raise type(error)(f"target_modules matched {name!r}, which cannot be adapted: {error}") from error
    # A layer freezes its base; a plan must leave the model untouched until it is committed (which freezes it).
    trainable = [parameter for parameter in base.parameters() if parameter.requires_grad]
    try:
        # The weight layout is detected per layer, so a single config serves Linear and GPT-2's Conv1D alike.
        return layer_class(
            base, adapter_name, fan_in_fan_out=layer_kind(base) is LayerKind.CONV1D, **config.layer_kwargs()
        )
    finally:
        for parameter in trainable:
            parameter.requires_grad_(True)


@dataclass
class AdapterPlan:
    """An adapter ready to be put into a model: built, checked and loaded beside it, nothing changed yet.

    Attributes:
        layers: module name → a new layer around the current base module, holding only this adapter.
        existing: module name → the adapter layer already there (the adapter is added to it on commit).
        copies: module name → the adapter's trainable copy of a ``modules_to_save`` module.
        wrappers: module name → a new wrapper for a module not wrapped yet.
        layer_arguments: module name → ``update_layer`` arguments of a layer whose own differ from the config's
            (a file's layers each have their own block size); by default ``config.layer_kwargs()``.
    """

    adapter_name: str
    config: AdapterConfig
    layers: dict[str, AdapterLayer] = field(default_factory=dict)
    existing: dict[str, AdapterLayer] = field(default_factory=dict)
    copies: dict[str, nn.Module] = field(default_factory=dict)
    wrappers: dict[str, ModulesToSaveWrapper] = field(default_factory=dict)
    layer_arguments: dict[str, dict[str, Any]] = field(default_factory=dict)

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        """File keys of everything the adapter owns (its rotations and module copies)."""
        tensors: dict[str, torch.Tensor] = {}
        for name, layer in self.layers.items():
            tensors.update(layer_tensors(name, layer, self.adapter_name))
        for name, module in self.copies.items():
            tensors.update(module_tensors(name, module))
        return tensors


def plan_adapter(
    model: nn.Module, adapter_name: str, config: AdapterConfig, module_names: Collection[str] | None = None
) -> AdapterPlan:
    """Build the adapter ``adapter_name`` for ``model`` beside it; the model is not changed.

    Args:
        module_names: adapt exactly the modules of these names instead of the config's targets (peft's
            ``inject_adapter_in_model(state_dict=...)``, which finds the modules from a state dict's keys).

    Raises:
        ValueError: ``target_modules`` matches no module, or a matched module cannot be adapted.
    """
    plan = AdapterPlan(adapter_name, resolved_config(model, config))
    config = plan.config
    for name, module in top_level_modules(model):
        to_save = name_matches(config.modules_to_save or [], name)
        if isinstance(module, ModulesToSaveWrapper):
            if to_save:
                plan.copies[name] = module.make_copy()
            continue
        if to_save:
            plan.wrappers[name] = ModulesToSaveWrapper(module)
            plan.copies[name] = plan.wrappers[name].make_copy()
            continue
        if not (name in module_names if module_names is not None else is_target_module(config, name)):
            continue
        if isinstance(module, AdapterLayer):
            plan.existing[name] = module
            module = module.get_base_layer()
        plan.layers[name] = new_layer(config, adapter_name, module, name)
    if not plan.layers:
        examples = [name for name, _ in model.named_modules() if name][:8]
        targets = f"target_modules={config.target_modules!r}" if module_names is None else "the state dict's modules"
        raise ValueError(
            f"{targets} matched no module of {type(model).__name__} (module "
            f"names look like {examples}); check the names, or the model the adapter was made for"
        )
    return plan


def commit_plan(model: nn.Module, plan: AdapterPlan) -> None:
    """Put a checked plan's layers and ``modules_to_save`` copies into ``model``; nothing here can fail."""
    for name, layer in plan.layers.items():
        existing = plan.existing.get(name)
        if existing is None:
            model.set_submodule(name, layer)
            continue
        with warnings.catch_warnings():  # the plan's layer has already said what it adjusted
            warnings.simplefilter("ignore")
            arguments = plan.layer_arguments.get(name) or plan.config.layer_kwargs()
            existing.update_layer(plan.adapter_name, **arguments)
        source = layer_tensors(name, layer, plan.adapter_name)
        with torch.no_grad():
            for key, tensor in layer_tensors(name, existing, plan.adapter_name).items():
                tensor.copy_(source[key])
    for name, module in plan.copies.items():
        wrapper = plan.wrappers.get(name)
        if wrapper is None:
            found = model.get_submodule(name)
            assert isinstance(found, ModulesToSaveWrapper)
            wrapper = found
        else:
            model.set_submodule(name, wrapper)
        wrapper.add_adapter(plan.adapter_name, module)
