"""``torch.compile`` of OFT, BOFT and HRA linear layers: no graph breaks, eager numerics, no recompilation.

Fast backends only (``eager``/``aot_eager``): what is checked is Dynamo's capture and AOTAutograd's backward,
not inductor's code generation.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch._dynamo
import torch._dynamo.testing
from references import rel_err
from tiny_models import tiny_llama, token_batch
from torch import nn

import orthotune
from orthotune import boft, hra, oft

IN, OUT = 16, 8


def _oft(**kwargs: object) -> Callable[[nn.Module], nn.Module]:
    return lambda base: oft.Linear(base, "default", r=4, init_weights=False, **kwargs)


def _boft(**kwargs: object) -> Callable[[nn.Module], nn.Module]:
    return lambda base: boft.Linear(base, "default", boft_block_size=4, init_weights=False, **kwargs)


def _hra(**kwargs: object) -> Callable[[nn.Module], nn.Module]:
    options = {"r": 4, **kwargs}
    return lambda base: hra.Linear(base, "default", init_weights=False, **options)


# (make layer with dropout, make the same layer without dropout for the numerical comparison)
LAYERS = {
    "oft-exact": _oft(),
    "oft-neumann": _oft(use_cayley_neumann=True, num_cayley_neumann_terms=5),
    "oft-coft": _oft(coft=True, eps=1e-3),
    "oft-block_share": _oft(block_share=True),
    "oft-module_dropout": _oft(module_dropout=0.5),
    "boft-m1": _boft(boft_n_butterfly_factor=1, boft_dropout=0.0),
    "boft-m2": _boft(boft_n_butterfly_factor=2, boft_dropout=0.0),
    "boft-m2-dropout": _boft(boft_n_butterfly_factor=2, boft_dropout=0.5),
    "hra-r4": _hra(),
    "hra-odd-r": _hra(r=5),
    "hra-gram-schmidt": _hra(apply_GS=True),
}
HAS_DROPOUT = {"oft-module_dropout", "boft-m2-dropout"}


def _layer(name: str) -> nn.Module:
    torch.manual_seed(0)
    layer = LAYERS[name](nn.Linear(IN, OUT))
    return layer.train()


def _without_dropout(layer: nn.Module) -> nn.Module:
    for holder in ("oft_dropout", "boft_dropout"):
        for dropout in getattr(layer, holder, {}).values():
            dropout.p = 0.0
    return layer


def _x() -> torch.Tensor:
    return torch.randn(3, 5, IN, generator=torch.Generator().manual_seed(1))


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> None:
    torch._dynamo.reset()


@pytest.mark.parametrize("name", LAYERS)
def test_no_graph_breaks_and_backward(name: str) -> None:
    layer = _layer(name)
    x = _x()

    def loss(x: torch.Tensor) -> torch.Tensor:
        return layer(x).square().mean()

    explanation = torch._dynamo.explain(loss)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1

    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    compiled(x).square().mean().backward()
    trainable = [p for p in layer.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable)
    assert any(p.grad.abs().sum() > 0 for p in trainable)


@pytest.mark.parametrize("name", LAYERS)
def test_compiled_matches_eager(name: str) -> None:
    eager = _without_dropout(_layer(name))
    compiled_layer = _without_dropout(_layer(name))
    compiled = torch.compile(compiled_layer, fullgraph=True, backend="aot_eager")
    x = _x()

    y_eager = eager(x)
    y_eager.square().mean().backward()
    y_compiled = compiled(x)
    y_compiled.square().mean().backward()

    assert rel_err(y_compiled, y_eager) < 1e-6
    eager_grads = {n: p.grad for n, p in eager.named_parameters() if p.requires_grad}
    compiled_grads = {n: p.grad for n, p in compiled_layer.named_parameters() if p.requires_grad}
    assert eager_grads.keys() == compiled_grads.keys() and eager_grads
    for key, grad in eager_grads.items():
        assert rel_err(compiled_grads[key], grad) < 1e-5, key


@pytest.mark.parametrize("name", LAYERS)
def test_no_recompilation_across_training_steps(name: str) -> None:
    layer = _layer(name)
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(layer, fullgraph=True, backend=counter)
    optimizer = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.1)
    x = _x()
    losses = []
    for _ in range(3):
        optimizer.zero_grad()
        loss = compiled(x).square().mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert counter.frame_count == 1, f"recompiled: {counter.frame_count} frames"
    if name not in HAS_DROPOUT:
        assert losses[2] < losses[0]  # the steps did train the compiled layer


@pytest.mark.parametrize("name", sorted(HAS_DROPOUT))
def test_compiled_dropout_stays_random(name: str) -> None:
    layer = _layer(name)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = _x()
    with torch.no_grad():
        outputs = [compiled(x) for _ in range(5)]
        undropped = _without_dropout(layer)(x)
    assert any(not torch.equal(outputs[0], other) for other in outputs[1:]), "dropout mask was traced as a constant"
    assert all(rel_err(output, undropped) > 1e-4 for output in outputs)  # every call dropped some blocks


def test_tiny_llama_with_hra_on_every_linear_layer_compiles_whole() -> None:
    """Dynamo captures the whole adapted model in one graph (``fullgraph=True`` fails on any break), with the
    eager loss and gradients; the layers' AOTAutograd backward is checked above."""
    config = orthotune.HRAConfig(r=4, target_modules="all-linear", init_weights=False)
    eager, compiled = (orthotune.get_peft_model(tiny_llama(), config).train() for _ in range(2))
    compiled.load_state_dict(eager.state_dict())
    tokens = token_batch()
    losses = {}
    for name, model in (("eager", eager), ("compiled", torch.compile(compiled, fullgraph=True, backend="eager"))):
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        losses[name] = loss.detach()
    assert rel_err(losses["compiled"], losses["eager"]) < 1e-6
    grads = {n: p.grad for n, p in compiled.named_parameters() if p.requires_grad}
    assert len(grads) == 14
    for name, parameter in eager.named_parameters():
        if parameter.requires_grad:
            assert rel_err(grads[name], parameter.grad) < 1e-5, name
