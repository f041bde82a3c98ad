"""FSDP2 setup for the trainer: process group, sharding, cross-rank sums and syncs."""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from torch import nn


def init_distributed() -> tuple[int, int, torch.device]:
    """(rank, world, device); joins the torchrun process group when launched by torchrun."""
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", rank % max(torch.cuda.device_count(), 1)))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def shard(model: nn.Module, blocks: list[str]) -> nn.Module:
    """FSDP2: fully_shard each block (outermost first-level blocks only), then the root."""
    from torch.distributed.fsdp import fully_shard

    top = [b for b in blocks if not any(b != o and b.startswith(o + ".") for o in blocks)]
    for path in top:
        fully_shard(model.get_submodule(path))
    fully_shard(model)
    return model


def local_param_bytes(model: nn.Module) -> int:
    """Bytes of parameters this rank holds (its shards under FSDP2)."""
    total = 0
    for p in model.parameters():
        t = p.to_local() if hasattr(p, "to_local") else p
        total += t.numel() * t.element_size()
    return total


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    total = 0
    for state in opt.state.values():
        for v in state.values():
            if isinstance(v, torch.Tensor):
                t = v.to_local() if hasattr(v, "to_local") else v
                total += t.numel() * t.element_size()
    return total


def all_sum(values: list[float], device: torch.device) -> list[float]:
    if not dist.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def sync_from_rank0(modules: list[nn.Module]) -> None:
    """Broadcast rank 0's parameters and buffers, so every rank shards the same model."""
    with torch.no_grad():
        for m in modules:
            for t in [*m.parameters(), *m.buffers()]:
                dist.broadcast(t.data, src=0)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def any_rank(flag: bool, device: torch.device) -> bool:
    return all_sum([float(flag)], device)[0] > 0


def exit_distributed(code: int) -> int:
    """End a process that joined a process group: destroy the group, flush output and exit with
    `code` at once; without a group, return `code`.

    Gloo's worker threads free a finished collective's tensors after its caller has woken, and that
    needs the GIL. One still doing so when the interpreter finalizes takes the GIL of a dying
    interpreter and the process aborts (SIGABRT after all its output was written, which fails the
    launcher); skipping finalization closes that window. Every file fxcook writes is complete by
    then (atomic writes), so nothing is lost."""
    if not dist.is_initialized():
        return code
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
