"""The CUDA paths: every method's training step under bf16 autocast, resume on the GPU, and the evaluations.

CI has no GPU, so every test here is skipped there; on a machine with one, `pytest tests/test_cuda.py` runs
them (docs/performance.md, "The CUDA tests"). Each can fail: a method whose loss is not
finite in bf16, parameters left on the CPU, a frozen parameter that moves, or a GPU result that disagrees
with the CPU one beyond what bf16/TF32 rounding explains.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from densessl.config import load_config
from densessl.methods import get_method
from densessl.methods.base import build_dataclass
from densessl.models.backbones import create_backbone
from densessl.train.trainer import TrainConfig, Trainer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI has none)")

SMOKE = load_config(preset="smoke") if torch.cuda.is_available() else None
SMOKE_RUNS = [r.id for r in SMOKE.pretrain_runs] if SMOKE is not None else []


def _images(n: int = 32, size: int = 64) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray((rng.random((size, size, 3)) * 255).astype("uint8")) for _ in range(n)]


def _trainer(run_id: str, out_dir: Path, precision: str = "bf16", device: str = "cuda", epochs: int = 2) -> Trainer:
    run = SMOKE.run(run_id)
    settings = SMOKE.pretrain_settings(run)
    train = dict(settings["train"], epochs=epochs, batch_size_per_gpu=8, num_workers=0, precision=precision,
                 warmup_epochs=1, log_every_steps=1, checkpoint_every_steps=1000, tensorboard=False)
    train_cfg = build_dataclass(TrainConfig, train, "test")
    torch.manual_seed(0)
    method = get_method(run.method)(run.arch, settings["method"], epochs=epochs)
    images = _images()
    data: list = images
    if method.labels == "image":
        data = [(img, i % method.cfg.num_classes) for i, img in enumerate(images)]
    elif method.labels == "patch":  # a label map per image, every class id in range (0 = unlabelled)
        rng = np.random.default_rng(1)
        data = [(img, rng.integers(0, method.cfg.num_classes, (img.height, img.width)).astype(np.uint8))
                for img in images]
    return Trainer(method, data, train_cfg, out_dir, device=device)


def _losses(out_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("run_id", SMOKE_RUNS)
def test_every_method_trains_on_cuda_in_bf16(run_id: str, tmp_path: Path) -> None:
    trainer = _trainer(run_id, tmp_path)
    assert trainer.device.type == "cuda" and trainer.autocast
    student = trainer._student()
    before = {k: v.detach().clone() for k, v in student.named_parameters()}
    teacher = getattr(trainer.method, "teacher", None)
    teacher_before = ({k: v.detach().clone() for k, v in teacher.named_parameters()} if teacher is not None
                      else {})
    trainer.fit(max_steps=3)
    assert all(p.is_cuda for p in trainer.method.parameters())
    losses = _losses(tmp_path)
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses), losses
    moved = [k for k, v in student.named_parameters() if not torch.equal(v.detach(), before[k])]
    assert any(k.startswith(("backbone", "module.backbone")) or "blocks" in k or "layer" in k for k in moved), moved
    for k, v in student.named_parameters():
        if not v.requires_grad:
            assert torch.equal(v.detach(), before[k]), f"{k} is frozen but changed"
    for k, v in (teacher.named_parameters() if teacher is not None else []):
        assert not v.requires_grad, f"teacher parameter {k} takes gradients"
    if teacher is not None:  # the EMA moved it (momentum < 1), the optimiser did not own it
        assert any(not torch.equal(v.detach(), teacher_before[k]) for k, v in teacher.named_parameters())
    # the checkpoint written on the GPU resumes on a CPU-only machine, weights intact
    path = trainer.save_checkpoint()
    on_cpu = _trainer(run_id, tmp_path / "cpu", precision="fp32", device="cpu")
    on_cpu.load_checkpoint(path)
    for k, v in on_cpu._student().named_parameters():
        assert torch.equal(v.detach(), dict(student.named_parameters())[k].detach().cpu()), k


@pytest.mark.parametrize("run_id", SMOKE_RUNS)
def test_first_loss_in_bf16_on_cuda_matches_fp32_on_cpu(run_id: str, tmp_path: Path) -> None:
    """Same weights, same batch, step 0: bf16 autocast must not change the objective beyond rounding."""
    gpu = _trainer(run_id, tmp_path / "gpu")
    cpu = _trainer(run_id, tmp_path / "cpu", precision="fp32", device="cpu")
    batch = next(iter(cpu._loader()))
    torch.manual_seed(1)
    loss_cpu = float(cpu.train_step(batch, 0)[0])
    torch.manual_seed(1)
    loss_gpu = float(gpu.train_step(batch, 0)[0])
    assert loss_gpu == pytest.approx(loss_cpu, rel=0.03, abs=0.03), (loss_cpu, loss_gpu)


def test_resume_on_cuda_continues_the_run(tmp_path: Path) -> None:
    """fp32 on the GPU: the resumed loss sequence equals the uninterrupted one up to kernel non-determinism."""
    run_id = "dino/vit-tiny-p8-imagenet"
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    _trainer(run_id, full, precision="fp32").fit()
    _trainer(run_id, resumed, precision="fp32").fit(max_steps=3)
    _trainer(run_id, resumed, precision="fp32").fit()
    a, b = _losses(full), _losses(resumed)
    assert len(a) == len(b) == 8
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)


def test_davis_propagation_on_cuda_equals_cpu(tmp_path: Path) -> None:
    from densessl.data.synthetic import synthesize
    from densessl.evaluate.davis_propagation import DavisConfig, run_davis_backbone
    from densessl.models.backbones import as_token_backbone

    root = tmp_path / "davis"
    synthesize("davis", root, "tiny", seed=0)
    torch.manual_seed(0)
    backbone = as_token_backbone(create_backbone("vit-tiny-p8")).eval()
    cfg = DavisConfig(short_side=72, size_multiple=8)
    on_cpu = run_davis_backbone(backbone, root, cfg, tmp_path / "cpu", device="cpu")
    on_gpu = run_davis_backbone(backbone, root, cfg, tmp_path / "gpu", device="cuda")
    assert on_gpu["J&F-Mean"] == pytest.approx(on_cpu["J&F-Mean"], abs=0.01)


def test_patchseg_linear_and_inat_run_on_cuda(tmp_path: Path) -> None:
    from densessl.data.synthetic import synthesize
    from densessl.evaluate.inat_finetune import InatFinetuneConfig, run_inat_finetune
    from densessl.evaluate.linear_seg import LinearSegConfig, run_linear_seg
    from densessl.evaluate.patchseg import PatchSegConfig, run_patchseg
    from densessl.models.backbones import as_token_backbone

    def smoke_cfg(cls: type, protocol: str, **extra: object):  # noqa: ANN202
        return build_dataclass(cls, {**SMOKE.eval_settings(protocol), **extra}, protocol)

    for name in ("coco", "ade20k", "inat"):
        synthesize(name, tmp_path / name, "smoke", seed=0)
    torch.manual_seed(0)
    backbone = as_token_backbone(create_backbone("vit-tiny-p8"))
    ps = run_patchseg(backbone, tmp_path / "coco", smoke_cfg(PatchSegConfig, "patchseg_coco", dataset="coco"),
                      device="cuda")
    assert 0.0 <= ps["macro_recall"] <= 1.0
    lin = run_linear_seg(backbone, tmp_path / "ade20k", smoke_cfg(LinearSegConfig, "linear_ade20k"), device="cuda")
    assert 0.0 <= lin["mIoU"] <= 100.0
    inat = run_inat_finetune(backbone, tmp_path / "inat", smoke_cfg(InatFinetuneConfig, "inat19_finetune"),
                             device="cuda")
    assert 0.0 <= inat["top1"] <= inat["top5"] <= 100.0


def test_imagenet_knn_linear_and_patchseg_finetune_run_on_cuda(tmp_path: Path) -> None:
    from densessl.data.synthetic import synthesize
    from densessl.evaluate.knn import KnnConfig, run_knn
    from densessl.evaluate.linear_cls import LinearClsConfig, run_linear_cls
    from densessl.evaluate.patchseg import PatchSegConfig, run_patchseg
    from densessl.models.backbones import as_token_backbone

    for name in ("imagenet", "coco"):
        synthesize(name, tmp_path / name, "tiny", seed=0)
    torch.manual_seed(0)
    for arch in ("vit-tiny-p8", "resnet-tiny"):
        backbone = as_token_backbone(create_backbone(arch))
        knn = run_knn(backbone, tmp_path / "imagenet", KnnConfig(), device="cuda")
        assert 0.0 <= knn["knn_top1"] <= knn["knn_top5"] <= 100.0
        lin = run_linear_cls(backbone, tmp_path / "imagenet", LinearClsConfig(epochs=2, batch_size=8), device="cuda",
                             state_path=tmp_path / f"{arch}.pt")
        assert 0.0 <= lin["linear_top1"] <= 100.0
    vit = create_backbone("vit-tiny-p8")
    ps = run_patchseg(vit, tmp_path / "coco", PatchSegConfig(head="mlp", batch_size=4, epochs=1, warmup_steps=0,
                                                             full_finetune=True, skip_blocks=1), device="cuda")
    assert ps["autocast_bf16"] and 0.0 <= ps["macro_recall"] <= 1.0
