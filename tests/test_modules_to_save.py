"""Trained copies of whole modules (``modules_to_save``) when adapters are deleted.

Regression: ``delete_adapter`` on a model with ``modules_to_save`` raised ``TypeError`` (``nn.ModuleDict.pop``
takes no default). The truths are the outputs of the remaining adapter recorded before the deletion, the
outputs of the deleted adapter (different from them, so a wrong copy left in use would show), and a save →
reload of what remains into a fresh base model.
"""

from __future__ import annotations

import pytest
import torch
from references import rel_err
from tiny_models import tiny_bert, token_batch
from torch import nn

import orthotune
from orthotune import OFTConfig, get_peft_model
from orthotune.modules_to_save import ModulesToSaveWrapper


class TinyClassifier(nn.Module):
    """A hidden layer to adapt and a ``classifier`` head to train in full."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1234)
        self.hidden = nn.Linear(8, 8)
        self.classifier = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.tanh(self.hidden(x)))


def _randomize_trained_copies(model: nn.Module, seed: int) -> None:
    """Give every trainable copy its own random weights, so each adapter's head differs from the others'."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".modules_to_save." in name:
                parameter.add_(torch.randn(parameter.shape, generator=generator))


def _wrappers(model: nn.Module) -> list[ModulesToSaveWrapper]:
    return [module for module in model.modules() if isinstance(module, ModulesToSaveWrapper)]


def _two_adapter_bert() -> tuple[orthotune.OrthoModel, dict]:
    def config(**options) -> OFTConfig:
        return OFTConfig(task_type="SEQ_CLS", init_weights=False, use_cayley_neumann=False, **options)

    model = get_peft_model(tiny_bert(), config(oft_block_size=8, target_modules=["query"]), adapter_name="a")
    model.add_adapter("b", config(oft_block_size=4, target_modules=["query", "value"]))
    _randomize_trained_copies(model, seed=1)
    return model.eval(), {"input_ids": token_batch()}


def _two_adapter_module(copies: str) -> tuple[orthotune.OrthoModel, dict]:
    """Adapters "a" and "b" on :class:`TinyClassifier`; ``copies`` names those with a copy of the classifier."""

    def config(name: str) -> OFTConfig:
        to_save = ["classifier"] if name in copies else None
        return OFTConfig(oft_block_size=4, target_modules=["hidden"], modules_to_save=to_save, init_weights=False)

    model = get_peft_model(TinyClassifier(), config("a"), adapter_name="a")
    model.add_adapter("b", config("b"))
    _randomize_trained_copies(model, seed=2)
    return model.eval(), {"x": torch.randn(4, 8)}


def _outputs(model: nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    return getattr(out, "logits", out)


CASES = {
    "bert-seq-cls": _two_adapter_bert,  # both adapters get a classifier copy from the task type
    "module-both-copies": lambda: _two_adapter_module("ab"),
    "module-only-deleted-has-copy": lambda: _two_adapter_module("a"),
    "module-only-kept-has-copy": lambda: _two_adapter_module("b"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_delete_adapter_with_modules_to_save_keeps_the_other_adapter(case: str) -> None:
    model, inputs = CASES[case]()
    model.set_adapter("a")
    with_a = _outputs(model, inputs)
    model.set_adapter("b")
    with_b = _outputs(model, inputs)
    assert rel_err(with_a, with_b) > 1e-2  # the adapters (and their heads) are distinguishable

    model.delete_adapter("a")

    assert list(model.peft_config) == ["b"]
    assert model.active_adapters == ["b"]
    torch.testing.assert_close(_outputs(model, inputs), with_b, rtol=0, atol=0)
    wrappers = _wrappers(model)
    assert wrappers, "the model has a modules_to_save wrapper"
    for wrapper in wrappers:
        assert "a" not in wrapper.modules_to_save
        assert wrapper.active_adapter in (None, "b")
    names = [name for name, _ in model.named_parameters()] + list(model.state_dict())
    assert not [name for name in names if ".a." in name or name.endswith(".a")]


@pytest.mark.parametrize("case", ["bert-seq-cls", "module-both-copies"])
def test_what_remains_after_delete_saves_and_reloads(case: str, tmp_path) -> None:
    model, inputs = CASES[case]()
    model.set_adapter("b")
    model.delete_adapter("a")
    expected = _outputs(model, inputs)
    model.save_pretrained(tmp_path)
    # peft's layout: a non-default name is a folder; the model card sits at the top
    assert sorted(path.name for path in tmp_path.iterdir()) == ["README.md", "b"]
    base = tiny_bert() if case == "bert-seq-cls" else TinyClassifier()
    reloaded = orthotune.PeftModel.from_pretrained(base, tmp_path / "b", adapter_name="b").eval()
    torch.testing.assert_close(_outputs(reloaded, inputs), expected, rtol=1e-6, atol=1e-7)


def test_wrapper_delete_of_an_adapter_without_a_copy_is_a_no_op() -> None:
    wrapper = ModulesToSaveWrapper(nn.Linear(4, 2))
    wrapper.add_adapter("b")
    wrapper.delete_adapter("a")  # no copy for "a": nothing to remove, and no error
    assert list(wrapper.modules_to_save) == ["b"] and wrapper.active_adapter == "b"
    wrapper.delete_adapter("b")
    assert list(wrapper.modules_to_save) == [] and wrapper.active_adapter is None
