"""The method contract: a base layer with named adapters, and the bookkeeping every method shares.

A method (OFT, BOFT, …) is a subclass of :class:`AdapterLayer` that implements five things and nothing else:

- ``_create_adapter_holders()``: the ``nn.ModuleDict``/``nn.ParameterDict``/dict attributes named in
  ``adapter_layer_names`` and ``other_param_names``;
- ``update_layer(adapter_name, **arguments)``: create (or replace) one adapter; the method's signature and
  defaults are stated there once, and the layer constructors forward to it;
- ``_adapted_forward(x, active)``: the base layer with the active adapters applied;
- ``_merged_weight(W, name)`` / ``_unmerged_weight(W, name)``: the ``(out, d)`` weight matrix (see
  :func:`orthotune.base_layer.weight_matrix`) with one adapter merged in, and back;
- ``adapter_tensors(name)``: the adapter's tensors by their key under the module in peft's files.

The math of each method lives in :mod:`orthotune.functional`; everything else (names, active set, merging
in order, quantized bases, mixed batches, freezing) is here.

Order of several adapters: the first active adapter sits next to the base layer. For a layer that rotates
its input, the last active adapter rotates the input first; merging the adapters one after another, in
active order, gives exactly the model that forward computes.

Strength: each adapter has a strength ``t`` (``scaling[name]``, 1.0 by default), set with peft LoRA's
:meth:`AdapterLayer.set_scale`, :meth:`~AdapterLayer.scale_layer` and :meth:`~AdapterLayer.unscale_layer`. The
layer applies the rotation ``R(t·Q)`` (see :mod:`orthotune.functional.strength`): still a rotation, the base
layer at 0, the trained adapter at 1, its inverse at -1. A merged adapter keeps the strength it was merged
with until it is unmerged, so that unmerge restores the weight exactly.
"""

from __future__ import annotations

import functools
import inspect
import math
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
from orthotune.integrations.quantized import quantized_backend
from orthotune.rotation_cache import RotationCache


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
        if isinstance(rows, tuple):
            start, length = rows
            result = run(name, x.narrow(0, start, length))
        else:
            assert rows is not None  # a single-group plan returned above
            result = run(name, x.index_select(0, rows))
        if out is None:
            out = result.new_empty((x.shape[0], *result.shape[1:]))
        if isinstance(rows, tuple):
            out.narrow(0, start, length).copy_(result)
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
    #: The order of the constructor's arguments after ``adapter_name`` (peft's, which may differ from
    #: ``update_layer``'s); their defaults are ``update_layer``'s and :meth:`__init__`'s, stated only there.
    constructor_arguments: tuple[str, ...] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # Concrete layers (those with a forward) get peft's constructor; OFTLayer(base) wraps without an adapter.
        concrete = cls._adapted_forward is not AdapterLayer._adapted_forward
        if concrete and cls.constructor_arguments and "__init__" not in cls.__dict__:
            cls.__init__ = _constructor_with_signature(cls)  # type: ignore[method-assign]

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str | None = None,
        *,
        fan_in_fan_out: bool = False,
        is_target_conv_1d_layer: bool = False,
        **kwargs: Any,
    ) -> None:
        """Wrap ``base_layer`` (frozen) and, given ``adapter_name``, add that adapter.

        Args:
            base_layer: the layer to adapt.
            adapter_name: the first adapter's name; ``None`` wraps without adapters (peft's ``OFTLayer(base)``).
            fan_in_fan_out: peft's flag for a weight stored ``(in, out)``; the layout is detected, and a wrong
                flag is corrected with a warning.
            is_target_conv_1d_layer: kept for peft.
            kwargs: the method's ``update_layer`` arguments (see there for their meaning and defaults); any
                other keyword is kept in ``self.kwargs``, as peft does.
        """
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
        #: Strength of each adapter (peft LoRA's attribute name; here a pure multiplier, 1.0 unless set).
        self.scaling: dict[str, float] = {}
        # Adapters whose file tensors are on the meta device (created with low_cpu_mem_usage=True, not loaded yet).
        self._meta_adapters: set[str] = set()
        # For a quantized base layer, the packed weight as it was before each merge (see unmerge).
        self._storage_before_merge: list[dict[str, Any]] = []
        self._rotation_cache = RotationCache()
        self.fan_in_fan_out = _checked_fan_in_fan_out(self.kind, fan_in_fan_out)
        self.is_target_conv_1d_layer = is_target_conv_1d_layer
        self._create_adapter_holders()
        accepted = inspect.signature(self.update_layer).parameters
        self.kwargs = {key: value for key, value in kwargs.items() if key not in accepted}
        if adapter_name is not None:
            self.update_layer(adapter_name, **{key: value for key, value in kwargs.items() if key in accepted})

    # ------------------------------------------------------------------------------------- the contract
    def _create_adapter_holders(self) -> None:
        """Create the (empty) attributes named in ``adapter_layer_names`` and ``other_param_names``."""
        raise NotImplementedError

    def update_layer(self, adapter_name: str, **kwargs: Any) -> None:
        """Create (or replace) the adapter ``adapter_name``; each method states its arguments here."""
        raise NotImplementedError

    def adapter_tensors(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """The adapter's tensors by their key under this module in peft's files (e.g. ``"oft_R.weight"``)."""
        raise NotImplementedError

    def _adapted_forward(self, x: torch.Tensor, active: list[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        raise NotImplementedError

    def _merged_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """The fp32 ``(out, d)`` weight matrix with the adapter merged into it."""
        raise NotImplementedError

    def composed_parameters(self, adapter_names: list[str], strengths: list[float]) -> dict[str, torch.Tensor]:
        """The parameters (by ``adapter_layer_names`` attribute) of one adapter equal to ``adapter_names`` active
        together at ``strengths`` (see :mod:`orthotune.composition`); a ``ValueError`` where no such adapter exists."""
        raise ValueError(f"{type(self).__name__} adapters cannot be composed into one adapter of the same method")

    def _unmerged_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """The exact inverse of :meth:`_merged_weight`."""
        raise NotImplementedError

    def merged_weight_matrix(self, adapter_names: Sequence[str] | None = None) -> torch.Tensor:
        """The fp32 ``(out, d)`` weight matrix with ``adapter_names`` (default: the active ones) merged in order,
        computed without writing anything (for export and inspection)."""
        names = self._held_active_adapters() if adapter_names is None else _as_name_list(adapter_names)
        self._check_known(names)
        self._check_materialized(names)
        with torch.no_grad():
            weight = weight_matrix(self.base_layer, self.kind).float()
            for name in names:
                weight = self._merged_weight(weight, name)
        return weight

    def _check_known(self, names: list[str]) -> None:
        unknown = [name for name in names if name not in self.adapter_names]
        if unknown:
            raise ValueError(f"adapter_names={unknown} not found in this layer; it holds {self.adapter_names}")

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
        """Make ``adapter_names`` the active adapters; only they train (unless ``inference_mode``).

        Names this layer does not hold are kept and skipped, as in peft: a model's adapters may adapt different
        layers, and the model activates the same names in all of them.
        """
        names = _as_name_list(adapter_names)
        self._active_adapters = names
        self._set_requires_grad([] if inference_mode else names)

    def _held_active_adapters(self) -> list[str]:
        return [name for name in self._active_adapters if name in self.adapter_names]

    def set_requires_grad(self, adapter_names: str | Iterable[str], requires_grad: bool = True) -> None:
        """Turn gradients of the named adapters on or off, leaving the others as they are (peft's method)."""
        names = set(_as_name_list(adapter_names))
        for attribute in self.adapter_layer_names:
            for name, holder in getattr(self, attribute).items():
                if name in names:
                    parameters = [holder] if isinstance(holder, nn.Parameter) else holder.parameters()
                    for parameter in parameters:
                        parameter.requires_grad_(requires_grad)

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
        self.scaling.pop(adapter_name, None)
        self._meta_adapters.discard(adapter_name)
        self._active_adapters = [name for name in self._active_adapters if name != adapter_name]
        self._rotation_cache.clear(adapter_name)
        if not self._active_adapters and self.adapter_names:
            self.set_adapter(self.adapter_names[0])

    def _register_new_adapter(self, adapter_name: str, inference_mode: bool) -> None:
        """Activate a freshly created adapter the way peft does (the first one becomes active)."""
        self.scaling[adapter_name] = 1.0
        if not self._active_adapters:
            self._active_adapters = [adapter_name]
        self.set_adapter(self._active_adapters, inference_mode=inference_mode)

    def adapter_parameter(self, attribute: str, adapter_name: str) -> nn.Parameter:
        """The parameter that ``attribute`` (one of :attr:`adapter_layer_names`) holds for ``adapter_name``."""
        holder = getattr(self, attribute)[adapter_name]
        return holder if isinstance(holder, nn.Parameter) else holder.weight

    def _adapter_device(self) -> torch.device | None:
        for tensor in self.base_layer.parameters():
            return tensor.device
        return None

    # ----------------------------------------------------------------------------------------- strength
    def strength(self, adapter_name: str) -> float:
        """The strength ``t`` the adapter is applied at: its rotation is ``R(t·Q)`` (1.0 unless set)."""
        return self.scaling.get(adapter_name, 1.0)

    def set_scale(self, adapter: str, scale: float) -> None:
        """Set the strength of ``adapter`` to ``scale`` (peft LoRA's name; an adapter this layer lacks is ignored).

        ``scale`` is the strength itself, not a multiple of a trained value: 0 gives the base layer, 1 the
        trained adapter, -1 its inverse rotation, 2 twice as far along the Cayley curve ``t ↦ R(t·Q)``.
        """
        if adapter in self.adapter_names:
            self._set_strength(adapter, scale)

    def scale_layer(self, scale: float) -> None:
        """Multiply the strength of every active adapter by ``scale`` (peft LoRA's semantics)."""
        if scale == 1:
            return
        for name in self._active_adapters:
            if name in self.adapter_names:
                self._set_strength(name, self.strength(name) * scale)

    def unscale_layer(self, scale: float | None = None) -> None:
        """Divide the strength of every active adapter by ``scale``, or reset it to 1 when ``scale`` is ``None``."""
        if scale is not None and not (math.isfinite(scale) and scale != 0):
            raise ValueError(f"scale={scale!r} cannot divide a strength; pass a finite non-zero number, or None")
        for name in self._active_adapters:
            if name in self.adapter_names:
                self._set_strength(name, 1.0 if scale is None else self.strength(name) / scale)

    #: Why this method has no strength (``None``: it has one). A strength other than 1 is refused with it.
    strength_unsupported: str | None = None

    def check_strength(self, adapter_name: str, strength: float) -> float:
        """``strength`` as a float if ``adapter_name`` may take it now, else a ``ValueError`` that says why."""
        if self.strength_unsupported is not None and strength != 1:
            raise ValueError(f"scale={strength!r} for adapter {adapter_name!r}: {self.strength_unsupported}")
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength):
            raise ValueError(f"scale={strength!r} for adapter {adapter_name!r} must be a finite real number, e.g. 0.5")
        strength = float(strength)
        if adapter_name in self.merged_adapters and strength != self.strength(adapter_name):
            raise ValueError(
                f"adapter {adapter_name!r} is merged at strength {self.strength(adapter_name)}; unmerge it before "
                f"setting it to {strength} (the merged weight could not be restored exactly otherwise)"
            )
        return strength

    def _set_strength(self, adapter_name: str, strength: float) -> None:
        self.scaling[adapter_name] = self.check_strength(adapter_name, strength)

    # ------------------------------------------------------------------------------ meta (empty) adapters
    def adapter_to_meta(self, adapter_name: str) -> None:
        """Replace the adapter's file tensors by meta tensors of the same shapes: peft's ``low_cpu_mem_usage``,
        an adapter without values, to be filled by loading (:meth:`materialize_adapter`)."""
        self._replace_adapter_tensors(adapter_name, lambda tensor: torch.empty_like(tensor, device="meta"))
        self._meta_adapters.add(adapter_name)

    def materialize_adapter(self, adapter_name: str) -> None:
        """Give an adapter on the meta device uninitialised tensors beside the base layer, for loading to fill."""
        if adapter_name not in self._meta_adapters:
            return
        device = self._adapter_device() or torch.device("cpu")
        self._replace_adapter_tensors(adapter_name, lambda tensor: torch.empty_like(tensor, device=device))
        self._meta_adapters.discard(adapter_name)

    def _replace_adapter_tensors(self, adapter_name: str, make: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Replace each of the adapter's file tensors (found by identity under this layer) by ``make(tensor)``;
        a parameter stays a parameter with its ``requires_grad``."""
        targets = {id(tensor) for tensor in self.adapter_tensors(adapter_name).values()}
        for path, owner in self.named_modules():
            if path == "base_layer" or path.startswith("base_layer."):
                continue
            for attribute, parameter in list(owner.named_parameters(recurse=False)):
                if id(parameter) in targets:
                    new = nn.Parameter(make(parameter.detach()), requires_grad=parameter.requires_grad)
                    if isinstance(owner, nn.ParameterDict):
                        owner[attribute] = new
                    else:
                        setattr(owner, attribute, new)
            for attribute, buffer in list(owner.named_buffers(recurse=False)):
                if id(buffer) in targets:
                    owner._buffers[attribute] = make(buffer)

    def _check_materialized(self, names: Iterable[str]) -> None:
        """Refuse to compute with an adapter that was created on the meta device and never loaded."""
        if not self._meta_adapters:
            return
        for name in [name for name in names if name in self._meta_adapters]:
            if not any(tensor.is_meta for tensor in self.adapter_tensors(name).values()):
                self._meta_adapters.discard(name)  # filled by other means (load_state_dict(assign=True))
                continue
            raise RuntimeError(
                f"adapter {name!r} was created on the meta device (low_cpu_mem_usage=True) and has no weights yet; "
                f"load them first: model.load_adapter(path, {name!r}, low_cpu_mem_usage=True) or "
                f"set_peft_model_state_dict(model, state_dict, adapter_name={name!r}, low_cpu_mem_usage=True)"
            )

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
        active = self._held_active_adapters()
        if self.merged or not active:
            return self.base_layer(x, *args, **kwargs)
        self._check_materialized(active)
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

        self._check_materialized(adapter_names)
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
        names = self._held_active_adapters() if adapter_names is None else _as_name_list(adapter_names)
        self._check_known(names)
        self._check_materialized(names)
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

    @property
    def rotates_output(self) -> bool:
        """An embedding rotates what it outputs; every other kind rotates what it reads."""
        return self.kind is LayerKind.EMBEDDING


def _constructor_with_signature(cls: type[AdapterLayer]) -> Callable[..., None]:
    """``AdapterLayer.__init__`` with the explicit signature of peft's constructor for ``cls``.

    Arguments are accepted in the order of ``cls.constructor_arguments`` (positionally too), then
    ``update_layer``'s other arguments and ``inference_mode`` by keyword; every default comes from
    ``update_layer`` or :meth:`AdapterLayer.__init__`, so it is written once.
    """
    base_parameters = inspect.signature(AdapterLayer.__init__).parameters
    update_parameters = inspect.signature(cls.update_layer).parameters
    known = {**{name: base_parameters[name] for name in ("fan_in_fan_out", "is_target_conv_1d_layer")}}
    known.update({name: value for name, value in update_parameters.items() if name not in ("self", "adapter_name")})
    positional_kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    parameters = [
        inspect.Parameter("self", positional_kind),
        inspect.Parameter("base_layer", positional_kind),
        inspect.Parameter("adapter_name", positional_kind),
    ]
    parameters += [known[name].replace(kind=positional_kind) for name in cls.constructor_arguments]
    parameters += [
        value.replace(kind=inspect.Parameter.KEYWORD_ONLY)
        for name, value in known.items()
        if name not in cls.constructor_arguments and value.kind is not inspect.Parameter.VAR_KEYWORD
    ]
    parameters.append(inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD))
    signature = inspect.Signature(parameters)

    def __init__(self: AdapterLayer, *args: Any, **kwargs: Any) -> None:
        bound = signature.bind(self, *args, **kwargs)
        arguments = dict(bound.arguments)
        arguments.pop("self")
        extra = arguments.pop("kwargs", {})
        AdapterLayer.__init__(self, **arguments, **extra)

    __init__.__signature__ = signature  # type: ignore[attr-defined]
    __init__.__doc__ = f"{cls.__name__}(base_layer, adapter_name, ...): see ``update_layer`` for the arguments."
    __init__.__qualname__ = f"{cls.__qualname__}.__init__"
    return __init__


def _checked_fan_in_fan_out(kind: LayerKind, fan_in_fan_out: bool) -> bool:
    """The layer's true weight layout; a wrong flag is corrected with a warning, as peft does."""
    actual = kind is LayerKind.CONV1D
    if fan_in_fan_out != actual:
        warnings.warn(
            f"fan_in_fan_out={fan_in_fan_out} does not match the base layer, whose weight is stored as "
            f"{'(in, out)' if actual else '(out, in)'}; using fan_in_fan_out={actual}",
            stacklevel=3,
        )
    return actual
