"""One CUDA GPU, a few minutes: layer training steps at Llama-8B shapes and a small-Llama model step, in bf16.

What is measured
----------------
**Layers.** A frozen ``nn.Linear`` of Llama-3-8B's shapes, ``4096 → 4096`` (attention projections) and
``4096 → 14336`` (``gate_proj``/``up_proj``), bf16 weights, on ``n = 8192`` tokens of bf16 activations that
require grad; one training step is ``layer(x).sum().backward()`` (gradients reset to ``None`` first). Variants:

* ``frozen``: the bare layer (the reference of every ratio);
* orthotune ``OFT b=32`` (exact Cayley and Cayley-Neumann), ``BOFT b=8 m=2``, ``HRA r=8`` (when
  ``orthotune.hra`` exists);
* peft 0.21.2's ``OFT b=32`` (both modes), ``BOFT b=8 m=2``, ``HRA r=8`` and ``LoRA r=16`` (alpha 32).

peft's BOFT runs its own code with the block-diagonal step in plain torch (``_peft_boft_cpu``): its CUDA
extension is compiled on first use, which would take minutes of the budget (``--peft-boft-extension`` lets it).

**Model.** ``model_step.py``'s small Llama (hidden 512, 4 layers, batch 4 x 256 tokens), bf16 weights, adapters
on all seven projections, one AdamW step; orthotune OFT b=32 / BOFT b=8 m=2 (/ HRA r=8), the same in peft,
peft LoRA r=16 (the reference).

**Timing.** CUDA events around each sample (enough steps for ≥ 20 ms), after warm-up; the members of a group
(one shape, or the model) are timed once per repetition in rotating order, and ratios are medians of
per-repetition ratios with their 25th-75th percentiles. **Memory**: for each variant alone,
``torch.cuda.max_memory_allocated()`` over wrapping and three steps, minus what was allocated before (the
frozen layer or model, and the input): what the adapter adds, activations for backward included.

A global deadline (``--budget-s``, default 420 s) keeps the run within 8 minutes: variants left when it is
reached are listed as skipped. ``--quick`` runs tiny shapes, in fp32 if there is no GPU (the smoke test).

Reproduce::

    python benchmarks/gpu.py --output gpu-results          # gpu-results/gpu.md and gpu-results/gpu.json
    python benchmarks/gpu.py --quick --output /tmp/gpu      # anywhere, seconds
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import importlib.util
import json
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

_HERE = Path(__file__).resolve().parent
for _path in (_HERE.parent / "src", _HERE):
    if _path.is_dir() and str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from _peft_boft_cpu import peft_keeps_butterfly_factor  # noqa: E402
from _timing import Spread, environment_line, paired_ratios, render_markdown  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
HAS_ORTHOTUNE_HRA = importlib.util.find_spec("orthotune.hra") is not None


# --------------------------------------------------------------------------------------------------- timing
class Clock:
    """Seconds per call: CUDA events on a GPU (device time, no host sync inside the sample), else wall time."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def per_call(self, fn: Callable[[], object], calls: int) -> float:
        self.sync()
        if not self.cuda:
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            return (time.perf_counter() - start) / calls
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        return begin.elapsed_time(end) / 1e3 / calls


@dataclass(frozen=True)
class Plan:
    warmup: int
    min_sample_s: float
    repeats: int
    group_budget_s: float


def time_group(fns: dict[str, Callable[[], object]], clock: Clock, plan: Plan) -> dict[str, list[float]]:
    """Every member once per repetition, in rotating order; repetitions fit ``plan.group_budget_s``."""
    per_call = {}
    for name, fn in fns.items():
        for _ in range(plan.warmup):
            fn()
        per_call[name] = max(clock.per_call(fn, 1), 1e-7)
    calls = {name: max(1, int(plan.min_sample_s / t + 0.999)) for name, t in per_call.items()}
    per_repeat = sum(calls[name] * per_call[name] for name in fns)
    repeats = max(3, min(plan.repeats, int(plan.group_budget_s / max(per_repeat, 1e-9))))
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(repeats):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(clock.per_call(fns[name], calls[name]))
    return times


@contextlib.contextmanager
def peak_memory(device: torch.device) -> Iterator[dict[str, float]]:
    """``{"mib": peak allocated during the block minus allocated at its start}`` (``nan`` off CUDA)."""
    result = {"mib": float("nan")}
    if device.type != "cuda":
        yield result
        return
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    start = torch.cuda.memory_allocated(device)
    yield result
    torch.cuda.synchronize()
    result["mib"] = (torch.cuda.max_memory_allocated(device) - start) / 2**20


# -------------------------------------------------------------------------------------------------- layers
def _peft_layer(config: Any, base: nn.Module) -> nn.Module:
    """peft's layer for ``config`` around ``base``, through ``get_peft_model`` (its constructors need configs)."""
    import peft

    holder = nn.Sequential(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(holder, config).base_model.model[0]


def _peft() -> Any:
    """peft, or ``None`` where it is not installed (its rows are then left out, with a note on stderr)."""
    try:
        return importlib.import_module("peft")
    except ImportError:
        print("  peft is not importable: its variants are left out", file=sys.stderr)
        return None


def layer_variants(peft_boft_extension: bool) -> dict[str, Callable[[nn.Linear], nn.Module]]:
    from orthotune import boft, oft

    peft = _peft()

    def peft_boft(base: nn.Linear) -> nn.Module:
        config = peft.BOFTConfig(boft_block_size=8, boft_n_butterfly_factor=2, boft_dropout=0.0, target_modules=["0"])
        patch = contextlib.nullcontext() if peft_boft_extension else peft_keeps_butterfly_factor()
        with patch:
            return _peft_layer(config, base)

    variants: dict[str, Callable[[nn.Linear], nn.Module]] = {
        "orthotune OFT b=32 exact": lambda base: oft.Linear(base, "default", r=0, oft_block_size=32),
        "orthotune OFT b=32 neumann": lambda base: oft.Linear(
            base, "default", r=0, oft_block_size=32, use_cayley_neumann=True
        ),
        "orthotune BOFT b=8 m=2": lambda base: boft.Linear(
            base, "default", boft_block_size=8, boft_n_butterfly_factor=2, boft_dropout=0.0
        ),
    }
    if HAS_ORTHOTUNE_HRA:
        hra = importlib.import_module("orthotune.hra")
        variants["orthotune HRA r=8"] = lambda base: hra.Linear(base, "default", r=8)
    if peft is None:
        return variants
    variants.update({
        "peft OFT b=32 exact": lambda base: _peft_layer(
            peft.OFTConfig(r=0, oft_block_size=32, use_cayley_neumann=False, target_modules=["0"]), base
        ),
        "peft OFT b=32 neumann": lambda base: _peft_layer(
            peft.OFTConfig(r=0, oft_block_size=32, use_cayley_neumann=True, target_modules=["0"]), base
        ),
        "peft BOFT b=8 m=2": peft_boft,
        "peft HRA r=8": lambda base: _peft_layer(peft.HRAConfig(r=8, target_modules=["0"]), base),
        "peft LoRA r=16": lambda base: _peft_layer(peft.LoraConfig(r=16, lora_alpha=32, target_modules=["0"]), base),
    })  # fmt: skip
    return variants


def _perturb(module: nn.Module, scale: float = 1e-3) -> None:
    """Off the identity initialisation, as after some training (LoRA's B is zero at first)."""
    with torch.no_grad():
        for parameter in module.parameters():
            if parameter.requires_grad:
                parameter.add_(scale * torch.randn_like(parameter))


def _trainable(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def make_layer_step(layer: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    params = _trainable(layer)

    def step() -> None:
        x.grad = None
        for p in params:
            p.grad = None
        layer(x).sum().backward()

    return step


@dataclass
class Row:
    section: str
    shape: str
    variant: str
    params: int = 0
    ms: Spread | None = None
    vs_reference: Spread | None = None
    peak_mib: float | None = None
    repeats: int = 0
    note: str = ""


class Deadline:
    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def _failure(error: BaseException) -> str:
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return "out of memory"
    return f"error: {type(error).__name__}: {str(error).splitlines()[0][:100] if str(error) else ''}"


def run_layers(
    shapes: Sequence[tuple[int, int]], tokens: int, dtype: torch.dtype, device: torch.device, plan: Plan,
    deadline: Deadline, peft_boft_extension: bool, only: Sequence[str],
) -> list[Row]:  # fmt: skip
    clock = Clock(device)
    variants = {name: build for name, build in layer_variants(peft_boft_extension).items()
                if not only or any(token.lower() in name.lower() for token in only)}  # fmt: skip
    rows: list[Row] = []
    for d_in, d_out in shapes:
        shape = f"{d_in}→{d_out}, n={tokens}"
        torch.manual_seed(0)
        frozen = nn.Linear(d_in, d_out, dtype=dtype, device=device).requires_grad_(False)
        x = torch.randn(tokens, d_in, dtype=dtype, device=device, requires_grad=True)
        make_layer_step(frozen, x)()  # library and workspace set-up, before any memory is measured
        layers: dict[str, nn.Module] = {}
        built: dict[str, Row] = {}
        for name, build in variants.items():
            row = built[name] = Row("layer", shape, name)
            if deadline.left() < 5:
                row.note = "skipped: time budget"
                continue
            try:
                base = copy.deepcopy(frozen)  # outside the window: the copy of the frozen weight is not the adapter's
                with peak_memory(device) as memory:
                    layer = build(base)
                    _perturb(layer)
                    step = make_layer_step(layer, x)
                    for _ in range(3):
                        step()
                row.peak_mib = memory["mib"]
                row.params = sum(p.numel() for p in _trainable(layer))
                layers[name] = layer
            except Exception as error:  # one broken variant must not hide the others
                row.note = _failure(error)
                traceback.print_exc(limit=2, file=sys.stderr)
                layers.pop(name, None)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        with peak_memory(device) as memory:
            make_layer_step(frozen, x)()
        reference = Row("layer", shape, "frozen nn.Linear", peak_mib=memory["mib"])
        if deadline.left() > 5:
            group_plan = Plan(plan.warmup, plan.min_sample_s, plan.repeats,
                              min(plan.group_budget_s, deadline.left() / (len(shapes) + 1)))  # fmt: skip
            fns = {"frozen": make_layer_step(frozen, x)}
            fns.update({name: make_layer_step(layer, x) for name, layer in layers.items()})
            try:
                times = time_group(fns, clock, group_plan)
            except Exception as error:
                reference.note = _failure(error)
                times = {}
            if times:
                reference.ms = Spread.of([1e3 * t for t in times["frozen"]])
                reference.repeats = len(times["frozen"])
                for name in layers:
                    row = built[name]
                    row.ms = Spread.of([1e3 * t for t in times[name]])
                    row.vs_reference = Spread.of(paired_ratios(times[name], times["frozen"]))
                    row.repeats = len(times[name])
        else:
            reference.note = "skipped: time budget"
        rows += [reference, *built.values()]
        for row in [reference, *built.values()]:
            _progress(row)
        del layers, x, frozen
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


# --------------------------------------------------------------------------------------------------- model
def model_configs() -> dict[str, Callable[[nn.Module], nn.Module]]:
    import orthotune

    peft = _peft()

    def orthotune_wrap(config: Any) -> Callable[[nn.Module], nn.Module]:
        return lambda model: orthotune.get_peft_model(model, config)

    def peft_wrap(config: Any, patch: bool = False) -> Callable[[nn.Module], nn.Module]:
        def wrap(model: nn.Module) -> nn.Module:
            with peft_keeps_butterfly_factor() if patch else contextlib.nullcontext(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return peft.get_peft_model(model, config)

        return wrap

    configs = {
        "orthotune-oft-b32": orthotune_wrap(orthotune.OFTConfig(r=0, oft_block_size=32, target_modules=TARGETS)),
        "orthotune-boft-b8-m2": orthotune_wrap(
            orthotune.BOFTConfig(boft_block_size=8, boft_n_butterfly_factor=2, target_modules=TARGETS)
        ),
    }
    if peft is not None:
        configs = {
            "peft-lora-r16": peft_wrap(peft.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS)),
            **configs,
            "peft-oft-b32": peft_wrap(peft.OFTConfig(r=0, oft_block_size=32, target_modules=TARGETS)),
            "peft-boft-b8-m2": peft_wrap(
                peft.BOFTConfig(boft_block_size=8, boft_n_butterfly_factor=2, target_modules=TARGETS), patch=True
            ),
            "peft-hra-r8": peft_wrap(peft.HRAConfig(r=8, target_modules=TARGETS)),
        }
    hra_config = getattr(orthotune, "HRAConfig", None) or getattr(importlib.import_module("orthotune.config"),
                                                                   "HRAConfig", None)  # fmt: skip
    if HAS_ORTHOTUNE_HRA and hra_config is not None:
        configs["orthotune-hra-r8"] = orthotune_wrap(hra_config(r=8, target_modules=TARGETS))
    return configs


def run_model(quick: bool, dtype: torch.dtype, device: torch.device, plan: Plan, deadline: Deadline) -> list[Row]:
    try:
        import model_step
    except ImportError as error:  # transformers
        return [Row("model", "small Llama", "-", note=f"not run: {error}")]

    shape = model_step.QUICK if quick else model_step.FULL
    label = f"hidden {shape.hidden}, {shape.layers} layers, batch {shape.batch}x{shape.seq}"
    tokens = model_step.make_tokens(shape).to(device)
    clock = Clock(device)
    steps: dict[str, Callable[[], None]] = {}
    rows: dict[str, Row] = {}
    for name, wrap in model_configs().items():
        row = rows[name] = Row("model", label, name)
        if deadline.left() < 10:
            row.note = "skipped: time budget"
            continue
        try:
            base = model_step.base_model(shape).to(device=device, dtype=dtype)
            with peak_memory(device) as memory:
                model = wrap(base)
                _perturb(model)
                step = model_step.make_step(name, model, tokens)
                for _ in range(3):
                    step()
            row.peak_mib = memory["mib"]
            row.params = sum(p.numel() for p in _trainable(model))
            steps[name] = step
        except Exception as error:
            row.note = _failure(error)
            traceback.print_exc(limit=2, file=sys.stderr)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    reference = "peft-lora-r16"
    if reference in steps and len(steps) > 1 and deadline.left() > 5:
        group_plan = Plan(plan.warmup, plan.min_sample_s, plan.repeats, min(plan.group_budget_s, deadline.left() - 2))
        times = time_group(steps, clock, group_plan)
        for name in steps:
            row = rows[name]
            row.ms = Spread.of([1e3 * t for t in times[name]])
            if name != reference:
                row.vs_reference = Spread.of(paired_ratios(times[name], times[reference]))
            row.repeats = len(times[name])
    else:
        for name in steps:
            rows[name].note = "not timed: no time left, or no LoRA reference to pair with"
    for row in rows.values():
        _progress(row)
    return list(rows.values())


# -------------------------------------------------------------------------------------------------- output
HEADERS = ("section", "shape", "variant", "trainable params", "ms / step [p25-p75]", "x reference [p25-p75]",
           "peak MiB added", "reps", "note")  # fmt: skip


def table(rows: Sequence[Row]) -> str:
    cells = []
    for r in rows:
        cells.append([
            r.section, r.shape, r.variant, f"{r.params:,}",
            r.ms.format(3) if r.ms else "-",
            r.vs_reference.format() if r.vs_reference else ("1 (reference)" if r.ms else "-"),
            "-" if r.peak_mib is None or r.peak_mib != r.peak_mib else f"{r.peak_mib:.1f}",
            str(r.repeats), r.note,
        ])  # fmt: skip
    return render_markdown(HEADERS, cells)


def _progress(row: Row) -> None:
    status = row.note or (f"{row.ms.median:.3f} ms" if row.ms else "-")
    ratio = f" x ref {row.vs_reference.median:.2f}" if row.vs_reference else ""
    print(f"  [{time.strftime('%H:%M:%S')}] {row.section} {row.shape} {row.variant}: {status}{ratio}",
          file=sys.stderr, flush=True)  # fmt: skip


def device_line(device: torch.device, dtype: torch.dtype) -> str:
    from orthotune.functional import rotation_compute_dtype

    compute = rotation_compute_dtype(device, dtype)
    if device.type != "cuda":
        return f"device: CPU ({torch.backends.cpu.get_cpu_capability()}), {dtype}, rotations in {compute}"
    props = torch.cuda.get_device_properties(device)
    return (
        f"device: {props.name}, compute capability {props.major}.{props.minor}, {props.total_memory / 2**30:.0f} GiB; "
        f"CUDA {torch.version.cuda}; {dtype}, rotations in {compute}; "
        f"bf16 native: {torch.cuda.is_bf16_supported()}"
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=None, help="directory for gpu.md and gpu.json")
    parser.add_argument("--quick", action="store_true", help="tiny shapes (fp32 without a GPU): a smoke test")
    parser.add_argument("--budget-s", type=float, default=420.0, help="stop starting new work after this long")
    parser.add_argument("--repeats", type=int, default=15, help="most repetitions per group (default 15)")
    parser.add_argument("--only", nargs="+", default=[], help="layer variants whose name contains a substring")
    parser.add_argument("--skip-model", action="store_true")
    parser.add_argument("--peft-boft-extension", action="store_true",
                        help="let peft compile and use its BOFT CUDA extension (minutes on first use)")  # fmt: skip
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[Row]:
    args = parse_args(argv)
    deadline = Deadline(args.budget_s)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda" and not args.quick:
        raise SystemExit("no CUDA device: run with --quick for the CPU smoke test, or on a machine with a GPU")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cpu":
        torch.set_num_threads(1)
    if args.quick:
        shapes, tokens = [(64, 64), (64, 96)], 32
        plan = Plan(warmup=1, min_sample_s=0.002, repeats=3, group_budget_s=1.0)
    else:
        shapes, tokens = [(4096, 4096), (4096, 14336)], 8192
        plan = Plan(warmup=3, min_sample_s=0.02, repeats=args.repeats, group_budget_s=60.0)
    header = [f"# {environment_line()}", f"# {device_line(device, dtype)}",
              "# peak MiB added: max_memory_allocated over wrapping + 3 steps, minus allocated before"]  # fmt: skip
    print("\n".join(header))
    rows = run_layers(shapes, tokens, dtype, device, plan, deadline, args.peft_boft_extension, args.only)
    if not args.skip_model:
        rows += run_model(args.quick, dtype, device, plan, deadline)
    text = "\n".join(header) + "\n\n" + table(rows) + "\n"
    print("\n" + table(rows))
    if args.output:
        args.output.mkdir(parents=True, exist_ok=True)
        (args.output / "gpu.md").write_text(text)
        (args.output / "gpu.json").write_text(json.dumps(
            {"header": header, "rows": [asdict(r) for r in rows]}, indent=1, default=str))  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
