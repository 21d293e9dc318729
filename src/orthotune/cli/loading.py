"""Loading what the subcommands read: adapter directories, and transformers base models (imported on demand)."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

from orthotune.cli.common import HEAD_CONFIG, UsageError, first_line

#: peft's ``task_type`` to the transformers auto class its models are loaded with.
TASK_AUTO_CLASSES = {
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "CAUSAL_LM": "AutoModelForCausalLM",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
}


def adapter_file(path_text: str) -> Any:
    """The checked adapter file in a directory, or a one-line :class:`UsageError`."""
    from orthotune.checkpoint import read_adapter_files

    path = Path(path_text)
    if not path.is_dir():
        raise UsageError(f"adapter directory {path} does not exist; pass a directory written by save_pretrained")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # unknown keys or an old peft version: nothing the command can act on
            return read_adapter_files(path)
    except (OSError, ValueError) as error:
        raise UsageError(f"adapter {path}: {first_line(error)}") from error


def base_dir(path_text: str) -> Path:
    path = Path(path_text)
    if not path.is_dir():
        raise UsageError(f"--base {path} does not exist; pass a local transformers model directory")
    if not (path / "config.json").is_file():
        raise UsageError(f"--base {path} is not a transformers model directory (no config.json)")
    return path


def import_transformers() -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import transformers
    except ImportError as error:
        raise UsageError("this command needs transformers: pip install 'orthotune[hf]'") from error
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def base_model_class(transformers: Any, file: Any, base: Path, adapter: Path) -> tuple[Any, dict[str, Any]]:
    """The transformers class to load ``base`` with, and extra ``from_pretrained`` arguments."""
    config = file.config
    if config.task_type is not None:
        return getattr(transformers, TASK_AUTO_CLASSES[config.task_type]), {}
    mapping = config.auto_mapping or {}
    named = mapping.get("base_model_class")
    if named and str(mapping.get("parent_library", "transformers")).startswith("transformers"):
        model_class = getattr(transformers, named, None)
        if model_class is None:
            raise UsageError(f"adapter {adapter}: auto_mapping names {named}, which this transformers lacks")
        return model_class, {}
    if (adapter / HEAD_CONFIG).is_file():  # written by `orthotune finetune`: an encoder without its pooler
        return transformers.AutoModel, {"add_pooling_layer": False}
    try:
        architectures = json.loads((base / "config.json").read_text(encoding="utf-8")).get("architectures") or []
    except (OSError, ValueError, AttributeError):
        architectures = []
    model_class = getattr(transformers, architectures[0], None) if architectures else None
    prefix = getattr(model_class, "base_model_prefix", "")
    from orthotune.checkpoint import adapted_module_names

    names = adapted_module_names(file)
    # A head class (BertForSequenceClassification) holds the encoder under its prefix ("bert."); an adapter
    # trained on the bare encoder has names without it and needs AutoModel.
    if model_class is not None and names and all(name.startswith(f"{prefix}.") for name in names):
        return model_class, {}
    return transformers.AutoModel, {}


def load_adapted_model(adapter: Path, file: Any, base: Path) -> Any:
    """The base model in ``base`` with the adapter in ``adapter`` loaded (an :class:`~orthotune.OrthoModel`)."""
    from orthotune.model import OrthoModel

    transformers = import_transformers()
    model_class, kwargs = base_model_class(transformers, file, base, adapter)
    try:
        try:
            model = model_class.from_pretrained(base, local_files_only=True, **kwargs)
        except TypeError:
            if not kwargs:
                raise
            model = model_class.from_pretrained(base, local_files_only=True)
    except Exception as error:  # transformers raises OSError, ValueError, KeyError, … for a bad directory
        raise UsageError(f"--base {base} cannot be loaded as {model_class.__name__} ({first_line(error)})") from error
    model.eval()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return OrthoModel.from_pretrained(model, adapter)
    except (OSError, ValueError, TypeError, NotImplementedError) as error:
        raise UsageError(
            f"adapter {adapter} does not fit --base {base} loaded as {model_class.__name__}: {first_line(error)}"
        ) from error


def load_base_model(base: Path) -> Any:
    """The model in a local directory, for its module names: a diffusers model (``_class_name`` in its config)
    or a transformers one (its architecture's class, else ``AutoModel``), in eval mode."""
    try:
        config = json.loads((base / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise UsageError(f"--base {base}: config.json cannot be read ({first_line(error)})") from error
    class_name = config.get("_class_name") if isinstance(config, dict) else None
    try:
        if class_name:
            try:
                import diffusers
            except ImportError as error:
                raise UsageError(f"--base {base} is a diffusers {class_name}: pip install diffusers") from error
            model_class = getattr(diffusers, class_name, None)
            if model_class is None:
                raise UsageError(f"--base {base}: this diffusers has no {class_name}")
        else:
            transformers = import_transformers()
            architectures = config.get("architectures") or [] if isinstance(config, dict) else []
            model_class = getattr(transformers, architectures[0], None) if architectures else None
            model_class = model_class or transformers.AutoModel
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return model_class.from_pretrained(base, local_files_only=True).eval()
    except UsageError:
        raise
    except Exception as error:  # the libraries raise OSError, ValueError, KeyError, … for a bad directory
        raise UsageError(f"--base {base} cannot be loaded ({first_line(error)})") from error


def adapted_model_for_output(args: Any) -> tuple[Path, Path, Path, Any, Any]:
    """What ``merge`` and ``export-lora`` share: ``ADAPTER``, ``--base`` and ``--output`` checked before any work
    (the output neither exists without ``--overwrite`` nor is one of the inputs), then the adapted model.

    Returns:
        ``(adapter, base, output, file, model)``: the paths, the checked adapter file and the
        :class:`~orthotune.OrthoModel` with the adapter loaded.
    """
    from orthotune.cli.common import check_output

    adapter, output = Path(args.adapter), Path(args.output)
    file = adapter_file(args.adapter)
    base = base_dir(args.base)
    check_output(output, args.overwrite)
    if output.resolve() in (adapter.resolve(), base.resolve()):
        raise UsageError(f"--output {output} is the adapter or base directory; choose another --output")
    return adapter, base, output, file, load_adapted_model(adapter, file, base)
