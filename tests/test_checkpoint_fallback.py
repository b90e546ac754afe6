"""A torn or corrupt newest checkpoint falls back to the previous one, which every long loop keeps for that
purpose: the pretraining trainer (`checkpoint.previous.pt`), the fine-tuning evaluations (`train_state.previous.pt`)
and the toolkit protocols (mmengine keeps at least two). Each resumed run must end exactly where an
uninterrupted one does, having recomputed at most the steps between the two checkpoints."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_linear_seg import _outcome, _preempt_at_iteration, ade_root, smoke_cfg  # noqa: F401 (ade_root: fixture)

from densessl.evaluate import resume
from densessl.evaluate.linear_seg import run_linear_seg
from densessl.methods import get_method
from densessl.models.backbones import create_backbone
from densessl.train import checkpointing
from densessl.train.trainer import Preempted, TrainConfig, Trainer


def _tear(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# ---------------------------------------------------------------- pretraining
def _trainer(out: Path) -> Trainer:
    rng = np.random.default_rng(0)
    images = [Image.fromarray((rng.random((40, 40, 3)) * 255).astype("uint8")) for _ in range(16)]
    torch.manual_seed(0)
    tiny = dict(out_dim=16, hidden_dim=32, bottleneck_dim=8, global_size=32, local_size=16, local_crops_number=1)
    method = get_method("dino")("vit-tiny-p8", tiny, epochs=2)
    cfg = TrainConfig(epochs=2, batch_size_per_gpu=4, lr=1e-3, warmup_epochs=1, num_workers=0,
                      checkpoint_every_steps=2, log_every_steps=1, precision="fp32", tensorboard=False)
    return Trainer(method, images, cfg, out, device="cpu")


def _weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.method.student.state_dict().items()}


def test_pretraining_resumes_from_the_previous_checkpoint_when_the_newest_is_torn(tmp_path: Path) -> None:
    full = _trainer(tmp_path / "full")
    full.fit()
    interrupted = _trainer(tmp_path / "run")
    interrupted.fit(max_steps=3)  # checkpoints at step 2 (periodic) and 3 (the pause): previous = 2
    run = tmp_path / "run"
    assert checkpointing.read_verified(run / "checkpoint.previous.pt")["batch_in_epoch"] == 2
    _tear(run / "checkpoint.pt")
    resumed = _trainer(run)
    summary = resumed.fit()
    start = [json.loads(line) for line in (run / "attempts.jsonl").read_text().splitlines()][-2]
    assert start["event"] == "start" and start["step"] == 2 and start["checkpoint"] == "checkpoint.previous.pt"
    assert summary["steps_this_run"] == full.total_steps - 2  # one step (2 → 3) computed twice, no more
    assert all(torch.equal(a, b) for a, b in zip(_weights(full).values(), _weights(resumed).values(), strict=True))


# ---------------------------------------------------------------- evaluation training state
class _Net(torch.nn.Linear):
    def __init__(self) -> None:
        super().__init__(2, 1)


def _state(tmp_path: Path) -> resume.TrainState:
    torch.manual_seed(0)
    return resume.TrainState(tmp_path / "train_state.pt", "toy", smoke_cfg(iterations=4), _Net())


def test_train_state_keeps_the_previous_and_falls_back_to_it(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    state = _state(tmp_path)
    assert state.load() is None  # nothing saved yet
    state.save({"progress": {"step": 2}})
    assert not state.previous_path.exists()
    state.save({"progress": {"step": 3}})
    assert state.previous_path.name == "train_state.previous.pt"
    assert state.load()["progress"]["step"] == 3 and state.resumed_from == state.path
    _tear(state.path)
    with caplog.at_level(logging.WARNING, logger="densessl.evaluate.resume"):
        assert state.load()["progress"]["step"] == 2
    assert "train_state.pt: unreadable training state" in caplog.text and state.resumed_from == state.previous_path
    _tear(state.previous_path)
    assert state.load() is None  # neither usable: the evaluation trains from the start
    state.save({"progress": {"step": 1}})
    state.discard()
    assert not state.path.exists() and not state.previous_path.exists()


def test_train_state_skips_a_newest_state_of_another_run(tmp_path: Path) -> None:
    state = _state(tmp_path)
    state.save({"progress": {"step": 2}})
    other = resume.TrainState(state.path, "toy", smoke_cfg(iterations=4, lr=0.5), _Net())
    other.save({"progress": {"step": 7}})  # another configuration wrote the newest; ours is now the previous
    assert state.load()["progress"]["step"] == 2 and state.resumed_from == state.previous_path


@pytest.mark.usefixtures("sigterm_guard")
def test_evaluation_resumes_from_the_previous_state_when_the_newest_is_torn(
        ade_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    cfg = {"iterations": 6, "checkpoint_every": 2, "max_val_items": 2}
    backbone = create_backbone("vit-tiny-p8")
    full = run_linear_seg(backbone, ade_root, smoke_cfg(**cfg))
    path = tmp_path / "train_state.pt"
    with monkeypatch.context() as m:
        _preempt_at_iteration(m, 2)
        with pytest.raises(Preempted, match=r"after iteration 3/6"):
            run_linear_seg(backbone, ade_root, smoke_cfg(**cfg), state_path=path)
    previous = checkpointing.previous_of(path)
    assert torch.load(previous, weights_only=True)["progress"]["step"] == 2  # the periodic state before it
    _tear(path)
    resumed = run_linear_seg(backbone, ade_root, smoke_cfg(**cfg), state_path=path)
    assert _outcome(resumed) == _outcome(full)
    assert not path.exists() and not previous.exists()  # both deleted once the metrics exist


# ---------------------------------------------------------------- toolkit protocols (mmengine)
@pytest.mark.usefixtures("sigterm_guard")
def test_toolkit_run_resumes_from_the_previous_checkpoint_when_the_newest_is_torn(tmp_path: Path) -> None:
    pytest.importorskip("mmengine")
    import test_mmengine_run as toy

    from densessl.evaluate.transfer.mmengine_run import ToolkitRun, train_and_test

    toy._register()
    toy.STARTS.clear()
    cfg = toy.toy_cfg(iters=4, signal_at=3)
    # the protocols' own setting (mmdet's max_keep_ckpts=1) would leave nothing to fall back to
    cfg["default_hooks"]["checkpoint"].update(interval=1, max_keep_ckpts=1)
    run = ToolkitRun(work_dir=tmp_path / "w", scope="mmengine", device="cpu")
    with pytest.raises(Preempted, match="signal 15 at iteration 3"):
        train_and_test(cfg, run)
    work = tmp_path / "w"
    assert sorted(p.name for p in work.glob("*.pth")) == ["iter_2.pth", "iter_3.pth"]
    assert (work / "last_checkpoint").read_text().strip().endswith("iter_3.pth")
    _tear(work / "iter_3.pth")
    metrics = train_and_test(toy.toy_cfg(iters=4), run)
    assert toy.STARTS == [0, 2] and "mse" in metrics  # resumed after iteration 2, not from scratch
    assert (work / "iter_4.pth").is_file()


def test_toolkit_loader_workers_leave_the_stop_signals_to_the_main_process(tmp_path: Path) -> None:
    """SLURM's warning reaches every process of the step: mmengine's workers must not die of it first."""
    pytest.importorskip("mmengine")
    import signal

    import test_mmengine_run as toy

    from densessl.evaluate.transfer.mmengine_run import WORKER_INIT, ToolkitRun, _worker_init, run_config

    cfg = toy.toy_cfg()
    cfg["train_dataloader"]["num_workers"] = 2
    out = run_config(cfg, ToolkitRun(work_dir=tmp_path, scope="mmengine", seed=5))
    assert out["train_dataloader"]["worker_init_fn"] == dict(type=WORKER_INIT, num_workers=2, rank=0, seed=5)
    assert "worker_init_fn" not in out["test_dataloader"]  # no workers there
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    try:
        _worker_init(1, num_workers=2, rank=0, seed=5)
        assert all(signal.getsignal(s) is signal.SIG_IGN for s in previous)
        assert torch.initial_seed() == 2 * 0 + 1 + 5  # mmengine's own worker seeding is kept
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
