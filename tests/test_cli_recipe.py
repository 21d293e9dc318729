"""The fine-tuning recipe behind ``orthotune finetune``, on a toy encoder (no transformers): batching, mean
pooling over real tokens, the linear probe, and a training loop that learns."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import orthotune
from orthotune.cli.data import labelled_texts
from orthotune.cli.recipe import PooledHeadModel, Targets, TokenizedTexts, evaluate, fit_probe, pooled_features, train


class CharTokenizer:
    """Characters as token ids, with 1 and 2 as start and end markers and 0 as padding."""

    pad_token_id = 0

    def __call__(self, texts: list[str], truncation: bool, max_length: int) -> dict[str, list[list[int]]]:
        return {"input_ids": [[1, *[3 + ord(c) % 50 for c in text][: max_length - 2], 2] for text in texts]}


class ToyEncoder(nn.Module):
    """Embedding, one linear layer: returns ``last_hidden_state`` like a transformers model."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(60, width)
        self.mix = nn.Linear(width, width)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(last_hidden_state=torch.tanh(self.mix(self.embed(input_ids))))


def test_batches_cover_every_example_once() -> None:
    tokens = TokenizedTexts(CharTokenizer(), [("x" * (i % 7 + 1)) for i in range(103)], max_length=6)
    assert max(len(ids) for ids in tokens.ids) == 6  # truncated
    for rng in (None, random.Random(0)):
        batches = tokens.batches(10, rng)
        assert sorted(i for batch in batches for i in batch) == list(range(103))
        assert all(len(batch) <= 10 for batch in batches)
    assert tokens.batches(10, random.Random(0)) == tokens.batches(10, random.Random(0))
    input_ids, mask = tokens.batch([0, 5])
    assert input_ids.shape == mask.shape == (2, max(len(tokens.ids[0]), len(tokens.ids[5])))
    assert mask.sum(1).tolist() == [len(tokens.ids[0]), len(tokens.ids[5])]


def test_mean_pooling_ignores_padding() -> None:
    model = PooledHeadModel(ToyEncoder(), nn.Linear(16, 1))
    tokens = TokenizedTexts(CharTokenizer(), ["ab", "abcdef"], max_length=16)
    together = model.features(*tokens.batch([0, 1]))
    alone = model.features(*tokens.batch([0]))
    torch.testing.assert_close(together[0], alone[0])


def test_probe_fits_a_linear_target() -> None:
    features = torch.randn(400, 8)
    data = labelled_texts(
        [f"t{i}" for i in range(400)], (features @ torch.arange(1.0, 9.0) + 0.1 * torch.randn(400)).tolist()
    )
    how = Targets(data)
    head = nn.Linear(8, 1)
    l2 = fit_probe(head, features, how.tensor(data.labels), how)
    assert l2 in orthotune.cli.recipe.PROBE_L2_GRID
    assert how.scores(head(features).detach(), how.tensor(data.labels)).value > 0.99


def test_training_learns_with_orthogonal_adapters() -> None:
    """Texts made of 'a's are positive, of 'b's negative: the OFT-adapted toy model learns it, the base does not
    change, and evaluation is the probe's score before training."""
    texts = [c * n for c in "ab" for n in range(1, 21)]
    data = labelled_texts(texts, ["pos" if t[0] == "a" else "neg" for t in texts])
    how = Targets(data)
    encoder = ToyEncoder()
    base = {key: value.clone() for key, value in encoder.state_dict().items()}
    wrapped = orthotune.get_peft_model(
        encoder, orthotune.OFTConfig(oft_block_size=4, target_modules=["mix"], use_cayley_neumann=False)
    )
    model = PooledHeadModel(wrapped, nn.Linear(16, 2))
    tokens, targets = TokenizedTexts(CharTokenizer(), texts, 32), how.tensor(data.labels)
    fit_probe(model.head, pooled_features(model, tokens, 8), targets, how)
    probe = evaluate(model, tokens, targets, how, 8)
    losses = train(model, tokens, targets, how, epochs=8, lr=5e-2, batch_size=10, seed=0, progress=False)
    assert losses[-1] < losses[0]
    assert evaluate(model, tokens, targets, how, 8).value >= probe.value
    trained = wrapped.get_base_model().state_dict()
    assert torch.equal(trained["mix.base_layer.weight"], base["mix.weight"])  # the base weight stays frozen
    assert trained["mix.oft_R.default.weight"].abs().max() > 0  # the rotation moved away from the identity


def test_scores_against_independent_formulas() -> None:
    """Regression: Pearson's r and RMSE in the labels' own units; classification: accuracy."""
    values = torch.randn(30).double() * 2 + 1
    regression = labelled_texts([f"t{i}" for i in range(30)], values.tolist(), "regression")
    how = Targets(regression)
    targets = how.tensor(regression.labels)
    predicted = values + torch.randn(30).double()  # in rating units
    outputs = ((predicted - how.mean) / how.std).float().unsqueeze(-1)
    scores = how.scores(outputs, targets)
    assert scores.metric == "pearson_r"
    assert scores.value == pytest.approx(float(torch.corrcoef(torch.stack([predicted, values]))[0, 1]), abs=1e-5)
    assert scores.extra["rmse"] == pytest.approx(float((predicted - values).pow(2).mean().sqrt()), abs=1e-5)

    classes = labelled_texts([f"t{i}" for i in range(6)], ["a", "b", "c", "a", "b", "c"])
    how = Targets(classes)
    logits = torch.eye(3)[[0, 1, 2, 1, 1, 0]]  # right, right, right, wrong, right, wrong
    accuracy = how.scores(logits, how.tensor(classes.labels))
    assert (accuracy.metric, accuracy.value) == ("accuracy", pytest.approx(4 / 6))
