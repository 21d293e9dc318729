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
    composed_generator,
    output_scale_at_strength,
    rotation_at_strength,
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
        """``(m, D, b, b)`` fp32 orthogonal blocks ``R_i(t·Q_i)`` of every factor at the adapter's strength ``t``,
        from one batched Cayley solve."""
        return rotation_at_strength(boft_generators(self.boft_R[adapter_name].float()), self.strength(adapter_name))

    def _forward_blocks(self, adapter_name: str) -> torch.Tensor:
        return self.boft_dropout[adapter_name](self.rotation_blocks(adapter_name))

    def _permutation_index(self, adapter_name: str) -> torch.Tensor:
        return self.boft_permutations[adapter_name].index

    def _output_scale(self, adapter_name: str) -> torch.Tensor:
        """``(out, 1)`` scale ``s^t`` at the adapter's strength ``t``, whatever the stored layout."""
        scale = output_scale_at_strength(self.boft_s[adapter_name], self.strength(adapter_name))
        return scale.transpose(0, 1) if self.kind is LayerKind.CONV2D else scale

    def get_delta_weight(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(M, s)`` at the adapter's strength: the dense ``(d, d)`` rotation (``x ↦ x M``) and the ``(out, 1)``
        output scale."""
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

    def composed_parameters(self, adapter_names: list[str], strengths: list[float]) -> dict[str, torch.Tensor]:
        """``boft_R`` and ``boft_s`` of the one adapter that equals ``adapter_names`` active together, at
        ``strengths``.

        With one butterfly factor each adapter is a block-diagonal rotation and an output scale: the blocks
        multiply (in the order this layer applies them: the last active adapter first on the input) into one
        block-diagonal rotation, whose generator is the inverse Cayley transform of the product, and the scales
        ``s_i^{t_i}`` multiply. With ``m > 1`` factors a product of butterfly products is not one butterfly
        product, so only a single source (an adapter at another strength: ``R_i(t·Q_i)`` per factor) is exact.

        Returns:
            ``{"boft_R": (m, D, b, b), "boft_s": as stored}``, float32; ``boft_R`` holds ``A = -Q``, whose
            generator ``(Aᵀ - A)/2`` is ``Q``.

        Raises:
            ValueError: if the sources differ in block structure or factor count (naming them), several sources
                have ``m > 1``, or the product turns some plane by 180°.
        """
        structure = {
            name: (self.boft_n_butterfly_factor[name], self.boft_block_num[name], self.boft_block_size[name])
            for name in adapter_names
        }
        if len(set(structure.values())) > 1:
            described = {name: f"m={m}, {num} blocks of {size}" for name, (m, num, size) in structure.items()}
            raise ValueError(
                f"cannot compose BOFT adapters of different structure {described} in one layer; compose adapters "
                "with the same boft_block_size, boft_block_num and boft_n_butterfly_factor"
            )
        factors = structure[adapter_names[0]][0]
        if factors > 1 and len(adapter_names) > 1:
            raise ValueError(
                f"cannot compose BOFT adapters {adapter_names} with boft_n_butterfly_factor={factors}: a product of "
                "butterfly products is not a single butterfly product, so no BOFT adapter equals them; only "
                "adapters with one factor (boft_n_butterfly_factor=1) compose exactly"
            )
        rotations = [
            cayley_exact(strength * boft_generators(self.boft_R[name].double()))
            for name, strength in zip(adapter_names, strengths, strict=True)
        ]
        generator = composed_generator(rotations[::-1])  # x M_last ⋯ M_first: the last active adapter acts first
        scale = torch.ones_like(self.boft_s[adapter_names[0]])
        for name, strength in zip(adapter_names, strengths, strict=True):
            scale = scale * output_scale_at_strength(self.boft_s[name].detach(), strength)
        return {"boft_R": (-generator).float(), "boft_s": scale.float()}

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
        for name in reversed(active):  # the first active adapter sits next to the base layer
            blocks = self._forward_blocks(name).to(x.dtype)
            x = butterfly_rotate_activations(x, blocks, self._permutation_index(name), row_major=False)
            adapter_scale = self._output_scale(name).squeeze(-1)
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
            blocks = self._forward_blocks(name).to(weight.dtype)
            weight = butterfly_rotate_weight(weight, blocks, self._permutation_index(name))
            weight = weight * self._output_scale(name).to(weight.dtype)
        return base._conv_forward(x, weight.reshape(base.weight.shape), base.bias)
