"""peft's free functions on adapter state dicts and bare models, as TRL, accelerate and transformers call them.

    state = get_peft_model_state_dict(model)                       # the adapter file's tensors, no adapter name
    set_peft_model_state_dict(model, state, adapter_name="other")  # back into any adapter; peft's load result
    model = inject_adapter_in_model(OFTConfig(...), model)          # layers put into the model, no wrapper

Keys are those of adapter files (peft's convention, see :mod:`orthotune.checkpoint`), relative to the model
passed: ``base_model.model.…`` for an :class:`~orthotune.OrthoModel`, the model's own module names for a model
that ``inject_adapter_in_model`` adapted (which carries its configs as ``model.peft_config``, as in peft).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.modules.module import _IncompatibleKeys

from orthotune.adapter_layer import AdapterLayer
from orthotune.checkpoint import (
    MODEL_PREFIX,
    AdaptedModel,
    adapter_file_tensors,
    layer_tensors,
    own_file_tensors,
    to_peft_convention,
)
from orthotune.config import AdapterConfig, as_orthotune_config
from orthotune.model import OrthoModel
from orthotune.modules_to_save import ModulesToSaveWrapper
from orthotune.targeting import target_module_names, top_level_modules, trained_biases

__all__ = ["get_peft_model_state_dict", "inject_adapter_in_model", "set_peft_model_state_dict"]


class _InjectedModel:
    """A model with adapter layers but no :class:`OrthoModel` around it, seen as one (for the file functions).

    The file functions key tensors ``base_model.model.<name>``; for this model the keys are ``<name>``.
    """

    def __init__(self, module: nn.Module) -> None:
        configs = module.__dict__.get("peft_config")
        if not isinstance(configs, dict) or not all(isinstance(config, AdapterConfig) for config in configs.values()):
            raise ValueError(
                f"{type(module).__name__} has no orthotune adapters to read (no peft_config of orthotune configs); "
                "pass the OrthoModel, or a model adapted with orthotune.inject_adapter_in_model"
            )
        self.module = module
        self.peft_config: dict[str, AdapterConfig] = configs

    def get_base_model(self) -> nn.Module:
        return self.module

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return self.module.state_dict(*args, **kwargs)

    def adapter_layers(self) -> Iterator[tuple[str, AdapterLayer]]:
        for name, module in top_level_modules(self.module):
            if isinstance(module, AdapterLayer):
                yield name, module

    def modules_to_save_wrappers(self) -> Iterator[tuple[str, ModulesToSaveWrapper]]:
        for name, module in top_level_modules(self.module):
            if isinstance(module, ModulesToSaveWrapper):
                yield name, module

    def trained_biases(self, bias: str, adapter_name: str) -> dict[str, torch.Tensor]:
        return trained_biases(self.module, bias, adapter_name)


def _adapted(model: nn.Module) -> tuple[AdaptedModel, str]:
    """The model as the file functions see it, and the key prefix to drop from their keys."""
    if isinstance(model, OrthoModel):
        return model, ""
    return _InjectedModel(model), MODEL_PREFIX


def _config(adapted: AdaptedModel, adapter_name: str) -> AdapterConfig:
    if adapter_name not in adapted.peft_config:
        raise ValueError(f"adapter_name={adapter_name!r}: this model has adapters {list(adapted.peft_config)}")
    return adapted.peft_config[adapter_name]


# --------------------------------------------------------------------------------------------------- reading
def get_peft_model_state_dict(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    adapter_name: str = "default",
    unwrap_compiled: bool = False,
    save_embedding_layers: bool | str = "auto",
) -> dict[str, torch.Tensor]:
    """The tensors ``save_pretrained`` would write for one adapter: keys without the adapter name, as in files.

    Args:
        model: an :class:`OrthoModel`, or a model adapted by :func:`inject_adapter_in_model` (unwrap DDP,
            DeepSpeed or FSDP first).
        state_dict: the model's state dict to take the values from (e.g. gathered by a distributed wrapper).
        adapter_name: the adapter.
        unwrap_compiled: read through ``torch.compile``'s wrapper.
        save_embedding_layers: as in ``save_pretrained``.

    Returns:
        File key → tensor, in peft's convention (detached; in exact Cayley mode ``oft_R`` is negated, as in files).
    """
    if unwrap_compiled:
        model = getattr(model, "_orig_mod", model)
    adapted, prefix = _adapted(model)
    config = _config(adapted, adapter_name)
    tensors = adapter_file_tensors(adapted, adapter_name, save_embedding_layers)
    if state_dict is not None:
        own_keys = {id(value): key for key, value in model.state_dict(keep_vars=True).items()}
        tensors = {key: state_dict.get(own_keys.get(id(value), ""), value) for key, value in tensors.items()}
    return {key.removeprefix(prefix): value.detach() for key, value in to_peft_convention(config, tensors).items()}


# --------------------------------------------------------------------------------------------------- writing
def set_peft_model_state_dict(
    model: nn.Module,
    peft_model_state_dict: Mapping[str, torch.Tensor],
    adapter_name: str = "default",
    ignore_mismatched_sizes: bool = False,
    low_cpu_mem_usage: bool = False,
) -> _IncompatibleKeys:
    """Load an adapter's tensors (as :func:`get_peft_model_state_dict` returns them) into adapter ``adapter_name``.

    File keys are mapped to the adapter's parameters; any other key is a key of the model (a bias, an embedding),
    as in peft. Shapes are checked before anything is copied. An adapter created on the meta device
    (``low_cpu_mem_usage=True``) gets real tensors for the keys given, whatever ``low_cpu_mem_usage`` says here.

    Args:
        ignore_mismatched_sizes: skip, with a warning, tensors whose shape differs from the model's, instead of
            raising.

    Returns:
        peft's (and ``torch.nn.Module.load_state_dict``'s) result: the model's ``missing_keys`` (every key not
        given, base weights included) and the ``unexpected_keys`` that fit nothing.

    Raises:
        RuntimeError: a tensor's shape differs from the model's (and ``ignore_mismatched_sizes`` is not set);
            nothing has been loaded.
    """
    adapted, prefix = _adapted(model)
    config = _config(adapted, adapter_name)
    incoming = to_peft_convention(
        config, {f"{prefix}{key.removeprefix(prefix)}": value for key, value in peft_model_state_dict.items()}
    )
    model_keys = {id(value): key for key, value in model.state_dict(keep_vars=True).items()}
    own = own_file_tensors(adapted, adapter_name)
    to_model_key = {key: model_keys[id(tensor)] for key, tensor in own.items() if id(tensor) in model_keys}
    mapped = {to_model_key.get(key, key.removeprefix(prefix)): value for key, value in incoming.items()}
    current = model.state_dict()
    mismatched = {
        key: f"{key}: {tuple(value.shape)} given, {tuple(current[key].shape)} in the model"
        for key, value in mapped.items()
        if key in current and tuple(value.shape) != tuple(current[key].shape)
    }
    if mismatched and not ignore_mismatched_sizes:
        raise RuntimeError(
            f"set_peft_model_state_dict: {len(mismatched)} tensors do not fit adapter {adapter_name!r}, e.g. "
            f"{list(mismatched.values())[:3]}; nothing was loaded (pass ignore_mismatched_sizes=True to skip them)"
        )
    if mismatched:
        warnings.warn(
            "Some weights of the adapter were not initialized from the state dict because the shapes did not "
            "match:\n" + "\n".join(f"- {line}" for line in mismatched.values()),
            stacklevel=2,
        )
        mapped = {key: value for key, value in mapped.items() if key not in mismatched}
    for name, layer in adapted.adapter_layers():
        if adapter_name in layer.adapter_names and any(
            key in incoming for key in layer_tensors(name, layer, adapter_name)
        ):
            layer.materialize_adapter(adapter_name)
    return model.load_state_dict(mapped, strict=False)


# ------------------------------------------------------------------------------------------------- injecting
def inject_adapter_in_model(
    peft_config: AdapterConfig,
    model: nn.Module,
    adapter_name: str = "default",
    low_cpu_mem_usage: bool = False,
    state_dict: Mapping[str, torch.Tensor] | None = None,
) -> nn.Module:
    """Put the adapter's layers into ``model`` in place and return ``model`` itself (no wrapper), as peft does.

    The model gets ``model.peft_config`` (adapter name → config). The first adapter freezes the rest of the
    model; the injected adapter is the active one; parameters already there keep their ``requires_grad``.

    Args:
        peft_config: the adapter's config.
        model: the model to adapt.
        adapter_name: the adapter's name.
        low_cpu_mem_usage: create the adapter on the meta device, for :func:`set_peft_model_state_dict` to fill.
        state_dict: adapt the modules this state dict has adapter tensors for (its values are not used), rather
            than the config's ``target_modules``; a difference between the two is reported with a warning.
    """
    config = as_orthotune_config(peft_config)
    if isinstance(model, OrthoModel):
        raise TypeError("the model is an OrthoModel; add the adapter with model.add_adapter(name, config)")
    existing = model.__dict__.get("peft_config")
    before = {parameter: parameter.requires_grad for parameter in model.parameters()} if existing else {}
    if existing:
        warnings.warn(
            "Already found a `peft_config` attribute in the model. This will lead to having multiple adapters in the "
            "model. Make sure to know what you are doing!",
            stacklevel=2,
        )
    module_names = None if state_dict is None else _module_names(state_dict, config, model)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="the model already holds orthotune adapter layers")
        wrapper = OrthoModel(model)
    if existing:
        wrapper.peft_config = _InjectedModel(model).peft_config
    wrapper.add_adapter(adapter_name, config, low_cpu_mem_usage=low_cpu_mem_usage, module_names=module_names)
    wrapper.set_adapter(adapter_name)
    for parameter, requires_grad in before.items():
        parameter.requires_grad_(requires_grad)
    model.peft_config = wrapper.peft_config  # type: ignore[assignment]  # peft's attribute of an adapted model
    return model


def _module_names(state_dict: Mapping[str, torch.Tensor], config: AdapterConfig, model: nn.Module) -> set[str]:
    """peft's reading of a state dict: a key ``<module>.<prefix>…`` names the module ``<module>``."""
    names = {key.rsplit(f".{config.prefix}", 1)[0].removeprefix("_orig_mod.") for key in state_dict}
    configured = set(target_module_names(model, config))
    present = {name for name, _ in model.named_modules()}
    from_state_dict, from_config = (names & present) - configured, configured - names
    if from_state_dict or from_config:
        warnings.warn(
            "While injecting the PEFT adapters, an inconsistency was discovered between the PEFT config and the "
            "provided state_dict. This is not necessarily an issue and can be ignored if this was the intent. "
            + (
                f"The PEFT config contained these additional target modules: {sorted(from_config)}. "
                if from_config
                else ""
            )
            + (
                f"The state_dict contained these additional target modules: {sorted(from_state_dict)}. "
                if from_state_dict
                else ""
            ),
            RuntimeWarning,
            stacklevel=3,
        )
    return names
