"""What rank does ``orthotune.export_lora`` need, and how large are the files?

A tiny Llama (``tests/tiny_models.tiny_llama``: hidden 32, 2 layers) gets an OFT adapter on every linear layer
(block size 8, exact Cayley), trained for a few AdamW steps on a next-token task so that the rotations are
not the identity. The adapter is then exported at tolerances of 1%, 5% and 10% (per layer
``‖W' − (W + B A)‖_F ≤ t·‖W'‖_F``) and at full rank, and the script prints per tolerance the ranks the layers
needed, the largest error, and the size of ``adapter_model.safetensors`` against the OFT adapter's own file.

Because an orthogonal adapter changes each weight by only ``‖ΔW‖ = ‖W(Rᵀ − I)‖``, a tolerance relative to
``‖W'‖`` can be met at rank 0 by a layer that barely turned; the script therefore also prints
``‖ΔW‖/‖W'‖`` per layer and the ranks for the same fractions of ``‖ΔW‖`` itself (Eckart-Young, from the SVD).

    python benchmarks/lora_export_ranks.py [--steps 50] [--lr 0.001] [--threads 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))

from tiny_models import tiny_llama  # noqa: E402

import orthotune  # noqa: E402
from orthotune.functional import rank_for_tolerance  # noqa: E402
from orthotune.inspection import max_rotation_angle  # noqa: E402

TOLERANCES = (0.01, 0.05, 0.10)


def trained_model(steps: int, lr: float, seed: int = 0) -> orthotune.OrthoModel:
    """The tiny Llama with OFT (block 8, exact) on every linear layer, trained ``steps`` AdamW steps to continue
    random walks over the vocabulary (token t+1 = token t + a step from {1, 2, 3}, mod 96)."""
    config = orthotune.OFTConfig(r=0, oft_block_size=8, target_modules="all-linear", use_cayley_neumann=False)
    model = orthotune.get_peft_model(tiny_llama(), config)
    model.train()
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        start = torch.randint(0, 96, (16, 1), generator=generator)
        walk = torch.randint(1, 4, (16, 31), generator=generator).cumsum(1)
        tokens = torch.cat([start, start + walk], dim=1) % 96
        loss = model(input_ids=tokens, labels=tokens).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return model


def measure(steps: int, lr: float) -> dict:
    model = trained_model(steps, lr)
    with tempfile.TemporaryDirectory() as directory:
        oft_dir = Path(directory) / "oft"
        model.save_pretrained(oft_dir)
        oft_bytes = (oft_dir / "adapter_model.safetensors").stat().st_size
        layers = []
        for name, layer in model.adapter_layers():
            with torch.no_grad():
                merged = layer.merged_weight_matrix(["default"]).double()
                delta = merged - layer.get_base_layer().weight.double()
            singular = torch.linalg.svdvals(delta)
            change = float(torch.linalg.matrix_norm(delta))
            layers.append(
                {
                    "name": name,
                    "shape": list(delta.shape),
                    "relative_change": change / float(torch.linalg.matrix_norm(merged)),
                    "max_angle_degrees": max_rotation_angle(layer.oft_R["default"].rotation_blocks().detach()),
                    # The rank for a fraction of ‖ΔW‖ itself (not of ‖W'‖).
                    "rank_for_fraction_of_change": {
                        str(t): rank_for_tolerance(singular, t * change) for t in TOLERANCES
                    },
                }
            )
        exports = []
        for label, options in [*((f"{t:.0%}", {"tolerance": t}) for t in TOLERANCES), ("full", {"rank": 10_000})]:
            lora_dir = Path(directory) / f"lora-{label}"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                report = orthotune.export_lora(model, lora_dir, **options)
            ranks = [layer.rank for layer in report.layers]
            exports.append(
                {
                    "target": label,
                    "ranks": {layer.name: layer.rank for layer in report.layers},
                    "rank_min": min(ranks),
                    "rank_median": statistics.median(ranks),
                    "rank_max": max(ranks),
                    "layers_left_out": sum(rank == 0 for rank in ranks),
                    "max_relative_error": report.max_relative_error,
                    "lora_parameters": report.lora_parameters,
                    "file_bytes": report.file_bytes,
                }
            )
    return {
        "model": "tiny_llama (hidden 32, 2 layers), OFT b=8 exact on all-linear (14 layers)",
        "steps": steps,
        "lr": lr,
        "oft_file_bytes": oft_bytes,
        "oft_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "layers": layers,
        "exports": exports,
    }


def print_results(results: dict) -> None:
    print(f"{results['model']}; trained {results['steps']} AdamW steps at lr {results['lr']}")
    print(f"torch threads: {torch.get_num_threads()}; cpu capability: {torch.backends.cpu.get_cpu_capability()}")
    print(f"OFT adapter: {results['oft_parameters']:,} parameters, {results['oft_file_bytes']:,} bytes\n")
    print("| layer | shape | max angle | ‖ΔW‖/‖W'‖ | rank for 1% / 5% / 10% of ‖ΔW‖ |")
    print("|---|---|---|---|---|")
    for layer in results["layers"]:
        ranks = " / ".join(str(r) for r in layer["rank_for_fraction_of_change"].values())
        shape = "×".join(map(str, layer["shape"]))
        angle = f"{layer['max_angle_degrees']:.1f}°"
        print(f"| {layer['name']} | {shape} | {angle} | {layer['relative_change']:.4f} | {ranks} |")
    columns = ["export (error vs ‖W'‖)", "ranks min / median / max", "layers left out", "max error", "LoRA params"]
    print("\n| " + " | ".join([*columns, "file bytes"]) + " |")
    print("|---|---|---|---|---|---|")
    for row in results["exports"]:
        print(
            f"| {row['target']} | {row['rank_min']} / {row['rank_median']:g} / {row['rank_max']} | "
            f"{row['layers_left_out']} | {row['max_relative_error']:.2e} | {row['lora_parameters']:,} | "
            f"{row['file_bytes']:,} |"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=50, help="AdamW steps of OFT training")
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    results = measure(args.steps, args.lr)
    print_results(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
