"""OFT and constrained OFT (COFT) layers (Qiu et al., 2023, arXiv:2306.07280; OFTv2, arXiv:2506.19847).

Each adapter is a block-diagonal rotation ``R = diag(R_1, …, R_r)`` of the ``d`` features a layer reads,
``R_i = (I + Q_i)(I - Q_i)⁻¹`` with ``Q_i`` skew-symmetric (see :mod:`orthotune.functional.cayley`)::

    x ──► x R ──► base layer (frozen W) ──► y          (input-centric: no d × d matrix, no weight copy)
    merged:  W ↦ W Rᵀ                                   (identical outputs, no adapter at inference)

The layers keep peft 0.21.2's names, constructor arguments, defaults and parameter layout
(``oft_R[name].weight`` of shape ``(r, b(b-1)/2)``), and differ where peft is wrong: both Cayley modes mean
the same rotation, several adapters compose in the same order in forward and merge, ``module_dropout`` is
applied, COFT does not write into parameters during forward, and Conv2d's forward equals its merged layer.
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from orthotune.adapter_layer import AdapterLayer, check_init_weights
from orthotune.base_layer import LayerKind, weight_matrix
from orthotune.functional import (
    NEUMANN_WARN_NORM,
    block_diagonal,
    cayley_transform,
    drop_blocks_to_identity,
    drop_factor_blocks_to_identity,
    neumann_norm_bound,
    packed_size,
    project_coft,
    rotate_activations,
    rotate_samples,
    rotate_weight,
    rotation_compute_dtype,
    skew_from_packed,
    unrotate_weight,
)
from orthotune.functional.rotate import FEW_ROWS

logger = logging.getLogger(__name__)

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
        _check_dropout("module_dropout", p)
        self.p = p

    def forward(self, blocks: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return blocks
        if blocks.ndim == 3:
            return drop_blocks_to_identity(blocks, self.p)
        return drop_factor_blocks_to_identity(blocks, self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def _check_dropout(argument: str, p: float) -> None:
    if not 0.0 <= p < 1.0:
        raise ValueError(f"{argument}={p} is not a probability in [0, 1); use e.g. 0.0 (off) or 0.1")


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

    Attributes:
        weight: ``(r, b(b-1)/2)``, the strict upper triangles of the skew generators, row-major in
            ``torch.triu_indices(b, b, 1)`` order (peft's layout).
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
        self.weight = nn.Parameter(torch.zeros(r, n_elements))
        self._calls = 0
        self._warned_neumann = False

    @property
    def num_blocks(self) -> int:
        """Blocks along the width, counting every repeat of a shared block."""
        return self.in_features // self.block_size

    def packed_generators(self) -> torch.Tensor:
        """``(r, b(b-1)/2)`` packed generators in fp32 as the rotation uses them (COFT-projected when ``coft``)."""
        packed = self.weight.float()
        return project_coft(packed, self.eps) if self.coft else packed

    def generators(self) -> torch.Tensor:
        """``(r, b, b)`` skew generators in fp32, after the COFT projection when ``coft``."""
        return skew_from_packed(self.packed_generators(), self.block_size)

    def rotation_blocks(self) -> torch.Tensor:
        """``(r, b, b)`` fp32 rotations (one block with ``block_share``)."""
        if self.use_cayley_neumann:
            self._check_neumann_convergence()
        return cayley_transform(self.generators(), self.use_cayley_neumann, self.num_cayley_neumann_terms)

    def _check_neumann_convergence(self) -> None:
        # The check reads a value back to the host (a GPU sync, a graph break): skip it when compiling, and
        # otherwise do it only every few calls, until it has warned once.
        if self._warned_neumann or torch.compiler.is_compiling():
            return
        self._calls += 1
        if (self._calls - 1) % _NEUMANN_CHECK_EVERY:
            return
        with torch.no_grad():
            bound = float(neumann_norm_bound(self.packed_generators()).max())
        if bound >= NEUMANN_WARN_NORM:
            self._warned_neumann = True
            warnings.warn(
                f"an OFT block has ‖Q‖₂ up to {bound:.3f}; the Cayley-Neumann series with "
                f"num_cayley_neumann_terms={self.num_cayley_neumann_terms} diverges at 1 and is off from an "
                f"orthogonal matrix by about {bound ** (self.num_cayley_neumann_terms - 1):.2g}; "
                "use the exact Cayley transform (use_cayley_neumann=False) or a smaller learning rate",
                stacklevel=3,
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate activations ``x: (..., d)`` to ``x R`` (in the dtype of ``x``)."""
        return rotate_activations(x, self.rotation_blocks().to(x.dtype))

    def get_weight(self) -> torch.Tensor:
        """The dense ``(d, d)`` block-diagonal rotation (for inspection; forward never builds it)."""
        return block_diagonal(self.rotation_blocks(), self.num_blocks)

    def extra_repr(self) -> str:
        mode = f"neumann({self.num_cayley_neumann_terms})" if self.use_cayley_neumann else "exact"
        return (
            f"r={self.r}, block_size={self.block_size}, in_features={self.in_features}, cayley={mode}, "
            f"coft={self.coft}, block_share={self.block_share}"
        )


@functools.cache
def _identity(size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A shared ``size × size`` identity (never written to): the rotation of samples that use no adapter."""
    return torch.eye(size, dtype=dtype, device=device)


def nearest_divisor(features: int, value: int) -> int:
    """The divisor of ``features`` closest to ``value``, the lower one on a tie (peft's rule)."""
    if value >= features:
        return features
    divisors = [k for k in range(1, features + 1) if features % k == 0]
    return min(divisors, key=lambda k: (abs(k - value), k))


def _divisors_near(features: int, value: int, count: int = 4) -> list[int]:
    divisors = [k for k in range(1, features + 1) if features % k == 0]
    return sorted(sorted(divisors, key=lambda k: (abs(k - value), k))[:count])


class OFTLayer(AdapterLayer):
    """Shared OFT bookkeeping; use :class:`Linear`, :class:`Conv2d` or :class:`Embedding`."""

    adapter_layer_names: tuple[str, ...] = ("oft_R",)
    other_param_names: tuple[str, ...] = ("r", "oft_block_size", "oft_dropout")

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        super().__init__(base_layer)
        self.oft_R = nn.ModuleDict()
        self.oft_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.oft_block_size: dict[str, int] = {}
        self.kwargs = kwargs

    def adjust_oft_parameters(self, in_features: int, params: int) -> int:
        """The divisor of ``in_features`` nearest to ``params``, ties going lower (peft's rule)."""
        return nearest_divisor(in_features, params)

    def _resolve_blocks(self, r: int, oft_block_size: int) -> tuple[int, int]:
        features = self.rotated_features
        for argument, value in (("r", r), ("oft_block_size", oft_block_size)):
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{argument}={value!r} must be a non-negative integer; set it to 0 to derive it")
        if r == 0 and oft_block_size == 0:
            raise ValueError(
                f"r=0 and oft_block_size=0: set exactly one of them (the number of blocks or their size), "
                f"e.g. oft_block_size={nearest_divisor(features, 32)} for {features} features"
            )
        if r and oft_block_size:
            if r * oft_block_size != features:
                raise ValueError(
                    f"r={r} and oft_block_size={oft_block_size} give {r * oft_block_size} features but the layer "
                    f"has {features}; set one of them to 0 so the other decides"
                )
            return r, oft_block_size
        argument, value = ("r", r) if r else ("oft_block_size", oft_block_size)
        if features % value:
            adjusted = self.adjust_oft_parameters(features, value)
            warnings.warn(
                f"{argument}={value} does not divide the layer's {features} features; adjusted {argument} to "
                f"{adjusted} (nearby divisors: {_divisors_near(features, value)})",
                stacklevel=4,
            )
            value = adjusted
        return (value, features // value) if r else (features // value, value)

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
        **kwargs: Any,
    ) -> None:
        """Add (or replace) the adapter ``adapter_name`` with trainable rotation parameters."""
        if kwargs:
            raise TypeError(f"unexpected OFT arguments {sorted(kwargs)}; see orthotune.oft.OFTLayer.update_layer")
        check_init_weights(init_weights)
        _check_dropout("module_dropout", module_dropout)
        if use_cayley_neumann and num_cayley_neumann_terms < 2:
            raise ValueError(
                f"num_cayley_neumann_terms={num_cayley_neumann_terms} is too few: the series needs at least 2; use 5"
            )
        if coft and not eps > 0:
            raise ValueError(f"eps={eps} must be positive with coft=True; peft's default is 6e-5")
        r, block_size = self._resolve_blocks(r, oft_block_size)
        rotation = OFTRotationModule(
            1 if block_share else r,
            packed_size(block_size),
            block_size,
            self.rotated_features,
            coft=coft,
            eps=eps,
            block_share=block_share,
            use_cayley_neumann=use_cayley_neumann,
            num_cayley_neumann_terms=num_cayley_neumann_terms,
        )
        self.oft_R[adapter_name] = rotation.to(self._adapter_device())
        self.oft_dropout[adapter_name] = MultiplicativeDropoutLayer(module_dropout)
        self.r[adapter_name] = r
        self.oft_block_size[adapter_name] = block_size
        self.reset_oft_parameters(adapter_name, init_weights)
        self._register_new_adapter(adapter_name, inference_mode)

    def reset_oft_parameters(self, adapter_name: str, init_weights: bool) -> None:
        """``True``: zeros (the identity rotation). ``False``: small random generators, N(0, 0.1²)."""
        check_init_weights(init_weights)
        weight = self.oft_R[adapter_name].weight
        if init_weights:
            nn.init.zeros_(weight)
        else:
            nn.init.normal_(weight, mean=0.0, std=0.1)

    def _rotation_blocks(self, adapter_name: str) -> torch.Tensor:
        """fp32 blocks as forward uses them: dropout applied in training, shared blocks repeated only then."""
        rotation = self.oft_R[adapter_name]
        settings = (rotation.coft, rotation.eps, rotation.use_cayley_neumann, rotation.num_cayley_neumann_terms)
        blocks = self._cached_rotation(adapter_name, rotation.rotation_blocks, (rotation.weight,), settings)
        dropout = self.oft_dropout[adapter_name]
        if dropout.training and dropout.p > 0:
            blocks = dropout(blocks.expand(rotation.num_blocks, -1, -1))
        return blocks

    def _weight_blocks(self, adapter_name: str) -> torch.Tensor:
        """Blocks ``B`` with merged weight ``W Bᵀ``: ``R`` for a layer that reads features, ``Rᵀ`` for an embedding."""
        blocks = self.oft_R[adapter_name].rotation_blocks()
        return blocks.transpose(-1, -2) if self.rotates_output else blocks

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The dense ``(d, d)`` rotation ``R`` of one adapter (activations map as ``x ↦ x R``)."""
        return self.oft_R[adapter_name].get_weight()

    def _merged_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        return rotate_weight(weight, self._weight_blocks(adapter_name))

    def _unmerged_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        return unrotate_weight(weight, self._weight_blocks(adapter_name))

    def __repr__(self) -> str:
        return "oft." + super().__repr__()


class _OFTConstructor(OFTLayer):
    """The spec's constructor, shared by every OFT layer class."""

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        r: int = 8,
        oft_block_size: int = 0,
        module_dropout: float = 0.0,
        coft: bool = False,
        eps: float = 6e-5,
        block_share: bool = False,
        use_cayley_neumann: bool = False,
        num_cayley_neumann_terms: int = 5,
        init_weights: bool = True,
        fan_in_fan_out: bool = False,
        is_target_conv_1d_layer: bool = False,
        inference_mode: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(base_layer, **kwargs)
        self.fan_in_fan_out = _checked_fan_in_fan_out(self.kind, fan_in_fan_out)
        self.is_target_conv_1d_layer = is_target_conv_1d_layer
        self.update_layer(
            adapter_name,
            r=r,
            oft_block_size=oft_block_size,
            module_dropout=module_dropout,
            coft=coft,
            eps=eps,
            block_share=block_share,
            init_weights=init_weights,
            use_cayley_neumann=use_cayley_neumann,
            num_cayley_neumann_terms=num_cayley_neumann_terms,
            inference_mode=inference_mode,
        )


def _checked_fan_in_fan_out(kind: LayerKind, fan_in_fan_out: bool) -> bool:
    """The layer's true weight layout; a wrong flag is corrected with a warning, as peft does."""
    actual = kind is LayerKind.CONV1D
    if fan_in_fan_out != actual:
        warnings.warn(
            f"fan_in_fan_out={fan_in_fan_out} does not match the base layer, whose weight is stored as "
            f"{'(in, out)' if actual else '(out, in)'}; using fan_in_fan_out={actual}",
            stacklevel=4,
        )
    return actual


class Linear(_OFTConstructor):
    """OFT on ``nn.Linear``, transformers' ``Conv1D`` (``fan_in_fan_out=True``) or any layer with
    ``in_features``/``out_features`` (a quantized linear, say): the input is rotated, the base layer runs
    untouched, and nothing but :meth:`merge` reads its weight.

    Shapes:
        ``x: (..., in_features)`` → ``(..., out_features)``, in the dtype of ``x``.
    """

    _adapters_only_rotate_input = True

    def _rotated_input(self, x: torch.Tensor, active: list[str], row_major: bool | None = None) -> torch.Tensor:
        """``x R_{last} ⋯ R_{first}``: what the base layer reads (row-major where it must be, see
        ``rotate_activations`` for the layout ``None`` picks)."""
        compute_dtype = rotation_compute_dtype(x.device, x.dtype)
        row_major = row_major if self._base_reads_any_layout else True
        for name in reversed(active):  # the first active adapter sits next to the base layer
            blocks = self._rotation_blocks(name)
            if blocks.dtype != compute_dtype:
                blocks = blocks.to(compute_dtype)
            x = rotate_activations(x, blocks, row_major=row_major)
        return x

    def _adapted_forward(self, x: torch.Tensor, active: list[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._base_forward_on_rotated(self._rotated_input(x, active), *args, **kwargs)

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


class Conv2d(_OFTConstructor):
    """OFT on ``nn.Conv2d`` (``groups=1``): rotates the ``in_channels·kh·kw`` features of every patch.

    Forward rotates the weight (``W ↦ W Rᵀ``, ``out·d·b`` multiply-adds, no ``d × d`` matrix) and runs the
    base convolution with it, so stride, padding, padding mode, dilation and non-square kernels behave exactly
    as in the merged layer. Rotating the activations instead would mean unfolding every patch: ``kh·kw`` times
    the activation memory, for the same result.

    Shapes:
        ``x: (N, C_in, H, W)`` → ``(N, C_out, H', W')``.
    """

    def _adapted_forward(self, x: torch.Tensor, active: list[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        base = self.base_layer
        weight = weight_matrix(base, self.kind)
        for name in active:  # merge order: the first active adapter is applied to W first
            blocks = self._rotation_blocks(name).to(rotation_compute_dtype(weight.device, weight.dtype))
            weight = rotate_weight(weight, blocks)
        return base._conv_forward(x, weight.reshape(base.weight.shape), base.bias)


class Embedding(_OFTConstructor):
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
