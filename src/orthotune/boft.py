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

``boft_n_butterfly_factor`` is the number of factors ``m``; ``0`` (the layer's default in peft) means
``1``, a single block-diagonal factor, like peft's config default. Unlike peft, ``m > 1`` is honoured on every
device with no extension to compile.

``rotation_side="output"`` is LyCORIS's ``boft``: its butterfly (:mod:`~orthotune.functional.lycoris_butterfly`)
rotates the layer's outputs before the bias, and ``boft_s`` scales them after (LyCORIS's ``rescale``)::

    x ──► base layer (frozen W) ──► (x Wᵀ) M ⊙ s + b,      merged:  W ↦ s ⊙ (Mᵀ W)

The blocks then divide ``out_features`` and must be even (every LyCORIS stage interleaves half-blocks).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from orthotune.adapter_layer import AdapterLayer
from orthotune.base_layer import LayerKind, weight_matrix
from orthotune.blocks import resolve_boft_blocks
from orthotune.functional import (
    boft_generators,
    butterfly_dense,
    butterfly_permutations,
    butterfly_rotate_activations,
    butterfly_rotate_weight,
    cayley_exact,
    composed_generator,
    lycoris_butterfly_dense,
    lycoris_butterfly_rotate_activations,
    lycoris_butterfly_rotate_weight,
    lycoris_butterfly_unrotate_weight,
    lycoris_radius,
    output_scale_at_strength,
    project_skew_jointly,
    rotation_at_strength,
    rotation_compute_dtype,
)
from orthotune.oft import MultiplicativeDropoutLayer
from orthotune.validation import check_constraint, check_init_weights, check_probability, check_rotation_side

__all__ = ["BOFTLayer", "Conv2d", "Linear", "MultiplicativeDropoutLayer", "layer_class"]


class _Permutations(nn.Module):
    """Index vectors of one adapter's butterfly permutations, moved with the layer but never saved."""

    index: torch.Tensor

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
        "rotation_side",
        "boft_constraint",
    )
    constructor_arguments: tuple[str, ...] = (
        "boft_block_size",
        "boft_block_num",
        "boft_n_butterfly_factor",
        "boft_dropout",
        "fan_in_fan_out",
        "init_weights",
        "is_target_conv_1d_layer",
    )

    def _create_adapter_holders(self) -> None:
        if self.kind is LayerKind.EMBEDDING:
            raise TypeError("BOFT does not support nn.Embedding (neither does peft); use OFT for embeddings")
        self.boft_R = nn.ParameterDict()
        self.boft_s = nn.ParameterDict()
        self.boft_dropout = nn.ModuleDict()
        self.boft_permutations = nn.ModuleDict()
        self.boft_block_size: dict[str, int] = {}
        self.boft_block_num: dict[str, int] = {}
        self.boft_n_butterfly_factor: dict[str, int] = {}
        self.rotation_side: dict[str, str] = {}
        self.boft_constraint: dict[str, float] = {}

    def _side_features(self, rotation_side: str) -> int:
        """The width a rotation on that side acts on: the outputs, or the features the layer reads."""
        return self.out_features if rotation_side == "output" else self.rotated_features

    def update_layer(
        self,
        adapter_name: str,
        boft_block_size: int = 8,
        boft_block_num: int = 0,
        boft_n_butterfly_factor: int = 0,
        boft_dropout: float = 0.1,
        init_weights: bool = True,
        inference_mode: bool = False,
        rotation_side: str = "input",
        constraint: float = 0.0,
        **kwargs: Any,
    ) -> None:
        """Add (or replace) the adapter ``adapter_name``: ``m`` butterfly factors and an output scale.

        ``rotation_side="output"`` uses LyCORIS's butterfly on the layer's outputs; ``constraint`` is LyCORIS's
        ``alpha``: the generators of all factors together within ``‖Q‖_F ≤ constraint · width``.
        """
        if kwargs:
            raise TypeError(f"unexpected BOFT arguments {sorted(kwargs)}; see orthotune.boft.BOFTLayer.update_layer")
        if not isinstance(boft_n_butterfly_factor, int) or boft_n_butterfly_factor < 0:
            raise ValueError(
                f"boft_n_butterfly_factor={boft_n_butterfly_factor!r} must be a number of factors ≥ 1 (0 means 1)"
            )
        check_init_weights(init_weights)
        check_probability("boft_dropout", boft_dropout)
        check_rotation_side(rotation_side)
        check_constraint(constraint)
        num_factors = max(1, boft_n_butterfly_factor)
        block_size, block_num = resolve_boft_blocks(
            self._side_features(rotation_side), boft_block_size, boft_block_num, num_factors, rotation_side
        )
        device = self._adapter_device()
        scale_shape = (1, self.out_features) if self.kind is LayerKind.CONV2D else (self.out_features, 1)
        self.boft_R[adapter_name] = nn.Parameter(
            torch.zeros(num_factors, block_num, block_size, block_size, device=device)
        )
        self.boft_s[adapter_name] = nn.Parameter(torch.ones(scale_shape, device=device))
        if rotation_side == "input":
            index = butterfly_permutations(self.rotated_features, block_size, num_factors)
            self.boft_permutations[adapter_name] = _Permutations(index.to(device))
        elif adapter_name in self.boft_permutations:  # LyCORIS's butterfly permutes by reshapes alone
            del self.boft_permutations[adapter_name]
        self.boft_dropout[adapter_name] = MultiplicativeDropoutLayer(boft_dropout)
        self.boft_block_size[adapter_name] = block_size
        self.boft_block_num[adapter_name] = block_num
        self.boft_n_butterfly_factor[adapter_name] = num_factors
        self.rotation_side[adapter_name] = rotation_side
        self.boft_constraint[adapter_name] = constraint
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
        from one batched Cayley solve (generators held within LyCORIS's joint bound when ``constraint``)."""
        generators = boft_generators(self.boft_R[adapter_name].float())
        radius = lycoris_radius(
            self.boft_constraint[adapter_name], self._side_features(self.rotation_side[adapter_name])
        )
        return rotation_at_strength(project_skew_jointly(generators, radius), self.strength(adapter_name))

    def _rotates_outputs(self, adapter_name: str) -> bool:
        return self.rotation_side[adapter_name] == "output"

    def _forward_blocks(self, adapter_name: str) -> torch.Tensor:
        settings = (self.strength(adapter_name), self.boft_constraint[adapter_name], self.rotation_side[adapter_name])
        blocks = self._cached_rotation(
            adapter_name, lambda: self.rotation_blocks(adapter_name), (self.boft_R[adapter_name],), settings
        )
        return self.boft_dropout[adapter_name](blocks)

    def _permutation_index(self, adapter_name: str) -> torch.Tensor:
        permutations = self.boft_permutations[adapter_name]
        assert isinstance(permutations, _Permutations)
        return permutations.index

    def _output_scale(self, adapter_name: str) -> torch.Tensor:
        """``(out, 1)`` scale ``s^t`` at the adapter's strength ``t``, whatever the stored layout."""
        scale = output_scale_at_strength(self.boft_s[adapter_name], self.strength(adapter_name))
        return scale.transpose(0, 1) if self.kind is LayerKind.CONV2D else scale

    def get_delta_weight(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(M, s)`` at the adapter's strength: the dense ``(d, d)`` rotation (``x ↦ x M``, or ``y ↦ y M`` for the
        outputs on the output side) and the ``(out, 1)`` output scale."""
        if self._rotates_outputs(adapter_name):
            return lycoris_butterfly_dense(self.rotation_blocks(adapter_name)), self._output_scale(adapter_name)
        rotation = butterfly_dense(self.rotation_blocks(adapter_name), self._permutation_index(adapter_name))
        return rotation, self._output_scale(adapter_name)

    def adapter_tensors(self, adapter_name: str) -> dict[str, torch.Tensor]:
        return {"boft_R": self.boft_R[adapter_name], "boft_s": self.boft_s[adapter_name]}

    def _merged_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        blocks = self.rotation_blocks(adapter_name)
        if self._rotates_outputs(adapter_name):
            return lycoris_butterfly_rotate_weight(weight, blocks, self._output_scale(adapter_name).float().flatten())
        rotated = butterfly_rotate_weight(weight, blocks, self._permutation_index(adapter_name))
        return rotated * self._output_scale(adapter_name).float()

    def _unmerged_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        if self._rotates_outputs(adapter_name):
            scale = self._output_scale(adapter_name).float().flatten()
            return lycoris_butterfly_unrotate_weight(weight, self.rotation_blocks(adapter_name), scale)
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
        lycoris_style = [name for name in adapter_names if self._rotates_outputs(name) or self.boft_constraint[name]]
        if lycoris_style:
            raise ValueError(
                f"cannot compose adapters {lycoris_style}: composition is implemented for input-side adapters "
                "without a constraint (rotation_side='input', constraint=0); merge them instead"
            )
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


class Linear(BOFTLayer):
    """BOFT on ``nn.Linear``, transformers' ``Conv1D`` or any layer with ``in_features``/``out_features``.

    Shapes:
        ``x: (..., in_features)`` → ``(..., out_features)``, in the dtype of ``x``.
    """

    def _adapted_forward(self, x: torch.Tensor, active: list[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        if any(self._rotates_outputs(name) for name in active):
            return self._forward_with_output_rotations(x, active, *args, **kwargs)
        scale: torch.Tensor | None = None
        compute_dtype = rotation_compute_dtype(x.device, x.dtype)
        for name in reversed(active):  # the first active adapter sits next to the base layer
            blocks = self._forward_blocks(name).to(compute_dtype)
            row_major = None if self._base_reads_any_layout else True
            x = butterfly_rotate_activations(x, blocks, self._permutation_index(name), row_major=row_major)
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

    def _forward_with_output_rotations(
        self, x: torch.Tensor, active: list[str], *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        """Forward with at least one output-side adapter: ``((x M_in) Wᵀ + b)`` then, in active order, each
        adapter's left factor of the merged weight: ``⊙ s`` (input side) or ``M ⊙ s`` (output side).

        The bias is not rotated or scaled (it is not in the merged weight): the chain is applied to the whole
        output, bias included, and ``b - chain(b)`` added back, a vector-sized correction.
        """
        for name in reversed(active):  # right factors of W: the first active adapter next to the base layer
            if not self._rotates_outputs(name):
                blocks = self._forward_blocks(name).to(x.dtype)
                x = butterfly_rotate_activations(x, blocks, self._permutation_index(name), row_major=False)
        result = self._base_forward_on_rotated(x, *args, **kwargs)
        bias = getattr(self.base_layer, "bias", None)
        chained_bias = None if bias is None else bias.float()
        for name in active:  # left factors of W, in merge order
            scale = self.boft_s[name].flatten()
            if self._rotates_outputs(name):
                blocks = self._forward_blocks(name)  # one dropout draw for the output and the bias
                result = lycoris_butterfly_rotate_activations(result, blocks.to(result.dtype), scale.to(result.dtype))
                if chained_bias is not None:
                    chained_bias = lycoris_butterfly_rotate_activations(chained_bias, blocks, scale.float())
            else:
                result = result * scale.to(result.dtype)
                if chained_bias is not None:
                    chained_bias = chained_bias * scale.float()
        if bias is None:
            return result
        return result + (bias.float() - chained_bias).to(result.dtype)


class Conv2d(BOFTLayer):
    """BOFT on ``nn.Conv2d`` (``groups=1``), rotating the ``in_channels·kh·kw`` features of every patch.

    Like :class:`orthotune.oft.Conv2d`, forward rotates and scales the weight (factor by factor, no dense
    matrix) and runs the base convolution with it, so dilation, stride, padding and non-square kernels are
    exactly those of the merged layer (peft ignores dilation and non-square kernels).

    Shapes:
        ``x: (N, C_in, H, W)`` → ``(N, C_out, H', W')``.
    """

    def _adapted_forward(self, x: torch.Tensor, active: list[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        base: Any = self.base_layer
        weight = weight_matrix(base, self.kind)
        for name in active:  # merge order: the first active adapter is applied to W first
            blocks = self._forward_blocks(name).to(weight.dtype)
            scale = self._output_scale(name).to(weight.dtype)
            if self._rotates_outputs(name):
                weight = lycoris_butterfly_rotate_weight(weight, blocks, scale.flatten())
                continue
            weight = butterfly_rotate_weight(weight, blocks, self._permutation_index(name))
            weight = weight * scale
        return base._conv_forward(x, weight.reshape(base.weight.shape), base.bias)


def layer_class(kind: LayerKind) -> type[BOFTLayer]:
    """The BOFT layer class for a base layer of ``kind``; embeddings are refused, as in peft."""
    if kind is LayerKind.EMBEDDING:
        raise TypeError(
            "BOFT cannot adapt an embedding (neither can peft); use OFTConfig for embeddings, or leave it out of "
            "target_modules"
        )
    return Conv2d if kind is LayerKind.CONV2D else Linear
