"""Other tools' adapter files: readers and writers between their tensors and :class:`LayerAdapter`.

- :mod:`~orthotune.formats.layer_adapter`: :class:`LayerAdapter`, one layer's adapter in orthotune's conventions,
  and the bridge to layers (:func:`layer_adapter`, :func:`add_layer_adapter`) and configs.
- :mod:`~orthotune.formats.lycoris`: LyCORIS's ``diag-oft`` and ``boft`` files (output-side rotations).
- :mod:`~orthotune.formats.kohya`: kohya sd-scripts' ``networks/oft.py`` files (output-side, read only).
- :mod:`~orthotune.formats.onetrainer`: OneTrainer's OFT files (peft's input-side layout, read only).

A format is a module in :data:`FORMATS` that defines:

- ``NAME``: the format's name (``"lycoris"``), as ``save_file(format=...)`` and ``orthotune convert --to`` take it;
- ``PIPELINE_PREFIXES``: every prefix its layer names start with (``<prefix>_<module path, . as _>``), to the
  diffusers pipeline component the names address (``"unet"``, ``"text_encoder"``, ``"text_encoder_2"``), or to
  ``""`` for a prefix that names modules of whatever model it was trained on;
- ``detect(state_dict) -> bool``: whether a file's keys are this format's (no two formats claim one file);
- ``read(state_dict, module_names, prefixes=None, ignore_unmatched=False) -> dict[str, LayerAdapter]``: the
  adapters by module name, ``prefixes`` mapping a prefix to the module path its names are relative to;
- optionally ``write(adapters, prefixes=None, dtype=torch.float32) -> dict[str, torch.Tensor]``;
- optionally ``ROTATION_SIDE``: ``"input"`` or ``"output"`` where every file of the format rotates that side
  (``orthotune convert`` refuses to change sides, with the reason).

Adding a format is adding its module to :data:`FORMATS`; loading (:func:`orthotune.from_file`), saving
(:meth:`orthotune.OrthoModel.save_file`), ``orthotune inspect`` and ``orthotune convert`` find it there.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import ModuleType

import torch

from orthotune.formats import kohya, lycoris, onetrainer
from orthotune.formats.layer_adapter import (
    LayerAdapter,
    add_layer_adapter,
    config_for_layer_adapters,
    layer_adapter,
)
from orthotune.formats.lycoris import (
    LYCORIS_PREFIXES,
    detect_lycoris,
    lycoris_name,
    match_lycoris_names,
    read_lycoris,
    write_lycoris,
)

#: Every format orthotune reads, in the order detection asks them.
FORMATS: tuple[ModuleType, ...] = (lycoris, kohya, onetrainer)

__all__ = [
    "FORMATS",
    "LYCORIS_PREFIXES",
    "LayerAdapter",
    "add_layer_adapter",
    "config_for_layer_adapters",
    "detect_format",
    "detect_lycoris",
    "format_named",
    "layer_adapter",
    "lycoris_name",
    "match_lycoris_names",
    "read_lycoris",
    "write_lycoris",
]


def detect_format(state_dict: Mapping[str, torch.Tensor], source: str = "the file") -> ModuleType:
    """The format of a single-file adapter, from its keys.

    Raises:
        ValueError: no format claims the keys (the message shows some), or several do.
    """
    claimed = [module for module in FORMATS if module.detect(state_dict)]
    if len(claimed) == 1:
        return claimed[0]
    if claimed:
        raise ValueError(
            f"{source} looks like several formats ({[module.NAME for module in claimed]}); their detectors must "
            "not overlap: report this file's keys"
        )
    keys = sorted(state_dict)[:4]
    known = [module.NAME for module in FORMATS]
    hint = (
        "; it has peft's keys: load its directory (with adapter_config.json) with OrthoModel.from_pretrained"
        if any(key.startswith("base_model.model.") for key in keys)
        else ""
    )
    raise ValueError(f"{source} is not an OFT/BOFT file of a known format ({known}); its keys look like {keys}{hint}")


def format_named(name: str, writing: bool = False) -> ModuleType:
    """The format module called ``name``; with ``writing``, one that can write files."""
    for module in FORMATS:
        if module.NAME == name:
            if writing and not hasattr(module, "write"):
                raise ValueError(f"format={name!r} is read-only; formats that write: {writable_formats()}")
            return module
    known = writable_formats() if writing else [module.NAME for module in FORMATS]
    raise ValueError(f"format={name!r} is not one of {known}")


def writable_formats() -> list[str]:
    return [module.NAME for module in FORMATS if hasattr(module, "write")]
