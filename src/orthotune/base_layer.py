"""What a wrapped base layer is, seen from an adapter: its kind, its widths, and its weight as a matrix.

An orthogonal adapter rotates the ``d`` features a layer reads (or, for an embedding, the ``d`` features it
writes). This module names those ``d`` features for every supported kind of layer without importing
transformers or any quantization library, and gives merge a single view of the weight: the ``(out, d)``
matrix ``W`` of ``y = x Wᵀ``.
"""

from __future__ import annotations

import contextlib
import contextvars
import enum
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from orthotune.integrations.quantized import quantized_backend


class LayerKind(enum.Enum):
    LINEAR = "linear"  # weight (out, in); also any module with in_features / out_features
    CONV1D = "conv1d"  # transformers' GPT-2 Conv1D: y = x W + b with weight (in, out)
    CONV2D = "conv2d"  # weight (out, in, kh, kw); rotates the in·kh·kw features of each patch
    EMBEDDING = "embedding"  # weight (num, dim); rotates the dim features it outputs


def is_transformers_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2), recognised by shape, not by import."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def layer_kind(base_layer: nn.Module) -> LayerKind:
    """Classify ``base_layer``.

    Raises:
        TypeError: a kind of layer orthotune cannot adapt (the message lists the supported ones).
        ValueError: a grouped ``nn.Conv2d``, which a rotation of its patch features would break.
    """
    if isinstance(base_layer, nn.Embedding):
        return LayerKind.EMBEDDING
    if isinstance(base_layer, nn.Conv2d):
        if base_layer.groups > 1:
            raise ValueError(
                f"Conv2d with groups={base_layer.groups} is not supported: an orthogonal rotation of the "
                "in_channels·kh·kw patch features would mix channels across groups; target a layer with groups=1"
            )
        return LayerKind.CONV2D
    if is_transformers_conv1d(base_layer):
        return LayerKind.CONV1D
    if isinstance(getattr(base_layer, "in_features", None), int) and isinstance(
        getattr(base_layer, "out_features", None), int
    ):
        return LayerKind.LINEAR
    raise TypeError(
        f"cannot wrap {type(base_layer).__name__}: supported layers are nn.Linear, nn.Conv2d (groups=1), "
        "nn.Embedding, transformers' Conv1D, and any module with integer in_features and out_features"
    )


def reads_any_layout(base_layer: nn.Module) -> bool:
    """Whether the layer takes a column-major input as it is (rotated activations come in that layout).

    torch's own ``nn.Linear`` and transformers' ``Conv1D`` hand their input to a matmul, which reads any
    strides. Anything else (a quantized kernel, a subclass with its own forward) gets a row-major copy: some
    kernels assume it and compute garbage otherwise (bitsandbytes' 4-bit CPU kernel does).
    """
    return type(base_layer) is nn.Linear or is_transformers_conv1d(base_layer)


def in_out_features(base_layer: Any, kind: LayerKind) -> tuple[int, int]:
    """peft's ``(in_features, out_features)``: channels for Conv2d, ``(dim, num)`` for an embedding."""
    if kind is LayerKind.EMBEDDING:
        return base_layer.embedding_dim, base_layer.num_embeddings
    if kind is LayerKind.CONV2D:
        return base_layer.in_channels, base_layer.out_channels
    if kind is LayerKind.CONV1D:
        fan_in, fan_out = base_layer.weight.shape
        return fan_in, fan_out
    return base_layer.in_features, base_layer.out_features


def rotated_features(base_layer: Any, kind: LayerKind) -> int:
    """``d``: how many features the rotation acts on (``in·kh·kw`` for Conv2d)."""
    in_features, _ = in_out_features(base_layer, kind)
    if kind is LayerKind.CONV2D:
        return in_features * math.prod(base_layer.kernel_size)
    return in_features


#: True while orthotune.integrations.distributed holds a DeepSpeed ZeRO-3 layer gathered so that merging may
#: write into it.
_ZERO3_GATHERED = contextvars.ContextVar("zero3_gathered", default=False)


@contextlib.contextmanager
def zero3_weights_gathered() -> Iterator[None]:
    """Mark the enclosed merge as running on ZeRO-3 parameters gathered for it.

    See :mod:`orthotune.integrations.distributed`.
    """
    token = _ZERO3_GATHERED.set(True)
    try:
        yield
    finally:
        _ZERO3_GATHERED.reset(token)


def plain_weight(base_layer: Any) -> torch.Tensor:
    """The base layer's floating-point weight, or a clear error for layers that store it otherwise."""
    try:
        weight = base_layer.weight
    except Exception:  # a quantized kernel may raise anything when its packed weight is read as a tensor
        weight = None
    if any(cls.__name__ == "DTensor" for cls in type(weight).__mro__):
        raise NotImplementedError(
            f"cannot merge into {type(base_layer).__name__}: its weight is a DTensor shard (FSDP2 fully_shard or "
            "tensor parallelism); save the adapter (save_pretrained with a full state dict from "
            "torch.distributed.checkpoint.state_dict.get_model_state_dict) and merge it into an unsharded model"
        )
    if hasattr(weight, "ds_id") and not _ZERO3_GATHERED.get():
        # Outside a forward pass the weight is an empty placeholder, or a copy that ZeRO-3 may have kept gathered
        # and will overwrite with its own partitions: a merge written there would be lost without a word.
        raise NotImplementedError(
            f"cannot merge into {type(base_layer).__name__}: its weight is partitioned by DeepSpeed ZeRO-3; call "
            "orthotune.integrations.distributed.merge_adapter_zero3(model) (or unmerge_adapter_zero3) on every rank, "
            "which gathers each layer, merges and lets ZeRO-3 partition the result"
        )
    if not isinstance(weight, torch.Tensor) or type(weight) not in (torch.Tensor, nn.Parameter):
        weight = None
    if weight is None or not weight.is_floating_point():
        raise NotImplementedError(
            f"cannot merge into {type(base_layer).__name__}: its weight is not a plain floating-point tensor "
            "and not one of the quantized formats orthotune can requantize (bitsandbytes 4/8-bit, torchao int8, "
            "optimum-quanto, HQQ); keep the adapter unmerged, or dequantize the base model before merging"
        )
    return weight


def weight_matrix(base_layer: nn.Module, kind: LayerKind) -> torch.Tensor:
    """The weight as the ``(out, d)`` matrix ``W`` of ``y = x Wᵀ`` (a view where possible).

    For an embedding, whose rows are the outputs being rotated, the matrix is the ``(num, dim)`` table itself.
    A quantized linear layer gives its dequantized weight (a new float32 tensor).
    """
    backend = quantized_backend(base_layer)
    if backend is not None:
        return backend.dequantize(base_layer)
    weight = plain_weight(base_layer)
    if kind is LayerKind.CONV1D:
        return weight.t()
    return weight.reshape(weight.shape[0], -1)


def write_weight_matrix(base_layer: nn.Module, kind: LayerKind, matrix: torch.Tensor) -> None:
    """Store an ``(out, d)`` matrix (see :func:`weight_matrix`) back into the base weight, in its dtype.

    A quantized linear layer quantizes the matrix again with its own settings.
    """
    backend = quantized_backend(base_layer)
    if backend is not None:
        backend.requantize(base_layer, matrix)
        return
    weight = plain_weight(base_layer)
    if kind is LayerKind.CONV1D:
        matrix = matrix.t()
    with torch.no_grad():
        weight.copy_(matrix.reshape(weight.shape).to(weight.dtype))
