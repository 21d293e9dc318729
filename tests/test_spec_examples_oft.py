"""The usage examples of the OFT spec page (/work/shared/spec/000_64d547ab9e6b9d5d.txt), nearly verbatim.

Only the import changes: ``peft.tuners.oft.layer`` → ``orthotune.oft``. Each test checks what the example
prints against what the page says it prints.

Not here: "Multiple Adapters" (``get_peft_model`` on gpt2 loaded with ``from_pretrained``) belongs to the
model-level API and its tests, written separately.
"""

from __future__ import annotations

import pytest


def test_import_oft_layer() -> None:
    from orthotune.oft import OFTLayer

    assert OFTLayer.adapter_layer_names == ("oft_R",)
    assert OFTLayer.other_param_names == ("r", "oft_block_size", "oft_dropout")


def test_basic_oft_layer_creation(capsys: pytest.CaptureFixture[str]) -> None:
    import torch
    import torch.nn as nn

    from orthotune.oft import Linear as OFTLinear

    # Create base linear layer
    base_layer = nn.Linear(768, 768)

    # Create OFT adapter
    oft_layer = OFTLinear(
        base_layer=base_layer,
        adapter_name="default",
        r=8,  # 8 blocks
        oft_block_size=0,  # Auto: 768/8 = 96
        module_dropout=0.0,
        coft=False,
        block_share=False,
        init_weights=True,
    )

    # Forward pass
    x = torch.randn(4, 768)
    output = oft_layer(x)
    print(f"Output shape: {output.shape}")  # [4, 768]

    assert capsys.readouterr().out == "Output shape: torch.Size([4, 768])\n"
    assert oft_layer.oft_block_size["default"] == 96 and oft_layer.r["default"] == 8


def test_constrained_oft(capsys: pytest.CaptureFixture[str]) -> None:
    import torch
    import torch.nn as nn

    from orthotune.oft import Linear as OFTLinear

    # Create COFT adapter with controlled rotation freedom
    base_layer = nn.Linear(1024, 1024)

    coft_layer = OFTLinear(
        base_layer=base_layer,
        adapter_name="coft",
        r=16,
        oft_block_size=0,  # Auto: 1024/16 = 64
        module_dropout=0.0,
        coft=True,  # Enable constrained OFT
        eps=6e-5,  # Control strength
        block_share=False,
        init_weights=True,
    )

    # COFT projects parameters during forward pass
    x = torch.randn(8, 1024)
    output = coft_layer(x)
    print(f"COFT output: {output.shape}")  # [8, 1024]

    assert capsys.readouterr().out == "COFT output: torch.Size([8, 1024])\n"
    assert coft_layer.oft_block_size["coft"] == 64


def test_block_sharing_for_efficiency(capsys: pytest.CaptureFixture[str]) -> None:
    import torch.nn as nn

    from orthotune.oft import Linear as OFTLinear

    base_layer = nn.Linear(2048, 2048)

    # Without block sharing
    oft_no_share = OFTLinear(
        base_layer=base_layer,
        adapter_name="no_share",
        r=32,
        oft_block_size=0,  # 2048/32 = 64
        block_share=False,
        init_weights=True,
    )

    # With block sharing (same rotation for all blocks)
    oft_share = OFTLinear(
        base_layer=base_layer,
        adapter_name="share",
        r=32,
        oft_block_size=0,
        block_share=True,  # Share parameters
        init_weights=True,
    )

    # Check parameter counts
    no_share_params = oft_no_share.oft_R["no_share"].weight.numel()
    share_params = oft_share.oft_R["share"].weight.numel()

    print(f"Without sharing: {no_share_params} params")  # 32 * (64*63/2)
    print(f"With sharing: {share_params} params")  # 1 * (64*63/2)
    print(f"Reduction: {no_share_params / share_params:.1f}x")

    without, with_, reduction = capsys.readouterr().out.splitlines()
    assert without == f"Without sharing: {32 * (64 * 63 // 2)} params" == "Without sharing: 64512 params"
    assert with_ == f"With sharing: {64 * 63 // 2} params" == "With sharing: 2016 params"
    assert reduction == "Reduction: 32.0x"


def test_cayley_neumann_approximation(capsys: pytest.CaptureFixture[str]) -> None:
    import torch
    import torch.nn as nn

    from orthotune.oft import Linear as OFTLinear

    base_layer = nn.Linear(512, 512)

    # Standard Cayley (uses matrix solve)
    oft_standard = OFTLinear(
        base_layer=base_layer,
        adapter_name="standard",
        r=8,
        oft_block_size=0,
        use_cayley_neumann=False,  # Use exact Cayley
        init_weights=True,
    )

    # Cayley-Neumann approximation (faster)
    oft_neumann = OFTLinear(
        base_layer=base_layer,
        adapter_name="neumann",
        r=8,
        oft_block_size=0,
        use_cayley_neumann=True,  # Use approximation
        num_cayley_neumann_terms=5,  # Number of terms
        init_weights=True,
    )

    x = torch.randn(4, 512)
    out_standard = oft_standard(x)
    out_neumann = oft_neumann(x)

    # Outputs should be similar
    print(f"Standard output: {out_standard.shape}")
    print(f"Neumann output: {out_neumann.shape}")

    assert capsys.readouterr().out == "Standard output: torch.Size([4, 512])\nNeumann output: torch.Size([4, 512])\n"
    torch.testing.assert_close(out_standard, out_neumann)


# "Multiple Adapters" (get_peft_model + AutoModelForCausalLM.from_pretrained("gpt2")) is skipped on purpose: it
# exercises the model-level API, which another engineer tests.


def test_merging_for_inference(capsys: pytest.CaptureFixture[str]) -> None:
    import torch
    import torch.nn as nn

    from orthotune.oft import Linear as OFTLinear

    base_layer = nn.Linear(768, 768)
    oft_layer = OFTLinear(
        base_layer=base_layer,
        adapter_name="trained",
        r=8,
        oft_block_size=0,
        init_weights=True,
    )

    # Train the adapter...
    # ...

    # Merge for deployment
    oft_layer.merge(safe_merge=True, adapter_names=["trained"])
    print(f"Merged: {oft_layer.merged}")  # True

    # Inference with no adapter overhead
    x = torch.randn(1, 768)
    output = oft_layer(x)

    # Unmerge if needed
    oft_layer.unmerge()
    print(f"Merged after unmerge: {oft_layer.merged}")  # False

    assert capsys.readouterr().out == "Merged: True\nMerged after unmerge: False\n"
    assert output.shape == (1, 768)
