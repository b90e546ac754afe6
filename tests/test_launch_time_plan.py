"""Time limits from the compute plan (densessl.launch.time_plan), the site's SLURM settings (slurm_site) and the
resources each pretraining job asks for (resources)."""

from __future__ import annotations

import math

import pytest

from densessl.config import load_config
from densessl.errors import ConfigError
from densessl.launch.batch_rule import GpuCountError
from densessl.launch.resources import (
    compute_plan,
    pretrain_resource,
    pretrain_resource_keys,
    pretrain_retries,
)
from densessl.launch.slurm_site import SlurmSite, parse_minutes
from densessl.launch.time_plan import STARTUP_MINUTES, THROUGHPUT, plan_time


@pytest.mark.parametrize(("text", "minutes"), [
    (4320, 4320), ("4320", 4320), ("3-00:00:00", 4320), ("72:00:00", 4320), ("1-12", 2160), ("2-06:30", 3270),
    ("90:30", 91), ("00:10:01", 11)])
def test_slurm_time_formats(text, minutes):
    assert parse_minutes(text, "slurm.max_time") == minutes


def test_bad_time_names_the_field():
    with pytest.raises(ConfigError, match="DENSESSL_SLURM_MAX_TIME.*not a SLURM time"):
        SlurmSite.from_config({}, {"DENSESSL_SLURM_MAX_TIME": "three days"})


def test_environment_overrides_config_block():
    site = SlurmSite.from_config({"partition": "gpu", "account": "lab", "max_time": "2-00:00:00"},
                                 {"DENSESSL_SLURM_PARTITION": "preempt", "DENSESSL_SLURM_QOS": "low"})
    assert (site.partition, site.account, site.qos, site.max_time) == ("preempt", "lab", "low", 2880)
    assert site.sbatch_site_resources() == {"slurm_partition": "preempt", "slurm_account": "lab", "qos": "low"}
    assert SlurmSite.from_config(None, {}).sbatch_site_resources() == {}  # the profile's defaults apply
    with pytest.raises(ConfigError, match="unknown field"):
        SlurmSite.from_config({"partion": "gpu"}, {})


def test_estimate_is_images_times_epochs_over_throughput():
    site = SlurmSite(time_safety_factor=2.0)
    plan = plan_time("dino", "vit-s16", 1_281_167, 100, 8, site)
    training = 1_281_167 * 100 / (THROUGHPUT["dino/vit-s16"].images_per_s * 8) / 60 * 2.0
    assert plan.estimate == pytest.approx(training)
    assert plan.runtime == math.ceil(training + STARTUP_MINUTES) and plan.segments == 1
    assert "benchmarks/train_step.py" in plan.source
    half = plan_time("dino", "vit-s16", 1_281_167, 100, 16, site)
    assert half.estimate == pytest.approx(training / 2)


def test_runs_above_the_partition_limit_are_segments_of_the_limit():
    site = SlurmSite(max_time=1440, signal_seconds=180)
    plan = plan_time("clove", "resnet50", 1_281_167, 400, 8, site)
    usable = 1440 - STARTUP_MINUTES - 3
    assert plan.runtime == 1440 and plan.segments == math.ceil(plan.estimate / usable) and plan.segments > 1


def test_site_throughput_replaces_the_table_and_unknown_networks_ask_for_the_default():
    site = SlurmSite(throughput={"dino/vit-s16": 100.0})
    assert plan_time("dino", "vit-s16", 1000, 1, 1, site).images_per_s == 100.0
    unknown = plan_time("dino", "vit-tiny-p8", 1000, 1, 1, SlurmSite())
    assert unknown.runtime is None and "no throughput figure" in unknown.source


def _paper(tmp_path, text: str):
    (tmp_path / "extra.yaml").write_text(text)
    return load_config(["config.yaml", str(tmp_path / "extra.yaml")], preset="paper", check_settings=False)


def test_paper_jobs_ask_for_their_gpus_nodes_and_time(tmp_path):
    cfg = _paper(tmp_path, "slurm: {max_time: '2-00:00:00', account: lab}\n")
    keys = pretrain_resource_keys(cfg)
    assert {"gpus", "nodes", "tasks", "mpi", "runtime", "slurm_extra", "slurm_account"} <= set(keys)
    assert "slurm_partition" not in keys  # unset: the profile's default-resources
    dino = "dino/vit-s16-imagenet"
    assert [pretrain_resource(cfg, dino, k) for k in ("gpus", "nodes", "tasks", "mpi")] == [8, 1, 8, "srun"]
    assert pretrain_resource(cfg, dino, "slurm_extra") == "--ntasks-per-node=8 --gpus-per-node=8 --signal=TERM@180"
    assert pretrain_resource(cfg, dino, "mem_mb") == 8 * 60000 and pretrain_resource(cfg, dino, "cpus_per_task") == 10
    clove = "clove/resnet50-imagenet"
    assert pretrain_resource(cfg, clove, "runtime") == 2880 and pretrain_resource(cfg, clove, "segments") == 3
    assert pretrain_retries(cfg) == 2 + 2  # the failure retries and the longest run's extra segments


def test_four_gpu_nodes_spread_the_paper_layout(tmp_path):
    cfg = _paper(tmp_path, "slurm: {gpus_per_node: 4}\n")
    plan = compute_plan(cfg, cfg.run("dino/vit-s16-imagenet"))
    assert (plan.layout.nodes, plan.layout.gpus_per_node) == (2, 4)
    assert (plan.batch.batch_size_per_gpu, plan.batch.accumulation_steps) == (64, 1)
    assert pretrain_resource(cfg, "dino/vit-s16-imagenet", "slurm_extra").startswith(
        "--ntasks-per-node=4 --gpus-per-node=4")


def test_fewer_gpus_accumulate_and_refused_counts_stop_the_dag(tmp_path):
    cfg = _paper(tmp_path, "pretrain: {dino: {train: {nproc_per_node: 4}}}\n")
    plan = compute_plan(cfg, cfg.run("dino/vit-s16-imagenet"))
    assert (plan.batch.accumulation_steps, plan.batch.lr) == (2, pytest.approx(1e-3))
    single = _paper(tmp_path, "pretrain: {dino: {train: {nproc_per_node: 1}}}\n")
    assert pretrain_resource(single, "dino/vit-s16-imagenet", "gpu") == 1
    assert pretrain_resource(single, "dino/vit-s16-imagenet", "mpi") is None  # the plugin's own srun step
    (tmp_path / "extra.yaml").write_text("pretrain: {dino: {train: {nproc_per_node: 3}}}\n")
    with pytest.raises(GpuCountError, match="3 GPU"):
        load_config(["config.yaml", str(tmp_path / "extra.yaml")], preset="paper")  # what the Snakefile does
