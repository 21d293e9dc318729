"""Integrations with other libraries, each imported only by the user who needs it.

- :mod:`~orthotune.integrations.quantized`: quantized base layers (bitsandbytes, torchao, optimum-quanto, HQQ):
  read a dequantized weight and requantize a merged one, without importing any of those libraries.
- :mod:`~orthotune.integrations.distributed`: merging under DeepSpeed ZeRO-3.
- :mod:`~orthotune.integrations.trainer`: transformers' ``Trainer`` saving and loading adapters (imports
  transformers).
"""
