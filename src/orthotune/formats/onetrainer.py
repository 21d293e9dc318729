"""OneTrainer's OFT files (its "OFT v2": peft's packed generators), read into :class:`LayerAdapter`.

A file is a flat state dict; each adapted layer has a name (kohya-style ``lora_unet_…``/``lora_te1_…`` when saved
for other tools, dotted ``lora_unet.…`` in OneTrainer's internal format, or a diffusers module path) and::

    <name>.oft_R.weight        (r, b(b-1)/2)  packed strict upper triangles, row-major torch.triu_indices(b, b, 1)
                                             order (peft's layout); r = 1 for a shared block (or one block)
    <name>.oft_R.scaled_oft    0-d bool       present: the generators are weight / (2·√(b-1))
    <name>.oft_R.clipped_oft   0-d float      present: each block's ‖Q‖₂ is clipped to this value
    <name>.oft_R.cans_oft      0-d bool       present: the rotation is the exact Cayley transform (computed by a
                                             Newton-Schulz iteration) instead of the 5-term Neumann series

OneTrainer computes (``OFTRotationModule`` in ``modules/module/oft_utils.py``, ``OFTModule.forward`` in
``modules/module/LoRAModule.py``; the inference-side reading is ComfyUI-OFTv2's ``OFTv2Adapter.calculate_weight``,
by the author of OneTrainer's OFT v2)::

    Q = M - Mᵀ, M the strict upper triangle of weight / s       s = 2·√(b-1) with scaled_oft, else 1
    Q ↦ Q · c / max(σ, c)                                        clipped_oft = c, σ an estimate of ‖Q‖₂
    R = I + 2Q + 2Q² + 2Q³ + Q⁴                                  (our Cayley-Neumann series, 5 terms)
      or R = polar(I + Q)² = (I + Q)(I - Q)⁻¹                    with cans_oft (our exact Cayley transform)
    Linear:  y = (x R) Wᵀ + b                                    merged W ↦ W Rᵀ: ours, R as is
    Conv2d:  W_flat ↦ W_flat R on the (in·kh·kw) features      merged W ↦ W (Rᵀ)ᵀ: ours with R transposed

The Conv2d path multiplies by ``R`` where the linear path multiplies by ``Rᵀ``, and the file does not say which
kind of layer a name is: the adapters are read with ``conv2d_transposed=True``, and
:func:`~orthotune.formats.layer_adapter.add_layer_adapter` negates the generators on a Conv2d layer
(``R(-Q) = R(Q)ᵀ``, exact for the series too). Reading is exact for the series; with ``cans_oft`` OneTrainer
reaches the Cayley transform only to its iteration's convergence (about 1e-6 in float32 by its own comment).

Two settings are folded into the generators when read, so that the layers compute the same rotation:
``scaled_oft`` divides them by ``s``; ``clipped_oft`` scales each block by ``min(1, c/‖Q‖₂)`` with the exact
spectral norm. OneTrainer estimates ``σ`` by power iteration from random vectors it does not save (one step per
training step; ComfyUI-OFTv2 two from a fresh random start); an estimate is never above ``‖Q‖₂``, so where no
block exceeds ``c`` every reading agrees, and where one does OneTrainer's own result depends on that random state
and tends to this one as its iteration converges (logged when it happens). A shared block (``r = 1``) takes its
repeat count from the layer (``num_blocks=0``). Refused, with the reason: ``cans_exp`` (a later matrix-exponential
variant), DoRA-OFT tensors (``dora_scale``, ``initial_norm``, ``dora_log_multiplier``: not orthogonal), and any
other tensor. COFT is not recorded in OneTrainer's files, so none is applied.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping

import torch

from orthotune.formats.layer_adapter import LayerAdapter
from orthotune.formats.module_names import match_module_names
from orthotune.functional import block_size_from_packed, skew_from_packed

logger = logging.getLogger(__name__)

NAME = "onetrainer"
#: OneTrainer's name prefixes (its ``LoRAModuleWrapper`` prefixes, kohya-style), each to the module path its
#: names are relative to; dotted names that are module paths of the model need none.
ONETRAINER_PREFIXES: dict[str, str] = {
    "lora_unet": "",
    "lora_te": "",
    "lora_te1": "",
    "lora_te2": "",
    "lora_te3": "",
    "lora_transformer": "",
}
#: The side OneTrainer's OFT rotates: peft's (``x ↦ x R``, merged ``W ↦ W Rᵀ``).
ROTATION_SIDE = "input"
#: OneTrainer's prefixes to the diffusers pipeline component each addresses.
PIPELINE_PREFIXES: dict[str, str] = {
    "lora_unet": "unet",
    "lora_transformer": "transformer",
    "lora_te": "text_encoder",
    "lora_te1": "text_encoder",
    "lora_te2": "text_encoder_2",
    "lora_te3": "text_encoder_3",
}
#: OneTrainer's OFT tensors, by their suffix after the layer name.
OFT_SUFFIXES = (".oft_R.weight", ".oft_R.scaled_oft", ".oft_R.clipped_oft", ".oft_R.cans_oft")
#: Tensors of OneTrainer variants that have no orthogonal reading here, with the reason.
REFUSED_SUFFIXES: dict[str, str] = {
    ".oft_R.cans_exp": "a matrix-exponential rotation (Taylor series, scaling and squaring, Newton-Schulz)",
    ".dora_scale": "DoRA-OFT's magnitude, which rescales the rotated rows (not orthogonal)",
    ".initial_norm": "DoRA-OFT's reference norms (not orthogonal)",
    ".dora_log_multiplier": "DoRA-OFT's magnitude, which rescales the rotated rows (not orthogonal)",
}
#: OneTrainer's Cayley-Neumann series length (``OFTModule`` builds every rotation with 5 terms).
NEUMANN_TERMS = 5
_PEFT_PREFIX = "base_model.model."


def _split(key: str) -> tuple[str, str] | None:
    """``(layer name, suffix)`` of a OneTrainer OFT key, or ``None``."""
    for suffix in (*OFT_SUFFIXES, *REFUSED_SUFFIXES):
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)], suffix
    return None


def detect(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """Whether a state dict is a OneTrainer OFT file: every key a OneTrainer OFT (or refused variant) tensor, at
    least one ``….oft_R.weight``, and no peft key (``base_model.model.…``, which also ends in ``oft_R.weight``).

    kohya (``oft_unet_….oft_blocks``) and LyCORIS (``….oft_blocks``) files are not OneTrainer files.
    """
    if not state_dict:
        return False
    for key in state_dict:
        if key.startswith(_PEFT_PREFIX) or _split(key) is None:
            return False
    return any(key.endswith(".oft_R.weight") for key in state_dict)


def spectral_clip_scale(skew: torch.Tensor, max_norm: float) -> torch.Tensor:
    """``min(1, max_norm / ‖Q‖₂)`` for each ``(…, b, b)`` generator: the factor that clips its spectral norm
    (computed in float64) to ``max_norm``. Returns ``(…,)`` in float64."""
    sigma = torch.linalg.matrix_norm(skew.double(), ord=2)
    return torch.clamp(max_norm / sigma.clamp_min(torch.finfo(torch.float64).tiny), max=1.0)


def _flag(tensors: Mapping[str, torch.Tensor], suffix: str) -> bool:
    # Both OneTrainer and ComfyUI-OFTv2 read a marker by its presence: it is registered only when set.
    return suffix in tensors


def _layer_adapter(name: str, tensors: dict[str, torch.Tensor]) -> LayerAdapter:
    if ".oft_R.weight" not in tensors:
        raise ValueError(f"OneTrainer layer {name!r} holds {sorted(tensors)} but no oft_R.weight")
    weight = tensors[".oft_R.weight"].detach().float()
    if weight.ndim != 2:
        raise ValueError(f"{name}.oft_R.weight has shape {tuple(weight.shape)}; expected (blocks, b(b-1)/2)")
    try:
        block_size = block_size_from_packed(weight.shape[1])
    except ValueError as error:
        raise ValueError(f"{name}.oft_R.weight: {error}") from error
    if _flag(tensors, ".oft_R.scaled_oft"):
        weight = weight / (2.0 * math.sqrt(block_size - 1))
    if _flag(tensors, ".oft_R.clipped_oft"):
        max_norm = float(tensors[".oft_R.clipped_oft"])
        if not max_norm > 0:
            raise ValueError(f"{name}.oft_R.clipped_oft={max_norm}; OneTrainer's clip is a spectral norm > 0")
        scale = spectral_clip_scale(skew_from_packed(weight, block_size), max_norm)
        if bool((scale < 1).any()):
            logger.info(
                "%s: %d of %d blocks have ‖Q‖₂ > clipped_oft = %g; read with the exact clip, which OneTrainer's "
                "power-iteration estimate approaches",
                name,
                int((scale < 1).sum()),
                scale.numel(),
                max_norm,
            )
        weight = (weight.double() * scale[:, None]).float()
    shared = weight.shape[0] == 1
    return LayerAdapter(
        method="oft",
        generators=weight,
        block_size=block_size,
        num_blocks=0 if shared else weight.shape[0],
        block_share=shared,
        use_cayley_neumann=not _flag(tensors, ".oft_R.cans_oft"),
        num_cayley_neumann_terms=NEUMANN_TERMS,
        conv2d_transposed=True,
        source=name,
    )


def read(
    state_dict: Mapping[str, torch.Tensor],
    module_names: Iterable[str],
    prefixes: Mapping[str, str] | None = None,
    ignore_unmatched: bool = False,
) -> dict[str, LayerAdapter]:
    """The input-side OFT adapters of a OneTrainer OFT state dict, by the model's module names.

    Args:
        state_dict: the file's tensors (``safetensors.torch.load_file``; nothing here unpickles).
        module_names: the model's module names (``name for name, _ in model.named_modules()``).
        prefixes: name prefix → module path its names are relative to; default :data:`ONETRAINER_PREFIXES`, all
            relative to the model. For a pipeline, e.g. ``{"lora_unet": "unet", "lora_te1": "text_encoder"}``.
            A name that is itself a module name of the model needs no prefix.
        ignore_unmatched: leave out layers that match no module (logged) instead of failing.

    Returns:
        ``{module name: LayerAdapter}``, each ``method="oft"``, ``rotation_side="input"``,
        ``conv2d_transposed=True``, with ``scaled_oft``/``clipped_oft`` folded into the generators, the 5-term
        series or (``cans_oft``) the exact transform. Build layers with
        :func:`~orthotune.formats.layer_adapter.add_layer_adapter`.

    Raises:
        ValueError: refused variants (``cans_exp``, DoRA-OFT), unknown tensors, malformed shapes, or names that
            match no module.
    """
    by_layer: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        parts = _split(key)
        if parts is None:
            raise ValueError(
                f"key {key!r} is not a OneTrainer OFT tensor (…{'/…'.join(OFT_SUFFIXES)}); this is not a "
                "OneTrainer OFT file"
            )
        name, suffix = parts
        if suffix in REFUSED_SUFFIXES:
            raise ValueError(
                f"{key}: {REFUSED_SUFFIXES[suffix]}; orthotune reads OneTrainer's OFT with the Cayley-Neumann "
                "series or the Cayley transform (cans_oft) only"
            )
        by_layer.setdefault(name, {})[suffix] = tensor
    modules = match_module_names(
        by_layer,
        module_names,
        ONETRAINER_PREFIXES if prefixes is None else prefixes,
        ignore_unmatched,
        tool="OneTrainer OFT",
    )
    return {
        module: _layer_adapter(name, by_layer[name])
        for name, module in sorted(modules.items(), key=lambda item: item[1])
    }
