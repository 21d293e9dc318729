"""Loading a peft adapter directory into a model: as a new adapter, or into an existing one's tensors.

Both check the whole file against the model first (keys, shapes, the method), so that a file that does not fit
leaves the model exactly as it was; the file itself is read and mapped by :mod:`orthotune.checkpoint`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from orthotune.checkpoint import (
    AdapterFile,
    AdapterFileError,
    adapter_file_tensors,
    check_tensors,
    convert_legacy_oft,
    copy_tensors,
    optional_file_tensors,
    own_file_tensors,
    to_peft_convention,
)
from orthotune.config import AdapterConfig, as_orthotune_config
from orthotune.injection import plan_adapter

if TYPE_CHECKING:
    from orthotune.model import OrthoModel

__all__ = ["load_into_adapter", "load_new_adapter"]


def load_new_adapter(
    model: OrthoModel, adapter_name: str, file: AdapterFile, config: AdapterConfig | None, trainable: bool
) -> None:
    """Add ``file`` as the new adapter ``adapter_name`` (``config`` instead of the file's, if given); everything is
    checked against a plan beside the model before the model is touched."""
    if config is not None:
        config = as_orthotune_config(config)
        file.tensors = to_peft_convention(config, to_peft_convention(file.config, file.tensors))
        file.config = config
    file.config.inference_mode = not trainable
    model.check_new_adapter(adapter_name, file.config)
    plan = plan_adapter(model.get_base_model(), adapter_name, file.config)
    if file.legacy_oft is not None:
        convert_legacy_oft(file, plan.layers)
    required = plan.adapter_tensors()
    optional = optional_file_tensors(model, plan.layers, plan.config)
    check_tensors(file, required, optional)
    copy_tensors(file, required)  # into the plan's own tensors: the model is not touched yet
    model.add_planned_adapter(plan, file.config)
    copy_tensors(file, optional)
    if trainable:  # peft: a new adapter loaded as trainable trains, active or not
        model.set_requires_grad(adapter_name)


def load_into_adapter(model: OrthoModel, adapter_name: str, file: AdapterFile) -> None:
    """Overwrite the weights of the existing adapter ``adapter_name`` from a file, checked first."""
    config = model.peft_config[adapter_name]
    if file.config.peft_type != config.peft_type or file.legacy_oft is not None:
        raise AdapterFileError(f"{file.source} holds a {file.config.peft_type} adapter, not one like {adapter_name!r}")
    file.tensors = to_peft_convention(config, to_peft_convention(file.config, file.tensors))
    check_tensors(
        file,
        own_file_tensors(model, adapter_name),
        adapter_file_tensors(model, adapter_name, save_embedding_layers=True),
    )
    for _, layer in model.adapter_layers():
        if adapter_name in layer.adapter_names:
            layer.materialize_adapter(adapter_name)
    copy_tensors(file, adapter_file_tensors(model, adapter_name, save_embedding_layers=True))
