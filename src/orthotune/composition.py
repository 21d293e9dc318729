"""Composing adapters: one adapter equal to several applied together, each at a strength.

The product of block-diagonal rotations with the same blocks is block-diagonal, and its generator is the inverse
Cayley transform of the product (:mod:`orthotune.functional.compose`); each layer computes its part
(``composed_parameters``), and this module checks, plans and adds the new adapter as any other.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from orthotune.config import AdapterConfig, OFTConfig
from orthotune.injection import plan_adapter
from orthotune.modules_to_save import ModulesToSaveWrapper

if TYPE_CHECKING:
    from orthotune.model import OrthoModel

__all__ = ["add_weighted_adapter", "composed_config"]


def add_weighted_adapter(
    model: OrthoModel, adapters: Sequence[str], weights: Sequence[float], adapter_name: str
) -> None:
    """:meth:`orthotune.OrthoModel.add_weighted_adapter` (see there)."""
    adapters, weights = list(adapters), list(weights)
    unknown = [name for name in adapters if name not in model.peft_config]
    if not adapters or unknown:
        raise ValueError(f"adapters={adapters!r}: list some of this model's adapters {list(model.peft_config)}")
    if len(weights) != len(adapters):
        raise ValueError(f"weights has {len(weights)} entries for {len(adapters)} adapters; pass one weight each")
    bad = [w for w in weights if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w)]
    if bad:
        raise ValueError(f"weights={weights!r}: {bad[0]!r} is not a finite number; pass e.g. [1.0, 0.5]")
    for module_name, saved in model.modules_to_save_wrappers():
        owners = [name for name in adapters if name in saved.modules_to_save]
        if len(owners) > 1:  # set_adapter(adapters) refuses these too (peft's rule): there is no model to equal
            raise ValueError(
                f"add_weighted_adapter: adapters {owners} each have their own trained copy of the modules_to_save "
                f"module {module_name!r}, and only one copy can be used; compose adapters of which at most one "
                "has modules_to_save"
            )
    config = composed_config(model, adapters)
    model.check_new_adapter(adapter_name, config)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for name, layer in model.adapter_layers():
        present = [
            (source, weight) for source, weight in zip(adapters, weights, strict=True) if source in layer.adapter_names
        ]
        if not present:
            continue
        strengths = [float(weight) * layer.strength(source) for source, weight in present]
        try:
            with torch.no_grad():
                parts[name] = layer.composed_parameters([source for source, _ in present], strengths)
        except ValueError as error:
            raise ValueError(f"add_weighted_adapter: layer {name!r}: {error}") from error
    plan = plan_adapter(model.get_base_model(), adapter_name, config)
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
            wrapper = model.get_base_model().get_submodule(name)
            source = next((a for a in adapters if a in getattr(wrapper, "modules_to_save", {})), None)
            if isinstance(wrapper, ModulesToSaveWrapper) and source is not None:
                copied.load_state_dict(wrapper.modules_to_save[source].state_dict())
    model.add_planned_adapter(plan)


def composed_config(model: OrthoModel, adapters: list[str]) -> AdapterConfig:
    """The config of a composition of ``adapters``: the first one's, with what composing changes."""
    configs = [model.peft_config[name] for name in adapters]
    first = configs[0]
    changes: dict[str, Any] = {"init_weights": True}
    targeting = ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern")
    if any(getattr(config, field_name) != getattr(first, field_name) for config in configs for field_name in targeting):
        adapted = [name for name, layer in model.adapter_layers() if set(adapters) & set(layer.adapter_names)]
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
