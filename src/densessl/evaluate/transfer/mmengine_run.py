"""The mmengine glue every OpenMMLab protocol shares (mmsegmentation, mmdetection).

A protocol module generates the toolkit's config as a plain dict (model, data, optimiser, schedule,
evaluators: everything the toolkit's own config files would hold) and hands it to :func:`train_and_test`,
which adds what belongs to the run rather than to the protocol and drives the toolkit's own ``Runner``:

* ``work_dir`` (the folder next to ``metrics.json``; the toolkit writes its logs, the resolved config,
  its scalars JSON and its checkpoints there), seed, launcher (``pytorch`` when torchrun started several
  processes, one per GPU; without CUDA they join a gloo group, :func:`join_cpu_process_group`), torch threads;
* resume: a re-run continues from the newest mmengine checkpoint in ``work_dir`` (mmengine's own
  ``resume=True``, found through the ``last_checkpoint`` file its ``CheckpointHook`` writes). mmengine writes
  its checkpoints in place, so a kill while writing, or a disk fault, leaves a torn file that ``resume`` would
  fail on at every retry: the one ``last_checkpoint`` names is verified first (its zip CRCs) and, when torn,
  the newest complete one takes its place (:func:`usable_resume_checkpoint`); the checkpoint hook keeps at
  least two (``max_keep_ckpts`` ≥ 2) so that a complete previous one exists;
* preemption: SIGTERM/SIGINT/SIGUSR1 during training (SLURM signals every process of the step, DataLoader
  workers too, which therefore ignore them: :data:`WORKER_INIT`) → checkpoint at the end of the current iteration, then
  :class:`densessl.train.trainer.Preempted`, which the CLI turns into exit code 3 and, inside a SLURM job, a
  requeue of the job (``densessl.train.requeue``), as ``evaluate/resume.py`` does for our own fine-tunings;
* the metrics: ``Runner.test()`` returns what the toolkit's evaluator computed (never re-implemented).

Weights. Our backbones go in as safetensors through a ``safetensors://`` scheme registered with mmengine's
``CheckpointLoader``, so the toolkit's own ``init_cfg=dict(type='Pretrained', checkpoint=...)`` path loads
them (with the toolkit's own position-embedding resizing). mmengine's checkpoints for resuming are pickles
(they hold the message hub and scheduler states); ``torch.load`` reads them with ``weights_only=True`` plus the
explicit allow-list :data:`RESUME_SAFE_GLOBALS`, never as an unchecked pickle.
"""

from __future__ import annotations

import importlib
import logging
import os
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from densessl.errors import ConfigError
from densessl.evaluate.resume import StopSignals
from densessl.io import write_text
from densessl.train.signals import ignore_stop_signals
from densessl.train.trainer import Preempted

log = logging.getLogger(__name__)

SAFETENSORS_SCHEME = "safetensors://"
TOOLKIT_FIX = "install the OpenMMLab stack: make env (runs envs/build_mmcv.py); check it with: python -m densessl doctor"


def require(module: str, what: str) -> Any:
    """Import ``module`` or raise one line naming the toolkit and the fix (missing or broken build)."""
    try:
        return importlib.import_module(module)
    except Exception as exc:  # ImportError, or a compiled extension that fails to load (OSError, undefined symbol)
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"{what}: cannot import {module} ({first}); {TOOLKIT_FIX}") from exc


def require_mmcv_ops() -> None:
    """The compiled mmcv extension, which mmseg's and mmdet's heads and metrics import at model build."""
    require("mmcv", "mmcv")
    require("mmcv._ext", "mmcv compiled ops (a build without MMCV_WITH_OPS=1, or against another torch)")


MMCV_REBUILD_FIX = ("rebuild it for the installed torch: python envs/build_mmcv.py --rebuild (compiles the pinned "
                    "sdist with its ops, about 15 minutes on 2 cores)")


def check_mmcv_ops() -> str:
    """Run mmcv's compiled RoIAlign and NMS on tiny tensors (what ``densessl doctor`` checks); return a summary.

    A wheel built against another torch imports but fails on the first op (undefined symbol), and one built
    without MMCV_WITH_OPS=1 has no ``mmcv._ext``: both end here with one line and the fix."""
    try:
        import mmcv
        from mmcv.ops import RoIAlign, nms
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"mmcv.ops does not import ({first}); {MMCV_REBUILD_FIX}") from exc
    try:
        feats = torch.arange(64.0).reshape(1, 1, 8, 8)
        pooled = RoIAlign((2, 2), spatial_scale=1.0, sampling_ratio=0)(feats, torch.tensor([[0.0, 0.0, 0.0, 4.0, 4.0]]))
        boxes = torch.tensor([[0.0, 0.0, 4.0, 4.0], [0.0, 0.0, 4.0, 4.1], [6.0, 6.0, 8.0, 8.0]])
        _, keep = nms(boxes, torch.tensor([0.9, 0.8, 0.7]), 0.5)
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"mmcv {mmcv.__version__} ops fail on a tiny input ({first}); {MMCV_REBUILD_FIX}") from exc
    if tuple(pooled.shape) != (1, 1, 2, 2) or keep.tolist() != [0, 2]:
        raise ConfigError(f"mmcv {mmcv.__version__} ops give wrong results (RoIAlign {tuple(pooled.shape)}, NMS kept "
                          f"{keep.tolist()}); {MMCV_REBUILD_FIX}")
    return f"mmcv {mmcv.__version__}: RoIAlign and NMS OK"


@dataclass
class ToolkitRun:
    """What a run adds to a protocol's toolkit config."""

    work_dir: Path
    scope: str                 # the toolkit's registry scope: "mmseg" | "mmdet"
    seed: int = 0
    threads: int | None = None  # torch CPU threads (None: leave as set by the CLI)
    device: str | None = None   # "cpu" | "cuda" | None (whatever is visible)
    deterministic: bool = False
    log_level: str = "INFO"


def safetensors_uri(path: str | os.PathLike[str]) -> str:
    """The ``checkpoint`` value of an ``init_cfg=dict(type='Pretrained', ...)`` that loads ``path``."""
    return SAFETENSORS_SCHEME + str(Path(path).resolve())


def _load_safetensors(filename: str, map_location: Any = None) -> dict[str, Any]:
    from safetensors.torch import load_file

    path = filename[len(SAFETENSORS_SCHEME):]
    if not Path(path).is_file():
        raise ConfigError(f"{path}: exported backbone for the toolkit not found")
    return {"state_dict": load_file(path, device="cpu")}


def register_safetensors_loader() -> None:
    from mmengine.runner import CheckpointLoader

    CheckpointLoader.register_scheme(prefixes=SAFETENSORS_SCHEME, loader=_load_safetensors, force=True)


def _rebuild_history_buffer(buffer: Any) -> tuple[Any, tuple[Any, ...]]:
    """Pickle mmengine's ``HistoryBuffer`` (the message hub's log buffers) as a constructor call on plain lists.

    Its default pickle carries the class's statistics methods as ``getattr(HistoryBuffer, 'min')``; allowing
    ``getattr`` in ``torch.load(weights_only=True)`` would let a checkpoint call any attribute of any allowed
    object, so the buffer is written as ``HistoryBuffer(log_history, count_history, max_length)`` instead,
    which the allow-list can admit by the class alone."""
    return type(buffer), (buffer._log_history.tolist(), buffer._count_history.tolist(), buffer.max_length)


def _pickle_buffers_plainly() -> None:
    import copyreg

    from mmengine.logging import HistoryBuffer

    copyreg.pickle(HistoryBuffer, _rebuild_history_buffer)


def resume_safe_globals() -> list[Any]:
    """Types an mmengine training checkpoint holds besides tensors and builtins (the message hub's log buffers,
    numpy scalars and arrays in its runtime info): the allow-list for ``torch.load(weights_only=True)``."""
    import numpy as np
    from mmengine.logging import HistoryBuffer

    multiarray = np._core.multiarray
    from_numpy: list[Any] = [np.ndarray, np.dtype, multiarray._reconstruct, multiarray.scalar]
    from_numpy += [type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32", "bool", "uint8")]
    return [HistoryBuffer, *from_numpy]


def _device_check(device: str | None) -> None:
    if device is None:
        return
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"--device {device!r}: the toolkit protocols run on 'cpu' or 'cuda'")
    visible = torch.cuda.is_available()
    if device == "cuda" and not visible:
        raise ConfigError("--device cuda: no CUDA device is visible to torch; run on a GPU node or use --device cpu")
    if device == "cpu" and visible:
        # mmengine places the model on every visible GPU by itself; hiding them is the only switch it has
        raise ConfigError("--device cpu with a CUDA device visible: mmengine would use the GPU; run with "
                          "CUDA_VISIBLE_DEVICES= to train on the CPU")


def _launcher() -> str:
    return "pytorch" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "none"


def world_size() -> int:
    """Processes of this run (torchrun's WORLD_SIZE, else 1): the protocols split the global batch by it."""
    return max(1, int(os.environ.get("WORLD_SIZE", "1")))


def rank() -> int:
    """This process's rank in the run (0 alone): only rank 0 writes what the stage declares as its output."""
    return int(os.environ.get("RANK", "0"))


def _cpu_processes() -> bool:
    """Several processes and no CUDA: the gloo path of the multi-process launch (how it is tested without a GPU)."""
    return world_size() > 1 and not torch.cuda.is_available()


def join_cpu_process_group() -> None:
    """Join torchrun's process group over gloo when there is no CUDA device.

    mmengine's ``pytorch`` launcher (``mmengine/dist/utils.py`` ``_init_dist_pytorch``) calls
    ``torch.cuda.set_device(LOCAL_RANK)`` before it initialises the group, which fails without CUDA; its
    Runner initialises the group only when none exists yet (``Runner.setup_env``), so joining it here first
    leaves the rest of the toolkit's distributed path (samplers, DDP, result collection) unchanged."""
    import torch.distributed as dist

    if _cpu_processes() and not dist.is_initialized():
        dist.init_process_group(backend="gloo")  # env:// from torchrun's MASTER_ADDR/PORT, RANK, WORLD_SIZE


def _preemption_hook(signals: StopSignals) -> Any:
    from mmengine.dist import all_reduce, barrier, get_comm_device, get_world_size, is_main_process
    from mmengine.hooks import Hook

    def stop_anywhere() -> bool:
        """Whether any process has received a stop signal. The processes agree at every iteration: a signal
        reaches them at slightly different times, and a rank that stopped alone would leave the others waiting
        in the next iteration's gradient all-reduce, with no checkpoint written (the trainer agrees likewise)."""
        if get_world_size() == 1:
            return signals.received is not None
        flag = torch.tensor([0 if signals.received is None else 1], device=get_comm_device())
        all_reduce(flag, op="max")
        return bool(flag.item())

    class PreemptionHook(Hook):
        """Checkpoint and stop at the end of the iteration in which SIGTERM/SIGUSR1 arrived (on any process)."""

        priority = "LOWEST"

        def after_train_iter(self, runner: Any, batch_idx: int, data_batch: Any = None,
                             outputs: Any = None) -> None:
            if not stop_anywhere():
                return
            name = f"iter_{runner.iter + 1}.pth"
            # by_epoch=False records (epoch, iter + 1): the iteration just finished. An epoch-based loop
            # resumed from it restarts the unfinished epoch's data pass (mmengine resumes epochs, not iterations).
            runner.save_checkpoint(runner.work_dir, name, by_epoch=False)
            path = Path(runner.work_dir) / name
            if is_main_process():  # save_checkpoint writes on rank 0 only; so does the pointer to it
                (Path(runner.work_dir) / "last_checkpoint").write_text(str(path))  # what resume=True reads
            barrier()  # no rank exits (and gets the rest stopped by torchrun) before rank 0 has written
            raise Preempted(f"signal {signals.received or 'on another rank'} at iteration {runner.iter + 1}; "
                            f"toolkit checkpoint saved to {path}")

    return PreemptionHook()


KEEP_CHECKPOINTS = 2  # the newest and the one before it, for when the newest is torn
WORKER_INIT = "densessl_worker_init"  # mmengine FUNCTIONS name of :func:`_worker_init`


def _worker_init(worker_id: int, num_workers: int, rank: int, seed: int) -> None:
    """mmengine's own worker seeding (what its Runner uses when a seed is set), then the stop signals left to
    the main process: torch's workers otherwise die of the SIGTERM that reaches the whole job step, and the
    main process fails on the lost worker before its preemption hook can save (``densessl.train.signals``)."""
    from mmengine.dataset import worker_init_fn

    worker_init_fn(worker_id, num_workers=num_workers, rank=rank, seed=seed)
    ignore_stop_signals()


def register_worker_init() -> None:
    from mmengine.registry import FUNCTIONS

    FUNCTIONS.register_module(name=WORKER_INIT, module=_worker_init, force=True)


def _complete(path: Path) -> bool:
    """A torch zip checkpoint whose every member is present and matches its CRC (torch.save records them):
    reads the file once without unpickling it."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip() is None
    except (OSError, zipfile.BadZipFile, EOFError, ValueError):
        return False


def usable_resume_checkpoint(work_dir: Path) -> Path | None:
    """The checkpoint a re-run resumes from, with ``work_dir/last_checkpoint`` pointing at it: the one that
    file names when it is complete, else the newest complete ``*.pth`` (by modification time); None, with
    the pointer removed so that mmengine trains from the start, when none is complete or none was written."""
    pointer = work_dir / "last_checkpoint"
    if not pointer.is_file():
        return None
    named = Path(pointer.read_text(encoding="utf-8").strip())
    others = sorted((p for p in work_dir.glob("*.pth") if p != named), key=lambda p: p.stat().st_mtime, reverse=True)
    for path in [named, *others]:
        if not path.is_file():
            continue
        if not _complete(path):
            log.warning("%s: torn or corrupt toolkit checkpoint; trying the one before it", path)
            continue
        if path != named:
            log.warning("resuming from %s instead of %s, which is missing or torn", path, named)
            write_text(pointer, str(path))
        return path
    log.warning("%s names %s, and no complete checkpoint is left in %s; training from the start",
                pointer, named, work_dir)
    pointer.unlink()
    return None


def run_config(cfg: dict[str, Any], run: ToolkitRun) -> dict[str, Any]:
    """``cfg`` plus the run's fields (work_dir, scope, seed, launcher, resume, a unique experiment name)."""
    name = f"{run.scope}-{uuid.uuid4().hex[:8]}"
    out = dict(cfg)
    out.update(
        work_dir=str(run.work_dir),
        default_scope=run.scope,
        launcher=_launcher(),
        randomness=dict(seed=run.seed, deterministic=run.deterministic, diff_rank_seed=False),
        resume=True,      # continue from work_dir/last_checkpoint when a previous attempt left one
        load_from=None,
        experiment_name=name,
        log_level=run.log_level,
    )
    for key in ("train_dataloader", "val_dataloader", "test_dataloader"):
        loader = out.get(key)
        if isinstance(loader, dict) and int(loader.get("num_workers") or 0) > 0 and "worker_init_fn" not in loader:
            out[key] = {**loader, "worker_init_fn": dict(type=WORKER_INIT, num_workers=int(loader["num_workers"]),
                                                         rank=int(os.environ.get("RANK", "0")), seed=run.seed)}
    hooks = dict(out.get("default_hooks") or {})
    checkpoint = dict(hooks.get("checkpoint") or {})
    if checkpoint and 0 < int(checkpoint.get("max_keep_ckpts", -1)) < KEEP_CHECKPOINTS:
        checkpoint["max_keep_ckpts"] = KEEP_CHECKPOINTS  # a torn newest must have a complete one before it
        out["default_hooks"] = {**hooks, "checkpoint": checkpoint}
    if _cpu_processes() and "model_wrapper_cfg" not in out:
        # mmengine wraps with device_ids=[LOCAL_RANK] (runner.py wrap_model), which DDP refuses for a CPU
        # module; the same wrapper without device ids is what DDP takes on CPU
        out["model_wrapper_cfg"] = dict(type="MMDistributedDataParallel", device_ids=None, broadcast_buffers=False,
                                        find_unused_parameters=bool(out.get("find_unused_parameters", False)))
    env_cfg = dict(out.get("env_cfg", {}))
    env_cfg.setdefault("mp_cfg", dict(mp_start_method="fork", opencv_num_threads=0))
    env_cfg.setdefault("dist_cfg", dict(backend="nccl" if torch.cuda.is_available() else "gloo"))
    out["env_cfg"] = env_cfg
    visualizer = dict(out.get("visualizer", {}))
    if visualizer:  # mmengine keeps one global instance per name; a second run in the process must not reuse it
        visualizer["name"] = f"visualizer-{name}"
        out["visualizer"] = visualizer
    return out


def train_and_test(cfg: dict[str, Any], run: ToolkitRun) -> dict[str, Any]:
    """Train ``cfg`` with the toolkit's runner (resuming from ``run.work_dir``), then test it; return the test
    evaluator's metrics. Raises ``Preempted`` after checkpointing when SIGTERM/SIGUSR1 arrive in training.

    The protocol imports its toolkit (``require``, ``require_mmcv_ops``) and registers its own modules first;
    ``run.scope`` names the registry the config's type names resolve in."""
    require("mmengine", "mmengine")
    from mmengine.config import Config
    from mmengine.runner import Runner

    _device_check(run.device)
    if run.threads:
        torch.set_num_threads(run.threads)
    register_safetensors_loader()
    register_worker_init()
    _pickle_buffers_plainly()
    run.work_dir.mkdir(parents=True, exist_ok=True)
    # rank 0 repairs the resume pointer before it joins the process group; the others read the pointer only in
    # train(), after the group's rendezvous (which waits for rank 0), so they see the repaired one
    if rank() == 0:
        usable_resume_checkpoint(run.work_dir)
    join_cpu_process_group()
    runner = Runner.from_cfg(Config(run_config(cfg, run)))
    with StopSignals() as signals:
        runner.register_hook(_preemption_hook(signals), priority="LOWEST")
        with torch.serialization.safe_globals(resume_safe_globals()):
            runner.train()
    # test() resumes too when train() found no checkpoint to start from (it then loads the final one it wrote)
    with torch.serialization.safe_globals(resume_safe_globals()):
        metrics = runner.test()
    return {k: (float(v) if isinstance(v, (int, float)) else v) for k, v in dict(metrics).items()}
