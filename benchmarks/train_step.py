"""Training throughput (images/s and MFU) per method and architecture: our step, our pretraining from JPEG files,
and an official-style loop, in one run on the same device, weights and images.

    python benchmarks/train_step.py [--methods dino,clove] [--archs auto] [--scale smoke|paper] [--steps 10]
        [--batch 16] [--modes step,end_to_end,official] [--compile] [--channels-last] [--record auto|PATH]

For every registered method that imports, and every architecture it accepts (``--scale smoke``: the tiny
smoke archs at 64 px; ``--scale paper``: ViT-S/16, ViT-B/16 and ResNet-50 on 500×375 JPEGs, ImageNet's typical
size, with each method's paper settings), the modes of ``train_step_paths`` are timed: ``step`` (our
``Trainer.train_step``, batch already made), ``end_to_end`` (our dataset + DataLoader + step from JPEG files
on disk) and ``official`` (DINO's ``train_one_epoch`` pattern: fp16 + GradScaler, eager, per-parameter
clipping with a read-back per parameter, PIL views in workers). Repeats interleave the modes and the median
is printed, so load from other processes shifts them alike. Each row gives images/s, the ratio to the
official-style loop and the model FLOP utilisation (``train_step_flops``: FLOPs counted on one step, the
device's dense bf16 peak; none on the CPU or an unknown device).

``--record`` writes the figures as JSON: ``{device, versions: {torch, cuda, densessl_commit}, date, settings,
measurements: [{method, arch, mode, images_per_s, mfu, ratio_vs_official, flops_per_image}]}``; ``auto`` is
``benchmarks/records/<device>-<date>.json`` (GPU runs only belong there; benchmarks/records/README.md).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import importlib
import json
import os
import re
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_step_flops as flops  # noqa: E402  (the benchmark's own helper modules)
import train_step_paths as paths  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
METHOD_MODULES = ("dino", "loca", "selfpatch", "gtsa", "clove")
MODES = ("step", "end_to_end", "official")
SMOKE_ARCHS = ("vit-tiny-p8", "resnet-tiny")
PAPER_ARCHS = ("vit-s16", "vit-b16", "resnet50")
IMAGE_SIZE = {"smoke": (64, 64), "paper": (500, 375)}  # (w, h): the smoke synthetic size; ImageNet's typical
# 64 px, patch-8 settings for methods that smoke.yaml does not list (keys a method lacks are dropped).
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

    return {k: v for k, v in METHODS.items() if k in METHOD_MODULES}


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


def bench_one(cls: type, arch: str, args: argparse.Namespace, root: Path, peak: float | None
              ) -> list[dict[str, Any]]:
    """Every mode of ``args.modes`` for one (method, arch): one measurement dict per mode."""
    settings = _smoke_settings(cls.name, arch, cls.config_cls) if args.scale == "smoke" else {}
    torch.manual_seed(0)
    method = cls(arch, settings, epochs=1)
    device = torch.device(args.device)
    images = [Image.open(p).convert("RGB") for p in sorted((root / "train").rglob("*.JPEG"))[:args.batch]]
    batch = paths.collated_batch(method, images)
    from densessl.train.optim import resolve_optimizer_name
    from densessl.train.step_inputs import batch_to_device

    flops_per_image = flops.step_flops(method, batch, device, batch_to_device) / args.batch
    runners: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="densessl-bench-") as out_dir:
        if "step" in args.modes:
            runners["step"] = paths.StepPath(copy.deepcopy(method), images, batch, args, f"{out_dir}/step")
        if "end_to_end" in args.modes:
            runners["end_to_end"] = paths.EndToEndPath(copy.deepcopy(method), root, args.batch, args, f"{out_dir}/e2e")
        if "official" in args.modes:
            runners["official"] = paths.OfficialPath(copy.deepcopy(method), root, args.batch,
                                                     resolve_optimizer_name(None, method), args)
        rates: dict[str, list[float]] = {mode: [] for mode in runners}
        for _ in range(args.repeats):
            for mode, runner in runners.items():
                rates[mode].append(runner.run(args.warmup, args.steps))
    medians = {mode: statistics.median(r) for mode, r in rates.items()}
    official = medians.get("official")
    return [{"method": cls.name, "arch": arch, "mode": mode, "images_per_s": rate,
             "mfu": flops.mfu(rate, flops_per_image, peak),
             "ratio_vs_official": rate / official if official else None,
             "flops_per_image": flops_per_image} for mode, rate in medians.items()]


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _record_path(value: str, device_name: str, date: str) -> Path:
    if value != "auto":
        return Path(value)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", device_name).strip("-").lower()
    return REPO / "benchmarks" / "records" / f"{slug}-{date[:10]}.json"


def write_record(path: Path, device_name: str, date: str, args: argparse.Namespace,
                 measurements: list[dict[str, Any]]) -> None:
    from densessl.provenance import git_commit

    record = {"device": device_name,
              "versions": {"torch": torch.__version__, "cuda": torch.version.cuda,
                           "densessl_commit": git_commit(REPO)["commit"]},
              "date": date,
              "settings": {k: getattr(args, k) for k in ("scale", "batch", "steps", "repeats", "warmup", "workers",
                                                         "precision", "compile", "channels_last", "data_path")},
              "measurements": measurements}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="all", help="comma-separated method names, or 'all' (registered)")
    parser.add_argument("--archs", default="auto",
                        help=f"comma-separated architectures, or 'auto' ({', '.join(SMOKE_ARCHS)} at smoke scale, "
                             f"{', '.join(PAPER_ARCHS)} at paper scale; each method keeps those it accepts)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {', '.join(MODES)}")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per repeat and mode")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats; the median is printed")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per mode and repeat first")
    parser.add_argument("--batch", type=int, default=16, help="images per step")
    parser.add_argument("--workers", type=int, default=min(10, os.cpu_count() or 1),
                        help="DataLoader workers of end_to_end and official (DINO --num_workers 10)")
    parser.add_argument("--scale", choices=["smoke", "paper"], default="smoke")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16",
                        help="our paths' precision (bf16 autocast applies on CUDA only)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--channels-last", action="store_true", help="our paths: train.channels_last")
    parser.add_argument("--compile", action="store_true", help="our paths: train.compile")
    parser.add_argument("--data-path", default=None, help="our end_to_end: train.data_path, where TrainConfig has it")
    parser.add_argument("--record", default=None, help="write the JSON record here ('auto': benchmarks/records/)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    args.modes = tuple(m for m in args.modes.split(",") if m)
    if unknown := sorted(set(args.modes) - set(MODES)):
        raise SystemExit(f"--modes: unknown {unknown}; choose from {', '.join(MODES)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    registry = _registry()
    names = sorted(registry) if args.methods == "all" else args.methods.split(",")
    archs = (SMOKE_ARCHS if args.scale == "smoke" else PAPER_ARCHS) if args.archs == "auto" \
        else tuple(args.archs.split(","))
    from densessl.errors import ConfigError

    device = torch.device(args.device)
    device_name, peak = _device_name(device), flops.peak_flops(device)
    date = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    print(f"# torch {torch.__version__}, device {device_name} (peak {peak / 1e12:.0f} TFLOP/s bf16 dense)"
          if peak else f"# torch {torch.__version__}, device {device_name} (no peak known: MFU not given)")
    print(f"# {torch.get_num_threads()} CPU threads, {args.workers} loader workers, batch {args.batch}, {args.steps} "
          f"steps × {args.repeats} repeats (median), scale {args.scale}, our precision "
          f"{args.precision if device.type == 'cuda' else 'fp32'}{', channels-last' if args.channels_last else ''}"
          f"{', compiled' if args.compile else ''}")
    print(f"{'method':<10} {'arch':<12} {'mode':<11} {'img/s':>9} {'vs official':>11} {'MFU':>6} {'GFLOP/img':>10}")
    measurements: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="densessl-bench-jpeg-") as tmp:
        count = args.batch * (args.warmup + args.steps)
        root = paths.write_jpegs(Path(tmp), count, IMAGE_SIZE[args.scale])
        for name in names:
            if name not in registry:
                print(f"{name:<10} {'-':<12} not registered (import failed or unknown)")
                continue
            for arch in archs:
                try:
                    rows = bench_one(registry[name], arch, args, root, peak)
                except ConfigError as exc:
                    if args.archs == "auto":
                        continue  # the method does not build this architecture
                    print(f"{name:<10} {arch:<12} skipped: {exc}")
                    continue
                for r in rows:
                    ratio = f"{r['ratio_vs_official']:.2f}" if r["ratio_vs_official"] is not None else "-"
                    mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
                    print(f"{name:<10} {arch:<12} {r['mode']:<11} {r['images_per_s']:>9.1f} {ratio:>11} {mfu:>6} "
                          f"{r['flops_per_image'] / 1e9:>10.2f}", flush=True)
                measurements += rows
    if args.record:
        path = _record_path(args.record, device_name, date)
        write_record(path, device_name, date, args, measurements)
        print(f"# record: {path}")


if __name__ == "__main__":
    main()
