"""BOFT: orthogonal fine-tuning with butterfly factorization (Liu et al., ICLR 2024, arXiv:2311.06243).

Each adapter is a product of ``m`` butterfly factors of block-diagonal rotations and a per-output scale::

    x ──► x M ──► base layer (frozen W, b) ──► (y - b) · s + b,        M = F_{m-1} ⋯ F_0
    merged:  W ↦ (W Mᵀ) · s

``M`` is applied factor by factor to the activations, with the permutations as index vectors: no ``d × d``
matrix is built in forward (peft 0.21.2 builds ``m`` dense ``d × d`` products per step and keeps ``m·d²``
permutation buffers). The Cayley blocks of all factors are computed in one batched solve per step.

Storage is peft's: ``boft_R[name]`` of shape ``(m, D, b, b)`` holds unconstrained matrices ``A`` whose
generator is ``Q = (Aᵀ - A)/2`` (the sign that makes peft's files mean the same rotation under this library's
Cayley convention, see :mod:`orthotune.functional.cayley`); ``boft_s[name]`` is ``(out_features, 1)`` for
linear layers and ``(1, out_channels)`` for Conv2d.

``boft_n_butterfly_factor`` is the number of factors ``m``; ``0`` (the layer's default in the spec) means
``1``, a single block-diagonal factor, like peft's config default. Unlike peft, ``m > 1`` is honoured on every
device with no extension to compile.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from orthotune.adapter_layer import AdapterLayer, check_init_weights
from orthotune.base_layer import LayerKind, weight_matrix
from orthotune.functional import (
    boft_generators,
    butterfly_dense,
    butterfly_permutations,
    butterfly_rotate_activations,
    butterfly_rotate_weight,
    cayley_exact,
    rotation_compute_dtype,
)
from orthotune.oft import MultiplicativeDropoutLayer, _check_dropout, _checked_fan_in_fan_out

__all__ = ["BOFTLayer", "Conv2d", "Linear", "MultiplicativeDropoutLayer", "valid_boft_block_sizes"]


def _fits(features: int, block_size: int, num_factors: int) -> bool:
    if block_size < 1 or features % block_size:
        return False
    return num_factors == 1 or (block_size % 2 == 0 and features % (block_size * 2 ** (num_factors - 1)) == 0)


def valid_boft_block_sizes(features: int, num_factors: int) -> list[int]:
    """Block sizes that work for ``features`` and ``num_factors`` butterfly factors."""
    return [b for b in range(2 if num_factors > 1 else 1, features + 1) if _fits(features, b, num_factors)]


def _max_factors(features: int, block_size: int) -> int:
    factors = 1
    while _fits(features, block_size, factors + 1):
        factors += 1
    return factors


class _Permutations(nn.Module):
    """Index vectors of one adapter's butterfly permutations, moved with the layer but never saved."""

    def __init__(self, index: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("index", index, persistent=False)


class BOFTLayer(AdapterLayer):
    """Shared BOFT bookkeeping; use :class:`Linear` or :class:`Conv2d`."""

    adapter_layer_names: tuple[str, ...] = ("boft_R", "boft_s")
    other_param_names: tuple[str, ...] = (
        "boft_block_size",
        "boft_block_num",
        "boft_n_butterfly_factor",
        "boft_dropout",
        "boft_permutations",
    )

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        super().__init__(base_layer)
        if self.kind is LayerKind.EMBEDDING:
            raise TypeError("BOFT does not support nn.Embedding (neither does peft); use OFT for embeddings")
        self.boft_R = nn.ParameterDict()
        self.boft_s = nn.ParameterDict()
        self.boft_dropout = nn.ModuleDict()
        self.boft_permutations = nn.ModuleDict()
        self.boft_block_size: dict[str, int] = {}
        self.boft_block_num: dict[str, int] = {}
        self.boft_n_butterfly_factor: dict[str, int] = {}
        self.kwargs = kwargs

    def _resolve_blocks(self, block_size: int, block_num: int, num_factors: int) -> tuple[int, int]:
        features = self.rotated_features
        for argument, value in (("boft_block_size", block_size), ("boft_block_num", block_num)):
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{argument}={value!r} must be a non-negative integer; set it to 0 to derive it")
        if block_size == 0 and block_num == 0:
            raise ValueError("boft_block_size=0 and boft_block_num=0: set exactly one of them, e.g. boft_block_size=8")
        if block_size and block_num and block_size * block_num != features:
            raise ValueError(
                f"boft_block_size={block_size} and boft_block_num={block_num} give {block_size * block_num} features "
                f"but the layer has {features}; set one of them to 0 so the other decides"
            )
        argument, value = ("boft_block_size", block_size) if block_size else ("boft_block_num", block_num)
        if features % value == 0:
            block_size = block_size or features // block_num
            if _fits(features, block_size, num_factors):
                return block_size, features // block_size
        sizes = valid_boft_block_sizes(features, num_factors)
        if argument == "boft_block_num":
            hint = f"boft_block_num in {[features // b for b in sizes][::-1][:12]}"
        else:
            hint = f"boft_block_size in {sizes[:12]}"
        at_most = (
            ""
            if features % value
            else (f" (with this block size at most boft_n_butterfly_factor={_max_factors(features, block_size)})")
        )
        raise ValueError(
            f"{argument}={value} does not fit {features} features with boft_n_butterfly_factor={num_factors}: "
            f"each factor needs an even block size and features divisible by block_size·2^(factors-1); "
            f"use {hint}{at_most}"
        )

    def update_layer(
        self,
        adapter_name: str,
        boft_block_size: int = 8,
        boft_block_num: int = 0,
        boft_n_butterfly_factor: int = 0,
        boft_dropout: float = 0.1,
        init_weights: bool = True,
        inference_mode: bool = False,
        **kwargs: Any,
    ) -> None:
        """Add (or replace) the adapter ``adapter_name``: ``m`` butterfly factors and an output scale."""
        if kwargs:
            raise TypeError(f"unexpected BOFT arguments {sorted(kwargs)}; see orthotune.boft.BOFTLayer.update_layer")
        if not isinstance(boft_n_butterfly_factor, int) or boft_n_butterfly_factor < 0:
            raise ValueError(
                f"boft_n_butterfly_factor={boft_n_butterfly_factor!r} must be a number of factors ≥ 1 (0 means 1)"
            )
        check_init_weights(init_weights)
        _check_dropout("boft_dropout", boft_dropout)
        num_factors = max(1, boft_n_butterfly_factor)
        block_size, block_num = self._resolve_blocks(boft_block_size, boft_block_num, num_factors)
        device = self._adapter_device()
        scale_shape = (1, self.out_features) if self.kind is LayerKind.CONV2D else (self.out_features, 1)
        self.boft_R[adapter_name] = nn.Parameter(
            torch.zeros(num_factors, block_num, block_size, block_size, device=device)
        )
        self.boft_s[adapter_name] = nn.Parameter(torch.ones(scale_shape, device=device))
        index = butterfly_permutations(self.rotated_features, block_size, num_factors)
        self.boft_permutations[adapter_name] = _Permutations(index.to(device))
        self.boft_dropout[adapter_name] = MultiplicativeDropoutLayer(boft_dropout)
        self.boft_block_size[adapter_name] = block_size
        self.boft_block_num[adapter_name] = block_num
        self.boft_n_butterfly_factor[adapter_name] = num_factors
        self.reset_boft_parameters(adapter_name, init_weights)
        self._register_new_adapter(adapter_name, inference_mode)

    def reset_boft_parameters(self, adapter_name: str, init_weights: bool) -> None:
        """``True``: identity rotation, unit scale. ``False``: ``A ~ N(0, 0.1²)``, ``s ~ N(1, 0.1²)`` (peft)."""
        check_init_weights(init_weights)
        if init_weights:
            nn.init.zeros_(self.boft_R[adapter_name])
            nn.init.ones_(self.boft_s[adapter_name])
        else:
            nn.init.normal_(self.boft_R[adapter_name], mean=0.0, std=0.1)
            nn.init.normal_(self.boft_s[adapter_name], mean=1.0, std=0.1)

    def rotation_blocks(self, adapter_name: str) -> torch.Tensor:
        """``(m, D, b, b)`` fp32 orthogonal blocks of every factor, from one batched Cayley solve."""
        return cayley_exact(boft_generators(self.boft_R[adapter_name].float()))

    def _forward_blocks(self, adapter_name: str) -> torch.Tensor:
        blocks = self._cached_rotation(
            adapter_name, lambda: self.rotation_blocks(adapter_name), (self.boft_R[adapter_name],)
        )
        return self.boft_dropout[adapter_name](blocks)

    def _permutation_index(self, adapter_name: str) -> torch.Tensor:
        return self.boft_permutations[adapter_name].index

    def _output_scale(self, adapter_name: str) -> torch.Tensor:
        """``(out, 1)`` scale, whatever the stored layout."""
        scale = self.boft_s[adapter_name]
        return scale.transpose(0, 1) if self.kind is LayerKind.CONV2D else scale

    def get_delta_weight(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(M, s)``: the dense ``(d, d)`` rotation (``x ↦ x M``) and the ``(out, 1)`` output scale."""
        rotation = butterfly_dense(self.rotation_blocks(adapter_name), self._permutation_index(adapter_name))
        return rotation, self._output_scale(adapter_name)

    def _merged_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        blocks = self.rotation_blocks(adapter_name)
        rotated = butterfly_rotate_weight(weight, blocks, self._permutation_index(adapter_name))
        return rotated * self._output_scale(adapter_name).float()

    def _unmerged_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        # The Cayley blocks are orthogonal to rounding, so Mᵀ is M's inverse: (W Mᵀ s) / s M = W.
        unscaled = weight / self._output_scale(adapter_name).float()
        blocks = self.rotation_blocks(adapter_name)
        return butterfly_rotate_activations(unscaled, blocks, self._permutation_index(adapter_name))

    def __repr__(self) -> str:
        return "boft." + super().__repr__()


class _BOFTConstructor(BOFTLayer):
    """The spec's constructor, shared by the BOFT layer classes."""

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        boft_block_size: int = 8,
        boft_block_num: int = 0,
        boft_n_butterfly_factor: int = 0,
        boft_dropout: float = 0.1,
        fan_in_fan_out: bool = False,
        init_weights: bool = True,
        is_target_conv_1d_layer: bool = False,
        inference_mode: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(base_layer, **kwargs)
        self.fan_in_fan_out = _checked_fan_in_fan_out(self.kind, fan_in_fan_out)
        self.is_target_conv_1d_layer = is_target_conv_1d_layer
        self.update_layer(
            adapter_name,
            boft_block_size=boft_block_size,
            boft_block_num=boft_block_num,
            boft_n_butterfly_factor=boft_n_butterfly_factor,
            boft_dropout=boft_dropout,
            init_weights=init_weights,
            inference_mode=inference_mode,
        )


class Linear(_BOFTConstructor):
    """BOFT on ``nn.Linear``, transformers' ``Conv1D`` or any layer with ``in_features``/``out_features``.

    Shapes:
        ``x: (..., in_features)`` → ``(..., out_features)``, in the dtype of ``x``.
    """

    def _adapted_forward(self, x: torch.Tensor, active: list[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        scale: torch.Tensor | None = None
        compute_dtype = rotation_compute_dtype(x.device, x.dtype)
        for name in reversed(active):  # the first active adapter sits next to the base layer
            blocks = self._forward_blocks(name).to(compute_dtype)
            row_major = None if self._base_reads_any_layout else True
            x = butterfly_rotate_activations(x, blocks, self._permutation_index(name), row_major=row_major)
            adapter_scale = self.boft_s[name].squeeze(-1)
            scale = adapter_scale if scale is None else scale * adapter_scale
        result = self._base_forward_on_rotated(x, *args, **kwargs)
        assert scale is not None
        scale = scale.to(result.dtype)
        bias = getattr(self.base_layer, "bias", None)
        if bias is None:
            return result * scale
        # The scale multiplies the rotated product only, as in peft and in the merged weight:
        # (result - b) s + b, in one pass over the output.
        bias = bias.to(result.dtype)
        return torch.addcmul(bias - bias * scale, result, scale)


class Conv2d(_BOFTConstructor):
    """BOFT on ``nn.Conv2d`` (``groups=1``), rotating the ``in_channels·kh·kw`` features of every patch.

    Like :class:`orthotune.oft.Conv2d`, forward rotates and scales the weight (factor by factor, no dense
    matrix) and runs the base convolution with it, so dilation, stride, padding and non-square kernels are
    exactly those of the merged layer (peft ignores dilation and non-square kernels).

    Shapes:
        ``x: (N, C_in, H, W)`` → ``(N, C_out, H', W')``.
    """

    def _adapted_forward(self, x: torch.Tensor, active: list[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        base = self.base_layer
        weight = weight_matrix(base, self.kind)
        for name in active:  # merge order: the first active adapter is applied to W first
            blocks = self._forward_blocks(name).to(rotation_compute_dtype(weight.device, weight.dtype))
            weight = butterfly_rotate_weight(weight, blocks, self._permutation_index(name))
            weight = weight * self._output_scale(name).to(weight.dtype)
        return base._conv_forward(x, weight.reshape(base.weight.shape), base.bias)
