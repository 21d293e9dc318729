"""orthotune: orthogonal fine-tuning (OFT, COFT, BOFT) for PyTorch.

Layers live in :mod:`orthotune.oft` and :mod:`orthotune.boft`; the math they share, as pure functions on
tensors, in :mod:`orthotune.functional`. Importing this package imports torch only.
"""

from orthotune import functional
from orthotune.adapter_layer import AdapterLayer

__version__ = "0.1.0"

__all__ = ["AdapterLayer", "__version__", "functional"]
