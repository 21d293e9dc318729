"""How much error merging an orthogonal adapter into a quantized layer adds, per quantization backend.

Merging into a quantized layer dequantizes its weight ``Q(W)``, rotates it, and quantizes the result again:
the merged layer holds ``Q(Q(W) Rᵀ)`` instead of the unquantized merge ``Q(W) Rᵀ`` that the unmerged adapter
computes exactly (it rotates the activations and runs the quantized kernel). This script measures, on the same
random layer and inputs, for every backend that is installed:

* ``quantization``: what quantizing the base weight costs, ``‖x Q(W)ᵀ − x Wᵀ‖ / ‖x Wᵀ‖`` (the yardstick);
* ``merge``: what requantizing after the rotation adds, ``‖merged(x) − unmerged(x)‖ / ‖unmerged(x)‖``;
* ``unmerge``: whether unmerge gives back the packed weight bit for bit (it keeps the pre-merge storage).

Norms are Frobenius norms over a batch of inputs. ``tests/test_integrations_quantized.py`` checks the same
quantities with the same code; the table in docs/reach.md comes from::

    python benchmarks/quantized_merge_error.py --markdown
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Quantizer:
    """One way to turn a float ``nn.Linear`` into a quantized layer on the CPU."""

    name: str
    package: str  # the import that must succeed
    quantize: Callable[[nn.Linear], nn.Module]

    def available(self) -> bool:
        return importlib.util.find_spec(self.package) is not None


def _bnb_4bit(linear: nn.Linear, quant_type: str = "nf4") -> nn.Module:
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        quant_type=quant_type,
        compute_dtype=linear.weight.dtype,
    )
    layer.load_state_dict(linear.state_dict())
    return layer.to("cpu")  # bitsandbytes quantizes when the layer is moved to its device


def _bnb_8bit(linear: nn.Linear) -> nn.Module:
    import bitsandbytes as bnb

    layer = bnb.nn.Linear8bitLt(
        linear.in_features, linear.out_features, bias=linear.bias is not None, has_fp16_weights=False
    )
    layer.load_state_dict(linear.state_dict())
    return layer.to("cpu")


def _torchao_int8(linear: nn.Linear) -> nn.Module:
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    holder = nn.Sequential(copy.deepcopy(linear))
    quantize_(holder, Int8WeightOnlyConfig())
    return holder[0]


def _quanto(linear: nn.Linear, bits: int) -> nn.Module:
    from optimum.quanto import freeze, qint4, qint8, quantize

    holder = nn.Sequential(copy.deepcopy(linear))
    quantize(holder, weights={8: qint8, 4: qint4}[bits])
    freeze(holder)
    return holder[0]


def _hqq_4bit(linear: nn.Linear) -> nn.Module:
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    config = BaseQuantizeConfig(nbits=4, group_size=32)
    return HQQLinear(copy.deepcopy(linear), config, compute_dtype=linear.weight.dtype, device="cpu")


QUANTIZERS: tuple[Quantizer, ...] = (
    Quantizer("bitsandbytes nf4", "bitsandbytes", _bnb_4bit),
    Quantizer("bitsandbytes fp4", "bitsandbytes", lambda linear: _bnb_4bit(linear, "fp4")),
    Quantizer("bitsandbytes int8", "bitsandbytes", _bnb_8bit),
    Quantizer("torchao int8 weight-only", "torchao", _torchao_int8),
    Quantizer("optimum-quanto qint8", "optimum.quanto", lambda linear: _quanto(linear, 8)),
    Quantizer("optimum-quanto qint4", "optimum.quanto", lambda linear: _quanto(linear, 4)),
    Quantizer("HQQ 4-bit", "hqq", _hqq_4bit),
)


def quiet_quantize(quantizer: Quantizer, linear: nn.Linear) -> nn.Module:
    """Quantize with the backends' CPU-kernel and deprecation chatter silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return quantizer.quantize(linear)


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return ((value.double() - reference.double()).norm() / reference.double().norm()).item()


def _plain_parts(tensor: torch.Tensor) -> list[torch.Tensor]:
    """A tensor subclass (torchao, quanto) as the plain tensors it is made of, for ``torch.equal``."""
    if type(tensor) in (torch.Tensor, nn.Parameter):
        return [tensor]
    names, _ = tensor.__tensor_flatten__()
    return [part for name in names for part in _plain_parts(getattr(tensor, name))]


def packed_storage(layer: nn.Module) -> dict[str, list[torch.Tensor]]:
    """Every tensor of the layer's state dict, as plain tensors (HQQ's includes its meta)."""
    return {
        name: [part.clone() for part in _plain_parts(value)]
        for name, value in layer.state_dict().items()
        if isinstance(value, torch.Tensor)
    }


def same_storage(a: dict[str, list[torch.Tensor]], b: dict[str, list[torch.Tensor]]) -> bool:
    """Bit for bit: same names, dtypes, shapes and values."""
    return a.keys() == b.keys() and all(
        len(a[name]) == len(b[name])
        and all(x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(a[name], b[name], strict=True))
        for name in a
    )


def adapted(base: nn.Module, method: str) -> nn.Module:
    """Wrap ``base`` with a random (non-identity) orthotune adapter of the given method."""
    from orthotune import boft, hra, oft

    if method == "OFT":
        return oft.Linear(base, "default", r=0, oft_block_size=32, init_weights=False)
    if method == "COFT":
        return oft.Linear(base, "default", r=0, oft_block_size=32, coft=True, eps=1e-2, init_weights=False)
    if method == "BOFT":
        return boft.Linear(
            base, "default", boft_block_size=8, boft_n_butterfly_factor=2, boft_dropout=0.0, init_weights=False
        )
    if method == "HRA":
        return hra.Linear(base, "default", r=8, init_weights=False)
    raise ValueError(f"method={method!r}: expected 'OFT', 'COFT', 'BOFT' or 'HRA'")


def merge_errors(quantizer: Quantizer, method: str, features: int = 256, seed: int = 0) -> dict[str, float | bool]:
    """The three quantities of the module docstring for one backend and adapter method."""
    generator = torch.Generator().manual_seed(seed)
    linear = nn.Linear(features, features)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(features, features, generator=generator) / features**0.5)
        linear.bias.copy_(torch.randn(features, generator=generator) * 0.1)
    x = torch.randn(64, features, generator=generator)
    base = quiet_quantize(quantizer, linear)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantization = relative_error(base(x), linear(x))
        # Training mode (the adapters have no dropout here): bitsandbytes' 4-bit layer repacks its weight for
        # its CPU kernel on the first eval-mode forward, and its state_dict unpacks it with a rounding of its own
        # (about 1e-3), which would hide whether unmerge restored the weight.
        layer = adapted(base, method).train()
        unmerged = layer(x)
        before = packed_storage(base)
        layer.merge()
        merged = layer(x)
        layer.unmerge()
        restored = same_storage(packed_storage(layer.base_layer), before)
        unmerged_again = layer(x)
    return {
        "quantization": quantization,
        "merge": relative_error(merged, unmerged),
        "unmerge_bit_exact": restored and torch.equal(unmerged_again, unmerged),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--features", type=int, default=256, help="in = out features of the random layer")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for quantizer in QUANTIZERS:
        if not quantizer.available():
            rows.append((quantizer.name, "—", f"not installed ({quantizer.package})", "", ""))
            continue
        for method in ("OFT", "COFT", "BOFT", "HRA"):
            errors = merge_errors(quantizer, method, args.features)
            rows.append(
                (
                    quantizer.name,
                    method,
                    f"{errors['quantization']:.2e}",
                    f"{errors['merge']:.2e}",
                    "yes" if errors["unmerge_bit_exact"] else "NO",
                )
            )
    header = ("backend", "adapter", "quantization error", "merge adds", "unmerge bit-exact")
    if args.markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for row in rows:
            print("| " + " | ".join(row) + " |")
    else:
        for row in (header, *rows):
            print("  ".join(f"{cell:<26}" for cell in row))


if __name__ == "__main__":
    main()
