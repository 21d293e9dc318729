"""peft's tuner object (``PeftModel.base_model``): the adapted model, its adapters' configs and active set, and
everything done to all adapter layers at once.

    OrthoModel                    peft's PeftModel: adding and loading adapters, files, forward
      └─ base_model: OrthoTuner   peft's BaseTuner: peft_config, active adapters, set_adapter, trainability,
           └─ model               enabling, merging, unloading, deleting; walks the adapter layers
                                  the user's model, each target replaced by an adapter layer in place

The configs and the active set live here, as in peft, so that ``model.peft_config``,
``model.base_model.peft_config`` and the layers always agree; :class:`~orthotune.model.OrthoModel` reads them
from here. The attribute name ``model`` keeps the state-dict keys peft's (``base_model.model.…``).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import torch
from torch import nn

from orthotune.adapter_layer import BASE_ADAPTER_NAME, ActiveAdapters, AdapterLayer
from orthotune.config import AdapterConfig
from orthotune.modules_to_save import ModulesToSaveWrapper
from orthotune.targeting import top_level_modules, trained_biases

__all__ = ["OrthoTuner"]


class ForwardsAttributes(nn.Module):
    """Attributes this module lacks are read from the module it wraps (named by ``_inner``)."""

    _inner: str

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == self._inner:
                raise
            return getattr(getattr(self, self._inner), name)


class OrthoTuner(ActiveAdapters, ForwardsAttributes):
    """Holds the adapted model as ``model`` and offers peft's ``BaseTuner`` methods on it.

    Attributes:
        model: the adapted model (its layers replaced in place).
        peft_config: adapter name → config, in the order the adapters were added.
    """

    _inner = "model"

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.peft_config: dict[str, AdapterConfig] = {}
        self._active_adapters: list[str] = []

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    # ------------------------------------------------------------------------------------------ what is here
    @property
    def prefix(self) -> str:
        """peft's prefix of the adapters' parameter names (``"oft_"``, ``"boft_"``; ``""`` without adapters)."""
        return next((config.prefix for config in self.peft_config.values()), "")

    @property
    def targeted_module_names(self) -> list[str]:
        """Names (in ``model``) of the modules an adapter adapts."""
        return [name for name, _ in self.adapter_layers()]

    def adapter_layers(self) -> Iterator[tuple[str, AdapterLayer]]:
        """The adapted layers by module name (in ``model``)."""
        for name, module in top_level_modules(self.model):
            if isinstance(module, AdapterLayer):
                yield name, module

    def modules_to_save_wrappers(self) -> Iterator[tuple[str, ModulesToSaveWrapper]]:
        """The ``modules_to_save`` wrappers by module name (in ``model``)."""
        for name, module in top_level_modules(self.model):
            if isinstance(module, ModulesToSaveWrapper):
                yield name, module

    def trained_biases(self, bias: str, adapter_name: str) -> dict[str, torch.Tensor]:
        """Model names of the biases that train (and are saved) with ``bias="all"`` or ``"<method>_only"``."""
        return trained_biases(self.model, bias, adapter_name)

    @contextlib.contextmanager
    def per_sample_adapters(self, adapter_names: Sequence[str] | None) -> Iterator[None]:
        """Pass ``adapter_names`` (one adapter per sample, ``"__base__"`` for none) to every adapter layer and
        wrapper for the duration of one call (``OrthoModel.forward(..., adapter_names=...)``)."""
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
        if self.model.training:
            raise RuntimeError("adapter_names (one adapter per sample) works in inference only; call model.eval()")
        merged = sorted({name for _, layer in self.adapter_layers() for name in layer.merged_adapters})
        if merged:
            raise ValueError(f"adapter_names cannot be used while adapters {merged} are merged; call unmerge_adapter()")

        def pass_names(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            return args, {**kwargs, "adapter_names": adapter_names}

        handles = [
            module.register_forward_pre_hook(pass_names, with_kwargs=True)
            for _, module in top_level_modules(self.model)
            if isinstance(module, (AdapterLayer, ModulesToSaveWrapper))
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    # ---------------------------------------------------------------------------------------- activating
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
        self._check_one_copy_each(names)
        self._active_adapters = names
        self.apply_active_adapters(inference_mode)

    def _check_one_copy_each(self, names: list[str]) -> None:
        """Refuse active adapters that each have their own copy of one ``modules_to_save`` module (peft too)."""
        for module_name, wrapper in self.modules_to_save_wrappers():
            holders = [name for name in names if name in wrapper.modules_to_save]
            if len(holders) > 1:
                raise ValueError(
                    f"Only one adapter can be set at a time for the modules_to_save module {module_name!r}: adapters "
                    f"{holders} each have their own trained copy of it and only one copy can be used; activate one "
                    "of them, or give modules_to_save to only one of them"
                )

    def apply_active_adapters(self, inference_mode: bool | None = None) -> None:
        """Activate the active set in every layer and wrapper; set which adapter parameters and biases train."""
        active = self._active_adapters
        if inference_mode is None:
            inference_mode = all(self.peft_config[name].inference_mode for name in active)
        for _, layer in self.adapter_layers():
            layer.set_adapter(active, inference_mode=inference_mode)  # each layer skips names it does not hold
        for _, wrapper in self.modules_to_save_wrappers():
            wrapper.set_adapter(active, inference_mode=inference_mode)
        if inference_mode:
            return
        for name in active:
            for bias in self.trained_biases(self.peft_config[name].bias, name).values():
                bias.requires_grad_(True)

    def set_requires_grad(self, adapter_names: str | Sequence[str], requires_grad: bool = True) -> None:
        """Turn gradients of the named adapters (their layers and ``modules_to_save`` copies) on or off.

        Other adapters keep their state, active or not: after ``set_requires_grad("other")`` both the active
        adapter and ``"other"`` train, as in peft.
        """
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        unknown = [name for name in names if name not in self.peft_config]
        if unknown:
            raise ValueError(f"adapter_names={unknown}: this model has adapters {list(self.peft_config)}")
        for _, layer in self.adapter_layers():
            layer.set_requires_grad(names, requires_grad)
        for _, wrapper in self.modules_to_save_wrappers():
            wrapper.set_requires_grad(names, requires_grad)

    # ------------------------------------------------------------------------------------- enabling
    def disable_adapter_layers(self) -> None:
        """Turn every adapter off: the model computes as the base model (merged adapters are unmerged first)."""
        for name in self._active_adapters:
            bias = self.peft_config[name].bias
            if bias != "none":
                warnings.warn(
                    f"Careful, disabling adapter layers with bias configured to be {bias!r} does not produce the "
                    "same output as the base model would without adaption (the trained biases stay in the model)",
                    stacklevel=2,
                )
        self._enable_layers(False)

    def enable_adapter_layers(self) -> None:
        """Turn the adapters on again; the active ones train as their configs say (unlike peft, an adapter
        loaded for inference stays frozen)."""
        self._enable_layers(True)
        if self._active_adapters:
            self.apply_active_adapters()

    def _enable_layers(self, enabled: bool) -> None:
        for _, layer in self.adapter_layers():
            layer.enable_adapters(enabled)
        for _, wrapper in self.modules_to_save_wrappers():
            wrapper.enable_adapters(enabled)

    def layers_enabled(self) -> bool | Literal["irregular"]:
        """Whether the adapter layers are on: ``True``, ``False``, or ``"irregular"`` when some are (peft's status)."""
        states = {not layer.disable_adapters for _, layer in self.adapter_layers()}
        states |= {not wrapper.disable_adapters for _, wrapper in self.modules_to_save_wrappers()}
        if len(states) > 1:
            return "irregular"
        return states.pop() if states else True

    # ------------------------------------------------------------------------------------------ merging
    def merge_adapter(self, adapter_names: Sequence[str] | None = None, safe_merge: bool = False) -> None:
        """Merge adapters into the base weights (default: the active ones, in order)."""
        self.merge_layers(adapter_names, safe_merge)

    def merge_layers(
        self,
        adapter_names: Sequence[str] | None,
        safe_merge: bool,
        around: Callable[[AdapterLayer], contextlib.AbstractContextManager[Any]] | None = None,
    ) -> None:
        """:meth:`merge_adapter` layer by layer, each inside ``around(layer)``: the hook for distributed wrappers,
        which gather a layer's parameters there (see :mod:`orthotune.integrations.distributed`)."""
        around = around or (lambda layer: contextlib.nullcontext())
        names = None if adapter_names is None else list(adapter_names)
        unknown = [name for name in names or [] if name not in self.peft_config]
        if unknown:
            raise ValueError(f"adapter_names={unknown}: this model has adapters {list(self.peft_config)}")
        to_merge = []
        for name, layer in self.adapter_layers():
            wanted = [a for a in (layer.active_adapters if names is None else names) if a in layer.adapter_names]
            if wanted:
                to_merge.append((name, layer, wanted))
        self._check_untied([(name, layer) for name, layer, _ in to_merge])
        for _, layer, wanted in to_merge:
            with around(layer):
                layer.merge(safe_merge=safe_merge, adapter_names=wanted)

    def _check_untied(self, layers: list[tuple[str, AdapterLayer]]) -> None:
        """Refuse to merge into a weight that another module shares (tied input and output embeddings)."""
        users: dict[int, list[str]] = {}
        for name, parameter in self.model.named_parameters(remove_duplicate=False):
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
        for _, layer in self.adapter_layers():
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
        for name, module in list(top_level_modules(self.model)):
            if isinstance(module, AdapterLayer):
                self.model.set_submodule(name, module.get_base_layer())
            elif isinstance(module, ModulesToSaveWrapper):
                self.model.set_submodule(name, module.active_module if keep_trained_copies else module.original_module)
        self.peft_config.clear()
        self._active_adapters = []
        return self.model

    # ----------------------------------------------------------------------------------------- deleting
    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter everywhere; it must not be merged."""
        if adapter_name not in self.peft_config:
            raise ValueError(f"adapter_name={adapter_name!r}: this model has adapters {list(self.peft_config)}")
        merged = [name for name, layer in self.adapter_layers() if adapter_name in layer.merged_adapters]
        if merged:
            raise ValueError(f"adapter {adapter_name!r} is merged into {merged[:3]}; call unmerge_adapter() first")
        for _, layer in self.adapter_layers():
            if adapter_name in layer.adapter_names:
                layer.delete_adapter(adapter_name)
        for _, wrapper in self.modules_to_save_wrappers():
            wrapper.delete_adapter(adapter_name)
        del self.peft_config[adapter_name]
        remaining = [name for name in self._active_adapters if name != adapter_name]
        self._active_adapters = remaining or list(self.peft_config)[:1]
        self.apply_active_adapters()
