"""Training code shared by tests/test_distributed.py, tests/test_deepspeed.py and the processes they start
(not a test file).

Each process builds the same tiny Llama, adds an OFT, BOFT or HRA adapter, wraps the model in DDP or FSDP2 (here) or
a DeepSpeed engine (tests/deepspeed_worker.py), or nothing for the one-process reference, and takes
:data:`STEPS` SGD steps on its rows of one global batch. :func:`spawn` starts the processes and bounds their
time; :func:`run_scenarios` runs a process's scenarios in one process group and writes its report.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import pathlib
import socket
import time
import traceback
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from tiny_models import tiny_llama_wide
from torch import nn

STEPS = 3
GLOBAL_BATCH, SEQ = 4, 16
LR = 0.5
TARGETS = ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
METHODS = ("oft", "boft", "hra")
WRAPPERS = ("ddp", "fsdp2")
WORLD_SIZE = 2
# A collective whose peer died fails after this long instead of gloo's 30 minutes; spawn's deadline is longer.
COLLECTIVE_TIMEOUT_S = 60


def adapter_config(method: str) -> Any:
    import orthotune

    if method == "oft":  # peft's defaults otherwise: Cayley-Neumann, 5 terms
        return orthotune.OFTConfig(r=0, oft_block_size=16, module_dropout=0.0, target_modules=TARGETS)
    if method == "hra":
        return orthotune.HRAConfig(r=8, init_weights=False, target_modules=TARGETS)
    return orthotune.BOFTConfig(boft_block_size=8, boft_n_butterfly_factor=2, boft_dropout=0.0, target_modules=TARGETS)


def adapted_model(method: str) -> nn.Module:
    import orthotune

    return orthotune.get_peft_model(tiny_llama_wide(), adapter_config(method))


def global_batch() -> torch.Tensor:
    return torch.randint(0, 128, (GLOBAL_BATCH, SEQ), generator=torch.Generator().manual_seed(1))


def train(
    model: nn.Module, forward: nn.Module, rows: slice, step: Callable[[torch.Tensor], None] | None = None
) -> list[float]:
    """:data:`STEPS` SGD steps of ``forward`` (``model`` or its distributed wrapper) on ``rows`` of the batch.

    ``step(loss)`` does the backward pass and the update; by default, ``loss.backward()`` and an SGD step on the
    trainable parameters of ``model`` (a DeepSpeed engine passes its own ``backward`` and ``step``).
    """
    tokens = global_batch()[rows]
    if step is None:
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)

        def step(loss: torch.Tensor) -> None:
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    losses = []
    for _ in range(STEPS):
        loss = forward(input_ids=tokens, labels=tokens).loss
        step(loss)
        losses.append(loss.item())
    return losses


def rank_rows(rank: int, world_size: int) -> slice:
    per_rank = GLOBAL_BATCH // world_size
    return slice(rank * per_rank, (rank + 1) * per_rank)


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def one_process_references() -> dict[str, dict[str, torch.Tensor]]:
    """``"<method>-full"``: one process trained on the whole global batch, the reference; ``"<method>-half"``:
    on half of it, to show that the comparison can fail."""
    references = {}
    for method in METHODS:
        for name, rows in (("full", slice(None)), ("half", slice(0, GLOBAL_BATCH // 2))):
            model = adapted_model(method)
            train(model, model, rows)
            references[f"{method}-{name}"] = adapter_tensors(model)
    return references


def assert_saved_adapter_matches(saved: pathlib.Path, method: str, references: dict, tolerance: float) -> None:
    """The adapter saved in ``saved`` is rank 0's alone, reloads, and is within ``tolerance`` of one process."""
    from references import rel_err

    import orthotune

    assert sorted(os.listdir(saved)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    reloaded = orthotune.PeftModel.from_pretrained(tiny_llama_wide(), saved, is_trainable=True)
    loaded = adapter_tensors(reloaded)
    reference, half = references[f"{method}-full"], references[f"{method}-half"]
    assert loaded.keys() == reference.keys() and loaded
    for name, tensor in reference.items():
        assert rel_err(loaded[name], tensor) < tolerance, name
    # The adapter moved, and one process on half the batch ends elsewhere: the comparison can fail.
    assert max(rel_err(half[name], tensor) for name, tensor in reference.items()) > 100 * tolerance


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def spawn(run_rank: Callable[[int, int, int, str], None], out_dir: pathlib.Path, timeout_s: float) -> list[dict]:
    """Run ``run_rank(rank, world_size, port, out_dir)`` in :data:`WORLD_SIZE` new processes; their reports.

    A process that raises stops the others; past ``timeout_s`` (a hung collective) they are killed and the
    test fails. Either way no process outlives this call.
    """
    context = torch.multiprocessing.start_processes(
        run_rank, args=(WORLD_SIZE, free_port(), str(out_dir)), nprocs=WORLD_SIZE, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + timeout_s
    try:
        while not context.join(timeout=max(deadline - time.monotonic(), 0.1)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the {WORLD_SIZE} processes did not finish within {timeout_s} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
            process.join()
    return [json.loads((out_dir / f"rank{rank}.json").read_text()) for rank in range(WORLD_SIZE)]


def join_group(rank: int, world_size: int, port: int) -> None:
    """Join the gloo process group on loopback, with the environment ``env://`` initialisation reads."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        GLOO_SOCKET_IFNAME="lo",  # loopback only
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    timeout = datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timeout)


def run_scenarios(rank: int, out_dir: str, scenarios: dict[str, Callable[[], dict[str, Any]]]) -> None:
    """Run each scenario in turn (an error is recorded, not raised), write ``rank<r>.json``, leave the group."""
    report: dict[str, Any] = {}
    try:
        for key, scenario in scenarios.items():
            try:
                report[key] = scenario()
            except Exception:
                report[key] = {"error": traceback.format_exc()}
            dist.barrier()
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as file:
            json.dump(report, file)
        dist.destroy_process_group()


def run_rank(rank: int, world_size: int, port: int, out_dir: str) -> None:
    """One process of the 2-process run: every (method, wrapper) scenario in turn, one process group."""
    join_group(rank, world_size, port)
    scenarios = {
        f"{method}-{wrapper}": functools.partial(
            _scenario, rank, world_size, method, wrapper, os.path.join(out_dir, f"{method}-{wrapper}")
        )
        for method in METHODS
        for wrapper in WRAPPERS
    }
    run_scenarios(rank, out_dir, scenarios)


def _scenario(rank: int, world_size: int, method: str, wrapper: str, save_dir: str) -> dict[str, Any]:
    rows = rank_rows(rank, world_size)
    model = adapted_model(method)
    result: dict[str, Any] = {}
    if wrapper == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        result["losses"] = train(model, DistributedDataParallel(model), rows)
        model.save_pretrained(save_dir, is_main_process=rank == 0)
        return result

    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard

    for layer in model.get_base_model().model.layers:
        fully_shard(layer)
    fully_shard(model)
    adapter = next(p for p in model.parameters() if p.requires_grad)
    result["adapter_param_type"] = type(adapter).__name__
    result["losses"] = train(model, model, rows)
    # The parameters are shards (DTensors): gather a full state dict (a collective, on every rank) and let
    # rank 0 write the adapter from it.
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    model.save_pretrained(save_dir, is_main_process=rank == 0, state_dict=full)
    try:
        model.merge_adapter()
        result["merge"] = "ok"
    except Exception as error:  # recorded for the test: merging sharded weights is refused, clearly
        result["merge"] = f"{type(error).__name__}: {error}"
    return result
