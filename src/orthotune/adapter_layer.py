"""Bookkeeping shared by every adapted layer: adapters by name, which are active, merging and unmerging.

The math of each method lives in :mod:`orthotune.functional`; a layer class says only how its adapter turns
into a rotation and how that rotation meets the base layer (subclasses implement ``_adapted_forward``,
``_merged_weight`` and ``_unmerged_weight``).

Order of several adapters: the first active adapter sits next to the base layer. For a layer that rotates
its input, the last active adapter rotates the input first; merging the adapters one after another, in
active order, gives exactly the model that forward computes.
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from orthotune.base_layer import (
    LayerKind,
    in_out_features,
    layer_kind,
    reads_any_layout,
    rotated_features,
    weight_matrix,
    write_weight_matrix,
)
from orthotune.quantized import quantized_backend
from orthotune.rotation_cache import RotationCache

logger = logging.getLogger(__name__)


def check_init_weights(init_weights: object) -> None:
    """peft's ``init_weights`` values: ``True`` (identity) or ``False`` (random)."""
    if init_weights is not True and init_weights is not False:
        raise ValueError(f"init_weights={init_weights!r} is not supported; use True (identity) or False (random)")


def _as_name_list(names: str | Iterable[str]) -> list[str]:
    return [names] if isinstance(names, str) else list(names)


#: In ``adapter_names`` (one adapter per sample), the name that means "no adapter": the base model's output.
BASE_ADAPTER_NAME = "__base__"


def split_batch_by_adapter(adapter_names: Sequence[str], batch: int) -> list[tuple[str, torch.Tensor | None]]:
    """Group the ``batch`` rows of an input by the adapter each sample asks for.

    ``adapter_names`` holds one name per sample. An input with ``k`` rows per sample (beams or returned
    sequences in ``generate``, or ``(batch, seq)`` flattened to rows) repeats each name ``k`` times, in the
    sample-major order of ``repeat_interleave``.

    Returns:
        ``(name, rows)`` pairs in order of first appearance, ``rows`` a long tensor of row indices, or
        ``[(name, None)]`` when every row asks for the same adapter.
    """
    names = list(adapter_names)
    if not names or batch % len(names):
        raise ValueError(
            f"adapter_names has {len(names)} entries but the input has {batch} rows; pass one adapter name per "
            "sample of the batch"
        )
    if len(set(names)) == 1:
        return [(names[0], None)]
    per_sample = torch.arange(batch).view(len(names), batch // len(names))
    groups: dict[str, list[int]] = {}
    for sample, name in enumerate(names):
        groups.setdefault(name, []).append(sample)
    return [(name, per_sample[samples].reshape(-1)) for name, samples in groups.items()]


@functools.lru_cache(maxsize=64)
def _batch_plan(
    adapter_names: tuple[str, ...], batch: int, device: torch.device
) -> tuple[tuple[str, tuple[int, int] | torch.Tensor | None], ...]:
    """:func:`split_batch_by_adapter` with each group's rows as ``(start, length)`` where they are consecutive,
    else as an index tensor on ``device``; kept, since every adapted layer of a model asks for the same plan."""
    plan: list[tuple[str, tuple[int, int] | torch.Tensor | None]] = []
    for name, rows in split_batch_by_adapter(adapter_names, batch):
        if rows is not None and bool((rows.diff() == 1).all()):
            plan.append((name, (int(rows[0]), rows.numel())))
        else:
            plan.append((name, None if rows is None else rows.to(device)))
    return tuple(plan)


def forward_per_adapter(
    x: torch.Tensor, adapter_names: Sequence[str], run: Callable[[str, torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """``run(name, rows of x)`` for each group of :func:`split_batch_by_adapter`, reassembled in batch order.

    Each group reads its rows as a view where they are consecutive (else one gather), and each result is
    written once into its rows of the output.
    """
    plan = _batch_plan(tuple(adapter_names), x.shape[0], x.device)
    if plan[0][1] is None:
        return run(plan[0][0], x)
    out: torch.Tensor | None = None
    for name, rows in plan:
        consecutive = isinstance(rows, tuple)
        result = run(name, x.narrow(0, *rows) if consecutive else x.index_select(0, rows))
        if out is None:
            out = result.new_empty((x.shape[0], *result.shape[1:]))
        if consecutive:
            out.narrow(0, *rows).copy_(result)
        else:
            out.index_copy_(0, rows, result)
    assert out is not None
    return out


class ActiveAdapters:
    """peft's two views of which adapters are active, for a layer and for a whole model alike."""

    _active_adapters: list[str]

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active_adapters)

    @property
    def active_adapter(self) -> str | list[str]:
        """The active adapter's name (a list when several are active)."""
        return self._active_adapters[0] if len(self._active_adapters) == 1 else self.active_adapters


class AdapterLayer(ActiveAdapters, nn.Module):
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
        # The base layer is frozen: only the adapters train (as after peft's get_peft_model).
        base_layer.requires_grad_(False)
        self.base_layer = base_layer
        self.kind = layer_kind(base_layer)
        self.in_features, self.out_features = in_out_features(base_layer, self.kind)
        self.rotated_features = rotated_features(base_layer, self.kind)
        self._base_reads_any_layout = reads_any_layout(base_layer)
        self._active_adapters: list[str] = []
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        # For a quantized base layer, the packed weight as it was before each merge (see unmerge).
        self._storage_before_merge: list[dict[str, Any]] = []
        self._rotation_cache = RotationCache()

    # ----------------------------------------------------------------------------------------- adapters
    def get_base_layer(self) -> nn.Module:
        return self.base_layer

    @property
    def adapter_names(self) -> list[str]:
        """All adapters this layer holds, active or not."""
        return list(getattr(self, self.adapter_layer_names[0]).keys())

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
            holder = getattr(self, attribute)
            if adapter_name in holder:  # nn.ModuleDict.pop takes no default
                del holder[adapter_name]
        self._active_adapters = [name for name in self._active_adapters if name != adapter_name]
        self._rotation_cache.clear(adapter_name)
        if not self._active_adapters and self.adapter_names:
            self.set_adapter(self.adapter_names[0])

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
    def forward(
        self, x: torch.Tensor, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any
    ) -> torch.Tensor:
        """Base layer with the active adapters; ``adapter_names`` (inference only) picks one adapter per sample,
        ``"__base__"`` for none (see :func:`split_batch_by_adapter`)."""
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, adapter_names, *args, **kwargs)
        active = [name for name in self._active_adapters if name in self.adapter_names]
        if self.merged or not active:
            return self.base_layer(x, *args, **kwargs)
        return self._adapted_forward(x, active, *args, **kwargs)

    def _mixed_batch_forward(
        self, x: torch.Tensor, adapter_names: Sequence[str], *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        if self.training:
            raise RuntimeError("adapter_names (one adapter per sample) works in inference only; call model.eval()")
        if self.merged:
            raise ValueError(
                f"adapter_names cannot be used while adapters {self.merged_adapters} are merged; unmerge them first"
            )

        adapted = set(self.adapter_names)
        if self._adapters_only_rotate_input:
            # Rotate each group's rows, then run the base layer once over the whole batch.
            def rotate(name: str, rows: torch.Tensor) -> torch.Tensor:
                return self._rotated_input(rows, [name], row_major=True) if name in adapted else rows

            rotated = self._rotate_each_sample(x, adapter_names)
            if rotated is None:
                rotated = forward_per_adapter(x, adapter_names, rotate)
            return self._base_forward_on_rotated(rotated, *args, **kwargs)

        def run(name: str, rows: torch.Tensor) -> torch.Tensor:
            # "__base__", and an adapter of the model that does not adapt this layer, leave it the base layer.
            if name in adapted:
                return self._adapted_forward(rows, [name], *args, **kwargs)
            return self.base_layer(rows, *args, **kwargs)

        return forward_per_adapter(x, adapter_names, run)

    #: Whether ``_adapted_forward(x)`` is ``base_layer(_rotated_input(x))``: then a mixed batch runs the base
    #: layer once, on rows rotated each by its own adapter.
    _adapters_only_rotate_input: bool = False

    def _adapted_forward(self, x: torch.Tensor, active: list[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        raise NotImplementedError

    def _rotated_input(self, x: torch.Tensor, active: list[str], row_major: bool | None = None) -> torch.Tensor:
        raise NotImplementedError

    def _rotate_each_sample(self, x: torch.Tensor, adapter_names: Sequence[str]) -> torch.Tensor | None:
        """Each sample's rows rotated by its own adapter in one product, or ``None`` to go group by group."""
        return None

    def _cached_rotation(
        self, adapter_name: str, build: Callable[[], torch.Tensor], sources: Sequence[torch.Tensor], settings: Any = ()
    ) -> torch.Tensor:
        """``build()``, kept and reused while no gradient is wanted and neither ``sources`` (the adapter's
        tensors), ``settings`` nor the layer's train/eval mode change (see :mod:`orthotune.rotation_cache`)."""
        return self._rotation_cache.get(adapter_name, build, sources, (self.training, settings))

    def clear_rotation_cache(self) -> None:
        """Forget kept rotations; needed only after writing adapter tensors through ``.data``."""
        self._rotation_cache.clear()

    def _base_forward_on_rotated(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The base layer on rotated activations, which may be column-major (see ``rotate_activations``)."""
        if not self._base_reads_any_layout:
            x = x.contiguous()
        return self.base_layer(x, *args, **kwargs)

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
                raise ValueError(
                    f"merging adapter {name!r} gives non-finite weights; the adapter is broken, not merged"
                )
            backend = quantized_backend(self.base_layer)
            if backend is not None:
                self._storage_before_merge.append(backend.storage(self.base_layer))
            write_weight_matrix(self.base_layer, self.kind, merged)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Undo every merge, last merged first, giving back the original weight.

        A quantized base layer gets back the packed weight it had before the merge, bit for bit: undoing the
        rotation on the dequantized weight and quantizing again would round a second time.
        """
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            backend = quantized_backend(self.base_layer)
            if backend is not None and self._storage_before_merge:
                backend.restore(self.base_layer, self._storage_before_merge.pop())
                continue
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
