"""Training throughput (images/s) per method and architecture: our trainer's step against a plain loop.

    python benchmarks/train_step.py [--methods dino,clove] [--archs auto] [--steps 10] [--batch 16]

For every registered method that imports, and every architecture it accepts, one run measures

* ``trainer``: ``Trainer.train_step`` (the exact step ``fit`` runs: lr/wd schedules, per-step re-seeding,
  bf16 autocast on CUDA, the rank-agreement check, per-parameter clipping, cancel_gradients, the method's
  optimiser, teacher EMA), optionally with ``--channels-last`` / ``--compile`` applied;
* ``plain``: the same method, initial weights, batch and optimiser class (AdamW, or the method's own, e.g.
  CLoVE's LARS) in a bare fp32 eager loop: loss → zero_grad → backward → step → update_teacher;

and prints images/s for both and their ratio (trainer / plain). Repeats interleave the two paths and the
median is reported, so load from other processes shifts both alike. Data loading is excluded: one collated
batch of the method's own views is reused. ``--scale smoke`` (default) uses 64 px images and the smoke
method settings (workflow/presets/smoke.yaml where the method has them, else ``SMOKE_METHOD`` below);
``--scale paper`` uses 256 px images and each method's paper defaults.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from PIL import Image
from torch.utils.data import default_collate

REPO = Path(__file__).resolve().parents[1]
METHOD_MODULES = ("dino", "loca", "selfpatch", "gtsa", "clove")
SMOKE_ARCHS = ("vit-tiny-p8", "resnet-tiny")
# 64 px, patch-8 settings for methods that smoke.yaml does not list yet (keys a method lacks are dropped).
SMOKE_METHOD: dict[str, dict[str, Any]] = {
    "dino": dict(out_dim=4096, hidden_dim=512, bottleneck_dim=128, use_bn_in_head=True, global_size=64,
                 local_size=32, local_crops_number=2),
    "selfpatch": dict(out_dim=4096, out_dim_selfpatch=1024, hidden_dim=512, bottleneck_dim=128, global_size=64,
                      local_size=32, local_crops_number=2),
    "loca": dict(head_hidden_dim=512, head_bottleneck_dim=128, head_output_dim=1024, reference_size=64,
                 query_size=64, focal_size=32, num_focal_queries=2, query0_keep_tokens=23),
    "gtsa": dict(global_size=64, local_size=32, local_crops_number=2, projector_dim=128, out_dim=256,
                 predictor_dim=256, rot_hidden_dim=256, rot_bottleneck_dim=64, roi_out_size=(3, 2),
                 num_matches=(8, 2)),
    "clove": dict(projector_hidden_dim=512, projector_out_dim=128, attn_heads=4, global_size=64, local_size=32,
                  local_crops_number=2),
}


def _registry() -> dict[str, type]:
    """Import every method module that imports; report the others."""
    for name in METHOD_MODULES:
        try:
            importlib.import_module(f"densessl.methods.{name}")
        except Exception as exc:  # noqa: BLE001 - a method under construction must not stop the benchmark
            print(f"# skipped method {name}: import failed ({type(exc).__name__}: {exc})", file=sys.stderr)
    from densessl.methods.base import METHODS

    return dict(METHODS)


def _smoke_settings(method: str, arch: str, config_cls: type) -> dict[str, Any]:
    preset = yaml.safe_load((REPO / "workflow" / "presets" / "smoke.yaml").read_text(encoding="utf-8"))
    entry = (preset.get("pretrain") or {}).get(method)
    if entry is not None:
        settings = dict(entry.get("method") or {})
        settings.update(((entry.get("arch") or {}).get(arch) or {}).get("method") or {})
    else:
        settings = dict(SMOKE_METHOD.get(method, {}))
    fields = {f.name for f in dataclasses.fields(config_cls)}
    return {k: v for k, v in settings.items() if k in fields}


def _images(n: int, size: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray((rng.random((size, size, 3)) * 255).astype("uint8")) for _ in range(n)]


def _batch(method: Any, images: list[Image.Image]) -> Any:
    from densessl.train.sampling import SeededAugmentation

    views = SeededAugmentation(images, method.views(), seed=0)
    return default_collate([views[i] for i in range(len(images))])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _TrainerPath:
    def __init__(self, method: Any, images: list, batch: Any, args: argparse.Namespace, out_dir: str):
        from densessl.train.trainer import TrainConfig, Trainer

        steps = args.warmup + args.steps * args.repeats
        cfg = TrainConfig(epochs=steps, batch_size_per_gpu=len(images), num_workers=0, tensorboard=False,
                          warmup_epochs=min(10, steps), precision=args.precision, channels_last=args.channels_last)
        self.trainer = Trainer(method, images, cfg, out_dir, device=args.device)
        if args.compile:
            self.trainer.method.student.compile()
        self.batch = batch
        self.it = 0

    def step(self) -> float:
        loss, _, _ = self.trainer.train_step(self.batch, self.it)
        self.it += 1
        return loss


class _PlainPath:
    def __init__(self, method: Any, batch: Any, device: torch.device, optimizer_name: str):
        from densessl.train.trainer import _to_device, build_optimizer

        self.method = method.to(device)
        params = [p for p in method.student.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(optimizer_name, [{"params": params, "lr": 1e-5, "weight_decay": 0.04}])
        self.batch, self.device, self.to_device = batch, device, _to_device

    def step(self) -> float:
        loss, _ = self.method.loss(self.to_device(self.batch, self.device), 0)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.method.update_teacher(0.996)
        return float(loss.detach())


def _rate(path: Any, steps: int, batch_size: int, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        path.step()
    _sync(device)
    return steps * batch_size / (time.perf_counter() - start)


def bench_one(cls: type, arch: str, args: argparse.Namespace) -> tuple[float, float]:
    settings = _smoke_settings(cls.name, arch, cls.config_cls) if args.scale == "smoke" else {}
    torch.manual_seed(0)
    method = cls(arch, settings, epochs=args.warmup + args.steps * args.repeats)
    plain_method = copy.deepcopy(method)
    images = _images(args.batch, 64 if args.scale == "smoke" else 256)
    batch = _batch(method, images)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory(prefix="densessl-bench-") as out_dir:
        trainer = _TrainerPath(method, images, batch, args, out_dir)
        plain = _PlainPath(plain_method, batch, device, trainer.trainer.optimizer_name)
        for _ in range(args.warmup):
            trainer.step()
            plain.step()
        trainer_rates, plain_rates = [], []
        for _ in range(args.repeats):
            trainer_rates.append(_rate(trainer, args.steps, args.batch, device))
            plain_rates.append(_rate(plain, args.steps, args.batch, device))
    return statistics.median(trainer_rates), statistics.median(plain_rates)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="all", help="comma-separated method names, or 'all' (registered)")
    parser.add_argument("--archs", default="auto",
                        help=f"comma-separated architectures, or 'auto' ({', '.join(SMOKE_ARCHS)} at smoke scale, "
                             f"vit-s16 and resnet50 at paper scale; each method keeps those it accepts)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per repeat and path")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats; the median is printed")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per path first")
    parser.add_argument("--batch", type=int, default=16, help="images per step")
    parser.add_argument("--scale", choices=["smoke", "paper"], default="smoke")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16",
                        help="trainer path precision (bf16 autocast applies on CUDA only)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--channels-last", action="store_true", help="trainer path: train.channels_last")
    parser.add_argument("--compile", action="store_true", help="trainer path: torch.compile the student")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    registry = _registry()
    names = sorted(registry) if args.methods == "all" else args.methods.split(",")
    archs = (SMOKE_ARCHS if args.scale == "smoke" else ("vit-s16", "resnet50")) if args.archs == "auto" \
        else tuple(args.archs.split(","))
    from densessl.errors import ConfigError

    device = args.device if args.device == "cpu" else torch.cuda.get_device_name(torch.device(args.device))
    print(f"# torch {torch.__version__}, device {device}, {torch.get_num_threads()} CPU threads, batch {args.batch}, "
          f"{args.steps} steps × {args.repeats} repeats (median), scale {args.scale}, trainer precision "
          f"{args.precision if args.device != 'cpu' else 'fp32'}{', channels-last' if args.channels_last else ''}"
          f"{', compiled' if args.compile else ''}")
    print(f"{'method':<10} {'arch':<12} {'trainer img/s':>14} {'plain img/s':>12} {'ratio':>6}")
    for name in names:
        if name not in registry:
            print(f"{name:<10} {'-':<12} not registered (import failed or unknown)")
            continue
        for arch in archs:
            try:
                trainer_rate, plain_rate = bench_one(registry[name], arch, args)
            except ConfigError as exc:
                if args.archs == "auto":
                    continue  # the method does not build this architecture
                print(f"{name:<10} {arch:<12} skipped: {exc}")
                continue
            print(f"{name:<10} {arch:<12} {trainer_rate:>14.1f} {plain_rate:>12.1f} {trainer_rate / plain_rate:>6.2f}",
                  flush=True)


if __name__ == "__main__":
    main()
