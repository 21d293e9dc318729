"""orthotune: orthogonal fine-tuning (OFT, COFT, BOFT) for PyTorch.

Layers live in :mod:`orthotune.oft` and :mod:`orthotune.boft`; the math they share, as pure functions on
tensors, in :mod:`orthotune.functional`. Whole models get peft's API: :class:`OFTConfig`/:class:`BOFTConfig`,
:func:`get_peft_model`, and :class:`OrthoModel` (also named :data:`PeftModel`), whose adapter files are
peft's. Importing this package imports torch (and safetensors when a file is read or written) only.
"""

from orthotune import functional
from orthotune.adapter_layer import AdapterLayer
from orthotune.config import BOFTConfig, OFTConfig
from orthotune.lora_export import export_lora
from orthotune.model import OrthoModel, PeftModel, get_peft_model

__version__ = "0.1.0"

__all__ = [
    "AdapterLayer",
    "BOFTConfig",
    "OFTConfig",
    "OrthoModel",
    "PeftModel",
    "__version__",
    "export_lora",
    "functional",
    "get_peft_model",
]
