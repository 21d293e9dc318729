"""Output-side adapters: agreement with LyCORIS 4.1.3 and the step time of an output-side OFT layer.

What is measured
----------------
**agreement**: for LyCORIS's ``diag-oft``, ``boft`` and legacy ``oft_diag`` files, on an ``nn.Linear(256, 512)``,
an ``nn.Conv2d(64, 128, 3, padding=1)`` on a 2×64×16×16 input, and transformers' ``Conv1D(512, 256)`` (GPT-2's
layer, which LyCORIS does not adapt: its numbers are against LyCORIS on the equivalent ``nn.Linear``), LyCORIS
builds the adapter (``linear_dim=8``, ``constraint`` 0 or 0.02, which binds here, ``rescaled=True``) with
random blocks N(0, 0.3²) and scales U(0.5, 1.5) and computes its default forward; orthotune reads the state dict
LyCORIS saves and computes its output-side layer's forward, unmerged and merged. The table gives the largest
absolute difference and that difference over the largest |output| (fp32 everywhere).

**step**: ``layer(x).sum().backward()`` of ``orthotune.oft.Linear`` on a frozen ``nn.Linear(d, d)`` (bias on),
``x: (n, d)`` with ``requires_grad``, exact Cayley, blocks of 32: input side against output side (and output
side with ``rescale``), timed as a group in rotating order (``_timing.timed_group``); ratios are per repetition,
reported as median [25th-75th percentile].

Reproduce::

    OMP_NUM_THREADS=1 /work/main/.venv/bin/python benchmarks/output_side.py --threads 1
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

_HERE = Path(__file__).resolve().parent
for _path in (_HERE.parent / "src", _HERE):
    if _path.is_dir() and str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from _timing import Budget, Spread, environment_line, paired_ratios, render_text, timed_group  # noqa: E402

from orthotune import boft, oft  # noqa: E402
from orthotune.formats import add_layer_adapter, read_lycoris  # noqa: E402


# ------------------------------------------------------------------------------------------- agreement
def _lycoris_layer(base: nn.Module, algo: str, constraint: float) -> tuple[nn.Module, dict[str, torch.Tensor], object]:
    """LyCORIS's adapted copy of ``base`` (as ``model.layer``), the state dict its saver writes, its network."""
    from lycoris import create_lycoris
    from safetensors.torch import load_file

    model = nn.Module()
    model.layer = copy.deepcopy(base)
    network = create_lycoris(model, 1.0, linear_dim=8, linear_alpha=1, algo=algo, constraint=constraint, rescaled=True)
    network.apply_to()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in network.loras:
            module.oft_blocks.copy_(torch.randn(module.oft_blocks.shape, generator=generator) * 0.3)
            module.rescale.copy_(torch.rand(module.rescale.shape, generator=generator) + 0.5)
    with tempfile.TemporaryDirectory() as directory:
        path = str(Path(directory) / "adapter.safetensors")
        network.save_weights(path, None, None)
        state_dict = load_file(path)
    return model, state_dict, network


def _ours(base: nn.Module, state_dict: dict[str, torch.Tensor]) -> nn.Module:
    holder = nn.Module()
    holder.layer = copy.deepcopy(base)
    adapter = read_lycoris(state_dict, [name for name, _ in holder.named_modules()])["layer"]
    conv = isinstance(holder.layer, nn.Conv2d)
    kwargs = {"fan_in_fan_out": type(holder.layer).__name__ == "Conv1D"}
    if adapter.method == "oft":
        cls = oft.Conv2d if conv else oft.Linear
        layer = cls(holder.layer, "x", r=adapter.num_blocks, rotation_side="output", **kwargs)
    else:
        cls = boft.Conv2d if conv else boft.Linear
        layer = cls(
            holder.layer,
            "x",
            boft_block_size=adapter.block_size,
            boft_n_butterfly_factor=adapter.num_factors,
            rotation_side="output",
            boft_dropout=0.0,
            **kwargs,
        )
    add_layer_adapter(layer, "x", adapter)
    return layer


def agreement_rows() -> list[list[str]]:
    import lycoris  # noqa: F401  (sets its logger's level on import; quieted after)
    from transformers.pytorch_utils import Conv1D

    logging.getLogger("LyCORIS").setLevel(logging.ERROR)
    torch.manual_seed(0)
    linear, conv = nn.Linear(256, 512), nn.Conv2d(64, 128, 3, padding=1)
    gpt2 = Conv1D(512, 256)
    with torch.no_grad():
        gpt2.weight.copy_(linear.weight.T)
        gpt2.bias.copy_(linear.bias)
    cases = [
        ("Linear(256, 512)", linear, linear, torch.randn(64, 256)),
        ("Conv2d(64, 128, 3)", conv, conv, torch.randn(2, 64, 16, 16)),
        ("GPT-2 Conv1D(256→512)", linear, gpt2, torch.randn(64, 256)),
    ]
    rows = []
    settings = [(f, c) for f in ("diag-oft", "boft") for c in (0.0, 0.02)] + [("oft_diag (legacy)", 0.0)]
    for file_format, constraint in settings:
        algo = "diag-oft" if file_format.startswith("oft_diag") else file_format
        for label, lycoris_base, our_base, x in cases:
            model, state_dict, network = _lycoris_layer(lycoris_base, algo, constraint)
            if file_format.startswith("oft_diag"):
                (module,) = network.loras
                with torch.no_grad():
                    state_dict = {
                        f"{module.lora_name}.oft_diag": module.get_r().detach().clone(),
                        f"{module.lora_name}.rescale": module.rescale.detach().clone(),
                    }
            with torch.no_grad():
                expected = model.layer(x)
                layer = _ours(our_base, state_dict)
                unmerged = layer(x)
                layer.merge()
                merged = layer(x)
            scale = float(expected.abs().max())
            for route, ours in (("unmerged", unmerged), ("merged", merged)):
                difference = float((ours - expected).abs().max())
                rows.append(
                    [file_format, f"{constraint:g}", label, route, f"{difference:.2e}", f"{difference / scale:.2e}"]
                )
    return rows


# ------------------------------------------------------------------------------------------------ step
def step_rows(d: int, n: int, block_size: int, budget: Budget) -> list[list[str]]:
    torch.manual_seed(0)
    base = nn.Linear(d, d)
    x = torch.randn(n, d, requires_grad=True)
    layers = {
        "input side": oft.Linear(copy.deepcopy(base), "a", r=0, oft_block_size=block_size, init_weights=False),
        "output side": oft.Linear(
            copy.deepcopy(base), "a", r=0, oft_block_size=block_size, rotation_side="output", init_weights=False
        ),
        "output side + rescale": oft.Linear(
            copy.deepcopy(base),
            "a",
            r=0,
            oft_block_size=block_size,
            rotation_side="output",
            rescale=True,
            init_weights=False,
        ),
    }

    def step(layer: nn.Module):
        def run() -> None:
            for parameter in layer.parameters():
                parameter.grad = None
            x.grad = None
            layer(x).sum().backward()

        return run

    times = timed_group({name: step(layer) for name, layer in layers.items()}, budget)
    reference = times["input side"]
    rows = []
    for name, samples in times.items():
        ratio = Spread.of(paired_ratios(samples, reference))
        rows.append([name, Spread.of(samples).format(2, 1e3), ratio.format(3), str(len(samples))])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--d", type=int, default=1024)
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--budget-s", type=float, default=20.0)
    parser.add_argument("--repeats", type=int, default=31)
    parser.add_argument("--skip-agreement", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(environment_line())
    print(f"torch.backends.cpu.get_cpu_capability(): {torch.backends.cpu.get_cpu_capability()}")
    if not args.skip_agreement:
        print("\nagreement with LyCORIS 4.1.3 (fp32, its default forward)")
        print(render_text(["file", "alpha", "layer", "orthotune", "max |diff|", "÷ max |y|"], agreement_rows()))
    budget = Budget(warmup=3, min_sample_s=0.2, budget_s=args.budget_s, min_repeats=11, max_repeats=args.repeats)
    print(f"\nOFT Linear step (forward + backward), d={args.d}, n={args.n}, b={args.block_size}, exact Cayley")
    rows = step_rows(args.d, args.n, args.block_size, budget)
    print(render_text(["variant", "ms per step", "÷ input side (paired)", "reps"], rows))


if __name__ == "__main__":
    main()
