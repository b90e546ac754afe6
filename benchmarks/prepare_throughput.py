"""Print dataset preparation throughput (images/s) for COCO-Stuff and ADE20K, and the estimate for the full sets.

    python benchmarks/prepare_throughput.py                 # 48 images per split at the real image sizes
    python benchmarks/prepare_throughput.py --images 200 --hw-coco 480 640 --hw-ade 512 683

Preparation of these two datasets, after extraction, pairs every image with its label map and decodes every
map to check its mode, size and ids (densessl.data.prepare). The cost is one PNG decode plus one JPEG header read
per image, so it scales with pixels: the synthetic sets are written at the real datasets' typical sizes (COCO
640x480, ADE20K about 683x512) to make the per-image figure carry over. The estimate multiplies by the full
counts (COCO 118,287 + 5,000; ADE20K 20,210 + 2,000). Extraction and download time are not included: they are
bounded by disk and network (the download log lines show their rates).
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

from densessl.data.prepare import prepare_ade20k, prepare_coco
from densessl.data.synthetic import PRESETS, synthesize
from densessl.progress import human_duration

FULL = {"coco": 118_287 + 5_000, "ade20k": 20_210 + 2_000}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=48, help="images per split (train and val)")
    parser.add_argument("--hw-coco", type=int, nargs=2, default=(480, 640), metavar=("H", "W"))
    parser.add_argument("--hw-ade", type=int, nargs=2, default=(512, 683), metavar=("H", "W"))
    args = parser.parse_args()
    base = PRESETS["tiny"]
    size = dataclasses.replace(
        base, name="bench",
        counts={**base.counts, "coco": {"train": args.images, "val": args.images},
                "ade20k": {"train": args.images, "val": args.images}},
        image_hw={**base.image_hw, "coco": tuple(args.hw_coco), "ade20k": tuple(args.hw_ade)})
    with tempfile.TemporaryDirectory() as tmp:
        for dataset, prepare, hw in (("coco", prepare_coco, args.hw_coco), ("ade20k", prepare_ade20k, args.hw_ade)):
            root = Path(tmp) / dataset
            synthesize(dataset, root, size, seed=0)
            start = time.perf_counter()
            done = sum(prepare(root, interval=float("inf")).values())
            seconds = time.perf_counter() - start
            rate = done / seconds
            print(f"{dataset:7s} preparation: {done} images at {hw[0]}x{hw[1]} in {seconds:.2f} s = {rate:.1f} images/s "
                  f"(one process); full dataset ({FULL[dataset]:,} images): about {human_duration(FULL[dataset] / rate)}")


if __name__ == "__main__":
    main()
