"""The GPU-count rule (densessl.launch.batch_rule): which counts keep a paper's effective batch, the per-GPU
batch and accumulation they use, the learning rate, and the refusals with the nearest accepted counts."""

from __future__ import annotations

import sys

import pytest

from densessl.errors import ConfigError
from densessl.launch.batch_rule import LR_RULES, GpuCountError, Recipe, nearest_accepted, plan_batch

DINO = Recipe("dino", batch_size=512, batch_size_per_gpu=64, lr=0.0005)   # README: 8 GPUs x 64
CLOVE = Recipe("clove", batch_size=2048, batch_size_per_gpu=256, lr=1.0)  # tools/*.sh: 4 x 256 x accumulation 2


@pytest.mark.parametrize(("nodes", "gpus", "per_gpu", "accumulation"), [
    (1, 8, 64, 1),    # the paper's layout
    (2, 4, 64, 1),    # 4-GPU nodes: same world, nothing changes
    (1, 4, 64, 2),    # half the GPUs: two micro-batches per step
    (1, 1, 64, 8),
    (1, 2, 64, 4),
    (2, 8, 32, 1),    # more GPUs than the paper: smaller per-GPU batch, still 512
    (4, 8, 16, 1),
    (64, 8, 1, 1),    # the largest world: one image per GPU
])
def test_accepted_counts_keep_the_effective_batch_and_lr(nodes, gpus, per_gpu, accumulation):
    plan = plan_batch(DINO, nodes, gpus)
    assert (plan.batch_size_per_gpu, plan.accumulation_steps) == (per_gpu, accumulation)
    assert plan.batch_size_per_gpu * plan.world * plan.accumulation_steps == 512 == plan.batch_size
    assert plan.lr == pytest.approx(1e-3)  # 0.0005 x 512 / 256 (main_dino.py), on every accepted count
    assert plan.world == nodes * gpus


def test_clove_on_four_gpus_is_the_official_layout():
    plan = plan_batch(CLOVE, 1, 4)
    assert (plan.batch_size_per_gpu, plan.accumulation_steps, plan.lr) == (256, 2, pytest.approx(8.0))
    assert plan.lr_source == LR_RULES["clove"].source


@pytest.mark.parametrize(("nodes", "gpus", "reason", "nearest"), [
    (1, 3, "do not split evenly over 3 processes", "2 (per-GPU batch 64, accumulation 4) or 4 (per-GPU batch 64, "
                                                   "accumulation 2)"),
    (1, 6, "do not split evenly over 6 processes", "4 (per-GPU batch 64, accumulation 2) or 8 (per-GPU batch 64)"),
    (3, 4, "do not split evenly over 12 processes", "8 (per-GPU batch 64) or 16 (per-GPU batch 32)"),
    (65, 8, "more processes than the 512 images of one step", "512 (per-GPU batch 1)"),
])
def test_refused_counts_name_the_reason_and_the_nearest_accepted(nodes, gpus, reason, nearest):
    with pytest.raises(GpuCountError) as err:
        plan_batch(DINO, nodes, gpus)
    message = str(err.value)
    assert reason in message and f"Nearest GPU counts that keep it: {nearest}." in message, message
    assert "batch_size" in message and "main_dino.py" in message
    assert isinstance(err.value, ConfigError)  # printed by the CLI without a traceback


def test_nearest_accepted_are_closest_on_each_side():
    assert nearest_accepted(DINO, 5) == [4, 8]
    assert nearest_accepted(DINO, 1000) == [512]


def test_without_an_effective_batch_every_count_is_accepted_and_lr_scales():
    recipe = Recipe("dino", batch_size=None, batch_size_per_gpu=16, lr=0.0005)
    plan = plan_batch(recipe, 1, 3)
    assert (plan.batch_size, plan.batch_size_per_gpu, plan.accumulation_steps) == (48, 16, 1)
    assert plan.lr == pytest.approx(0.0005 * 48 / 256)


def test_recipe_from_train_settings_checks_types():
    assert Recipe.from_train("gtsa", {"batch_size": 512, "batch_size_per_gpu": 64, "lr": 0.0005}).batch_size == 512
    with pytest.raises(ConfigError, match="pretrain.gtsa.train.batch_size"):
        Recipe.from_train("gtsa", {"batch_size": 0})
    with pytest.raises(ConfigError, match="both must be ≥ 1"):
        plan_batch(DINO, 0, 8)


def test_every_method_cites_its_lr_rule():
    from densessl.config import load_config

    cfg = load_config(["config.yaml"], preset="paper", check_settings=False)
    for run in cfg.pretrain_runs:
        assert run.method in LR_RULES and "/" in LR_RULES[run.method].source


def test_the_rule_imports_no_torch():
    """snakemake -n and the refusal messages must not pay for torch."""
    import subprocess

    code = ("import sys; import densessl.launch.batch_rule, densessl.launch.time_plan, densessl.launch.slurm_site; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
