"""Modules trained in full next to the adapters (``modules_to_save``), such as a new classifier head.

Each adapter gets its own trainable copy of the module; the original stays untouched, for the base model and
for adapters without a copy. The attribute names are peft's, so state-dict keys are peft's too:
``classifier.original_module.weight`` and ``classifier.modules_to_save.<adapter>.weight``.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from orthotune.adapter_layer import forward_per_adapter


class ModulesToSaveWrapper(nn.Module):
    """``original_module`` plus one trainable copy per adapter in ``modules_to_save``.

    Forward runs the copy of the active adapter, or the original when adapters are disabled or the active
    adapter has no copy. With ``adapter_names`` (inference only) each sample runs the copy of its adapter.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disable_adapters = False

    def make_copy(self) -> nn.Module:
        """A trainable copy of the original module (not yet added)."""
        copied = copy.deepcopy(self.original_module)
        copied.requires_grad_(True)
        return copied

    def add_adapter(self, adapter_name: str, module: nn.Module | None = None) -> None:
        self.modules_to_save[adapter_name] = self.make_copy() if module is None else module
        if self.active_adapter is None:
            self.active_adapter = adapter_name

    def set_adapter(self, adapter_names: Sequence[str], inference_mode: bool = False) -> None:
        """Activate the copy of the one of ``adapter_names`` that has one; only it trains.

        Two of them with a copy each are refused, as in peft: only one copy can be used.
        """
        holders = [name for name in adapter_names if name in self.modules_to_save]
        if len(holders) > 1:
            raise ValueError(f"Only one adapter can be set at a time for this modules_to_save module, got {holders}")
        self.active_adapter = holders[0] if holders else None
        for name, module in self.modules_to_save.items():
            module.requires_grad_(name == self.active_adapter and not inference_mode)

    def set_requires_grad(self, adapter_names: Sequence[str], requires_grad: bool = True) -> None:
        """Turn gradients of the named adapters' copies on or off, leaving the others as they are."""
        for name, module in self.modules_to_save.items():
            if name in adapter_names:
                module.requires_grad_(requires_grad)

    def enable_adapters(self, enabled: bool) -> None:
        """Use the active copy (``True``) or the original module (``False``, every copy frozen)."""
        self.disable_adapters = not enabled
        if not enabled:
            for module in self.modules_to_save.values():
                module.requires_grad_(False)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.modules_to_save:  # nn.ModuleDict.pop takes no default
            del self.modules_to_save[adapter_name]
        if self.active_adapter == adapter_name:
            self.active_adapter = None

    def module_for(self, adapter_name: str | None) -> nn.Module:
        if adapter_name is None or adapter_name not in self.modules_to_save:
            return self.original_module
        return self.modules_to_save[adapter_name]

    @property
    def active_module(self) -> nn.Module:
        return self.original_module if self.disable_adapters else self.module_for(self.active_adapter)

    def __getattr__(self, name: str) -> Any:
        # Models read attributes of their heads (``classifier.weight.dtype``): answer for the module in use.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_") or name in (
                "original_module",
                "modules_to_save",
                "active_adapter",
                "disable_adapters",
            ):
                raise
            return getattr(self.active_module, name)

    def forward(self, x: Any, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
        if adapter_names is None or self.disable_adapters:
            return self.active_module(x, *args, **kwargs)
        if self.training:
            raise RuntimeError("adapter_names (one adapter per sample) works in inference only; call model.eval()")
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"adapter_names needs a tensor input whose first dimension is the batch, got {type(x)}")
        return forward_per_adapter(x, adapter_names, lambda name, rows: self.module_for(name)(rows, *args, **kwargs))
