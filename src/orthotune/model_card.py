"""The ``README.md`` model card that ``save_pretrained`` writes beside the adapter files, as peft does.

peft writes the card on every save: YAML metadata (``library_name: peft``, ``base_model``, tags such as
``base_model:adapter:<name>``) and, in the text, a ``### Framework versions`` list with its version. A card
already in the directory is updated, not replaced: its text stays, missing lines are added, and its metadata gets
peft's keys. Where peft would write an empty ``base_model`` or drop the card's own tags, this keeps them.

Metadata of an existing card is read and rewritten with ``huggingface_hub`` (peft's dependency, always there
beside transformers); without it, an existing card's metadata is left as it is and only its text is updated.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from typing import Any, Protocol

from torch import nn

from orthotune.atomic_write import write_atomic
from orthotune.config import PEFT_FORMAT_VERSION, AdapterConfig

logger = logging.getLogger(__name__)

CARD_NAME = "README.md"
VERSIONS_HEADING = "### Framework versions"
TRAINING_HEADING = "## Training procedure"
QUANTIZATION_LINE = "The following `bitsandbytes` quantization config was used during training:"


class CardModel(Protocol):
    """What a model card is made from (:class:`orthotune.OrthoModel` is one)."""

    peft_config: dict[str, AdapterConfig]

    def get_base_model(self) -> nn.Module: ...


def base_model_name(base: nn.Module) -> str | None:
    """The base model's Hub name or path: transformers models carry ``name_or_path``, diffusers models keep it in
    their config; ``None`` when empty (a model made from a config)."""
    name = getattr(base, "name_or_path", None) or getattr(getattr(base, "config", None), "_name_or_path", None)
    name = os.fspath(name) if isinstance(name, os.PathLike) else name
    return name if isinstance(name, str) and name else None


def update_model_card(directory: str | os.PathLike[str], model: CardModel, tags: Iterable[str] = ()) -> None:
    """Write ``directory/README.md`` for the model's adapters, or update the card there (atomically).

    Args:
        directory: the adapter directory (created if missing).
        model: the adapted model.
        tags: more tags for the metadata (``push_to_hub(tags=...)``).
    """
    from orthotune import __version__

    base = model.get_base_model()
    name = base_model_name(base)
    methods = sorted({str(config.peft_type) for config in model.peft_config.values()})
    all_tags = set(getattr(base, "model_tags", None) or []) | {"orthotune", *(m.lower() for m in methods), *tags}
    if type(base).__module__.startswith("transformers."):
        all_tags.add("transformers")
    if name:
        all_tags.add(f"base_model:adapter:{name}")
    metadata: dict[str, Any] = {"base_model": name, "library_name": "peft", "tags": sorted(all_tags)}
    causal = any(config.task_type == "CAUSAL_LM" for config in model.peft_config.values())
    pipeline_tag = "text-generation" if causal else None
    versions = [f"- PEFT {PEFT_FORMAT_VERSION}", f"- orthotune {__version__}"]
    quantization = _quantization_lines(base)

    path = os.path.join(directory, CARD_NAME)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as handle:
            card = handle.read()
        text = _updated_card(card, metadata, pipeline_tag, versions, quantization)
        if text == card:
            return
    else:
        metadata["pipeline_tag"] = pipeline_tag
        title = f"{' and '.join(methods) or 'Orthogonal'} adapter" + (f" for {name}" if name else "")
        body = [
            f"# {title}",
            "",
            f"An orthogonal fine-tuning adapter written by orthotune in peft {PEFT_FORMAT_VERSION}'s adapter format: "
            "load it with `peft.PeftModel.from_pretrained(base_model, path)` or "
            "`orthotune.PeftModel.from_pretrained(base_model, path)`.",
            "",
        ]
        if quantization:
            body += [TRAINING_HEADING, "", QUANTIZATION_LINE, *quantization, ""]
        text = _front_matter(metadata) + "\n".join([*body, VERSIONS_HEADING, "", *versions, ""])
    os.makedirs(directory, exist_ok=True)
    write_atomic(path, text.encode())


def _front_matter(metadata: dict[str, Any]) -> str:
    """YAML metadata; strings are written as JSON strings, which YAML reads as the same strings."""
    lines = ["---"]
    for key, value in metadata.items():
        if value is None or value == []:
            continue
        if isinstance(value, list):
            lines += [f"{key}:", *(f"- {json.dumps(item)}" for item in value)]
        else:
            lines.append(f"{key}: {json.dumps(value)}")
    return "\n".join([*lines, "---", ""]) + "\n"


def _quantization_lines(base: nn.Module) -> list[str]:
    config = getattr(getattr(base, "config", None), "quantization_config", None)
    to_dict = getattr(config, "to_dict", None)
    values = to_dict() if callable(to_dict) else config
    return [f"- {key}: {value}" for key, value in values.items()] if isinstance(values, dict) else []


def _updated_card(
    card: str, metadata: dict[str, Any], pipeline_tag: str | None, versions: list[str], quantization: list[str]
) -> str:
    """An existing card with peft's metadata and lines added; its own text and tags are kept."""
    try:
        from huggingface_hub import ModelCard
    except ImportError:
        logger.info("huggingface_hub is not installed: the metadata of the existing %s is left as it is", CARD_NAME)
        front, body = _split_front_matter(card)
        return front + _updated_text(body, versions, quantization)
    parsed = ModelCard(card)
    data = parsed.data
    wanted = {
        "library_name": metadata["library_name"],
        "tags": sorted(set(data.get("tags") or []) | set(metadata["tags"])),
    }
    if metadata["base_model"]:
        wanted["base_model"] = metadata["base_model"]
    if not data.get("pipeline_tag") and pipeline_tag:
        wanted["pipeline_tag"] = pipeline_tag
    text = _updated_text(parsed.text, versions, quantization)
    if text == parsed.text and all(data.get(key) == value for key, value in wanted.items()):
        return card  # nothing to add: the file stays byte for byte
    for key, value in wanted.items():
        data[key] = value
    parsed.text = text
    return str(parsed)


def _split_front_matter(card: str) -> tuple[str, str]:
    if card.startswith("---"):
        end = card.find("\n---", 3)
        if end != -1:
            close = card.find("\n", end + 4)
            close = len(card) if close == -1 else close + 1
            return card[:close], card[close:]
    return "", card


def _updated_text(text: str, versions: list[str], quantization: list[str]) -> str:
    """peft's edits of a card's text: the quantization config and the framework versions, each added once."""
    lines = text.splitlines()
    before = len(lines)
    if quantization and QUANTIZATION_LINE not in lines:
        block = ["", QUANTIZATION_LINE, *quantization, ""]
        if TRAINING_HEADING in lines:
            position = lines.index(TRAINING_HEADING) + 1
            lines[position:position] = block
        else:
            lines += [TRAINING_HEADING, *block]
    missing = [line for line in versions if line not in lines]
    if missing and VERSIONS_HEADING in lines:
        position = lines.index(VERSIONS_HEADING) + 2
        lines[position:position] = missing
    elif missing:
        lines += ["", VERSIONS_HEADING, "", *missing]
    return text if len(lines) == before else "\n".join(lines) + "\n"
