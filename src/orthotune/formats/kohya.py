"""kohya sd-scripts' own OFT files (``networks/oft.py``), read into :class:`LayerAdapter`.

A file is a flat state dict with two tensors per adapted layer, named ``oft_unet_`` + the module's path in the
U-Net with ``.`` written as ``_`` (kohya adapts the U-Net only)::

    <name>.oft_blocks   (D, b, b)  matrices A; ``dim`` (network_dim) is the number of blocks D
    <name>.alpha        0-d        the constraint: ‖Q‖_F ≤ alpha · out over all of the layer's blocks

kohya computes, per layer with ``out = D · b`` outputs (``OFTModule.get_weight``, ``OFTModule.forward`` and
``OFTInfModule.merge_to`` in sd-scripts' ``networks/oft.py``)::

    Q = A - Aᵀ                                         per block
    Q ↦ Q · (min(‖Q‖_F, c) + 1e-8) / (‖Q‖_F + 1e-8),  c = alpha · out, the norm over all blocks together
    r = (I + Q)(I - Q)⁻¹                                per block (our Cayley convention)
    W' = Rᵀ W,  R = diag(r_1 … r_D)                   on the output rows of W (out, in) or (out, in, kh, kw)
    y = F.linear(x, W', b) or F.conv2d(x, W', b, …)    the bias is not rotated

so a kohya layer is an output-side OFT adapter with generators ``Q = A - Aᵀ`` and ``constraint = alpha``: the
same reading as LyCORIS's ``diag-oft`` (kohya's OFT is its ancestor). Linear, 1×1 and 3×3 Conv2d layers are all
rotated on their output channels. Two differences from our joint bound are handled here:

- ``alpha = 0`` means *no* constraint to us and a constraint of radius 0 to kohya (every ``Q`` scaled to a norm
  of about 1e-8, the identity to float32 rounding); such a file is read as those scaled generators, unconstrained.
- kohya scales by ``(c + 1e-8)/(‖Q‖ + 1e-8)`` where we scale by ``c/(‖Q‖ + 1e-8)``: the factors differ by
  ``1e-8/c`` relative, below float32 rounding for any ``c ≥ 1e-3`` (kohya recommends alpha ≈ 1e-3, so
  ``c = alpha · out ≥ 0.3`` for a 320-wide layer).

kohya's loader (``create_network_from_weights``) takes ``alpha`` from the first ``.alpha`` key of the file and
uses it for every layer; so does this reader. Files of ``networks/oft_flux.py`` (``oft_blocks.<i>``, one list
entry per slice of a fused projection, each with its own bound) are refused.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping

import torch

from orthotune.formats.layer_adapter import LayerAdapter
from orthotune.formats.lycoris import split_layer_key, tensors_by_layer
from orthotune.formats.module_names import match_module_names
from orthotune.functional import packed_from_skew

logger = logging.getLogger(__name__)

NAME = "kohya"
#: kohya's name prefix (``OFTNetwork.OFT_PREFIX_UNET``), to the module path its names are relative to.
KOHYA_PREFIXES: dict[str, str] = {"oft_unet": ""}
#: The side kohya's OFT rotates (``W' = Rᵀ W``, like LyCORIS's diag-oft).
ROTATION_SIDE = "output"
#: kohya's prefix to the diffusers pipeline component it addresses (its OFT adapts the UNet only).
PIPELINE_PREFIXES: dict[str, str] = {"oft_unet": "unet"}
#: kohya's constant in its norm clamp, ``(min(‖Q‖, c) + 1e-8) / (‖Q‖ + 1e-8)``.
KOHYA_NORM_EPS = 1e-8
_SPLIT_BLOCKS = re.compile(r"oft_blocks\.\d+")


def detect(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """Whether a state dict is a kohya OFT file: every layer named ``oft_unet_…``, holding only ``oft_blocks``
    (or ``oft_flux.py``'s ``oft_blocks.<i>``, which :func:`read` refuses by name) and ``alpha``, at least one
    ``oft_blocks``.

    LyCORIS files (``lora_unet_…``/``lycoris_…``), OneTrainer files (``….oft_R.weight``) and peft files
    (``base_model.model.…``) are not kohya files.
    """
    if not state_dict:
        return False
    has_blocks = False
    for key in state_dict:
        name, parameter = split_layer_key(key)
        if not any(name.startswith(prefix + "_") for prefix in KOHYA_PREFIXES):
            return False
        blocks = parameter == "oft_blocks" or bool(_SPLIT_BLOCKS.fullmatch(parameter))
        if not blocks and parameter != "alpha":
            return False
        has_blocks = has_blocks or blocks
    return has_blocks


def _network_alpha(state_dict: Mapping[str, torch.Tensor]) -> float:
    """kohya's ``alpha``: the first ``.alpha`` tensor of the file, for every layer (``create_network_from_weights``)."""
    alphas = [(key, float(tensor)) for key, tensor in state_dict.items() if key.endswith(".alpha")]
    if not alphas:
        raise ValueError(
            "this kohya OFT file has no '<layer>.alpha' tensor; kohya's loader reads its constraint from the first "
            "one and fails without it. Add one (e.g. alpha=1e-3, kohya's default) to the state dict"
        )
    key, alpha = alphas[0]
    if not alpha >= 0:
        raise ValueError(f"{key}={alpha}: kohya's constraint alpha must be ≥ 0")
    values = sorted({value for _, value in alphas})
    if len(values) > 1:
        logger.warning(
            "the kohya OFT file's layers have different alphas (%s); kohya uses the first, %s = %g, for every "
            "layer, and so does orthotune",
            ", ".join(f"{value:g}" for value in values),
            key,
            alpha,
        )
    return alpha


def _radius_zero_generators(skew: torch.Tensor) -> torch.Tensor:
    """kohya's clamp at ``c = 0``: every generator scaled by ``1e-8 / (‖Q‖_F + 1e-8)`` (norm over all blocks)."""
    norm = torch.linalg.vector_norm(skew)
    return skew * (KOHYA_NORM_EPS / (norm + KOHYA_NORM_EPS))


def _refuse_split_blocks(by_layer: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
    for name, tensors in by_layer.items():
        split = sorted(key for key in tensors if _SPLIT_BLOCKS.fullmatch(key))
        if split:
            raise ValueError(
                f"kohya layer {name!r} holds {split}: a file of kohya's networks/oft_flux.py, which rotates each "
                "slice of a fused projection (Flux's qkv) with its own blocks and bound; orthotune reads "
                "networks/oft.py files only"
            )


def _layer_adapter(name: str, tensors: dict[str, torch.Tensor], alpha: float) -> LayerAdapter:
    unknown = sorted(set(tensors) - {"oft_blocks", "alpha"})
    if unknown:
        raise ValueError(f"kohya layer {name!r} holds {unknown}; a kohya OFT layer has oft_blocks and alpha only")
    blocks = tensors["oft_blocks"].detach().float()
    if blocks.ndim != 3 or blocks.shape[-1] != blocks.shape[-2]:
        raise ValueError(f"{name}.oft_blocks has shape {tuple(blocks.shape)}; expected (blocks, b, b)")
    skew = blocks - blocks.transpose(-1, -2)
    if alpha == 0:
        skew = _radius_zero_generators(skew)
    return LayerAdapter(
        method="oft",
        generators=packed_from_skew(skew),
        block_size=blocks.shape[-1],
        num_blocks=blocks.shape[0],
        rotation_side="output",
        constraint=alpha,
        source=name,
    )


def read(
    state_dict: Mapping[str, torch.Tensor],
    module_names: Iterable[str],
    prefixes: Mapping[str, str] | None = None,
    ignore_unmatched: bool = False,
) -> dict[str, LayerAdapter]:
    """The output-side OFT adapters of a kohya ``networks/oft.py`` state dict, by the model's module names.

    Args:
        state_dict: the file's tensors (``safetensors.torch.load_file``; nothing here unpickles).
        module_names: the model's module names (``name for name, _ in model.named_modules()``).
        prefixes: name prefix → module path its names are relative to; default :data:`KOHYA_PREFIXES` (the model
            is the U-Net). For a pipeline, ``{"oft_unet": "unet"}``.
        ignore_unmatched: leave out layers that match no module (logged) instead of failing.

    Returns:
        ``{module name: LayerAdapter}``, each ``method="oft"``, ``rotation_side="output"``, generators
        ``A - Aᵀ`` and ``constraint`` the file's alpha. Build layers with
        :func:`~orthotune.formats.layer_adapter.add_layer_adapter`.

    Raises:
        ValueError: a file of ``oft_flux.py``, a file without ``alpha``, unknown tensors, or names that match no
            module.
    """
    by_layer = tensors_by_layer(state_dict, "kohya OFT")
    _refuse_split_blocks(by_layer)
    alpha = _network_alpha(state_dict)
    for name in [name for name, tensors in by_layer.items() if set(tensors) == {"alpha"}]:
        logger.info("%s: an alpha without oft_blocks rotates nothing; skipped", name)
        del by_layer[name]
    modules = match_module_names(
        by_layer, module_names, KOHYA_PREFIXES if prefixes is None else prefixes, ignore_unmatched, tool="kohya OFT"
    )
    return {
        module: _layer_adapter(name, by_layer[name], alpha)
        for name, module in sorted(modules.items(), key=lambda item: item[1])
    }
