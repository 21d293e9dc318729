"""Other tools' adapter files: readers and writers between their tensors and :class:`LayerAdapter`.

- :mod:`~orthotune.formats.layer_adapter`: :class:`LayerAdapter`, one layer's adapter in orthotune's conventions,
  and the bridge to layers (:func:`layer_adapter`, :func:`add_layer_adapter`) and configs.
- :mod:`~orthotune.formats.lycoris`: LyCORIS's ``diag-oft`` and ``boft`` files (output-side rotations).
"""

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

__all__ = [
    "LYCORIS_PREFIXES",
    "LayerAdapter",
    "add_layer_adapter",
    "config_for_layer_adapters",
    "detect_lycoris",
    "layer_adapter",
    "lycoris_name",
    "match_lycoris_names",
    "read_lycoris",
    "write_lycoris",
]
