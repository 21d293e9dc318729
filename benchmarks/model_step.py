"""Time per optimizer step and peak memory of a small Llama: orthotune against peft 0.21.2 and full fine-tuning.

The model
---------
A ``LlamaForCausalLM`` built from a ``LlamaConfig`` (no download): hidden 512, intermediate 1536, 4 layers,
8 attention heads (8 key-value heads), vocabulary 8000, fp32 weights, ``use_cache=False``. One batch of
random token ids, batch 4 x sequence 256, is the input and (shifted inside the model) the label; the loss is
transformers' causal-LM cross entropy.

The configurations (every adapter targets the same modules: ``q_proj, k_proj, v_proj, o_proj, gate_proj,
up_proj, down_proj``, i.e. every linear layer of every decoder block; embeddings, norms and ``lm_head``
stay frozen):

==========================  =========================================================================
``orthotune-oft-b32``       ``orthotune.OFTConfig(r=0, oft_block_size=32)`` (default Cayley-Neumann, 5 terms)
``orthotune-boft-b8-m2``    ``orthotune.BOFTConfig(boft_block_size=8, boft_n_butterfly_factor=2)``
``peft-oft-b32``            ``peft.OFTConfig(r=0, oft_block_size=32)``
``peft-boft-b8-m2``         ``peft.BOFTConfig(boft_block_size=8, boft_n_butterfly_factor=2)``, run with
                            its block-diagonal step in plain torch (``_peft_boft_cpu``)
``orthotune-hra-r8``        ``orthotune.HRAConfig(r=8)`` (8 Householder reflections per layer)
``peft-hra-r8``             ``peft.HRAConfig(r=8)``
``peft-lora-r8``            ``peft.LoraConfig(r=8, lora_alpha=16)`` -- LoRA of HRA's rank
``peft-lora-r16``           ``peft.LoraConfig(r=16, lora_alpha=32)`` -- the reference of the ratios
``full-finetune``           every parameter trainable, no adapter
``frozen-forward``          forward and loss under ``torch.no_grad()``, no backward, no optimizer
==========================  =========================================================================

A training step is ``optimizer.zero_grad(set_to_none=True)``, forward with labels, ``loss.backward()``,
``optimizer.step()`` with ``torch.optim.AdamW(lr=1e-4)`` over the trainable parameters.

Time per step
-------------
All configurations live in one process. Each is timed in a group with peft LoRA r=16 (OFT: orthotune,
peft and LoRA together; BOFT likewise; HRA with peft's HRA and LoRA r=8 too), every member once per
repetition in rotating order, and the reported ratio is the median of per-repetition ratios (``_timing``),
with the 25th-75th percentile. Rows timed with LoRA r=8 also get their ratio to it.

Peak memory
-----------
One fresh process per configuration and run (``--memory-only CONFIG``), so that no allocator state is
shared. That process imports both adapter libraries, builds the base model and runs one no-grad forward,
then measures from just before the adapter is attached to the end of ``--memory-steps`` training steps, so
the figure contains the adapter's parameters, gradients, AdamW state, activations kept for backward and
temporaries -- and not the frozen base model, which every configuration holds alike:

* **peak RSS growth**: peak resident set (``VmHWM``) after the steps minus the resident set just before
  wrapping (what the operating system sees; includes allocator slack). ``--memory-runs`` runs (default 3),
  median;
* **peak live tensor bytes**: the highest total of tensor storages created in that window and still alive,
  tracked by a ``TorchDispatchMode`` (every storage an aten op returns, released when freed). Deterministic
  and independent of the allocator; it does not see a kernel's internal scratch memory. Separate runs
  (``--live-runs``, default 1), so that the tracker's own bookkeeping is not in the RSS figure.

Reproduce
---------
From the repository root::

    /work/venv/bin/python benchmarks/model_step.py --threads 1 --markdown
    /work/venv/bin/python benchmarks/model_step.py --quick                      # smoke test
    /work/venv/bin/python benchmarks/model_step.py --profile orthotune-oft-b32 peft-lora-r16
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import statistics
import subprocess
import sys
import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

# The working tree's orthotune (not an installed copy), and the shared helpers next to this file, also when the
# file is loaded by path (``tests/references.py::load_benchmark``).
_HERE = Path(__file__).resolve().parent
for _path in (_HERE.parent / "src", _HERE):
    if _path.is_dir() and str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from _peft_boft_cpu import peft_keeps_butterfly_factor  # noqa: E402
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
REFERENCE = "peft-lora-r16"
#: LoRA of HRA's rank, timed in HRA's group: its rows also get their ratio to it.
SAME_RANK_LORA = "peft-lora-r8"


@dataclass(frozen=True)
class ModelShape:
    hidden: int = 512
    intermediate: int = 1536
    layers: int = 4
    heads: int = 8
    vocab: int = 8000
    batch: int = 4
    seq: int = 256

    @property
    def description(self) -> str:
        return (
            f"LlamaForCausalLM hidden {self.hidden}, intermediate {self.intermediate}, {self.layers} layers, "
            f"{self.heads} heads, vocab {self.vocab}; batch {self.batch} x seq {self.seq}"
        )


FULL = ModelShape()
QUICK = ModelShape(hidden=64, intermediate=192, layers=2, heads=4, vocab=256, batch=2, seq=16)


def base_model(shape: ModelShape, seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.heads,
        max_position_embeddings=max(512, shape.seq),
        use_cache=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


# --------------------------------------------------------------------------------------------------
# Configurations
# --------------------------------------------------------------------------------------------------


def orthotune_oft(model: nn.Module) -> nn.Module:
    import orthotune

    return orthotune.get_peft_model(model, orthotune.OFTConfig(r=0, oft_block_size=32, target_modules=TARGETS))


def orthotune_boft(model: nn.Module) -> nn.Module:
    import orthotune

    config = orthotune.BOFTConfig(boft_block_size=8, boft_n_butterfly_factor=2, target_modules=TARGETS)
    return orthotune.get_peft_model(model, config)


def peft_oft(model: nn.Module) -> nn.Module:
    import peft

    return peft.get_peft_model(model, peft.OFTConfig(r=0, oft_block_size=32, target_modules=TARGETS))


def peft_boft(model: nn.Module) -> nn.Module:
    import peft

    config = peft.BOFTConfig(boft_block_size=8, boft_n_butterfly_factor=2, target_modules=TARGETS)
    with peft_keeps_butterfly_factor(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(model, config)


def peft_lora(model: nn.Module) -> nn.Module:
    import peft

    return peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS))


def orthotune_hra(model: nn.Module) -> nn.Module:
    import orthotune

    return orthotune.get_peft_model(model, orthotune.HRAConfig(r=8, target_modules=TARGETS))


def peft_hra(model: nn.Module) -> nn.Module:
    import peft

    return peft.get_peft_model(model, peft.HRAConfig(r=8, target_modules=TARGETS))


def peft_lora_r8(model: nn.Module) -> nn.Module:
    import peft

    return peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))


def full_finetune(model: nn.Module) -> nn.Module:
    return model.requires_grad_(True)


def frozen(model: nn.Module) -> nn.Module:
    return model.requires_grad_(False)


CONFIGS: dict[str, Callable[[nn.Module], nn.Module]] = {
    "orthotune-oft-b32": orthotune_oft,
    "orthotune-boft-b8-m2": orthotune_boft,
    "peft-oft-b32": peft_oft,
    "peft-boft-b8-m2": peft_boft,
    "orthotune-hra-r8": orthotune_hra,
    "peft-hra-r8": peft_hra,
    "peft-lora-r8": peft_lora_r8,
    "peft-lora-r16": peft_lora,
    "full-finetune": full_finetune,
    "frozen-forward": frozen,
}
# Timing groups: each is timed together, in rotating order, with the reference.
GROUPS: tuple[tuple[str, ...], ...] = (
    ("orthotune-oft-b32", "peft-oft-b32"),
    ("orthotune-boft-b8-m2", "peft-boft-b8-m2"),
    ("orthotune-hra-r8", "peft-hra-r8", SAME_RANK_LORA),
    ("full-finetune",),
    ("frozen-forward",),
)


def make_step(name: str, model: nn.Module, tokens: torch.Tensor) -> Callable[[], None]:
    """One optimizer step of ``model`` on ``tokens`` (for ``frozen-forward``: forward and loss, no grad)."""
    if name == "frozen-forward":
        model.eval()

        def forward() -> None:
            with torch.no_grad():
                model(input_ids=tokens, labels=tokens)

        return forward
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model(input_ids=tokens, labels=tokens).loss.backward()
        optimizer.step()

    return step


def make_tokens(shape: ModelShape) -> torch.Tensor:
    return torch.randint(0, shape.vocab, (shape.batch, shape.seq), generator=torch.Generator().manual_seed(0))


def trainable_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# --------------------------------------------------------------------------------------------------
# Time per step
# --------------------------------------------------------------------------------------------------


@dataclass
class StepResult:
    name: str
    params: int
    ms: Spread
    vs_reference: Spread | None  # per-repetition time / peft LoRA time
    peft_over_ours: Spread | None  # orthotune rows: per-repetition peft time / orthotune time
    repeats: int
    vs_same_rank_lora: Spread | None = None  # rows timed with LoRA r=8: per-repetition time / its time


def time_steps(shape: ModelShape, names: Sequence[str], budget: Budget) -> list[StepResult]:
    tokens = make_tokens(shape)
    models = {name: CONFIGS[name](base_model(shape)) for name in names}
    steps = {name: make_step(name, model, tokens) for name, model in models.items()}
    results: dict[str, StepResult] = {}
    for group in GROUPS:
        members = [REFERENCE, *(name for name in group if name in steps)]
        if len(members) == 1:
            continue
        times = timed_group({name: steps[name] for name in members}, budget)
        for name in members:
            ours = name.startswith("orthotune-")
            twin = name.replace("orthotune-", "peft-")
            result = StepResult(
                name=name,
                params=trainable_count(models[name]),
                ms=Spread.of([1e3 * t for t in times[name]]),
                vs_reference=Spread.of(paired_ratios(times[name], times[REFERENCE])),
                peft_over_ours=Spread.of(paired_ratios(times[twin], times[name])) if ours and twin in times else None,
                repeats=len(times[name]),
                vs_same_rank_lora=Spread.of(paired_ratios(times[name], times[SAME_RANK_LORA]))
                if SAME_RANK_LORA in times and name != SAME_RANK_LORA
                else None,
            )
            if name == REFERENCE and name in results:
                continue  # keep the reference's first group; every group re-times it only to pair with it
            results[name] = result
            print(f"  {name:22s} {result.ms.median:9.1f} ms  x LoRA {result.vs_reference.median:.3f}", file=sys.stderr)
    return [results[name] for name in CONFIGS if name in results]


# --------------------------------------------------------------------------------------------------
# Peak memory
# --------------------------------------------------------------------------------------------------


class LiveTensorBytes(TorchDispatchMode):
    """Tracks the total bytes of tensor storages created while active and still alive, and its peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def _release(self, key: int, nbytes: int) -> None:
        if self.live.pop(key, None) is not None:
            self.current -= nbytes

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes == 0 or key in self.live:
                continue
            self.live[key] = nbytes
            self.current += nbytes
            self.peak = max(self.peak, self.current)
            # Storages keep their Python object alive while the C++ storage lives, so this fires on free.
            weakref.finalize(storage, self._release, key, nbytes)
        return out


def resident_bytes(field: str = "VmRSS") -> int:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process, from ``/proc/self/status``.

    Not ``getrusage().ru_maxrss``: Linux carries the peak RSS of the *parent's* address space across
    ``fork`` + ``exec`` into the child's ``ru_maxrss``, so a child spawned by a process holding seven models
    reported ~1.6 GiB for every configuration. ``VmHWM`` belongs to this process's own address space.
    """
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # kB
    raise RuntimeError(f"{field} not found in /proc/self/status")


def measure_memory(name: str, shape: ModelShape, steps: int, kind: str) -> float:
    """Peak memory, in MiB, from just before wrapping to the end of ``steps`` training steps.

    ``kind="rss"``: the peak resident set (``VmHWM``) after the steps minus the resident set just before
    wrapping. ``kind="live"``: the peak of :class:`LiveTensorBytes` over the same window. The two are
    separate runs, so that the tracker's own bookkeeping (a Python object per storage) is not in the RSS.

    The baseline is taken after both adapter libraries are imported and after one no-grad forward of the
    base model, so it holds the base model and what any run of it needs; the figure is what the
    configuration adds on top.
    """
    for library in ("orthotune", "peft"):  # imported now: their import-time allocations belong to the baseline
        importlib.import_module(library)
    tokens = make_tokens(shape)
    model = base_model(shape)
    with torch.no_grad():
        model(input_ids=tokens)  # first-call allocations of the kernels, common to every configuration
    before = resident_bytes()
    tracker = LiveTensorBytes() if kind == "live" else contextlib.nullcontext()
    with tracker:
        step = make_step(name, CONFIGS[name](model), tokens)
        for _ in range(steps):
            step()
    if kind == "live":
        return tracker.peak / 2**20
    return (resident_bytes("VmHWM") - before) / 2**20


@dataclass
class MemoryResult:
    name: str
    rss_mib: list[float]
    live_mib: list[float]


def memory_run(name: str, kind: str, args: argparse.Namespace) -> float:
    """One ``--memory-only`` run of ``name`` in a fresh Python process; returns its figure in MiB."""
    command = [sys.executable, __file__, "--memory-only", name, "--memory-kind", kind, "--threads", str(args.threads)]
    command += ["--memory-steps", str(args.memory_steps)] + (["--quick"] if args.quick else [])
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"memory run of {name} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["mib"]


def memory_in_fresh_processes(names: Sequence[str], args: argparse.Namespace) -> list[MemoryResult]:
    results = []
    for name in names:
        rss = [memory_run(name, "rss", args) for _ in range(args.memory_runs)]
        live = [memory_run(name, "live", args) for _ in range(args.live_runs)]
        print(f"  memory {name:22s} rss {statistics.median(rss):8.1f} MiB  live {statistics.median(live):8.1f} MiB",
              file=sys.stderr)  # fmt: skip
        results.append(MemoryResult(name, rss, live))
    return results


# --------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------

STEP_HEADERS = (
    "config",
    "trainable params",
    "ms / step [p25-p75]",
    "x LoRA r=16 [p25-p75]",
    "peft / ours [p25-p75]",
    "x LoRA r=8 [p25-p75]",
    "reps",
)
MEMORY_HEADERS = (
    "config", "peak RSS growth MiB [min-max]", "x LoRA", "peak live tensors MiB [min-max]", "x LoRA",
    "runs (RSS / live)",
)  # fmt: skip


def step_rows(results: Sequence[StepResult]) -> list[list[str]]:
    return [
        [
            r.name,
            f"{r.params:,}",
            r.ms.format(1),
            r.vs_reference.format(3) if r.vs_reference and r.name != REFERENCE else "1 (reference)",
            r.peft_over_ours.format() if r.peft_over_ours else "",
            r.vs_same_rank_lora.format(3) if r.vs_same_rank_lora else "",
            str(r.repeats),
        ]
        for r in results
    ]


def memory_rows(results: Sequence[MemoryResult]) -> list[list[str]]:
    reference = next((r for r in results if r.name == REFERENCE), None)

    def cells(values: list[float], ref: list[float] | None) -> list[str]:
        median = statistics.median(values)
        ratio = f"{median / statistics.median(ref):.2f}" if ref and statistics.median(ref) > 0 else ""
        return [f"{median:.1f} [{min(values):.1f}-{max(values):.1f}]", ratio]

    return [
        [
            r.name,
            *cells(r.rss_mib, reference.rss_mib if reference else None),
            *cells(r.live_mib, reference.live_mib if reference else None),
            f"{len(r.rss_mib)} / {len(r.live_mib)}",
        ]
        for r in results
    ]


def profile_steps(shape: ModelShape, names: Sequence[str], row_limit: int = 20) -> None:
    """Print torch.profiler's top operators (by self CPU time) of a few steps of each named configuration."""
    from torch.profiler import ProfilerActivity, profile

    tokens = make_tokens(shape)
    for name in names:
        step = make_step(name, CONFIGS[name](base_model(shape)), tokens)
        step()
        step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                step()
        print(f"\n### {name}: 3 optimizer steps, {shape.description}\n")
        print("```")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=row_limit))
        print("```")


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall time, or this process's CPU time (less noisy on a shared machine)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default: 1)")
    parser.add_argument("--quick", action="store_true", help="a tiny model for a smoke test")
    parser.add_argument("--only", nargs="+", choices=list(CONFIGS), default=None, help="configurations to run")
    parser.add_argument("--budget-s", type=float, default=60.0, help="seconds of timing per group (default 60)")
    parser.add_argument("--repeats", type=int, default=15, help="most repetitions per group (default 15)")
    parser.add_argument("--min-repeats", type=int, default=5, help="fewest repetitions per group (default 5)")
    parser.add_argument("--memory-runs", type=int, default=3, help="fresh processes per configuration (default 3)")
    parser.add_argument("--memory-steps", type=int, default=3, help="training steps per memory run (default 3)")
    parser.add_argument("--live-runs", type=int, default=1, help="live-tensor runs per configuration (default 1)")
    parser.add_argument("--memory-kind", choices=("rss", "live"), default="rss", help="internal: with --memory-only")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-time", action="store_true")
    parser.add_argument("--memory-only", choices=list(CONFIGS), help="internal: one memory run, prints JSON")
    parser.add_argument("--profile", nargs="+", choices=list(CONFIGS), help="print profiler tables instead")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    set_clock(args.clock)
    shape = QUICK if args.quick else FULL
    if args.memory_only:
        print(json.dumps({"mib": measure_memory(args.memory_only, shape, args.memory_steps, args.memory_kind)}))
        return {}
    if args.profile:
        profile_steps(shape, args.profile)
        return {}
    names = list(args.only or CONFIGS)
    if REFERENCE not in names:
        names.append(REFERENCE)
    render = render_markdown if args.markdown else render_text
    print(f"# {environment_line()}")
    print(f"# {shape.description}; adapters on {', '.join(TARGETS)}; fp32; AdamW")
    out: dict[str, Any] = {}
    if not args.skip_time:
        budget = Budget(
            warmup=1 if args.quick else 2,
            min_sample_s=0.0,
            budget_s=1.0 if args.quick else args.budget_s,
            min_repeats=3 if args.quick else args.min_repeats,
            max_repeats=3 if args.quick else args.repeats,
        )
        steps = time_steps(shape, names, budget)
        print("\n" + render(STEP_HEADERS, step_rows(steps)))
        out["steps"] = [
            {"name": r.name, "params": r.params, "ms": r.ms.median, "vs_lora": r.vs_reference.median,
             "peft_over_ours": r.peft_over_ours.median if r.peft_over_ours else None, "repeats": r.repeats,
             "vs_lora_r8": r.vs_same_rank_lora.median if r.vs_same_rank_lora else None}
            for r in steps
        ]  # fmt: skip
    if not args.skip_memory:
        if args.quick:
            args.memory_runs = 1
        memory = memory_in_fresh_processes(names, args)
        print("\n" + render(MEMORY_HEADERS, memory_rows(memory)))
        out["memory"] = [{"name": r.name, "rss_mib": r.rss_mib, "live_mib": r.live_mib} for r in memory]
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
