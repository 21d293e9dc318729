"""LyCORIS's ``diag-oft`` and ``boft`` files (lycoris-lora 4.1.3), read into and written from :class:`LayerAdapter`.

A LyCORIS file is a flat state dict. Each adapted layer has a name, the module's path in its model with ``.``
written as ``_`` after a prefix (``lycoris_`` from LyCORIS's own wrapper; ``lora_unet_``, ``lora_te_``,
``lora_te1_``, ``lora_te2_`` when trained through kohya's scripts for a Stable Diffusion UNet and text encoders),
and up to three tensors::

    <name>.oft_blocks   (D, b, b) diag-oft, or (m, D, b, b) boft: matrices A, generator Q_L = A - Aᵀ
    <name>.rescale      (out, 1) or (out, 1, 1, 1): a scale per output, after the rotation (optional)
    <name>.alpha        0-d: the constraint ‖Q_L‖_F ≤ alpha · out over all of the layer's blocks; 0 for none
    <name>.oft_diag     (D, b, b): pre-2024 files store the rotation blocks r themselves, unconstrained

Both algorithms rotate the layer's **outputs**. With ``r = cayley(Q_L)`` per block (the same Cayley convention as
ours, ``(I + Q)(I - Q)⁻¹``), LyCORIS's merged weight is::

    diag-oft:  W' = s ⊙ (Rᵀ W),   R = diag(r_1 … r_D)       i.e. outputs y ↦ (y R) ⊙ s
    boft:      W' = s ⊙ (Mᵀ W),   stage i = 0 … m-1 applies r_iᵀ to interleaved half-blocks of y

so in this library's terms a diag-oft layer is an output-side OFT adapter with generators ``Q = Q_L``, and a
boft layer is an output-side BOFT adapter whose blocks are ``r_iᵀ = cayley(-Q_L)``, i.e. ``boft_R = 2 A``
(``(Aᵀ - A)/2`` of which is ``-Q_L``). LyCORIS's bypass forward computes ``R(W x + b)``, rotating the bias,
which is not its merged weight's model; orthotune follows the merged weight (the bias is not rotated), as
LyCORIS's default (non-bypass) forward does.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping

import torch

from orthotune.formats.layer_adapter import LayerAdapter
from orthotune.functional import (
    cayley_exact,
    cayley_inverse,
    cayley_neumann,
    lycoris_butterfly_max_factors,
    orthogonality_error,
    packed_from_skew,
    project_coft,
    skew_from_packed,
    skew_part,
)

logger = logging.getLogger(__name__)

#: LyCORIS's name prefixes, each to the module path (in the model given to the reader) its names are relative
#: to: by default, all of them to the model itself.
LYCORIS_PREFIXES: dict[str, str] = {"lycoris": "", "lora_unet": "", "lora_te": "", "lora_te1": "", "lora_te2": ""}
#: The tensors of a LyCORIS OFT layer; any other name means another algorithm (or another tool).
OFT_PARAMETERS = ("oft_blocks", "oft_diag", "rescale", "alpha")
_ROTATION_PARAMETERS = ("oft_blocks", "oft_diag")


# ------------------------------------------------------------------------------------------------- detect
def split_layer_key(key: str) -> tuple[str, str]:
    """``"<layer>.<tensor>"`` → ``(layer, tensor)`` (``tensor`` empty where the key has no dot)."""
    name, _, parameter = key.partition(".")
    return name, parameter


def tensors_by_layer(state_dict: Mapping[str, torch.Tensor], tool: str) -> dict[str, dict[str, torch.Tensor]]:
    """A single file's ``<layer>.<tensor>`` keys grouped by layer (the Stable Diffusion tools' layout: LyCORIS's
    and kohya's), or a ``ValueError`` naming the first key that is not of that form as not ``tool``'s."""
    by_layer: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        name, parameter = split_layer_key(key)
        if not parameter:
            raise ValueError(f"key {key!r} is not <layer>.<tensor>; this is not a {tool} file")
        by_layer.setdefault(name, {})[parameter] = tensor
    return by_layer


def _prefix_of(name: str, prefixes: Iterable[str]) -> str | None:
    """The longest prefix ``p`` with ``name == p + "_" + …`` (``lora_te1_`` before ``lora_te_``)."""
    for prefix in sorted(prefixes, key=len, reverse=True):
        if name.startswith(prefix + "_"):
            return prefix
    return None


def detect_lycoris(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """Whether a state dict is a LyCORIS OFT/BOFT file: every layer name has a LyCORIS prefix, and at least one
    layer holds ``oft_blocks`` or ``oft_diag``.

    kohya's own OFT files (``oft_unet_…``) and peft files (``base_model.model.…``) are not LyCORIS files.
    """
    names = {split_layer_key(key)[0] for key in state_dict}
    if not names or any(_prefix_of(name, LYCORIS_PREFIXES) is None for name in names):
        return False
    return any(split_layer_key(key)[1] in _ROTATION_PARAMETERS for key in state_dict)


# ------------------------------------------------------------------------------------------------- names
def lycoris_name(module_name: str, prefix: str = "lycoris") -> str:
    """LyCORIS's name for a module: ``prefix + "_" + path``, every ``.`` written as ``_`` (``lycoris_`` for the
    model itself, as LyCORIS names it)."""
    return f"{prefix}_{module_name}".replace(".", "_")


def match_lycoris_names(
    lycoris_names: Iterable[str],
    module_names: Iterable[str],
    prefixes: Mapping[str, str] | None = None,
    ignore_unmatched: bool = False,
) -> dict[str, str]:
    """Map LyCORIS layer names onto a model's module names.

    As LyCORIS does it: each module's name is flattened (``.`` → ``_``) and looked up, so ``down_blocks`` stays
    one word. A name is read as ``prefix_rest``, the longest matching prefix first; ``rest`` is looked up
    among the modules under ``prefixes[prefix]`` (relative to it).

    Args:
        lycoris_names: the layer names of a file (the part of each key before the first ``.``).
        module_names: the model's module names, as ``named_modules()`` gives them.
        prefixes: LyCORIS prefix → module path its names are relative to (``""``: the model itself), e.g.
            ``{"lora_unet": "unet", "lora_te1": "text_encoder", "lora_te2": "text_encoder_2"}`` for a
            pipeline's modules. Default :data:`LYCORIS_PREFIXES`.
        ignore_unmatched: leave out names that match no module (logged) instead of failing.

    Returns:
        ``{lycoris name: module name}``.

    Raises:
        ValueError: names that match no module (all listed), or modules whose flattened names collide.
    """
    prefixes = LYCORIS_PREFIXES if prefixes is None else dict(prefixes)
    modules = list(module_names)
    lookup: dict[str, dict[str, str]] = {}
    for prefix, root in prefixes.items():
        table: dict[str, str] = {}
        for module in modules:
            if root and module != root and not module.startswith(root + "."):
                continue
            relative = module[len(root) :].lstrip(".") if root else module
            flat = relative.replace(".", "_")
            if flat in table and table[flat] != module:
                raise ValueError(
                    f"modules {table[flat]!r} and {module!r} have the same LyCORIS name {prefix}_{flat!r}; "
                    "a LyCORIS file cannot tell them apart"
                )
            table[flat] = module
        lookup[prefix] = table
    matched: dict[str, str] = {}
    unmatched: list[str] = []
    for name in dict.fromkeys(lycoris_names):
        name_prefix = _prefix_of(name, prefixes)
        found = None if name_prefix is None else lookup[name_prefix].get(name[len(name_prefix) + 1 :])
        if found is None:
            unmatched.append(name)
        else:
            matched[name] = found
    if unmatched:
        if not ignore_unmatched:
            shown = ", ".join(unmatched[:20]) + (f", … ({len(unmatched)} in all)" if len(unmatched) > 20 else "")
            raise ValueError(
                f"LyCORIS layers match no module of the model: {shown}. Known prefixes: {sorted(prefixes)}; pass "
                "prefixes= to place a prefix under a submodule (e.g. {'lora_unet': 'unet'}), or "
                "ignore_unmatched=True to skip them"
            )
        logger.info("skipping %d LyCORIS layers that match no module: %s", len(unmatched), unmatched)
    return matched


# -------------------------------------------------------------------------------------------------- read
def _default_tolerance(dtype: torch.dtype, block_size: int) -> float:
    # Rounding a rotation to the file's dtype leaves ‖RᵀR - I‖₂ of about b·eps; a few times that is rounding,
    # anything far above is a matrix that was never a rotation.
    return max(1e-4, 4 * block_size * torch.finfo(dtype).eps)


def _legacy_generators(rotation: torch.Tensor, source: str, tolerance: float | None) -> torch.Tensor:
    """Packed generators of pre-2024 ``oft_diag`` blocks, which hold the rotations ``r`` themselves."""
    block_size = rotation.shape[-1]
    limit = _default_tolerance(rotation.dtype, block_size) if tolerance is None else tolerance
    error = float(orthogonality_error(rotation.double()))
    if error > limit:
        raise ValueError(
            f"{source}.oft_diag is not a rotation: ‖RᵀR - I‖₂ = {error:.3g} > {limit:.3g}. Such files (an "
            "unconstrained early LyCORIS OFT, or one with rescale folded in) are not orthogonal adapters; pass "
            "orthogonality_tolerance= to accept it as the nearest rotation"
        )
    try:
        generator = cayley_inverse(rotation.double())
    except ValueError as error:
        raise ValueError(f"{source}.oft_diag: {error}") from error
    return packed_from_skew(skew_part(generator)).float()


def _layer_adapter(name: str, tensors: dict[str, torch.Tensor], tolerance: float | None) -> LayerAdapter:
    unknown = sorted(set(tensors) - set(OFT_PARAMETERS))
    if unknown or not any(key in tensors for key in _ROTATION_PARAMETERS):
        raise ValueError(
            f"LyCORIS layer {name!r} holds {sorted(tensors)}: not a diag-oft or boft layer (it has no oft_blocks, "
            f"or has {unknown}, another algorithm's tensors); orthotune reads LyCORIS's diag-oft and boft only"
        )
    if "oft_blocks" in tensors and "oft_diag" in tensors:
        raise ValueError(f"LyCORIS layer {name!r} holds both oft_blocks and oft_diag; a layer has one or the other")
    rescale = tensors.get("rescale")
    weight_ndim = None if rescale is None else rescale.ndim
    if rescale is not None:
        rescale = rescale.detach().float().flatten()
    alpha = tensors.get("alpha")
    constraint = 0.0 if alpha is None else float(alpha)
    if "oft_diag" in tensors:
        rotation = tensors["oft_diag"]
        if rotation.ndim != 3 or rotation.shape[-1] != rotation.shape[-2]:
            raise ValueError(f"{name}.oft_diag has shape {tuple(rotation.shape)}; expected (blocks, b, b)")
        if constraint:
            logger.info("%s: alpha=%g is ignored with oft_diag, which stores the rotation itself", name, constraint)
        return LayerAdapter(
            method="oft",
            generators=_legacy_generators(rotation.detach(), name, tolerance),
            block_size=rotation.shape[-1],
            num_blocks=rotation.shape[0],
            rotation_side="output",
            rescale=rescale,
            weight_ndim=weight_ndim,
            source=name,
        )
    blocks = tensors["oft_blocks"].detach().float()
    if blocks.shape[-1] != blocks.shape[-2] or blocks.ndim not in (3, 4):
        raise ValueError(
            f"{name}.oft_blocks has shape {tuple(blocks.shape)}; expected (blocks, b, b) for diag-oft or "
            "(factors, blocks, b, b) for boft"
        )
    if blocks.ndim == 3:  # diag-oft: our generator is LyCORIS's A - Aᵀ
        return LayerAdapter(
            method="oft",
            generators=packed_from_skew(blocks - blocks.transpose(-1, -2)),
            block_size=blocks.shape[-1],
            num_blocks=blocks.shape[0],
            rotation_side="output",
            rescale=rescale,
            constraint=constraint,
            weight_ndim=weight_ndim,
            source=name,
        )
    # boft: blocks act as r_iᵀ = cayley(-(A - Aᵀ)); boft_R = 2A has (boft_Rᵀ - boft_R)/2 = Aᵀ - A.
    return LayerAdapter(
        method="boft",
        generators=2.0 * blocks,
        block_size=blocks.shape[-1],
        num_blocks=blocks.shape[1],
        num_factors=blocks.shape[0],
        rotation_side="output",
        rescale=rescale,
        constraint=constraint,
        weight_ndim=weight_ndim,
        source=name,
    )


def read_lycoris(
    state_dict: Mapping[str, torch.Tensor],
    module_names: Iterable[str],
    prefixes: Mapping[str, str] | None = None,
    ignore_unmatched: bool = False,
    orthogonality_tolerance: float | None = None,
) -> dict[str, LayerAdapter]:
    """The output-side adapters of a LyCORIS ``diag-oft``/``boft`` state dict, by the model's module names.

    Args:
        state_dict: the file's tensors (e.g. ``safetensors.torch.load_file``; nothing here unpickles).
        module_names: the model's module names (``name for name, _ in model.named_modules()``).
        prefixes, ignore_unmatched: see :func:`match_lycoris_names`.
        orthogonality_tolerance: how far from orthogonal a legacy ``oft_diag`` block may be (``‖RᵀR - I‖₂``);
            default a few times the rounding of the file's dtype.

    Returns:
        ``{module name: LayerAdapter}`` with ``rotation_side="output"``: ``method="oft"`` for diag-oft and
        ``oft_diag`` layers, ``"boft"`` for boft layers. Build the layers with
        :func:`~orthotune.formats.layer_adapter.add_layer_adapter`, describe them with
        :func:`~orthotune.formats.layer_adapter.config_for_layer_adapters`.
    """
    by_layer = tensors_by_layer(state_dict, "LyCORIS")
    modules = match_lycoris_names(by_layer, module_names, prefixes, ignore_unmatched)
    return {
        module: _layer_adapter(name, by_layer[name], orthogonality_tolerance)
        for name, module in sorted(modules.items(), key=lambda item: item[1])
    }


# ------------------------------------------------------------------------------------------------- write
def _effective_packed(adapter: LayerAdapter) -> torch.Tensor:
    """Packed generators with the COFT projection applied and a shared block repeated: LyCORIS has neither."""
    packed = adapter.generators.float()
    if adapter.coft:
        packed = project_coft(packed, adapter.eps)
    if adapter.block_share:
        packed = packed.expand(adapter.num_blocks, -1)
    if adapter.use_cayley_neumann:
        skew = skew_from_packed(packed, adapter.block_size)
        gap = float((cayley_neumann(skew, adapter.num_cayley_neumann_terms) - cayley_exact(skew)).abs().max())
        logger.warning(
            "%s: trained with the Cayley-Neumann series (%d terms); LyCORIS computes the exact Cayley transform "
            "of the same generators, whose blocks differ from the series' by up to %.2g",
            adapter.source or "adapter",
            adapter.num_cayley_neumann_terms,
            gap,
        )
    return packed


def _rescale_tensor(adapter: LayerAdapter, module: str, dtype: torch.dtype) -> torch.Tensor:
    if adapter.weight_ndim is None:
        raise ValueError(
            f"{module}: the adapter's weight_ndim is unknown, so LyCORIS's rescale shape (out, 1, …) is too; set "
            "weight_ndim (2 for a linear layer, 4 for Conv2d)"
        )
    assert adapter.rescale is not None  # callers ask only for adapters with a scale
    return adapter.rescale.reshape(adapter.features, *[1] * (adapter.weight_ndim - 1)).to(dtype).contiguous()


def _check_loadable_oft(adapter: LayerAdapter, module: str) -> None:
    if adapter.block_share and adapter.constraint:
        raise ValueError(
            f"{module}: a shared block with constraint={adapter.constraint} bounds the norm of the one stored "
            "generator, LyCORIS the norm of all its repeats together; such an adapter has no LyCORIS form"
        )
    # LyCORIS rebuilds a layer from the block size alone, factorising the width with the smaller factor as the
    # block size: a block larger than the number of blocks would come back transposed in shape.
    if adapter.block_size > adapter.num_blocks:
        raise ValueError(
            f"{module}: diag-oft with {adapter.num_blocks} blocks of {adapter.block_size} cannot be loaded by "
            "LyCORIS, which makes the block size the smaller factor of the width; use a block size ≤ "
            f"{math.isqrt(adapter.features)}"
        )


def _check_loadable_boft(adapter: LayerAdapter, module: str) -> None:
    blocks = adapter.num_blocks
    if blocks & (blocks - 1):
        raise ValueError(
            f"{module}: boft with {blocks} blocks per factor cannot be loaded by LyCORIS, which needs a power of "
            "two; choose the block size so that width / block_size is one"
        )


def write_lycoris(
    adapters: Mapping[str, LayerAdapter],
    prefixes: Mapping[str, str] | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """A LyCORIS state dict (loadable by lycoris-lora 4.1.3) from output-side adapters.

    Args:
        adapters: ``{module name: LayerAdapter}``, every one with ``rotation_side="output"``.
        prefixes: LyCORIS prefix → module path, as for :func:`match_lycoris_names`, one prefix per path;
            default ``{"lycoris": ""}`` (LyCORIS's own wrapper). A module takes the prefix of the longest path
            it lies under.
        dtype: of the written tensors.

    Returns:
        ``{"<name>.oft_blocks": …, "<name>.alpha": …, ["<name>.rescale": …]}``. diag-oft blocks are ``Q/2``
        (``A - Aᵀ = Q``); boft blocks are ``boft_R / 2``, padded with identity factors to the ``log2(D) + 1``
        factors LyCORIS builds.
    """
    prefixes = {"lycoris": ""} if prefixes is None else dict(prefixes)
    roots = list(prefixes.values())
    if len(set(roots)) != len(roots):
        raise ValueError(f"prefixes={prefixes} maps several prefixes to one module path; give one prefix per path")
    by_root = sorted(prefixes.items(), key=lambda item: len(item[1]), reverse=True)
    state: dict[str, torch.Tensor] = {}
    for module, adapter in sorted(adapters.items()):
        if adapter.rotation_side != "output":
            raise ValueError(
                f"{module}: LyCORIS rotates a layer's outputs, but this adapter rotates its inputs; only adapters "
                "made with rotation_side='output' can be written as LyCORIS files"
            )
        prefix, root = next(
            ((p, r) for p, r in by_root if not r or module == r or module.startswith(r + ".")), (None, None)
        )
        if prefix is None:
            raise ValueError(f"{module}: lies under none of the module paths {sorted(roots)} of prefixes={prefixes}")
        relative = module[len(root) :].lstrip(".") if root else module
        name = lycoris_name(relative, prefix)
        if adapter.method == "oft":
            _check_loadable_oft(adapter, module)
            skew = skew_from_packed(_effective_packed(adapter), adapter.block_size)
            blocks = 0.5 * skew
        else:
            _check_loadable_boft(adapter, module)
            factors = lycoris_butterfly_max_factors(adapter.features, adapter.block_size)
            blocks = 0.5 * adapter.generators.float()
            padding = blocks.new_zeros(factors - adapter.num_factors, *blocks.shape[1:])
            blocks = torch.cat([blocks, padding])  # zero generators: identity stages
        state[f"{name}.oft_blocks"] = blocks.to(dtype).contiguous()
        state[f"{name}.alpha"] = torch.tensor(float(adapter.constraint), dtype=dtype)
        if adapter.rescale is not None:
            state[f"{name}.rescale"] = _rescale_tensor(adapter, module, dtype)
    return state


# ------------------------------------------------------------------------- the format contract (formats/)
NAME = "lycoris"
#: The side every LyCORIS OFT/BOFT file rotates.
ROTATION_SIDE = "output"
#: LyCORIS's prefixes to the diffusers pipeline component each addresses (``lycoris_``: the model it wrapped).
PIPELINE_PREFIXES: dict[str, str] = {
    "lycoris": "",
    "lora_unet": "unet",
    "lora_te": "text_encoder",
    "lora_te1": "text_encoder",
    "lora_te2": "text_encoder_2",
}
detect = detect_lycoris
read = read_lycoris
write = write_lycoris
