"""Helpers shared by the test files: error measures, dense references built without orthotune, and stand-ins.

The references are written from the definitions (``torch.block_diag``, ``torch.linalg.inv`` in float64, Python
loops over index pairs, ``F.unfold``) or from peft's own helpers, never by calling :mod:`orthotune`, so a test
that compares against them compares against an independent truth. The helpers that do call orthotune are
:func:`run_cli` and :func:`cli_commands`, which run and list the command line under test.

Test files import from here (``from references import rel_err``); ``conftest.py`` keeps only fixtures and hooks.
The processes that the distributed tests spawn import it too: they inherit the test process's ``sys.path``,
which holds this directory.
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys
import types
import warnings
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    import pytest

__all__ = [
    "PeftBlockDiagOnCPU",
    "boft_dense_reference",
    "cayley_reference",
    "cli_commands",
    "conv2d_unfold_reference",
    "dense_block_diag",
    "document_upstream_defect",
    "frobenius_rel_err",
    "load_benchmark",
    "peft_butterfly_perm_index",
    "pretend_peft_boft_cuda",
    "randn",
    "rel_err",
    "rotation_reference",
    "run_cli",
    "skew_reference",
]


# --------------------------------------------------------------------------------------------- error measures
def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max-abs relative error ``max|a - b| / max|b|``, computed in float64 (``b`` is the reference)."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def frobenius_rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Frobenius relative error ``‖actual - expected‖ / ‖expected‖``, computed in float64."""
    actual, expected = actual.detach().double(), expected.detach().double()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


# ------------------------------------------------------------------------------------------------ inputs
def randn(*shape: int, seed: int, dtype: torch.dtype = torch.float64, scale: float = 1.0) -> torch.Tensor:
    """``N(0, scale²)`` samples from their own seeded generator, drawn in float64 and then cast to ``dtype`` (the
    same values for every dtype)."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=generator, dtype=torch.float64) * scale).to(dtype)


# ----------------------------------------------------------------------------------------- dense references
def dense_block_diag(blocks: torch.Tensor, num_blocks: int | None = None) -> torch.Tensor:
    """Dense block-diagonal matrix of ``(D, b, b)`` blocks, or of one ``(1, b, b)`` block repeated ``num_blocks``
    times, by ``torch.block_diag``."""
    if num_blocks is None:
        num_blocks = blocks.shape[0]
    if blocks.shape[0] == 1:
        return torch.block_diag(*[blocks[0]] * num_blocks)
    assert blocks.shape[0] == num_blocks
    return torch.block_diag(*blocks.unbind(0))


def skew_reference(packed: torch.Tensor, block_size: int) -> torch.Tensor:
    """Skew matrices from packed strict upper triangles, filled by Python loops in row-major ``i < j`` order."""
    out = torch.zeros(*packed.shape[:-1], block_size, block_size, dtype=packed.dtype)
    k = 0
    for i in range(block_size):
        for j in range(i + 1, block_size):
            out[..., i, j] = packed[..., k]
            out[..., j, i] = -packed[..., k]
            k += 1
    assert k == packed.shape[-1], "packed size does not match the block size"
    return out


def cayley_reference(q: torch.Tensor) -> torch.Tensor:
    """``(I + Q) @ inv(I - Q)`` in float64 (the textbook formula, explicit inverse on purpose)."""
    q = q.double()
    eye = torch.eye(q.shape[-1], dtype=torch.float64)
    return (eye + q) @ torch.linalg.inv(eye - q)


def rotation_reference(packed: torch.Tensor, block_size: int, num_blocks: int | None = None) -> torch.Tensor:
    """Dense float64 block-diagonal OFT rotation ``R`` (``x ↦ x R``) of packed generators ``(r, b(b-1)/2)``."""
    return dense_block_diag(cayley_reference(skew_reference(packed.detach().double(), block_size)), num_blocks)


def peft_butterfly_perm_index(d: int, b: int, m: int, i: int) -> torch.Tensor:
    """peft's ``block_butterfly_perm`` for factor ``i`` of ``m``, called exactly as peft's update_layer does."""
    import peft.tuners.boft.layer as peft_boft

    num_blocks = d // b
    return peft_boft.BOFTLayer.block_butterfly_perm(None, d, int(num_blocks / 2**i), int(b / 2), m - 1)


def boft_dense_reference(boft_r: torch.Tensor) -> torch.Tensor:
    """Dense BOFT rotation ``M = F_{m-1} ⋯ F_0``, ``F_i = P_i B_i P_iᵀ``, all dense and all from peft's helpers.

    ``P_i = perm2mat(block_butterfly_perm(...))``, ``B_i = block_diag(cayley_batch(boft_R[i]))``.

    Args:
        boft_r: ``(m, D, b, b)`` generators, as in a BOFT layer's ``boft_R``.
    """
    import peft.tuners.boft.layer as peft_boft

    m, num_blocks, b, _ = boft_r.shape
    d = num_blocks * b
    blocks = peft_boft.BOFTLayer.cayley_batch(None, boft_r.detach().float().reshape(-1, b, b)).view(m, num_blocks, b, b)
    rotation = torch.eye(d)
    for i in range(m):
        p = peft_boft.BOFTLayer.perm2mat(None, peft_butterfly_perm_index(d, b, m, i))
        factor = p @ torch.block_diag(*blocks[i]) @ p.T
        rotation = factor @ rotation
    return rotation


def conv2d_unfold_reference(
    conv: nn.Conv2d,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    x: torch.Tensor,
    rotation: torch.Tensor,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """A Conv2d with every patch's ``in·kh·kw`` features rotated, as ``(patches @ R @ Wᵀ) · s + bias`` in float64.

    No convolution kernel is involved: patches come from ``F.unfold``, their features ordered ``(C, kh, kw)``
    like ``weight.view(out, -1)``.

    Args:
        conv: gives the geometry only (kernel size, stride, padding, dilation).
        weight: ``(out, in, kh, kw)``, the base weight before any merge.
        bias: ``(out,)`` or None.
        x: ``(N, in, H, W)``.
        rotation: ``(d, d)`` with ``d = in·kh·kw``, acting on patches as row vectors.
        scale: optional ``(out,)`` or ``(out, 1)`` output scale (BOFT's magnitude).

    Returns:
        ``(N, out, H_out, W_out)`` in float64.
    """
    n, _, height, width = x.shape
    out_channels = weight.shape[0]
    cols = F.unfold(
        x.detach().double(), conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride
    )
    out = cols.transpose(1, 2) @ rotation.detach().double() @ weight.detach().double().reshape(out_channels, -1).T
    if scale is not None:  # out is (N, L, out)
        out = out * scale.detach().double().reshape(1, 1, out_channels)
    size = [
        (extent + 2 * p - d * (k - 1) - 1) // s + 1
        for extent, p, d, k, s in zip(
            (height, width), conv.padding, conv.dilation, conv.kernel_size, conv.stride, strict=True
        )
    ]
    out = out.transpose(1, 2).reshape(n, out_channels, *size)
    return out if bias is None else out + bias.detach().double().view(1, -1, 1, 1)


# -------------------------------------------------------------------------------------------------- stand-ins
class PeftBlockDiagOnCPU:
    """What peft's CUDA ``FastBlockDiag`` computes, on the CPU: ``(N, D, b, b) -> (N, D·b, D·b)``."""

    apply = staticmethod(lambda blocks: torch.stack([torch.block_diag(*factor) for factor in blocks]))


def pretend_peft_boft_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make peft's BOFT believe its CUDA extension is there, computing with :class:`PeftBlockDiagOnCPU`.

    peft 0.21.2 silently forces ``boft_n_butterfly_factor=1`` when the extension is missing (it is, on the
    CPU); with this it keeps every factor, so its real ``m > 1`` math can be compared.
    """
    import peft.tuners.boft.layer as peft_boft

    monkeypatch.setattr(peft_boft, "get_fbd_cuda", lambda: True)
    monkeypatch.setattr(peft_boft, "FastBlockDiag", PeftBlockDiagOnCPU)


# ------------------------------------------------------------------------------------------------------ other
def load_benchmark(name: str) -> types.ModuleType:
    """Import ``benchmarks/<name>.py``: tests check the very code that produces the figures in the docs."""
    if name in sys.modules:
        return sys.modules[name]
    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def document_upstream_defect(still_present: bool, message: str) -> None:
    """Record that a known upstream (peft) defect is still there, without failing if upstream fixes it.

    Our suite asserts orthotune's behaviour; upstream's misbehaviour is documentation only.
    """
    if not still_present:
        warnings.warn(f"upstream defect no longer reproduces: {message}", stacklevel=2)


def cli_commands() -> list[str]:
    """The subcommands of ``orthotune``, as its parser lists them."""
    from orthotune.cli import build_parser

    parser = build_parser()
    subparsers = next(action for action in parser._actions if action.dest == "command")
    return sorted(subparsers.choices)


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Exit status, stdout and stderr of ``orthotune ARGV`` run in this process."""
    from orthotune import cli

    try:
        status = cli.main(list(argv))
    except SystemExit as exit_:
        status = exit_.code if isinstance(exit_.code, int) else 1
    captured = capsys.readouterr()
    return status, captured.out, captured.err
