"""Token-by-token generation with unmerged adapters, against the same model with the adapter merged.

The model
---------
A ``LlamaForCausalLM`` from a ``LlamaConfig`` (no download): hidden 256, intermediate 768, 4 layers, 8 heads,
vocabulary 8000, fp32. Every adapter targets all seven projections (``q_proj, k_proj, v_proj, o_proj,
gate_proj, up_proj, down_proj``). ``generate`` runs greedy with the KV cache, a prompt of 8 tokens and exactly
64 new tokens (``min_new_tokens = max_new_tokens``), so each step pushes one token through every adapted
layer: the adapter's fixed cost per call, not its arithmetic, decides the ratio. Adapter tensors start at
their identity initialisation plus ``N(0, 1e-3²)`` noise (``perturbed``).

The configurations
------------------
==========================  ===========================================================================
``merged``                  orthotune OFT b=32, merged into the weights (``merge_and_unload``): the reference
``orthotune-oft-b32``       ``orthotune.OFTConfig(r=0, oft_block_size=32)`` (Cayley-Neumann, 5 terms), unmerged
``peft-oft-b32``            ``peft.OFTConfig(r=0, oft_block_size=32)`` (the same), unmerged
``peft-lora-r16``           ``peft.LoraConfig(r=16, lora_alpha=32)``, unmerged
``before-oft-b32``          with ``--before REV``: orthotune at commit ``REV``, unmerged
==========================  ===========================================================================

Batch 1 (one prompt). The mixed batch: 4 prompts, orthotune with two adapters ``a`` and ``b`` and
``adapter_names=["a", "b", "__base__", "a"]``, against the merged model on the same 4 prompts.

Each group (the reference and the variants) is timed back to back in rotating order (``_timing``); ratios are
medians of per-repetition ratios with their 25th-75th percentiles, one thread unless ``--threads``.

Reproduce::

    python benchmarks/inference.py --markdown
    python benchmarks/inference.py --before fe813a2 --markdown      # also the code at an earlier commit
    python benchmarks/inference.py --quick                          # smoke test
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import sys
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

_HERE = Path(__file__).resolve().parent
for _path in (_HERE.parent / "src", _HERE):
    if _path.is_dir() and str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from _timing import (  # noqa: E402
    Budget,
    Spread,
    environment_line,
    paired_ratios,
    render_markdown,
    render_text,
    set_clock,
    timed_group,
)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MIXED_NAMES = ["a", "b", "__base__", "a"]


@dataclass(frozen=True)
class Shape:
    hidden: int = 256
    intermediate: int = 768
    layers: int = 4
    heads: int = 8
    vocab: int = 8000
    prompt: int = 8
    new_tokens: int = 64

    @property
    def description(self) -> str:
        return (
            f"LlamaForCausalLM hidden {self.hidden}, intermediate {self.intermediate}, {self.layers} layers, "
            f"{self.heads} heads, vocab {self.vocab}; prompt {self.prompt}, {self.new_tokens} new tokens, greedy, "
            "KV cache, fp32"
        )


FULL = Shape()
QUICK = Shape(hidden=64, intermediate=128, layers=2, heads=4, vocab=256, prompt=4, new_tokens=4)


def base_model(shape: Shape, seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.heads,
        max_position_embeddings=256,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def orthotune_oft(model: nn.Module, package: str = "orthotune", names: Sequence[str] = ("default",)) -> nn.Module:
    library = importlib.import_module(package)
    config = library.OFTConfig(r=0, oft_block_size=32, target_modules=TARGETS)
    wrapped = library.get_peft_model(model, config, adapter_name=names[0])
    for name in names[1:]:
        wrapped.add_adapter(name, config)
    return perturbed(wrapped)


def perturbed(model: nn.Module, scale: float = 1e-3) -> nn.Module:
    """Every adapter tensor moved off its identity initialisation by ``N(0, scale²)`` (a trained adapter's size:
    ‖Q‖₂ well inside the Cayley-Neumann series' radius); ``eval()`` mode."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if any(key in name for key in ("oft_", "lora_")):
                parameter.add_(scale * torch.randn(parameter.shape, generator=generator))
    return model.eval()


def peft_oft(model: nn.Module) -> nn.Module:
    import peft

    config = peft.OFTConfig(r=0, oft_block_size=32, target_modules=TARGETS, task_type="CAUSAL_LM")
    return perturbed(peft.get_peft_model(model, config))


def peft_lora(model: nn.Module) -> nn.Module:
    import peft

    config = peft.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, task_type="CAUSAL_LM")
    return perturbed(peft.get_peft_model(model, config))


def make_generate(model: nn.Module, prompt: torch.Tensor, shape: Shape, **extra: Any) -> Callable[[], torch.Tensor]:
    options = {"max_new_tokens": shape.new_tokens, "min_new_tokens": shape.new_tokens, "do_sample": False,
               "pad_token_id": 0, **extra}  # fmt: skip

    def generate() -> torch.Tensor:
        with torch.no_grad():
            return model.generate(input_ids=prompt, **options)

    return generate


@dataclass
class Row:
    group: str
    name: str
    ms: Spread
    vs_merged: Spread | None
    repeats: int


def time_group(group: str, fns: dict[str, Callable[[], object]], budget: Budget) -> list[Row]:
    times = timed_group(fns, budget)
    rows = []
    for name in fns:
        ratio = None if name == "merged" else Spread.of(paired_ratios(times[name], times["merged"]))
        rows.append(Row(group, name, Spread.of([1e3 * t for t in times[name]]), ratio, len(times[name])))
        shown = "reference" if ratio is None else f"x merged {ratio.format()}"
        print(f"  {group:16s} {name:20s} {rows[-1].ms.median:9.1f} ms  {shown}", file=sys.stderr, flush=True)
    return rows


def run(shape: Shape, budget: Budget, before: str | None, skip_mixed: bool) -> list[Row]:
    prompt = torch.randint(1, shape.vocab, (1, shape.prompt), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        unmerged = orthotune_oft(base_model(shape))
        merged = copy.deepcopy(unmerged).merge_and_unload()
        models: dict[str, nn.Module] = {"merged": merged, "orthotune-oft-b32": unmerged}
        if before:
            models["before-oft-b32"] = orthotune_oft(base_model(shape), package="orthotune_before")
            models["before-oft-b32"].load_state_dict(unmerged.state_dict())
        models["peft-oft-b32"] = peft_oft(base_model(shape))
        models["peft-lora-r16"] = peft_lora(base_model(shape))
    reference = models["merged"].generate(input_ids=prompt, max_new_tokens=shape.new_tokens, do_sample=False,
                                          pad_token_id=0)  # fmt: skip
    with torch.no_grad():
        mismatch = not torch.equal(models["orthotune-oft-b32"].generate(
            input_ids=prompt, max_new_tokens=shape.new_tokens, do_sample=False, pad_token_id=0), reference)  # fmt: skip
    if mismatch:
        print("  note: unmerged and merged greedy tokens differ (fp32 rounding can flip a near-tie)", file=sys.stderr)
    rows = time_group("batch 1", {name: make_generate(model, prompt, shape) for name, model in models.items()}, budget)
    if skip_mixed:
        return rows
    generator = torch.Generator().manual_seed(1)
    prompts = torch.randint(1, shape.vocab, (len(MIXED_NAMES), shape.prompt), generator=generator)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mixed = orthotune_oft(base_model(shape), names=("a", "b"))
        merged_a = copy.deepcopy(mixed)
        merged_a.set_adapter("a")
        merged_a = merged_a.merge_and_unload()
        fns = {
            "merged": make_generate(merged_a, prompts, shape),
            "orthotune-mixed": make_generate(mixed, prompts, shape, adapter_names=MIXED_NAMES),
        }
        if before:
            old = orthotune_oft(base_model(shape), package="orthotune_before", names=("a", "b"))
            old.load_state_dict(mixed.state_dict())
            fns["before-mixed"] = make_generate(old, prompts, shape, adapter_names=MIXED_NAMES)
        rows += time_group(f"mixed batch {len(MIXED_NAMES)}", fns, budget)
    return rows


HEADERS = ("batch", "config", "ms / generate [p25-p75]", "x merged [p25-p75]", "reps")


def table_rows(rows: Sequence[Row]) -> list[list[str]]:
    return [[r.group, r.name, r.ms.format(1), r.vs_merged.format() if r.vs_merged else "1 (reference)",
             str(r.repeats)] for r in rows]  # fmt: skip


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall time, or this process's CPU time (less noisy on a shared machine)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default: 1)")
    parser.add_argument("--quick", action="store_true", help="a tiny model, a few tokens (smoke test)")
    parser.add_argument("--before", default=None, help="also time orthotune at this git revision")
    parser.add_argument("--budget-s", type=float, default=60.0, help="seconds of timing per group (default 60)")
    parser.add_argument("--repeats", type=int, default=21, help="most repetitions per group (default 21)")
    parser.add_argument("--skip-mixed", action="store_true")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows to this JSON file")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[Row]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    set_clock(args.clock)
    shape = QUICK if args.quick else FULL
    budget = Budget(
        warmup=1 if args.quick else 2,
        min_sample_s=0.0,
        budget_s=1.0 if args.quick else args.budget_s,
        min_repeats=3,
        max_repeats=3 if args.quick else args.repeats,
    )
    with tempfile.TemporaryDirectory() as directory:
        before = None
        if args.before:
            from revisions import load_revision

            before = load_revision(args.before, Path(directory))
        print(f"# {environment_line()} | cpu capability {torch.backends.cpu.get_cpu_capability()}"
              + (f" | before = src at {before}" if before else ""))  # fmt: skip
        print(f"# {shape.description}; adapters on {', '.join(TARGETS)}")
        rows = run(shape, budget, before, args.skip_mixed)
    render = render_markdown if args.markdown else render_text
    print("\n" + render(HEADERS, table_rows(rows)))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=1))
    return rows


if __name__ == "__main__":
    main()
