from __future__ import annotations

import pytest
import yaml
from conftest import REPO

from densessl.config import load_config
from densessl.errors import ConfigError


def write(tmp_path, data):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_default_config_resolves_runs_and_paths():
    cfg = load_config([REPO / "config.yaml"], root=REPO)
    assert cfg.preset == "smoke"
    ids = [r.id for r in cfg.all_runs]
    assert ids[0] == "dino/vit-tiny-p8-imagenet"
    assert sum(r.is_random_init for r in cfg.all_runs) >= 3
    assert cfg.datasets == ["ade20k", "cityscapes", "coco", "davis", "imagenet", "lvis", "voc"]
    assert str(cfg.eval_metrics("patchseg_coco", cfg.all_runs[0])) == \
        "results/smoke/eval/patchseg_coco/dino/vit-tiny-p8-imagenet/metrics.json"


def test_bad_enum_names_field_and_allowed_values(tmp_path):
    path = write(tmp_path, {"evaluations": ["patchseg_coco", "knn"]})
    with pytest.raises(ConfigError) as exc:
        load_config([path], root=REPO)
    msg = str(exc.value)
    assert str(path) in msg and "evaluations.1" in msg and "linear_ade20k" in msg


def test_unknown_field_lists_allowed_fields(tmp_path):
    path = write(tmp_path, {"data": {"synthetc": True}})
    with pytest.raises(ConfigError, match=r"data: .*synthetc.*allowed fields here: download, mirror, roots, synthetic,"):
        load_config([path], root=REPO)


def test_bad_preset(tmp_path):
    path = write(tmp_path, {"preset": "huge"})
    with pytest.raises(ConfigError, match="preset.*smoke, paper"):
        load_config([path], root=REPO)


def test_overrides_merge_onto_preset_and_per_arch(tmp_path):
    path = write(tmp_path, {"pretrain": {"dino": {"train": {"epochs": 3},
                                                  "arch": {"vit-tiny-p8": {"train": {"lr": 0.1}}}}}})
    cfg = load_config([path], root=REPO)
    settings = cfg.pretrain_settings(cfg.pretrain_runs[0])
    assert settings["train"]["epochs"] == 3 and settings["train"]["lr"] == 0.1
    preset = yaml.safe_load((REPO / "workflow/presets/smoke.yaml").read_text())["pretrain"]["dino"]
    assert settings["train"]["batch_size_per_gpu"] == preset["train"]["batch_size_per_gpu"]  # untouched
    assert settings["method"]["out_dim"] == 4096


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config([tmp_path / "nope.yaml"], root=REPO)


def test_paper_preset_requires_dataset_roots(tmp_path):
    from densessl.stages.data import run_data

    cfg = load_config([write(tmp_path, {"preset": "paper", "results_dir": str(tmp_path / "r")})], root=REPO)
    with pytest.raises(ConfigError, match=r"data.roots.imagenet is not set"):
        run_data(cfg, "imagenet")


@pytest.mark.parametrize("override", sorted((REPO / "workflow/overrides").glob("*.yaml")), ids=lambda p: p.name)
def test_override_files_validate_and_keep_the_preset(override):
    cfg = load_config([REPO / "config.yaml", override], root=REPO)
    assert cfg.preset == "smoke" and cfg.pretrain_runs
    if override.name == "gtsa-long.yaml":
        (run,) = cfg.pretrain_runs
        train = cfg.pretrain_settings(run)["train"]
        assert run.id == "gtsa/vit-tiny-p8-coco" and train["epochs"] == 60
        assert train["batch_size_per_gpu"] == 32 and train["lr"] == 0.0005  # the rest from smoke.yaml
        assert str(cfg.results).endswith("results/gtsa-long/smoke")
    if override.name == "transfer-long.yaml":
        # every transfer protocol, each enforcing its reference check over 2 random-init seeds, at 200 iterations
        transfer = {"keypointrcnn_r50_fpn_coco", "semfpn_ade20k", "upernet_ade20k", "maskrcnn_vit_fpn_coco",
                    "maskrcnn_r50_c4_coco", "maskrcnn_r50_fpn_coco", "maskrcnn_r50_fpn_lvis",
                    "maskrcnn_r50_fpn_cityscapes", "fasterrcnn_r50_c4_voc"}
        assert set(cfg.evaluations) == transfer and not cfg.method_runs
        for protocol in transfer:
            assert cfg.reference_check_enforced(protocol), protocol
            roles = sorted(r.method for r in cfg.protocol_runs(protocol))
            assert roles == ["random-init", "random-init", "supervised"], (protocol, roles)
        detection = cfg.eval_settings("maskrcnn_r50_c4_coco")
        assert detection["schedules"] == {"1x": {"max_length": 600, "milestones": [480]}}
        assert detection["rpn_test_proposals"] == 100  # the rest from smoke.yaml
        assert cfg.eval_settings("semfpn_ade20k")["iterations"] == 200
        assert cfg.eval_settings("keypointrcnn_r50_fpn_coco")["iterations"] == 200
        # Cityscapes on a split three times the smoke one, all of its val images tested
        assert cfg.data_settings("cityscapes")["generator"]["spec"]["counts"] == {"train": 480, "val": 120}
        assert cfg.data_settings("coco") == load_config([REPO / "config.yaml"], root=REPO).data_settings("coco")
        cityscapes = cfg.eval_settings("maskrcnn_r50_fpn_cityscapes")
        assert cityscapes["max_test_images"] is None and cityscapes["schedules"]["1x"]["max_length"] == 600


def test_datasets_are_those_the_dag_reads(tmp_path):
    """A configuration that evaluates Cityscapes alone makes (and its report reads) Cityscapes and the supervised
    reference's ImageNet, not the COCO of the ViT reference that nothing evaluates."""
    cfg = load_config([write(tmp_path, {"evaluations": ["maskrcnn_r50_fpn_cityscapes"], "runs": [],
                                        "results_dir": str(tmp_path / "r")})], root=REPO)
    assert any(r.data == "coco" for r in cfg.pretrain_runs)
    assert cfg.datasets == ["cityscapes", "imagenet"]


def test_data_settings_follow_the_synthetic_generator(monkeypatch):
    """A change of the smoke sizes must change the data rule's parameters (Snakemake reruns on them)."""
    from dataclasses import replace

    import densessl.data.synthetic as synthetic

    cfg = load_config([REPO / "config.yaml"], root=REPO)
    before = cfg.data_settings("davis")
    assert before["generator"]["spec"]["counts"] == dict(synthetic.PRESETS["smoke"].counts["davis"])
    smoke = synthetic.PRESETS["smoke"]
    bigger = replace(smoke, counts={**smoke.counts, "davis": {"train": 2, "val": 99}})
    monkeypatch.setitem(synthetic.PRESETS, "smoke", bigger)
    assert cfg.data_settings("davis") != before
    assert cfg.data_settings("coco") == load_config([REPO / "config.yaml"], root=REPO).data_settings("coco")
    monkeypatch.setattr(synthetic, "GENERATOR_VERSION", synthetic.GENERATOR_VERSION + 1)
    assert cfg.data_settings("coco")["generator"]["version"] == synthetic.GENERATOR_VERSION


def test_epoch_variants_are_separate_runs_and_repeats_are_refused(tmp_path):
    run = {"method": "clove", "arch": "resnet-tiny", "data": "imagenet"}
    cfg = load_config([write(tmp_path, {"runs": [run, {**run, "epochs": 2}]})], root=REPO)
    assert [r.id for r in cfg.method_runs] == ["clove/resnet-tiny-imagenet", "clove/resnet-tiny-imagenet-2ep"]
    assert cfg.pretrain_settings(cfg.method_runs[1])["train"]["epochs"] == 2
    with pytest.raises(ConfigError, match=r"clove/resnet-tiny-imagenet'\] are listed more than once"):
        load_config([write(tmp_path, {"runs": [run, dict(run)]})], root=REPO)


def test_paper_preset_runs_both_epoch_variants_the_papers_report():
    cfg = load_config([REPO / "config.yaml"], preset="paper", root=REPO)
    ids = {r.id for r in cfg.pretrain_runs}
    assert {"selfpatch/vit-s16-imagenet", "selfpatch/vit-s16-imagenet-300ep", "clove/resnet50-imagenet",
            "clove/resnet50-imagenet-200ep", "dino/vit-s16-coco"} <= ids
    epochs = {r.id: cfg.pretrain_settings(r)["train"]["epochs"] for r in cfg.pretrain_runs}
    assert epochs["selfpatch/vit-s16-imagenet"] == 200 and epochs["selfpatch/vit-s16-imagenet-300ep"] == 300
    assert epochs["clove/resnet50-imagenet"] == 400 and epochs["clove/resnet50-imagenet-200ep"] == 200
