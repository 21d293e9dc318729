"""The BOFT usage examples of the spec page (001_a8fbdc0472720955), run with ``orthotune.boft``.

Each example is the spec's code with ``peft.tuners.boft.layer`` replaced by ``orthotune.boft``; where the input
is shrunk for speed the comment says so (layer shapes are always the spec's). Assertions check what the
example prints or promises against independent truths (shapes, the identity adapter equal to the base layer,
gradients equal to those without checkpointing).

"Multiple Adapters" (``get_peft_model`` on gpt2) and "Inference with Merged Weights" (``PeftModel`` on bert)
exercise the model-level API, which is built and tested elsewhere (and need model downloads): not here.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from orthotune.boft import Linear as BOFTLinear


def test_spec_basic_linear_layer_adaptation(capsys):
    torch.manual_seed(0)
    # Create pretrained linear layer
    base_linear = nn.Linear(768, 3072)

    # Add BOFT adapter
    boft_linear = BOFTLinear(
        base_layer=base_linear,
        adapter_name="task_adapter",
        boft_block_size=96,  # 768 / 96 = 8 blocks
        boft_block_num=0,
        boft_n_butterfly_factor=1,
        boft_dropout=0.1,
        init_weights=True,
    )

    # Training mode
    boft_linear.train()
    x = torch.randn(2, 128, 768)  # [batch, seq_len, hidden]; spec uses batch 32, shrunk to 2 for speed
    output = boft_linear(x)
    print(f"Output shape: {output.shape}")  # [2, 128, 3072]

    assert capsys.readouterr().out == "Output shape: torch.Size([2, 128, 3072])\n"
    assert boft_linear.boft_R["task_adapter"].shape == (1, 8, 96, 96)
    assert boft_linear.boft_s["task_adapter"].shape == (3072, 1)
    # init_weights=True is the identity adapter: even with dropout active, the output is the base layer's.
    assert torch.allclose(output, base_linear(x), rtol=1e-5, atol=1e-5)


def test_spec_custom_block_configuration(capsys):
    # Large linear layer
    base_layer = nn.Linear(4096, 4096)

    # Configure with specific block parameters
    boft_linear = BOFTLinear(
        base_layer=base_layer,
        adapter_name="large_model",
        boft_block_size=128,  # 4096 / 128 = 32 blocks
        boft_block_num=0,
        boft_n_butterfly_factor=2,  # More butterfly structure
        boft_dropout=0.05,  # Lower dropout
        init_weights=True,
    )

    # Verify configuration
    adapter_name = "large_model"
    print(f"Block size: {boft_linear.boft_block_size[adapter_name]}")
    print(f"Block num: {boft_linear.boft_block_num[adapter_name]}")
    print(f"R shape: {boft_linear.boft_R[adapter_name].shape}")
    print(f"s shape: {boft_linear.boft_s[adapter_name].shape}")

    # Unlike peft without its CUDA extension, both butterfly factors are kept.
    assert capsys.readouterr().out.splitlines() == [
        "Block size: 128",
        "Block num: 32",
        "R shape: torch.Size([2, 32, 128, 128])",
        "s shape: torch.Size([4096, 1])",
    ]


def test_spec_gradient_checkpointing(capsys):
    torch.manual_seed(0)
    base_layer = nn.Linear(2048, 2048)
    boft_linear = BOFTLinear(
        base_layer=base_layer,
        adapter_name="checkpoint_demo",
        boft_block_size=128,
        boft_block_num=0,
        boft_n_butterfly_factor=1,
        boft_dropout=0.1,
        init_weights=True,
    )

    # Use gradient checkpointing to save memory during training
    # Spec input is (8, 512, 2048); shrunk to (2, 16, 2048) to keep the test fast (the layer is the spec's).
    x = torch.randn(2, 16, 2048, requires_grad=True)

    # With gradient checkpointing
    torch.manual_seed(1)  # fixes the dropout pattern, to compare with a run without checkpointing below
    output = checkpoint(boft_linear, x, use_reentrant=False)

    loss = output.sum()
    loss.backward()
    print("Gradient computed with reduced memory usage")

    assert capsys.readouterr().out == "Gradient computed with reduced memory usage\n"
    assert output.shape == (2, 16, 2048)
    grad_r = boft_linear.boft_R["checkpoint_demo"].grad
    grad_s = boft_linear.boft_s["checkpoint_demo"].grad
    assert grad_r is not None and grad_s is not None and x.grad is not None
    assert grad_r.shape == (1, 16, 128, 128) and grad_s.shape == (2048, 1)
    assert grad_r.abs().max() > 0 and grad_s.abs().max() > 0

    # Same gradients as the standard forward (same dropout pattern).
    checkpointed = (grad_r.clone(), grad_s.clone(), x.grad.clone())
    boft_linear.zero_grad(set_to_none=True)
    x.grad = None
    torch.manual_seed(1)
    boft_linear(x).sum().backward()
    plain = (boft_linear.boft_R["checkpoint_demo"].grad, boft_linear.boft_s["checkpoint_demo"].grad, x.grad)
    for a, b in zip(checkpointed, plain, strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
