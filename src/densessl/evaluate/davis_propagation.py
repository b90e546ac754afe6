"""DAVIS 2017 semi-supervised video object segmentation by label propagation with frozen features.

Propagation stage of the protocol: facebookresearch/dino @ 7c446df ``eval_video_segmentation.py`` (protocol
of Jabri et al. / UVC, arXiv 2006.14613 appendix F, cited by the DINO authors in facebookresearch/dino#78);
scoring is in ``davis_metrics``. For every sequence:

1. frames are resized so the shorter side is ``short_side`` (480) and the longer side is floored to a
   multiple of ``size_multiple`` (64) (``read_frame``: 854x480 -> 832x480), bilinear, 8-bit, then
   normalised with mean (0.485, 0.456, 0.406) and std (0.228, 0.224, 0.225) (``color_normalize``);
2. the first annotation is nearest-resized to the patch grid and one-hot encoded (``read_seg``,
   ``to_one_hot``: as many channels as its max id + 1);
3. frozen patch features (last block + final norm, prefix tokens dropped: ``get_intermediate_layers(n=1)``)
   of the target are compared with those of the first frame and of the ``n_last_frames`` (7) previous
   frames: affinity exp(cos / 0.1), restricted to sources within +-``size_mask_neighborhood`` (12) patches
   of the query, only the ``topk`` (5) largest per query kept (every value >= the k-th, so ties keep more),
   columns normalised; the soft label is the affinity-weighted sum of the context labels
   (``label_propagation``); the previous frames carry their soft labels;
4. the soft label is upsampled x patch size (bilinear), each channel min-max normalised (``norm_mask``),
   argmaxed, nearest-resized to the frame's size and saved as an indexed PNG
   ``<out>/<sequence>/<frame>.png``; ``<first frame>.png`` is the first annotation itself.

Then :mod:`densessl.evaluate.davis_metrics` scores the folder exactly like davis2017-evaluation and
:func:`run_davis` writes the official CSVs next to the PNGs.

Deliberate differences from the script, none of which changes its numbers on DAVIS 2017:

* no network access: the colour palette comes from the first annotation (the script downloads UVC's
  ``palette.txt``); the palette does not affect the scores;
* parameters are passed explicitly (the script's ``restrict_neighborhood`` reads a module-global ``args``);
* frames are decoded with PIL (the script uses cv2) and resized with torch bilinear interpolation rounded to
  8 bits (cv2.INTER_LINEAR uses 11-bit fixed-point weights): pixel values may differ by one level;
* features of a sequence are extracted ``feature_batch_size`` frames at a time and the affinity is built in
  blocks of ``query_chunk_size`` target patches (the script: one frame, one full matrix). The backbone is
  deterministic and each query's column is independent, so only float rounding changes;
* ``void_as_background`` (default on): void (255) pixels of the first annotation become background. The
  script one-hot encodes 255 as a 256th channel, whose predictions the official evaluator then rejects;
  DAVIS 2017 first frames have no void, so this only turns a crash into a result on other data;
* a single resizing rule for frames and masks: the script's ``read_seg`` branches on ``w > h`` and
  ``read_frame`` on ``h > w``, which disagree only for square frames (then the script fails).

The DINO README notes that scores reproduce exactly only with PyTorch 1.7.1 (later versions score slightly
lower, facebookresearch/dino#94).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections import deque
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from densessl.data.davis import VOID_LABEL, Davis2017, DavisSequence, read_annotation, read_rgb, voc_palette
from densessl.errors import ConfigError, DataError
from densessl.evaluate.davis_config import PRECISIONS, DavisConfig  # noqa: F401  (re-exported)
from densessl.evaluate.davis_metrics import evaluate_results, format_tables, write_csvs
from densessl.io import atomic_path
from densessl.models.backbones import backbone_info, patch_tokens
from densessl.progress import Progress

# (B, 3, H, W) normalised frames -> (B, D, H / p, W / p) patch features
FeatureFn = Callable[[torch.Tensor], torch.Tensor]


# ----------------------------------------------------------------------------------------------------------
# Preprocessing
# ----------------------------------------------------------------------------------------------------------

def resized_hw(height: int, width: int, short_side: int = 480, multiple: int = 64) -> tuple[int, int]:
    """Script ``read_frame(scale_size=[480])``: shorter side -> ``short_side``, longer side scaled by the
    aspect ratio and floored to a multiple of ``multiple`` (480x854 -> 480x832). Returns (H, W)."""
    if height > width:
        tw = short_side
        th = int(((tw * height) / width) // multiple * multiple)
    else:
        th = short_side
        tw = int(((th * width) / height) // multiple * multiple)
    if th < 1 or tw < 1:
        raise DataError(f"frame {height}x{width}: resizing to short side {short_side} with the long side floored to "
                        f"a multiple of {multiple} leaves nothing; lower size_multiple")
    return th, tw


def preprocess_frame(rgb: np.ndarray, size_hw: tuple[int, int], mean: tuple[float, ...],
                     std: tuple[float, ...]) -> torch.Tensor:
    """(H, W, 3) uint8 RGB -> (3, h, w) float: bilinear resize kept at 8 bits (cv2.resize on uint8), /255,
    normalise (script ``read_frame`` + ``color_normalize``)."""
    x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).float()
    if tuple(x.shape[-2:]) != tuple(size_hw):
        x = F.interpolate(x[None], size=size_hw, mode="bilinear", align_corners=False)[0].round_().clamp_(0, 255)
    x = x / 255.0
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (x - m) / s


def first_frame_labels(labels: np.ndarray, grid_hw: tuple[int, int], void_as_background: bool) -> torch.Tensor:
    """First annotation -> (C, h, w) one-hot on the patch grid (script ``read_seg`` + ``to_one_hot``).

    PIL nearest resize to the grid; C = max id on the grid + 1, as the script (an object that vanishes at
    patch resolution and has the highest id therefore gets no channel and is never predicted).
    """
    labels = labels.copy()
    if void_as_background:
        labels[labels == VOID_LABEL] = 0
    small = np.array(Image.fromarray(labels).resize((grid_hw[1], grid_hw[0]), Image.NEAREST), dtype=np.int64)
    num = int(small.max()) + 1
    return F.one_hot(torch.from_numpy(small), num).permute(2, 0, 1).float()


# ----------------------------------------------------------------------------------------------------------
# Features
# ----------------------------------------------------------------------------------------------------------

def backbone_feature_fn(model: nn.Module, final_norm: bool = True) -> FeatureFn:
    """Patch-token grid of a timm ViT: last block, with (``forward_features``) or without the final norm.
    A ResNet seen as tokens (``ResNetTokens``) has no final norm: its C5 grid is used either way."""
    def extract(images: torch.Tensor) -> torch.Tensor:
        if final_norm or not hasattr(model, "forward_intermediates"):
            return patch_tokens(model, images)
        return model.forward_intermediates(images, indices=1, norm=False, output_fmt="NCHW",
                                           intermediates_only=True)[-1]

    return extract


def patch_size_of(model: nn.Module) -> int:
    """Pixels per feature cell: the ViT patch size, or a ResNet's output stride (``ResNetTokens``)."""
    return backbone_info(model).patch_size


@torch.no_grad()
def sequence_features(extract: FeatureFn, frames: list[torch.Tensor], batch_size: int, device: torch.device,
                      autocast: Callable[[], Any]) -> torch.Tensor:
    """(T, N, D) L2-normalised patch features of the frames (normalised once, as the script does per use)."""
    out = []
    for i in range(0, len(frames), batch_size):
        batch = torch.stack(frames[i:i + batch_size]).to(device)
        with autocast():
            feats = extract(batch)
        feats = feats.float().flatten(2).transpose(1, 2)  # (B, N, D), row-major patch order as the script
        out.append(F.normalize(feats, dim=-1, p=2))
    return torch.cat(out)


# ----------------------------------------------------------------------------------------------------------
# Label propagation
# ----------------------------------------------------------------------------------------------------------

def neighbourhood_mask(h: int, w: int, radius: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(N, N) float mask [query, source] = 1 where |dy| <= radius and |dx| <= radius (script
    ``restrict_neighborhood``: a (2r+1)^2 window clipped at the grid border)."""
    ys = torch.arange(h, device=device).repeat_interleave(w)
    xs = torch.arange(w, device=device).repeat(h)
    near = ((ys[:, None] - ys[None, :]).abs() <= radius) & ((xs[:, None] - xs[None, :]).abs() <= radius)
    return near.float()


def propagate_step(target: torch.Tensor, sources: torch.Tensor, source_labels: torch.Tensor,
                   mask: torch.Tensor | None, topk: int, temperature: float, chunk: int = 4096) -> torch.Tensor:
    """One target frame's soft labels (script ``label_propagation``).

    target (N, D) and sources (K, N, D) are L2-normalised features, source_labels (K, C, N), mask (N, N)
    [query, source] or None. Returns (C, N): for every query, affinities exp(cos / temperature) to all K*N
    sources, times the window mask; values below the query's k-th largest set to 0 (ties all kept);
    normalised to sum 1; labels averaged with these weights.
    """
    k_ctx, n, _ = sources.shape
    c = source_labels.shape[1]
    src = sources.reshape(k_ctx * n, -1)  # source index = context * N + patch, as the script's reshape
    labels = source_labels.permute(1, 0, 2).reshape(c, k_ctx * n)
    k = min(topk, k_ctx * n)
    out = torch.empty(c, target.shape[0], device=target.device, dtype=labels.dtype)
    for q0 in range(0, target.shape[0], chunk):
        q = target[q0:q0 + chunk]
        aff = torch.exp(src @ q.T / temperature)  # (K*N, Q)
        if mask is not None:
            aff = aff * mask[q0:q0 + chunk].T.repeat(k_ctx, 1)
        kth = torch.topk(aff, k=k, dim=0).values.min(dim=0).values
        aff = torch.where(aff < kth, torch.zeros_like(aff), aff)
        aff = aff / aff.sum(dim=0, keepdim=True)
        out[:, q0:q0 + chunk] = labels @ aff
    return out


def norm_mask(mask: torch.Tensor) -> torch.Tensor:
    """Script ``norm_mask``: each channel with a positive max is min-max scaled to [0, 1] (in place).

    Kept verbatim, including 0/0 = NaN for a constant positive channel (torch.max then picks that channel).
    """
    for ch in range(mask.shape[0]):
        m = mask[ch]
        if m.max() > 0:
            m = m - m.min()
            mask[ch] = m / m.max()
    return mask


def soft_to_mask(soft: torch.Tensor, patch_size: int, out_hw: tuple[int, int]) -> np.ndarray:
    """(C, h, w) soft labels -> (H, W) uint8 ids: bilinear x patch size, ``norm_mask``, argmax, nearest resize
    to the frame's size (script ``eval_video_tracking_davis``)."""
    up = F.interpolate(soft[None].float(), scale_factor=patch_size, mode="bilinear", align_corners=False,
                       recompute_scale_factor=False)[0]
    up = norm_mask(up)
    _, seg = torch.max(up, dim=0)
    seg_np = seg.cpu().numpy().astype(np.uint8)
    if seg_np.shape != tuple(out_hw):
        seg_np = np.array(Image.fromarray(seg_np).resize((out_hw[1], out_hw[0]), Image.NEAREST))
    return seg_np


def write_indexed_png(path: Path, labels: np.ndarray, palette: list[int]) -> None:
    """Indexed PNG of object ids (script ``imwrite_indexed``), written atomically."""
    im = Image.fromarray(np.asarray(labels, dtype=np.uint8))
    im.putpalette(palette)
    with atomic_path(path) as tmp:
        im.save(tmp, format="PNG")


@torch.no_grad()
def propagate_sequence(extract: FeatureFn, patch_size: int, seq: DavisSequence, cfg: DavisConfig,
                       out_dir: Path, device: torch.device, autocast: Callable[[], Any] = nullcontext) -> int:
    """Propagate the first annotation of ``seq`` through its frames; write ``<out_dir>/<seq>/<frame>.png``.

    Returns the number of frames written.
    """
    first_labels, palette = read_annotation(seq.first_annotation)
    palette = palette or voc_palette()
    rgb0 = read_rgb(seq.image_paths[0])
    ori_h, ori_w = rgb0.shape[:2]
    if first_labels.shape != (ori_h, ori_w):
        raise DataError(f"{seq.first_annotation}: annotation {first_labels.shape} and frame "
                        f"{seq.image_paths[0].name} {(ori_h, ori_w)} differ in size")
    th, tw = resized_hw(ori_h, ori_w, cfg.short_side, cfg.size_multiple)
    grid = (th // patch_size, tw // patch_size)

    frames = [preprocess_frame(rgb0, (th, tw), cfg.mean, cfg.std)]
    for path in seq.image_paths[1:]:
        rgb = read_rgb(path)
        if rgb.shape[:2] != (ori_h, ori_w):
            raise DataError(f"{path}: frame size {rgb.shape[:2]} differs from {(ori_h, ori_w)} of "
                            f"{seq.image_paths[0].name}; all frames of a sequence must share one size")
        frames.append(preprocess_frame(rgb, (th, tw), cfg.mean, cfg.std))
    feats = sequence_features(extract, frames, cfg.feature_batch_size, device, autocast)
    if tuple(feats.shape[:2]) != (len(frames), grid[0] * grid[1]):
        raise ConfigError(f"feature extractor returned {tuple(feats.shape)} for {len(frames)} frames of "
                          f"{th}x{tw}; expected a {grid[0]}x{grid[1]} grid at patch size {patch_size}")

    first = first_frame_labels(first_labels, grid, cfg.void_as_background).to(device)
    first = first.reshape(first.shape[0], -1)
    mask = (neighbourhood_mask(grid[0], grid[1], cfg.size_mask_neighborhood, device)
            if cfg.size_mask_neighborhood > 0 else None)

    seq_dir = Path(out_dir) / seq.name
    seq_dir.mkdir(parents=True, exist_ok=True)
    write_indexed_png(seq_dir / f"{seq.image_paths[0].stem}.png", first_labels, palette)  # GT first frame
    queue: deque[tuple[int, torch.Tensor]] = deque(maxlen=cfg.n_last_frames)
    steps = range(1, len(frames))
    for t in tqdm(steps, desc=seq.name, leave=False, disable=not cfg.show_progress):
        ctx = [0] + [i for i, _ in queue]
        ctx_labels = torch.stack([first] + [lab for _, lab in queue])
        soft = propagate_step(feats[t], feats[ctx], ctx_labels, mask, cfg.topk, cfg.temperature,
                              cfg.query_chunk_size)
        if cfg.n_last_frames > 0:
            queue.append((t, soft))
        pred = soft_to_mask(soft.reshape(-1, *grid), patch_size, (ori_h, ori_w))
        write_indexed_png(seq_dir / f"{seq.image_paths[t].stem}.png", pred, palette)
    return len(frames)


# ----------------------------------------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------------------------------------

def _autocast(cfg: DavisConfig, device: torch.device) -> Callable[[], Any]:
    if cfg.precision == "bf16" and device.type == "cuda":
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext


def run_davis_features(extract: FeatureFn, patch_size: int, data_root: str | Path, out_dir: str | Path,
                       cfg: DavisConfig, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Propagate every sequence with ``extract``, score the PNGs, write the official CSVs into ``out_dir``."""
    t0 = time.time()
    cfg.validate()
    cfg.check_patch_size(patch_size)
    dev = torch.device(device)
    out_dir = Path(out_dir)
    dataset = Davis2017(data_root, cfg.split, cfg.resolution, max_sequences=cfg.max_sequences)
    frames = 0
    lines = Progress(f"davis2017 {cfg.split} propagation", len(dataset), unit="sequence", item_unit="frame")
    for seq in dataset:
        n = propagate_sequence(extract, patch_size, seq, cfg, out_dir, dev, _autocast(cfg, dev))
        frames += n
        lines.update(1, items=n, last=seq.name)
    lines.finish()
    t_prop = time.time() - t0
    scores = evaluate_results(out_dir, dataset, cfg.bound_th)
    global_csv, per_seq_csv = write_csvs(out_dir, scores)
    print(format_tables(scores) + f"\nTotal time:{time.time() - t0}")
    metrics: dict[str, Any] = dict(scores.global_metrics())
    metrics.update({
        "protocol": "davis2017",
        "split": cfg.split,
        "num_sequences": len(dataset),
        "num_objects": len(scores.objects),
        "num_frames": frames,
        "per_object": scores.per_object(),
        "results_dir": str(out_dir),
        "global_csv": str(global_csv),
        "per_sequence_csv": str(per_seq_csv),
        "patch_size": patch_size,
        "device": str(dev),
        "config": asdict(cfg),
        "propagation_time_s": t_prop,
        "wall_time_s": time.time() - t0,
    })
    return metrics


def run_davis_backbone(backbone: nn.Module, data_root: str | Path, cfg: DavisConfig, out_dir: str | Path | None,
                       device: str | torch.device = "cpu") -> dict[str, Any]:
    """Same call shape as the other protocols' runners (``runner(backbone, data_root, cfg, out_dir, device)``).

    ``out_dir`` receives the PNGs and CSVs; with None they go to a temporary folder that is removed after
    scoring.
    """
    backbone = backbone.to(device).eval()
    for p in backbone.parameters():
        p.requires_grad_(False)
    extract = backbone_feature_fn(backbone, cfg.final_norm)
    if out_dir is not None:
        return run_davis_features(extract, patch_size_of(backbone), data_root, out_dir, cfg, device)
    tmp = Path(tempfile.mkdtemp(prefix="davis-results-"))
    try:
        metrics = run_davis_features(extract, patch_size_of(backbone), data_root, tmp, cfg, device)
        for key in ("results_dir", "global_csv", "per_sequence_csv"):
            metrics[key] = None
        return metrics
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_davis(backbone_path: str | Path, data_root: str | Path, out_dir: str | Path,
              cfg: DavisConfig | None = None, device: str | torch.device | None = None) -> dict[str, Any]:
    """Evaluate an exported backbone (safetensors + sidecar) on DAVIS 2017; returns the metrics dict.

    Writes ``<out_dir>/<sequence>/<frame>.png`` (official results layout, so the official evaluator can be
    pointed at ``out_dir``) and ``<out_dir>/global_results-<split>.csv`` / ``per-sequence_results-<split>.csv``.
    The 7 official numbers are the keys ``J&F-Mean``, ``J-Mean``, ``J-Recall``, ``J-Decay``, ``F-Mean``,
    ``F-Recall``, ``F-Decay`` (fractions, like the CSV); the other keys describe the run.
    """
    from densessl.checkpoints.io import load_backbone

    cfg = cfg or DavisConfig()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, meta = load_backbone(backbone_path)
    metrics = run_davis_backbone(model, data_root, cfg, out_dir, device)
    metrics["backbone"] = str(backbone_path)
    metrics["arch"] = meta.get("arch")
    return metrics
