"""transformers' Trainer with an orthotune model: a few steps, adapter-only checkpoints, resume, peft reads them."""

from __future__ import annotations

import os

import pytest
import torch
from references import rel_err
from tiny_models import tiny_llama, token_batch

import orthotune
from orthotune import OFTConfig, get_peft_model

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from orthotune.integrations.trainer import OrthoTrainer  # noqa: E402  (needs transformers)


def _dataset(size: int = 8) -> list[dict[str, torch.Tensor]]:
    rows = token_batch(batch=size, length=8, seed=5)
    return [{"input_ids": row, "labels": row, "unused_column": torch.tensor(0)} for row in rows]


def _trainer(model, output_dir, max_steps: int) -> OrthoTrainer:
    arguments = transformers.TrainingArguments(
        output_dir=str(output_dir),
        max_steps=max_steps,
        per_device_train_batch_size=4,
        learning_rate=5e-2,
        save_steps=2,
        logging_steps=100,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    return OrthoTrainer(model=model, args=arguments, train_dataset=_dataset())


def test_trainer_trains_and_saves_adapter_only_checkpoints(tmp_path) -> None:
    # tied embeddings: a full-state-dict save (plain Trainer on a non-peft model) fails on them outright
    model = get_peft_model(
        tiny_llama(tie_word_embeddings=True), OFTConfig(oft_block_size=8, target_modules=["q_proj", "v_proj"])
    )
    start = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    _trainer(model, tmp_path, max_steps=4).train()

    changed = {name for name, parameter in model.named_parameters() if not torch.equal(parameter, start[name])}
    assert changed and all(".oft_R.default." in name for name in changed)
    checkpoint = tmp_path / "checkpoint-4"
    files = set(os.listdir(checkpoint))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files
    assert not files & {"model.safetensors", "pytorch_model.bin"}

    tokens = token_batch()
    model.eval()
    with torch.no_grad():
        trained = model(input_ids=tokens).logits
        reloaded = orthotune.PeftModel.from_pretrained(tiny_llama(tie_word_embeddings=True), checkpoint)
        theirs = peft.PeftModel.from_pretrained(tiny_llama(tie_word_embeddings=True), str(checkpoint)).eval()
        assert rel_err(reloaded(input_ids=tokens).logits, trained) == 0
        assert rel_err(theirs(input_ids=tokens).logits, trained) <= 1e-6


def test_trainer_resumes_from_an_adapter_checkpoint(tmp_path) -> None:
    def run(max_steps: int, resume: bool):
        model = get_peft_model(tiny_llama(), OFTConfig(oft_block_size=8, target_modules=["q_proj"]))
        _trainer(model, tmp_path, max_steps).train(resume_from_checkpoint=resume or None)
        return {
            name: parameter.detach().clone() for name, parameter in model.named_parameters() if parameter.requires_grad
        }

    straight = run(4, resume=False)
    for name in os.listdir(tmp_path):
        if name == "checkpoint-4":
            os.rename(tmp_path / name, tmp_path / "straight-4")
    resumed = run(4, resume=True)  # picks up checkpoint-2 of the first run and trains steps 3–4 again
    assert straight.keys() == resumed.keys()
    for name, value in straight.items():
        torch.testing.assert_close(resumed[name], value, rtol=1e-5, atol=1e-6)
