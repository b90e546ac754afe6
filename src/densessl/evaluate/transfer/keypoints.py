"""COCO keypoint detection transfer (``keypointrcnn_r50_fpn_coco``): Keypoint R-CNN R50-FPN fine-tuned end to
end from our ResNet, AP^kp / AP^kp50 / AP^kp75 from pycocotools ``COCOeval(iouType='keypoints')``.

The detector is torchvision's ``KeypointRCNN`` (torchvision/models/detection/keypoint_rcnn.py), the same
architecture as detectron2's Keypoint R-CNN R50-FPN (``configs/COCO-Keypoints/keypoint_rcnn_R_50_FPN_1x.yaml``):
FPN over res2..res5 plus a max-pooled p6, one RPN head over p2..p6 with 3 aspect ratios per level, a 2-fc (1024)
box head on 7x7 RoIAlign, and the keypoint head of eight 3x3 512-channel convs on 14x14 RoIAlign, a 4x4
stride-2 deconvolution and a 2x bilinear upsampling to 56x56 heatmaps, one per joint, trained with a softmax
cross-entropy over each heatmap and normalised by the visible keypoints. The FPN is built from the backbone's
own stage widths, so the 128-channel smoke ``resnet-tiny`` and ResNet-50 (256..2048) take the same code.
Settings and their sources: ``keypoints_config.py``.

Deliberate differences from detectron2, all inside torchvision's fixed implementation (docs/transfer_keypoints.md):
RoIAlign without the half-pixel ``aligned=True`` correction (detectron2's ROIAlignV2); smooth-L1 beta 1/9 for
the RPN and box losses (detectron2: 0 = L1 for the RPN, 0.5 for the keypoint config's box head); BatchNorm
statistics over the whole effective batch in one process, which equals SyncBN over 8 GPUs x 2 images; no
precise-BN pass before testing (the detectron2 keypoint config leaves it off too).

Resumable like the other fine-tuning protocols (``evaluate.resume``): the image order and flips are functions of
(seed, epoch, index), each iteration re-seeds the RNGs that draw the multi-scale size and the RPN/RoI samples,
and SIGTERM/SIGUSR1 save the state and exit with the requeue code; a re-run continues to the same metrics.
"""

from __future__ import annotations

import contextlib
import copy
import io
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import nn
from torch.utils.data import DataLoader
from torchvision.models.detection import KeypointRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import TwoMLPHead
from torchvision.models.detection.keypoint_rcnn import KeypointRCNNHeads, KeypointRCNNPredictor
from torchvision.ops import FrozenBatchNorm2d, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from densessl.errors import ConfigError
from densessl.evaluate.resume import ResumableBatches, StopSignals, TrainState, open_train_state, seed_step
from densessl.evaluate.transfer.keypoints_config import KeypointRCNNConfig
from densessl.evaluate.transfer.keypoints_data import KeypointTargets, collate
from densessl.io import write_json
from densessl.models.backbones import ResNetTokens
from densessl.models.resnet import IMAGENET_MEAN, IMAGENET_STD, is_resnet
from densessl.progress import Progress, track

PROTOCOL = "keypointrcnn_r50_fpn_coco"
STAGES = ("layer1", "layer2", "layer3", "layer4")  # detectron2 res2..res5
_NORM_TYPES = (nn.BatchNorm2d, nn.SyncBatchNorm, nn.GroupNorm, nn.LayerNorm, FrozenBatchNorm2d)


def _resnet_of(backbone: nn.Module) -> nn.Module:
    resnet = backbone.resnet if isinstance(backbone, ResNetTokens) else backbone
    if not is_resnet(resnet):
        raise ConfigError(f"{PROTOCOL}: Keypoint R-CNN R50-FPN takes a ResNet backbone (torchvision names); got "
                          f"{type(resnet).__name__}")
    return resnet


def stage_channels(resnet: nn.Module) -> list[int]:
    """Output channels of layer1..layer4 (res2..res5), read from each stage's last block."""
    out = []
    for name in STAGES:
        last = getattr(resnet, name)[-1]
        out.append(int(last.bn3.num_features if hasattr(last, "bn3") else last.bn2.num_features))
    return out


def _frozen_bn(module: nn.Module) -> nn.Module:
    """Every BatchNorm2d replaced by a FrozenBatchNorm2d with its statistics (detectron2 ``FrozenBN``)."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            frozen.weight.copy_(child.weight.detach())
            frozen.bias.copy_(child.bias.detach())
            frozen.running_mean.copy_(child.running_mean)
            frozen.running_var.copy_(child.running_var)
            setattr(module, name, frozen)
        else:
            _frozen_bn(child)
    return module


def _freeze(resnet: nn.Module, freeze_at: int) -> None:
    """detectron2 ``ResNet.freeze``: 1 = the stem, k = the stem and res2..res(k)."""
    parts = [[resnet.conv1, resnet.bn1]] + [[getattr(resnet, s)] for s in STAGES]
    for modules in parts[:freeze_at]:
        for m in modules:
            for p in m.parameters():
                p.requires_grad_(False)


def build_model(backbone: nn.Module, cfg: KeypointRCNNConfig) -> KeypointRCNN:
    """torchvision Keypoint R-CNN on a copy of ``backbone`` (the caller's module is not modified)."""
    resnet = copy.deepcopy(_resnet_of(backbone))
    resnet.fc = nn.Identity()
    if cfg.norm == "frozen":
        _frozen_bn(resnet)
    for p in resnet.parameters():
        p.requires_grad_(True)
    _freeze(resnet, cfg.freeze_at)
    body = BackboneWithFPN(resnet, {s: str(i) for i, s in enumerate(STAGES)}, stage_channels(resnet),
                           cfg.fpn_channels, extra_blocks=LastLevelMaxPool())
    levels = ["0", "1", "2", "3"]
    anchors = AnchorGenerator(tuple((s,) for s in cfg.anchor_sizes), (tuple(cfg.aspect_ratios),) * 5)
    box_pool = MultiScaleRoIAlign(levels, output_size=7, sampling_ratio=cfg.roi_sampling_ratio)
    kp_pool = MultiScaleRoIAlign(levels, output_size=14, sampling_ratio=cfg.roi_sampling_ratio)
    model = KeypointRCNN(
        body, num_classes=2,
        min_size=tuple(cfg.min_size_train), max_size=cfg.max_size_train,
        image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD),
        rpn_anchor_generator=anchors,
        rpn_pre_nms_top_n_train=cfg.rpn_pre_nms_top_n_train, rpn_pre_nms_top_n_test=cfg.rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_train=cfg.rpn_post_nms_top_n_train, rpn_post_nms_top_n_test=cfg.rpn_post_nms_top_n_test,
        rpn_nms_thresh=cfg.rpn_nms_thresh, rpn_batch_size_per_image=cfg.rpn_batch_size_per_image,
        box_roi_pool=box_pool, box_head=TwoMLPHead(cfg.fpn_channels * 7 * 7, cfg.box_head_dim),
        box_score_thresh=cfg.box_score_thresh, box_nms_thresh=cfg.box_nms_thresh,
        box_detections_per_img=cfg.detections_per_image, box_batch_size_per_image=cfg.box_batch_size_per_image,
        keypoint_roi_pool=kp_pool, keypoint_head=KeypointRCNNHeads(cfg.fpn_channels, list(cfg.keypoint_head_channels)),
        keypoint_predictor=KeypointRCNNPredictor(cfg.keypoint_head_channels[-1], cfg.num_keypoints),
    )
    if cfg.box_head_dim != 1024:  # KeypointRCNN builds its box predictor for TwoMLPHead(…, 1024)
        from torchvision.models.detection.faster_rcnn import FastRCNNPredictor

        model.roi_heads.box_predictor = FastRCNNPredictor(cfg.box_head_dim, 2)
    return model


def param_groups(model: nn.Module, cfg: KeypointRCNNConfig) -> list[dict[str, Any]]:
    """detectron2 ``get_default_optimizer_params``: normalisation layers' parameters get
    ``weight_decay_norm``, every other parameter (biases included) ``weight_decay``."""
    norm, other = [], []
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if p.requires_grad:
                (norm if isinstance(module, _NORM_TYPES) else other).append(p)
    return [{"params": other, "weight_decay": cfg.weight_decay},
            {"params": norm, "weight_decay": cfg.weight_decay_norm}]


def _set_sizes(model: KeypointRCNN, cfg: KeypointRCNNConfig, train: bool) -> None:
    """Train: short side drawn from ``min_size_train`` (torchvision picks uniformly, detectron2 "choice").
    Test: ``min_size_test`` (torchvision tests at ``min_size[-1]``)."""
    t = model.transform
    t.min_size = tuple(cfg.min_size_train) if train else (cfg.min_size_test,)
    t.max_size = cfg.max_size_train if train else cfg.max_size_test


@dataclass
class _Progress:
    step: int = 0
    loss_curve: list[dict[str, float]] = field(default_factory=list)
    window: dict[str, float] = field(default_factory=dict)
    window_n: int = 0

    def record(self, losses: dict[str, float], lr: float, every: int, total: int) -> None:
        self.step += 1
        self.window_n += 1
        for k, v in losses.items():
            self.window[k] = self.window.get(k, 0.0) + v
        if self.window_n == every or self.step == total:
            self.loss_curve.append({"iteration": self.step, "lr": lr,
                                    **{k: v / self.window_n for k, v in self.window.items()}})
            self.window, self.window_n = {}, 0


def train(model: KeypointRCNN, batches: ResumableBatches, cfg: KeypointRCNNConfig, dev: torch.device,
          state: TrainState | None) -> _Progress:
    """``cfg.iterations`` SGD steps of detectron2's schedule, continuing ``state`` when it holds this run."""
    optimizer = torch.optim.SGD(param_groups(model, cfg), lr=cfg.lr, momentum=cfg.momentum)
    progress = _Progress()
    saved = state.load() if state is not None else None
    if saved is not None:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        progress = _Progress(**saved["progress"])

    def snapshot() -> dict[str, Any]:
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "progress": asdict(progress)}

    _set_sizes(model, cfg, train=True)
    every = max(1, cfg.iterations // 100)
    stream = batches.from_step(progress.step)
    bar = Progress(f"{PROTOCOL} train", cfg.iterations, initial=progress.step, items_per_step=cfg.batch_size, bar=True)
    try:
        with StopSignals(active=state is not None) as signals:
            while progress.step < cfg.iterations:
                model.train()
                lr = cfg.lr_at(progress.step)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                images, targets = next(stream)
                seed_step(cfg.seed, progress.step)  # multi-scale size, RPN and RoI sampling of this step
                images = [i.to(dev) for i in images]
                targets = [{k: v.to(dev) for k, v in t.items()} for t in targets]
                losses = model(images, targets)
                total = sum(losses.values())
                if not torch.isfinite(total):
                    raise FloatingPointError(f"{PROTOCOL}: loss is {total.item()} at iteration {progress.step}")
                optimizer.zero_grad(set_to_none=True)
                total.backward()
                optimizer.step()
                progress.record({k: v.item() for k, v in losses.items()}, lr, every, cfg.iterations)
                bar.update(1, loss=total.item(), lr=lr)
                if state is None:
                    continue
                if signals.received is not None and progress.step < cfg.iterations:
                    state.preempt(snapshot(), signals.received, f"after iteration {progress.step}/{cfg.iterations}")
                if cfg.checkpoint_every and progress.step % cfg.checkpoint_every == 0:
                    state.save(snapshot())
        bar.finish()
    finally:
        stream.close()
        bar.close()
    return progress


@torch.no_grad()
def predict(model: KeypointRCNN, data: KeypointTargets, cfg: KeypointRCNNConfig, dev: torch.device,
            ) -> list[dict[str, Any]]:
    """COCO keypoint results of every image: one entry per detection (detectron2 ``instances_to_coco_json``:
    continuous coordinates minus 0.5 back to COCO's pixel indices, the box score as the instance score)."""
    model.eval()
    _set_sizes(model, cfg, train=False)
    loader = DataLoader(data, batch_size=cfg.eval_batch_size, shuffle=False, num_workers=cfg.num_workers,
                        collate_fn=collate)
    results: list[dict[str, Any]] = []
    for images, targets in track(loader, f"{PROTOCOL} eval", unit="batch", items_of=lambda b: len(b[0]), bar=True):
        outputs = model([i.to(dev) for i in images])
        for out, target in zip(outputs, targets, strict=True):
            kps = out["keypoints"].cpu().clone()
            kps[..., :2] -= 0.5
            kps[..., 2] = 1.0
            for score, points in zip(out["scores"].cpu().tolist(), kps, strict=True):
                results.append({"image_id": int(target["image_id"]), "category_id": data.category_id,
                                "keypoints": [round(float(v), 2) for v in points.reshape(-1)], "score": float(score)})
    return results


def coco_keypoint_ap(gt: COCO, results: list[dict[str, Any]], image_ids: list[int] | None = None) -> dict[str, float]:
    """AP^kp, AP^kp50, AP^kp75 (percent) and the other COCOeval keypoint statistics, from pycocotools."""
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        if results:
            dt = gt.loadRes(results)
        else:  # loadRes cannot take an empty list; COCOeval scores "no detections" as 0 AP
            dt = COCO()
            dt.dataset = {"images": gt.dataset["images"], "categories": gt.dataset["categories"], "annotations": []}
            dt.createIndex()
        ev = COCOeval(gt, dt, iouType="keypoints")
        if image_ids is not None:
            ev.params.imgIds = image_ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    names = ("AP_kp", "AP_kp50", "AP_kp75", "AP_kp_M", "AP_kp_L", "AR_kp", "AR_kp50", "AR_kp75", "AR_kp_M", "AR_kp_L")
    out = {name: 100.0 * float(v) for name, v in zip(names, ev.stats, strict=True)}
    out["cocoeval_summary"] = printed.getvalue().strip().splitlines()[-10:]  # type: ignore[assignment]
    return out


def run_keypoints(backbone: nn.Module, data_root: Path, cfg: KeypointRCNNConfig, out_dir: Path | None = None,
                  device: str = "cpu", *, state_path: Path | None = None) -> dict[str, Any]:
    """Fine-tune Keypoint R-CNN from ``backbone`` on person_keypoints_train2017, evaluate on val2017.

    Returns ``AP_kp``, ``AP_kp50``, ``AP_kp75`` (percent; COCOeval's other keypoint statistics too) and
    ``details`` (loss curve, counts, config). With ``state_path`` the run resumes a state of this same run,
    saves every ``cfg.checkpoint_every`` iterations and on SIGTERM/SIGUSR1 (then ``Preempted`` is raised), and
    deletes it once the metrics exist."""
    cfg.validate()
    t0 = time.time()
    dev = torch.device(device)
    torch.manual_seed(cfg.seed)
    train_data = KeypointTargets(data_root, "train", True, num_keypoints=cfg.num_keypoints, flip_prob=cfg.flip_prob,
                                 min_keypoints=cfg.min_keypoints_per_image, max_items=cfg.max_train_items)
    val_data = KeypointTargets(data_root, "val", False, num_keypoints=cfg.num_keypoints, max_items=cfg.max_val_items)
    if len(train_data) < cfg.batch_size:
        raise ConfigError(f"{PROTOCOL}: {len(train_data)} training images with keypoints < batch_size "
                          f"{cfg.batch_size}; lower evaluate.keypoints.batch_size")
    state = open_train_state(state_path, PROTOCOL, cfg, _resnet_of(backbone))
    model = build_model(backbone, cfg).to(dev)
    batches = ResumableBatches(train_data, cfg.batch_size, cfg.seed, cfg.num_workers, dev.type == "cuda",
                               collate_fn=collate)
    progress = train(model, batches, cfg, dev, state)
    results = predict(model, val_data, cfg, dev)
    metrics = coco_keypoint_ap(val_data.coco, results, [val_data.image_id(i) for i in range(len(val_data))])
    summary = metrics.pop("cocoeval_summary")
    details = {"protocol": PROTOCOL, "iterations": progress.step, "loss_curve": progress.loss_curve,
               "num_train_images": len(train_data), "num_val_images": len(val_data),
               "num_detections": len(results), "stage_channels": stage_channels(_resnet_of(backbone)),
               "cocoeval_summary": summary, "device": str(dev), "config": asdict(cfg), "wall_time_s": time.time() - t0}
    result = {**metrics, "details": details}
    if out_dir is not None:
        write_json(Path(out_dir) / "metrics.json", result)
    if state is not None:
        state.discard()
    return result
