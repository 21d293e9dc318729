"""Time a training step and an inference forward of orthogonal adapters against a frozen ``nn.Linear``.

What is measured
----------------
For every configuration ``(d, n, dtype)`` the script builds one frozen ``nn.Linear(d, d)`` (bias included,
``requires_grad=False`` on its parameters) and one input of shape ``(n, d)``, then wraps deep copies of
that frozen layer with each adapter variant:

* ``orthotune`` OFT / COFT / block-shared OFT (``orthotune.oft.Linear``), BOFT (``orthotune.boft.Linear``) and
  HRA (``orthotune.hra.Linear``);
* the same configurations in Hugging Face ``peft`` (``peft.tuners.oft.layer.Linear``,
  ``peft.tuners.boft.layer.Linear`` and ``peft.tuners.hra.layer.HRALinear``);
* for HRA, also peft's LoRA of the same rank (``peft.tuners.lora.layer.Linear``, ``lora_alpha = r``, no
  dropout), the cost HRA's low-rank products are held to: ``ours / LoRA`` is the per-repetition ratio of
  orthotune's HRA step to LoRA's.

Two operations are timed:

* **step**   -- ``layer(x).sum().backward()`` with ``x.requires_grad=True``.  The input always requires
  grad, for the frozen baseline too, so that every variant does the same backward work through the base
  layer (grad with respect to the input) plus, for adapters, the grad with respect to the adapter
  parameters.  Gradients are reset with ``.grad = None`` before every step; no optimizer is involved.
* **infer**  -- ``layer(x)`` under ``torch.no_grad()`` with the module in ``eval()`` mode (adapter not
  merged).

How it is measured
------------------
All variants run in one process on the same input tensor.  For one adapter configuration the frozen
layer, the orthotune layer and the peft layer form a group: in every repetition each member is timed once,
back to back, in an order that rotates between repetitions (``_timing.time_group``).  Ratios are taken
inside a repetition -- ``variant / frozen`` and ``peft / orthotune`` -- and the table gives the median of
those per-repetition ratios with the 25th-75th percentile spread, next to the median time in milliseconds.
Every callable is warmed up first; a timing sample lasts at least ``--min-sample-ms`` (several calls of a
fast callable).  The number of repetitions fits ``--budget-s`` seconds per group and operation, clamped
to ``[--min-repeats, --repeats]``; big configurations therefore get fewer repetitions (the ``reps``
column says how many).  A variant whose first training step takes longer than ``--cap-s`` seconds is not
timed; its row says so and gives that one step's duration.  The ``frozen`` row pairs the frozen layer with
an identical copy of itself: the noise floor of the method.

peft BOFT with ``boft_n_butterfly_factor > 1`` runs peft's own code with its block-diagonal step in plain
torch (``_peft_boft_cpu``: peft's CUDA extension cannot be built here); with ``m == 1`` peft's own CPU path
runs unpatched.

Reproduce
---------
From the repository root::

    /work/venv/bin/python benchmarks/layer_step.py --threads 1 --markdown          # the goal configurations
    /work/venv/bin/python benchmarks/layer_step.py --threads 1 --markdown --grid --dtype fp32   # issue grid
    /work/venv/bin/python benchmarks/layer_step.py --quick                         # smoke test, a few seconds
    /work/venv/bin/python benchmarks/layer_step.py --d 1024 --n 512 --only "OFT b=32 exact" --profile

Default sweep (no ``--grid`` / ``--d`` / ``--n``): the goal configurations, d=1024 and d=4096 at n=512
with OFT b=32 (exact Cayley, Cayley-Neumann, COFT, block_share) at d=1024, OFT b=32 exact at d=4096,
BOFT (b=8, m=1), (b=8, m=2) at d=1024, and HRA r=8 (with LoRA r=8) at both; plus d=2048, n=512 with BOFT
(b=32, m=4).  ``--grid``: d in {1024, 2048, 4096} x n in {512, 2048}, OFT b in {32, 64} (exact, Neumann,
COFT, block_share), BOFT b in {8, 32} x m in {1, 2, 4}, HRA r=8.  ``--d`` / ``--n`` alone run the same
variants on the grid ``d x n``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import itertools
import json
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

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
    calls_per_sample,
    environment_line,
    paired_ratios,
    render_markdown,
    render_text,
    seconds_per_call,
    set_clock,
    timed_group,
    warm_up,
)

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}
IMPLS: tuple[str, ...] = ("orthotune", "peft")


# --------------------------------------------------------------------------------------------------
# Adapter specifications
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OFTSpec:
    """One OFT configuration, given by its block size (``r`` is inferred: ``r = d // block_size``)."""

    block_size: int
    use_cayley_neumann: bool = False
    coft: bool = False
    block_share: bool = False

    @property
    def label(self) -> str:
        kind = "COFT" if self.coft else "OFT"
        extras = [f"b={self.block_size}"]
        extras.append("neumann" if self.use_cayley_neumann else "exact")
        if self.block_share:
            extras.append("block_share")
        return f"{kind} {' '.join(extras)}"

    def is_valid_for(self, d: int) -> bool:
        return self.block_size <= d and d % self.block_size == 0


@dataclass(frozen=True)
class BOFTSpec:
    """One BOFT configuration: block size ``b`` and butterfly factor ``m``."""

    block_size: int
    n_butterfly_factor: int

    @property
    def label(self) -> str:
        return f"BOFT b={self.block_size} m={self.n_butterfly_factor}"

    def is_valid_for(self, d: int) -> bool:
        span = self.block_size * 2 ** (self.n_butterfly_factor - 1)
        if span > d or d % span != 0:
            return False
        block_num = d // self.block_size
        return self.n_butterfly_factor == 1 or (block_num % 2 == 0 and self.block_size % 2 == 0)


@dataclass(frozen=True)
class HRASpec:
    """One HRA configuration: ``r`` Householder reflections; timed next to a peft LoRA of the same rank."""

    r: int
    apply_gs: bool = False

    @property
    def label(self) -> str:
        return f"HRA r={self.r}" + (" GS" if self.apply_gs else "")

    @property
    def lora_label(self) -> str:
        return f"LoRA r={self.r}"

    def is_valid_for(self, d: int) -> bool:
        return self.r <= d


AdapterSpec = OFTSpec | BOFTSpec | HRASpec


def oft_specs(block_size: int) -> list[OFTSpec]:
    return [
        OFTSpec(block_size),
        OFTSpec(block_size, use_cayley_neumann=True),
        OFTSpec(block_size, coft=True),
        OFTSpec(block_size, block_share=True),
    ]


@dataclass(frozen=True)
class Case:
    d: int
    n: int
    specs: tuple[AdapterSpec, ...]


GRID_D = (1024, 2048, 4096)
GRID_N = (512, 2048)
GRID_SPECS: tuple[AdapterSpec, ...] = (
    *oft_specs(32),
    *oft_specs(64),
    *(BOFTSpec(b, m) for b, m in itertools.product((8, 32), (1, 2, 4))),
    HRASpec(8),
)


def default_cases() -> list[Case]:
    small = (*oft_specs(32), BOFTSpec(8, 1), BOFTSpec(8, 2), HRASpec(8))
    return [
        Case(1024, 512, small),
        Case(2048, 512, (BOFTSpec(32, 4),)),
        Case(4096, 512, (OFTSpec(32), HRASpec(8))),
    ]


def quick_cases() -> list[Case]:
    return [Case(64, 16, (*oft_specs(8), BOFTSpec(4, 1), BOFTSpec(4, 2), HRASpec(4)))]


def grid_cases(ds: Sequence[int], ns: Sequence[int], specs: Sequence[AdapterSpec] = GRID_SPECS) -> list[Case]:
    return [Case(d, n, tuple(spec for spec in specs if spec.is_valid_for(d))) for d, n in itertools.product(ds, ns)]


# --------------------------------------------------------------------------------------------------
# Layer construction
# --------------------------------------------------------------------------------------------------


def make_frozen_linear(d: int, dtype: torch.dtype) -> nn.Linear:
    layer = nn.Linear(d, d, bias=True, dtype=dtype)
    layer.requires_grad_(False)
    return layer


def build_orthotune(spec: AdapterSpec, base: nn.Linear) -> nn.Module:
    if isinstance(spec, HRASpec):
        from orthotune.hra import Linear as HRALinear

        return HRALinear(base, adapter_name="default", r=spec.r, apply_GS=spec.apply_gs, init_weights=False)
    if isinstance(spec, OFTSpec):
        from orthotune.oft import Linear as OFTLinear

        return OFTLinear(
            base,
            adapter_name="default",
            r=0,
            oft_block_size=spec.block_size,
            use_cayley_neumann=spec.use_cayley_neumann,
            coft=spec.coft,
            block_share=spec.block_share,
        )
    from orthotune.boft import Linear as BOFTLinear

    return BOFTLinear(
        base,
        adapter_name="default",
        boft_block_size=spec.block_size,
        boft_block_num=0,
        boft_n_butterfly_factor=spec.n_butterfly_factor,
        boft_dropout=0.0,
    )


def build_peft(spec: AdapterSpec, base: nn.Linear) -> nn.Module:
    if isinstance(spec, HRASpec):
        from peft import HRAConfig
        from peft.tuners.hra.layer import HRALinear as PeftHRALinear

        config = HRAConfig(r=spec.r, apply_GS=spec.apply_gs, init_weights=False, target_modules=["x"])
        return PeftHRALinear(base, "default", config=config, r=spec.r)
    if isinstance(spec, OFTSpec):
        from peft import OFTConfig
        from peft.tuners.oft.layer import Linear as PeftOFTLinear

        config = OFTConfig(
            r=0,
            oft_block_size=spec.block_size,
            use_cayley_neumann=spec.use_cayley_neumann,
            coft=spec.coft,
            block_share=spec.block_share,
            target_modules=["x"],
        )
        return PeftOFTLinear(base, "default", config=config, r=0)

    from peft import BOFTConfig
    from peft.tuners.boft.layer import Linear as PeftBOFTLinear

    config = BOFTConfig(
        boft_block_size=spec.block_size,
        boft_n_butterfly_factor=spec.n_butterfly_factor,
        boft_dropout=0.0,
        target_modules=["x"],
    )
    patch = peft_keeps_butterfly_factor() if spec.n_butterfly_factor > 1 else contextlib.nullcontext()
    with patch, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftBOFTLinear(base, "default", config=config)


def build_peft_lora(spec: AdapterSpec, base: nn.Linear) -> nn.Module:
    """peft LoRA of HRA's rank: the cost HRA's two thin products per direction are measured against."""
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear as PeftLoraLinear

    assert isinstance(spec, HRASpec)
    config = LoraConfig(r=spec.r, lora_alpha=spec.r, lora_dropout=0.0, target_modules=["x"])
    return PeftLoraLinear(base, "default", config=config, r=spec.r, lora_alpha=spec.r)


BUILDERS: dict[str, Callable[[AdapterSpec, nn.Linear], nn.Module]] = {
    "orthotune": build_orthotune,
    "peft": build_peft,
    "lora": build_peft_lora,
}


def impls_for(spec: AdapterSpec) -> tuple[str, ...]:
    """The implementations timed together for ``spec``: HRA adds a peft LoRA of the same rank."""
    return (*IMPLS, "lora") if isinstance(spec, HRASpec) else IMPLS


def variant_name(impl: str, spec: AdapterSpec) -> str:
    """What ``--only`` matches and the profiler prints: ``"peft LoRA r=8 (HRA r=8)"`` for the LoRA reference."""
    if impl == "lora":
        assert isinstance(spec, HRASpec)
        return f"peft {spec.lora_label} ({spec.label})"
    return f"{impl} {spec.label}"


def trainable_parameters(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def perturb_adapter(module: nn.Module, scale: float = 1e-2) -> None:
    """Move the adapter away from its identity initialisation so the timed math is not a special case."""
    with torch.no_grad():
        for p in trainable_parameters(module):
            p.add_(torch.randn_like(p), alpha=scale)


# --------------------------------------------------------------------------------------------------
# Timed callables
# --------------------------------------------------------------------------------------------------


def make_step(layer: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    """Training step: forward + backward of ``out.sum()``; grads reset to ``None`` before each call."""
    params = trainable_parameters(layer)

    def step() -> None:
        x.grad = None
        for p in params:
            p.grad = None
        layer(x).sum().backward()

    return step


def make_infer(layer: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def infer() -> None:
        with torch.no_grad():
            layer(x)

    return infer


def check_step_reaches_adapter(layer: nn.Module, x: torch.Tensor) -> float:
    """Run one training step; raise if it leaves the input or an adapter parameter without a gradient.

    Returns:
        The step's duration in seconds (a first, cold call).
    """
    params = trainable_parameters(layer)
    seconds = seconds_per_call(make_step(layer, x))
    if x.grad is None:
        raise RuntimeError("training step produced no gradient for the input")
    missing = sum(p.grad is None for p in params)
    if missing:
        raise RuntimeError(f"{missing} of {len(params)} trainable parameters got no gradient")
    x.grad = None
    for p in params:
        p.grad = None
    return seconds


# --------------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunSettings:
    dtype: torch.dtype
    budget: Budget
    cap_s: float
    only: tuple[str, ...]
    # (impl, label) -> (d, n, seconds) of the first case where one step went over ``cap_s``; a case at
    # least as large in d and n is then skipped without paying for another over-long first step.
    over_cap: dict[tuple[str, str], tuple[int, int, float]] = field(default_factory=dict)


@dataclass
class OpSummary:
    """One operation (step or infer) of one variant: its time and its ratio to the frozen layer."""

    ms: Spread
    ratio: Spread


@dataclass
class Result:
    d: int
    n: int
    dtype: str
    impl: str
    label: str
    n_params: int = 0
    step: OpSummary | None = None
    infer: OpSummary | None = None
    peft_over_ours: Spread | None = None  # per-repetition peft step time / orthotune step time
    ours_over_lora: Spread | None = None  # HRA: per-repetition orthotune step time / peft LoRA step time
    repeats: int = 0
    note: str | None = None


def selected(name: str, only: Sequence[str]) -> bool:
    return not only or any(token.lower() in name.lower() for token in only)


def summarize(times: dict[str, list[float]], name: str, base: str = "frozen") -> OpSummary:
    return OpSummary(
        ms=Spread.of([1e3 * t for t in times[name]]), ratio=Spread.of(paired_ratios(times[name], times[base]))
    )


def run_spec(spec: AdapterSpec, frozen: nn.Linear, x: torch.Tensor, settings: RunSettings) -> list[Result]:
    """Time orthotune and peft on one adapter configuration, grouped with the frozen layer."""
    d, n = x.shape[-1], x.shape[0]
    dtype = next(k for k, v in DTYPES.items() if v == x.dtype)
    results: dict[str, Result] = {}
    layers: dict[str, nn.Module] = {}
    for impl in impls_for(spec):
        if not selected(variant_name(impl, spec), settings.only):
            continue
        if impl == "lora":
            assert isinstance(spec, HRASpec)
            result = results[impl] = Result(d, n, dtype, "peft", spec.lora_label)
        else:
            result = results[impl] = Result(d, n, dtype, impl, spec.label)
        over = settings.over_cap.get((impl, spec.label))
        if over and d >= over[0] and n >= over[1]:
            result.note = (
                f"not timed: one step took {over[2]:.1f} s > --cap-s {settings.cap_s:g} already at "
                f"d={over[0]} n={over[1]}"
            )
            continue
        try:
            layer = BUILDERS[impl](spec, copy.deepcopy(frozen))
            perturb_adapter(layer)
            result.n_params = sum(p.numel() for p in trainable_parameters(layer))
            layer.train()
            first_step_s = check_step_reaches_adapter(layer, x)
        except ImportError as exc:
            result.note = f"not importable ({exc.name or exc})"
            continue
        except Exception as exc:  # report and move on: one broken variant must not hide the others
            result.note = f"error: {type(exc).__name__}: {exc}".splitlines()[0][:120]
            continue
        if first_step_s > settings.cap_s:
            settings.over_cap[(impl, spec.label)] = (d, n, first_step_s)
            result.note = f"not timed: one step took {first_step_s:.1f} s > --cap-s {settings.cap_s:g}"
            continue
        layers[impl] = layer
    if layers:
        frozen.train()
        steps = timed_group(
            {"frozen": make_step(frozen, x), **{impl: make_step(layer, x) for impl, layer in layers.items()}},
            settings.budget,
        )
        frozen.eval()
        for layer in layers.values():
            layer.eval()
        x_infer = x.detach()
        infers = timed_group(
            {"frozen": make_infer(frozen, x_infer), **{i: make_infer(layer, x_infer) for i, layer in layers.items()}},
            settings.budget,
        )
        for impl in layers:
            result = results[impl]
            result.step, result.infer = summarize(steps, impl), summarize(infers, impl)
            result.repeats = len(steps[impl])
        if "orthotune" in layers and "peft" in layers:
            results["orthotune"].peft_over_ours = Spread.of(paired_ratios(steps["peft"], steps["orthotune"]))
        if "orthotune" in layers and "lora" in layers:
            results["orthotune"].ours_over_lora = Spread.of(paired_ratios(steps["orthotune"], steps["lora"]))
    for result in results.values():
        report_progress(result)
    return list(results.values())


def run_frozen(frozen: nn.Linear, x: torch.Tensor, settings: RunSettings) -> Result:
    """The frozen layer grouped with an identical copy of itself: the noise floor of the method."""
    d, n = x.shape[-1], x.shape[0]
    dtype = next(k for k, v in DTYPES.items() if v == x.dtype)
    result = Result(d, n, dtype, "frozen", f"nn.Linear({d}, {d})")
    twin = copy.deepcopy(frozen)
    steps = timed_group({"frozen": make_step(frozen, x), "twin": make_step(twin, x)}, settings.budget)
    x_infer = x.detach()
    infers = timed_group({"frozen": make_infer(frozen, x_infer), "twin": make_infer(twin, x_infer)}, settings.budget)
    result.step, result.infer = summarize(steps, "twin"), summarize(infers, "twin")
    result.repeats = len(steps["twin"])
    return report_progress(result)


def run_case(case: Case, settings: RunSettings) -> list[Result]:
    frozen = make_frozen_linear(case.d, settings.dtype)
    x = torch.randn(case.n, case.d, dtype=settings.dtype, requires_grad=True)
    results: list[Result] = []
    if selected("frozen", settings.only):
        results.append(run_frozen(frozen, x, settings))
    for spec in case.specs:
        results += run_spec(spec, frozen, x, settings)
    return results


def report_progress(result: Result) -> Result:
    if result.step and result.infer:
        status = f"step {result.step.ratio.median:.2f}x, infer {result.infer.ratio.median:.2f}x ({result.repeats} reps)"
    else:
        status = result.note or "-"
    print(
        f"  [{time.strftime('%H:%M:%S')}] d={result.d} n={result.n} {result.dtype} {result.impl:9s} "
        f"{result.label:28s} {status}",
        file=sys.stderr,
        flush=True,
    )
    return result


def profile_case(case: Case, settings: RunSettings, row_limit: int) -> None:
    """Print torch.profiler's top operators of the training step of every selected variant."""
    from torch.profiler import ProfilerActivity, profile

    frozen = make_frozen_linear(case.d, settings.dtype)
    x = torch.randn(case.n, case.d, dtype=settings.dtype, requires_grad=True)
    layers = {"frozen": frozen}
    for spec in case.specs:
        for impl in impls_for(spec):
            if selected(variant_name(impl, spec), settings.only):
                layers[variant_name(impl, spec)] = BUILDERS[impl](spec, copy.deepcopy(frozen))
    for name, layer in layers.items():
        layer.train()
        step = make_step(layer, x)
        calls = calls_per_sample(warm_up(step, settings.budget.warmup), 1.0)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(calls):
                step()
        print(f"\n### {name}: training step, d={case.d} n={case.n} {settings.dtype}, {calls} steps profiled\n")
        print("```")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=row_limit))
        print("```")


# --------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------

HEADERS = (
    "d", "n", "dtype", "impl", "variant", "params",
    "step ms", "step x frozen [p25-p75]",
    "infer ms", "infer x frozen [p25-p75]",
    "peft / ours (step) [p25-p75]", "ours / LoRA (step) [p25-p75]", "reps",
)  # fmt: skip


def table_rows(results: Sequence[Result]) -> list[list[str]]:
    rows = []
    for r in results:
        if r.step and r.infer:
            cells = [
                f"{r.step.ms.median:.2f}",
                r.step.ratio.format(),
                f"{r.infer.ms.median:.2f}",
                r.infer.ratio.format(),
            ]
        else:
            cells = ["-", r.note or "-", "-", "-"]
        speedup = r.peft_over_ours.format() if r.peft_over_ours else ""
        over_lora = r.ours_over_lora.format() if r.ours_over_lora else ""
        params = str(r.n_params) if r.n_params or r.impl == "frozen" else "-"
        rows.append([str(r.d), str(r.n), r.dtype, r.impl, r.label, params, *cells, speedup, over_lora, str(r.repeats)])
    return rows


def summary_table(results: Sequence[Result], dtype: str) -> tuple[list[str], list[list[str]]]:
    """Step ratios to the frozen layer, one row per variant and one column per ``(d, n)``: "ours / peft"."""
    cases = sorted({(r.d, r.n) for r in results if r.dtype == dtype})
    labels = list(dict.fromkeys(r.label for r in results if r.dtype == dtype and r.impl != "frozen"))
    by_key = {(r.impl, r.label, r.d, r.n): r for r in results if r.dtype == dtype}

    def cell(impl: str, label: str, d: int, n: int) -> str:
        r = by_key.get((impl, label, d, n))
        if r is None:
            return "n/a"
        if r.step is None:
            return "skipped" if r.note and r.note.startswith("not timed") else "error"
        return f"{r.step.ratio.median:.2f}"

    headers = ["step x frozen: orthotune / peft", *(f"d={d} n={n}" for d, n in cases)]
    rows = [
        [label, *(f"{cell('orthotune', label, d, n)} / {cell('peft', label, d, n)}" for d, n in cases)]
        for label in labels
    ]
    return headers, rows


def result_from_dict(row: dict) -> Result:
    """Inverse of ``dataclasses.asdict`` for :class:`Result` (to re-render a ``--json`` file)."""

    def spread(value: dict | None) -> Spread | None:
        return Spread(**value) if value else None

    def op(value: dict | None) -> OpSummary | None:
        return OpSummary(ms=spread(value["ms"]), ratio=spread(value["ratio"])) if value else None

    return Result(**{**row, "step": op(row["step"]), "infer": op(row["infer"]),
                     "peft_over_ours": spread(row["peft_over_ours"]),
                     "ours_over_lora": spread(row.get("ours_over_lora"))})  # fmt: skip


def print_tables(results: Sequence[Result], markdown: bool) -> None:
    render = render_markdown if markdown else render_text
    print(render(HEADERS, table_rows(results)))
    for dtype in dict.fromkeys(r.dtype for r in results):
        if len({(r.d, r.n) for r in results if r.dtype == dtype}) > 1:
            print(f"\nSummary, {dtype}: median step time / frozen nn.Linear step time, orthotune / peft\n")
            print(render(*summary_table(results, dtype)))


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
    parser.add_argument("--grid", action="store_true", help="the full grid of issue 7 (see the module docstring)")
    parser.add_argument("--d", type=int, nargs="+", default=None, help="feature sizes (grid with --n)")
    parser.add_argument("--n", type=int, nargs="+", default=None, help="token counts (grid with --d)")
    parser.add_argument("--quick", action="store_true", help="tiny configuration for a smoke test")
    parser.add_argument("--only", nargs="+", default=(), help="keep variants whose name contains any substring")
    parser.add_argument("--dtype", choices=sorted(DTYPES), nargs="+", default=["fp32"])
    parser.add_argument("--repeats", type=int, default=None, help="most repetitions per group (default: 11)")
    parser.add_argument("--min-repeats", type=int, default=3, help="fewest repetitions per group (default: 3)")
    parser.add_argument("--budget-s", type=float, default=None, help="seconds per group and operation (default 5)")
    parser.add_argument("--cap-s", type=float, default=10.0, help="skip a variant whose first step takes longer")
    parser.add_argument("--warmup", type=int, default=3, help="warm-up calls per callable (default: 3)")
    parser.add_argument("--min-sample-ms", type=float, default=None, help="minimum duration of one timing sample")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    parser.add_argument("--profile", action="store_true", help="print torch.profiler tables instead of timing")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--from-json", type=Path, default=None, help="re-print the tables of a --json file; no run")
    return parser.parse_args(argv)


def choose_cases(args: argparse.Namespace) -> list[Case]:
    if args.quick and not args.grid and args.d is None and args.n is None:
        return quick_cases()
    if args.grid or args.d is not None or args.n is not None:
        return grid_cases(args.d or GRID_D, args.n or GRID_N)
    return default_cases()


def main(argv: Sequence[str] | None = None) -> list[Result]:
    args = parse_args(argv)
    if args.from_json:
        results = [result_from_dict(row) for row in json.loads(args.from_json.read_text())]
        print_tables(results, args.markdown)
        return results
    torch.set_num_threads(args.threads)
    set_clock(args.clock)
    torch.manual_seed(args.seed)
    quick = args.quick
    print(f"# {environment_line()}")
    print(
        "# 'x frozen' and 'peft / ours' = median [25th-75th percentile] over repetitions of per-repetition ratios; "
        "frozen, orthotune and peft timed back to back in rotating order"
    )
    results: list[Result] = []
    for dtype_name in args.dtype:
        budget = Budget(
            warmup=1 if quick else args.warmup,
            min_sample_s=(args.min_sample_ms or (1.0 if quick else 50.0)) / 1e3,
            budget_s=args.budget_s or (0.5 if quick else 5.0),
            min_repeats=min(args.min_repeats, args.repeats or args.min_repeats),
            max_repeats=args.repeats or (3 if quick else 11),
        )
        settings = RunSettings(dtype=DTYPES[dtype_name], budget=budget, cap_s=args.cap_s, only=tuple(args.only))
        for case in choose_cases(args):
            if args.profile:
                profile_case(case, settings, row_limit=15)
            else:
                results += run_case(case, settings)
    if args.profile:
        return results
    if not results:
        print("no variant matched --only")
        return results
    print_tables(results, args.markdown)
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=1))
    return results


if __name__ == "__main__":
    main()
