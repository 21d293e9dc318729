"""Export an OFT/BOFT adapter as a peft LoRA adapter, for tools that read only LoRA.

An orthogonal adapter changes each weight by ``ΔW = W' − W`` (``W' = W Rᵀ`` merged, times BOFT's scale), which
generally has full rank. The export writes, per layer, the truncated SVD ``ΔW ≈ B A``
(:mod:`orthotune.functional.lowrank`) as peft 0.21.2 LoRA tensors, with ``lora_alpha = r`` so that peft's
scaling ``alpha / r`` is 1 and its merged weight is ``W + B A``::

    rank=k          every layer rank k (capped at the layer's full rank min(out, d))
    tolerance=t     per layer the smallest rank with ‖W' − (W + B A)‖_F ≤ t·‖W'‖_F (rank_pattern/alpha_pattern)

Layouts (peft's, adapter name left out of the keys, as peft saves them)::

    Linear, Conv1D   base_model.model.<path>.lora_A.weight (k, d)          lora_B.weight (out, k)
    Conv2d           base_model.model.<path>.lora_A.weight (k, in, kh, kw)  lora_B.weight (out, k, 1, 1)
    Embedding        base_model.model.<path>.lora_embedding_A (k, num)     lora_embedding_B (dim, k)

GPT-2's ``Conv1D`` stores its weight transposed; ``fan_in_fan_out`` is set in the config when any exported
layer is one (peft corrects the flag per layer, with a warning, for the others). A layer whose change is
within the tolerance at rank 0 is left out of ``target_modules``. The orthogonal adapter itself is not a
LoRA: at a rank below full the exported adapter is an approximation, no longer a rotation, and the report
says by how much per layer. The low-rank form is what LoRA-only tools can read, not a way to save space: at
full rank it is ``k(out + d)`` numbers against ``d(b − 1)/2`` for OFT.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from orthotune.adapter_layer import AdapterLayer
from orthotune.atomic_write import write_bytes, write_files_atomically
from orthotune.base_layer import LayerKind, weight_matrix
from orthotune.checkpoint import MODEL_PREFIX, WEIGHTS_NAME, config_for_file, module_tensors
from orthotune.config import CONFIG_NAME, PEFT_FORMAT_VERSION
from orthotune.functional import low_rank_factors, rank_for_tolerance, truncation_errors

__all__ = ["REPORT_NAME", "LayerExport", "LoraExportReport", "export_lora"]

#: The per-layer report written next to the adapter files.
REPORT_NAME = "export_report.json"


@dataclass
class LayerExport:
    """One exported layer.

    Attributes:
        name: the module's name in the model.
        kind: ``linear``, ``conv1d``, ``conv2d`` or ``embedding``.
        shape: ``(out, d)`` of the weight change as a matrix (``(num, dim)`` for an embedding).
        rank: the LoRA rank written (0: left out).
        full_rank: ``min(out, d)``.
        relative_error: ``‖W' − (W + B A)‖_F / ‖W'‖_F``, measured from the factors as written.
        relative_change: ``‖W' − W‖_F / ‖W'‖_F``, the error of leaving the layer out.
        strength: the adapter's strength in this layer (``set_scale``), which the export includes.
    """

    name: str
    kind: str
    shape: tuple[int, int]
    rank: int
    full_rank: int
    relative_error: float
    relative_change: float
    strength: float = 1.0


@dataclass
class LoraExportReport:
    """What :func:`export_lora` wrote, and how close it is (also written as ``export_report.json``)."""

    adapter_name: str
    source_peft_type: str
    rank: int | None
    tolerance: float | None
    layers: list[LayerExport]
    #: Size of ``adapter_model.safetensors``.
    file_bytes: int = 0
    #: Numbers in the LoRA factors.
    lora_parameters: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def max_relative_error(self) -> float:
        return max((layer.relative_error for layer in self.layers), default=0.0)

    def as_dict(self) -> dict[str, Any]:
        return {
            "adapter_name": self.adapter_name,
            "source_peft_type": self.source_peft_type,
            "rank": self.rank,
            "tolerance": self.tolerance,
            "file_bytes": self.file_bytes,
            "lora_parameters": self.lora_parameters,
            "max_relative_error": self.max_relative_error,
            "error_definition": "||W' - (W + B A)||_F / ||W'||_F per layer; W' the OFT/BOFT merged weight",
            "layers": [asdict(layer) for layer in self.layers],
            "notes": list(self.notes),
        }


def _check_arguments(rank: int | None, tolerance: float | None) -> None:
    if (rank is None) == (tolerance is None):
        raise ValueError(
            f"rank={rank!r}, tolerance={tolerance!r}: pass exactly one, e.g. rank=16 (every layer) or "
            "tolerance=0.01 (per layer the smallest rank within 1% of the merged weight)"
        )
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"rank={rank!r} must be a positive integer, e.g. 16")
    if tolerance is not None and (isinstance(tolerance, bool) or not isinstance(tolerance, (int, float))):
        raise ValueError(f"tolerance={tolerance!r} must be a number, e.g. 0.01 for 1%")
    if tolerance is not None and not (math.isfinite(tolerance) and tolerance >= 0):
        raise ValueError(f"tolerance={tolerance!r} must be a finite relative error ≥ 0, e.g. 0.01 for 1%")


def _layer_factors(
    layer: AdapterLayer, adapter_name: str, rank: int | None, tolerance: float | None, name: str
) -> tuple[torch.Tensor, torch.Tensor, LayerExport]:
    """``(B, A)`` in the base weight's dtype with ``ΔW ≈ B A`` (``(out, d)`` view), and the layer's report."""
    with torch.no_grad():
        original = weight_matrix(layer.get_base_layer(), layer.kind).detach()
        dtype = original.dtype
        original = original.float()
        merged = layer.merged_weight_matrix([adapter_name])
        delta = merged - original
        u, singular_values, vh = torch.linalg.svd(delta, full_matrices=False)
        full_rank = singular_values.shape[0]
        merged_norm = float(torch.linalg.matrix_norm(merged.double()))
        scale = merged_norm if merged_norm > 0 else 1.0

        def error_at(k: int) -> tuple[torch.Tensor, torch.Tensor, float]:
            b, a = (factor.to(dtype) for factor in low_rank_factors(u, singular_values, vh, k))
            # Measured as peft will see it: the written factors against the merged weight.
            residual = delta.double() - b.double() @ a.double()
            return b, a, float(torch.linalg.matrix_norm(residual)) / scale

        if rank is not None:
            chosen = min(rank, full_rank)
            b, a, error = error_at(chosen)
        else:
            assert tolerance is not None
            chosen = rank_for_tolerance(singular_values, tolerance * merged_norm)
            b, a, error = error_at(chosen)
            while error > tolerance and chosen < full_rank:  # rounding of the factors can cost a rank
                chosen += 1
                b, a, error = error_at(chosen)
        change = float(truncation_errors(singular_values)[0]) / scale
    report = LayerExport(
        name=name,
        kind=layer.kind.value,
        shape=(int(delta.shape[0]), int(delta.shape[1])),
        rank=chosen,
        full_rank=full_rank,
        relative_error=error,
        relative_change=change,
        strength=layer.strength(adapter_name),
    )
    return b, a, report


def _lora_tensors(layer: AdapterLayer, name: str, b: torch.Tensor, a: torch.Tensor) -> dict[str, torch.Tensor]:
    """peft's LoRA keys and layouts for ``ΔW = B A`` (``B: (out, k)``, ``A: (k, d)``)."""
    prefix = f"{MODEL_PREFIX}{name}."
    if layer.kind is LayerKind.EMBEDDING:
        # peft's embedding delta is (lora_embedding_B @ lora_embedding_A)ᵀ = Aᵀ Bᵀ with A (k, num), B (dim, k).
        return {f"{prefix}lora_embedding_A": b.t(), f"{prefix}lora_embedding_B": a.t()}
    if layer.kind is LayerKind.CONV2D:
        conv = layer.get_base_layer()
        assert isinstance(conv, nn.Conv2d)
        return {
            f"{prefix}lora_A.weight": a.reshape(a.shape[0], conv.in_channels, *conv.kernel_size),
            f"{prefix}lora_B.weight": b.reshape(*b.shape, 1, 1),
        }
    return {f"{prefix}lora_A.weight": a, f"{prefix}lora_B.weight": b}


def _contiguous_cpu(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to("cpu", copy=True).contiguous()


def _pattern_keys(names: Sequence[str], targets: Sequence[str]) -> dict[str, str]:
    """A ``rank_pattern`` key per module name that peft resolves to that module alone.

    peft picks, for a targeted module ``m``, the first key ``k`` with ``re.match(rf"(.*\\.)?({k})$", m)``; a full
    name normally matches only itself, but its dots match any character. A name that would also match another
    target gets an anchored, escaped key that matches it alone.
    """

    def matches(key: str, module: str) -> bool:
        return re.match(rf"(.*\.)?({key})$", module) is not None

    keys = {}
    for name in names:
        clashes = any(other != name and matches(name, other) for other in targets)
        keys[name] = f"^{re.escape(name)}" if clashes else name
    return keys


def _target_modules(names: list[str], all_names: Sequence[str]) -> list[str] | str:
    """``names`` as peft's ``target_modules``: a list of full names, or a regex where a name is another's suffix."""
    chosen = set(names)
    clash = any(other not in chosen and other.endswith(f".{name}") for name in names for other in all_names)
    if not clash:
        return sorted(names)
    return "|".join(re.escape(name) for name in sorted(names))


def _lora_config(
    source: Any,
    rank: int,
    ranks: dict[str, int],
    target_modules: list[str] | str,
    fan_in_fan_out: bool,
) -> dict[str, Any]:
    """peft 0.21.2's ``adapter_config.json`` for a LoRA with scaling 1 (``lora_alpha = r`` in every layer)."""
    targets = list(ranks)
    differing = {name: value for name, value in ranks.items() if value != rank}
    keys = _pattern_keys(list(differing), targets)
    return {
        "peft_type": "LORA",
        "peft_version": PEFT_FORMAT_VERSION,
        "task_type": source.task_type,
        "base_model_name_or_path": source.base_model_name_or_path,
        "revision": source.revision,
        "inference_mode": True,
        "r": rank,
        "lora_alpha": rank,
        "rank_pattern": {keys[name]: value for name, value in differing.items()},
        "alpha_pattern": {keys[name]: value for name, value in differing.items()},
        "target_modules": target_modules,
        "lora_dropout": 0.0,
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "lora_bias": False,
        "init_lora_weights": True,
        "modules_to_save": source.modules_to_save,
        "auto_mapping": source.auto_mapping,
    }


def export_lora(
    model: Any,
    save_directory: str | os.PathLike[str],
    adapter_name: str = "default",
    rank: int | None = None,
    tolerance: float | None = None,
) -> LoraExportReport:
    """Write ``adapter_name`` of an :class:`~orthotune.OrthoModel` as a peft LoRA adapter directory.

    peft loads the directory onto the same base model (``peft.PeftModel.from_pretrained(base, directory)``);
    its merged weights then approximate the OFT/BOFT merged weights (at the adapter's current strength), to
    the per-layer errors in the report, and equal them at full rank up to rounding. The adapter's
    ``modules_to_save`` copies (a classifier head, say) are written as they are.

    Args:
        model: an ``OrthoModel`` holding ``adapter_name``, with nothing merged.
        save_directory: written atomically: ``adapter_config.json``, ``adapter_model.safetensors`` and
            ``export_report.json`` replace earlier files only once all three are complete.
        adapter_name: the adapter to export.
        rank: every layer at this rank (capped at the layer's ``min(out, d)``).
        tolerance: per layer the smallest rank with ``‖W' − (W + B A)‖_F ≤ tolerance·‖W'‖_F``. Exactly one of
            ``rank`` and ``tolerance``.

    Returns:
        The per-layer report (rank, relative error), also written as ``export_report.json``.

    Raises:
        ValueError: for bad arguments, an unknown adapter, merged adapters, an adapter that trains biases (a
            LoRA file cannot carry the original biases back), or a tolerance every layer meets at rank 0.
    """
    _check_arguments(rank, tolerance)
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict) or not callable(getattr(model, "adapter_layers", None)):
        raise TypeError(f"model must be an orthotune OrthoModel (from get_peft_model), got {type(model).__name__}")
    if adapter_name not in configs:
        raise ValueError(f"adapter_name={adapter_name!r}: this model has adapters {list(configs)}")
    source = configs[adapter_name]
    if source.bias != "none":
        raise ValueError(
            f"adapter {adapter_name!r} trains biases (bias={source.bias!r}): the model holds only the trained "
            "biases, and a LoRA file applied to the original model would need the original ones; merge the "
            "adapter instead (merge_and_unload)"
        )
    layers = [(name, layer) for name, layer in model.adapter_layers() if adapter_name in layer.adapter_names]
    merged = [name for name, layer in layers if layer.merged]
    if merged:
        raise ValueError(f"adapters are merged into {merged[:3]}; call unmerge_adapter() before export_lora")

    tensors: dict[str, torch.Tensor] = {}
    reports: list[LayerExport] = []
    ranks: dict[str, int] = {}
    conv1d = False
    notes: list[str] = []
    for name, layer in layers:
        b, a, report = _layer_factors(layer, adapter_name, rank, tolerance, name)
        reports.append(report)
        if report.rank == 0:
            continue
        ranks[name] = report.rank
        conv1d = conv1d or layer.kind is LayerKind.CONV1D
        tensors.update({key: _contiguous_cpu(value) for key, value in _lora_tensors(layer, name, b, a).items()})
        base = layer.get_base_layer()
        if layer.kind is LayerKind.CONV2D and (
            tuple(base.dilation) != (1, 1) or getattr(base, "padding_mode", "zeros") != "zeros"
        ):
            notes.append(
                f"{name}: peft's unmerged LoRA convolution ignores dilation and padding_mode; its merged weights "
                "are the ones reported here (call merge_and_unload() in peft for these outputs)"
            )
    if not ranks:
        raise ValueError(
            f"tolerance={tolerance}: every layer of adapter {adapter_name!r} is within it at rank 0 (largest "
            f"relative change {max(r.relative_change for r in reports):.3g}); there is no LoRA to write, use the "
            "base model or a smaller tolerance"
        )
    skipped = [report.name for report in reports if report.rank == 0]
    if skipped:
        notes.append(f"{len(skipped)} layers are within the tolerance unchanged and are left out: {skipped[:5]}")
    for module_name, wrapper in model.modules_to_save_wrappers():
        if adapter_name in wrapper.modules_to_save:
            copied = module_tensors(module_name, wrapper.modules_to_save[adapter_name])
            tensors.update({key: _contiguous_cpu(value) for key, value in copied.items()})

    config_rank = rank if rank is not None else Counter(ranks.values()).most_common(1)[0][0]
    all_names = [name for name, _ in model.get_base_model().named_modules()]
    as_saved = config_for_file(model, adapter_name)  # with the base model's name, as save_pretrained writes it
    config = _lora_config(as_saved, config_rank, ranks, _target_modules(list(ranks), all_names), conv1d)
    result = LoraExportReport(
        adapter_name=adapter_name,
        source_peft_type=source.peft_type,
        rank=rank,
        tolerance=tolerance,
        layers=reports,
        lora_parameters=sum(tensor.numel() for key, tensor in tensors.items() if ".lora_" in key),
        notes=notes,
    )

    def write_weights(path: str) -> None:
        from safetensors.torch import save_file

        save_file(tensors, path, metadata={"format": "pt"})
        result.file_bytes = os.path.getsize(path)

    def write_report(path: str) -> None:
        write_bytes(path, (json.dumps(result.as_dict(), indent=2) + "\n").encode())

    config_bytes = (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()
    os.makedirs(save_directory, exist_ok=True)
    write_files_atomically(
        {
            os.path.join(save_directory, WEIGHTS_NAME): write_weights,
            os.path.join(save_directory, CONFIG_NAME): lambda path: write_bytes(path, config_bytes),
            os.path.join(save_directory, REPORT_NAME): write_report,
        }
    )
    return result
