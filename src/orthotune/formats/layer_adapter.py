"""One layer's orthogonal adapter as another tool's file describes it, in orthotune's conventions.

Every reader of a foreign format (LyCORIS, kohya, OneTrainer) turns a file into ``{module name: LayerAdapter}``
and every writer takes that mapping back, so converting a file is two small pure functions and loading it into a
model is :func:`add_layer_adapter` per layer. The tensors are already in this library's layout and sign
conventions (packed generators meaning ``R = (I + Q)(I - Q)⁻¹``, rotations acting on row vectors), so nothing
downstream needs to know which tool wrote the file.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from orthotune.adapter_layer import AdapterLayer
from orthotune.base_layer import LayerKind
from orthotune.boft import BOFTLayer
from orthotune.config import BOFTConfig, OFTConfig
from orthotune.functional import packed_size
from orthotune.oft import OFTLayer
from orthotune.validation import check_constraint, check_rotation_side

METHODS = ("oft", "boft")


@dataclass
class LayerAdapter:
    """The adapter of one layer, as read from (or to be written to) a file.

    Attributes:
        method: ``"oft"`` (block-diagonal rotation) or ``"boft"`` (butterfly product).
        generators: ``oft``: ``(r, b(b-1)/2)`` packed strict upper triangles of the skew generators ``Q`` (``r = 1``
            with ``block_share``), the layout of ``oft_R[name].weight``. ``boft``: ``(m, D, b, b)`` matrices ``A``
            with ``Q = (Aᵀ - A)/2``, the layout of ``boft_R[name]``. float32.
        block_size: ``b``.
        num_blocks: ``D``, blocks along the rotated width (per factor for ``boft``; counting the repeats of a
            shared block), so the width is ``D · b``. 0 for a ``block_share`` OFT adapter whose file does not say
            the width (OneTrainer's): the shared block then repeats over whatever width the layer has.
        rotation_side: ``"input"`` (the features the layer reads, ``W ↦ W Rᵀ``) or ``"output"`` (what it writes,
            before the bias, ``W ↦ s ⊙ (Rᵀ W)``). A ``boft`` adapter's butterfly is peft's on the input side and
            LyCORIS's on the output side.
        num_factors: ``m``, butterfly factors (``boft``); 1 for ``oft``.
        rescale: ``(D · b,)`` per-output scale ``s`` applied after an output rotation, or ``None`` (all ones).
            For ``boft`` it is ``boft_s``.
        constraint: LyCORIS's ``alpha``: all generators together within ``‖Q‖_F ≤ constraint · D · b``; 0 for none.
        block_share: ``oft``: one stored block repeated over the width.
        coft, eps: ``oft``: peft's COFT projection of each block (radius ``eps/√r``).
        use_cayley_neumann, num_cayley_neumann_terms: ``oft``: the truncated series instead of the exact transform.
        weight_ndim: dimensions of the base layer's weight (2 linear, 4 Conv2d), which fixes the shape a file gives
            ``rescale``; ``None`` when not known.
        conv2d_transposed: ``oft``: the rotation is the *transpose* of the generators' one when the adapter sits on
            a Conv2d layer, and their own on any other layer. OneTrainer's files mean this (its Conv2d path
            multiplies the flattened weight by ``R`` where its linear path multiplies by ``Rᵀ``), and the file
            does not say which kind of layer a name is; :func:`add_layer_adapter` negates the generators for a
            Conv2d layer (``R(-Q) = R(Q)ᵀ``, for the exact transform and the Cayley-Neumann series alike).
        source: the file's own name for the layer, for messages.
    """

    method: str
    generators: torch.Tensor
    block_size: int
    num_blocks: int
    rotation_side: str = "input"
    num_factors: int = 1
    rescale: torch.Tensor | None = None
    constraint: float = 0.0
    block_share: bool = False
    coft: bool = False
    eps: float = 6e-5
    use_cayley_neumann: bool = False
    num_cayley_neumann_terms: int = 5
    weight_ndim: int | None = None
    conv2d_transposed: bool = False
    source: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r} must be one of {list(METHODS)}")
        check_rotation_side(self.rotation_side)
        check_constraint(self.constraint)
        if self.num_blocks == 0 and not (self.method == "oft" and self.block_share and self.rescale is None):
            raise ValueError(
                f"{self.source or 'adapter'}: num_blocks=0 (width set by the layer) is only for a block_share OFT "
                "adapter without rescale; give the number of blocks"
            )
        if self.conv2d_transposed and self.method != "oft":
            raise ValueError(f"{self.source or 'adapter'}: conv2d_transposed is an OFT setting, not {self.method!r}")
        expected = self.expected_generator_shape()
        if tuple(self.generators.shape) != expected:
            raise ValueError(
                f"{self.source or 'adapter'}: generators of shape {tuple(self.generators.shape)} do not match "
                f"method={self.method!r}, block_size={self.block_size}, num_blocks={self.num_blocks}, "
                f"num_factors={self.num_factors}; expected {expected}"
            )
        if self.rescale is not None and tuple(self.rescale.shape) != (self.features,):
            raise ValueError(
                f"{self.source or 'adapter'}: rescale of shape {tuple(self.rescale.shape)} must be ({self.features},), "
                "one scale per rotated output"
            )

    @property
    def features(self) -> int:
        """The rotated width ``D · b`` (0 when the layer decides, see ``num_blocks``)."""
        return self.num_blocks * self.block_size

    def expected_generator_shape(self) -> tuple[int, ...]:
        if self.method == "oft":
            return (1 if self.block_share else self.num_blocks, packed_size(self.block_size))
        return (self.num_factors, self.num_blocks, self.block_size, self.block_size)


def _weight_ndim(layer: AdapterLayer) -> int:
    return 4 if layer.kind is LayerKind.CONV2D else 2


def layer_adapter(layer: AdapterLayer, adapter_name: str, source: str = "") -> LayerAdapter:
    """A detached copy of the adapter ``adapter_name`` of an OFT or BOFT layer."""
    if adapter_name not in layer.adapter_names:
        raise ValueError(f"adapter_name={adapter_name!r} not found in this layer; it holds {layer.adapter_names}")
    if isinstance(layer, OFTLayer):
        rotation = layer.rotation_module(adapter_name)
        rescale = None if rotation.rescale is None else rotation.rescale.detach().float().clone()
        return LayerAdapter(
            method="oft",
            generators=rotation.weight.detach().float().clone(),
            block_size=rotation.block_size,
            num_blocks=rotation.num_blocks,
            rotation_side=rotation.rotation_side,
            rescale=rescale,
            constraint=rotation.constraint,
            block_share=rotation.block_share,
            coft=rotation.coft,
            eps=rotation.eps,
            use_cayley_neumann=rotation.use_cayley_neumann,
            num_cayley_neumann_terms=rotation.num_cayley_neumann_terms,
            weight_ndim=_weight_ndim(layer),
            source=source,
        )
    if isinstance(layer, BOFTLayer):
        scale = layer.boft_s[adapter_name].detach().float().flatten().clone()
        return LayerAdapter(
            method="boft",
            generators=layer.boft_R[adapter_name].detach().float().clone(),
            block_size=layer.boft_block_size[adapter_name],
            num_blocks=layer.boft_block_num[adapter_name],
            rotation_side=layer.rotation_side[adapter_name],
            num_factors=layer.boft_n_butterfly_factor[adapter_name],
            # A scale of exactly one is no scale: a file then says nothing about it.
            rescale=None if bool((scale == 1).all()) else scale,
            constraint=layer.boft_constraint[adapter_name],
            weight_ndim=_weight_ndim(layer),
            source=source,
        )
    raise TypeError(f"{type(layer).__name__} is not an OFT or BOFT layer")


def add_layer_adapter(layer: AdapterLayer, adapter_name: str, adapter: LayerAdapter) -> None:
    """Create the adapter ``adapter_name`` on ``layer`` with the settings and tensors of ``adapter``.

    Dropout is off (a file does not say how it was trained); the layer's width must be the adapter's.
    """
    where = adapter.source or adapter_name
    if adapter.method == "oft":
        if not isinstance(layer, OFTLayer):
            raise TypeError(f"{where}: an OFT adapter needs an OFT layer, not {type(layer).__name__}")
        if adapter.num_blocks == 0:
            _check_shared_block_fits(layer, adapter, where)
        layer.update_layer(
            adapter_name,
            r=adapter.num_blocks,
            oft_block_size=adapter.block_size,
            coft=adapter.coft,
            eps=adapter.eps,
            block_share=adapter.block_share,
            use_cayley_neumann=adapter.use_cayley_neumann,
            num_cayley_neumann_terms=adapter.num_cayley_neumann_terms,
            rotation_side=adapter.rotation_side,
            rescale=adapter.rescale is not None,
            constraint=adapter.constraint,
        )
        rotation = layer.rotation_module(adapter_name)
        generators = adapter.generators
        if adapter.conv2d_transposed and layer.kind is LayerKind.CONV2D:
            generators = -generators
        with torch.no_grad():
            rotation.weight.copy_(generators)
            if adapter.rescale is not None and rotation.rescale is not None:
                rotation.rescale.copy_(adapter.rescale)
        return
    if not isinstance(layer, BOFTLayer):
        raise TypeError(f"{where}: a BOFT adapter needs a BOFT layer, not {type(layer).__name__}")
    layer.update_layer(
        adapter_name,
        boft_block_size=adapter.block_size,
        boft_block_num=0,
        boft_n_butterfly_factor=adapter.num_factors,
        boft_dropout=0.0,
        rotation_side=adapter.rotation_side,
        constraint=adapter.constraint,
    )
    if layer.boft_block_num[adapter_name] != adapter.num_blocks:
        raise ValueError(
            f"{where}: the adapter has {adapter.num_blocks} blocks of {adapter.block_size} but the layer's "
            f"{layer.boft_block_num[adapter_name] * adapter.block_size} features make "
            f"{layer.boft_block_num[adapter_name]}; it was made for another layer"
        )
    with torch.no_grad():
        layer.boft_R[adapter_name].copy_(adapter.generators)
        if adapter.rescale is not None:
            scale = layer.boft_s[adapter_name]
            scale.copy_(adapter.rescale.reshape(scale.shape))


def _check_shared_block_fits(layer: OFTLayer, adapter: LayerAdapter, where: str) -> None:
    # Without this check update_layer would move a block size that does not divide the width to a nearby
    # divisor (peft's rule for configs), and the file's block would no longer fit.
    width = layer.out_features if adapter.rotation_side == "output" else layer.rotated_features
    if width % adapter.block_size:
        raise ValueError(
            f"{where}: the adapter's shared block of {adapter.block_size} does not divide the layer's {width} "
            "rotated features; it was made for another layer"
        )


def _most_common(values: list[Any]) -> Any:
    return Counter(values).most_common(1)[0][0]


def config_for_layer_adapters(adapters: Mapping[str, LayerAdapter]) -> OFTConfig | BOFTConfig:
    """A config describing ``adapters`` (one method): their modules as ``target_modules`` and shared settings.

    A setting that differs between layers (a block size, say, which LyCORIS chooses per layer) takes its most
    common value here; the adapters themselves are what a loader should build the layers from.
    """
    if not adapters:
        raise ValueError("no adapters to describe; the file holds no OFT or BOFT layers")
    methods = sorted({adapter.method for adapter in adapters.values()})
    if len(methods) > 1:
        raise ValueError(f"the adapters mix methods {methods}; describe each method's layers with its own config")
    items = list(adapters.values())
    sides = {adapter.rotation_side for adapter in items}
    if len(sides) > 1:
        raise ValueError("the adapters mix rotation sides; describe each side's layers with its own config")
    common: dict[str, Any] = {
        "target_modules": sorted(adapters),
        "rotation_side": sides.pop(),
        "constraint": float(_most_common([adapter.constraint for adapter in items])),
    }
    if methods[0] == "oft":
        return OFTConfig(
            r=0,
            oft_block_size=int(_most_common([adapter.block_size for adapter in items])),
            rescale=any(adapter.rescale is not None for adapter in items),
            block_share=bool(_most_common([adapter.block_share for adapter in items])),
            coft=bool(_most_common([adapter.coft for adapter in items])),
            eps=float(_most_common([adapter.eps for adapter in items])),
            use_cayley_neumann=bool(_most_common([adapter.use_cayley_neumann for adapter in items])),
            **common,
        )
    return BOFTConfig(
        boft_block_size=int(_most_common([adapter.block_size for adapter in items])),
        boft_n_butterfly_factor=int(_most_common([adapter.num_factors for adapter in items])),
        **common,
    )
