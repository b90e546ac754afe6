"""mmsegmentation transfer protocols through the toolkit: export key layout, one training iteration and one
evaluation of each protocol through the evaluate stage, resume after SIGTERM, and the one-line errors."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from densessl.errors import ConfigError, DataError
from densessl.evaluate.transfer.mmseg_config import MMSegSettings, build_mmseg_config
from densessl.evaluate.transfer.mmseg_export import to_mmseg_vit, vit_spec
from densessl.models.backbones import create_backbone
from densessl.models.variants import variant_kwargs
from densessl.train.trainer import Preempted


def _mmseg_backbone(backbone: torch.nn.Module, final_norm: bool = False) -> torch.nn.Module:
    """mmseg's VisionTransformer as the generated config builds it, at the backbone's own input size."""
    from mmseg.registry import MODELS
    from mmseg.utils import register_all_modules

    register_all_modules(init_default_scope=True)
    spec = vit_spec(backbone)
    s = MMSegSettings(crop_size=spec.img_size, drop_path=0.0, final_norm=final_norm)
    cfg = build_mmseg_config(spec, s, Path("/unused"), "safetensors:///unused", (0.5,) * 3, (0.5,) * 3)
    bb = dict(cfg["model"]["backbone"])
    bb.pop("init_cfg")
    from mmengine.registry import DefaultScope

    with DefaultScope.overwrite_default_scope("mmseg"):  # another toolkit's test may have set its own scope
        model = MODELS.build(bb)
    model.eval()  # mmseg's VisionTransformer.train() returns None, so .eval() cannot be chained
    return model


@pytest.mark.parametrize("variant", [None, "selfpatch", "loca"])
def test_export_loads_with_zero_missing_and_unexpected_keys(variant: str | None) -> None:
    """Every backbone key lands in mmseg's ViT and every mmseg ViT key is filled; the four outputs equal timm's
    block outputs (so the renames, the qkv layout and the class-token handling are right)."""
    torch.manual_seed(0)
    timm_vit = create_backbone("vit-tiny-p8", **variant_kwargs(variant)).eval()
    spec = vit_spec(timm_vit)
    mm = _mmseg_backbone(timm_vit)
    exported = to_mmseg_vit(timm_vit.state_dict(), spec.class_token, final_norm=False)
    result = mm.load_state_dict(exported.state, strict=False)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert exported.dropped == ([] if variant == "selfpatch" else ["norm.weight", "norm.bias"])
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        outs = mm(x)
        tokens = timm_vit.patch_embed(x)
        tokens = timm_vit._pos_embed(tokens)
        expected = []
        for i, block in enumerate(timm_vit.blocks):
            tokens = block(tokens)
            if i in spec.out_indices():
                grid = tokens[:, timm_vit.num_prefix_tokens:]
                expected.append(grid.transpose(1, 2).reshape(2, -1, 8, 8))
    for got, want in zip(outs, expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_final_norm_flag_maps_the_norm() -> None:
    timm_vit = create_backbone("vit-tiny-p8").eval()
    mm = _mmseg_backbone(timm_vit, final_norm=True)
    exported = to_mmseg_vit(timm_vit.state_dict(), True, final_norm=True)
    result = mm.load_state_dict(exported.state, strict=False)
    assert result.missing_keys == [] and result.unexpected_keys == [] and exported.dropped == []


def test_resnet_and_unknown_keys_are_refused() -> None:
    from densessl.errors import CheckpointError
    from densessl.models.backbones import as_token_backbone

    with pytest.raises(ConfigError, match="take a ViT backbone, got a .*ResNet"):
        vit_spec(as_token_backbone(create_backbone("resnet-tiny")))
    state = create_backbone("vit-tiny-p8").state_dict()
    state["blocks.0.ls1.gamma"] = torch.ones(128)
    with pytest.raises(CheckpointError, match="blocks.0.ls1.gamma"):
        to_mmseg_vit(state, True, False)


# ---------------------------------------------------------------------------------------------- stage runs
def _stage_cfg(tmp_path: Path, protocol: str, **overrides: Any):  # noqa: ANN202
    from densessl.config import load_config
    from densessl.stages.convert import run_convert
    from densessl.stages.data import run_data

    block = {"iterations": 1, "batch_size": 2, "checkpoint_interval": 1, "log_interval": 1, **overrides}
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps({"results_dir": str(tmp_path / "results"), "data": {"synthetic_size": "tiny"},
                                "evaluate": {"semfpn" if protocol == "semfpn_ade20k" else "upernet": block}}))
    cfg = load_config([path])
    run_data(cfg, "ade20k")
    run_convert(cfg, "random-init/vit-tiny-p8-seed1")
    return cfg


@pytest.mark.parametrize("protocol", ["semfpn_ade20k", "upernet_ade20k"])
def test_one_iteration_and_evaluation_through_the_cli(protocol: str, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from densessl.cli import main

    cfg = _stage_cfg(tmp_path, protocol)
    monkeypatch.setenv("DENSESSL_ROOT", str(Path(__file__).resolve().parents[1]))
    rc = main(["evaluate", protocol, "--run", "random-init/vit-tiny-p8-seed1", "--config",
               str(tmp_path / "config.yaml"), "--device", "cpu"])
    assert rc == 0
    out = cfg.eval_metrics(protocol, cfg.run("random-init/vit-tiny-p8-seed1"))
    metrics = json.loads(out.read_text())["metrics"]
    assert {"aAcc", "mIoU", "mAcc", "per_class_IoU"} <= set(metrics)
    assert 0.0 <= metrics["mIoU"] <= 100.0 and len(metrics["per_class_IoU"]) == 150
    work = out.parent / "work_dir"
    assert (work / "iter_1.pth").is_file() and (work / "backbone_mmseg_vit.safetensors").is_file()


@pytest.mark.usefixtures("sigterm_guard")
def test_sigterm_checkpoints_and_the_rerun_resumes(tmp_path: Path) -> None:
    """SIGTERM in iteration 2 of 3 → checkpoint iter_2 + Preempted (exit 3 in the CLI); the re-run starts at 2."""
    from mmengine.hooks import Hook
    from mmengine.registry import HOOKS

    from densessl.stages.evaluate import run_evaluate

    started: list[int] = []

    @HOOKS.register_module(name="_TestSignalHook", force=True)
    class _SignalHook(Hook):
        def __init__(self, at: int) -> None:
            self.at = at

        def before_train(self, runner) -> None:  # noqa: ANN001
            started.append(runner.iter)

        def before_train_iter(self, runner, batch_idx, data_batch=None) -> None:  # noqa: ANN001
            if runner.iter + 1 == self.at:
                os.kill(os.getpid(), signal.SIGTERM)

    from densessl.evaluate.transfer import mmseg_config

    original = mmseg_config.build_mmseg_config

    def with_signal(*args: Any, **kwargs: Any) -> dict[str, Any]:
        cfg = original(*args, **kwargs)
        cfg["custom_hooks"] = [dict(type="_TestSignalHook", at=2 if not started else 0)]
        return cfg

    cfg = _stage_cfg(tmp_path, "semfpn_ade20k", iterations=3, checkpoint_interval=10)
    run_id = "random-init/vit-tiny-p8-seed1"
    import densessl.evaluate.transfer.mmseg_ade20k as protocol_module

    patched = pytest.MonkeyPatch()
    patched.setattr(protocol_module, "build_mmseg_config", with_signal)
    try:
        with pytest.raises(Preempted, match="iteration 2"):
            run_evaluate(cfg, "semfpn_ade20k", run_id, "cpu")
        work = cfg.eval_metrics("semfpn_ade20k", cfg.run(run_id)).parent / "work_dir"
        assert (work / "iter_2.pth").is_file()
        assert (work / "last_checkpoint").read_text().strip().endswith("iter_2.pth")
        out = run_evaluate(cfg, "semfpn_ade20k", run_id, "cpu")
    finally:
        patched.undo()
    assert started == [0, 2]
    assert "mIoU" in json.loads(out.read_text())["metrics"]


def test_resnet_run_is_refused_in_one_line(tmp_path: Path) -> None:
    from densessl.config import load_config
    from densessl.stages.evaluate import run_evaluate

    cfg = load_config([], preset="smoke")
    with pytest.raises(ConfigError, match="takes vit backbones, and clove/resnet-tiny-imagenet is a resnet-tiny"):
        run_evaluate(cfg, "semfpn_ade20k", "clove/resnet-tiny-imagenet")


def test_missing_or_broken_toolkit_gives_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    from densessl.evaluate.transfer import mmengine_run

    monkeypatch.setitem(sys.modules, "mmcv._ext", None)  # what a build without compiled ops looks like
    with pytest.raises(ConfigError, match=r"cannot import mmcv\._ext .*make env"):
        mmengine_run.require_mmcv_ops()
    monkeypatch.setitem(sys.modules, "mmcv.ops", None)
    with pytest.raises(ConfigError, match=r"mmcv\.ops does not import .*build_mmcv\.py --rebuild"):
        mmengine_run.check_mmcv_ops()


def test_doctor_checks_mmcv_ops(capsys: pytest.CaptureFixture[str]) -> None:
    from densessl.cli import main

    assert main(["doctor"]) == 0
    assert "mmcv 2.1.0: RoIAlign and NMS OK" in capsys.readouterr().out


def test_layout_the_toolkit_cannot_read_is_named(tmp_path: Path) -> None:
    from densessl.evaluate.transfer.mmseg_ade20k import check_layout

    root = tmp_path / "ADEChallengeData2016"
    for sub in ("images/training", "images/validation", "annotations/training", "annotations/validation"):
        (root / sub).mkdir(parents=True)
    (root / "images/training/a.jpg").write_bytes(b"")
    (root / "images/validation/b.jpg").write_bytes(b"")
    (root / "annotations/validation/b.png").write_bytes(b"")
    with pytest.raises(DataError, match="annotations/training has none"):
        check_layout(tmp_path)
