"""The mmengine glue shared by the toolkit protocols, on a toy mmengine model (no mmcv needed): train + test
through mmengine's Runner, SIGTERM → checkpoint + Preempted, resume on re-run through the weights_only
allow-list, the safetensors loader, and the device check."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from densessl.errors import ConfigError
from densessl.evaluate.transfer.mmengine_run import (
    ToolkitRun,
    register_safetensors_loader,
    run_config,
    safetensors_uri,
    train_and_test,
)
from densessl.train.trainer import Preempted

STARTS: list[int] = []


def _register() -> None:
    from mmengine.evaluator import BaseMetric
    from mmengine.hooks import Hook
    from mmengine.model import BaseModel
    from mmengine.registry import DATASETS, HOOKS, METRICS, MODELS

    @MODELS.register_module(name="_ToyRegressor", force=True)
    class ToyRegressor(BaseModel):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(2, 1)

        def forward(self, inputs: Any, labels: Any = None, mode: str = "tensor") -> Any:
            pred = self.linear(torch.stack(inputs)).squeeze(-1)
            if mode == "loss":
                return {"loss": ((pred - torch.stack(labels)) ** 2).mean()}
            if mode == "predict":
                return [(p, y) for p, y in zip(pred, labels)]
            return pred

    @DATASETS.register_module(name="_ToyData", force=True)
    class ToyData(torch.utils.data.Dataset):
        def __init__(self, n: int = 8) -> None:
            g = torch.Generator().manual_seed(0)
            self.x = torch.randn(n, 2, generator=g)
            self.y = self.x @ torch.tensor([1.0, -2.0])

        def __len__(self) -> int:
            return len(self.x)

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"inputs": self.x[i], "labels": self.y[i]}

    @METRICS.register_module(name="_ToyMSE", force=True)
    class ToyMSE(BaseMetric):
        def process(self, data_batch: Any, data_samples: Any) -> None:
            self.results.extend(float((p - y) ** 2) for p, y in data_samples)

        def compute_metrics(self, results: list) -> dict[str, float]:
            return {"mse": sum(results) / len(results)}

    @HOOKS.register_module(name="_ToySignal", force=True)
    class ToySignal(Hook):
        def __init__(self, at: int = 0) -> None:
            self.at = at

        def before_train(self, runner: Any) -> None:
            STARTS.append(runner.iter)

        def before_train_iter(self, runner: Any, batch_idx: int, data_batch: Any = None) -> None:
            if runner.iter + 1 == self.at:
                os.kill(os.getpid(), signal.SIGTERM)


def toy_cfg(iters: int = 4, signal_at: int = 0) -> dict[str, Any]:
    loader = lambda shuffle: dict(dataset=dict(type="_ToyData"), batch_size=2, num_workers=0,  # noqa: E731
                                  sampler=dict(type="InfiniteSampler" if shuffle else "DefaultSampler", shuffle=shuffle),
                                  collate_fn=dict(type="pseudo_collate"))
    return dict(
        model=dict(type="_ToyRegressor"), train_dataloader=loader(True), test_dataloader=loader(False),
        train_cfg=dict(type="IterBasedTrainLoop", max_iters=iters), test_cfg=dict(type="TestLoop"),
        test_evaluator=dict(type="_ToyMSE"), optim_wrapper=dict(optimizer=dict(type="SGD", lr=0.05)),
        default_hooks=dict(checkpoint=dict(type="CheckpointHook", by_epoch=False, interval=100),
                           logger=dict(type="LoggerHook", interval=1)),
        log_processor=dict(by_epoch=False), custom_hooks=[dict(type="_ToySignal", at=signal_at)])


@pytest.fixture(autouse=True)
def _toys() -> None:
    _register()
    STARTS.clear()


def test_train_and_test_returns_the_evaluator_metrics(tmp_path: Path) -> None:
    metrics = train_and_test(toy_cfg(), ToolkitRun(work_dir=tmp_path / "w", scope="mmengine", device="cpu"))
    assert set(metrics) == {"mse"} and metrics["mse"] >= 0.0
    assert (tmp_path / "w" / "iter_4.pth").is_file()
    assert (tmp_path / "w" / "last_checkpoint").read_text().strip().endswith("iter_4.pth")


@pytest.mark.usefixtures("sigterm_guard")
def test_sigterm_checkpoints_then_the_rerun_resumes(tmp_path: Path) -> None:
    run = ToolkitRun(work_dir=tmp_path / "w", scope="mmengine", device="cpu")
    with pytest.raises(Preempted, match="signal 15 at iteration 2"):
        train_and_test(toy_cfg(signal_at=2), run)
    assert (tmp_path / "w" / "iter_2.pth").is_file()
    assert signal.getsignal(signal.SIGTERM) is not None  # our handler is gone again (the guard's is back)
    metrics = train_and_test(toy_cfg(), run)  # resumes through torch.load(weights_only=True) + allow-list
    assert STARTS == [0, 2] and "mse" in metrics
    assert (tmp_path / "w" / "iter_4.pth").is_file()


def test_a_finished_run_reruns_only_the_test(tmp_path: Path) -> None:
    run = ToolkitRun(work_dir=tmp_path / "w", scope="mmengine", device="cpu")
    first = train_and_test(toy_cfg(), run)
    again = train_and_test(toy_cfg(), run)
    assert STARTS == [0, 4] and again == first


def test_safetensors_scheme_loads_our_weights(tmp_path: Path) -> None:
    from mmengine.runner import CheckpointLoader
    from safetensors.torch import save_file

    register_safetensors_loader()
    path = tmp_path / "b.safetensors"
    save_file({"w": torch.arange(3.0)}, str(path))
    loaded = CheckpointLoader.load_checkpoint(safetensors_uri(path), map_location="cpu")
    torch.testing.assert_close(loaded["state_dict"]["w"], torch.arange(3.0))
    with pytest.raises(ConfigError, match="exported backbone for the toolkit not found"):
        CheckpointLoader.load_checkpoint(safetensors_uri(tmp_path / "absent.safetensors"))


def test_run_fields_and_device_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = run_config(dict(visualizer=dict(type="Visualizer")), ToolkitRun(tmp_path, "mmseg", seed=3))
    assert cfg["work_dir"] == str(tmp_path) and cfg["default_scope"] == "mmseg" and cfg["resume"] is True
    assert cfg["randomness"]["seed"] == 3 and cfg["launcher"] == "none"
    assert cfg["visualizer"]["name"].startswith("visualizer-mmseg-")
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert run_config({}, ToolkitRun(tmp_path, "mmseg"))["launcher"] == "pytorch"
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device is visible"):
            train_and_test(toy_cfg(), ToolkitRun(work_dir=tmp_path / "w", scope="mmengine", device="cuda"))


def test_the_toolkit_logs_iteration_lr_and_eta_lines_to_stdout(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    """mmengine's LoggerHook writes a line every ``interval`` iterations to stdout, which the evaluate rule sends
    to the stage's log file (``> {log} 2>&1``), and the same lines to ``work_dir/<timestamp>/<timestamp>.log``."""
    train_and_test(toy_cfg(iters=4), ToolkitRun(work_dir=tmp_path / "w", scope="mmengine", device="cpu"))
    out = capfd.readouterr().out
    lines = [line for line in out.splitlines() if "Iter(train)" in line]
    assert len(lines) == 4, out  # interval 1
    for i, line in enumerate(lines, start=1):
        assert re.search(rf"Iter\(train\) \[{i}/4\]\s+lr: \S+\s+eta: \d+:\d\d:\d\d\s+time: ", line), line
    assert "\r" not in out
    logged = list((tmp_path / "w").glob("*/*.log"))
    assert logged and "Iter(train) [4/4]" in logged[0].read_text()
