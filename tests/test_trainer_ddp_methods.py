"""LOCA and SelfPatch under the shared trainer with DistributedDataParallel: 2 processes, gloo on CPU.

Both methods reduce statistics across ranks inside their loss, outside what DDP averages:
* LOCA: the Sinkhorn–Knopp per-prototype sums (``loca.sinkhorn``) and the me-max mean prediction
  (``loca._global_mean``, a differentiable all-reduce);
* SelfPatch: the patch centre (``SelfPatchLoss.update_patch_center``) and the image centre.

One torchrun launch (process start-up dominates on 2 shared cores) trains each method for 2 steps in each rank
on disjoint shards and records, per rank, the local inputs and the outputs of those reductions; the tests check
that the outputs are what one process would compute on both ranks' data together, and that both ranks end
with identical weights and centres.

This file is also the worker (``python -m test_trainer_ddp_methods <out>``).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
STEPS = 2
METHODS = {
    "loca": ("vit-tiny-p8", dict(head_hidden_dim=32, head_bottleneck_dim=8, head_output_dim=16, reference_size=32,
                                 query_size=32, focal_size=16, num_focal_queries=1, query0_keep_tokens=6)),
    "selfpatch": ("vit-tiny-p8", dict(out_dim=16, out_dim_selfpatch=8, hidden_dim=32, bottleneck_dim=8,
                                      global_size=32, local_size=24, local_crops_number=1)),
}


# ------------------------------------------------------------------------------------------------ worker
def _images() -> list:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    return [Image.fromarray((rng.random((64, 64, 3)) * 255).astype("uint8")) for _ in range(16)]


def _trainer(name: str, out_dir: Path):
    from densessl.methods import get_method
    from densessl.train.trainer import TrainConfig, Trainer

    arch, settings = METHODS[name]
    torch.manual_seed(0)
    method = get_method(name)(arch, settings, epochs=1)
    cfg = TrainConfig(epochs=1, batch_size_per_gpu=2, lr=1e-3, warmup_epochs=0, num_workers=0, tensorboard=False,
                      checkpoint_every_steps=1000, log_every_steps=1, precision="fp32", nproc_per_node=2)
    return Trainer(method, _images(), cfg, out_dir, device="cpu")


def _state(trainer) -> dict[str, torch.Tensor]:
    out = {f"student.{k}": v.detach().clone() for k, v in trainer._student().state_dict().items()}
    out.update({f"teacher.{k}": v.detach().clone() for k, v in trainer.method.teacher.state_dict().items()})
    out.update({f"extra.{k}": v.detach().clone() for k, v in trainer.method.extra_state().items()})
    return out


def _run_loca(out: Path, rank: int) -> dict:
    import densessl.methods.loca as loca

    recorded: dict[str, list[torch.Tensor]] = {"sinkhorn_in": [], "sinkhorn_out": [], "mean_in": [], "mean_out": []}
    real_sinkhorn, real_global_mean = loca.sinkhorn, loca._global_mean

    def recording_sinkhorn(probs, iterations):
        result = real_sinkhorn(probs, iterations)
        recorded["sinkhorn_in"].append(probs.detach().clone())
        recorded["sinkhorn_out"].append(result.detach().clone())
        return result

    def recording_global_mean(x):
        result = real_global_mean(x)
        recorded["mean_in"].append(x.detach().clone())
        recorded["mean_out"].append(result.detach().clone())
        return result

    loca.sinkhorn, loca._global_mean = recording_sinkhorn, recording_global_mean
    try:
        trainer = _trainer("loca", out / "loca")
        initial = _state(trainer)
        trainer.fit(max_steps=STEPS)
    finally:
        loca.sinkhorn, loca._global_mean = real_sinkhorn, real_global_mean
    torch.save({"state": _state(trainer), "initial": initial, **recorded}, out / f"loca_rank{rank}.pt")
    return {"indices": trainer.sampler._indices()}


def _run_selfpatch(out: Path, rank: int) -> dict:
    trainer = _trainer("selfpatch", out / "selfpatch")
    criterion = trainer.method.criterion
    real_update = criterion.update_patch_center
    local: dict[str, list[torch.Tensor]] = {"total": [], "count": []}

    def recording_update(teacher_patches):  # this rank's own sum and count, before the all-reduce
        local["total"].append(sum(t.detach().double().sum(dim=(0, 1)) for t in teacher_patches))
        local["count"].append(torch.tensor(float(sum(t.shape[0] * t.shape[1] for t in teacher_patches))))
        return real_update(teacher_patches)

    criterion.update_patch_center = recording_update
    initial = _state(trainer)
    trainer.fit(max_steps=STEPS)
    torch.save({"state": _state(trainer), "initial": initial, **local}, out / f"selfpatch_rank{rank}.pt")
    return {"indices": trainer.sampler._indices()}


def _worker(out: Path) -> int:
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    report = {"rank": rank, "loca": _run_loca(out, rank), "selfpatch": _run_selfpatch(out, rank)}
    (out / f"report_rank{rank}.json").write_text(json.dumps(report), encoding="utf-8")
    torch.distributed.destroy_process_group()
    return 0


# ------------------------------------------------------------------------------------------------ tests
@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> Path:
    from densessl.train.launch import launch

    def not_here() -> None:
        raise AssertionError("launch must re-run under torchrun, not in the test process")

    out = tmp_path_factory.mktemp("ddp_methods")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE",
                                                             "TORCHELASTIC_RUN_ID")}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    code = launch([str(out)], nproc=2, run_in_process=not_here, module="test_trainer_ddp_methods", env=env)
    assert code == 0
    return out


def _load(out: Path, name: str) -> tuple[dict, dict, list[dict]]:
    ranks = [torch.load(out / f"{name}_rank{r}.pt", weights_only=True) for r in (0, 1)]
    reports = [json.loads((out / f"report_rank{r}.json").read_text())[name] for r in (0, 1)]
    return ranks[0], ranks[1], reports


def _assert_replicas_identical_and_trained(r0: dict, r1: dict, reports: list[dict], name: str) -> None:
    assert not set(reports[0]["indices"]) & set(reports[1]["indices"])  # the ranks saw different images
    assert r0["state"].keys() == r1["state"].keys()
    for key in r0["state"]:
        assert torch.equal(r0["state"][key], r1["state"][key]), (name, key)
    moved = [k for k in r0["state"] if k.startswith("student.") and not torch.equal(r0["state"][k], r0["initial"][k])]
    assert len(moved) > 10, (name, moved)  # the steps did train


@pytest.mark.timeout(300)
def test_loca_two_ranks_sinkhorn_and_me_max_are_global(ddp_run):
    from densessl.methods.loca import sinkhorn

    r0, r1, reports = _load(ddp_run, "loca")
    _assert_replicas_identical_and_trained(r0, r1, reports, "loca")
    assert len(r0["sinkhorn_in"]) == len(r1["sinkhorn_in"]) == STEPS
    assert len(r0["mean_in"]) == len(r1["mean_in"]) == STEPS
    for step in range(STEPS):
        # Sinkhorn on 2 ranks = one process's Sinkhorn on both ranks' rows (column sums are all-reduced)
        p0, p1 = r0["sinkhorn_in"][step], r1["sinkhorn_in"][step]
        assert not torch.allclose(p0, p1)
        together = sinkhorn(torch.cat([p0, p1]), 3)  # no process group here: the single-process version
        torch.testing.assert_close(torch.cat([r0["sinkhorn_out"][step], r1["sinkhorn_out"][step]]), together,
                                   rtol=1e-5, atol=1e-7)
        assert not torch.allclose(r0["sinkhorn_out"][step], sinkhorn(p0, 3), rtol=1e-3, atol=1e-5)
        # me-max: the mean prediction is averaged over ranks, and both ranks use the same
        m0, m1 = r0["mean_in"][step], r1["mean_in"][step]
        assert not torch.allclose(m0, m1)
        torch.testing.assert_close(r0["mean_out"][step], (m0 + m1) / 2, rtol=1e-6, atol=1e-8)
        assert torch.equal(r0["mean_out"][step], r1["mean_out"][step])


@pytest.mark.timeout(300)
def test_selfpatch_two_ranks_share_the_patch_centre(ddp_run):
    r0, r1, reports = _load(ddp_run, "selfpatch")
    _assert_replicas_identical_and_trained(r0, r1, reports, "selfpatch")
    patch_center = r0["state"]["extra.patch_center"]
    assert torch.equal(patch_center, r1["state"]["extra.patch_center"])
    assert torch.equal(r0["state"]["extra.center"], r1["state"]["extra.center"])
    assert len(r0["total"]) == len(r1["total"]) == STEPS

    # replay the EMA (momentum 0.9, from 0) with the mean over both ranks' patches, and with rank 0's alone
    shared, rank0_only = torch.zeros_like(patch_center, dtype=torch.float64), torch.zeros_like(patch_center,
                                                                                                dtype=torch.float64)
    for step in range(STEPS):
        assert not torch.allclose(r0["total"][step] / r0["count"][step], r1["total"][step] / r1["count"][step])
        both = (r0["total"][step] + r1["total"][step]) / (r0["count"][step] + r1["count"][step])
        shared = 0.9 * shared + 0.1 * both
        rank0_only = 0.9 * rank0_only + 0.1 * r0["total"][step] / r0["count"][step]
    torch.testing.assert_close(patch_center.double(), shared, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(patch_center.double(), rank0_only, rtol=1e-3, atol=1e-6)


if __name__ == "__main__":
    sys.exit(_worker(Path(sys.argv[1])))
