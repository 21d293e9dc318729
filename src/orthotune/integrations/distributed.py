"""Merging adapters into a model whose parameters DeepSpeed ZeRO-3 partitions across processes.

Under ZeRO-3 each process keeps a ``1/world_size`` slice of every parameter and leaves an empty placeholder
(shape ``(0,)``) in the module; a forward pass gathers a layer's parameters just in time. Merging happens
outside any forward pass and reads and rewrites whole matrices (``W ← W Rᵀ`` for OFT and BOFT), so each adapter
layer's parameters, base weight and adapter alike, are gathered first::

    with deepspeed.zero.GatheredParameters(list(layer.parameters()), modifier_rank=0):
        layer.merge()

One layer at a time: the extra memory is one layer's full weights, never the whole model. Every process
computes the same merge (so every process's layer records it as merged), and on leaving the context rank 0's
result is what ZeRO-3 partitions again. Call these functions on every rank, as collectives.

Parameters that ZeRO-3 does not partition (ZeRO-1/2, or a model outside DeepSpeed) pass through
``GatheredParameters`` untouched, so the functions work there too.

Example::

    engine, *_ = deepspeed.initialize(model=peft_model, optimizer=optimizer, config=zero3_config)
    ...  # train
    merge_adapter_zero3(peft_model)  # on every rank
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

from orthotune.adapter_layer import AdapterLayer
from orthotune.base_layer import zero3_weights_gathered
from orthotune.model import OrthoModel


@contextlib.contextmanager
def _gathered(layer: AdapterLayer) -> Iterator[None]:
    from deepspeed.runtime.zero import GatheredParameters

    with GatheredParameters(list(layer.parameters()), modifier_rank=0), zero3_weights_gathered():
        yield


def merge_adapter_zero3(
    model: OrthoModel, adapter_names: Sequence[str] | None = None, safe_merge: bool = False
) -> None:
    """:meth:`OrthoModel.merge_adapter` for a ZeRO-3 model: gather each adapter layer, merge, partition again.

    Args:
        model: the adapted model that was passed to ``deepspeed.initialize``.
        adapter_names: adapters to merge (default: each layer's active adapters).
        safe_merge: refuse to write a merged weight that is not finite.

    Raises:
        ValueError: an adapter name the model does not have, or a base weight tied to another module.
    """
    model.merge_layers(adapter_names, safe_merge, around=_gathered)


def unmerge_adapter_zero3(model: OrthoModel) -> None:
    """:meth:`OrthoModel.unmerge_adapter` for a ZeRO-3 model: gather each merged layer, unmerge, partition again."""
    for _, layer in model.adapter_layers():
        if layer.merged:
            with _gathered(layer):
                layer.unmerge()
