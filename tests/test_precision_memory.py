"""Half precision: a bf16 model trains with orthotune's OFT and HRA, the rotation is built in fp32 and applied in
bf16, and no fp32 activation-sized tensor is kept for backward (peft 0.21.2 keeps one per adapted layer, for both).

The saved-tensor accounting is ``benchmarks/activation_memory.py``'s, so the figures in docs/reach.md come from
the code these tests check.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from references import load_benchmark, rel_err, rotation_reference
from test_hra_model import peft_dense_h
from torch import nn

from orthotune import hra, oft

pytest.importorskip("transformers")

activation_memory = load_benchmark("activation_memory")

BATCH, SEQ, HIDDEN = 2, 64, 64
#: Smallest activation of the tiny Llama: one token row of the narrowest adapted width, for the whole batch.
ACTIVATION_NUMEL = BATCH * SEQ * HIDDEN


def test_bf16_linear_builds_rotation_in_fp32_and_applies_it_in_bf16() -> None:
    base = nn.Linear(64, 32).to(torch.bfloat16)
    layer = oft.Linear(base, "default", r=4, init_weights=False, use_cayley_neumann=False)
    rotation = layer.oft_R["default"]
    assert rotation.weight.dtype == torch.float32
    blocks = rotation.rotation_blocks()
    assert blocks.dtype == torch.float32
    eye = torch.eye(16)
    assert (blocks.transpose(-1, -2) @ blocks - eye).abs().max() < 1e-5  # fp32-orthogonal, not bf16-orthogonal

    x = torch.randn(3, 7, 64).to(torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    dense = rotation_reference(rotation.weight, 16)  # float64 truth
    reference = (x.double() @ dense) @ base.weight.double().t() + base.bias.double()
    assert rel_err(y, reference) < 2e-2  # bf16 rounding of the activations, not a bf16-built rotation

    y.float().square().mean().backward()
    assert rotation.weight.grad is not None and rotation.weight.grad.dtype == torch.float32
    assert torch.isfinite(rotation.weight.grad).all() and rotation.weight.grad.abs().sum() > 0


def test_bf16_hra_linear_builds_h_in_fp32_and_applies_it_in_bf16() -> None:
    base = nn.Linear(64, 32).to(torch.bfloat16)
    layer = hra.Linear(base, "default", r=6, init_weights=False)
    u = layer.hra_u["default"]
    assert u.dtype == torch.float32
    v, t = layer.householder_wy("default")
    assert v.dtype == t.dtype == torch.float32

    x = torch.randn(3, 7, 64).to(torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    h = peft_dense_h(u)  # peft's own H, float64
    reference = (x.double() @ h.t()) @ base.weight.double().t() + base.bias.double()
    assert rel_err(y, reference) < 2e-2  # bf16 rounding of the activations only

    y.float().square().mean().backward()
    assert u.grad is not None and u.grad.dtype == torch.float32
    assert torch.isfinite(u.grad).all() and u.grad.abs().sum() > 0


def _tokens() -> torch.Tensor:
    return torch.randint(0, 128, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("method", ["OFT", "HRA"])
def test_bf16_tiny_llama_trains(method: str) -> None:
    wrap = {"OFT": activation_memory.orthotune_oft, "HRA": activation_memory.orthotune_hra}[method]
    model = wrap(activation_memory.tiny_llama())
    adapters = [p for p in model.parameters() if p.requires_grad]
    assert adapters and all(p.dtype == torch.float32 for p in adapters)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters() if not p.requires_grad)
    optimizer = torch.optim.Adam(adapters, lr=1e-2)
    tokens = _tokens()
    losses = []
    model.train()
    for _ in range(4):
        optimizer.zero_grad()
        output = model(input_ids=tokens, labels=tokens)
        assert output.logits.dtype == torch.bfloat16
        output.loss.backward()
        assert all(
            p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in adapters
        )
        optimizer.step()
        losses.append(output.loss.item())
    assert losses[-1] < losses[0], losses


def _saved(library: str) -> activation_memory.SavedTensors:
    wrap, is_layer = {
        "orthotune": (activation_memory.orthotune_oft, activation_memory.is_orthotune_layer),
        "peft": (activation_memory.peft_oft, activation_memory.is_peft_layer),
    }[library]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return activation_memory.measure(wrap(activation_memory.tiny_llama()), is_layer, BATCH, SEQ)


@pytest.fixture(scope="module")
def saved() -> dict[str, activation_memory.SavedTensors]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {library: _saved(library) for library in ("orthotune", "peft")}
    finally:
        torch.set_num_threads(previous)


def test_no_fp32_activation_saved_in_adapter_layers(saved: dict) -> None:
    ours = saved["orthotune"]
    assert any(inside for *_, inside in ours.records), "the hooks recorded nothing inside adapter layers"
    assert ours.largest(torch.bfloat16, adapter_only=True) >= ACTIVATION_NUMEL  # the rotation's bf16 input
    assert ours.largest(torch.float32, adapter_only=True) < ACTIVATION_NUMEL
    assert ours.largest(torch.float64, adapter_only=True) < ACTIVATION_NUMEL
    # The same check flags peft, which upcasts the activations to its fp32 adapter weights.
    assert saved["peft"].largest(torch.float32, adapter_only=True) >= ACTIVATION_NUMEL


def test_saves_fewer_activation_bytes_than_peft(saved: dict) -> None:
    ours = {scope: sum(saved["orthotune"].bytes_by_dtype(scope).values()) for scope in (False, True)}
    theirs = {scope: sum(saved["peft"].bytes_by_dtype(scope).values()) for scope in (False, True)}
    assert ours[True] < theirs[True] and ours[False] < theirs[False]
    # Inside the adapter layers peft keeps each adapted layer's input in fp32 (4 bytes an element) where
    # orthotune keeps it in bf16 (2 bytes): 14 adapted layers, 12 reading 64 features and 2 (down_proj) 128.
    input_elements = 12 * ACTIVATION_NUMEL + 2 * (2 * ACTIVATION_NUMEL)
    assert theirs[True] - ours[True] >= (4 - 2) * input_elements


@pytest.fixture(scope="module")
def saved_hra() -> dict[str, activation_memory.SavedTensors]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return {
                "orthotune": activation_memory.measure(
                    activation_memory.orthotune_hra(activation_memory.tiny_llama()),
                    activation_memory.is_orthotune_layer,
                    BATCH,
                    SEQ,
                ),
                "peft": activation_memory.measure(
                    activation_memory.peft_hra(activation_memory.tiny_llama()),
                    activation_memory.is_peft_layer,
                    BATCH,
                    SEQ,
                ),
            }
    finally:
        torch.set_num_threads(previous)


def test_hra_saves_no_fp32_activation_and_fewer_bytes_than_peft(saved_hra: dict) -> None:
    ours, theirs = saved_hra["orthotune"], saved_hra["peft"]
    assert ours.largest(torch.bfloat16, adapter_only=True) >= ACTIVATION_NUMEL  # the layer input, kept in bf16
    assert ours.largest(torch.float32, adapter_only=True) < ACTIVATION_NUMEL
    assert theirs.largest(torch.float32, adapter_only=True) >= ACTIVATION_NUMEL  # peft upcasts x to fp32
    ours_bytes = sum(ours.bytes_by_dtype(adapter_only=True).values())
    theirs_bytes = sum(theirs.bytes_by_dtype(adapter_only=True).values())
    # Each distinct layer input is kept once, in bf16. Per block: the normed hidden state (read by q, k and v),
    # the attention output (o), the normed hidden state (gate and up), and down_proj's input, twice as wide.
    # The rest (each layer's small Vᵀ and T) is small.
    input_bytes = 2 * 2 * (3 * ACTIVATION_NUMEL + 2 * ACTIVATION_NUMEL)
    assert input_bytes <= ours_bytes < 1.2 * input_bytes
    assert ours_bytes < theirs_bytes
