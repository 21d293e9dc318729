"""Bookkeeping shared by every adapted layer: adapters by name, which are active, merging and unmerging.

The math of each method lives in :mod:`orthotune.functional`; a layer class says only how its adapter turns
into a rotation and how that rotation meets the base layer (subclasses implement ``_adapted_forward``,
``_merged_weight`` and ``_unmerged_weight``).

Order of several adapters: the first active adapter sits next to the base layer. For a layer that rotates
its input, the last active adapter rotates the input first; merging the adapters one after another, in
active order, gives exactly the model that forward computes.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from orthotune.base_layer import LayerKind, in_out_features, layer_kind, rotated_features, weight_matrix, write_weight_matrix

logger = logging.getLogger(__name__)


def _as_name_list(names: str | Iterable[str]) -> list[str]:
    return [names] if isinstance(names, str) else list(names)


class AdapterLayer(nn.Module):
    """A base layer with named orthogonal adapters.

    Attributes:
        base_layer: the wrapped, frozen module.
        in_features, out_features: as peft reports them (channels for Conv2d, ``(dim, num)`` for embeddings).
        merged_adapters: names merged into the base weight, in merge order.
    """

    #: Names of the ``nn.ModuleDict`` / ``nn.ParameterDict`` attributes that hold per-adapter parameters.
    adapter_layer_names: tuple[str, ...] = ()
    #: Names of the plain dicts that hold per-adapter settings.
    other_param_names: tuple[str, ...] = ()

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.kind = layer_kind(base_layer)
        self.in_features, self.out_features = in_out_features(base_layer, self.kind)
        self.rotated_features = rotated_features(base_layer, self.kind)
        self._active_adapters: list[str] = []
        self._disable_adapters = False
        self.merged_adapters: list[str] = []

    # ----------------------------------------------------------------------------------------- adapters
    def get_base_layer(self) -> nn.Module:
        return self.base_layer

    @property
    def adapter_names(self) -> list[str]:
        """All adapters this layer holds, active or not."""
        return list(getattr(self, self.adapter_layer_names[0]).keys())

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active_adapters)

    @property
    def active_adapter(self) -> str | list[str]:
        return self._active_adapters[0] if len(self._active_adapters) == 1 else self.active_adapters

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    @property
    def disable_adapters(self) -> bool:
        return self._disable_adapters

    def enable_adapters(self, enabled: bool) -> None:
        """Turn all adapters on or off (off unmerges first, so the base layer is exactly the original)."""
        if not enabled and self.merged:
            self.unmerge()
        self._disable_adapters = not enabled
        self._set_requires_grad(self._active_adapters if enabled else [])

    def set_adapter(self, adapter_names: str | Iterable[str], inference_mode: bool = False) -> None:
        """Make ``adapter_names`` the active adapters; only they train (unless ``inference_mode``)."""
        names = _as_name_list(adapter_names)
        unknown = [name for name in names if name not in self.adapter_names]
        if unknown:
            raise ValueError(f"adapter_names={unknown} not found in this layer; it holds {self.adapter_names}")
        self._active_adapters = names
        self._set_requires_grad([] if inference_mode else names)

    def _set_requires_grad(self, trainable: list[str]) -> None:
        for attribute in self.adapter_layer_names:
            for name, holder in getattr(self, attribute).items():
                parameters = [holder] if isinstance(holder, nn.Parameter) else holder.parameters()
                for parameter in parameters:
                    parameter.requires_grad_(name in trainable)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter and its settings; it must not be merged."""
        if adapter_name not in self.adapter_names:
            raise ValueError(f"adapter_name={adapter_name!r} not found in this layer; it holds {self.adapter_names}")
        if adapter_name in self.merged_adapters:
            raise ValueError(f"adapter {adapter_name!r} is merged; call unmerge() before deleting it")
        for attribute in self.adapter_layer_names + self.other_param_names:
            getattr(self, attribute).pop(adapter_name, None)
        self._forget_adapter(adapter_name)
        self._active_adapters = [name for name in self._active_adapters if name != adapter_name]
        if not self._active_adapters and self.adapter_names:
            self.set_adapter(self.adapter_names[0])

    def _forget_adapter(self, adapter_name: str) -> None:
        """Subclass hook: drop per-adapter state outside ``adapter_layer_names`` and ``other_param_names``."""

    def _register_new_adapter(self, adapter_name: str, inference_mode: bool) -> None:
        """Activate a freshly created adapter the way peft does (the first one becomes active)."""
        if not self._active_adapters:
            self._active_adapters = [adapter_name]
        self.set_adapter(self._active_adapters, inference_mode=inference_mode)

    def _adapter_device(self) -> torch.device | None:
        for tensor in self.base_layer.parameters():
            return tensor.device
        return None

    # ------------------------------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        active = [name for name in self._active_adapters if name in self.adapter_names]
        if self.merged or not active:
            return self.base_layer(x, *args, **kwargs)
        return self._adapted_forward(x, active, *args, **kwargs)

    def _adapted_forward(self, x: torch.Tensor, active: list[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        raise NotImplementedError

    # -------------------------------------------------------------------------------------------- merge
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Merge adapters into the base weight, in order (default: the active adapters).

        Args:
            safe_merge: compute each merged weight on a copy and refuse to write it if it is not finite.
            adapter_names: adapters to merge; already merged ones are skipped with a warning.
        """
        names = self.active_adapters if adapter_names is None else _as_name_list(adapter_names)
        unknown = [name for name in names if name not in self.adapter_names]
        if unknown:
            raise ValueError(f"adapter_names={unknown} not found in this layer; it holds {self.adapter_names}")
        already = [name for name in names if name in self.merged_adapters]
        if already:
            warnings.warn(f"adapters {already} are already merged; merging the others only", stacklevel=2)
        for name in names:
            if name in self.merged_adapters:
                continue
            original = weight_matrix(self.base_layer, self.kind)
            with torch.no_grad():
                merged = self._merged_weight(original.float(), name)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"merging adapter {name!r} gives non-finite weights; the adapter is broken, not merged")
            write_weight_matrix(self.base_layer, self.kind, merged)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Undo every merge, last merged first, giving back the original weight."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            with torch.no_grad():
                restored = self._unmerged_weight(weight_matrix(self.base_layer, self.kind).float(), name)
            write_weight_matrix(self.base_layer, self.kind, restored)

    def _merged_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        raise NotImplementedError

    def _unmerged_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        raise NotImplementedError

    @property
    def rotates_output(self) -> bool:
        """An embedding rotates what it outputs; every other kind rotates what it reads."""
        return self.kind is LayerKind.EMBEDDING
