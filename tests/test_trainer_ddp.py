"""The shared trainer under DistributedDataParallel: 2 processes, gloo on CPU, started by the launcher.

One torchrun launch (process start-up dominates on 2 shared cores) runs three trainings of DINO on
vit-tiny-p8 (64 px images → 32/16 px crops, BatchNorm head) in each rank and writes what the test checks:

A. 4 steps in one go;  B. 2 steps, then a fresh Trainer resumes from the checkpoint for the last 2;
C. rank 1 alone receives SIGUSR1 at its second step: both ranks must stop after that step (the ranks agree
   every ``finite_check_every`` = 2 steps), rank 0 writes the checkpoint and the requeue marker, and the
   launcher must turn torchrun's exit code 1 into 3;
D. rank 1 alone gets a NaN loss at step 1, with finite_check_every = 4: both ranks must stop with the step named
   (rank 0: "on another rank") before the epoch-end checkpoint, which is never written.

This file is also the worker (``python -m test_trainer_ddp <out>``).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
TINY = dict(out_dim=16, hidden_dim=32, bottleneck_dim=8, global_size=32, local_size=16, local_crops_number=1,
            use_bn_in_head=True)
STEPS = 4  # 16 images / (2 per rank × 2 ranks) = 4 steps per epoch, 1 epoch


# ------------------------------------------------------------------------------------------------ worker
def _images() -> list:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    return [Image.fromarray((rng.random((64, 64, 3)) * 255).astype("uint8")) for _ in range(16)]


def _trainer(out_dir: Path, finite_check_every: int = 2):
    from densessl.methods import get_method
    from densessl.train.trainer import TrainConfig, Trainer

    torch.manual_seed(0)
    method = get_method("dino")("vit-tiny-p8", TINY, epochs=1)
    cfg = TrainConfig(epochs=1, batch_size_per_gpu=2, lr=1e-3, warmup_epochs=0, num_workers=0,
                      checkpoint_every_steps=1000, log_every_steps=1, precision="fp32", nproc_per_node=2,
                      finite_check_every=finite_check_every)
    return Trainer(method, _images(), cfg, out_dir, device="cpu")


def _weights(trainer) -> dict[str, torch.Tensor]:
    student = {f"student.{k}": v.detach().clone() for k, v in trainer._student().named_parameters()}
    teacher = {f"teacher.{k}": v.detach().clone() for k, v in trainer.method.teacher.named_parameters()}
    return {**student, **teacher, "center": trainer.method.criterion.center.clone()}


def _worker(out: Path) -> int:
    import densessl.train.checkpointing as checkpointing_module
    from densessl.train.launch import REQUEUE_EXIT_CODE, write_requeue_marker
    from densessl.train.trainer import Preempted

    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    writes: list[str] = []
    real_atomic_path = checkpointing_module.atomic_path

    def counting_atomic_path(path, *args, **kwargs):  # records every file this rank writes
        writes.append(Path(path).name)
        return real_atomic_path(path, *args, **kwargs)

    checkpointing_module.atomic_path = counting_atomic_path
    report: dict = {"rank": rank}

    a = _trainer(out / "A")
    report["is_ddp_during_fit"] = []
    original_loss = a.method.loss

    def loss_recording_wrapper(batch, epoch):
        report["is_ddp_during_fit"].append(isinstance(a.method.student, torch.nn.parallel.DistributedDataParallel))
        return original_loss(batch, epoch)

    a.method.loss = loss_recording_wrapper
    report["indices"] = a.sampler._indices()
    report["A"] = a.fit()
    report["unwrapped_after_fit"] = not isinstance(a.method.student, torch.nn.parallel.DistributedDataParallel)
    torch.save(_weights(a), out / f"A_rank{rank}.pt")

    report["B1"] = _trainer(out / "B").fit(max_steps=2)
    b = _trainer(out / "B")
    report["B2"] = b.fit()
    torch.save(_weights(b), out / f"B_rank{rank}.pt")
    report["checkpoint_writes"] = writes.count("checkpoint.pt")

    c = _trainer(out / "C")
    calls = {"n": 0}
    original = c.method.loss

    def signal_rank1_at_second_step(batch, epoch):
        calls["n"] += 1
        if rank == 1 and calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGUSR1)
        return original(batch, epoch)

    c.method.loss = signal_rank1_at_second_step
    try:
        c.fit()
        report["C"] = "finished"
    except Preempted as exc:
        report["C"] = f"preempted: {exc}"
    report["C_steps"] = calls["n"]

    from densessl.train.trainer import NonFiniteLossError

    d = _trainer(out / "D", finite_check_every=4)
    original_d = d.method.loss

    calls_d = {"n": 0}

    def nan_on_rank1_at_step1(batch, epoch):
        loss, logs = original_d(batch, epoch)
        calls_d["n"] += 1
        return (loss * float("nan") if rank == 1 and calls_d["n"] == 2 else loss), logs

    d.method.loss = nan_on_rank1_at_step1
    try:
        d.fit()
        report["D"] = "finished"
    except NonFiniteLossError as exc:
        report["D"] = str(exc)
    (out / f"report_rank{rank}.json").write_text(json.dumps(report), encoding="utf-8")
    torch.distributed.destroy_process_group()
    if report["C"].startswith("preempted"):
        if rank == 0:  # what launch() does for a stage that raised Preempted (torchrun itself exits 1)
            write_requeue_marker(report["C"])
        return REQUEUE_EXIT_CODE
    return 0


# ------------------------------------------------------------------------------------------------ test
@pytest.mark.timeout(300)
def test_two_process_gloo_ddp(tmp_path):
    from densessl.train.launch import REQUEUE_EXIT_CODE, launch

    def not_here() -> None:
        raise AssertionError("launch must re-run under torchrun, not in the test process")

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE",
                                                             "TORCHELASTIC_RUN_ID")}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    code = launch([str(tmp_path)], nproc=2, run_in_process=not_here, module="test_trainer_ddp", env=env)

    reports = [json.loads((tmp_path / f"report_rank{r}.json").read_text()) for r in (0, 1)]
    # the launcher maps the preempted run (workers exit 3, torchrun exits 1) to the requeue code
    assert code == REQUEUE_EXIT_CODE

    # the ranks trained on disjoint shards, with the student wrapped in DDP only while fitting
    assert not set(reports[0]["indices"]) & set(reports[1]["indices"])
    assert all(reports[0]["is_ddp_during_fit"]) and len(reports[0]["is_ddp_during_fit"]) == STEPS
    assert reports[0]["unwrapped_after_fit"] and reports[1]["unwrapped_after_fit"]

    # both ranks hold identical student, teacher and centre after the steps
    for run in ("A", "B"):
        w0, w1 = (torch.load(tmp_path / f"{run}_rank{r}.pt", weights_only=True) for r in (0, 1))
        assert w0.keys() == w1.keys()
        for key in w0:
            assert torch.equal(w0[key], w1[key]), (run, key)
    # and differ from the initial weights (the steps did train)
    initial = _trainer_weights_before_training()
    a0 = torch.load(tmp_path / "A_rank0.pt", weights_only=True)
    assert not torch.equal(initial["student.backbone.patch_embed.proj.weight"],
                           a0["student.backbone.patch_embed.proj.weight"])

    # resume under DDP continues the same run: same logged losses, same final weights
    def losses(run: str) -> list[tuple[int, float]]:
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [(json.loads(x)["step"], json.loads(x)["loss"]) for x in lines]

    assert [s for s, _ in losses("A")] == list(range(STEPS))
    assert losses("A") == losses("B")
    b0 = torch.load(tmp_path / "B_rank0.pt", weights_only=True)
    for key in a0:
        assert torch.equal(a0[key], b0[key]), key

    # checkpoints come from rank 0 only: A wrote one (epoch end), B two (max_steps stop, epoch end)
    assert reports[0]["checkpoint_writes"] == 3 and reports[1]["checkpoint_writes"] == 0
    state = torch.load(tmp_path / "A" / "checkpoint.pt", weights_only=True)
    assert state["world_size"] == 2 and state["epoch"] == 1 and state["batch_in_epoch"] == 0

    # TensorBoard: one event file per fit, from rank 0 only, with one loss scalar per step
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert len(list((tmp_path / "A" / "tensorboard").glob("events.out.tfevents.*"))) == 1
    events = EventAccumulator(str(tmp_path / "A" / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(STEPS))
    # TensorBoard stores float32: equal to the logged float64 loss to float32 precision
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx([x for _, x in losses("A")], rel=1e-6)

    # C: only rank 1 was signalled, yet both stopped after the same (second) step with one checkpoint
    assert reports[0]["C"].startswith("preempted") and reports[1]["C"].startswith("preempted")
    assert reports[0]["C_steps"] == reports[1]["C_steps"] == 2
    state = torch.load(tmp_path / "C" / "checkpoint.pt", weights_only=True)
    assert (state["epoch"], state["batch_in_epoch"]) == (0, 2)

    # D: the NaN of rank 1 at step 1 stops both ranks, naming step 1; no checkpoint after it exists
    assert "loss is nan at step 1" in reports[1]["D"], reports[1]["D"]
    assert "loss is non-finite on another rank at step 1" in reports[0]["D"], reports[0]["D"]
    assert not (tmp_path / "D" / "checkpoint.pt").exists() and (tmp_path / "D" / "checkpoint.diverged.pt").is_file()


def _trainer_weights_before_training() -> dict[str, torch.Tensor]:
    from densessl.methods import get_method

    torch.manual_seed(0)
    method = get_method("dino")("vit-tiny-p8", TINY, epochs=1)
    return {f"student.{k}": v.detach() for k, v in method.student.named_parameters()}


if __name__ == "__main__":
    sys.exit(_worker(Path(sys.argv[1])))
