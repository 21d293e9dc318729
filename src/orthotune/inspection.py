"""What an adapter file holds, computed from its tensors and config alone (``orthotune inspect``).

For each adapted layer, from the rotation the layer actually uses (COFT-projected generators, exact Cayley or
the Cayley-Neumann series as the config says):

- ``‖Q‖_F`` of each block's skew generator, the largest over blocks;
- the rotation angle: the largest ``|arg λ|`` over the eigenvalues ``λ`` of every block, in degrees. For OFT
  this is the largest principal angle of the whole block-diagonal rotation; for BOFT with ``m > 1`` factors it
  is the largest angle of any single factor's block (the product of factors is not block-diagonal);
- the orthogonality error ``max ‖RᵀR − I‖₂`` over blocks;
- for the Cayley-Neumann series, the bound ``‖Q‖₂ ≤ ‖packed‖₂`` and a flag where it reaches
  :data:`~orthotune.functional.NEUMANN_WARN_NORM` (the series diverges at 1).

HRA has one ``d × d`` orthogonal matrix ``H`` per layer and no generator. Its angle and orthogonality error
are ``H``'s own, computed exactly from the ``k × k`` matrix of ``H`` on the span of its vectors (``H`` is the
identity elsewhere; :func:`~orthotune.functional.householder_on_span`), never from a dense ``H``. A product
of ``r`` reflections has ``det H = (−1)^r``: with an odd ``r``, and with ``apply_GS`` (``H = I − 2QQᵀ`` is −1
on all of ``span(Q)``), ``H`` has the eigenvalue −1 and the angle is 180° by construction. The generator
column holds the largest ``‖u_i‖``: ``H`` does not depend on the scale of its vectors, but training does (a
step turns ``u_i`` by about ``lr/‖u_i‖``), so this is the size of what the optimizer moves;
``distance_from_identity`` (``‖H − I‖_F``) says how far ``H`` is from the identity.

With the base weights, :func:`hyperspherical_energy` measures how a merge moved the neurons (the rows of
``W`` in ``y = x Wᵀ``) relative to each other. A rotation of the inputs, ``W ↦ W Rᵀ`` (``W H`` for HRA), turns
every neuron by the same orthogonal matrix and BOFT's output scale only changes their lengths, so the energy is
unchanged up to rounding: OFT's central claim, checked on the real weights.

Single-file adapters (LyCORIS, …) are reported from their :class:`~orthotune.formats.LayerAdapter` s the same
way, with the side they rotate, LyCORIS's constraint (``alpha``, and whether it binds) and the output scale.

Everything here is a pure function of tensors; nothing reads files or imports transformers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from orthotune.checkpoint import MODEL_PREFIX, OFT_ROTATION_SUFFIXES, AdapterFile
from orthotune.config import AdapterConfig, BOFTConfig, HRAConfig, OFTConfig
from orthotune.formats.layer_adapter import LayerAdapter
from orthotune.functional import (
    NEUMANN_WARN_NORM,
    block_size_from_packed,
    boft_generators,
    cayley_exact,
    cayley_transform,
    householder_on_span,
    householder_wy,
    lycoris_radius,
    neumann_norm_bound,
    orthogonality_error,
    project_coft,
    project_packed_jointly,
    project_skew_jointly,
    skew_from_packed,
)

_BOFT_SUFFIXES = (".boft_R", ".boft_s")


@dataclass
class LayerReport:
    """What one adapted layer's adapter is (see the module docstring for the quantities)."""

    name: str
    method: str
    block_size: int
    #: Blocks stored per factor (1 with ``block_share``).
    num_blocks: int
    butterfly_factors: int
    parameters: int
    max_generator_norm: float
    max_angle_degrees: float
    orthogonality_error: float
    cayley: str
    block_share: bool = False
    coft: bool = False
    #: Largest ``‖packed‖₂`` (a bound on ``‖Q‖₂``); only for the Cayley-Neumann series.
    neumann_norm_bound: float | None = None
    neumann_near_divergence: bool = False
    #: BOFT's output scale ``s`` (an output-side adapter's ``rescale``): smallest and largest entry.
    output_scale_range: tuple[float, float] | None = None
    #: ``"input"`` (peft's OFT/BOFT: the features a layer reads) or ``"output"`` (LyCORIS: what it writes).
    rotation_side: str = "input"
    #: LyCORIS's ``alpha`` (0: none) and the factor it scales the generators by (1: the bound does not bind).
    constraint: float = 0.0
    constraint_scale: float = 1.0
    #: HRA: the number ``r`` of Householder vectors, the smallest and largest ``‖u_i‖``, and ``‖H − I‖_F``.
    reflections: int | None = None
    vector_norm_range: tuple[float, float] | None = None
    distance_from_identity: float | None = None
    #: Filled by :func:`hyperspherical_energy_change` when base weights are given.
    energy: dict[str, Any] | None = None


@dataclass
class AdapterReport:
    """Every adapted layer, and the totals."""

    peft_type: str
    layers: list[LayerReport]
    #: The file format: ``"peft"`` for an adapter directory, else a single-file format's name (``"lycoris"``).
    format: str = "peft"
    #: Tensors saved in full (``modules_to_save`` heads, biases), and their size.
    other_tensors: int = 0
    other_parameters: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def adapter_parameters(self) -> int:
        return sum(layer.parameters for layer in self.layers)

    def as_dict(self) -> dict[str, Any]:
        layers = [asdict(layer) for layer in self.layers]
        values = self.layers
        total: dict[str, Any] = {
            "layers": len(values),
            "adapter_parameters": self.adapter_parameters,
            "other_tensors": self.other_tensors,
            "other_parameters": self.other_parameters,
            "max_generator_norm": max((layer.max_generator_norm for layer in values), default=0.0),
            "max_angle_degrees": max((layer.max_angle_degrees for layer in values), default=0.0),
            "orthogonality_error": max((layer.orthogonality_error for layer in values), default=0.0),
            "neumann_near_divergence": [layer.name for layer in values if layer.neumann_near_divergence],
        }
        energies = [layer.energy["relative_change"] for layer in values if layer.energy is not None]
        if energies:
            total["max_abs_relative_energy_change"] = max(abs(value) for value in energies)
        return {
            "format": self.format,
            "peft_type": self.peft_type,
            "layers": layers,
            "total": total,
            "notes": list(self.notes),
        }


# --------------------------------------------------------------------------------------------- rotations
def max_rotation_angle(rotations: torch.Tensor) -> float:
    """Largest ``|arg λ|`` in degrees over the eigenvalues of a batch ``(..., b, b)`` of rotations.

    For an orthogonal ``R`` the eigenvalues lie on the unit circle in conjugate pairs; ``arg λ`` is the angle
    by which ``R`` turns the plane of that pair. A Cayley block never reaches 180°.
    """
    eigenvalues = torch.linalg.eigvals(rotations.double())
    return math.degrees(float(eigenvalues.angle().abs().max())) if eigenvalues.numel() else 0.0


def oft_layer_report(name: str, packed: torch.Tensor, config: OFTConfig) -> LayerReport:
    """Report on one OFT layer from its ``(r, b(b-1)/2)`` generators, in orthotune's sign convention."""
    block_size = block_size_from_packed(packed.shape[-1])
    used = project_coft(packed.double(), config.eps) if config.coft else packed.double()
    skew = skew_from_packed(used, block_size)
    neumann = config.use_cayley_neumann
    terms = config.num_cayley_neumann_terms
    rotations = cayley_transform(skew, neumann, terms)
    bound = float(neumann_norm_bound(used).max()) if neumann else None
    return LayerReport(
        name=name,
        method="COFT" if config.coft else "OFT",
        block_size=block_size,
        num_blocks=packed.shape[0],
        butterfly_factors=1,
        parameters=packed.numel(),
        max_generator_norm=float(torch.linalg.matrix_norm(skew).max()),
        max_angle_degrees=max_rotation_angle(rotations),
        orthogonality_error=float(orthogonality_error(rotations)),
        cayley=f"neumann({terms})" if neumann else "exact",
        block_share=config.block_share,
        coft=config.coft,
        neumann_norm_bound=bound,
        neumann_near_divergence=bound is not None and bound >= NEUMANN_WARN_NORM,
    )


def boft_layer_report(name: str, squares: torch.Tensor, scale: torch.Tensor | None) -> LayerReport:
    """Report on one BOFT layer from ``boft_R`` ``(m, D, b, b)`` and ``boft_s``."""
    skew = boft_generators(squares.double())
    rotations = cayley_exact(skew)
    factors, num_blocks, block_size = squares.shape[0], squares.shape[1], squares.shape[-1]
    return LayerReport(
        name=name,
        method="BOFT",
        block_size=block_size,
        num_blocks=num_blocks,
        butterfly_factors=factors,
        parameters=squares.numel() + (scale.numel() if scale is not None else 0),
        max_generator_norm=float(torch.linalg.matrix_norm(skew).max()),
        max_angle_degrees=max_rotation_angle(rotations),
        orthogonality_error=float(orthogonality_error(rotations)),
        cayley="exact",
        output_scale_range=None if scale is None else (float(scale.min()), float(scale.max())),
    )


def hra_layer_report(name: str, u: torch.Tensor, apply_gs: bool) -> LayerReport:
    """Report on one HRA layer from its ``hra_u: (d, r)``, in float64."""
    v, t = householder_wy(u.double(), apply_gs)
    on_span = householder_on_span(v, t)
    norms = torch.linalg.vector_norm(u.double(), dim=0)
    eye = torch.eye(on_span.shape[0], dtype=on_span.dtype)
    return LayerReport(
        name=name,
        method="HRA",
        block_size=u.shape[0],
        num_blocks=1,
        butterfly_factors=1,
        parameters=u.numel(),
        max_generator_norm=float(norms.max()),
        max_angle_degrees=max_rotation_angle(on_span),
        orthogonality_error=float(orthogonality_error(on_span)),
        cayley=f"{'gram-schmidt' if apply_gs else 'householder'} ×{u.shape[1]}",
        reflections=u.shape[1],
        vector_norm_range=(float(norms.min()), float(norms.max())),
        distance_from_identity=float(torch.linalg.matrix_norm(on_span - eye)),
    )


def inspect_adapter(file: AdapterFile) -> AdapterReport:
    """Report on every adapted layer of an adapter file read by :func:`orthotune.checkpoint.read_adapter_files`.

    ``file.tensors`` must be in orthotune's convention (the reader maps peft's exact-mode sign); the
    quantities here do not depend on that sign, but the rotations computed are the ones orthotune applies.
    """
    config: AdapterConfig = file.config
    if file.legacy_oft is not None:
        raise ValueError(
            f"{file.source} is an old peft (≤ 0.15) OFT file; its block count depends on the model's layer widths: "
            "load it into the model once (orthotune.PeftModel.from_pretrained) and save it again, then inspect"
        )
    layers: list[LayerReport] = []
    used: set[str] = set()
    for key in sorted(file.tensors):
        name = _strip_prefix(key)
        if isinstance(config, OFTConfig) and key.endswith(OFT_ROTATION_SUFFIXES):
            layers.append(oft_layer_report(name.rsplit(".", 2)[0], file.tensors[key], config))
            used.add(key)
        elif isinstance(config, BOFTConfig) and key.endswith(".boft_R"):
            module = key[: -len(".boft_R")]
            scale = file.tensors.get(f"{module}.boft_s")
            layers.append(boft_layer_report(_strip_prefix(module), file.tensors[key], scale))
            used.update({key, f"{module}.boft_s"})
        elif isinstance(config, HRAConfig) and key.endswith(".hra_u"):
            layers.append(hra_layer_report(_strip_prefix(key[: -len(".hra_u")]), file.tensors[key], config.apply_GS))
            used.add(key)
    others = [tensor for key, tensor in file.tensors.items() if key not in used]
    notes = []
    if isinstance(config, OFTConfig) and config.block_share:
        notes.append("block_share: one stored block per layer, repeated along its width")
    if isinstance(config, HRAConfig) and (config.apply_GS or config.r % 2):
        why = "apply_GS makes H = I − 2QQᵀ, which is −1 on span(Q)" if config.apply_GS else f"r={config.r} is odd"
        notes.append(f"HRA: {why}, so H has the eigenvalue −1 and its largest angle is 180° by construction")
    if isinstance(config, HRAConfig):
        notes.append("HRA: the generator column is the largest ‖u_i‖ (H does not depend on it; training does)")
    return AdapterReport(
        peft_type=config.peft_type,
        layers=layers,
        other_tensors=len(others),
        other_parameters=sum(tensor.numel() for tensor in others),
        notes=notes,
    )


def layer_adapter_report(name: str, adapter: LayerAdapter) -> LayerReport:
    """Report on one layer's adapter as a single-file format describes it (either side, either method).

    The rotations are the ones the layer applies: COFT-projected, then held within LyCORIS's joint bound
    ``‖Q‖_F ≤ alpha · width`` (all of the layer's generators together), then Cayley (or its series).
    """
    radius = lycoris_radius(adapter.constraint, adapter.features)
    if adapter.method == "oft":
        packed = adapter.generators.double()
        packed = project_coft(packed, adapter.eps) if adapter.coft else packed
        used = project_packed_jointly(packed, radius)
        skew = skew_from_packed(used, adapter.block_size)
        before = skew_from_packed(packed, adapter.block_size)
        neumann, terms = adapter.use_cayley_neumann, adapter.num_cayley_neumann_terms
        rotations = cayley_transform(skew, neumann, terms)
        method, cayley = ("COFT" if adapter.coft else "OFT"), (f"neumann({terms})" if neumann else "exact")
    else:
        before = boft_generators(adapter.generators.double())
        skew = project_skew_jointly(before, radius)
        rotations, method, cayley = cayley_exact(skew), "BOFT", "exact"
    norm_before = float(torch.linalg.vector_norm(before))
    scale = adapter.rescale
    return LayerReport(
        name=name,
        method=method,
        block_size=adapter.block_size,
        num_blocks=adapter.generators.shape[-2] if adapter.method == "oft" else adapter.num_blocks,
        butterfly_factors=adapter.num_factors,
        parameters=adapter.generators.numel() + (scale.numel() if scale is not None else 0),
        max_generator_norm=float(torch.linalg.matrix_norm(skew).max()),
        max_angle_degrees=max_rotation_angle(rotations),
        orthogonality_error=float(orthogonality_error(rotations)),
        cayley=cayley,
        block_share=adapter.block_share,
        coft=adapter.coft,
        output_scale_range=None if scale is None else (float(scale.min()), float(scale.max())),
        rotation_side=adapter.rotation_side,
        constraint=adapter.constraint,
        constraint_scale=float(torch.linalg.vector_norm(skew)) / norm_before if norm_before > 0 else 1.0,
    )


def inspect_layer_adapters(adapters: Mapping[str, LayerAdapter], format_name: str) -> AdapterReport:
    """Report on the layers of a single-file adapter (``{layer name: LayerAdapter}``) of ``format_name``."""
    layers = [layer_adapter_report(name, adapter) for name, adapter in sorted(adapters.items())]
    methods = sorted({"OFT" if adapter.method == "oft" else "BOFT" for adapter in adapters.values()})
    notes = []
    binding = [layer.name for layer in layers if layer.constraint_scale < 1 - 1e-12]
    if binding:
        notes.append(
            f"the constraint (alpha) binds in {len(binding)} of {len(layers)} layers: their generators are scaled "
            "down to ‖Q‖_F = alpha · width (the angles shown are after that)"
        )
    return AdapterReport(peft_type="+".join(methods), layers=layers, format=format_name, notes=notes)


def _strip_prefix(key: str) -> str:
    return key[len(MODEL_PREFIX) :] if key.startswith(MODEL_PREFIX) else key


# ------------------------------------------------------------------------------------ hyperspherical energy
#: Neurons beyond this many are subsampled (the energy costs O(n²) memory and time).
MAX_ENERGY_NEURONS = 2048


def neuron_sample(num_neurons: int, max_neurons: int = MAX_ENERGY_NEURONS) -> torch.Tensor:
    """Indices of the neurons the energy is computed on: all, or ``max_neurons`` evenly spaced (deterministic)."""
    if num_neurons <= max_neurons:
        return torch.arange(num_neurons)
    return torch.linspace(0, num_neurons - 1, max_neurons).round().long()


def hyperspherical_energy(neurons: torch.Tensor) -> float:
    """``Σ_{i≠j} 1/‖ŵ_i − ŵ_j‖`` over the unit-normalised rows ``ŵ_i`` of ``neurons: (n, d)`` (in float64).

    Coinciding directions give ``inf``; zero rows are left out (they have no direction).
    """
    rows = neurons.detach().double().reshape(neurons.shape[0], -1)
    norms = torch.linalg.vector_norm(rows, dim=1, keepdim=True)
    rows = rows[norms.squeeze(1) > 0] / norms[norms.squeeze(1) > 0]
    distances = torch.cdist(rows, rows)
    off_diagonal = ~torch.eye(rows.shape[0], dtype=torch.bool)
    return float((1.0 / distances[off_diagonal]).sum())


def hyperspherical_energy_change(
    base: torch.Tensor, merged: torch.Tensor, max_neurons: int = MAX_ENERGY_NEURONS
) -> dict[str, Any]:
    """Energy of the base and merged neurons (rows of ``(out, d)`` weight matrices), on the same sample.

    Returns:
        ``{"base", "merged", "relative_change", "neurons", "sampled"}``; ``sampled`` says how many of
        ``neurons`` rows were used (evenly spaced, so the same rows for both weights).
    """
    if base.shape != merged.shape:
        raise ValueError(f"base weight {tuple(base.shape)} and merged weight {tuple(merged.shape)} differ in shape")
    index = neuron_sample(base.shape[0], max_neurons)
    before = hyperspherical_energy(base[index])
    after = hyperspherical_energy(merged[index])
    change = (after - before) / before if before not in (0.0, math.inf) else math.nan
    return {
        "base": before,
        "merged": after,
        "relative_change": change,
        "neurons": int(base.shape[0]),
        "sampled": int(index.numel()),
    }
