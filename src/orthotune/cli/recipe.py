"""Fine-tune a text encoder with orthogonal adapters and a small head: the recipe behind ``orthotune finetune``.

::

    text ──tokenizer──► encoder (frozen W, trainable rotations R) ──mean over tokens──► head (linear) ──► label

1. **Linear probe.** The head alone is fitted, to convergence (L-BFGS, a convex problem), on the mean-pooled
   features of the frozen encoder. Its held-out score is the *before* number: the best a linear head can do
   on what the pretrained encoder already knows, not an untrained head's chance level.
2. **Fine-tuning.** Starting from that head (linear probing, then fine-tuning: Kumar et al., ICLR 2022,
   arXiv:2202.10054), the rotations and the head train together with AdamW; the encoder's own weights stay
   frozen. The held-out score afterwards is the *after* number, from the same model, data and split.

Regression targets are standardised with the training split's mean and deviation (the loss is MSE in those
units) and scored by Pearson's r; classification uses cross-entropy and accuracy.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from orthotune.cli.data import LabelledTexts
from orthotune.cli.progress import ProgressBar

#: L2 penalties (on the head's weight, added to the example-averaged loss) the linear probe chooses from.
PROBE_L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
#: Share of the training split the probe holds out to choose its penalty (then refits on all of it).
PROBE_VALIDATION_FRACTION = 0.2
#: Sequences sorted by length within pools of this many batches, so padding stays small but order stays random.
SORT_POOL_BATCHES = 50
#: Fraction of the optimiser steps spent warming the learning rate up from zero.
WARMUP_FRACTION = 0.06


@dataclass
class Scores:
    """Held-out scores. ``value`` is the headline metric (Pearson's r or accuracy), named by ``metric``."""

    metric: str
    value: float
    extra: dict[str, float]

    def as_dict(self) -> dict[str, float]:
        return {self.metric: self.value, **self.extra}


class PooledHeadModel(nn.Module):
    """An encoder (transformers ``AutoModel``-like), mean pooling over real tokens, and a linear head.

    Args:
        encoder: returns an object with ``last_hidden_state: (batch, tokens, hidden)``.
        head: ``nn.Linear(hidden, outputs)``.

    Shapes:
        ``input_ids, attention_mask: (batch, tokens)`` → ``(batch, outputs)``.
    """

    def __init__(self, encoder: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(input_ids, attention_mask))


class TokenizedTexts:
    """Token ids of every text (special tokens added, truncated, unpadded) and batches of them.

    Args:
        tokenizer: a transformers tokenizer.
        texts: the texts.
        max_length: truncate longer texts to this many tokens.
    """

    def __init__(self, tokenizer: object, texts: Sequence[str], max_length: int) -> None:
        encoded = tokenizer(list(texts), truncation=True, max_length=max_length)  # type: ignore[operator]
        self.ids: list[list[int]] = encoded["input_ids"]
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = 0 if pad is None else int(pad)

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, attention_mask)``, both ``(len(indices), longest)``, padded on the right."""
        longest = max(len(self.ids[i]) for i in indices)
        input_ids = torch.full((len(indices), longest), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(indices), longest), dtype=torch.long)
        for row, i in enumerate(indices):
            input_ids[row, : len(self.ids[i])] = torch.tensor(self.ids[i])
            attention_mask[row, : len(self.ids[i])] = 1
        return input_ids, attention_mask

    def batches(self, batch_size: int, rng: random.Random | None = None) -> list[list[int]]:
        """Index batches. Without ``rng``: all sorted by length (evaluation). With it: shuffled, then sorted by
        length within pools of :data:`SORT_POOL_BATCHES` batches, and the batches shuffled (training)."""
        order = list(range(len(self.ids)))
        if rng is None:
            order.sort(key=lambda i: len(self.ids[i]))
            return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        rng.shuffle(order)
        pool = batch_size * SORT_POOL_BATCHES
        batches = []
        for start in range(0, len(order), pool):
            chunk = sorted(order[start : start + pool], key=lambda i: len(self.ids[i]))
            batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
        rng.shuffle(batches)
        return batches


class Targets:
    """Labels as training targets: standardised floats (regression) or class indices (classification)."""

    def __init__(self, train: LabelledTexts) -> None:
        self.task = train.task
        self.num_outputs = 1 if train.task == "regression" else len(train.classes)
        if train.task == "regression":
            values = torch.tensor(train.labels, dtype=torch.float64)
            self.mean = float(values.mean())
            self.std = float(values.std()) or 1.0
        else:
            self.mean, self.std = 0.0, 1.0

    def tensor(self, labels: Sequence[float] | Sequence[int]) -> torch.Tensor:
        if self.task == "regression":
            return (torch.tensor(labels, dtype=torch.float64) - self.mean).div(self.std).float()
        return torch.tensor(labels, dtype=torch.long)

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.task == "regression":
            return nn.functional.mse_loss(outputs.squeeze(-1), targets)
        return nn.functional.cross_entropy(outputs, targets)

    def scores(self, outputs: torch.Tensor, targets: torch.Tensor) -> Scores:
        """Held-out scores of ``outputs: (n, outputs)`` against ``targets`` from :meth:`tensor`."""
        if self.task == "regression":
            prediction = outputs.squeeze(-1).double() * self.std + self.mean
            truth = targets.double() * self.std + self.mean
            rmse = float((prediction - truth).pow(2).mean().sqrt())
            return Scores("pearson_r", pearson(prediction, truth), {"rmse": rmse})
        accuracy = float((outputs.argmax(-1) == targets).double().mean())
        return Scores("accuracy", accuracy, {})


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    """Pearson's correlation of two ``(n,)`` tensors (0 when either is constant)."""
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    denominator = float(x.norm() * y.norm())
    return float(x @ y) / denominator if denominator > 0 else 0.0


@torch.no_grad()
def pooled_features(
    model: PooledHeadModel, tokens: TokenizedTexts, batch_size: int, progress: ProgressBar | None = None
) -> torch.Tensor:
    """``(n, hidden)`` mean-pooled features in the original order, with the model in eval mode."""
    was_training = model.training
    model.eval()
    features: torch.Tensor | None = None
    for indices in tokens.batches(batch_size):
        batch = model.features(*tokens.batch(indices)).float()
        if features is None:
            features = batch.new_empty(len(tokens), batch.shape[-1])
        features[indices] = batch
        if progress is not None:
            progress.update(1)
    model.train(was_training)
    assert features is not None
    return features


def fit_probe(head: nn.Linear, features: torch.Tensor, targets: torch.Tensor, how: Targets, seed: int = 0) -> float:
    """Fit ``head`` in place to ``features: (n, hidden)``; returns the L2 penalty it chose.

    Each penalty of :data:`PROBE_L2_GRID` is fitted on part of the training split and scored (by the loss) on
    the rest (:data:`PROBE_VALIDATION_FRACTION`); the best one is refitted on everything. Held-out data is
    never looked at, so the probe is as good a *before* as the training split allows.
    """
    order = torch.randperm(len(features), generator=torch.Generator().manual_seed(seed))
    num_validation = int(len(features) * PROBE_VALIDATION_FRACTION)
    best = PROBE_L2_GRID[0]
    if num_validation >= 5:
        validation, fit = order[:num_validation], order[num_validation:]
        losses = {}
        for l2 in PROBE_L2_GRID:
            _fit_linear(head, features[fit], targets[fit], how.loss, l2)
            with torch.no_grad():
                losses[l2] = float(how.loss(head(features[validation]), targets[validation]))
        best = min(PROBE_L2_GRID, key=lambda l2: (losses[l2], l2))
    _fit_linear(head, features, targets, how.loss, best)
    return best


def _fit_linear(
    head: nn.Linear, features: torch.Tensor, targets: torch.Tensor, loss: Callable[..., torch.Tensor], l2: float
) -> None:
    """Minimise ``loss(head(features), targets) + l2·‖weight‖²`` from zero by L-BFGS (a convex problem)."""
    head.float()
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
    optimizer = torch.optim.LBFGS(
        head.parameters(), lr=1.0, max_iter=500, history_size=20, tolerance_grad=1e-7, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        value = loss(head(features), targets) + l2 * head.weight.pow(2).sum()
        value.backward()
        return value

    optimizer.step(closure)
    head.zero_grad(set_to_none=True)


def evaluate(
    model: PooledHeadModel, tokens: TokenizedTexts, targets: torch.Tensor, how: Targets, batch_size: int
) -> Scores:
    """Scores of ``model`` on all of ``tokens`` (eval mode, no dropout)."""
    return how.scores(predict(model, tokens, batch_size), targets)


@torch.no_grad()
def predict(model: PooledHeadModel, tokens: TokenizedTexts, batch_size: int) -> torch.Tensor:
    """``(n, outputs)`` outputs of ``model`` on all of ``tokens``, in their order (eval mode, no dropout)."""
    was_training = model.training
    model.eval()
    outputs: torch.Tensor | None = None
    for indices in tokens.batches(batch_size):
        batch = model(*tokens.batch(indices)).float()
        if outputs is None:
            outputs = batch.new_empty(len(tokens), batch.shape[-1])
        outputs[indices] = batch
    model.train(was_training)
    assert outputs is not None
    return outputs


def train(
    model: PooledHeadModel,
    tokens: TokenizedTexts,
    targets: torch.Tensor,
    how: Targets,
    *,
    epochs: float,
    lr: float,
    batch_size: int,
    seed: int,
    weight_decay: float = 0.0,
    progress: bool = True,
    step_losses: list[float] | None = None,
) -> list[float]:
    """Train every parameter of ``model`` that requires grad; returns the mean loss of each epoch (and appends
    each step's loss to ``step_losses`` when given).

    AdamW with linear warm-up over :data:`WARMUP_FRACTION` of the steps and linear decay to zero; gradients
    clipped to norm 1. ``epochs`` may be fractional (the last epoch is cut short).
    """
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
    rng = random.Random(seed)
    steps_per_epoch = math.ceil(len(tokens) / batch_size)
    total = max(1, round(epochs * steps_per_epoch))
    warmup = max(1, round(WARMUP_FRACTION * total))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup, max(0.0, (total - step) / max(1, total - warmup)))
    )
    model.train()
    epoch_losses: list[float] = []
    step = 0
    with ProgressBar(total, "fine-tuning", enabled=progress) as bar:
        while step < total:
            running, count = 0.0, 0
            for indices in tokens.batches(batch_size, rng):
                if step == total:
                    break
                loss = how.loss(model(*tokens.batch(indices)), targets[indices])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(parameters, 1.0)
                optimizer.step()
                schedule.step()
                step += 1
                value = loss.item()
                running += value * len(indices)
                if step_losses is not None:
                    step_losses.append(value)
                count += len(indices)
                bar.update(1, loss=running / count)
            epoch_losses.append(running / max(1, count))
    model.eval()
    return epoch_losses
