"""The one trainer every pretraining method shares.

What it guarantees: per-iteration schedules as DINO's ``cosine_scheduler``; the official update order
(backward → per-parameter clipping → cancel frozen grads → step → teacher EMA, reference/methods/dino.md §1);
atomic checkpoints every N steps and at every epoch end; resume that continues the exact same run (data order
and augmentations are functions of (seed, epoch, index); the RNG is re-seeded from (seed, rank, step) before
every step, so no RNG state has to survive); SIGTERM/SIGUSR1 → checkpoint and exit with ``REQUEUE_EXIT_CODE``;
a non-finite loss stops the run with the step named; metrics as JSONL and TensorBoard scalars.

Hooks a method class may define (all optional; ``PretrainMethod`` documents the required ones):

* ``optimizer_name: ClassVar[str]`` — the optimiser used when ``train.optimizer`` is null (CLoVE: "lars").
* ``param_groups(self) -> list[dict]`` — optimiser groups over ``self.student``'s trainable parameters
  (default: DINO's ``get_params_groups``). A group may carry ``lr_scale`` (multiplies the scheduled lr) and
  ``wd_schedule`` (False keeps its weight decay fixed; default: scheduled unless the group sets
  ``weight_decay=0``).
* ``find_unused_parameters: ClassVar[bool]`` — DDP must tolerate parameters without gradient on some steps.
* ``sync_batchnorm: ClassVar[bool | None]`` — None (default): convert BatchNorm to SyncBatchNorm when the
  method has any, as DINO's ``main_dino.py`` (``utils.has_batchnorms`` → ``convert_sync_batchnorm``) does for
  student and teacher; False: never; True: always (same as None when BN is present).

Multi-GPU: started by torchrun (see ``densessl.train.launch``) the trainer joins the process group (NCCL on
CUDA, gloo on CPU), wraps ``method.student`` in DistributedDataParallel for the duration of ``fit`` (so a
method's ``export_backbone`` sees its plain modules afterwards), shards the data per rank
(``EpochPermutationSampler``), scales the lr with the global batch, writes checkpoints/logs on rank 0 only,
makes all ranks agree on stopping (signal or non-finite loss) through one small all-reduce per step, checks
that the replicas hold identical weights after the first step and at every checkpoint, and ends ``fit`` with
a barrier.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from densessl.errors import ConfigError, DenseSSLError
from densessl.io import atomic_path
from densessl.methods.base import PretrainMethod
from densessl.train.launch import REQUEUE_EXIT_CODE, write_requeue_marker
from densessl.train.sampling import EpochPermutationSampler, SeededAugmentation
from densessl.train.schedules import cosine_schedule

__all__ = ["CHECKPOINT_NAME", "REQUEUE_EXIT_CODE", "NonFiniteLossError", "Preempted", "TrainConfig", "Trainer",
           "build_optimizer", "clip_gradients", "clip_gradients_global_norm", "clip_gradients_per_parameter", "param_groups", "resolve_optimizer_name"]

CHECKPOINT_NAME = "checkpoint.pt"
TENSORBOARD_DIR = "tensorboard"
OPTIMIZERS = ("adamw", "sgd", "lars")
CLIP_MODES = ("per_parameter", "global_norm")
log = logging.getLogger(__name__)


class NonFiniteLossError(DenseSSLError):
    pass


class Preempted(Exception):
    """Raised after the checkpoint is written when SIGTERM/SIGUSR1 arrived."""


@dataclass
class TrainConfig:
    epochs: int = 100                   # DINO --epochs
    batch_size_per_gpu: int = 64        # DINO --batch_size_per_gpu
    lr: float = 0.0005                  # DINO --lr, at total batch 256 (linear scaling)
    min_lr: float = 1e-6                # DINO --min_lr
    warmup_epochs: float = 10           # DINO --warmup_epochs
    weight_decay: float = 0.04          # DINO --weight_decay
    weight_decay_end: float = 0.4       # DINO --weight_decay_end
    momentum_teacher: float = 0.996     # DINO --momentum_teacher (cosine → 1)
    clip_grad: float = 3.0              # DINO --clip_grad (per parameter; 0 disables)
    # how clip_grad is applied: "per_parameter" (DINO utils.clip_gradients; SelfPatch and GTSA inherit it) or
    # "global_norm" over all student gradients together (LOCA: jax.example_libraries.optimizers.clip_grads,
    # max_grad_norm 1.0 in configs/loca_imnet1k_base16.py, loca.md §2)
    clip_mode: str = "per_parameter"
    # adamw | sgd | lars; null = the method's ``optimizer_name`` (CLoVE: lars), else adamw (DINO --optimizer)
    optimizer: str | None = None
    precision: str = "bf16"             # bf16 autocast on CUDA; CPU always runs fp32
    # channels-last weights and images for convolutional backbones (not in the official code; the same
    # arithmetic in another memory layout, tests/test_clove.py). CLoVE ResNet-50 on an H100, bf16, batch 64:
    # 376 vs 360 img/s in two separate runs of benchmarks/train_step.py, within their run-to-run spread (the
    # plain loop read 294 and 341), so off until an interleaved measurement shows a gain.
    channels_last: bool = False
    seed: int = 0                       # DINO --seed
    num_workers: int = 10               # DINO --num_workers
    checkpoint_every_steps: int = 1000  # plus one at every epoch end
    log_every_steps: int = 10
    max_train_images: int | None = None  # use the first N images (smoke runs)
    tensorboard: bool = True            # scalars of every logged metric in <out_dir>/tensorboard (rank 0)
    # processes (GPUs) on this node, read by densessl.train.launch; null = one per GPU of the job
    # (SLURM_GPUS_ON_NODE, CUDA_VISIBLE_DEVICES), 1 without GPU. The paper batch is this × batch_size_per_gpu.
    warmup_start_factor: float = 0.0    # warm-up starts at peak lr × this (DINO 0; CLoVE 0.01, --warmup-multiplier 100)
    min_lr_factor: float | None = None  # set: final lr = peak lr × this, overriding min_lr (CLoVE 0.01, main_pretrain.py)
    nproc_per_node: int | None = None


def pick_device(device: str | None, world: int, local_rank: int, cuda_available: bool) -> torch.device:
    """The device this rank trains on; always with an index on CUDA.

    ``torch.cuda.set_device`` rejects a bare ``cuda`` (found on an H100: ``--device cuda`` failed before the
    first step), and under torchrun a bare ``cuda`` must still mean this rank's own GPU, not GPU 0."""
    wanted = torch.device(device) if device else torch.device("cuda" if cuda_available else "cpu")
    if wanted.type == "cuda" and wanted.index is None:
        return torch.device("cuda", local_rank if world > 1 else 0)
    return wanted


def _init_distributed(device: str | None) -> tuple[int, int, torch.device]:
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


def param_groups(module: nn.Module) -> list[dict[str, Any]]:
    """DINO ``utils.get_params_groups``: no weight decay on biases and norm parameters (ndim ≤ 1)."""
    regularized, not_regularized = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (not_regularized if name.endswith(".bias") or p.ndim == 1 else regularized).append(p)
    return [{"params": regularized}, {"params": not_regularized, "weight_decay": 0.0}]


def _method_param_groups(method: PretrainMethod, student: nn.Module) -> list[dict[str, Any]]:
    """The method's ``param_groups()`` if it has one, else DINO's; checked to cover exactly the student.

    A trainable parameter outside the student would never be averaged across GPUs by DDP, and one left out of
    every group would never move: both are errors rather than silent non-training.
    """
    hook = getattr(method, "param_groups", None)
    groups = [dict(g) for g in hook()] if callable(hook) else param_groups(student)
    student_params = {id(p): name for name, p in student.named_parameters()}
    trainable = {id(p): name for name, p in student.named_parameters() if p.requires_grad}
    seen: set[int] = set()
    for i, group in enumerate(groups):
        if "params" not in group:
            raise DenseSSLError(f"{type(method).__name__}.param_groups(): group {i} has no 'params' key")
        group["params"] = list(group["params"])
        for p in group["params"]:
            if id(p) not in student_params:
                raise DenseSSLError(f"{type(method).__name__}.param_groups(): group {i} holds a parameter of shape "
                                    f"{tuple(p.shape)} that is not a parameter of method.student; "
                                    f"DDP averages only the student's gradients, so move it into the student")
            seen.add(id(p))
    missing = [name for key, name in trainable.items() if key not in seen]
    if missing:
        raise DenseSSLError(f"{type(method).__name__}.param_groups() leaves out trainable student parameters "
                            f"{missing[:5]}{' …' if len(missing) > 5 else ''}; add them to a group or set "
                            f"requires_grad=False")
    for group in groups:
        group.setdefault("wd_schedule", group.get("weight_decay") != 0.0)
        group.setdefault("lr_scale", 1.0)
    return groups


def clip_gradients_per_parameter(module: nn.Module, clip: float) -> None:
    """DINO ``utils.clip_gradients``: each parameter's gradient norm is clipped separately, not globally.

    The official loop tests ``clip_coef < 1`` in Python, one device sync per parameter; multiplying by
    ``min(clip_coef, 1)`` instead gives bit-identical gradients (x · 1.0 = x) without leaving the device.
    """
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return
    norms = torch.stack(torch._foreach_norm(grads, 2.0))
    coefs = torch.clamp(clip / (norms.float() + 1e-6), max=1.0)
    torch._foreach_mul_(grads, [c.to(g.dtype) for g, c in zip(grads, coefs.unbind(), strict=True)])


def clip_gradients_global_norm(module: nn.Module, clip: float) -> None:
    """LOCA's ``clip_grads``: scale every gradient by ``clip / ‖g‖`` when the norm ‖g‖ over all of them exceeds
    ``clip``. Under DDP the gradients are already averaged, so every rank computes the same norm. torch's
    ``clip_grad_norm_`` divides by ‖g‖ + 1e-6 where jax divides by ‖g‖: a relative difference below 1e-6."""
    grads = [p for p in module.parameters() if p.grad is not None]
    if grads:
        torch.nn.utils.clip_grad_norm_(grads, clip, norm_type=2.0)


def clip_gradients(module: nn.Module, clip: float, mode: str) -> None:
    """Clip the student's gradients the way its method's official code does (``TrainConfig.clip_mode``)."""
    if mode == "global_norm":
        clip_gradients_global_norm(module, clip)
    else:
        clip_gradients_per_parameter(module, clip)


def resolve_optimizer_name(configured: str | None, method: PretrainMethod | type[PretrainMethod]) -> str:
    """``train.optimizer`` if set, else the method's ``optimizer_name``, else DINO's adamw."""
    name = configured if configured is not None else getattr(method, "optimizer_name", None) or "adamw"
    if name not in OPTIMIZERS:
        source = "train.optimizer" if configured is not None else f"{getattr(method, 'name', method)}.optimizer_name"
        raise ConfigError(f"{source}: {name!r} is not supported; use one of {list(OPTIMIZERS)}")
    return name


def build_optimizer(name: str, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    """lr and weight decay are set by the schedules before every step; only the fixed settings live here."""
    if name == "adamw":
        return torch.optim.AdamW(groups)  # DINO: torch.optim.AdamW(params_groups), torch defaults
    if name == "sgd":
        return torch.optim.SGD(groups, lr=0, momentum=0.9)  # DINO: SGD(params_groups, lr=0, momentum=0.9)
    if name == "lars":
        try:
            from densessl.train.lars import LARS
        except ImportError as exc:
            raise ConfigError(f"train.optimizer: 'lars' needs densessl.train.lars.LARS, which cannot be imported "
                              f"({exc}); use 'adamw' or 'sgd', or install a densessl version that has it") from exc
        return LARS(groups)
    raise ConfigError(f"train.optimizer: {name!r} is not supported; use one of {list(OPTIMIZERS)}")


def _step_seed(seed: int, rank: int, step: int) -> int:
    """A distinct RNG seed per (run seed, rank, step): dropout/drop-path of step t never depend on resume."""
    return ((seed * 1_000_003 + step) * 65_537 + rank) % (2**63 - 1)


class Trainer:
    def __init__(self, method: PretrainMethod, dataset: Any, cfg: TrainConfig, out_dir: str | Path,
                 device: str | None = None):
        self.cfg = cfg
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.rank, self.world, self.device = _init_distributed(device)
        if cfg.nproc_per_node is not None:
            per_node = int(os.environ.get("LOCAL_WORLD_SIZE", self.world))
            if per_node != cfg.nproc_per_node:
                raise ConfigError(f"train.nproc_per_node={cfg.nproc_per_node}, but this run has {per_node} process(es) "
                                  f"on the node; start it with `python -m densessl pretrain` (densessl.train.launch) "
                                  f"or torchrun --nproc_per_node {cfg.nproc_per_node}, or set nproc_per_node: null")
        if cfg.precision not in ("bf16", "fp32"):
            raise ConfigError(f"train.precision: {cfg.precision!r}; allowed values: bf16, fp32")
        if cfg.clip_mode not in CLIP_MODES:
            raise ConfigError(f"train.clip_mode: {cfg.clip_mode!r}; allowed values: {', '.join(CLIP_MODES)} "
                              f"(DINO, SelfPatch, GTSA: per_parameter; LOCA: global_norm)")
        torch.manual_seed(cfg.seed + self.rank)
        self.method = method.to(self.device)
        if cfg.channels_last:
            self.method.to(memory_format=torch.channels_last)
        self._sync_batchnorm()
        self._broadcast_method_state()
        self.dataset = SeededAugmentation(dataset, method.views(), cfg.seed)
        self.sampler = EpochPermutationSampler(len(dataset), cfg.batch_size_per_gpu, cfg.seed, self.rank, self.world)
        if self.sampler.batches_per_epoch == 0:
            raise DenseSSLError(f"train.batch_size_per_gpu={cfg.batch_size_per_gpu} × {self.world} GPU(s) is larger "
                                f"than the dataset ({len(dataset)} images); lower the batch size")
        self.iters_per_epoch = self.sampler.batches_per_epoch
        self.total_batch = cfg.batch_size_per_gpu * self.world
        peak = cfg.lr * self.total_batch / 256.0  # linear scaling rule (DINO, CLoVE main_pretrain.py)
        final = peak * cfg.min_lr_factor if cfg.min_lr_factor is not None else cfg.min_lr
        self.lr_schedule = cosine_schedule(peak, final, cfg.epochs, self.iters_per_epoch, cfg.warmup_epochs,
                                           start_warmup_value=peak * cfg.warmup_start_factor)
        self.wd_schedule = cosine_schedule(cfg.weight_decay, cfg.weight_decay_end, cfg.epochs, self.iters_per_epoch)
        self.momentum_schedule = cosine_schedule(cfg.momentum_teacher, 1.0, cfg.epochs, self.iters_per_epoch)
        self.optimizer_name = resolve_optimizer_name(cfg.optimizer, method)
        self.optimizer = build_optimizer(self.optimizer_name, _method_param_groups(method, self.method.student))
        self.autocast = self.device.type == "cuda" and cfg.precision == "bf16"
        self.epoch = 0
        self.batch_in_epoch = 0
        self._stop_signal: int | None = None
        self._ddp: nn.parallel.DistributedDataParallel | None = None
        self._writer: Any = None

    # ----------------------------------------------------------------------------------------- setup
    def _sync_batchnorm(self) -> None:
        """BatchNorm → SyncBatchNorm across GPUs (main_dino.py: ``if utils.has_batchnorms(student)``).

        Only on CUDA: SyncBatchNorm rejects CPU tensors ("SyncBatchNorm expected input tensor to be on GPU"),
        so CPU/gloo runs keep plain BatchNorm and each process normalises over its own ``batch_size_per_gpu``
        images; DDP's buffer broadcast still keeps the student's running statistics equal to rank 0's.
        """
        policy = getattr(self.method, "sync_batchnorm", None)
        has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.method.modules())
        if self.world == 1 or not has_bn or policy is False:
            return
        if self.device.type != "cuda":
            if self.rank == 0:
                log.warning("%s has BatchNorm layers; SyncBatchNorm needs CUDA, so on %s each of the %d processes "
                            "normalises over its own %d images (plain BatchNorm)", self.method.name,
                            self.device.type, self.world, self.cfg.batch_size_per_gpu)
            return
        # convert_sync_batchnorm replaces BN children in place (parameters and buffers are reused), so the
        # method's references to its student/teacher wrappers stay valid.
        converted = nn.SyncBatchNorm.convert_sync_batchnorm(self.method)
        assert converted is self.method

    def _broadcast_method_state(self) -> None:
        """Start every rank from rank 0's student, teacher and buffers (DDP would only sync the student)."""
        if self.world == 1:
            return
        for tensor in self.method.state_dict().values():
            if not isinstance(tensor, torch.Tensor):
                continue
            if tensor.is_contiguous():
                dist.broadcast(tensor, src=0)
            else:
                buffer = tensor.contiguous()
                dist.broadcast(buffer, src=0)
                tensor.copy_(buffer)

    def _wrap_student(self) -> None:
        if self.world == 1:
            return
        if self._ddp is None:
            kwargs: dict[str, Any] = {
                "find_unused_parameters": bool(getattr(self.method, "find_unused_parameters", False))}
            if self.device.type == "cuda":
                kwargs["device_ids"] = [self.device.index]
            self._ddp = nn.parallel.DistributedDataParallel(self.method.student, **kwargs)
        self.method.student = self._ddp

    def _unwrap_student(self) -> None:
        if self._ddp is not None:
            self.method.student = self._ddp.module

    # ----------------------------------------------------------------------------------------- state
    @property
    def step(self) -> int:
        return self.epoch * self.iters_per_epoch + self.batch_in_epoch

    @property
    def total_steps(self) -> int:
        return self.cfg.epochs * self.iters_per_epoch

    def _student(self) -> nn.Module:
        s = self.method.student
        return s.module if isinstance(s, nn.parallel.DistributedDataParallel) else s

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": "densessl-train/1",
            "method": self.method.name,
            "student": self._student().state_dict(),
            "teacher": self.method.teacher.state_dict() if self.method.teacher is not None else {},
            "extra": self.method.extra_state(),
            "optimizer": self.optimizer.state_dict(),
            "optimizer_name": self.optimizer_name,
            "world_size": self.world,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "train_config": asdict(self.cfg),
        }

    def save_checkpoint(self, path: Path | None = None) -> Path:
        """Rank 0 writes atomically; the other ranks return at once (no collective here)."""
        path = path or self.out_dir / CHECKPOINT_NAME
        if self.rank == 0:
            with atomic_path(path) as tmp:
                torch.save(self.state_dict(), tmp)
            if self._writer is not None:
                self._writer.flush()
        return path

    def load_checkpoint(self, path: Path) -> None:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state.get("method") != self.method.name:
            raise DenseSSLError(f"{path}: checkpoint of method {state.get('method')!r}, but this run trains "
                                f"{self.method.name!r}; delete the file or choose another output directory")
        saved_world = int(state.get("world_size", self.world))
        if saved_world != self.world:
            raise DenseSSLError(f"{path}: written by a run on {saved_world} process(es), resumed on {self.world}; "
                                f"the data shards and lr scaling would change mid-run. Resume with "
                                f"train.nproc_per_node={saved_world}, or delete the checkpoint to start over")
        saved_optimizer = state.get("optimizer_name", self.optimizer_name)
        if saved_optimizer != self.optimizer_name:
            raise DenseSSLError(f"{path}: optimiser state of {saved_optimizer!r}, but this run uses "
                                f"{self.optimizer_name!r}; set train.optimizer: {saved_optimizer} or delete the checkpoint")
        self._student().load_state_dict(state["student"])
        if self.method.teacher is not None:
            self.method.teacher.load_state_dict(state["teacher"])
        self.method.load_extra_state({k: v.to(self.device) for k, v in state["extra"].items()})
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch, self.batch_in_epoch = int(state["epoch"]), int(state["batch_in_epoch"])
        self._truncate_metrics()

    # ----------------------------------------------------------------------------------------- logging
    def _truncate_metrics(self) -> None:
        """Drop JSONL records of steps after the checkpoint: they are recomputed (identically) on resume."""
        path = self.out_dir / "metrics.jsonl"
        if self.rank != 0 or not path.exists():
            return
        lines = path.read_text(encoding="utf-8").splitlines()
        keep = [line for line in lines if line.strip() and json.loads(line).get("step", -1) < self.step]
        if len(keep) != len(lines):
            with atomic_path(path) as tmp:
                tmp.write_text("".join(line + "\n" for line in keep), encoding="utf-8")

    def _open_tensorboard(self) -> None:
        if self.rank != 0 or not self.cfg.tensorboard:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise ConfigError(f"train.tensorboard: true needs the tensorboard package ({exc}); install it "
                              f"(pip install tensorboard) or set train.tensorboard: false") from exc
        # purge_step hides events a killed run logged after its last checkpoint (they are logged again)
        self._writer = SummaryWriter(log_dir=str(self.out_dir / TENSORBOARD_DIR),
                                     purge_step=self.step if self.step > 0 else None)

    def _close_tensorboard(self) -> None:
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
            self._writer = None

    def _record_attempt(self, record: dict[str, Any]) -> None:
        """Append one line to ``attempts.jsonl``: when each attempt of the run started (resumed or not) and how
        it ended. Why a file of its own: the stage log belongs to Snakemake, which deletes it before re-running
        a failed (e.g. preempted, exit 3) job, so a requeued run's history would otherwise be lost."""
        if self.rank != 0:
            return
        record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **record,
                  "slurm_job_id": os.environ.get("SLURM_JOB_ID")}
        with open(self.out_dir / "attempts.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def _log(self, record: dict[str, Any]) -> None:
        if self.rank != 0:
            return
        with open(self.out_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self._writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._writer.add_scalar(f"train/{key}", value, global_step=record["step"])

    # ----------------------------------------------------------------------------------------- collectives
    def _barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def _agree(self, loss: torch.Tensor) -> tuple[float, float, bool, bool]:
        """(local loss, mean loss over ranks, every rank finite, some rank got a stop signal): one all-reduce."""
        local = float(loss.detach())
        finite = math.isfinite(local)
        stop = self._stop_signal is not None
        if self.world == 1:
            return local, local, finite, stop
        flags = torch.tensor([0.0 if finite else 1.0, 1.0 if stop else 0.0, local if finite else 0.0],
                             dtype=torch.float64, device=self.device)
        dist.all_reduce(flags)
        bad, stops, total = flags.tolist()
        return local, total / self.world, bad == 0, stops > 0

    def check_replicas_in_sync(self, step: int) -> None:
        """Every rank must hold the same student and teacher parameters; compared by per-tensor sums."""
        if self.world == 1:
            return
        named = [(f"student.{n}", p) for n, p in self._student().named_parameters()]
        if self.method.teacher is not None:
            named += [(f"teacher.{n}", p) for n, p in self.method.teacher.named_parameters()]
        sums = torch.stack([p.detach().double().sum() for _, p in named])
        high, low = sums.clone(), sums.clone()
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        differ = ((high - low).abs() > 1e-6 * (1 + high.abs())).nonzero().flatten().tolist()
        if differ:
            names = [named[i][0] for i in differ[:5]]
            raise DenseSSLError(f"after step {step} the {self.world} processes hold different weights for {names}: "
                                f"{self.method.name}.loss must run the student as self.student(...) (the DDP "
                                f"wrapper averages gradients only then), update parameters only through the "
                                f"optimiser and update_teacher, and set find_unused_parameters = True on the "
                                f"method class if some parameters get no gradient on some steps")

    # ----------------------------------------------------------------------------------------- loop
    def _handle_signal(self, signum: int, _frame: Any) -> None:
        self._stop_signal = signum

    def _loader(self) -> DataLoader:
        self.dataset.set_epoch(self.epoch)
        self.sampler.set_epoch(self.epoch, self.batch_in_epoch)
        return DataLoader(self.dataset, batch_size=self.cfg.batch_size_per_gpu, sampler=self.sampler,
                          num_workers=self.cfg.num_workers, pin_memory=self.device.type == "cuda",
                          drop_last=True, persistent_workers=False)

    def train_step(self, batch: Any, it: int) -> tuple[float, dict[str, float], bool]:
        """One optimisation step at global iteration ``it``: (mean loss over ranks, method logs, stop now?).

        Used by ``fit`` and by benchmarks/train_step.py, so the benchmark times exactly this path.
        """
        for group in self.optimizer.param_groups:
            group["lr"] = float(self.lr_schedule[it]) * group.get("lr_scale", 1.0)
            if group.get("wd_schedule", True):  # DINO: only the regularised group follows the schedule
                group["weight_decay"] = float(self.wd_schedule[it])
        torch.manual_seed(_step_seed(self.cfg.seed, self.rank, it))
        batch = _to_device(batch, self.device, self.cfg.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            loss, logs = self.method.loss(batch, self.epoch)
        local, mean, finite, stop = self._agree(loss)
        if not finite:
            where = f"loss is {local}" if not math.isfinite(local) else "loss is non-finite on another rank"
            raise NonFiniteLossError(f"{where} at step {it} (epoch {self.epoch}); lower train.lr or disable bf16 "
                                     f"(train.precision: fp32)")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.clip_grad > 0:
            clip_gradients(self._student(), self.cfg.clip_grad, self.cfg.clip_mode)
        self.method.cancel_gradients(self.epoch)
        self.optimizer.step()
        self.method.update_teacher(float(self.momentum_schedule[it]))
        return mean, logs, stop

    def fit(self, max_steps: int | None = None) -> dict[str, Any]:
        """Train to the end (or ``max_steps`` more steps, used by tests); resume from the checkpoint if any."""
        checkpoint = self.out_dir / CHECKPOINT_NAME
        resumed = checkpoint.exists()
        if resumed:
            self.load_checkpoint(checkpoint)
            if self.rank == 0:
                print(f"resuming from {checkpoint} at step {self.step} of {self.total_steps} (epoch {self.epoch})",
                      file=sys.stderr, flush=True)
        self._record_attempt({"event": "start", "step": self.step, "resumed": resumed})
        previous = {s: signal.signal(s, self._handle_signal) for s in (signal.SIGTERM, signal.SIGUSR1)}
        steps_done, start = 0, time.time()
        last_loss = math.nan
        try:
            self._wrap_student()
            self._open_tensorboard()
            progress = tqdm(total=self.total_steps, initial=self.step, desc=f"pretrain {self.method.name}",
                            disable=None if self.rank == 0 else True, unit="step")
            clock, steps_since_log = time.perf_counter(), 0
            while self.epoch < self.cfg.epochs:
                for batch in self._loader():
                    it = self.step
                    last_loss, logs, stop = self.train_step(batch, it)
                    self.batch_in_epoch += 1
                    steps_done += 1
                    steps_since_log += 1
                    progress.update(1)
                    if steps_done == 1:
                        self.check_replicas_in_sync(it)
                    if it % self.cfg.log_every_steps == 0 or self.step == self.total_steps:
                        now = time.perf_counter()
                        self._log({"step": it, "epoch": self.epoch, "loss": last_loss,
                                   "lr": float(self.lr_schedule[it]), "wd": float(self.wd_schedule[it]),
                                   "momentum": float(self.momentum_schedule[it]), **logs,
                                   "images_per_s": steps_since_log * self.total_batch / max(now - clock, 1e-9)})
                        clock, steps_since_log = now, 0
                        progress.set_postfix(loss=f"{last_loss:.3f}")
                    if stop:
                        self.save_checkpoint()
                        self._barrier()
                        message = f"signal {self._stop_signal or 'on another rank'} at step {self.step}; checkpoint saved"
                        if self.rank == 0:
                            write_requeue_marker(message)
                        self._record_attempt({"event": "preempted", "step": self.step,
                                              "signal": signal.Signals(self._stop_signal).name
                                              if self._stop_signal else "on another rank"})
                        raise Preempted(message)
                    if self.step % self.cfg.checkpoint_every_steps == 0:
                        self.check_replicas_in_sync(it)
                        self.save_checkpoint()
                    if max_steps is not None and steps_done >= max_steps:
                        self.check_replicas_in_sync(it)
                        self.save_checkpoint()
                        self._barrier()
                        self._record_attempt({"event": "paused", "step": self.step})
                        return {"stopped_at_step": self.step, "last_loss": last_loss}
                self.epoch += 1
                self.batch_in_epoch = 0
                self.check_replicas_in_sync(self.step - 1)
                self.save_checkpoint()
            progress.close()
            self._barrier()
            self._record_attempt({"event": "finished", "step": self.step, "steps_this_run": steps_done})
        except Exception as exc:
            if not isinstance(exc, Preempted):  # recorded above, with its signal
                self._record_attempt({"event": "failed", "step": self.step, "error": f"{type(exc).__name__}: {exc}"})
            raise
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            self._close_tensorboard()
            self._unwrap_student()
        return {"steps": self.total_steps, "last_loss": last_loss, "wall_s": time.time() - start,
                "steps_this_run": steps_done}


def _to_device(batch: Any, device: torch.device, channels_last: bool = False) -> Any:
    if isinstance(batch, torch.Tensor):
        moved = batch.to(device, non_blocking=True)
        return moved.contiguous(memory_format=torch.channels_last) if channels_last and moved.ndim == 4 else moved
    if isinstance(batch, dict):
        return {k: _to_device(v, device, channels_last) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device, channels_last) for v in batch)
    return batch
