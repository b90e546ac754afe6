"""Print evaluation throughput per protocol (images or frames per second) on this machine.

    python benchmarks/eval_throughput.py                     # smoke sizes (vit-tiny-p8), CPU
    python benchmarks/eval_throughput.py --preset paper      # ViT-S/16 at the protocols' paper sizes
    python benchmarks/eval_throughput.py --device cuda --arch vit-b16

Each figure times the protocol's inner loop with the protocol's own input size and batch, after warm-up:
Patch-Seg = frozen feature extraction; Segmenter linear = one fine-tuning step (forward, backward, SGD) and
sliding-window inference; iNat = one fine-tuning step (AdamW, mixup off: it costs nothing measurable);
DAVIS = the whole propagation of a synthetic sequence (features + affinities + top-k), in frames per second.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from densessl.data.synthetic import synthesize
from densessl.evaluate.davis_propagation import DavisConfig, run_davis_backbone
from densessl.evaluate.linear_seg import LinearSegmenter, slide_inference
from densessl.models.backbones import as_token_backbone, backbone_info, create_backbone

SIZES = {  # (patchseg img, linear crop, linear eval short side, inat input, davis short side, davis multiple)
    "smoke": dict(patchseg=64, crop=64, eval_side=64, inat=64, davis_side=72, davis_multiple=8),
    "paper": dict(patchseg=224, crop=512, eval_side=512, inat=224, davis_side=480, davis_multiple=64),
}


def timed(fn: Callable[[], None], items: int, repeats: int, device: torch.device) -> float:
    fn()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return items * repeats / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(SIZES), default="smoke")
    ap.add_argument("--arch", default=None, help="default: vit-tiny-p8 (smoke), vit-s16 (paper)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    size = SIZES[args.preset]
    arch = args.arch or ("vit-tiny-p8" if args.preset == "smoke" else "vit-s16")
    torch.manual_seed(0)
    backbone = as_token_backbone(create_backbone(arch)).to(dev)
    info = backbone_info(backbone)
    rows: list[tuple[str, str, float]] = []

    backbone.eval()
    x = torch.randn(32, 3, size["patchseg"], size["patchseg"], device=dev)
    with torch.no_grad():
        rows.append(("patchseg (frozen features, batch 32)", "images/s",
                     timed(lambda: backbone.forward_features(x), 32, args.repeats, dev)))

    seg = LinearSegmenter(create_backbone(arch).to(dev), 150).to(dev).train()
    opt = torch.optim.SGD(seg.parameters(), lr=1e-3, momentum=0.9)
    crops = torch.randn(8, 3, size["crop"], size["crop"], device=dev)
    labels = torch.randint(0, 150, (8, size["crop"], size["crop"]), device=dev)

    def seg_step() -> None:
        loss = F.cross_entropy(seg(crops), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    rows.append(("linear_ade20k train step (batch 8)", "images/s", timed(seg_step, 8, args.repeats, dev)))
    seg.eval()
    image = torch.randn(1, 3, size["eval_side"], size["eval_side"] * 2, device=dev)
    with torch.no_grad():
        rows.append(("linear_ade20k sliding-window inference", "images/s",
                     timed(lambda: slide_inference(seg, image, size["crop"], size["crop"], 150), 1, args.repeats, dev)))

    model = create_backbone(arch).to(dev).train()
    head = torch.nn.Linear(info.embed_dim, 1010).to(dev)
    opt2 = torch.optim.AdamW(list(model.parameters()) + list(head.parameters()), lr=1e-4)
    images = torch.randn(32, 3, size["inat"], size["inat"], device=dev)
    targets = torch.randint(0, 1010, (32,), device=dev)

    def inat_step() -> None:
        tokens = model.forward_features(images)
        loss = F.cross_entropy(head(tokens[:, model.num_prefix_tokens:].mean(1)), targets)
        opt2.zero_grad(set_to_none=True)
        loss.backward()
        opt2.step()

    rows.append(("inat19_finetune train step (batch 32)", "images/s", timed(inat_step, 32, args.repeats, dev)))

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "davis"
        synthesize("davis", root, "tiny", 0)
        cfg = DavisConfig(short_side=size["davis_side"], size_multiple=size["davis_multiple"])
        metrics = run_davis_backbone(backbone, root, cfg, None, dev)
        rows.append(("davis2017 label propagation", "frames/s", metrics["num_frames"] / metrics["propagation_time_s"]))

    print(f"evaluation throughput: {arch}, {args.preset} sizes, device {dev}, {args.threads} CPU threads")
    width = max(len(r[0]) for r in rows)
    for name, unit, value in rows:
        print(f"  {name:<{width}}  {value:10.1f} {unit}")


if __name__ == "__main__":
    main()
