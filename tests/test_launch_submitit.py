"""`python -m densessl launch` (densessl.launch.submitit_launch): the plan and sbatch parameters it submits, the
GPU-count refusal, and — where submitit is installed — the batch script submitit writes from them and the
checkpoint hook that requeues the same run."""

from __future__ import annotations

import importlib.util
import pickle
import subprocess
import sys

import pytest

from densessl.cli import main
from densessl.config import load_config
from densessl.launch.resources import compute_plan, site_of
from densessl.launch.submitit_launch import PretrainJob, executor_parameters

HAS_SUBMITIT = importlib.util.find_spec("submitit") is not None


def test_dry_run_prints_the_plan_and_parameters(capsys):
    code = main(["launch", "--preset", "paper", "--run", "clove/resnet50-imagenet", "--nodes", "1",
                 "--gpus-per-node", "4", "--partition", "gpu-long", "--account", "lab", "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0
    assert "1 node(s) × 4 GPU(s); batch 2048 = per-GPU 256 × 4 × accumulation 2; peak lr 8" in out
    assert "ntasks_per_node=4" in out and "gpus_per_node=4" in out and "partition=gpu-long" in out
    assert "'account': 'lab'" in out and "signal_delay_s=180" in out


def test_refused_gpu_count_exits_2_with_the_nearest_counts(capsys):
    code = main(["launch", "--preset", "paper", "--run", "dino/vit-s16-imagenet", "--gpus-per-node", "6",
                 "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2 and "Nearest GPU counts that keep it: 4" in err and "or 8 (per-GPU batch 64)" in err


def test_parameters_follow_the_plan():
    cfg = load_config(["config.yaml"], preset="paper", check_settings=False)
    plan = compute_plan(cfg, cfg.run("dino/vit-s16-imagenet"), nodes=2, gpus_per_node=4)
    params = executor_parameters(plan, site_of(cfg), "dino/vit-s16-imagenet", None, gpus=True)
    assert (params["nodes"], params["ntasks_per_node"], params["gpus_per_node"]) == (2, 4, 4)
    assert params["time"] == plan.time.runtime and params["additional_parameters"]["mem"] == "240000M"
    assert params["setup"] == ["export SUBMITIT_PREEMPT_SIGNAL=TERM"]


def test_job_pickles_and_resumes_on_checkpoint():
    job = PretrainJob(["/x/config.yaml"], "paper", "dino/vit-s16-imagenet", "/x", "/repo", resume="restart")
    assert pickle.loads(pickle.dumps(job)) == job
    if not HAS_SUBMITIT:
        pytest.skip("submitit is not installed")
    again = job.checkpoint()
    assert again.function.resume == "auto" and again.function.run_id == job.run_id  # a requeue never restarts


@pytest.mark.skipif(not HAS_SUBMITIT, reason="submitit is not installed")
def test_submitit_batch_script_signals_term_before_the_limit(tmp_path):
    """submitit reads SUBMITIT_PREEMPT_SIGNAL once at import: checked in a fresh process, as a launch is."""
    code = f"""
import os
from densessl.launch.submitit_launch import _submitit
submitit = _submitit()
from submitit.slurm.slurm import _make_sbatch_string
print(_make_sbatch_string(command="run", folder={str(tmp_path)!r}, nodes=2, ntasks_per_node=4, gpus_per_node=4,
                          time=2880, signal_delay_s=180, setup=["export SUBMITIT_PREEMPT_SIGNAL=TERM"]))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "#SBATCH --signal=TERM@180" in out and "#SBATCH --ntasks-per-node=4" in out
    assert "#SBATCH --gpus-per-node=4" in out and "export SUBMITIT_PREEMPT_SIGNAL=TERM" in out
