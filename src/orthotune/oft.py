"""OFT and constrained OFT (COFT) layers (Qiu et al., 2023, arXiv:2306.07280; OFTv2, arXiv:2506.19847).

Each adapter is a block-diagonal rotation ``R = diag(R_1, …, R_r)`` of the ``d`` features a layer reads,
``R_i = (I + Q_i)(I - Q_i)⁻¹`` with ``Q_i`` skew-symmetric (see :mod:`orthotune.functional.cayley`)::

    x ──► x R ──► base layer (frozen W) ──► y          (input-centric: no d × d matrix, no weight copy)
    merged:  W ↦ W Rᵀ                                   (identical outputs, no adapter at inference)

The layers keep peft 0.21.2's names, constructor arguments, defaults and parameter layout
(``oft_R[name].weight`` of shape ``(r, b(b-1)/2)``), and differ where peft is wrong: both Cayley modes mean
the same rotation, several adapters compose in the same order in forward and merge, ``module_dropout`` is
applied, COFT does not write into parameters during forward, and Conv2d's forward equals its merged layer.

``rotation_side="output"`` rotates what a layer writes instead (LyCORIS's ``diag-oft``), before the bias, with an
optional trainable per-output scale ``s`` (``rescale``)::

    x ──► base layer (frozen W) ──► (x Wᵀ) R ⊙ s + b      merged:  W ↦ s ⊙ (Rᵀ W)

The blocks then divide ``out_features`` (output channels for Conv2d).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from orthotune.adapter_layer import AdapterLayer
from orthotune.base_layer import LayerKind, weight_matrix
from orthotune.blocks import nearest_divisor, resolve_oft_blocks
from orthotune.functional import (
    NEUMANN_WARN_NORM,
    block_diagonal,
    cayley_exact,
    composed_generator,
    drop_blocks_to_identity,
    drop_factor_blocks_to_identity,
    lycoris_radius,
    neumann_norm_bound,
    output_scale_at_strength,
    packed_from_skew,
    packed_size,
    project_coft,
    project_packed_jointly,
    rotate_activations,
    rotate_outputs,
    rotate_samples,
    rotate_weight,
    rotate_weight_outputs,
    rotation_at_strength,
    rotation_compute_dtype,
    skew_from_packed,
    unrotate_weight,
    unrotate_weight_outputs,
)
from orthotune.functional.cayley import check_neumann_terms
from orthotune.functional.rotate import FEW_ROWS
from orthotune.validation import (
    check_coft_eps,
    check_constraint,
    check_init_weights,
    check_probability,
    check_rotation_side,
)

__all__ = [
    "Conv2d",
    "Embedding",
    "Linear",
    "MultiplicativeDropoutLayer",
    "OFTLayer",
    "OFTRotationModule",
    "layer_class",
]

#: How often (in calls) a Neumann-mode rotation checks how close it is to divergence; the check syncs a GPU.
_NEUMANN_CHECK_EVERY = 32


class MultiplicativeDropoutLayer(nn.Module):
    """Multiplicative dropout: in training, whole rotation blocks become the identity (BOFT paper, §3.4).

    Args:
        p: fraction of blocks dropped per call, in ``[0, 1)``.

    Shapes:
        ``(D, b, b)`` blocks: ``floor(p·D)`` of them are replaced. ``(m, D, b, b)`` butterfly factors: as in
        peft, the blocks of one randomly chosen factor are.
    """

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        check_probability("module_dropout", p)
        self.p = p

    def forward(self, blocks: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return blocks
        if blocks.ndim == 3:
            return drop_blocks_to_identity(blocks, self.p)
        return drop_factor_blocks_to_identity(blocks, self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class OFTRotationModule(nn.Module):
    """The parameters of one OFT adapter and the rotation they make.

    Args:
        r: number of stored blocks (1 with ``block_share``).
        n_elements: ``b(b-1)/2``, the packed size of one block.
        block_size: ``b``.
        in_features: ``d``, the width the rotation acts on (``r_total · b``).
        coft, eps: constrain each generator to ``‖Q‖_F ≤ eps/√r`` (``eps`` with one shared block).
        block_share: one block repeated ``d / b`` times.
        use_cayley_neumann, num_cayley_neumann_terms: Cayley-Neumann series instead of the exact solve.
        constraint: LyCORIS's ``alpha``: all generators together within ``‖Q‖_F ≤ constraint · in_features``
            (after the COFT projection, if any); 0 for none.
        rotation_side: ``"input"`` (the features a layer reads) or ``"output"`` (what it writes; then
            ``in_features`` is the layer's ``out_features``).
        rescale: on the output side, a trainable per-output scale ``s`` (LyCORIS's ``rescale``).

    Attributes:
        weight: ``(r, b(b-1)/2)``, the strict upper triangles of the skew generators, row-major in
            ``torch.triu_indices(b, b, 1)`` order (peft's layout).
        rescale: ``(in_features,)`` output scale, or ``None``.
    """

    def __init__(
        self,
        r: int,
        n_elements: int,
        block_size: int,
        in_features: int,
        coft: bool = False,
        eps: float = 6e-5,
        block_share: bool = False,
        use_cayley_neumann: bool = False,
        num_cayley_neumann_terms: int = 5,
        constraint: float = 0.0,
        rotation_side: str = "input",
        rescale: bool = False,
    ) -> None:
        super().__init__()
        if n_elements != packed_size(block_size):
            raise ValueError(f"n_elements={n_elements} must be block_size*(block_size-1)/2 = {packed_size(block_size)}")
        self.r = r
        self.n_elements = n_elements
        self.block_size = block_size
        self.in_features = in_features
        self.coft = coft
        self.eps = eps
        self.block_share = block_share
        self.use_cayley_neumann = use_cayley_neumann
        self.num_cayley_neumann_terms = num_cayley_neumann_terms
        self.constraint = constraint
        self.rotation_side = rotation_side
        self.weight = nn.Parameter(torch.zeros(r, n_elements))
        self.rescale = nn.Parameter(torch.ones(in_features)) if rescale else None
        self._calls = 0
        self._warned_neumann = False
        self._checked_strength = 1.0

    @property
    def num_blocks(self) -> int:
        """Blocks along the width, counting every repeat of a shared block."""
        return self.in_features // self.block_size

    def packed_generators(self) -> torch.Tensor:
        """``(r, b(b-1)/2)`` packed generators in fp32 as the rotation uses them (COFT-projected when ``coft``,
        then held within LyCORIS's joint bound when ``constraint``)."""
        packed = self.weight.float()
        if self.coft:
            packed = project_coft(packed, self.eps)
        return project_packed_jointly(packed, lycoris_radius(self.constraint, self.in_features))

    def generators(self) -> torch.Tensor:
        """``(r, b, b)`` skew generators in fp32, after the COFT projection when ``coft``."""
        return skew_from_packed(self.packed_generators(), self.block_size)

    def rotation_blocks(self, strength: float = 1.0) -> torch.Tensor:
        """``(r, b, b)`` fp32 rotations ``R(t·Q)`` at strength ``t`` (one block with ``block_share``)."""
        if self.use_cayley_neumann:
            self._check_neumann_convergence(strength)
        return rotation_at_strength(self.generators(), strength, self.use_cayley_neumann, self.num_cayley_neumann_terms)

    def exact_rotation_blocks(self, strength: float = 1.0) -> torch.Tensor:
        """``(r, b, b)`` float64 exact Cayley rotations ``R(t·Q)``, whatever the mode (for composing adapters)."""
        return cayley_exact(strength * self.generators().double())

    def _check_neumann_convergence(self, strength: float) -> None:
        # The check reads a value back to the host (a GPU sync, a graph break): skip it when compiling, and
        # otherwise do it only every few calls, until it has warned once. A new strength is checked at once.
        if self._warned_neumann or torch.compiler.is_compiling():
            return
        if strength != self._checked_strength:
            self._checked_strength = strength
            self._calls = 0
        self._calls += 1
        if (self._calls - 1) % _NEUMANN_CHECK_EVERY:
            return
        with torch.no_grad():
            # The series runs on t·Q: a strength scales the norm that decides convergence.
            bound = abs(strength) * float(neumann_norm_bound(self.packed_generators()).max())
        if bound >= NEUMANN_WARN_NORM:
            self._warned_neumann = True
            at_strength = f" at strength {strength:g}" if strength != 1 else ""
            warnings.warn(
                f"an OFT block has ‖Q‖₂ up to {bound:.3f}{at_strength}; the Cayley-Neumann series with "
                f"num_cayley_neumann_terms={self.num_cayley_neumann_terms} diverges at 1 and is off from an "
                f"orthogonal matrix by about {bound ** (self.num_cayley_neumann_terms - 1):.2g}; "
                "use the exact Cayley transform (use_cayley_neumann=False)"
                + (
                    ", a smaller learning rate or a smaller strength"
                    if strength != 1
                    else " or a smaller learning rate"
                ),
                stacklevel=3,
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate activations ``x: (..., d)`` to ``x R`` (in the dtype of ``x``)."""
        return rotate_activations(x, self.rotation_blocks().to(x.dtype))

    def get_weight(self, strength: float = 1.0) -> torch.Tensor:
        """The dense ``(d, d)`` block-diagonal rotation at ``strength`` (for inspection; forward never builds it)."""
        return block_diagonal(self.rotation_blocks(strength), self.num_blocks)

    def extra_repr(self) -> str:
        mode = f"neumann({self.num_cayley_neumann_terms})" if self.use_cayley_neumann else "exact"
        return (
            f"r={self.r}, block_size={self.block_size}, in_features={self.in_features}, cayley={mode}, "
            f"coft={self.coft}, block_share={self.block_share}"
            + (f", constraint={self.constraint}" if self.constraint else "")
            + (
                f", rotation_side={self.rotation_side!r}, rescale={self.rescale is not None}"
                if self.rotation_side == "output"
                else ""
            )
        )


@functools.cache
def _identity(size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A shared ``size × size`` identity (never written to): the rotation of samples that use no adapter."""
    return torch.eye(size, dtype=dtype, device=device)


class OFTLayer(AdapterLayer):
    """Shared OFT bookkeeping; use :class:`Linear`, :class:`Conv2d` or :class:`Embedding`."""

    adapter_layer_names: tuple[str, ...] = ("oft_R",)
    other_param_names: tuple[str, ...] = ("r", "oft_block_size", "oft_dropout")
    constructor_arguments: tuple[str, ...] = (
        "r",
        "oft_block_size",
        "module_dropout",
        "coft",
        "eps",
        "block_share",
        "use_cayley_neumann",
        "num_cayley_neumann_terms",
        "init_weights",
        "fan_in_fan_out",
        "is_target_conv_1d_layer",
    )

    def _create_adapter_holders(self) -> None:
        self.oft_R = nn.ModuleDict()
        self.oft_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.oft_block_size: dict[str, int] = {}

    def adjust_oft_parameters(self, in_features: int, params: int) -> int:
        """The divisor of ``in_features`` nearest to ``params``, ties going lower (peft's rule)."""
        return nearest_divisor(in_features, params)

    def update_layer(
        self,
        adapter_name: str,
        r: int = 8,
        oft_block_size: int = 0,
        module_dropout: float = 0.0,
        coft: bool = False,
        eps: float = 6e-5,
        block_share: bool = False,
        init_weights: bool = True,
        use_cayley_neumann: bool = False,
        num_cayley_neumann_terms: int = 5,
        inference_mode: bool = False,
        rotation_side: str = "input",
        rescale: bool = False,
        constraint: float = 0.0,
        **kwargs: Any,
    ) -> None:
        """Add (or replace) the adapter ``adapter_name`` with trainable rotation parameters.

        ``rotation_side="output"`` rotates the layer's outputs (blocks dividing ``out_features``), ``rescale``
        adds a per-output scale there, and ``constraint`` is LyCORIS's joint bound (see
        :class:`OFTRotationModule`).
        """
        if kwargs:
            raise TypeError(f"unexpected OFT arguments {sorted(kwargs)}; see orthotune.oft.OFTLayer.update_layer")
        check_init_weights(init_weights)
        check_probability("module_dropout", module_dropout)
        if use_cayley_neumann:
            check_neumann_terms(num_cayley_neumann_terms)
        if coft:
            check_coft_eps(eps)
        check_rotation_side(rotation_side)
        check_constraint(constraint)
        output_side = rotation_side == "output"
        if output_side and self.kind is LayerKind.EMBEDDING:
            raise ValueError(
                "rotation_side='output' is not for nn.Embedding: OFT on an embedding already rotates the features "
                "it outputs; use rotation_side='input'"
            )
        if rescale and not output_side:
            raise ValueError("rescale=True scales the rotated outputs; it needs rotation_side='output'")
        features = self.out_features if output_side else self.rotated_features
        r, block_size = resolve_oft_blocks(features, r, oft_block_size, stacklevel=3)
        rotation = OFTRotationModule(
            1 if block_share else r,
            packed_size(block_size),
            block_size,
            features,
            coft=coft,
            eps=eps,
            block_share=block_share,
            use_cayley_neumann=use_cayley_neumann,
            num_cayley_neumann_terms=num_cayley_neumann_terms,
            constraint=constraint,
            rotation_side=rotation_side,
            rescale=rescale,
        )
        self.oft_R[adapter_name] = rotation.to(self._adapter_device())
        self.oft_dropout[adapter_name] = MultiplicativeDropoutLayer(module_dropout)
        self.r[adapter_name] = r
        self.oft_block_size[adapter_name] = block_size
        self.reset_oft_parameters(adapter_name, init_weights)
        self._register_new_adapter(adapter_name, inference_mode)

    def rotation_module(self, adapter_name: str) -> OFTRotationModule:
        """The parameters and settings of one adapter (``oft_R[adapter_name]``, typed)."""
        rotation = self.oft_R[adapter_name]
        assert isinstance(rotation, OFTRotationModule)
        return rotation

    def _dropout(self, adapter_name: str) -> MultiplicativeDropoutLayer:
        dropout = self.oft_dropout[adapter_name]
        assert isinstance(dropout, MultiplicativeDropoutLayer)
        return dropout

    def reset_oft_parameters(self, adapter_name: str, init_weights: bool) -> None:
        """``True``: zeros (the identity rotation), unit scale. ``False``: small random generators, N(0, 0.1²),
        and scales N(1, 0.1²) (BOFT's rule for its scale)."""
        check_init_weights(init_weights)
        rotation = self.rotation_module(adapter_name)
        weight, scale = rotation.weight, rotation.rescale
        if init_weights:
            nn.init.zeros_(weight)
            if scale is not None:
                nn.init.ones_(scale)
        else:
            nn.init.normal_(weight, mean=0.0, std=0.1)
            if scale is not None:
                nn.init.normal_(scale, mean=1.0, std=0.1)

    def _rotation_blocks(self, adapter_name: str) -> torch.Tensor:
        """fp32 blocks as forward uses them: dropout applied in training, shared blocks repeated only then."""
        rotation = self.rotation_module(adapter_name)
        strength = self.strength(adapter_name)
        settings = (
            rotation.coft,
            rotation.eps,
            rotation.constraint,
            rotation.use_cayley_neumann,
            rotation.num_cayley_neumann_terms,
            strength,
        )
        blocks = self._cached_rotation(
            adapter_name, lambda: rotation.rotation_blocks(strength), (rotation.weight,), settings
        )
        dropout = self._dropout(adapter_name)
        if dropout.training and dropout.p > 0:
            blocks = dropout(blocks.expand(rotation.num_blocks, -1, -1))
        return blocks

    def _output_scale(self, adapter_name: str) -> torch.Tensor | None:
        """The ``(out_features,)`` scale of an output-side adapter made with ``rescale=True`` at its strength
        (``s^t``, as BOFT's output scale), else ``None``."""
        scale = self.rotation_module(adapter_name).rescale
        return None if scale is None else output_scale_at_strength(scale, self.strength(adapter_name))

    def _rotates_outputs(self, adapter_name: str) -> bool:
        return self.rotation_module(adapter_name).rotation_side == "output"

    def _rotate_layer_outputs(self, result: torch.Tensor, names: list[str]) -> torch.Tensor:
        """``(y R_a ⊙ s_a) R_b ⊙ s_b … + b`` for the output-side adapters ``names`` (in active order).

        ``result`` is the base layer's output, bias included. The bias is not rotated (it is not in the merged
        weight ``s ⊙ Rᵀ W``), so the rotated bias is replaced by the bias: rotating the whole output and adding
        ``b - chain(b)`` costs one vector-sized product, where removing the bias first would cost a pass over
        the output, and works for any base layer (a quantized one, say).
        """
        bias = getattr(self.base_layer, "bias", None)
        rotated_bias = None if bias is None else bias.float()
        for name in names:
            blocks = self._rotation_blocks(name)  # fp32; the same dropout draw for the output and the bias
            scale = self._output_scale(name)
            result = rotate_outputs(result, blocks.to(result.dtype), None if scale is None else scale.to(result.dtype))
            if rotated_bias is not None:
                rotated_bias = rotate_outputs(rotated_bias, blocks, None if scale is None else scale.float())
        if bias is None:
            return result
        return result + (bias.float() - rotated_bias).to(result.dtype)

    def _weight_blocks(self, adapter_name: str) -> torch.Tensor:
        """Blocks ``B`` with merged weight ``W Bᵀ``: ``R`` for a layer that reads features, ``Rᵀ`` for an embedding."""
        blocks = self.rotation_module(adapter_name).rotation_blocks(self.strength(adapter_name))
        return blocks.transpose(-1, -2) if self.rotates_output else blocks

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The dense ``(d, d)`` rotation ``R`` of one adapter at its strength (activations map as ``x ↦ x R``)."""
        return self.rotation_module(adapter_name).get_weight(self.strength(adapter_name))

    def composed_parameters(self, adapter_names: list[str], strengths: list[float]) -> dict[str, torch.Tensor]:
        """Packed generators of the one adapter that equals ``adapter_names`` active together, at ``strengths``.

        The sources' exact Cayley rotations ``R(t·Q)`` are multiplied block by block in the order this layer
        applies them (the last active adapter first on an input, the first on an embedding's output) and the
        product is mapped back by the inverse Cayley transform. A source in Cayley-Neumann mode contributes
        the exact rotation its parameters stand for (the series only approximates it), so the result is an
        exact-mode adapter. COFT sources contribute their projected generators; the product is not projected.

        Returns:
            ``{"oft_R": (r, b(b-1)/2)}`` float32 packed generators: one row when every source shares one block
            (``block_share``), else one per block.

        Raises:
            ValueError: if the sources differ in block size (naming them), or the product turns some plane by
                180° (see :func:`~orthotune.functional.cayley_inverse`).
        """
        lycoris_style = [
            name for name in adapter_names if self._rotates_outputs(name) or self.rotation_module(name).constraint
        ]
        if lycoris_style:
            raise ValueError(
                f"cannot compose adapters {lycoris_style}: composition is implemented for input-side adapters "
                "without a constraint (rotation_side='input', constraint=0); merge them instead"
            )
        sizes = {name: self.oft_block_size[name] for name in adapter_names}
        if len(set(sizes.values())) > 1:
            raise ValueError(
                f"cannot compose OFT adapters of different block sizes {sizes} in one layer: the product of "
                "block-diagonal rotations with different blocks is not block-diagonal with either; compose adapters "
                "trained with the same oft_block_size (or r)"
            )
        rotations = [
            self.rotation_module(name).exact_rotation_blocks(strength)
            for name, strength in zip(adapter_names, strengths, strict=True)
        ]
        if any(rotation.shape[0] != 1 for rotation in rotations):  # not all shared: every block on its own
            num_blocks = self.rotation_module(adapter_names[0]).num_blocks
            rotations = [rotation.expand(num_blocks, -1, -1) for rotation in rotations]
        acting_order = rotations if self.rotates_output else rotations[::-1]
        return {"oft_R": packed_from_skew(composed_generator(acting_order)).float()}

    def adapter_tensors(self, adapter_name: str) -> dict[str, torch.Tensor]:
        key = "oft_embedding_R" if self.kind is LayerKind.EMBEDDING else "oft_R"
        rotation = self.rotation_module(adapter_name)
        tensors: dict[str, torch.Tensor] = {f"{key}.weight": rotation.weight}
        if rotation.rescale is not None:  # an output-side adapter's scale (not a peft key)
            tensors[f"{key}.rescale"] = rotation.rescale
        return tensors

    def _merged_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        if self._rotates_outputs(adapter_name):
            scale = self._output_scale(adapter_name)
            blocks = self.rotation_module(adapter_name).rotation_blocks()
            return rotate_weight_outputs(weight, blocks, None if scale is None else scale.float())
        return rotate_weight(weight, self._weight_blocks(adapter_name))

    def _unmerged_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        if self._rotates_outputs(adapter_name):
            scale = self._output_scale(adapter_name)
            blocks = self.rotation_module(adapter_name).rotation_blocks()
            return unrotate_weight_outputs(weight, blocks, None if scale is None else scale.float())
        return unrotate_weight(weight, self._weight_blocks(adapter_name))

    def __repr__(self) -> str:
        return "oft." + super().__repr__()


class Linear(OFTLayer):
    """OFT on ``nn.Linear``, transformers' ``Conv1D`` (``fan_in_fan_out=True``) or any layer with
    ``in_features``/``out_features`` (a quantized linear, say): the input is rotated, the base layer runs
    untouched, and nothing but :meth:`merge` reads its weight.

    Shapes:
        ``x: (..., in_features)`` → ``(..., out_features)``, in the dtype of ``x``.
    """

    @property
    def _adapters_only_rotate_input(self) -> bool:  # type: ignore[override]
        return not any(self._rotates_outputs(name) for name in self.adapter_names)

    def _rotated_input(self, x: torch.Tensor, active: list[str], row_major: bool | None = None) -> torch.Tensor:
        """``x R_{last} ⋯ R_{first}`` for the input-side adapters of ``active``: what the base layer reads
        (row-major where it must be, see ``rotate_activations`` for the layout ``None`` picks)."""
        compute_dtype = rotation_compute_dtype(x.device, x.dtype)
        row_major = row_major if self._base_reads_any_layout else True
        for name in reversed(active):  # the first active adapter sits next to the base layer
            if self._rotates_outputs(name):
                continue
            blocks = self._rotation_blocks(name)
            if blocks.dtype != compute_dtype:
                blocks = blocks.to(compute_dtype)
            x = rotate_activations(x, blocks, row_major=row_major)
        return x

    def _adapted_forward(self, x: torch.Tensor, active: list[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        # The first active adapter sits next to the base layer on either side. Input and output rotations
        # multiply W from opposite sides, so they commute and their merges may interleave in any order.
        result = self._base_forward_on_rotated(self._rotated_input(x, active), *args, **kwargs)
        outputs = [name for name in active if self._rotates_outputs(name)]
        return self._rotate_layer_outputs(result, outputs) if outputs else result

    def _rotate_each_sample(self, x: torch.Tensor, adapter_names: Sequence[str]) -> torch.Tensor | None:
        """One product for a mixed batch of at most ``FEW_ROWS`` rows (generation) whose adapters share a block
        size; ``"__base__"`` and adapters this layer lacks get the identity (exact for finite activations)."""
        rows = x.numel() // x.shape[-1]
        if rows > FEW_ROWS or x.shape[0] % len(adapter_names):
            return None
        compute_dtype = rotation_compute_dtype(x.device, x.dtype)
        blocks = {}
        for name in set(adapter_names).intersection(self.oft_R):
            kept = self._rotation_blocks(name)
            kept = kept if kept.dtype == compute_dtype else kept.to(compute_dtype)
            blocks[name] = kept if kept.shape[0] == self.r[name] else kept.expand(self.r[name], -1, -1)
        shapes = {tuple(b.shape) for b in blocks.values()}
        if len(shapes) != 1:
            return None
        num_blocks, block_size, _ = shapes.pop()
        identity = _identity(block_size, compute_dtype, x.device).expand(num_blocks, -1, -1)
        per_sample = x.shape[0] // len(adapter_names)  # beams, returned sequences: consecutive rows per name
        return rotate_samples(x, [blocks.get(name, identity) for name in adapter_names for _ in range(per_sample)])


class Conv2d(OFTLayer):
    """OFT on ``nn.Conv2d`` (``groups=1``): rotates the ``in_channels·kh·kw`` features of every patch, or with
    ``rotation_side="output"`` the output channels (``W ↦ s ⊙ Rᵀ W``, rows of the flattened weight).

    Forward rotates the weight (``W ↦ W Rᵀ``, ``out·d·b`` multiply-adds, no ``d × d`` matrix) and runs the
    base convolution with it, so stride, padding, padding mode, dilation and non-square kernels behave exactly
    as in the merged layer. Rotating the activations instead would mean unfolding every patch: ``kh·kw`` times
    the activation memory, for the same result.

    Shapes:
        ``x: (N, C_in, H, W)`` → ``(N, C_out, H', W')``.
    """

    def _adapted_forward(self, x: torch.Tensor, active: list[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        base: Any = self.base_layer
        weight = weight_matrix(base, self.kind)
        for name in active:  # merge order: the first active adapter is applied to W first
            blocks = self._rotation_blocks(name).to(rotation_compute_dtype(weight.device, weight.dtype))
            if self._rotates_outputs(name):
                scale = self._output_scale(name)
                weight = rotate_weight_outputs(weight, blocks, None if scale is None else scale.to(blocks.dtype))
            else:
                weight = rotate_weight(weight, blocks)
        return base._conv_forward(x, weight.reshape(base.weight.shape), base.bias)


class Embedding(OFTLayer):
    """OFT on ``nn.Embedding``: rotates the ``embedding_dim`` features of each looked-up row (``E ↦ E R``).

    peft stores these parameters under ``oft_embedding_R``; the attribute is an alias of ``oft_R`` here.

    Shapes:
        ``x: (...)`` token ids → ``(..., embedding_dim)``.
    """

    @property
    def oft_embedding_R(self) -> nn.ModuleDict:
        return self.oft_R

    def _adapted_forward(self, x: torch.Tensor, active: list[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        for name in active:  # the first active adapter sits next to the base layer
            blocks = self._rotation_blocks(name).to(rotation_compute_dtype(result.device, result.dtype))
            result = rotate_activations(result, blocks)
        return result


def layer_class(kind: LayerKind) -> type[OFTLayer]:
    """The OFT layer class for a base layer of ``kind``."""
    return {LayerKind.EMBEDDING: Embedding, LayerKind.CONV2D: Conv2d}.get(kind, Linear)
