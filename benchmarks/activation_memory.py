"""Bytes of tensors saved for backward by a bf16 model with OFT adapters: orthotune against peft 0.21.2.

What is measured
----------------
A tiny Llama built from a ``LlamaConfig`` (no download; hidden size 64, 2 layers, bf16 weights) gets the same
OFT configuration (``oft_block_size=16`` on every attention and MLP projection) once through
``orthotune.get_peft_model`` and once through ``peft.get_peft_model``. One forward of a ``(batch, seq)`` token
batch with labels runs under ``torch.autograd.graph.saved_tensors_hooks``; the pack hook records every tensor
autograd keeps for backward. Tensors that live in a parameter's storage (the frozen base weights) are not
activations and are left out; the rest are counted once per storage (several ops saving the same tensor
cost its memory once).

Two figures per library:

* **whole model**: all saved activation bytes of the forward, base model's own included (transformers'
  RMSNorm and loss save fp32 tensors whichever adapter library is used);
* **adapter layers**: bytes saved while inside an adapter-wrapped layer (the rotation and the frozen layer
  it wraps), split by dtype; with a frozen base weight the base layer itself saves no activation, so this is
  the adapter's own cost. orthotune builds the rotation in fp32 and applies it in bf16, so it saves only
  bf16 activations there; peft casts the input to its fp32 adapter weights and keeps an fp32 copy.

Run: ``python benchmarks/activation_memory.py [--batch 4 --seq 128]``.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).to(dtype)


def orthotune_oft(model: nn.Module) -> nn.Module:
    import orthotune

    config = orthotune.OFTConfig(r=0, oft_block_size=16, target_modules=TARGETS)
    return orthotune.get_peft_model(model, config)


def peft_oft(model: nn.Module) -> nn.Module:
    import peft

    config = peft.OFTConfig(r=0, oft_block_size=16, target_modules=TARGETS)
    return peft.get_peft_model(model, config)


def orthotune_hra(model: nn.Module) -> nn.Module:
    import orthotune

    return orthotune.get_peft_model(model, orthotune.HRAConfig(r=8, target_modules=TARGETS))


def peft_hra(model: nn.Module) -> nn.Module:
    import peft

    return peft.get_peft_model(model, peft.HRAConfig(r=8, target_modules=TARGETS))


class SavedTensors:
    """Records what autograd saves: ``(dtype, numel, bytes, storage pointer, inside an adapter layer)``."""

    def __init__(self, model: nn.Module, is_adapter_layer: Callable[[nn.Module], bool]) -> None:
        self.records: list[tuple[torch.dtype, int, int, int, bool]] = []
        self._parameter_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self._depth = 0
        self._model = model
        self._is_adapter_layer = is_adapter_layer

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self._parameter_storages:
            self.records.append((tensor.dtype, tensor.numel(), storage.nbytes(), storage.data_ptr(), self._depth > 0))
        return tensor

    @contextmanager
    def recording(self) -> Iterator[None]:
        handles = []
        for module in self._model.modules():
            if self._is_adapter_layer(module):
                handles.append(module.register_forward_pre_hook(lambda *_: self._enter()))
                handles.append(module.register_forward_hook(lambda *_: self._leave()))
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor):
                yield
        finally:
            for handle in handles:
                handle.remove()

    def _enter(self) -> None:
        self._depth += 1

    def _leave(self) -> None:
        self._depth -= 1

    def bytes_by_dtype(self, adapter_only: bool) -> dict[str, int]:
        """Saved bytes per dtype, each storage counted once."""
        seen: set[int] = set()
        totals: dict[str, int] = defaultdict(int)
        for dtype, _, nbytes, pointer, inside in self.records:
            if (adapter_only and not inside) or pointer in seen:
                continue
            seen.add(pointer)
            totals[str(dtype).removeprefix("torch.")] += nbytes
        return dict(totals)

    def largest(self, dtype: torch.dtype, adapter_only: bool) -> int:
        """The largest saved tensor (in elements) of ``dtype``; 0 if there is none."""
        sizes = [numel for d, numel, _, _, inside in self.records if d == dtype and (inside or not adapter_only)]
        return max(sizes, default=0)


def is_orthotune_layer(module: nn.Module) -> bool:
    from orthotune import AdapterLayer

    return isinstance(module, AdapterLayer)


def is_peft_layer(module: nn.Module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return isinstance(module, BaseTunerLayer)


def measure(wrapped: nn.Module, is_adapter_layer: Callable[[nn.Module], bool], batch: int, seq: int) -> SavedTensors:
    """One training forward of ``wrapped`` with saved tensors recorded; runs backward too, to check it works."""
    tokens = torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(0))
    saved = SavedTensors(wrapped, is_adapter_layer)
    wrapped.train()
    with saved.recording():
        loss = wrapped(input_ids=tokens, labels=tokens).loss
    loss.backward()
    return saved


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results = {}
    for name, wrap, is_layer in (("orthotune", orthotune_oft, is_orthotune_layer), ("peft", peft_oft, is_peft_layer)):
        saved = measure(wrap(tiny_llama()), is_layer, args.batch, args.seq)
        results[name] = {
            "whole model": saved.bytes_by_dtype(adapter_only=False),
            "adapter layers": saved.bytes_by_dtype(adapter_only=True),
            "largest fp32 in adapter layers (elements)": saved.largest(torch.float32, adapter_only=True),
        }
        saved.records.clear()
    activation = args.batch * args.seq * 64
    print(
        f"tiny Llama, bf16, hidden 64, 2 layers, batch {args.batch} x seq {args.seq} "
        f"(one hidden-state activation = {activation} elements = {2 * activation} bytes in bf16)"
    )
    print(f"{'library':10} {'scope':15} {'bf16 KiB':>9} {'fp32 KiB':>9} {'total KiB':>10}")
    for name, result in results.items():
        for scope in ("whole model", "adapter layers"):
            by_dtype = result[scope]
            total = sum(by_dtype.values())
            print(
                f"{name:10} {scope:15} {by_dtype.get('bfloat16', 0) / 1024:9.1f} "
                f"{by_dtype.get('float32', 0) / 1024:9.1f} {total / 1024:10.1f}"
            )
        print(
            f"{name:10} largest fp32 tensor saved in adapter layers: "
            f"{result['largest fp32 in adapter layers (elements)']} elements"
        )
    return results


if __name__ == "__main__":
    main()
