"""OFT and BOFT on quantized base layers, with the real libraries on the CPU (no mocks).

Backends: bitsandbytes 4-bit (nf4, fp4) and 8-bit, torchao int8 weight-only, optimum-quanto qint8/qint4, HQQ.
Each test skips, naming the package, when its backend is not installed (``pip install orthotune[quant]``).

Truths used: the quantized layer's own kernel run on rotated inputs (the input-centric form needs no
dequantization), the dense rotation references of the other test files, the error that quantizing the base
weight itself costs (merging requantizes, so it may cost one more quantization, and no more), and the packed
storage before a merge (unmerge must give it back bit for bit).
"""

from __future__ import annotations

import tempfile
import warnings

import pytest
import torch
from references import boft_dense_reference, load_benchmark, rel_err, rotation_reference
from test_hra_model import peft_dense_h
from tiny_models import tiny_llama_wide
from torch import nn

import orthotune
from orthotune import hra, oft

quantized_merge_error = load_benchmark("quantized_merge_error")
QUANTIZERS = {quantizer.name: quantizer for quantizer in quantized_merge_error.QUANTIZERS}
METHODS = ("OFT", "COFT", "BOFT", "HRA")

pytestmark = pytest.mark.filterwarnings("ignore")  # the backends warn about missing GPU kernels on the CPU


def _quantizer(name: str) -> quantized_merge_error.Quantizer:
    quantizer = QUANTIZERS[name]
    if not quantizer.available():
        pytest.skip(f"{quantizer.package} is not installed (pip install 'orthotune[quant]')")
    return quantizer


def _random_linear(features: int = 64, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(features, features)


def _expected_output(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The quantized base layer's own forward on ``x`` rotated by a dense reference rotation."""
    base = layer.base_layer
    if isinstance(layer, hra.Linear):
        return base(x @ peft_dense_h(layer.hra_u["default"]).t().float())
    if isinstance(layer, oft.Linear):
        module = layer.oft_R["default"]
        packed = module.packed_generators() if module.coft else module.weight
        return base(x @ rotation_reference(packed, module.block_size, layer.in_features // module.block_size).float())
    rotated = base(x @ boft_dense_reference(layer.boft_R["default"]))
    scale = layer.boft_s["default"].squeeze(-1)
    return (rotated - base.bias) * scale + base.bias


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("backend", list(QUANTIZERS))
def test_trains_on_quantized_base_without_touching_it(backend: str, method: str) -> None:
    base = quantized_merge_error.quiet_quantize(_quantizer(backend), _random_linear())
    stored = quantized_merge_error.packed_storage(base)
    layer = quantized_merge_error.adapted(base, method).train()
    trainable = {name for name, parameter in layer.named_parameters() if parameter.requires_grad}
    assert trainable and all(name.startswith(("oft_R.", "boft_R.", "boft_s.", "hra_u.")) for name in trainable)
    x = torch.randn(6, 64, requires_grad=True)

    y = layer(x)
    assert rel_err(y, _expected_output(layer, x)) < 1e-5
    optimizer = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.1)
    before = {name: p.detach().clone() for name, p in layer.named_parameters() if p.requires_grad}
    y.pow(2).sum().backward()
    optimizer.step()

    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert all(not torch.equal(p, before[name]) for name, p in layer.named_parameters() if p.requires_grad)
    assert quantized_merge_error.same_storage(quantized_merge_error.packed_storage(base), stored)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("backend", list(QUANTIZERS))
def test_merge_requantizes_once_and_unmerge_restores_bit_for_bit(backend: str, method: str) -> None:
    errors = quantized_merge_error.merge_errors(_quantizer(backend), method, features=128)
    # The merged weight is quantized once more: that may cost what quantizing the base cost, not a multiple.
    assert errors["merge"] < 1.5 * errors["quantization"] + 2e-3, errors
    assert errors["unmerge_bit_exact"], errors


def test_unknown_quantized_format_refuses_to_merge_with_the_reason() -> None:
    pytest.importorskip("torchao", reason="torchao is not installed (pip install 'orthotune[quant]')")
    from torchao.quantization import Int8Tensor, PerTensor

    base = _random_linear()
    with torch.no_grad():
        per_tensor = Int8Tensor.from_hp(base.weight.detach(), granularity=PerTensor())
    base.weight = nn.Parameter(per_tensor, requires_grad=False)
    layer = oft.Linear(base, "default", r=0, oft_block_size=16, init_weights=False)
    x = torch.randn(3, 64)
    unmerged = layer(x)
    with pytest.raises(NotImplementedError, match="block_size=.*per-row"):
        layer.merge()
    assert not layer.merged and torch.equal(layer(x), unmerged)


# ------------------------------------------------------------------------------------------ whole models
def _transformers_quantization(name: str):
    transformers = pytest.importorskip("transformers")
    if name.startswith("bitsandbytes"):
        _quantizer("bitsandbytes nf4")
        if name == "bitsandbytes int8":
            return transformers.BitsAndBytesConfig(load_in_8bit=True)
        return transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
        )
    if name == "optimum-quanto":
        _quantizer("optimum-quanto qint8")
        return transformers.QuantoConfig(weights="int8")
    _quantizer("torchao int8 weight-only")
    from torchao.quantization import Int8WeightOnlyConfig

    return transformers.TorchAoConfig(Int8WeightOnlyConfig())


def _load_quantized(directory: str, quantization: str) -> nn.Module:
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(
            directory,
            quantization_config=_transformers_quantization(quantization),
            device_map="cpu",
            dtype=torch.float32,
        )


@pytest.mark.parametrize("quantization", ["bitsandbytes nf4", "bitsandbytes int8", "optimum-quanto", "torchao"])
@pytest.mark.parametrize("method", ["OFT", "BOFT", "HRA"])
def test_quantized_transformers_model_trains_saves_reloads_and_merges(quantization: str, method: str) -> None:
    with tempfile.TemporaryDirectory() as checkpoint, tempfile.TemporaryDirectory() as adapter:
        tiny_llama_wide().save_pretrained(checkpoint)
        if method == "OFT":
            config = orthotune.OFTConfig(r=0, oft_block_size=16, target_modules="all-linear", init_weights=False)
        elif method == "HRA":
            config = orthotune.HRAConfig(r=8, target_modules="all-linear", init_weights=False)
        else:
            config = orthotune.BOFTConfig(
                boft_block_size=8, boft_n_butterfly_factor=2, target_modules="all-linear", boft_dropout=0.0
            )
        model = orthotune.get_peft_model(_load_quantized(checkpoint, quantization), config)
        adapted = [name for name, module in model.named_modules() if isinstance(module, orthotune.AdapterLayer)]
        assert len(adapted) == 14  # 7 linear layers in each of the 2 blocks; the head is left alone

        tokens = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        model.eval()
        with torch.no_grad():
            trained = model(input_ids=tokens).logits
        model.save_pretrained(adapter)

        reloaded = orthotune.PeftModel.from_pretrained(_load_quantized(checkpoint, quantization), adapter).eval()
        with torch.no_grad():
            assert torch.equal(reloaded(input_ids=tokens).logits, trained)
            merged = reloaded.merge_and_unload()(input_ids=tokens).logits
        # Requantizing 14 rotated weights costs about one more round of quantization error, not a broken model.
        bound = 0.2 if "nf4" in quantization else 0.05
        assert rel_err(merged, trained) < bound


def test_hqq_layers_are_found_by_all_linear_and_train() -> None:
    _quantizer("HQQ 4-bit")
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))
    tokens = torch.randn(5, 64)
    reference = model(tokens)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for index in (0, 2):
            model[index] = HQQLinear(
                model[index], BaseQuantizeConfig(nbits=8, group_size=32), compute_dtype=torch.float32, device="cpu"
            )
    peft_model = orthotune.get_peft_model(
        model, orthotune.OFTConfig(r=0, oft_block_size=16, target_modules="all-linear")
    )
    assert isinstance(peft_model.base_model.model[0], orthotune.AdapterLayer)
    assert isinstance(peft_model.base_model.model[2], orthotune.AdapterLayer)
    assert rel_err(peft_model(tokens), reference) < 2e-2  # identity at init: the 8-bit HQQ model itself


@pytest.mark.parametrize("method", ["OFT", "BOFT"])
def test_peft_adapter_on_bnb_4bit_model_loads_with_peft_outputs(method: str) -> None:
    """peft 0.21.2 wraps bitsandbytes layers with its own classes; its files and outputs must carry over."""
    peft = pytest.importorskip("peft")
    with tempfile.TemporaryDirectory() as checkpoint, tempfile.TemporaryDirectory() as adapter:
        tiny_llama_wide().save_pretrained(checkpoint)
        if method == "OFT":
            config = peft.OFTConfig(r=0, oft_block_size=16, target_modules="all-linear", init_weights=False)
        else:
            config = peft.BOFTConfig(
                boft_block_size=8, target_modules="all-linear", boft_dropout=0.0, init_weights=False
            )
        peft_model = peft.get_peft_model(_load_quantized(checkpoint, "bitsandbytes nf4"), config).eval()
        tokens = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            expected = peft_model(input_ids=tokens).logits
        peft_model.save_pretrained(adapter)
        model = orthotune.PeftModel.from_pretrained(_load_quantized(checkpoint, "bitsandbytes nf4"), adapter).eval()
        with torch.no_grad():
            assert rel_err(model(input_ids=tokens).logits, expected) < 1e-4
