"""orthotune: orthogonal fine-tuning (OFT, COFT, BOFT, HRA) for PyTorch.

Layers live in :mod:`orthotune.oft` and :mod:`orthotune.boft`; the math they share, as pure functions on
tensors, in :mod:`orthotune.functional`. Whole models get peft's API: :class:`OFTConfig`/:class:`BOFTConfig`,
:func:`get_peft_model`, and :class:`OrthoModel` (also named :data:`PeftModel`), whose adapter files are
peft's; :func:`from_file` loads a single-file adapter (LyCORIS, …) into a model or a diffusers pipeline.
See ``docs/architecture.md`` for where each part lives.

The public names below are imported on first use (PEP 562), so ``import orthotune`` and ``orthotune --help``
import neither torch nor anything else until a name is asked for.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

#: Public name -> the module that defines it.
_EXPORTS = {
    "AdapterLayer": "orthotune.adapter_layer",
    "BOFTConfig": "orthotune.config",
    "HRAConfig": "orthotune.config",
    "OFTConfig": "orthotune.config",
    "OrthoModel": "orthotune.model",
    "PeftModel": "orthotune.model",
    "PeftType": "orthotune.config",
    "export_lora": "orthotune.lora_export",
    "from_file": "orthotune.pipeline",
    "get_peft_model": "orthotune.model",
    "get_peft_model_state_dict": "orthotune.state_dict",
    "inject_adapter_in_model": "orthotune.state_dict",
    "load_pipeline_file": "orthotune.pipeline",
    "set_peft_model_state_dict": "orthotune.state_dict",
}
_SUBMODULES = ("functional",)

__all__ = [
    "AdapterLayer",
    "BOFTConfig",
    "HRAConfig",
    "OFTConfig",
    "OrthoModel",
    "PeftModel",
    "PeftType",
    "__version__",
    "export_lora",
    "from_file",
    "functional",
    "get_peft_model",
    "load_pipeline_file",
    "get_peft_model_state_dict",
    "inject_adapter_in_model",
    "set_peft_model_state_dict",
]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ imports these on first use
    from orthotune import functional
    from orthotune.adapter_layer import AdapterLayer
    from orthotune.config import BOFTConfig, HRAConfig, OFTConfig, PeftType
    from orthotune.lora_export import export_lora
    from orthotune.model import OrthoModel, PeftModel, get_peft_model
    from orthotune.pipeline import from_file, load_pipeline_file
    from orthotune.state_dict import get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"orthotune.{name}")
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'orthotune' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
