"""The processes tests/test_deepspeed.py starts (not a test file): DeepSpeed ZeRO-2 and ZeRO-3 on CPU.

Each process adds an OFT or BOFT adapter to the tiny Llama of :mod:`distributed_worker`, hands the model to
``deepspeed.initialize`` (ZeRO-3 partitions every parameter there, so the adapter is added before), trains it
with DeepSpeed's ``backward`` and ``step``, saves the adapter from rank 0, and merges it into the partitioned
base weights with :func:`orthotune.integrations.distributed.merge_adapter_zero3`.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import distributed_worker as worker
import torch

STAGES = (2, 3)
PROBE = "model.layers.0.self_attn.q_proj"  # an adapted layer, to see what ZeRO did to its base weight


def ds_config(stage: int) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": worker.GLOBAL_BATCH // worker.WORLD_SIZE,
        "gradient_accumulation_steps": 1,
        # ZeRO-3 would keep parameters under 1e5 elements (all of this tiny model's) whole on every rank; 0
        # partitions each one, as in a model of real size.
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
        # Our torch.optim.SGD, not DeepSpeed's CPUAdam (a C++ extension compiled on first use).
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
    }


def run_rank(rank: int, world_size: int, port: int, out_dir: str) -> None:
    """One process: every (method, stage) scenario in turn, in one process group."""
    os.environ["DS_ACCELERATOR"] = "cpu"  # read when deepspeed is imported
    import deepspeed
    import deepspeed.ops

    # Otherwise DeepSpeed's CPU backend compiles a shared-memory all-reduce (a C++ extension; 45 s cold on two
    # cores, and it needs a compiler). ZeRO's collectives go through torch.distributed, gloo here, either way.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    worker.join_group(rank, world_size, port)
    deepspeed.init_distributed(dist_backend="gloo")  # adopts the group joined above
    scenarios = {
        f"{method}-zero{stage}": functools.partial(
            _scenario, rank, world_size, method, stage, os.path.join(out_dir, f"{method}-zero{stage}")
        )
        for method in worker.METHODS
        for stage in STAGES
    }
    worker.run_scenarios(rank, out_dir, scenarios)


def _scenario(rank: int, world_size: int, method: str, stage: int, save_dir: str) -> dict[str, Any]:
    import deepspeed
    from references import rel_err

    from orthotune.integrations.distributed import merge_adapter_zero3, unmerge_adapter_zero3

    model = worker.adapted_model(method)
    adapter = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(adapter, lr=worker.LR)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config(stage))
    probe = model.get_base_model().get_submodule(PROBE)
    result: dict[str, Any] = {"base_weight_numel": probe.get_base_layer().weight.numel()}

    def step(loss: torch.Tensor) -> None:
        engine.backward(loss)
        engine.step()

    rows = worker.rank_rows(rank, world_size)
    result["losses"] = worker.train(model, engine, rows, step)
    # Under ZeRO-3 each rank holds a slice of each adapter tensor: gather them (a collective, on every rank)
    # and let rank 0 write the file. Without the gather, saving refuses to write the empty placeholders.
    result["save_without_gather"] = _error_of(
        lambda: model.save_pretrained(save_dir + "-ungathered", is_main_process=rank == 0)
    )
    with deepspeed.zero.GatheredParameters(adapter):
        model.save_pretrained(save_dir, is_main_process=rank == 0)

    tokens = worker.global_batch()[rows]
    base_weight = probe.get_base_layer().weight
    engine.eval()
    with torch.no_grad():
        unmerged = engine(input_ids=tokens).logits
        with deepspeed.zero.GatheredParameters(base_weight):
            before = base_weight.clone()
        # A plain merge would write into a copy that ZeRO-3 overwrites again: refused, naming the helper.
        result["plain_merge"] = _error_of(model.merge_adapter)
        result["plain_merge_left_unmerged"] = not probe.merged
        if probe.merged:  # ZeRO-2 keeps parameters whole, so a plain merge is right there; undo it for the helper
            model.unmerge_adapter()
        merge_adapter_zero3(model)
        result["merged"] = probe.merged
        with deepspeed.zero.GatheredParameters(base_weight):
            result["merge_changed_base_weight"] = rel_err(base_weight, before)
        result["merged_vs_unmerged"] = rel_err(engine(input_ids=tokens).logits, unmerged)
        unmerge_adapter_zero3(model)
        result["unmerged_again_vs_unmerged"] = rel_err(engine(input_ids=tokens).logits, unmerged)
    engine.destroy()
    return result


def _error_of(call: Any) -> str:
    """``"TypeName: message"`` of what ``call()`` raises, or ``""`` when it raises nothing."""
    try:
        call()
    except Exception as error:  # the test asserts on the type and message
        return f"{type(error).__name__}: {error}"
    return ""
