"""Let peft 0.21.2 run BOFT with ``boft_n_butterfly_factor > 1`` on a machine without its CUDA extension.

peft silently resets the butterfly factor ``m`` to 1 when ``fbd_cuda`` cannot be built (always the case on
CPU). To time peft's real ``m > 1`` math, the benchmarks -- and only they, only in their own process --
patch ``peft.tuners.boft.layer``:

* ``get_fbd_cuda`` returns a truthy dummy while layers are constructed, so ``update_layer`` keeps ``m``;
* ``FastBlockDiag`` is replaced by a plain-torch stand-in whose ``apply`` maps ``(N, D, H, H)`` blocks to
  ``(N, D*H, D*H)`` block-diagonal matrices with ``torch.block_diag`` (autograd flows through the torch ops;
  no custom ``Function``). Everything else is peft's own code.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


class PlainBlockDiag:
    """Plain-torch stand-in for peft's CUDA-only ``FastBlockDiag``: (N, D, H, H) -> (N, D*H, D*H)."""

    apply = staticmethod(lambda blocks: torch.stack([torch.block_diag(*factor) for factor in blocks]))


@contextlib.contextmanager
def peft_keeps_butterfly_factor() -> Iterator[None]:
    """While active, peft's BOFT believes ``fbd_cuda`` is available and so keeps ``m > 1``."""
    import peft.tuners.boft.layer as boft_layer

    original = boft_layer.get_fbd_cuda
    boft_layer.get_fbd_cuda = lambda: True
    boft_layer.FastBlockDiag = PlainBlockDiag  # used at forward time; harmless for this process
    try:
        yield
    finally:
        boft_layer.get_fbd_cuda = original
