"""orthotune: orthogonal fine-tuning (OFT, COFT, BOFT) for PyTorch.

Layers live in :mod:`orthotune.oft` and :mod:`orthotune.boft`; the math they share, as pure functions on
tensors, in :mod:`orthotune.functional`. Whole models get peft's API: :class:`OFTConfig`/:class:`BOFTConfig`,
:func:`get_peft_model`, and :class:`OrthoModel` (also named :data:`PeftModel`), whose adapter files are
peft's. See ``docs/architecture.md`` for where each part lives.

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
    "OFTConfig": "orthotune.config",
    "OrthoModel": "orthotune.model",
    "PeftModel": "orthotune.model",
    "PeftType": "orthotune.config",
    "get_peft_model": "orthotune.model",
    "get_peft_model_state_dict": "orthotune.state_dict",
    "inject_adapter_in_model": "orthotune.state_dict",
    "set_peft_model_state_dict": "orthotune.state_dict",
}
_SUBMODULES = ("functional",)

__all__ = [
    "AdapterLayer",
    "BOFTConfig",
    "OFTConfig",
    "OrthoModel",
    "PeftModel",
    "PeftType",
    "__version__",
    "functional",
    "get_peft_model",
    "get_peft_model_state_dict",
    "inject_adapter_in_model",
    "set_peft_model_state_dict",
]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ imports these on first use
    from orthotune import functional
    from orthotune.adapter_layer import AdapterLayer
    from orthotune.config import BOFTConfig, OFTConfig, PeftType
    from orthotune.model import OrthoModel, PeftModel, get_peft_model
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
