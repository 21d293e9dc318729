"""Time a training step and an inference forward of orthogonal adapters against a frozen ``nn.Linear``.

What is measured
----------------
For every configuration ``(d, n)`` the script builds one frozen ``nn.Linear(d, d)`` (bias included,
``requires_grad=False`` on its parameters) and one input of shape ``(n, d)``, then wraps deep copies of
that frozen layer with each adapter variant:

* ``orthotune`` OFT / COFT / block-shared OFT (``orthotune.oft.Linear``) and BOFT (``orthotune.boft.Linear``);
* the same configurations in Hugging Face ``peft`` (``peft.tuners.oft.layer.Linear`` and
  ``peft.tuners.boft.layer.Linear``).

Two operations are timed:

* **step**   -- ``layer(x).sum().backward()`` with ``x.requires_grad=True``.  The input always requires
  grad, for the frozen baseline too, so that every variant does the same backward work through the base
  layer (grad with respect to the input) plus, for adapters, the grad with respect to the adapter
  parameters.  Gradients are reset with ``.grad = None`` before every step; no optimizer is involved.
* **infer**  -- ``layer(x)`` under ``torch.no_grad()`` with the module in ``eval()`` mode (adapter not
  merged).

How it is measured
------------------
All variants run in one process on the same input tensor.  Every callable is warmed up first, and the
number of calls per timing sample is calibrated so that a sample lasts at least ``--min-sample-ms``.
The ratio to the frozen layer is then taken pair by pair: in each repetition the frozen layer and the
variant are timed back to back (the order alternates between repetitions), the ratio of that pair is
recorded, and the table reports the median ratio with its 25th-75th percentile spread, next to the
median absolute time in milliseconds.  ``orthotune`` rows also show ``vs peft``: peft's median ratio
divided by orthotune's, i.e. how many times faster orthotune is on the same configuration.

peft BOFT with ``boft_n_butterfly_factor > 1``
----------------------------------------------
peft 0.21.2 silently resets the butterfly factor ``m`` to 1 when its CUDA extension ``fbd_cuda`` cannot
be built (always the case on CPU).  To time peft's real ``m > 1`` math, this script -- and only this
script, only while it runs -- patches ``peft.tuners.boft.layer``:

* ``get_fbd_cuda`` returns a truthy dummy while the layer is constructed, so ``update_layer`` keeps ``m``;
* ``FastBlockDiag`` is replaced by a plain-torch stand-in whose ``apply`` maps ``(N, D, H, H)`` blocks to
  ``(N, D*H, D*H)`` block-diagonal matrices with ``torch.block_diag`` (autograd flows through the torch
  ops; no custom ``Function``).

peft BOFT with ``m == 1`` is left unpatched and runs peft's own CPU fallback path.

Reproduce
---------
From the repository root::

    /work/venv/bin/python benchmarks/layer_step.py --threads 1 --markdown     # default sweep
    /work/venv/bin/python benchmarks/layer_step.py --quick                    # smoke test, a few seconds
    /work/venv/bin/python benchmarks/layer_step.py --only peft --d 1024 --n 512 2048

Default sweep (no ``--d`` / ``--n``): d=1024, n=512 with OFT b=32 (exact Cayley, Cayley-Neumann, COFT,
block_share) and BOFT (b=8, m=1), (b=8, m=2); plus d=2048, n=512 with BOFT (b=32, m=4).  Passing ``--d``
or ``--n`` runs every variant valid for each ``d`` on the grid ``d x n``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import itertools
import math
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

_SRC = Path(__file__).resolve().parents[1] / "src"
if _SRC.is_dir() and str(_SRC) not in sys.path:
    sys.path.insert(0, str(_SRC))

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


AdapterSpec = OFTSpec | BOFTSpec


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


def default_cases() -> list[Case]:
    small = (*oft_specs(32), BOFTSpec(8, 1), BOFTSpec(8, 2))
    return [Case(1024, 512, small), Case(2048, 512, (BOFTSpec(32, 4),))]


def quick_cases() -> list[Case]:
    return [Case(64, 16, (*oft_specs(8), BOFTSpec(4, 1), BOFTSpec(4, 2)))]


def grid_cases(ds: Sequence[int], ns: Sequence[int]) -> list[Case]:
    all_specs = (*oft_specs(32), BOFTSpec(8, 1), BOFTSpec(8, 2), BOFTSpec(32, 4))
    return [
        Case(d, n, tuple(spec for spec in all_specs if spec.is_valid_for(d)))
        for d, n in itertools.product(ds, ns)
    ]


# --------------------------------------------------------------------------------------------------
# Layer construction
# --------------------------------------------------------------------------------------------------


def make_frozen_linear(d: int, dtype: torch.dtype) -> nn.Linear:
    layer = nn.Linear(d, d, bias=True, dtype=dtype)
    layer.requires_grad_(False)
    return layer


def build_orthotune(spec: AdapterSpec, base: nn.Linear) -> nn.Module:
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


class _PlainBlockDiag:
    """Plain-torch stand-in for peft's CUDA-only ``FastBlockDiag``: (N, D, H, H) -> (N, D*H, D*H)."""

    apply = staticmethod(lambda blocks: torch.stack([torch.block_diag(*factor) for factor in blocks]))


@contextlib.contextmanager
def _peft_keeps_butterfly_factor() -> Iterator[None]:
    """While active, peft's BOFT believes ``fbd_cuda`` is available and so keeps ``m > 1``."""
    import peft.tuners.boft.layer as boft_layer

    original = boft_layer.get_fbd_cuda
    boft_layer.get_fbd_cuda = lambda: True
    boft_layer.FastBlockDiag = _PlainBlockDiag  # used at forward time; harmless for this process
    try:
        yield
    finally:
        boft_layer.get_fbd_cuda = original


def build_peft(spec: AdapterSpec, base: nn.Linear) -> nn.Module:
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
    patch = _peft_keeps_butterfly_factor() if spec.n_butterfly_factor > 1 else contextlib.nullcontext()
    with patch, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftBOFTLinear(base, "default", config=config)


BUILDERS: dict[str, Callable[[AdapterSpec, nn.Linear], nn.Module]] = {
    "orthotune": build_orthotune,
    "peft": build_peft,
}


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


def check_step_reaches_adapter(layer: nn.Module, x: torch.Tensor) -> None:
    """Raise if a training step leaves the input or any adapter parameter without a gradient."""
    params = trainable_parameters(layer)
    make_step(layer, x)()
    if x.grad is None:
        raise RuntimeError("training step produced no gradient for the input")
    missing = sum(p.grad is None for p in params)
    if missing:
        raise RuntimeError(f"{missing} of {len(params)} trainable parameters got no gradient")
    x.grad = None
    for p in params:
        p.grad = None


def seconds_per_call(fn: Callable[[], None], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def calibrate(fn: Callable[[], None], warmup: int, min_sample_s: float) -> int:
    """Warm ``fn`` up and return how many calls make one sample last at least ``min_sample_s``."""
    for _ in range(warmup):
        fn()
    per_call = seconds_per_call(fn, 1)
    return max(1, math.ceil(min_sample_s / max(per_call, 1e-9)))


@dataclass
class PairedTiming:
    """Per-repetition seconds of the frozen layer and a variant, timed back to back."""

    base_s: list[float] = field(default_factory=list)
    variant_s: list[float] = field(default_factory=list)

    @property
    def ratios(self) -> list[float]:
        return [v / b for v, b in zip(self.variant_s, self.base_s, strict=True)]


def time_pairs(
    base: Callable[[], None],
    variant: Callable[[], None],
    repeats: int,
    warmup: int,
    min_sample_s: float,
) -> PairedTiming:
    base_calls = calibrate(base, warmup, min_sample_s)
    variant_calls = calibrate(variant, warmup, min_sample_s)
    timing = PairedTiming()
    for rep in range(repeats):
        if rep % 2 == 0:
            b = seconds_per_call(base, base_calls)
            v = seconds_per_call(variant, variant_calls)
        else:
            v = seconds_per_call(variant, variant_calls)
            b = seconds_per_call(base, base_calls)
        timing.base_s.append(b)
        timing.variant_s.append(v)
    return timing


# --------------------------------------------------------------------------------------------------
# Statistics and results
# --------------------------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Linearly interpolated percentile, ``q`` in [0, 100]."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass(frozen=True)
class Summary:
    ms: float
    ratio: float
    ratio_p25: float
    ratio_p75: float

    @classmethod
    def of(cls, timing: PairedTiming) -> Summary:
        ratios = timing.ratios
        return cls(
            ms=1e3 * statistics.median(timing.variant_s),
            ratio=statistics.median(ratios),
            ratio_p25=percentile(ratios, 25),
            ratio_p75=percentile(ratios, 75),
        )


@dataclass
class Result:
    d: int
    n: int
    impl: str
    label: str
    n_params: int = 0
    step: Summary | None = None
    infer: Summary | None = None
    error: str | None = None
    vs_peft: float | None = None


# --------------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunSettings:
    dtype: torch.dtype
    repeats: int
    warmup: int
    min_sample_s: float
    only: tuple[str, ...]


def selected(name: str, only: Sequence[str]) -> bool:
    return not only or any(token.lower() in name.lower() for token in only)


def measure(
    layer: nn.Module, frozen: nn.Linear, x: torch.Tensor, settings: RunSettings
) -> tuple[Summary, Summary]:
    x_infer = x.detach()
    layer.train()
    frozen.train()
    step = time_pairs(
        make_step(frozen, x), make_step(layer, x), settings.repeats, settings.warmup, settings.min_sample_s
    )
    layer.eval()
    frozen.eval()
    infer = time_pairs(
        make_infer(frozen, x_infer),
        make_infer(layer, x_infer),
        settings.repeats,
        settings.warmup,
        settings.min_sample_s,
    )
    return Summary.of(step), Summary.of(infer)


def run_variant(
    impl: str, spec: AdapterSpec, frozen: nn.Linear, x: torch.Tensor, settings: RunSettings
) -> Result:
    d, n = x.shape[-1], x.shape[0]
    result = Result(d, n, impl, spec.label)
    try:
        layer = BUILDERS[impl](spec, copy.deepcopy(frozen))
        perturb_adapter(layer)
        result.n_params = sum(p.numel() for p in trainable_parameters(layer))
        check_step_reaches_adapter(layer, x)
        result.step, result.infer = measure(layer, frozen, x, settings)
    except ImportError as exc:
        result.error = f"not importable ({exc.name or exc})"
    except Exception as exc:  # report and move on: one broken variant must not hide the others
        result.error = f"{type(exc).__name__}: {exc}".splitlines()[0][:120]
    return result


def run_frozen(frozen: nn.Linear, x: torch.Tensor, settings: RunSettings) -> Result:
    """The frozen layer paired with an identical copy of itself: the noise floor of the method."""
    d, n = x.shape[-1], x.shape[0]
    result = Result(d, n, "frozen", f"nn.Linear({d}, {d})")
    result.step, result.infer = measure(copy.deepcopy(frozen), frozen, x, settings)
    return result


def run_case(case: Case, settings: RunSettings) -> list[Result]:
    frozen = make_frozen_linear(case.d, settings.dtype)
    x = torch.randn(case.n, case.d, dtype=settings.dtype, requires_grad=True)
    results: list[Result] = []
    if selected("frozen", settings.only):
        results.append(report_progress(run_frozen(frozen, x, settings)))
    for spec in case.specs:
        for impl in IMPLS:
            if selected(f"{impl} {spec.label}", settings.only):
                results.append(report_progress(run_variant(impl, spec, frozen, x, settings)))
    attach_speedups(results)
    return results


def attach_speedups(results: list[Result]) -> None:
    """For orthotune rows, ``vs peft`` = peft step ratio / orthotune step ratio (same d, n, config)."""
    peft_ratio = {(r.d, r.n, r.label): r.step.ratio for r in results if r.impl == "peft" and r.step}
    for r in results:
        key = (r.d, r.n, r.label)
        if r.impl == "orthotune" and r.step and key in peft_ratio:
            r.vs_peft = peft_ratio[key] / r.step.ratio


def report_progress(result: Result) -> Result:
    status = result.error or f"step {result.step.ratio:.2f}x, infer {result.infer.ratio:.2f}x"
    print(f"  d={result.d} n={result.n} {result.impl:9s} {result.label:28s} {status}", file=sys.stderr, flush=True)
    return result


# --------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------

HEADERS = (
    "d", "n", "impl", "variant", "params",
    "step ms", "step x frozen [p25-p75]",
    "infer ms", "infer x frozen [p25-p75]",
    "vs peft",
)  # fmt: skip


def format_summary(summary: Summary | None) -> tuple[str, str]:
    if summary is None:
        return "-", "-"
    return f"{summary.ms:.2f}", f"{summary.ratio:.2f} [{summary.ratio_p25:.2f}-{summary.ratio_p75:.2f}]"


def table_rows(results: Sequence[Result]) -> list[list[str]]:
    rows = []
    for r in results:
        step_ms, step_ratio = format_summary(r.step)
        infer_ms, infer_ratio = format_summary(r.infer)
        if r.error:
            step_ratio = f"error: {r.error}"
        vs_peft = f"{r.vs_peft:.1f}x" if r.vs_peft is not None else ""
        params = str(r.n_params) if r.impl != "frozen" else "0"
        rows.append([str(r.d), str(r.n), r.impl, r.label, params, step_ms, step_ratio, infer_ms, infer_ratio, vs_peft])
    return rows


def render_markdown(rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "|".join("---" for _ in HEADERS) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def render_text(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(HEADERS)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*HEADERS), fmt.format(*("-" * w for w in widths))]
    return "\n".join(lines + [fmt.format(*row) for row in rows])


def print_environment(args: argparse.Namespace) -> None:
    versions = [f"torch {torch.__version__}"]
    for name in ("peft", "orthotune"):
        try:
            module = importlib.import_module(name)
            versions.append(f"{name} {getattr(module, '__version__', '?')}")
        except Exception as exc:
            versions.append(f"{name} unavailable ({type(exc).__name__})")
    print(f"# threads: {torch.get_num_threads()} | dtype: {args.dtype} | repeats: {args.repeats}")
    print(f"# {', '.join(versions)} | python {platform.python_version()} | {platform.machine()}")
    print("# 'x frozen' = median over repetitions of (variant time / frozen nn.Linear time), timed pair by pair")


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default: 1)")
    parser.add_argument("--repeats", type=int, default=None, help="paired repetitions (default: 11; 3 with --quick)")
    parser.add_argument("--d", type=int, nargs="+", default=None, help="feature sizes (grid with --n)")
    parser.add_argument("--n", type=int, nargs="+", default=None, help="token counts (grid with --d)")
    parser.add_argument("--quick", action="store_true", help="tiny configuration for a smoke test")
    parser.add_argument("--only", nargs="+", default=(), help="keep variants whose name contains any substring")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    parser.add_argument("--warmup", type=int, default=3, help="warm-up calls per callable (default: 3)")
    parser.add_argument("--min-sample-ms", type=float, default=None, help="minimum duration of one timing sample")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def choose_cases(args: argparse.Namespace) -> list[Case]:
    if args.quick and args.d is None and args.n is None:
        return quick_cases()
    if args.d is None and args.n is None:
        return default_cases()
    return grid_cases(args.d or [1024], args.n or [512])


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.repeats is None:
        args.repeats = 3 if args.quick else 11
    min_sample_ms = args.min_sample_ms if args.min_sample_ms is not None else (1.0 if args.quick else 100.0)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    print_environment(args)
    settings = RunSettings(
        dtype=DTYPES[args.dtype],
        repeats=args.repeats,
        warmup=1 if args.quick else args.warmup,
        min_sample_s=min_sample_ms / 1e3,
        only=tuple(args.only),
    )
    results = [r for case in choose_cases(args) for r in run_case(case, settings)]
    rows = table_rows(results)
    if not rows:
        print("no variant matched --only")
        return
    print(render_markdown(rows) if args.markdown else render_text(rows))


if __name__ == "__main__":
    main()
