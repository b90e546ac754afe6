"""ImageNet k-NN and linear evaluation (DINO eval_knn.py / eval_linear.py): hand-worked votes, the linear
head's input, resumption, and both protocols through the evaluate stage at tiny size."""

from __future__ import annotations

import copy
import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch

from densessl.data.imagenet import LabelledImageFolder
from densessl.data.synthetic import synthesize
from densessl.errors import ConfigError
from densessl.evaluate import linear_cls
from densessl.evaluate.imagenet_features import eval_sizes, global_feature, linear_feature
from densessl.evaluate.knn import KnnConfig, knn_classifier, run_knn
from densessl.evaluate.linear_cls import LinearClsConfig, cosine_epoch_lr, run_linear_cls
from densessl.models.backbones import as_token_backbone, create_backbone
from densessl.train.trainer import Preempted


@pytest.fixture(scope="module")
def imagenet_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("imagenet")
    synthesize("imagenet", root, "tiny", 0)
    return root


# ---------------------------------------------------------------- k-NN vote, worked by hand

def _unit(deg: float) -> list[float]:
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


def test_weighted_vote_lets_one_close_neighbour_outvote_two_far_ones() -> None:
    # query at 0 deg; train at 0 deg (class 1), 36.87 and 45.57 deg (class 0), 180 deg (class 2)
    # cosines: 1.0, 0.8, 0.7, -1.0.  k = 3 keeps the first three.
    train = torch.tensor([_unit(0.0), _unit(math.degrees(math.acos(0.8))), _unit(math.degrees(math.acos(0.7))),
                          _unit(180.0)])
    labels = torch.tensor([1, 0, 0, 2])
    query, target = torch.tensor([_unit(0.0)]), torch.tensor([1])
    # T = 0.07: class 1 weight e^(1/0.07) = e^14.29 = 1.6e6; class 0: e^(0.8/0.07) + e^(0.7/0.07) = 9.2e4 + 2.2e4
    top1, top5 = knn_classifier(train, labels, query, target, k=3, temperature=0.07, num_classes=3)
    assert (top1, top5) == (100.0, 100.0)
    # T = 10: weights e^0.1, e^0.08, e^0.07 -> class 0 has 2.16 > class 1's 1.105: the majority wins
    top1, top5 = knn_classifier(train, labels, query, target, k=3, temperature=10.0, num_classes=3)
    assert top1 == 0.0 and top5 == 100.0  # class 1 is still second (top-5 uses min(5, k) = 3 places)
    assert math.exp(0.8 / 10) + math.exp(0.7 / 10) > math.exp(1.0 / 10)


def test_vote_counts_only_the_k_nearest() -> None:
    train = torch.tensor([_unit(0.0), _unit(10.0), _unit(20.0), _unit(30.0)])
    labels = torch.tensor([0, 1, 1, 1])
    query = torch.tensor([_unit(0.0), _unit(29.0)])
    top1, _ = knn_classifier(train, labels, query, torch.tensor([0, 1]), k=1, temperature=0.07, num_classes=2)
    assert top1 == 100.0  # the single nearest neighbour decides both
    # k = 4 (all) at T = 0.07 for the first query: e^(1/0.07) vs sum of e^(cos 10, 20, 30 / 0.07)
    w0 = math.exp(1 / 0.07)
    w1 = sum(math.exp(math.cos(math.radians(d)) / 0.07) for d in (10, 20, 30))
    top1, _ = knn_classifier(train, labels, query[:1], torch.tensor([0]), k=4, temperature=0.07, num_classes=2)
    assert (top1 == 100.0) == (w0 > w1)


def test_knn_default_values_are_the_official_ones() -> None:
    cfg = KnnConfig()
    assert (cfg.nb_knn, cfg.report_k, cfg.temperature, cfg.batch_size) == ([10, 20, 100, 200], 20, 0.07, 128)
    assert eval_sizes(None, None, 224) == (256, 224)  # Resize(256) -> CenterCrop(224)
    with pytest.raises(ConfigError, match="report_k"):
        KnnConfig(nb_knn=[10], report_k=20).validate()


def test_linear_default_values_are_the_official_ones() -> None:
    # eval_linear.py: --epochs 100, --lr 0.001 (at batch 256), --batch_size_per_gpu 128, SGD momentum 0.9 and
    # weight_decay 0 (hard-coded), --val_freq 1; LinearClassifier: weight N(0, 0.01), bias 0
    cfg = LinearClsConfig()
    assert (cfg.epochs, cfg.lr, cfg.batch_size, cfg.momentum, cfg.weight_decay, cfg.val_freq) == \
        (100, 0.001, 128, 0.9, 0.0, 1)
    torch.manual_seed(0)
    head = linear_cls.LinearClassifier(384 * 4, 1000)
    assert torch.all(head.linear.bias == 0)
    assert head.linear.weight.std().item() == pytest.approx(0.01, rel=0.01)  # 1.5M draws: within 1 %
    # the schedule: CosineAnnealingLR(epochs, eta_min=0) per epoch from lr x 128 / 256; epoch 50 of 100 is half
    assert cosine_epoch_lr(0.001 * 128 / 256, 0, 100) == 0.0005
    assert cosine_epoch_lr(0.001 * 128 / 256, 50, 100) == pytest.approx(0.00025, rel=1e-12)


# ---------------------------------------------------------------- the features each protocol reads

def test_linear_input_of_vit_s_is_its_last_four_normed_cls_tokens() -> None:
    torch.manual_seed(0)
    vit = create_backbone("vit-s16").eval()
    x = torch.randn(2, 3, 224, 224)
    outputs: list[torch.Tensor] = []
    hooks = [b.register_forward_hook(lambda _m, _i, out: outputs.append(out)) for b in vit.blocks]
    with torch.no_grad():
        final = vit.forward_features(x)
    for h in hooks:
        h.remove()
    assert len(outputs) == 12
    # manual: the CLS token of blocks 9..12, each through the final LayerNorm, concatenated in block order
    expected = torch.cat([vit.norm(o)[:, 0] for o in outputs[-4:]], dim=-1)
    n_last, avgpool = LinearClsConfig().resolved(vit.embed_dim)
    assert (n_last, avgpool) == (4, False)  # ViT-S: eval_linear.py's n_last_blocks 4, no avgpool
    with torch.no_grad():
        got = linear_feature(vit, x, n_last, avgpool)
    assert got.shape == (2, 4 * 384)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(got[:, -384:], final[:, 0], rtol=0, atol=1e-5)  # last = the k-NN feature
    torch.testing.assert_close(global_feature(vit, x), final[:, 0])


def test_vit_b_avgpool_interleaves_cls_and_patch_mean() -> None:
    torch.manual_seed(0)
    vit = create_backbone("vit-tiny-p8").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        tokens = vit.forward_features(x)
        got = linear_feature(vit, x, 1, True)
    assert LinearClsConfig().resolved(768) == (1, True)  # ViT-B: n_last_blocks 1 + avgpool_patchtokens
    # official: cat((cls.unsqueeze(-1), mean.unsqueeze(-1)), -1).reshape(B, -1) = [c0, m0, c1, m1, ...]
    torch.testing.assert_close(got[:, 0::2], tokens[:, 0])
    torch.testing.assert_close(got[:, 1::2], tokens[:, 1:].mean(dim=1))
    with pytest.raises(ConfigError, match="n_last_blocks 1"):
        linear_feature(vit, x, 2, True)


def test_resnet_feature_is_global_average_pool() -> None:
    torch.manual_seed(0)
    net = as_token_backbone(create_backbone("resnet-tiny")).eval()
    x = torch.randn(2, 3, 64, 64)
    official = copy.deepcopy(net.resnet)
    official.fc = torch.nn.Identity()  # eval_knn.py / eval_linear.py: model.fc = nn.Identity(); model(x)
    with torch.no_grad():
        pooled = official(x)
        torch.testing.assert_close(global_feature(net, x), pooled, rtol=0, atol=1e-6)
        torch.testing.assert_close(linear_feature(net, x, 4, False), pooled, rtol=0, atol=1e-6)


def test_labelled_folder_uses_imagefolder_labels(imagenet_root: Path) -> None:
    from torchvision.datasets import ImageFolder

    ours = LabelledImageFolder(imagenet_root, "val")
    theirs = ImageFolder(str(imagenet_root / "val"))
    assert [(str(p), y) for p, y in zip(ours.paths, ours.labels)] == [(p, y) for p, y in theirs.samples]
    cut = LabelledImageFolder(imagenet_root, "train", max_items=8)
    assert len(cut) == 8 and sorted(set(cut.labels)) == list(range(8))  # evenly spaced: every class kept


# ---------------------------------------------------------------- runners

def test_knn_runs_and_reports_every_k(imagenet_root: Path) -> None:
    torch.manual_seed(0)
    r = run_knn(create_backbone("vit-tiny-p8"), imagenet_root, KnnConfig(nb_knn=[1, 20]))
    assert r["num_train"] == 16 and r["num_val"] == 8 and r["num_classes"] == 8
    assert r["knn_top1"] == r["top1_k20"] and 0 <= r["top1_k1"] <= 100
    assert r["crop_size"] == 64 and r["resize_size"] == 73  # 224/256 of the smoke ViT's 64 px


def test_cosine_epoch_lr_matches_torch_scheduler() -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 7, eta_min=0)
    for epoch in range(7):
        assert opt.param_groups[0]["lr"] == pytest.approx(cosine_epoch_lr(0.5, epoch, 7), rel=1e-12, abs=1e-15)
        opt.step()
        sched.step()


@pytest.mark.usefixtures("sigterm_guard")
def test_linear_resumes_exactly(imagenet_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = LinearClsConfig(epochs=3, batch_size=6, lr=0.5, checkpoint_every=1)  # 3 batches per epoch (16 images)
    torch.manual_seed(0)
    backbone = create_backbone("vit-tiny-p8")
    full = run_linear_cls(backbone, imagenet_root, cfg)
    assert len(full["history"]) == 3 and full["feature_dim"] == 4 * 128  # 4 blocks of the smoke ViT
    assert full["linear_top1"] == max(h["test_acc1"] for h in full["history"])
    assert full["base_lr"] == pytest.approx(0.5 * 6 / 256)
    state = tmp_path / "train_state.pt"
    real = linear_cls.cosine_epoch_lr

    def lr_then_signal(base: float, epoch: int, epochs: int) -> float:
        if epoch == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(base, epoch, epochs)

    with monkeypatch.context() as m:
        m.setattr(linear_cls, "cosine_epoch_lr", lr_then_signal)
        with pytest.raises(Preempted, match="in epoch 1, batch 1"):
            run_linear_cls(backbone, imagenet_root, cfg, state_path=state)
    assert state.is_file()
    resumed = run_linear_cls(backbone, imagenet_root, cfg, state_path=state)
    assert json.dumps(resumed["history"]) == json.dumps(full["history"])
    assert resumed["linear_top1"] == full["linear_top1"] and not state.exists()


def test_both_protocols_through_the_evaluate_stage(tmp_path: Path) -> None:
    from densessl.config import load_config
    from densessl.stages.convert import run_convert
    from densessl.stages.data import run_data
    from densessl.stages.evaluate import run_evaluate

    path = tmp_path / "config.yaml"
    path.write_text(json.dumps({"results_dir": str(tmp_path / "results"), "data": {"synthetic_size": "tiny"},
                                "evaluations": ["knn_imagenet", "linear_imagenet"],
                                "evaluate": {"knn": {"nb_knn": [5, 20]},
                                             "linear_cls": {"epochs": 2, "batch_size": 8}}}))
    cfg = load_config([path])
    run_data(cfg, "imagenet")
    for run_id in ("random-init/vit-tiny-p8-seed1", "random-init/resnet-tiny.clove-seed1"):
        run_convert(cfg, run_id)
        knn = json.loads(run_evaluate(cfg, "knn_imagenet", run_id, "cpu").read_text())
        assert knn["protocol"] == "knn_imagenet" and knn["metrics"]["k"] == 20
        assert set(knn["metrics"]) >= {"knn_top1", "knn_top5", "top1_k5"}
        lin = json.loads(run_evaluate(cfg, "linear_imagenet", run_id, "cpu").read_text())
        assert len(lin["metrics"]["history"]) == 2 and "linear_top1" in lin["metrics"]
        expected_dim = 128 if "resnet" in run_id else 4 * 128
        assert lin["metrics"]["feature_dim"] == expected_dim


def test_report_finds_the_dino_readme_row_for_our_dino_run() -> None:
    from densessl.config import Run
    from densessl.report.paper_tables import published_value

    dino = Run(method="dino", arch="vit-s16", data="imagenet")
    assert published_value("knn_imagenet", dino, "knn_top1", False, 100) == 69.3  # vanilla recipe row
    assert published_value("linear_imagenet", dino, "linear_top1", False, 100) == 74.0
    assert published_value("linear_imagenet", dino, "linear_top1", False, 300) is None  # other epochs
    released = Run(method="dino", arch="resnet50", data="imagenet", released=True)
    assert published_value("linear_imagenet", released, "linear_top1", False) == 75.3
    assert published_value("knn_imagenet", dino, "knn_top1", True, 100) is None  # synthetic data


def test_a_vit_without_a_cls_token_is_read_by_its_mean_patch_token():
    """SelfPatch's and LOCA's ViTs have no CLS token: k-NN and linear read the mean of the final-norm patch tokens
    (per block for linear), checked against a manual forward."""
    import torch

    from densessl.evaluate.imagenet_features import global_feature, linear_feature
    from densessl.models.backbones import create_backbone
    from densessl.models.variants import variant_kwargs

    torch.manual_seed(0)
    vit = create_backbone("vit-tiny-p8", **variant_kwargs("loca")).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        tokens = vit.forward_features(x)
        assert torch.allclose(global_feature(vit, x), tokens.mean(dim=1))
        h = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
        outs = []
        for block in vit.blocks:
            h = block(h)
            outs.append(vit.norm(h).mean(dim=1))
        assert torch.allclose(linear_feature(vit, x, 2, False), torch.cat(outs[-2:], dim=-1), atol=1e-6)
