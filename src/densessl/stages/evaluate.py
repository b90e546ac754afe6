"""Evaluate stage: one protocol on one exported backbone → metrics.json."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from densessl import provenance
from densessl.checkpoints.io import load_backbone
from densessl.config import EVALUATIONS, Config
from densessl.data.manifest import data_root
from densessl.errors import ConfigError
from densessl.evaluate.protocol_configs import MMSEG_DECODER, protocol_config_class
from densessl.evaluate.protocol_configs import protocol_settings as _protocol_settings
from densessl.evaluate.transfer.mmdet_protocols import PROTOCOLS as MMDET_PROTOCOLS
from densessl.io import read_json, sha256_file, write_json, write_text
from densessl.methods.base import build_dataclass
from densessl.models.backbones import ResNetTokens, as_token_backbone, backbone_info

KEEP_OUTPUTS = {"davis2017"}
# mmdetection protocols (evaluate/transfer/mmdet_run.py): trained and tested by the toolkit's own runner, which
# resumes from its checkpoint in the work folder beside metrics.json.
DETECTION_PROTOCOLS = set(MMDET_PROTOCOLS)
# Protocols that train for hours at paper scale: their runners take ``state_path`` and resume a preempted run
# from it (the state lives next to metrics.json, which is the stage's only declared output, so neither
# Snakemake nor DVC removes it between attempts; the runner deletes it once the metrics exist).
RESUMABLE = {"linear_ade20k", "inat19_finetune", "linear_imagenet", "keypointrcnn_r50_fpn_coco"}
TRAIN_STATE_NAME = "train_state.pt"

# The official DAVIS evaluator reports fractions; the papers' tables (paper_tables.yaml) print percent under
# these names.
_DAVIS_PERCENT = {"JF_mean": "J&F-Mean", "J_mean": "J-Mean", "F_mean": "F-Mean", "J_recall": "J-Recall",
                  "F_recall": "F-Recall"}


def percent_aliases(protocol: str, metrics: dict[str, Any]) -> dict[str, Any]:
    if protocol != "davis2017":
        return {}
    return {alias: 100.0 * float(metrics[key]) for alias, key in _DAVIS_PERCENT.items() if key in metrics}


def write_patchseg_csv(protocol: str, metrics: dict[str, Any], backbone: str, folder: Path) -> Path | None:
    """Patch-Seg only: the official ``results/outputs-{dataset}.csv`` (header + this run's row) next to
    metrics.json; the report concatenates them per dataset."""
    if EVALUATIONS[protocol]["settings"] != "patchseg":
        return None
    from densessl.evaluate.patchseg import csv_header, csv_row

    path = folder / f"outputs-{metrics['dataset']}.csv"
    write_text(path, csv_header() + csv_row(metrics, backbone))
    return path


def _protocol(protocol: str) -> tuple[type, Any]:
    """The settings dataclass (``densessl.evaluate.protocol_configs``) and the runner of a probe protocol."""
    config_cls = protocol_config_class(protocol)  # refuses an unknown name
    if protocol in DETECTION_PROTOCOLS:
        raise ConfigError(f"evaluate {protocol}: an mmdetection protocol evaluates a --run backbone (exported into "
                          f"mmdet's key layout); --timm-model is for the probe protocols")
    return config_cls, _runner(protocol)


def _runner(protocol: str) -> Any:
    if EVALUATIONS[protocol]["settings"] == "patchseg":
        from densessl.evaluate.patchseg import run_patchseg

        return run_patchseg
    if protocol == "linear_ade20k":
        from densessl.evaluate.linear_seg import run_linear_seg

        return run_linear_seg
    if protocol == "davis2017":
        from densessl.evaluate.davis_propagation import run_davis_backbone

        return run_davis_backbone
    if protocol == "inat19_finetune":
        from densessl.evaluate.inat_finetune import run_inat_finetune

        return run_inat_finetune
    if protocol == "knn_imagenet":
        from densessl.evaluate.knn import run_knn

        return run_knn
    if protocol == "linear_imagenet":
        from densessl.evaluate.linear_cls import run_linear_cls

        return run_linear_cls
    if protocol == "keypointrcnn_r50_fpn_coco":
        from densessl.evaluate.transfer.keypoints import run_keypoints

        return run_keypoints
    if protocol in MMSEG_DECODER:
        from densessl.evaluate.transfer.mmseg_ade20k import run_mmseg_ade20k

        return run_mmseg_ade20k
    raise ConfigError(f"unknown evaluation {protocol!r}; choose one of {sorted(EVALUATIONS)}")


def _run_detection(cfg: Config, protocol: str, backbone_path: Path, manifest: Path, out: Path,
                   settings: dict[str, Any], device: str | None) -> dict[str, Any]:
    """An mmdetection protocol: the toolkit trains and tests in ``<metrics folder>/mmdet`` (its log, resolved
    config and the checkpoint a preempted attempt resumes from live there, beside metrics.json)."""
    from densessl.evaluate.transfer.mmdet_protocols import DetectionConfig
    from densessl.evaluate.transfer.mmdet_run import run_detection

    det_cfg = build_dataclass(DetectionConfig, settings, f"evaluate.{protocol}")
    return run_detection(protocol, backbone_path, manifest, det_cfg, out.parent / "mmdet", device=device,
                         threads=cfg.threads)


def detection_nproc(cfg: Config, protocol: str) -> int:
    """Processes for an mmdet protocol: its ``gpus`` (the published batch is per that many processes; the
    torchrun launcher starts one per GPU). Without CUDA the same number of CPU processes join over gloo, which
    is how the multi-process path runs where there is no GPU; SyncBN, which torch runs on CUDA tensors only, is
    refused there before any process starts."""
    import torch

    from densessl.evaluate.transfer.mmdet_protocols import DetectionConfig

    det = build_dataclass(DetectionConfig, cfg.eval_settings(protocol), f"evaluate.{protocol}")
    if det.gpus > 1 and det.norm == "SyncBN" and not torch.cuda.is_available():
        raise ConfigError(f"evaluate.{protocol}: gpus {det.gpus} with norm SyncBN needs CUDA devices (torch's "
                          f"SyncBatchNorm runs on GPU tensors only) and none is visible; run on a GPU node, or "
                          f"set evaluate.{protocol}.norm: BN for CPU processes, or gpus: 1")
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if 0 < visible < det.gpus:
        raise ConfigError(f"evaluate.{protocol}: gpus {det.gpus} (one process per GPU, total batch "
                          f"{det.total_batch} at lr {det.lr}) but this node shows {visible} GPU(s); run it on "
                          f"{det.gpus} GPUs (the DAG's evaluate rule asks the scheduler for them), or set "
                          f"evaluate.{protocol}.gpus and lr for the batch you run")
    return det.gpus


TOOLKIT_WORK_DIR = "work_dir"


def _toolkit_kwargs(protocol: str, out: Path) -> dict[str, Any]:
    """Toolkit protocols (mmengine runner) keep logs and checkpoints in a work_dir next to metrics.json: the
    stage's only declared output, so neither Snakemake nor DVC removes the folder between attempts, and a
    re-run resumes from its newest checkpoint."""
    return {"work_dir": out.parent / TOOLKIT_WORK_DIR} if EVALUATIONS[protocol].get("toolkit") else {}


def run_evaluate(cfg: Config, protocol: str, run_id: str, device: str | None = None) -> Path:
    started = time.time()
    run = cfg.run(run_id)
    if protocol not in DETECTION_PROTOCOLS:
        config_cls, runner = _protocol(protocol)
    if not cfg.applies(protocol, run):
        families = " and ".join(EVALUATIONS[protocol]["backbones"])
        raise ConfigError(f"evaluate {protocol}: the protocol takes {families} backbones, and {run.id} is a "
                          f"{run.arch}; the DAG skips this pair and the report shows n/a")
    if protocol in DETECTION_PROTOCOLS:
        settings = cfg.eval_settings(protocol)
        backbone_path = cfg.backbone(run)
        manifest = cfg.data_manifest(EVALUATIONS[protocol]["dataset"])
        out = cfg.eval_metrics(protocol, run)
        metrics = _run_detection(cfg, protocol, backbone_path, manifest, out, settings, device)
        from densessl.evaluate.transfer.mmengine_run import rank

        if rank() != 0:
            return out  # every process of the run holds the evaluator's metrics; rank 0 writes them
        meta = read_json(backbone_path.with_suffix(".json"))
        write_json(out, {
            "protocol": protocol, "run": run.id, "method": run.method, "arch": run.arch, "pretrain_data": run.data,
            "settings": settings, "metrics": metrics,
            "provenance": provenance.collect(f"evaluate/{protocol}", cfg.hash, {
                "backbone_sha256": sha256_file(backbone_path), "backbone_source": meta.get("source"),
                "data": read_json(manifest)["fingerprint"]}, started)})
        return out
    settings = _protocol_settings(cfg, protocol)
    eval_cfg = build_dataclass(config_cls, settings, f"evaluate.{EVALUATIONS[protocol]['settings']}")
    backbone_path = cfg.backbone(run)
    backbone, meta = load_backbone(backbone_path)
    backbone = as_token_backbone(backbone)  # a ResNet's last feature map is evaluated as a patch grid
    manifest = cfg.data_manifest(EVALUATIONS[protocol]["dataset"])
    out = cfg.eval_metrics(protocol, run)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    # Protocols with per-frame outputs (DAVIS palette PNGs + official CSVs) keep them next to metrics.json.
    keep = out.parent / "results" if protocol in KEEP_OUTPUTS else None
    resume = {"state_path": out.parent / TRAIN_STATE_NAME} if protocol in RESUMABLE else {}
    resume.update(_toolkit_kwargs(protocol, out))
    metrics = runner(backbone, data_root(manifest), eval_cfg, keep, device=device, **resume)
    metrics.update(percent_aliases(protocol, metrics))
    write_patchseg_csv(protocol, metrics, run.id, out.parent)
    write_json(out, {
        "protocol": protocol, "run": run.id, "method": run.method, "arch": run.arch, "pretrain_data": run.data,
        "settings": settings, "metrics": metrics,
        "provenance": provenance.collect(f"evaluate/{protocol}", cfg.hash, {
            "backbone_sha256": sha256_file(backbone_path), "backbone_source": meta.get("source"),
            "data": read_json(manifest)["fingerprint"]}, started)})
    return out


def run_evaluate_timm(cfg: Config, protocol: str, model_name: str, pretrained: bool, out: Path,
                      device: str | None = None, *, img_size: int | None = None) -> Path:
    """Evaluate any timm model by name (the Patch-Seg benchmark's own use: probing published backbones),
    outside the DAG. Data and protocol settings come from the configuration as for a run.

    The images are normalised with the model's own timm mean/std (``pretrained_cfg``, as the official
    benchmark does), not ImageNet's. ``img_size`` is passed to ``timm.create_model`` (timm resamples the
    released positional embedding): the benchmark builds its custom DINOv2 entries at 224 instead of 518.
    """
    import timm

    started = time.time()
    config_cls, runner = _protocol(protocol)
    settings = cfg.eval_settings(protocol)
    settings.update(EVALUATIONS[protocol].get("fixed", {}))
    eval_cfg = build_dataclass(config_cls, settings, f"evaluate.{EVALUATIONS[protocol]['settings']}")
    if img_size is not None and img_size < 1:
        raise ConfigError(f"--img-size {img_size}: must be a positive number of pixels (e.g. 224)")
    model_kwargs: dict[str, Any] = {} if img_size is None else {"img_size": img_size}
    try:
        backbone = timm.create_model(model_name, pretrained=pretrained, num_classes=0, **model_kwargs)
    except (RuntimeError, ValueError) as exc:  # unknown name, or weights that cannot be fetched
        raise ConfigError(f"--timm-model {model_name!r}: {exc}") from exc
    except TypeError as exc:  # a model class without an img_size argument (e.g. a CNN)
        if img_size is None:
            raise
        raise ConfigError(f"--timm-model {model_name!r} does not take --img-size: {exc}") from exc
    backbone = as_token_backbone(backbone)
    if not isinstance(backbone, ResNetTokens) and not hasattr(backbone, "patch_embed"):
        raise ConfigError(f"--timm-model {model_name!r} is a {type(backbone).__name__}, not a ViT-style model "
                          f"with patch tokens; the dense protocols read patch tokens (pick a ViT, e.g. "
                          f"vit_base_patch16_clip_224.openai)")
    info = backbone_info(backbone)
    manifest = cfg.data_manifest(EVALUATIONS[protocol]["dataset"])
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    keep = Path(out).parent / "results" if protocol in KEEP_OUTPUTS else None
    metrics = runner(backbone, data_root(manifest), eval_cfg, keep, device=device,
                     **_toolkit_kwargs(protocol, Path(out)))
    metrics.update(percent_aliases(protocol, metrics))
    write_patchseg_csv(protocol, metrics, model_name, Path(out).parent)
    write_json(Path(out), {
        "protocol": protocol, "timm_model": model_name, "pretrained": pretrained, "settings": settings,
        # The backbone as built: native input size and its timm mean/std (Patch-Seg, the linear probe and iNat
        # normalise with these; DAVIS keeps its script's fixed color_normalize, see davis_propagation.py).
        "backbone": {"img_size": info.img_size, "patch_size": info.patch_size, "mean": list(info.mean),
                     "std": list(info.std)},
        "metrics": metrics, "provenance": provenance.collect(f"evaluate/{protocol}", cfg.hash, {
            "data": read_json(manifest)["fingerprint"]}, started)})
    return Path(out)
