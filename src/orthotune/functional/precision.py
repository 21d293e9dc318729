"""Which dtype a rotation is applied in, and which layout the base layer should read, per device.

Adapter parameters and the rotation blocks built from them are fp32. Applying them to half-precision
activations can go two ways:

* **in the activation dtype** (bf16 blocks times bf16 activations): right where the hardware multiplies bf16
  natively (CUDA from Ampere on; CPUs with AVX512-BF16 or AMX when a one-time measurement of the block product
  agrees). Nothing fp32 of activation size is made or kept for backward.
* **in fp32** (upcast the activations, multiply, round the result back): right where bf16 matmuls are
  emulated. On an AVX2-only CPU torch's bf16 batched matmul for a ``d = 1024`` rotation is several times
  slower than the upcast, the fp32 product and the cast back together (BENCHMARKS.md). The product still keeps
  only the bf16 input for backward and upcasts it again there, so the memory saving stays.

The layout the rotated activations are handed to the base layer in is chosen by
:func:`~orthotune.functional.rotate_activations` (``row_major=None``), from whether a gradient flows and
whether the dtype is native: torch's fallback bf16 GEMM on an AVX2 CPU ran ~10× slower on a column-major input.

The choice can be forced with the environment variable ``ORTHOTUNE_ROTATION_DTYPE``: ``auto`` (default, by
hardware), ``float32`` (always upcast half precision) or ``input`` (always the activation dtype).
"""

from __future__ import annotations

import functools
import os
import time

import torch

#: ``torch.compile`` runs these decisions once while tracing and keeps the answer as a constant: the probes and
#: the measurement behind them are not graph material.
_constant_while_compiling = getattr(torch.compiler, "assume_constant_result", lambda function: function)

#: Environment variable that overrides :func:`rotation_compute_dtype`; see the module docstring.
ROTATION_DTYPE_ENV = "ORTHOTUNE_ROTATION_DTYPE"
_CHOICES = ("auto", "float32", "input")
_HALF = (torch.bfloat16, torch.float16)


def _override() -> str:
    choice = os.environ.get(ROTATION_DTYPE_ENV, "auto").strip().lower() or "auto"
    if choice not in _CHOICES:
        raise ValueError(f"{ROTATION_DTYPE_ENV}={choice!r} is not one of {_CHOICES}; unset it to choose by hardware")
    return choice


@functools.cache
def _cpu_multiplies_natively(dtype: torch.dtype) -> bool:
    """Whether torch's CPU matmul for ``dtype`` runs on native instructions (oneDNN's bf16/fp16 kernels)."""
    probe = {
        torch.bfloat16: "_is_mkldnn_bf16_supported",
        torch.float16: "_is_mkldnn_fp16_supported",
    }[dtype]
    try:
        return torch.backends.mkldnn.is_available() and bool(getattr(torch.ops.mkldnn, probe)())
    except (AttributeError, RuntimeError):  # an older torch without the probe: ask the CPU flags instead
        capability = torch.backends.cpu.get_cpu_capability()
        return dtype is torch.bfloat16 and capability.startswith("AVX512") and torch.cpu._is_avx512_bf16_supported()


@functools.cache
def _cuda_multiplies_natively(dtype: torch.dtype, index: int | None) -> bool:
    if dtype is torch.float16:
        return True
    try:
        with torch.cuda.device(index):
            return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # torch < 2.3 has no including_emulation and reports native support only
        with torch.cuda.device(index):
            return torch.cuda.is_bf16_supported()


@functools.cache
def _cpu_half_product_is_faster(dtype: torch.dtype) -> bool:
    """One measurement per process (a few milliseconds): a 32-block rotation of 256 rows of ``d = 1024``
    multiplied in ``dtype`` against the same product in fp32 on an upcast copy, rounded back.

    A CPU with native bf16 GEMMs need not have fast bf16 *batched small* products: on an AVX512-BF16 machine
    orthotune's bf16 OFT step cost 1.57× the frozen layer where peft's fp32 upcast cost 1.43× (BENCHMARKS.md).
    """
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(256, 32, 32, generator=generator).transpose(0, 1)  # (D, rows, b), as the product reads it
    blocks = torch.randn(32, 32, 32, generator=generator)
    half_x, half_blocks = x.to(dtype), blocks.to(dtype)
    candidates = {
        "half": lambda: torch.bmm(half_x, half_blocks),
        "upcast": lambda: torch.bmm(half_x.float(), blocks).to(dtype),
    }
    best = dict.fromkeys(candidates, float("inf"))
    with torch.no_grad():
        for _ in range(5):
            for name, product in candidates.items():
                start = time.perf_counter()
                product()
                best[name] = min(best[name], time.perf_counter() - start)
    return best["half"] < best["upcast"]


@_constant_while_compiling
def multiplies_natively(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether matmuls in ``dtype`` run natively on ``device`` (always true for fp32 and fp64).

    Cached per ``(device, dtype)``; devices other than CPU and CUDA are assumed native.
    """
    if dtype not in _HALF:
        return True
    device = torch.device(device)
    if device.type == "cpu":
        return _cpu_multiplies_natively(dtype)
    if device.type == "cuda":
        return _cuda_multiplies_natively(dtype, device.index)
    return True


@_constant_while_compiling
def rotation_compute_dtype(device: torch.device | str, dtype: torch.dtype) -> torch.dtype:
    """The dtype to multiply activations of ``dtype`` on ``device`` by their rotation blocks in.

    ``dtype`` itself for fp32/fp64 and where the device multiplies half precision natively, ``torch.float32``
    where it does not. On a CPU that reports native bf16/fp16 GEMMs, a one-time measurement of the batched
    block product in both dtypes decides (cached per dtype). ``ORTHOTUNE_ROTATION_DTYPE`` overrides the choice;
    a compiled graph keeps the choice it was traced with.

    Args:
        device: where the activations live.
        dtype: the activations' dtype.

    Returns:
        ``dtype`` or ``torch.float32``; blocks cast to it go straight to
        :func:`~orthotune.functional.rotate_activations`, which returns activations in ``dtype``.
    """
    if dtype not in _HALF:
        return dtype
    choice = _override()
    if choice == "input":
        return dtype
    if choice == "float32" or not multiplies_natively(device, dtype):
        return torch.float32
    if torch.device(device).type == "cpu" and not _cpu_half_product_is_faster(dtype):
        return torch.float32
    return dtype
