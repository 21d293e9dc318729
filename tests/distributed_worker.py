"""Training code shared by tests/test_distributed.py and the processes it starts (not a test file).

Each process builds the same tiny Llama, adds an OFT or BOFT adapter, wraps the model in DDP or FSDP2 (or
nothing, for the one-process reference), and takes :data:`STEPS` SGD steps on its rows of one global batch.
"""

from __future__ import annotations

import json
import os
import socket
import traceback
import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

STEPS = 3
GLOBAL_BATCH, SEQ = 4, 16
LR = 0.5
TARGETS = ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
METHODS = ("oft", "boft")
WRAPPERS = ("ddp", "fsdp2")


def tiny_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def adapter_config(method: str) -> Any:
    import orthotune

    if method == "oft":  # peft's defaults otherwise: Cayley-Neumann, 5 terms
        return orthotune.OFTConfig(r=0, oft_block_size=16, module_dropout=0.0, target_modules=TARGETS)
    return orthotune.BOFTConfig(boft_block_size=8, boft_n_butterfly_factor=2, boft_dropout=0.0, target_modules=TARGETS)


def adapted_model(method: str) -> nn.Module:
    import orthotune

    return orthotune.get_peft_model(tiny_llama(), adapter_config(method))


def global_batch() -> torch.Tensor:
    return torch.randint(0, 128, (GLOBAL_BATCH, SEQ), generator=torch.Generator().manual_seed(1))


def train(model: nn.Module, forward: nn.Module, rows: slice) -> list[float]:
    """:data:`STEPS` SGD steps of ``forward`` (``model`` or its distributed wrapper) on ``rows`` of the batch."""
    tokens = global_batch()[rows]
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    losses = []
    for _ in range(STEPS):
        optimizer.zero_grad()
        loss = forward(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_rank(rank: int, world_size: int, port: int, out_dir: str) -> None:
    """One process of the 2-process run: every (method, wrapper) scenario in turn, one process group."""
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    report: dict[str, Any] = {}
    try:
        for method in METHODS:
            for wrapper in WRAPPERS:
                key = f"{method}-{wrapper}"
                try:
                    report[key] = _scenario(rank, world_size, method, wrapper, os.path.join(out_dir, key))
                except Exception:
                    report[key] = {"error": traceback.format_exc()}
                dist.barrier()
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as file:
            json.dump(report, file)
        dist.destroy_process_group()


def _scenario(rank: int, world_size: int, method: str, wrapper: str, save_dir: str) -> dict[str, Any]:
    per_rank = GLOBAL_BATCH // world_size
    rows = slice(rank * per_rank, (rank + 1) * per_rank)
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
