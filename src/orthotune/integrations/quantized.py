"""Reading and writing the weight of a quantized base layer, for merge.

Training never needs this: the adapter rotates the activations and the quantized layer runs its own kernel on
them. Merging does: the rotation has to be folded into a weight that is stored as packed integers. Each
backend here knows how to

* ``dequantize`` its layer's weight to the float ``(out, in)`` matrix ``W`` of ``y = x Wᵀ``;
* ``requantize`` a new float matrix into the layer, with the layer's own settings (bits, block size, group
  size), replacing the stored tensors with new objects rather than writing into the old ones;
* ``storage`` / ``restore``: hand out and put back the objects that hold the packed weight. Because
  ``requantize`` never writes into them, keeping them across a merge lets unmerge give back the original
  quantized weight bit for bit, where dequantize → unrotate → requantize would round a second time.

Backends are recognised by class name and module, so that no quantization library is imported unless a layer
of its kind is being merged. Supported: bitsandbytes ``Linear4bit`` (nf4/fp4) and ``Linear8bitLt``, torchao
int8 weight-only (``Int8Tensor``), optimum-quanto ``QLinear`` (frozen qint8/qint4/…), and HQQ ``HQQLinear``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class QuantizedBackend:
    """How one quantization library stores a linear layer's weight."""

    name: str
    matches: Callable[[nn.Module], bool]
    dequantize: Callable[[nn.Module], torch.Tensor]
    requantize: Callable[[nn.Module, torch.Tensor], None]
    storage_attributes: tuple[str, ...]

    def storage(self, layer: Any) -> dict[str, Any]:
        """References to the objects holding the packed weight (no copy: requantize replaces, never mutates)."""
        return {path: _get_path(layer, path) for path in self.storage_attributes}

    def restore(self, layer: Any, storage: dict[str, Any]) -> None:
        for path, value in storage.items():
            _set_path(layer, path, value)


def _get_path(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _set_path(obj: Any, path: str, value: Any) -> None:
    *parents, last = path.split(".")
    for part in parents:
        obj = getattr(obj, part)
    setattr(obj, last, value)


def _stored_weight(layer: Any) -> Any:
    """The registered ``weight`` parameter, read without going through a property a layer may define."""
    return layer._parameters.get("weight")


def _holds_plain_weight(layer: Any) -> bool:
    return type(_stored_weight(layer)) in (torch.Tensor, nn.Parameter)


def _weight_class_name(layer: Any) -> str:
    weight = _stored_weight(layer)
    return type(weight).__name__ if weight is not None else ""


# ------------------------------------------------------------------------------------ bitsandbytes 4-bit
def _is_bnb_4bit(layer: Any) -> bool:
    return _weight_class_name(layer) == "Params4bit"


def _bnb_4bit_dequantize(layer: Any) -> torch.Tensor:
    import bitsandbytes as bnb

    weight = layer.weight
    state = weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        # bitsandbytes' CPU inference path repacked this weight (and its scales, in bf16) for its own kernel, a
        # layout dequantize_4bit cannot read: read the weight back through that kernel, one basis vector a row.
        eye = torch.eye(layer.in_features, dtype=layer.compute_dtype or torch.float32, device=weight.device)
        return bnb.matmul_4bit(eye, weight, quant_state=state).t().float()
    return bnb.functional.dequantize_4bit(weight.data, state).float()


def _bnb_4bit_requantize(layer: Any, matrix: torch.Tensor) -> None:
    import bitsandbytes as bnb

    old = layer.weight
    # Params4bit quantizes when it is moved to a device, with the settings it was built with.
    new = bnb.nn.Params4bit(
        matrix.to(getattr(old.quant_state, "original_dtype", old.quant_state.dtype)).cpu(),
        requires_grad=False,
        quant_type=old.quant_type,
        blocksize=old.blocksize,
        compress_statistics=old.compress_statistics,
        quant_storage=old.quant_storage,
        module=layer,
    ).to(old.device)
    layer._parameters["weight"] = new


# ------------------------------------------------------------------------------------ bitsandbytes 8-bit
def _is_bnb_8bit(layer: Any) -> bool:
    return _weight_class_name(layer) == "Int8Params"


def _bnb_8bit_scales(layer: Any) -> torch.Tensor:
    # After the first forward, Linear8bitLt moves the row scales from the weight into its matmul state.
    scales = layer.weight.SCB
    return scales if scales is not None else layer.state.SCB


def _bnb_8bit_dequantize(layer: Any) -> torch.Tensor:
    import bitsandbytes as bnb

    weight = layer.weight
    if weight.data.is_floating_point():  # has_fp16_weights=True: the weight is kept in half precision
        return weight.data.float()
    return bnb.functional.int8_vectorwise_dequant(weight.data, _bnb_8bit_scales(layer).to(weight.device)).float()


def _bnb_8bit_requantize(layer: Any, matrix: torch.Tensor) -> None:
    import bitsandbytes as bnb

    old = layer.weight
    if old.data.is_floating_point():
        new = bnb.nn.Int8Params(matrix.to(old.dtype), requires_grad=False, has_fp16_weights=True)
    else:
        # Int8Params quantizes (row-wise absmax) when it is moved from the CPU to a device.
        new = bnb.nn.Int8Params(matrix.half().cpu(), requires_grad=False, has_fp16_weights=False).to(old.device)
    layer._parameters["weight"] = new
    layer.state.CB = None
    layer.state.SCB = None


# ------------------------------------------------------------------------------------ torchao
def _is_torchao_int8(layer: Any) -> bool:
    weight = _stored_weight(layer)
    return type(weight).__name__ == "Int8Tensor" and type(weight).__module__.startswith("torchao")


def _torchao_dequantize(layer: Any) -> torch.Tensor:
    return layer.weight.dequantize().float()


def _torchao_requantize(layer: Any, matrix: torch.Tensor) -> None:
    from torchao.quantization import PerRow

    old = layer.weight
    if list(old.block_size) != [1, old.shape[-1]]:
        raise NotImplementedError(
            f"cannot merge into a torchao Int8Tensor with block_size={list(old.block_size)}: only per-row int8 "
            "weight-only quantization (Int8WeightOnlyConfig) is supported; keep the adapter unmerged"
        )
    new = type(old).from_hp(
        matrix.to(old.dtype),
        granularity=PerRow(),
        act_quant_kwargs=getattr(old, "act_quant_kwargs", None),
    )
    layer._parameters["weight"] = nn.Parameter(new, requires_grad=False)


# ------------------------------------------------------------------------------------ optimum-quanto
def _is_quanto(layer: Any) -> bool:
    # An unfrozen QLinear still holds its float weight (and quantizes it on the fly): that is a plain weight.
    module = type(layer).__module__
    return module.startswith("optimum.quanto") and hasattr(layer, "freeze") and not _holds_plain_weight(layer)


def _quanto_dequantize(layer: Any) -> torch.Tensor:
    return layer.qweight.dequantize().float()


def _quanto_requantize(layer: Any, matrix: torch.Tensor) -> None:
    dtype = layer.weight.dtype  # a quantized weight reports the float dtype it stands for
    layer._parameters["weight"] = nn.Parameter(matrix.to(dtype), requires_grad=False)
    layer.freeze()  # quantize with the layer's own qtype and replace the float weight by the packed one
    layer.weight.requires_grad_(False)


# ------------------------------------------------------------------------------------ HQQ
def _is_hqq(layer: Any) -> bool:
    return type(layer).__name__ == "HQQLinear" and hasattr(layer, "W_q") and hasattr(layer, "dequantize")


def _hqq_dequantize(layer: Any) -> torch.Tensor:
    return layer.dequantize().float()


def _hqq_requantize(layer: Any, matrix: torch.Tensor) -> None:
    # HQQLinear.quantize only works on a layer that holds no weight yet: quantize into a fresh one and take
    # its new W_q and meta (the old objects stay untouched for unmerge).
    quant_config = copy.deepcopy(layer.quant_config)  # the layer popped offload_meta out of it when built
    settings = {**quant_config, "offload_meta": layer.offload_meta}
    fresh = type(layer)(None, settings, compute_dtype=layer.compute_dtype, device=layer.device)
    fresh.quantize(matrix.to(layer.compute_dtype), **quant_config)
    layer.W_q = fresh.W_q
    layer.meta = fresh.meta


BACKENDS: tuple[QuantizedBackend, ...] = (
    QuantizedBackend("bitsandbytes 4-bit", _is_bnb_4bit, _bnb_4bit_dequantize, _bnb_4bit_requantize, ("weight",)),
    QuantizedBackend(
        "bitsandbytes 8-bit",
        _is_bnb_8bit,
        _bnb_8bit_dequantize,
        _bnb_8bit_requantize,
        ("weight", "state.CB", "state.SCB"),
    ),
    QuantizedBackend("torchao int8", _is_torchao_int8, _torchao_dequantize, _torchao_requantize, ("weight",)),
    QuantizedBackend("optimum-quanto", _is_quanto, _quanto_dequantize, _quanto_requantize, ("weight",)),
    QuantizedBackend("HQQ", _is_hqq, _hqq_dequantize, _hqq_requantize, ("W_q", "meta")),
)


def quantized_backend(layer: Any) -> QuantizedBackend | None:
    """The backend that stores ``layer``'s weight, or ``None`` for a layer with a plain float weight."""
    for backend in BACKENDS:
        if backend.matches(layer):
            return backend
    return None
