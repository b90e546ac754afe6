"""Multi-process pieces of the trainer: joining torchrun's process group, picking each rank's device, starting
every rank from rank 0's state, SyncBatchNorm, and the check that the replicas stay identical."""

from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)


def pick_device(device: str | None, world: int, local_rank: int, cuda_available: bool) -> torch.device:
    """The device this rank trains on; always with an index on CUDA.

    ``torch.cuda.set_device`` rejects a bare ``cuda`` (``--device cuda`` would fail before the first step),
    and under torchrun a bare ``cuda`` must still mean this rank's own GPU, not GPU 0."""
    wanted = torch.device(device) if device else torch.device("cuda" if cuda_available else "cpu")
    if wanted.type == "cuda" and wanted.index is None:
        return torch.device("cuda", local_rank if world > 1 else 0)
    return wanted


def init_distributed(device: str | None) -> tuple[int, int, torch.device]:
    """Join the torchrun process group if there is one; pick this rank's device (cuda:LOCAL_RANK)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    chosen = pick_device(device, world, int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.is_available())
    if chosen.type == "cuda":
        torch.cuda.set_device(chosen)  # before init_process_group: NCCL binds to the current device
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if chosen.type == "cuda" else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), chosen
    return 0, 1, chosen


def sync_batchnorm(method: nn.Module, world: int, device: torch.device, rank: int, batch_per_gpu: int) -> None:
    """BatchNorm → SyncBatchNorm across GPUs (main_dino.py: ``if utils.has_batchnorms(student)``).

    Only on CUDA: SyncBatchNorm rejects CPU tensors ("SyncBatchNorm expected input tensor to be on GPU"),
    so CPU/gloo runs keep plain BatchNorm and each process normalises over its own ``batch_size_per_gpu``
    images; DDP's buffer broadcast still keeps the student's running statistics equal to rank 0's.
    """
    policy = getattr(method, "sync_batchnorm", None)
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in method.modules())
    if world == 1 or not has_bn or policy is False:
        return
    if device.type != "cuda":
        if rank == 0:
            log.warning("%s has BatchNorm layers; SyncBatchNorm needs CUDA, so on %s each of the %d processes "
                        "normalises over its own %d images (plain BatchNorm)", getattr(method, "name", method),
                        device.type, world, batch_per_gpu)
        return
    # convert_sync_batchnorm replaces BN children in place (parameters and buffers are reused), so the
    # method's references to its student/teacher wrappers stay valid.
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(method)
    assert converted is method


def broadcast_state(module: nn.Module, world: int) -> None:
    """Start every rank from rank 0's student, teacher and buffers (DDP would only sync the student)."""
    if world == 1:
        return
    for tensor in module.state_dict().values():
        if not isinstance(tensor, torch.Tensor):
            continue
        if tensor.is_contiguous():
            dist.broadcast(tensor, src=0)
        else:
            buffer = tensor.contiguous()
            dist.broadcast(buffer, src=0)
            tensor.copy_(buffer)


def out_of_sync(named: list[tuple[str, torch.Tensor]], world: int) -> list[str]:
    """Names (at most 5) of the tensors whose per-tensor sums differ between ranks; [] with one process."""
    if world == 1:
        return []
    sums = torch.stack([p.detach().double().sum() for _, p in named])
    high, low = sums.clone(), sums.clone()
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    differ = ((high - low).abs() > 1e-6 * (1 + high.abs())).nonzero().flatten().tolist()
    return [named[i][0] for i in differ[:5]]
