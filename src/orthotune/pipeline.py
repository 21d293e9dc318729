"""One call for a single-file adapter: into a model, or into every component of a diffusers pipeline.

::

    orthotune.from_file(pipe, "style.safetensors")   # {"unet": OrthoModel, "text_encoder": OrthoModel}
    orthotune.from_file(unet, "style.safetensors")   # OrthoModel

A Stable Diffusion file addresses its components by prefix (LyCORIS and kohya: ``lora_unet_`` the UNet,
``lora_te_``/``lora_te1_`` the text encoder, ``lora_te2_`` SDXL's second one); the format says which prefix is
which component (its ``PIPELINE_PREFIXES``). The file is read once and matched against the modules of all
components together; every component's adapter is built and checked before any component is changed, so on
an error the pipeline is exactly as it was. As with ``PeftModel.from_pretrained(pipe.unet, …)``, the adapter
layers go into the components themselves: the pipeline runs with them, and the returned wrappers merge,
unload or save them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from torch import nn

from orthotune.formats import LayerAdapter, config_for_layer_adapters
from orthotune.injection import AdapterPlan
from orthotune.model import OrthoModel
from orthotune.single_file import file_layer_adapters, module_names, plan_layer_adapters, read_single_file

__all__ = ["from_file", "is_pipeline", "load_pipeline_file", "pipeline_components"]


def is_pipeline(obj: Any) -> bool:
    """Whether ``obj`` is a diffusers pipeline (recognised by its ``components``, without importing diffusers)."""
    return not isinstance(obj, nn.Module) and isinstance(getattr(obj, "components", None), Mapping)


def pipeline_components(pipe: Any) -> dict[str, nn.Module]:
    """The pipeline's torch components by name (``unet``, ``text_encoder``, ``vae``, …)."""
    return {name: module for name, module in pipe.components.items() if isinstance(module, nn.Module)}


def load_pipeline_file(
    pipe: Any,
    path: str | os.PathLike[str],
    adapter_name: str = "default",
    prefixes: Mapping[str, str] | None = None,
    ignore_unmatched: bool = False,
    is_trainable: bool = False,
) -> dict[str, OrthoModel]:
    """Load a single-file adapter into the components of a diffusers pipeline.

    Args:
        pipe: a diffusers pipeline (``StableDiffusionPipeline``, ``StableDiffusionXLPipeline``, …).
        path: the ``.safetensors`` file (its format is detected).
        adapter_name: the adapter's name in every component.
        prefixes: the file's name prefix → the component (or module path inside one, ``"unet.mid_block"``)
            its names are relative to; default the format's ``PIPELINE_PREFIXES``.
        ignore_unmatched: skip the file's layers that match no module instead of failing.
        is_trainable: ``False`` (default) freezes the adapters and puts the components in eval mode.

    Returns:
        ``{component name: OrthoModel}`` for each component the file adapts.

    Raises:
        AdapterFileError: the file does not fit (the pipeline is unchanged).
    """
    file = read_single_file(path)
    components = pipeline_components(pipe)
    if prefixes is None:
        prefixes = dict(file.format.PIPELINE_PREFIXES)
    names = [f"{component}.{name}" for component, module in components.items() for name in module_names(module)]
    by_component: dict[str, dict[str, LayerAdapter]] = {}
    for name, adapter in file_layer_adapters(file, names, prefixes, ignore_unmatched).items():
        component, _, inner = name.partition(".")
        by_component.setdefault(component, {})[inner] = adapter
    wrapped = {component: OrthoModel(components[component]) for component in by_component}  # changes nothing
    plans: dict[str, AdapterPlan] = {}
    for component, adapters in by_component.items():
        wrapped[component].check_new_adapter(adapter_name, config_for_layer_adapters(adapters))
        plans[component] = plan_layer_adapters(
            components[component], adapter_name, adapters, inference_mode=not is_trainable
        )
    for component, plan in plans.items():  # everything fits: only now is the pipeline changed
        wrapped[component].add_planned_adapter(plan)
        if not is_trainable:
            wrapped[component].eval()
    return wrapped


def from_file(
    model: Any,
    path: str | os.PathLike[str],
    adapter_name: str = "default",
    prefixes: Mapping[str, str] | None = None,
    ignore_unmatched: bool = False,
    is_trainable: bool = False,
) -> Any:
    """Load a single-file adapter (LyCORIS, …; the format is detected from its keys) into a model or pipeline.

    The outputs are those of the tool that wrote the file (LyCORIS's merged weight: see ``docs/file-format.md``).

    Args:
        model: a ``torch.nn.Module`` (wrapped in a new :class:`~orthotune.OrthoModel`), an ``OrthoModel`` (the
            adapter is added to it, inactive unless it is the first), or a diffusers pipeline (see
            :func:`load_pipeline_file`).
        path: the ``.safetensors`` file; nothing is unpickled.
        adapter_name, prefixes, ignore_unmatched, is_trainable: see :meth:`orthotune.OrthoModel.load_file`.

    Returns:
        The ``OrthoModel``; for a pipeline, ``{component name: OrthoModel}``.

    Raises:
        AdapterFileError: the file does not fit the model, which is then exactly as it was.

    Example:
        >>> unet = orthotune.from_file(pipe.unet, "oft.safetensors")  # doctest: +SKIP
        >>> models = orthotune.from_file(pipe, "oft.safetensors")  # doctest: +SKIP
    """
    if is_pipeline(model):
        return load_pipeline_file(model, path, adapter_name, prefixes, ignore_unmatched, is_trainable)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model is a {type(model).__name__}; pass a torch.nn.Module, an OrthoModel or a pipeline")
    wrapped = model if isinstance(model, OrthoModel) else OrthoModel(model)
    wrapped.load_file(path, adapter_name, prefixes, ignore_unmatched, is_trainable)
    return wrapped
