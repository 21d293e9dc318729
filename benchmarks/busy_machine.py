"""Fine-tuning next to another CPU-bound process: torch's default threading against ``orthotune.cli.threads``.

What is measured
----------------
A short training loop -- AdamW steps of OFT (b=16, every linear layer) on a tiny ``LlamaForCausalLM`` (hidden
128, intermediate 384, 2 layers, batch 8 x 64 tokens) -- in a fresh Python process, timed after imports and two
warm-up steps (wall clock: the point is how long the user waits). Two ways to start that process:

* ``default``: torch's own choice, one intra-op thread per core and GNU OpenMP's default waiting (spin, then
  sleep); ``OMP_*``/``KMP_*``/``GOMP_*`` variables removed from its environment;
* ``policy``: :func:`orthotune.cli.threads.apply_cpu_thread_policy` runs before torch is imported (threads =
  free cores, ``OMP_WAIT_POLICY=PASSIVE``), as ``orthotune finetune`` does.

Each runs ``idle`` (nothing added) and ``busy`` (one extra process spinning in a Python loop, started just
before and killed right after the run; its lifetime is bounded by ``--cap-s`` in any case). Repetitions
rotate the order of the modes; the table gives the median seconds per step with the 25th-75th percentiles and
the per-repetition ratio busy / idle. A run that exceeds ``--cap-s`` is stopped and counted at the cap.

The machine this runs on may already be shared: its load is printed with the results.

Reproduce::

    python benchmarks/busy_machine.py --repeats 5
    python benchmarks/busy_machine.py --quick        # smoke test
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

_HERE = Path(__file__).resolve().parent
_SRC = _HERE.parent / "src"
MODES = ("default", "policy")
CONDITIONS = ("idle", "busy")
_OPENMP_PREFIXES = ("OMP_", "KMP_", "GOMP_", "MKL_NUM_THREADS")


def _load_cli_threads():  # noqa: ANN202
    """``orthotune/cli/threads.py`` by path, so that nothing else is imported before the OpenMP environment is set
    (OpenMP reads it once, when torch loads it)."""
    spec = importlib.util.spec_from_file_location("orthotune_cli_threads", _SRC / "orthotune" / "cli" / "threads.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def child(mode: str, steps: int, quick: bool) -> dict[str, float | int | str]:
    """One timed training loop in this (fresh) process; returns what the parent records."""
    environment: dict[str, str] = {}
    if mode == "policy":
        cli_threads = _load_cli_threads()
        environment = cli_threads.prepare_openmp_environment()
        choice = cli_threads.choose_cpu_threads()
        os.environ["OMP_NUM_THREADS"] = str(choice.threads)
    import torch

    if mode == "policy":
        torch.set_num_threads(choice.threads)
    sys.path.insert(0, str(_SRC))
    from transformers import LlamaConfig, LlamaForCausalLM

    import orthotune

    hidden, layers, batch, seq = (32, 1, 2, 8) if quick else (128, 2, 8, 64)
    config = LlamaConfig(vocab_size=1000, hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=4, use_cache=False)  # fmt: skip
    torch.manual_seed(0)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    adapter = orthotune.OFTConfig(r=0, oft_block_size=16, target_modules=targets)
    model = orthotune.get_peft_model(LlamaForCausalLM(config), adapter)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    tokens = torch.randint(0, 1000, (batch, seq), generator=torch.Generator().manual_seed(0))

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model(input_ids=tokens, labels=tokens).loss.backward()
        optimizer.step()

    for _ in range(2):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = time.perf_counter() - start
    return {"mode": mode, "threads": torch.get_num_threads(), "seconds_per_step": seconds / steps,
            "environment": " ".join(f"{k}={v}" for k, v in environment.items()) or "-"}  # fmt: skip


def _child_environment(mode: str) -> dict[str, str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(_OPENMP_PREFIXES)}
    environ["PYTHONWARNINGS"] = "ignore"
    return environ


def _spinner(cap_s: float) -> subprocess.Popen:
    code = f"import time\nend = time.monotonic() + {cap_s}\nwhile time.monotonic() < end:\n    pass\n"
    return subprocess.Popen([sys.executable, "-c", code])


def run_once(mode: str, condition: str, args: argparse.Namespace) -> float:
    """Seconds per step of one child run (``cap_s / steps`` if it had to be stopped)."""
    competitor = _spinner(args.cap_s + 30) if condition == "busy" else None
    command = [sys.executable, __file__, "--child", mode, "--steps", str(args.steps)] + (["--quick"] * args.quick)
    try:
        if competitor is not None:
            time.sleep(0.5)  # let it take its core
        done = subprocess.run(command, capture_output=True, text=True, env=_child_environment(mode),
                              timeout=args.cap_s + 120)  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"{mode}/{condition} run failed:\n{done.stderr[-3000:]}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
    except subprocess.TimeoutExpired:
        return args.cap_s / args.steps
    finally:
        if competitor is not None:
            competitor.kill()
            competitor.wait()
    print(f"  {mode:8s} {condition:5s} {result['threads']} threads  {1e3 * result['seconds_per_step']:9.1f} ms/step  "
          f"env: {result['environment']}", file=sys.stderr, flush=True)  # fmt: skip
    return float(result["seconds_per_step"])


def spread(values: Sequence[float], scale: float = 1.0, digits: int = 1) -> str:
    ordered = sorted(values)

    def at(q: float) -> float:
        position = (len(ordered) - 1) * q
        low = int(position)
        high = min(low + 1, len(ordered) - 1)
        return ordered[low] + (ordered[high] - ordered[low]) * (position - low)

    return (
        f"{scale * statistics.median(values):.{digits}f} [{scale * at(0.25):.{digits}f}-{scale * at(0.75):.{digits}f}]"
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per run (default 10)")
    parser.add_argument("--cap-s", type=float, default=300.0, help="stop a run after this many seconds")
    parser.add_argument("--quick", action="store_true", help="a tiny model, one repetition (smoke test)")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--child", choices=MODES, help="internal: run one timed loop and print JSON")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, list[float]]]:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.quick)))
        return {}
    if args.quick:
        args.repeats, args.steps, args.cap_s = 1, 2, 120.0
    sys.path.insert(0, str(_HERE))
    from _timing import cpu_model

    load = os.getloadavg()
    cores = f"{os.cpu_count()} logical cores, {len(os.sched_getaffinity(0))} usable"
    print(f"# CPU: {cpu_model()} ({cores}) | load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} | "
          f"python {sys.version.split()[0]}")  # fmt: skip
    times: dict[str, dict[str, list[float]]] = {mode: {c: [] for c in CONDITIONS} for mode in MODES}
    for rep in range(args.repeats):
        order = MODES[rep % 2 :] + MODES[: rep % 2]
        for mode in order:
            for condition in CONDITIONS:
                times[mode][condition].append(run_once(mode, condition, args))
    load = os.getloadavg()
    print(f"# load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; {args.steps} steps per run, "
          f"{args.repeats} repetitions, wall clock")  # fmt: skip
    headers = ["threading", "idle ms/step [p25-p75]", "busy ms/step [p25-p75]", "busy / idle [p25-p75]"]
    rows = []
    for mode in MODES:
        ratios = [b / i for b, i in zip(times[mode]["busy"], times[mode]["idle"], strict=True)]
        rows.append([mode, spread(times[mode]["idle"], 1e3), spread(times[mode]["busy"], 1e3), spread(ratios, 1, 2)])
    if args.markdown:
        print("| " + " | ".join(headers) + " |\n|" + "---|" * len(headers))
        print("\n".join("| " + " | ".join(row) + " |" for row in rows))
    else:
        for row in [headers, *rows]:
            print("  ".join(f"{cell:<26s}" for cell in row))
    if args.json:
        args.json.write_text(json.dumps(times, indent=1))
    return times


if __name__ == "__main__":
    main()
