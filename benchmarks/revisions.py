"""Before/after: the same adapter layer from an earlier commit and from the working tree, timed in one process.

The earlier commit's ``src/orthotune`` is exported with ``git archive`` into a temporary directory as the package
``orthotune_before`` (its imports rewritten), so both versions live side by side. For every selected variant a
group of frozen ``nn.Linear`` (the reference), ``before``, ``after`` and, with ``--peft``, peft's layer is timed
back to back in rotating order (``_timing.time_group``); the table gives medians of per-repetition ratios with
their 25th-75th percentiles, for the training step and the no-grad forward in ``eval()`` mode.

The training step is ``layer(x).backward(g)`` with a fixed random upstream gradient ``g`` (``--upstream random``,
the default), or ``layer(x).sum().backward()`` as ``layer_step.py`` does (``--upstream sum``). The two differ
where it matters: ``sum()`` hands the base layer an all-ones *expanded* gradient, which torch's GEMM copies into
a layout of its own choosing, and on an AVX2 CPU the emulated bf16 GEMM's speed depends ~10× on layout.

Reproduce::

    python benchmarks/revisions.py --before fe813a2 --d 1024 --n 512 --dtype fp32 --only "OFT b=32 exact"
    python benchmarks/revisions.py --quick          # smoke test against HEAD
"""

from __future__ import annotations

import argparse
import copy
import importlib
import re
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

_HERE = Path(__file__).resolve().parent
for _path in (_HERE.parent / "src", _HERE):
    if _path.is_dir() and str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import layer_step  # noqa: E402
from _timing import Budget, Spread, environment_line, paired_ratios, render_markdown, set_clock, timed_group  # noqa: E402

BEFORE_PACKAGE = "orthotune_before"


def load_revision(revision: str, directory: Path) -> str:
    """Export ``src/orthotune`` at ``revision`` as the importable package ``orthotune_before``; return its commit."""
    root = _HERE.parent
    commit = subprocess.run(
        ["git", "-C", str(root), "rev-parse", "--short", revision], capture_output=True, text=True, check=True
    ).stdout.strip()
    archive = directory / "src.tar"
    with archive.open("wb") as out:
        subprocess.run(["git", "-C", str(root), "archive", commit, "src/orthotune"], stdout=out, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(directory, filter="data")
    package = directory / BEFORE_PACKAGE
    (directory / "src" / "orthotune").rename(package)
    pattern = re.compile(r"\borthotune\.")
    for source in package.rglob("*.py"):
        text = source.read_text()
        text = pattern.sub(f"{BEFORE_PACKAGE}.", text)
        text = re.sub(r"^(\s*)import orthotune\b", rf"\1import {BEFORE_PACKAGE} as orthotune", text, flags=re.M)
        text = re.sub(r"^(\s*)from orthotune import", rf"\1from {BEFORE_PACKAGE} import", text, flags=re.M)
        source.write_text(text)
    sys.path.insert(0, str(directory))
    importlib.import_module(BEFORE_PACKAGE)
    return commit


def build(package: str, spec: layer_step.AdapterSpec, base: nn.Linear) -> nn.Module:
    """``layer_step.build_orthotune``'s layer, from ``package`` (``orthotune`` or ``orthotune_before``)."""
    if isinstance(spec, layer_step.OFTSpec):
        linear = importlib.import_module(f"{package}.oft").Linear
        options = {"use_cayley_neumann": spec.use_cayley_neumann, "coft": spec.coft, "block_share": spec.block_share}
        return linear(base, "default", r=0, oft_block_size=spec.block_size, **options)
    linear = importlib.import_module(f"{package}.boft").Linear
    return linear(base, "default", boft_block_size=spec.block_size, boft_block_num=0,
                  boft_n_butterfly_factor=spec.n_butterfly_factor, boft_dropout=0.0)  # fmt: skip


def all_specs() -> dict[str, layer_step.AdapterSpec]:
    specs: list[layer_step.AdapterSpec] = [s for b in (8, 16, 32, 64) for s in layer_step.oft_specs(b)]
    specs += [layer_step.BOFTSpec(b, m) for b in (4, 8, 32) for m in (1, 2, 4)]
    return {spec.label: spec for spec in specs}


def make_step(layer: nn.Module, x: torch.Tensor, upstream: torch.Tensor | None) -> Callable[[], None]:
    """A training step: ``layer(x).backward(upstream)``, or ``layer(x).sum().backward()`` without ``upstream``."""
    if upstream is None:
        return layer_step.make_step(layer, x)
    params = layer_step.trainable_parameters(layer)

    def step() -> None:
        x.grad = None
        for p in params:
            p.grad = None
        layer(x).backward(upstream)

    return step


def compare(
    spec: layer_step.AdapterSpec, d: int, n: int, dtype: torch.dtype, budget: Budget, with_peft: bool,
    upstream: str = "random",
) -> list[list[str]]:  # fmt: skip
    torch.manual_seed(0)
    frozen = layer_step.make_frozen_linear(d, dtype)
    x = torch.randn(n, d, dtype=dtype, requires_grad=True)
    gradient = torch.randn(n, d, dtype=dtype) if upstream == "random" else None
    layers: dict[str, nn.Module] = {
        "before": build(BEFORE_PACKAGE, spec, copy.deepcopy(frozen)),
        "after": build("orthotune", spec, copy.deepcopy(frozen)),
    }
    if with_peft:
        layers["peft"] = layer_step.build_peft(spec, copy.deepcopy(frozen))
    torch.manual_seed(1)
    layer_step.perturb_adapter(layers["after"])
    layers["before"].load_state_dict(layers["after"].state_dict())
    if with_peft:
        layers["peft"].load_state_dict(layers["after"].state_dict(), strict=False)
    dtype_name = next(name for name, value in layer_step.DTYPES.items() if value == dtype)
    rows = []

    def step_maker(layer: nn.Module, source: torch.Tensor) -> Callable[[], None]:
        return make_step(layer, source, gradient)

    def versus_peft(name: str) -> bool:
        return name == "after" and with_peft

    for op, make in (("step", step_maker), ("infer", layer_step.make_infer)):
        for layer in (frozen, *layers.values()):
            layer.train(op == "step")
        source = x if op == "step" else x.detach()
        fns: dict[str, Callable[[], object]] = {"frozen": make(frozen, source)}
        fns.update({name: make(layer, source) for name, layer in layers.items()})
        times = timed_group(fns, budget)
        for name in layers:
            ms = Spread.of([1e3 * t for t in times[name]])
            rows.append([
                f"{d}", f"{n}", dtype_name, spec.label, op, name, ms.format(2),
                Spread.of(paired_ratios(times[name], times["frozen"])).format(),
                Spread.of(paired_ratios(times[name], times["before"])).format() if name != "before" else "",
                Spread.of(paired_ratios(times[name], times["peft"])).format() if versus_peft(name) else "",
                str(len(times[name])),
            ])  # fmt: skip
            print("  " + " | ".join(rows[-1]), file=sys.stderr, flush=True)
    return rows


HEADERS = ("d", "n", "dtype", "variant", "op", "impl", "ms [p25-p75]", "x frozen [p25-p75]", "x before [p25-p75]",
           "after / peft [p25-p75]", "reps")  # fmt: skip


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", default="HEAD", help="git revision to compare with (default HEAD)")
    parser.add_argument("--only", nargs="+", default=["OFT b=32 exact"], help="variant labels, as in layer_step.py")
    parser.add_argument("--d", type=int, default=1024)
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--dtype", choices=sorted(layer_step.DTYPES), default="fp32")
    parser.add_argument("--peft", action="store_true", help="time peft's layer in the same groups")
    parser.add_argument("--upstream", choices=("random", "sum"), default="random",
                        help="upstream gradient of the step: a fixed random tensor, or that of .sum()")  # fmt: skip
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall time, or this process's CPU time (less noisy on a shared machine)",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--budget-s", type=float, default=30.0)
    parser.add_argument("--min-sample-ms", type=float, default=50.0)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, a few repetitions (smoke test)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[list[str]]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    set_clock(args.clock)
    if args.quick:
        args.d, args.n, args.only = 64, 16, ["OFT b=8 exact", "BOFT b=4 m=2"]
    specs = all_specs()
    unknown = [label for label in args.only if label not in specs]
    if unknown:
        raise SystemExit(f"--only {unknown}: unknown variants; choose from {sorted(specs)}")
    budget = Budget(
        warmup=1 if args.quick else 3,
        min_sample_s=(1.0 if args.quick else args.min_sample_ms) / 1e3,
        budget_s=0.5 if args.quick else args.budget_s,
        min_repeats=3,
        max_repeats=3 if args.quick else args.repeats,
    )
    with tempfile.TemporaryDirectory() as directory:
        commit = load_revision(args.before, Path(directory))
        print(f"# {environment_line()} | before = src at {commit} | cpu capability "
              f"{torch.backends.cpu.get_cpu_capability()} | upstream gradient: {args.upstream}")  # fmt: skip
        rows = []
        for label in args.only:
            rows += compare(specs[label], args.d, args.n, layer_step.DTYPES[args.dtype], budget, args.peft,
                            args.upstream)  # fmt: skip
    print(render_markdown(HEADERS, rows))
    return rows


if __name__ == "__main__":
    main()
