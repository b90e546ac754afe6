from __future__ import annotations

import torch
import yaml
from conftest import REPO

from densessl.config import load_config
from densessl.stages.data import run_data
from densessl.stages.pretrain import run_pretrain

RUN = "dino/vit-tiny-p8-imagenet"


def _config(tmp_path, name):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "results_dir": str(tmp_path / name), "data": {"synthetic_size": "tiny"},
        "pretrain": {"dino": {"method": {"out_dim": 32, "hidden_dim": 32, "bottleneck_dim": 16},
                              "train": {"epochs": 1, "batch_size_per_gpu": 4, "num_workers": 0}}}}))
    return load_config([path], root=REPO)


def test_same_seed_gives_the_same_pretraining_run(tmp_path):
    finals = []
    for name in ("a", "b"):
        cfg = _config(tmp_path, name)
        run_data(cfg, "imagenet")
        final = run_pretrain(cfg, RUN)
        finals.append(torch.load(final, weights_only=True)["teacher"])
    assert finals[0].keys() == finals[1].keys()
    for key in finals[0]:
        torch.testing.assert_close(finals[0][key], finals[1][key], rtol=0, atol=0, msg=key)
