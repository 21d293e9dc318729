"""transformers' ``Trainer`` for orthotune models: adapter-only checkpoints, as peft models get them.

    from orthotune.integrations.trainer import OrthoTrainer
    trainer = OrthoTrainer(model=get_peft_model(model, config), args=TrainingArguments(...), train_dataset=...)

``Trainer`` recognises peft's ``PeftModel`` by its type and saves anything else as a full state dict (which
safetensors refuses outright for tied embeddings). ``OrthoTrainer`` is ``Trainer`` with three methods taught
about :class:`~orthotune.model.OrthoModel`: checkpoints hold ``adapter_config.json`` and
``adapter_model.safetensors`` (one subdirectory per extra adapter, as peft), and resuming or loading the best
checkpoint reads them back into the adapters. Every other model goes through ``Trainer`` unchanged.

This module imports transformers; ``import orthotune`` does not import this module.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers import Trainer

from orthotune.model import OrthoModel

__all__ = ["OrthoTrainer"]

TRAINING_ARGS_NAME = "training_args.bin"


class OrthoTrainer(Trainer):
    """``transformers.Trainer`` that saves and reloads :class:`~orthotune.model.OrthoModel` adapters only."""

    def _ortho_model(self, model: Any = None) -> OrthoModel | None:
        unwrapped = self.accelerator.unwrap_model(self.model if model is None else model, keep_torch_compile=False)
        return unwrapped if isinstance(unwrapped, OrthoModel) else None

    def _save(self, output_dir: str | None = None, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        model = self._ortho_model()
        if model is None:
            return super()._save(output_dir, state_dict)
        output_dir = self.args.output_dir if output_dir is None else output_dir
        assert output_dir is not None  # TrainingArguments always has one
        if not self.args.should_save:
            return None
        model.save_pretrained(output_dir, state_dict=state_dict)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))  # as Trainer does
        return None

    def _load_adapters(self, model: OrthoModel, checkpoint: str) -> None:
        for name in model.peft_config:
            model.load_adapter_weights(checkpoint if name == "default" else os.path.join(checkpoint, name), name)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        ortho = self._ortho_model(model)
        if ortho is None:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        self._load_adapters(ortho, resume_from_checkpoint)
        return None

    def _load_best_model(self) -> None:
        ortho = self._ortho_model()
        if ortho is None:
            return super()._load_best_model()
        best = self.state.best_model_checkpoint
        assert best is not None  # Trainer calls this only when it recorded a best checkpoint
        self._load_adapters(ortho, best)
        return None
