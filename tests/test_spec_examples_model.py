"""The spec's model-level examples (get_peft_model, PeftModel.from_pretrained + merge_and_unload), run as written
with ``peft`` replaced by ``orthotune`` and the hub models (gpt2, bert-base-uncased) by tiny ones from configs."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_gpt2

pytest.importorskip("transformers")


def _expected_oft_count(model) -> int:
    """peft's OFT parameters: r blocks of b(b-1)/2 per adapted layer, b = in_features / r."""
    total = 0
    for name, module in model.named_modules():
        if name.endswith(("c_attn", "c_proj")):
            block = module.weight.shape[0] // 8  # Conv1D weight is (in, out)
            total += 8 * block * (block - 1) // 2
    return total


def test_oft_multiple_adapters_example(capsys) -> None:
    from orthotune import OFTConfig, get_peft_model

    model = tiny_gpt2()  # AutoModelForCausalLM.from_pretrained("gpt2")
    expected = _expected_oft_count(model)
    config = OFTConfig(r=8, module_dropout=0.0, coft=False, target_modules=["c_attn", "c_proj"], task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    peft_model.print_trainable_parameters()
    line = capsys.readouterr().out
    assert line.startswith(f"trainable params: {expected:,d} || all params: ")
    assert peft_model(torch.randint(0, 96, (2, 5))).logits.shape == (2, 5, 96)


def test_boft_multiple_adapters_example(capsys) -> None:
    from orthotune import BOFTConfig, get_peft_model

    model = tiny_gpt2()
    config = BOFTConfig(
        boft_block_size=8,
        boft_n_butterfly_factor=1,
        boft_dropout=0.1,
        target_modules=["c_attn", "c_proj"],
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    peft_model.print_trainable_parameters()
    # per layer: boft_R (1, in/8, 8, 8) and boft_s (out, 1)
    expected = sum(
        module.weight.shape[0] * 8 + module.weight.shape[1]
        for name, module in tiny_gpt2().named_modules()
        if name.endswith(("c_attn", "c_proj"))
    )
    assert capsys.readouterr().out.startswith(f"trainable params: {expected:,d} || ")
    peft_model.train()
    peft_model(torch.randint(0, 96, (2, 5)), labels=torch.randint(0, 96, (2, 5))).loss.backward()


def test_boft_inference_with_merged_weights_example(tmp_path) -> None:
    from transformers import BertConfig, BertForSequenceClassification

    from orthotune import BOFTConfig, PeftModel, get_peft_model

    def base_model():  # AutoModelForSequenceClassification.from_pretrained("bert-base-uncased")
        torch.manual_seed(0)
        return BertForSequenceClassification(
            BertConfig(
                vocab_size=30000, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
            )
        )

    # "path/to/boft/adapter": an adapter saved first
    trained = get_peft_model(
        base_model(),
        BOFTConfig(boft_block_size=8, target_modules=["query", "value"], task_type="SEQ_CLS", init_weights=False),
    ).eval()
    trained.save_pretrained(tmp_path / "boft-adapter")

    # --- the example ---
    base_model = base_model()
    model = PeftModel.from_pretrained(base_model, tmp_path / "boft-adapter")

    # Merge for faster inference
    model.merge_and_unload()

    # Now inference uses merged weights (no adapter overhead)
    inputs = torch.randint(0, 30000, (1, 128))
    outputs = model(inputs)
    assert outputs.logits.shape == (1, 2)
    # --- end of the example ---
    with torch.no_grad():
        torch.testing.assert_close(outputs.logits, trained(inputs).logits, rtol=1e-5, atol=1e-6)
