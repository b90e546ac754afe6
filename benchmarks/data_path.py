"""Print pretraining-view throughput (images/s) of the two data paths (train.data_path: cpu vs device).

    python benchmarks/data_path.py                         # both recipes, on the CPU, 1 thread
    python benchmarks/data_path.py --device cuda --batch 64 --threads 8

Both paths run in this one process and start from JPEG files on disk, so a figure is what one DataLoader
worker (cpu path) or the training process (device path) can make per second:

- cpu: read the file, decode with PIL, ``MultiCropViews`` per image (what each DataLoader worker does);
- device: read the bytes (what a worker does), then per batch ``torchvision.io.decode_jpeg`` on ``--device``
  and ``DeviceMultiCrop`` (kornia) there.

Recipes: ``64`` = the smoke scale (64-px globals, 2 × 32-px locals, from 96×128 images); ``224`` = DINO's paper
recipe (2 × 224-px globals, 8 × 96-px locals, from 375×500 images, ImageNet's most common size). The images are
synthetic scenes (data/synthetic) saved as JPEG at quality 92.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import default_collate

from densessl.data.imagenet import FlatImageFolder
from densessl.data.synthetic.scenes import render_scene
from densessl.data.views import ColorAugmentation, CropSpec, MultiCropViews
from densessl.train.data_path import build_data_path

RECIPES = {  # global size, local size, local crops, source (H, W)
    "64": (64, 32, 2, (96, 128)),
    "224": (224, 96, 8, (375, 500)),
}


def views_of(recipe: str) -> MultiCropViews:
    g, loc, n, _ = RECIPES[recipe]
    crops = [CropSpec(g, (0.4, 1.0), 1, blur_prob=1.0), CropSpec(g, (0.4, 1.0), 1, blur_prob=0.1, solarize_prob=0.2),
             CropSpec(loc, (0.05, 0.4), n, blur_prob=0.5)]
    return MultiCropViews(crops, ColorAugmentation())


def write_images(folder: Path, count: int, hw: tuple[int, int]) -> FlatImageFolder:
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(render_scene(rng, *hw).image).save(folder / f"{i:04d}.jpg", quality=92)
    return FlatImageFolder(folder)


def measure(path, batch: int, batches: int, device: torch.device) -> float:
    n = len(path.dataset)

    def one(b: int) -> None:
        keys = [(0, (b * batch + i) % n) for i in range(batch)]
        items = [path.dataset[k] for k in keys]
        if path.collate_fn is None:
            default_collate(items)
        else:
            out = path.on_batch(path.collate_fn(items))
            if device.type == "cuda":
                out["crops"][0].sum().item()  # wait for the device

    one(0)  # warm-up (first-call set-up, nvJPEG handles)
    start = time.perf_counter()
    for b in range(1, batches + 1):
        one(b)
    return batches * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=4, help="timed batches per path (after one warm-up)")
    parser.add_argument("--device", default="cpu", help="where the device path decodes and crops")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the cpu path's PIL is 1 thread)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"torch threads {args.threads}, device path on {device}, batch {args.batch}")
    for recipe in args.recipes:
        with tempfile.TemporaryDirectory() as tmp:
            images = write_images(Path(tmp), args.batch * 2, RECIPES[recipe][3])
            views = views_of(recipe)
            for name in ("cpu", "device"):
                path = build_data_path(name, images, views, 0, device if name == "device" else torch.device("cpu"))
                rate = measure(path, args.batch, args.batches, device)
                print(f"recipe {recipe:>3} px  {name:6} path  {rate:8.1f} images/s  ({views.num_crops} views each)")


if __name__ == "__main__":
    main()
