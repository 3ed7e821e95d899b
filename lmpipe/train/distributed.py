"""DDP under `torchrun`: process group, device, model wrapping and the few collectives we use.

A plain `python -m stages.X` is a world of one and every helper here is a no-op. Under
`torchrun --nproc_per_node N` (env RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) the first
call to `init_from_env` opens the process group (gloo on CPU, nccl on CUDA) and pins each rank
to `cuda:LOCAL_RANK`. Only rank 0 writes files and logs (`is_main()`); ranks hold identical
weights because DDP broadcasts rank 0's at wrap time and averages gradients every step.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_info() -> DistInfo:
    """Rank, world size and local rank from torchrun's environment (a world of one without it)."""
    return DistInfo(
        rank=int(os.environ.get("RANK", "0")),
        world_size=int(os.environ.get("WORLD_SIZE", "1")),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
    )


def current() -> DistInfo:
    """The job as torch.distributed sees it (the environment's view before init)."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), env_info().local_rank)
    return DistInfo()


def init_from_env(device: torch.device) -> tuple[DistInfo, torch.device]:
    """Open the process group when launched by torchrun (idempotent); return (info, device).

    The device is `device` itself on CPU, `cuda:LOCAL_RANK` on CUDA. On CPU the intra-op
    threads set so far (base.threads) are shared among the LOCAL_WORLD_SIZE processes of the
    machine, so 2 processes on 2 cores run 1 thread each instead of fighting over the cores.
    """
    info = env_info()
    if not info.enabled:
        return info, device
    if device.type == "cuda":
        torch.cuda.set_device(info.local_rank)
        device = torch.device("cuda", info.local_rank)
    elif not dist.is_initialized():
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", info.world_size))
        torch.set_num_threads(max(1, torch.get_num_threads() // local_world))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return current(), device


def is_main() -> bool:
    """True on rank 0 (and in a plain single-process run): the one process that writes."""
    return current().is_main


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel around `model` when distributed, else `model` itself."""
    if not current().enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DDP wrapper (or the module itself)."""
    return getattr(model, "module", model)


def broadcast(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s picklable `obj` on every rank (the object itself when not distributed)."""
    if not current().enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather(obj: Any) -> list[Any]:
    """Every rank's picklable `obj`, in rank order ([obj] when not distributed)."""
    info = current()
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum over ranks of a short list of floats (float64 so sums stay exact-ish)."""
    if not current().enabled:
        return list(values)
    backend_device = device if dist.get_backend() == "nccl" else torch.device("cpu")
    tensor = torch.tensor(values, dtype=torch.float64, device=backend_device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def barrier() -> None:
    if current().enabled:
        dist.barrier()


def shutdown() -> None:
    """Close the process group (call once at the very end of a torchrun job)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
