"""Single-file adapters (LyCORIS, kohya, OneTrainer) and models: read a file into a plan, write a model's adapter.

A single ``.safetensors`` file names layers its own way and says nothing of a config; its format is known from
its keys (:func:`orthotune.formats.detect_format`) and its reader gives ``{module name: LayerAdapter}``. From
there the path into a model is the one every adapter takes (:mod:`orthotune.injection`): new layers are built
beside the model and checked (each layer has the file's own block size, factors and side), and only a plan
that fits entirely is put in. The other way, a model's adapter becomes ``{module name: LayerAdapter}`` and the
format's writer makes the file, written atomically.

Loading never unpickles: only safetensors files are read.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Protocol

import torch
from torch import nn

from orthotune.adapter_layer import AdapterLayer
from orthotune.atomic_write import write_files_atomically
from orthotune.base_layer import LayerKind, in_out_features, layer_kind, rotated_features
from orthotune.boft import BOFTLayer
from orthotune.checkpoint import AdaptedModel, AdapterFileError, read_safetensors
from orthotune.formats import LayerAdapter, config_for_layer_adapters, detect_format, format_named, layer_adapter
from orthotune.formats.layer_adapter import add_layer_adapter
from orthotune.injection import AdapterPlan, new_layer
from orthotune.modules_to_save import ModulesToSaveWrapper
from orthotune.oft import OFTLayer
from orthotune.targeting import top_level_modules

__all__ = [
    "SingleFile",
    "file_layer_adapters",
    "layers_by_file_name",
    "load_model_file",
    "model_layer_adapters",
    "module_names",
    "plan_layer_adapters",
    "read_single_file",
    "renamed_for_format",
    "save_model_file",
    "write_single_file",
]


class LoadingModel(AdaptedModel, Protocol):
    """What loading needs of a model with adapters (:class:`orthotune.OrthoModel` is one)."""

    @property
    def active_adapters(self) -> list[str]: ...

    def check_new_adapter(self, adapter_name: str, config: Any) -> None: ...

    def add_planned_adapter(self, plan: AdapterPlan) -> None: ...

    def eval(self) -> Any: ...


#: File endings of pickled checkpoints, which are never loaded (unpickling can run code).
_PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


@dataclass
class SingleFile:
    """A single-file adapter as read: its tensors and the format module that understands them."""

    path: str
    tensors: dict[str, torch.Tensor]
    format: ModuleType


def read_single_file(path: str | os.PathLike[str]) -> SingleFile:
    """Read a ``.safetensors`` adapter file and detect its format; nothing is unpickled.

    Raises:
        FileNotFoundError: no such file (or a directory: peft's adapters are loaded with ``from_pretrained``).
        AdapterFileError: a pickle file, a damaged file, or keys of no known format.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise FileNotFoundError(
            f"{path!r} is a directory; a peft adapter directory is loaded with OrthoModel.from_pretrained, "
            "a single-file adapter (LyCORIS, kohya, OneTrainer) is one .safetensors file"
        )
    if not os.path.isfile(path):
        raise FileNotFoundError(f"adapter file {path!r} does not exist")
    if path.endswith(_PICKLE_SUFFIXES):
        raise AdapterFileError(
            f"{path} is a pickle file, which orthotune never loads (unpickling can run code); save or convert the "
            "adapter as .safetensors"
        )
    tensors = read_safetensors(path, allow_flags=True)
    try:
        file_format = detect_format(tensors, path)
    except ValueError as error:
        raise AdapterFileError(str(error)) from error
    return SingleFile(path, tensors, file_format)


def module_names(model: nn.Module) -> list[str]:
    """The names a file's layers may address: every module, not looking inside adapter layers and wrappers."""
    return [name for name, _ in top_level_modules(model)]


def file_layer_adapters(
    file: SingleFile,
    names: list[str],
    prefixes: Mapping[str, str] | None = None,
    ignore_unmatched: bool = False,
) -> dict[str, LayerAdapter]:
    """The file's adapters by module name among ``names`` (see the format's ``read``), errors naming the file."""
    try:
        adapters: dict[str, LayerAdapter] = file.format.read(file.tensors, names, prefixes, ignore_unmatched)
    except ValueError as error:
        raise AdapterFileError(f"{file.path} ({file.format.NAME}): {error}") from error
    if not adapters:
        raise AdapterFileError(f"{file.path} ({file.format.NAME}): no layer of the file matches a module of the model")
    return adapters


def layers_by_file_name(file: SingleFile) -> dict[str, LayerAdapter]:
    """The file's adapters without a model, by ``"<prefix>.<rest of the name>"`` (``"lora_unet.down_blocks_0_…"``).

    Without the model a layer's module path is unknown (its ``_`` may stand for ``.``), so each layer keeps the
    name it has in the file, split after its prefix; the format's writer with ``prefixes={p: p}`` gives the
    same names back. Keys with no known prefix are an error that lists them.
    """
    known = sorted(file.format.PIPELINE_PREFIXES, key=len, reverse=True)
    names = set()
    for key in file.tensors:
        layer = key.partition(".")[0]
        prefix = next((p for p in known if layer.startswith(p + "_")), None)
        names.add(layer if prefix is None else f"{prefix}.{layer[len(prefix) + 1 :]}")
    return file_layer_adapters(file, sorted(names), {prefix: prefix for prefix in known})


def renamed_for_format(
    adapters: Mapping[str, LayerAdapter], source: ModuleType, target: ModuleType
) -> dict[str, LayerAdapter]:
    """Adapters named by :func:`layers_by_file_name` for ``source``, renamed to ``target``'s prefixes.

    A prefix keeps its name where ``target`` has it, and otherwise becomes ``target``'s prefix for the same
    pipeline component; of several (LyCORIS's ``lora_te`` and ``lora_te1``), the one ending in ``1`` when the
    file also addresses a second text encoder (SDXL's naming), else the first.
    """
    components = {prefix.partition(".")[0]: source.PIPELINE_PREFIXES[prefix.partition(".")[0]] for prefix in adapters}
    two_text_encoders = "text_encoder_2" in components.values()
    mapping = {}
    for prefix, component in components.items():
        if prefix in target.PIPELINE_PREFIXES:
            mapping[prefix] = prefix
            continue
        candidates = [p for p, c in target.PIPELINE_PREFIXES.items() if c == component]
        if not candidates:
            raise ValueError(
                f"{source.NAME} prefix {prefix!r} addresses {component or 'the whole model'!r}, for which "
                f"{target.NAME} has no prefix"
            )
        numbered = [p for p in candidates if p.endswith("1")]
        mapping[prefix] = numbered[0] if two_text_encoders and numbered else candidates[0]
    return {
        f"{mapping[name.partition('.')[0]]}.{name.partition('.')[2]}": adapter for name, adapter in adapters.items()
    }


# ------------------------------------------------------------------------------------------------ planning
def _weight_ndim(kind: LayerKind) -> int:
    return 4 if kind is LayerKind.CONV2D else 2


def _describe(adapter: LayerAdapter) -> str:
    """The adapter's blocks in the file's terms, e.g. ``4 blocks of 4×4 (16 output features)``."""
    blocks = f"{adapter.num_blocks} blocks of {adapter.block_size}×{adapter.block_size}"
    if adapter.method == "boft":
        blocks = f"butterfly of shape {tuple(adapter.generators.shape)}: {adapter.num_factors} factors of {blocks}"
    elif adapter.block_share:
        blocks += ", one shared"
    return f"{blocks} ({adapter.features} {adapter.rotation_side} features)"


def _planned_layer(
    base: nn.Module, name: str, adapter_name: str, adapter: LayerAdapter, where: str
) -> tuple[AdapterLayer, dict[str, Any]]:
    """A new layer around ``base`` holding the adapter, and the ``update_layer`` arguments that made it."""
    try:
        kind = layer_kind(base)
    except (TypeError, ValueError) as error:
        raise AdapterFileError(f"{where}: {error}") from error
    described = f"{type(base).__name__}"
    input_width = rotated_features(base, kind)
    _, output_width = in_out_features(base, kind)
    width = output_width if adapter.rotation_side == "output" else input_width
    # A shared block whose repeat count the file leaves to the layer (num_blocks=0) fits any width it divides.
    fits = width % adapter.block_size == 0 if adapter.num_blocks == 0 else adapter.features == width
    if not fits:
        side = "out" if adapter.rotation_side == "output" else "in"
        raise AdapterFileError(
            f"{where}: the file's {_describe(adapter)} do not fit {described} with {width} {side} features; "
            "is the file for another model?"
        )
    if adapter.weight_ndim is not None and adapter.weight_ndim != _weight_ndim(kind):
        raise AdapterFileError(
            f"{where}: the file's rescale is shaped for a {adapter.weight_ndim}-d weight, but {described} has a "
            f"{_weight_ndim(kind)}-d weight; is the file for another model?"
        )
    config = config_for_layer_adapters({name: adapter})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an adjusted block size shows as a mismatch below, with the shapes
        try:
            layer = new_layer(config, adapter_name, base, name)
            add_layer_adapter(layer, adapter_name, adapter)
        except (TypeError, ValueError, RuntimeError) as error:
            raise AdapterFileError(
                f"{where}: the file's {_describe(adapter)} do not fit {described}: {error}"
            ) from error
    built = layer_adapter(layer, adapter_name)
    if built.generators.shape != adapter.generators.shape:
        raise AdapterFileError(
            f"{where}: the file's {_describe(adapter)} do not fit {described}, whose layer takes {_describe(built)}"
        )
    return layer, config.layer_kwargs()


def plan_layer_adapters(
    model: nn.Module, adapter_name: str, adapters: Mapping[str, LayerAdapter], inference_mode: bool = True
) -> AdapterPlan:
    """An :class:`~orthotune.injection.AdapterPlan` putting ``adapters`` into ``model``; the model is not changed.

    Each layer is built with its adapter's own settings (a file may give every layer another block size) and
    checked: the module exists and can be adapted, the rotated width is the adapter's, the blocks and factors
    fit, an adapted module does not already hold ``adapter_name`` and has the adapter's method.

    Raises:
        AdapterFileError: the first layer that does not fit, named with the file's and the model's shapes.
    """
    config = config_for_layer_adapters(adapters)
    config.inference_mode = inference_mode
    plan = AdapterPlan(adapter_name, config)
    for name, adapter in adapters.items():
        where = f"layer {adapter.source!r} (module {name!r})" if adapter.source else f"module {name!r}"
        try:
            module = model.get_submodule(name)
        except AttributeError as error:
            raise AdapterFileError(f"{where}: the model has no such module") from error
        if isinstance(module, ModulesToSaveWrapper):
            raise AdapterFileError(f"{where}: the module is trained whole (modules_to_save); it cannot be rotated")
        base = module
        if isinstance(module, AdapterLayer):
            if adapter_name in module.adapter_names:
                raise AdapterFileError(
                    f"{where}: the module already holds an adapter named {adapter_name!r}; pick another adapter_name"
                )
            base = module.get_base_layer()
            plan.existing[name] = module
        family = OFTLayer if adapter.method == "oft" else BOFTLayer
        if isinstance(module, AdapterLayer) and not isinstance(module, family):
            raise AdapterFileError(
                f"{where}: the module holds adapters of another method ({type(module).__module__}); a "
                f"{adapter.method} adapter cannot join them"
            )
        layer, arguments = _planned_layer(base, name, adapter_name, adapter, where)
        plan.layers[name] = layer
        plan.layer_arguments[name] = arguments
    return plan


# ------------------------------------------------------------------------------------------------- writing
def model_layer_adapters(model: AdaptedModel, adapter_name: str) -> dict[str, LayerAdapter]:
    """The adapter ``adapter_name`` of a model, layer by layer, as a writer takes it.

    Raises:
        ValueError: the adapter trains more than rotations (``modules_to_save``, biases), which single files
            cannot hold, or is not an OFT/BOFT adapter.
    """
    if adapter_name not in model.peft_config:
        raise ValueError(f"adapter_name={adapter_name!r}: this model has adapters {list(model.peft_config)}")
    config = model.peft_config[adapter_name]
    extra = [f"modules_to_save={config.modules_to_save}"] if config.modules_to_save else []
    extra += [f"bias={config.bias!r}"] if config.bias != "none" else []
    if extra:
        raise ValueError(
            f"adapter {adapter_name!r} also trains {' and '.join(extra)}, which a single-file adapter cannot hold "
            "(it holds rotations only); save it with save_pretrained"
        )
    adapters: dict[str, LayerAdapter] = {}
    for name, layer in model.adapter_layers():
        if adapter_name in layer.adapter_names:
            try:
                adapters[name] = layer_adapter(layer, adapter_name, source=name)
            except TypeError as error:
                raise ValueError(
                    f"adapter {adapter_name!r} at {name!r}: {error}; single files hold OFT and BOFT"
                ) from error
    return adapters


def write_single_file(
    path: str | os.PathLike[str],
    adapters: Mapping[str, LayerAdapter],
    format: str = "lycoris",
    prefixes: Mapping[str, str] | None = None,
    dtype: torch.dtype = torch.float32,
) -> None:
    """Write ``adapters`` as one ``.safetensors`` file of ``format``, atomically (the old file stays on error)."""
    from safetensors.torch import save_file

    writer = format_named(format, writing=True)
    tensors = {
        key: tensor.detach().to("cpu").contiguous() for key, tensor in writer.write(adapters, prefixes, dtype).items()
    }
    metadata = {"format": "pt", "orthotune_format": writer.NAME}
    write_files_atomically({path: lambda temporary: save_file(tensors, temporary, metadata=metadata)})


# ------------------------------------------------------------------------------------------ model methods
def load_model_file(
    model: LoadingModel,
    path: str | os.PathLike[str],
    adapter_name: str = "default",
    prefixes: Mapping[str, str] | None = None,
    ignore_unmatched: bool = False,
    is_trainable: bool = False,
) -> None:
    """:meth:`orthotune.OrthoModel.load_file`: a single-file adapter (its format detected) as ``adapter_name``.

    Everything is checked before the model is touched: on any error the model is exactly as before.

    Args:
        path: the ``.safetensors`` file; nothing is unpickled.
        prefixes: the format's name prefix → module path its names are relative to (default: every prefix to
            the model itself, so a UNet alone reads ``lora_unet_`` names).
        ignore_unmatched: skip the file's layers that match no module (logged) instead of failing.
        is_trainable: ``False`` (default) freezes the adapter and puts the model in eval mode.

    Raises:
        AdapterFileError: the file cannot be read, or does not fit the model (the layer and shapes named).
    """
    base = model.get_base_model()
    adapters = file_layer_adapters(read_single_file(path), module_names(base), prefixes, ignore_unmatched)
    model.check_new_adapter(adapter_name, config_for_layer_adapters(adapters))
    model.add_planned_adapter(plan_layer_adapters(base, adapter_name, adapters, inference_mode=not is_trainable))
    if not is_trainable:
        model.eval()


def save_model_file(
    model: LoadingModel,
    path: str | os.PathLike[str],
    format: str = "lycoris",
    adapter_name: str | None = None,
    prefixes: Mapping[str, str] | None = None,
    dtype: torch.dtype = torch.float32,
) -> None:
    """:meth:`orthotune.OrthoModel.save_file`: one adapter as a single ``.safetensors`` file, atomically.

    Args:
        format: ``"lycoris"``: LyCORIS's ``diag-oft``/``boft`` file, for output-side adapters
            (``rotation_side="output"``); :data:`orthotune.formats.FORMATS` lists the others.
        adapter_name: the adapter to write; by default the active one.
        prefixes: the format's name prefix → module path its names are relative to (LyCORIS: default
            ``{"lycoris": ""}``; ``{"lora_unet": ""}`` for a UNet that kohya's scripts and ComfyUI should read).
        dtype: of the written tensors.

    Raises:
        ValueError: the adapter has no form in ``format`` (the reason given; nothing is written).
    """
    if adapter_name is None:
        active = model.active_adapters
        if len(active) != 1:
            raise ValueError(f"{len(active)} adapters are active ({active}); pass adapter_name=")
        adapter_name = active[0]
    format_named(format, writing=True)  # an unknown format is the first thing to hear of
    write_single_file(path, model_layer_adapters(model, adapter_name), format, prefixes, dtype)
