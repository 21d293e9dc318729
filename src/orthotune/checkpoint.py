"""Adapter files: ``adapter_config.json`` + ``adapter_model.safetensors``, exactly as peft 0.21.2 writes them.

Keys are the model's state-dict keys under ``base_model.model.`` with the adapter name left out::

    base_model.model.model.layers.0.self_attn.q_proj.oft_R.weight     (r, b(b-1)/2)    OFT
    base_model.model.model.embed_tokens.oft_embedding_R.weight         (r, b(b-1)/2)    OFT on an embedding
    base_model.model.bert.encoder.layer.0.attention.self.query.boft_R (m, N, b, b)     BOFT
    base_model.model.bert.encoder.layer.0.attention.self.query.boft_s (out, 1)         BOFT
    base_model.model.model.layers.0.self_attn.q_proj.hra_u             (in, r)          HRA
    base_model.model.classifier.weight                                                  modules_to_save

One convention differs and is mapped on the way in and out: peft's exact Cayley mode
(``use_cayley_neumann=False``) computes the transposed rotation of its Neumann mode and of orthotune, so in
files with that setting ``oft_R`` holds the negated generators (``R(-Q) = R(Q)ᵀ``).

Reading never unpickles (JSON and safetensors only) and checks everything before a model is touched; writing
is atomic (a temporary file in the same directory, then ``os.replace``), so a crash keeps the previous files.

Old peft OFT files (``oft_r`` square blocks and ``oft_s`` scales, peft 0.14–0.15) are converted exactly:
that OFT computed ``x ↦ (x M Wᵀ)·s + b`` with ``M = diag((I - S)(I + S)⁻¹)``, ``S = (A - Aᵀ)/2``, which is
a one-factor BOFT adapter with ``boft_R = A`` and ``boft_s = s``. Files of peft ≤ 0.13 (no ``oft_block_size``,
a rotation of the outputs) are refused.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from orthotune.adapter_layer import AdapterLayer
from orthotune.atomic_write import write_bytes, write_files_atomically
from orthotune.base_layer import LayerKind
from orthotune.config import CONFIG_NAME, AdapterConfig, BOFTConfig, OFTConfig, read_config_file
from orthotune.model_card import base_model_name, update_model_card
from orthotune.modules_to_save import ModulesToSaveWrapper
from orthotune.targeting import module_name

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "adapter_model.safetensors"
#: Prefix of every key in an adapter file: peft's ``PeftModel.base_model.model``.
MODEL_PREFIX = "base_model.model."
#: Key endings of OFT rotation parameters in an adapter file (peft names an embedding's ``oft_embedding_R``).
OFT_ROTATION_SUFFIXES = (".oft_R.weight", ".oft_embedding_R.weight")
_LEGACY_SUFFIXES = (".oft_r", ".oft_s")


class AdapterFileError(ValueError):
    """An adapter file that cannot be loaded into this model; the model is left as it was."""


# ------------------------------------------------------------------------------------------------- writing
def save_adapter_files(
    directory: str | os.PathLike[str], config: AdapterConfig, tensors: Mapping[str, torch.Tensor]
) -> None:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` into ``directory``.

    ``tensors`` are in orthotune's convention; they are written in peft's. Both files are written completely
    to temporary files before either replaces its predecessor, so an interrupted save leaves the previous pair.
    """
    from safetensors.torch import save_file

    check_peft_expressible(config, os.fspath(directory))

    os.makedirs(directory, exist_ok=True)
    weights_path = os.path.join(directory, WEIGHTS_NAME)
    config_path = os.path.join(directory, CONFIG_NAME)
    to_save = {key: _clone_for_file(tensor) for key, tensor in to_peft_convention(config, tensors).items()}
    write_files_atomically(
        {
            weights_path: lambda path: save_file(to_save, path, metadata={"format": "pt"}),
            config_path: lambda path: write_bytes(path, config.to_json_string().encode()),
        }
    )


def check_peft_expressible(config: AdapterConfig, what: str) -> None:
    """Refuse to write an output-side adapter in peft's format, which cannot say which side a rotation is on.

    peft 0.21.2 drops the settings it does not know (``rotation_side``, with a warning) and, wherever a layer's
    input and output widths give the same shapes, loads the tensors as an input-side adapter: another model,
    silently. Such adapters are written as LyCORIS files, which mean the output side.
    """
    if getattr(config, "rotation_side", "input") == "output":
        raise ValueError(
            f"{what}: this {config.peft_type} adapter rotates layer outputs (rotation_side='output'), which peft's "
            "files cannot express (peft would load it as an input-side adapter and compute something else); "
            "write it with save_file(path, format='lycoris') instead"
        )


def _clone_for_file(tensor: torch.Tensor) -> torch.Tensor:
    # A fresh contiguous CPU copy: safetensors refuses tensors that share storage (tied weights).
    return tensor.detach().to("cpu", copy=True).contiguous()


def to_peft_convention(config: AdapterConfig, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map tensors between orthotune's and peft's convention (an involution: the same call maps back).

    Only OFT rotation generators in exact Cayley mode differ: peft's exact mode means ``R(-Q)``.
    """
    flip = isinstance(config, OFTConfig) and not config.use_cayley_neumann
    return {key: -tensor if flip and key.endswith(OFT_ROTATION_SUFFIXES) else tensor for key, tensor in tensors.items()}


# ------------------------------------------------------------------------------------------------- reading
@dataclass
class AdapterFile:
    """The content of an adapter directory, checked and in orthotune's convention.

    Attributes:
        config: the adapter's config (a :class:`BOFTConfig` for a converted old OFT file).
        tensors: file keys to CPU tensors.
        source: the directory, for error messages.
        legacy_oft: the old OFT config when the file holds peft ≤ 0.15 ``oft_r``/``oft_s`` tensors still to be
            converted by :func:`convert_legacy_oft` (which needs the model's layer widths).
    """

    config: AdapterConfig
    tensors: dict[str, torch.Tensor]
    source: str
    legacy_oft: dict[str, Any] | None = None


def read_adapter_files(directory: str | os.PathLike[str]) -> AdapterFile:
    """Read and check an adapter directory written by orthotune or by peft (any version that can be mapped)."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(
            f"adapter directory {directory!r} does not exist; orthotune loads adapters from a local directory "
            "(download one with huggingface_hub.snapshot_download first)"
        )
    raw = read_config_file(os.path.join(directory, CONFIG_NAME))
    if not isinstance(raw, dict):
        raise AdapterFileError(f"{directory}/{CONFIG_NAME} must hold a JSON object")
    tensors = _read_safetensors(directory)
    is_legacy = any(key.endswith(_LEGACY_SUFFIXES) for key in tensors)
    if raw.get("peft_type") == "OFT" and "oft_block_size" not in raw:
        raise AdapterFileError(
            f"{directory} holds an OFT adapter written by peft ≤ 0.13 (its config has no oft_block_size): that "
            "OFT rotated the layer outputs, which no current OFT adapter can express; load it with peft 0.13, "
            "or train a new adapter"
        )
    if raw.get("peft_type") == "OFT" and is_legacy:
        return AdapterFile(_legacy_boft_config(raw), tensors, directory, legacy_oft=raw)
    if is_legacy:
        raise AdapterFileError(f"{directory} mixes old peft OFT keys (oft_r, oft_s) into a {raw.get('peft_type')} file")
    raw = _peft_neumann_terms(raw, directory)
    config = AdapterConfig.from_dict(raw)
    return AdapterFile(config, to_peft_convention(config, tensors), directory)


def _read_safetensors(directory: str) -> dict[str, torch.Tensor]:
    path = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isfile(path):
        pickled = [name for name in ("adapter_model.bin", "adapter_model.pt") if os.path.isfile(f"{directory}/{name}")]
        hint = (
            f"; {pickled[0]} is a pickle file, which orthotune never loads (it can run code): convert it with "
            "peft, which writes safetensors by default"
            if pickled
            else ""
        )
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {directory!r}{hint}")
    return read_safetensors(path)


def read_safetensors(path: str, allow_flags: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file on the CPU, each checked to be floating point and finite.

    Args:
        allow_flags: also accept boolean and integer tensors (single-file formats store settings as such
            markers, OneTrainer's ``scaled_oft`` say); the format's reader decides what they mean.

    Raises:
        AdapterFileError: the file is damaged, or holds a tensor that is no adapter weight.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError) as error:
        raise AdapterFileError(f"{path} is not a readable safetensors file ({error}); the file is damaged") from error
    for key, tensor in tensors.items():
        if not tensor.is_floating_point():
            if allow_flags and not tensor.is_complex():
                continue
            raise AdapterFileError(f"{path}: {key} has dtype {tensor.dtype}; adapter weights are floating point")
        if not torch.isfinite(tensor).all():
            raise AdapterFileError(f"{path}: {key} holds NaN or infinite values; the adapter is broken")
    return tensors


def _version(text: Any) -> tuple[int, ...]:
    numbers = re.findall(r"\d+", str(text).partition("@")[0])[:3]
    return tuple(int(number) for number in numbers) if numbers else (0,)


def _peft_neumann_terms(raw: dict[str, Any], source: str) -> dict[str, Any]:
    """peft's series with ``n`` terms is the Cayley-Neumann truncation only for ``n ≥ 4``; map or refuse the rest."""
    if raw.get("peft_type") != "OFT" or not raw.get("use_cayley_neumann", True):
        return raw
    terms = raw.get("num_cayley_neumann_terms", 5)
    written_by = raw.get("peft_version")  # peft writes it since 0.18
    if written_by is None or _version(written_by) < (0, 18):
        warnings.warn(
            f"{source} was written by peft {written_by or '< 0.18'}, whose Cayley-Neumann series (all terms "
            "doubled) peft 0.18 replaced; like peft, orthotune applies the current series, so outputs differ "
            "slightly from those in training",
            stacklevel=3,
        )
    if terms == 3:  # peft's 3-term series is I + 2Q + 2Q² + Q³: the 4-term truncation
        return {**raw, "num_cayley_neumann_terms": 4}
    if isinstance(terms, int) and terms < 3:
        raise AdapterFileError(
            f"{source}: num_cayley_neumann_terms={terms} makes peft compute {'I' if terms < 2 else 'I + 2Q'}, which "
            "is not a rotation orthotune can represent; load it with peft"
        )
    return raw


def remap_keys(tensors: dict[str, torch.Tensor], key_mapping: Mapping[str, str] | None) -> dict[str, torch.Tensor]:
    """peft's ``key_mapping``: regex renames applied to each key after ``base_model.model.``, the first match wins."""
    if not key_mapping:
        return tensors
    renamed = {}
    for key, tensor in tensors.items():
        prefix = MODEL_PREFIX if key.startswith(MODEL_PREFIX) else ""
        rest = key.removeprefix(prefix)
        for pattern, replacement in key_mapping.items():
            new, count = re.subn(pattern, replacement, rest)
            if count:
                rest = new
                break
        renamed[f"{prefix}{rest}"] = tensor
    return renamed


def adapted_module_names(file: AdapterFile) -> list[str]:
    """The modules an adapter file adapts, by their name in the model (no ``base_model.model.``), in file order.

    A key belongs to an adapted layer when one of its dotted parts starts with the method's ``prefix``
    (``oft_``, ``boft_``, ``hra_``: peft's own rule for telling adapter tensors from saved base tensors); the
    module is what comes before that part. The config says the prefix, so every registered method is read alike.
    """
    prefix = OFTConfig.prefix if file.legacy_oft is not None else file.config.prefix
    names: dict[str, None] = {}
    for key in file.tensors:
        parts = (key[len(MODEL_PREFIX) :] if key.startswith(MODEL_PREFIX) else key).split(".")
        position = next((index for index, part in enumerate(parts) if part.startswith(prefix)), None)
        if position:
            names.setdefault(".".join(parts[:position]), None)
    return list(names)


# ------------------------------------------------------------------------------------------ keys of a model
def layer_tensors(module_name: str, layer: AdapterLayer, adapter_name: str) -> dict[str, torch.Tensor]:
    """File keys of one adapter in one adapted layer, to its parameters."""
    prefix = f"{MODEL_PREFIX}{module_name}."
    return {f"{prefix}{key}": tensor for key, tensor in layer.adapter_tensors(adapter_name).items()}


def module_tensors(module_name: str, module: nn.Module) -> dict[str, torch.Tensor]:
    """File keys of a module saved in full (``modules_to_save``, a bias, an embedding), to its tensors."""
    prefix = f"{MODEL_PREFIX}{module_name}." if module_name else MODEL_PREFIX
    return {f"{prefix}{name}": tensor for name, tensor in module.state_dict(keep_vars=True).items()}


def check_tensors(
    file: AdapterFile, required: Mapping[str, torch.Tensor], optional: Mapping[str, torch.Tensor]
) -> None:
    """Every required key present, no key unknown, every shape right; or an :class:`AdapterFileError`."""
    missing = sorted(set(required) - set(file.tensors))
    unexpected = sorted(set(file.tensors) - set(required) - set(optional))
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys, e.g. {missing[:3]}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys, e.g. {unexpected[:3]}")
    for key, tensor in file.tensors.items():
        target = required.get(key, optional.get(key))
        if target is not None and tuple(tensor.shape) != tuple(target.shape):
            problems.append(f"{key} has shape {tuple(tensor.shape)} in the file but {tuple(target.shape)} in the model")
            if len(problems) > 5:
                break
    if problems:
        raise AdapterFileError(
            f"the adapter in {file.source} does not fit this model ({file.config.peft_type}, target_modules="
            f"{file.config.target_modules!r}): " + "; ".join(problems) + ". Is it an adapter for another model?"
        )


def copy_tensors(file: AdapterFile, targets: Mapping[str, torch.Tensor]) -> None:
    """Copy the file's tensors into ``targets`` (same keys, checked by :func:`check_tensors`)."""
    with torch.no_grad():
        for key, target in targets.items():
            if key in file.tensors:
                target.copy_(file.tensors[key])


# -------------------------------------------------------------------------------------------- old peft OFT
def _legacy_boft_config(raw: dict[str, Any]) -> BOFTConfig:
    shared = {
        key: raw[key]
        for key in (
            "target_modules",
            "exclude_modules",
            "layers_to_transform",
            "layers_pattern",
            "modules_to_save",
            "init_weights",
            "fan_in_fan_out",
            "task_type",
            "inference_mode",
            "base_model_name_or_path",
            "revision",
            "auto_mapping",
        )
        if key in raw
    }
    r, block_size = raw.get("r", 0), raw.get("oft_block_size", 0)
    return BOFTConfig(
        **shared,
        boft_block_size=0 if r else block_size,
        boft_block_num=r,
        boft_n_butterfly_factor=1,
        boft_dropout=raw.get("module_dropout", 0.0),
        bias={"oft_only": "boft_only"}.get(raw.get("bias", "none"), raw.get("bias", "none")),
    )


def convert_legacy_oft(file: AdapterFile, layers: Mapping[str, AdapterLayer]) -> None:
    """Turn peft ≤ 0.15 ``oft_r``/``oft_s`` tensors into the exact one-factor BOFT adapter, in place.

    Args:
        file: as read, with ``legacy_oft`` set.
        layers: planned BOFT layers by module name (their widths decide the old COFT radius).

    peft 0.14–0.15 made blocks from ``A`` by ``(I - S)(I + S)⁻¹``, ``S = (A - Aᵀ)/2`` (one block repeated with
    ``block_share``), and with ``coft`` first rescaled each ``A`` to Frobenius norm at most
    ``eps·⌈out/r⌉² / √(stored blocks)``; orthotune's BOFT makes ``(I + Q)(I - Q)⁻¹`` with
    ``Q = (Aᵀ - A)/2``: the same matrix.
    """
    raw = file.legacy_oft
    assert raw is not None
    coft, eps = bool(raw.get("coft", False)), float(raw.get("eps", 6e-5))
    converted: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        prefix = f"{MODEL_PREFIX}{name}."
        if f"{prefix}oft_r" not in file.tensors:
            continue
        if layer.kind is not LayerKind.LINEAR:
            raise AdapterFileError(
                f"{file.source}: the old peft (≤ 0.15) OFT adapter of {name!r} adapts a {layer.kind.value} layer, "
                "whose old forward ignored the layer's dilation and non-square kernels; only linear layers are "
                "converted; load it with peft 0.15"
            )
        blocks = file.tensors.pop(f"{prefix}oft_r").float()
        scale = file.tensors.pop(f"{prefix}oft_s", None)
        block_size = blocks.shape[-1]
        num_blocks = layer.rotated_features // block_size
        if coft:
            radius = eps * math.ceil(layer.out_features / num_blocks) ** 2 / math.sqrt(blocks.shape[0])
            norms = torch.linalg.matrix_norm(blocks, keepdim=True)
            blocks = torch.where(norms <= radius, blocks, blocks * (radius / norms))
        if blocks.shape[0] == 1:
            blocks = blocks.expand(num_blocks, -1, -1)
        converted[f"{prefix}boft_R"] = blocks.unsqueeze(0).contiguous()
        converted[f"{prefix}boft_s"] = torch.ones(layer.out_features, 1) if scale is None else scale
    leftover = sorted(key for key in file.tensors if key.endswith(_LEGACY_SUFFIXES))
    if leftover:
        raise AdapterFileError(f"{file.source}: old OFT tensors {leftover[:3]} fit no targeted layer of this model")
    file.tensors.update(converted)
    file.legacy_oft = None
    logger.info("converted the peft ≤ 0.15 OFT adapter in %s into an exact one-factor BOFT adapter", file.source)


# ------------------------------------------------------------------------------------ a model's adapter files
#: Embedding layers whose base weights peft saves with an adapter that targets them by name.
EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")


class AdaptedModel(Protocol):
    """What the file functions need of a model with adapters (:class:`orthotune.OrthoModel` is one)."""

    peft_config: dict[str, AdapterConfig]

    def get_base_model(self) -> nn.Module: ...

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]: ...

    def adapter_layers(self) -> Iterator[tuple[str, AdapterLayer]]: ...

    def modules_to_save_wrappers(self) -> Iterator[tuple[str, ModulesToSaveWrapper]]: ...

    def trained_biases(self, bias: str, adapter_name: str) -> dict[str, torch.Tensor]: ...


def save_model_adapters(
    model: AdaptedModel,
    save_directory: str | os.PathLike[str],
    safe_serialization: bool = True,
    selected_adapters: Sequence[str] | None = None,
    save_embedding_layers: bool | str = "auto",
    is_main_process: bool = True,
    state_dict: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """:meth:`orthotune.OrthoModel.save_pretrained`: each adapter as peft writes it, ``default`` into ``save_directory``
    and the others into subdirectories named after them."""
    if not safe_serialization:
        raise ValueError("safe_serialization=False would write a pickle; orthotune writes safetensors only")
    if os.path.isfile(save_directory):
        raise ValueError(f"save_directory={os.fspath(save_directory)!r} is a file; pass a directory")
    names = list(model.peft_config) if selected_adapters is None else list(selected_adapters)
    unknown = [name for name in names if name not in model.peft_config]
    if unknown:
        raise ValueError(f"selected_adapters={unknown}: this model has adapters {list(model.peft_config)}")
    for name in names:  # before anything is written
        check_peft_expressible(model.peft_config[name], f"adapter {name!r}")
    own_keys = {id(value): key for key, value in model.state_dict(keep_vars=True).items()} if state_dict else {}
    files = {}
    for name in names:
        tensors = adapter_file_tensors(model, name, save_embedding_layers)
        if state_dict is not None:
            tensors = {key: state_dict.get(own_keys.get(id(value), ""), value) for key, value in tensors.items()}
        _refuse_partitioned(tensors)  # on every process, so that all of them stop, not only the writer
        files[name] = tensors
    if not is_main_process:
        return
    for name, tensors in files.items():
        directory = save_directory if name == "default" else os.path.join(save_directory, name)
        save_adapter_files(directory, config_for_file(model, name), tensors)
    update_model_card(save_directory, model)  # last: a save that fails leaves the card as it was


def _refuse_partitioned(tensors: Mapping[str, torch.Tensor]) -> None:
    """Refuse to write DeepSpeed ZeRO-3 placeholders (empty tensors standing for partitioned parameters)."""
    empty = [key for key, value in tensors.items() if hasattr(value, "ds_id") and value.numel() == 0]
    if empty:
        raise ValueError(
            f"cannot save {empty[0]!r} (and {len(empty) - 1} more): DeepSpeed ZeRO-3 has partitioned it and this "
            "process holds an empty placeholder; gather the adapter first, on every rank: "
            "`with deepspeed.zero.GatheredParameters([p for p in model.parameters() if p.requires_grad]): "
            "model.save_pretrained(path, is_main_process=rank == 0)`"
        )


def adapter_file_tensors(
    model: AdaptedModel, adapter_name: str, save_embedding_layers: bool | str
) -> dict[str, torch.Tensor]:
    """File keys of one adapter: its own tensors, the biases it trains, and embeddings as asked."""
    config = model.peft_config[adapter_name]
    tensors = own_file_tensors(model, adapter_name)
    for name, bias in model.trained_biases(config.bias, adapter_name).items():
        tensors[f"{MODEL_PREFIX}{name}"] = bias
    # peft's rule: with an embedding named in target_modules, "auto" saves the base weights of the targeted
    # embedding layers; asked explicitly otherwise, it saves the input and output embeddings whole.
    targeted = embedding_targeted(config, model.get_base_model())
    if save_embedding_layers is True or (save_embedding_layers == "auto" and targeted):
        for name, module in embedding_modules(model.get_base_model()).items():
            if isinstance(module, AdapterLayer):
                tensors.update(module_tensors(f"{name}.base_layer", module.get_base_layer()))
            elif not targeted:
                tensors.update(module_tensors(name, module))
    return tensors


def embedding_targeted(config: AdapterConfig, model: nn.Module) -> bool:
    """peft's test of whether ``target_modules`` names an embedding (``embed_tokens``, ``lm_head``): by name in a
    set or list, by matching an embedding-named module of ``model`` for a regex."""
    targets = config.target_modules
    if isinstance(targets, str):
        return any(
            re.fullmatch(targets, name) and name.rpartition(".")[2] in EMBEDDING_LAYER_NAMES
            for name, _ in model.named_modules()
        )
    if not targets:
        return False
    return any(name in targets for name in EMBEDDING_LAYER_NAMES)


def own_file_tensors(model: AdaptedModel, adapter_name: str) -> dict[str, torch.Tensor]:
    """File keys of what only the adapter holds: its layers' tensors and its ``modules_to_save`` copies."""
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in model.adapter_layers():
        if adapter_name in layer.adapter_names:
            tensors.update(layer_tensors(name, layer, adapter_name))
    for name, wrapper in model.modules_to_save_wrappers():
        if adapter_name in wrapper.modules_to_save:
            tensors.update(module_tensors(name, wrapper.modules_to_save[adapter_name]))
    return tensors


def optional_file_tensors(
    model: AdaptedModel, layers: Mapping[str, AdapterLayer], config: AdapterConfig
) -> dict[str, torch.Tensor]:
    """Base-model tensors a file for ``layers`` may carry besides the adapter's own: biases, embedding weights."""
    optional: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        optional.update(module_tensors(f"{name}.base_layer", layer.get_base_layer()))
    for name, module in embedding_modules(model.get_base_model()).items():
        optional.update(module_tensors(name, module))
    if config.bias == "all":
        for name, parameter in model.get_base_model().named_parameters():
            if name.rpartition(".")[2] == "bias":
                optional[f"{MODEL_PREFIX}{name}"] = parameter
    return optional


def embedding_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The input and output embedding modules of a transformers model by name (none for other models)."""
    found: dict[str, nn.Module] = {}
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        method = getattr(model, getter, None)
        module = method() if callable(method) else None
        name = module_name(model, module)
        if name and isinstance(module, nn.Module):
            found[name] = module
    return found


def config_for_file(model: AdaptedModel, adapter_name: str) -> AdapterConfig:
    """The adapter's config as written: frozen, with the base model's name and, without a task, its class."""
    config = copy.deepcopy(model.peft_config[adapter_name])
    base = model.get_base_model()
    config.inference_mode = True
    if config.base_model_name_or_path is None:
        config.base_model_name_or_path = base_model_name(base)
    if config.task_type is None:
        config.auto_mapping = {"base_model_class": type(base).__name__, "parent_library": type(base).__module__}
    return config
