"""The generated DVC stages, read back by DVC: real dataset roots versioned without the cache, stages that
rerun on their own settings only, and the committed .dvc/config (fast; the runs are in test_dvc_repro.py)."""

from __future__ import annotations

import pytest
import yaml
from conftest import REPO

from densessl import dvc_stages
from densessl.config import load_config


def _cfg(tmp_path, name="c.yaml", **extra):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(extra))
    return load_config([path], root=REPO, check_settings=False)


def _dvc_stages(tmp_path, stages):
    """DVC's own view of the stages: the outputs and dependencies it built from the generated text."""
    from dvc.repo import Repo

    project = tmp_path / "project"
    project.mkdir()
    (project / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))
    Repo.init(str(project), no_scm=True)
    with Repo(str(project)) as repo:
        repo.index.graph  # noqa: B018  (DVC's checks of overlapping outputs)
        return {s.name: s for s in repo.index.stages}


@pytest.mark.parametrize("download", [False, True])
def test_real_dataset_roots_are_versioned_by_dvc_without_the_cache(tmp_path, download):
    roots = {d: str(tmp_path / "datasets" / d) for d in ("imagenet", "coco", "cityscapes")}
    cfg = _cfg(tmp_path, preset="paper", data={"roots": roots, "download": download},
               runs=[{"method": "dino", "arch": "vit-s16", "data": "imagenet"}],
               evaluations=["maskrcnn_r50_fpn_cityscapes", "patchseg_coco"])
    stages = dvc_stages.stages(cfg)
    stage = _dvc_stages(tmp_path, stages)["data_cityscapes"]
    cached = {str(o.def_path) for o in stage.outs if o.use_cache}
    assert cached == {"results/paper/data/cityscapes/manifest.json", "results/paper/data/cityscapes/annotations"}
    root = roots["cityscapes"]
    if download:  # the stage fills the root: an output DVC hashes but neither caches nor deletes before a rerun
        (external,) = [o for o in stage.outs if not o.use_cache]
        assert str(external.def_path) == root and external.persist
        assert root not in {str(d.def_path) for d in stage.deps}
    else:  # an existing root: a dependency, which DVC never writes
        assert root in {str(d.def_path) for d in stage.deps}
        assert all(o.use_cache for o in stage.outs)
    assert not any(str(o.def_path).endswith("/files") for o in stage.outs)  # no synthetic folder on real data


def test_a_setting_changes_the_commands_of_its_own_stages_and_the_report_only(tmp_path):
    runs = [{"method": "dino", "arch": "vit-tiny-p8", "data": "imagenet"},
            {"method": "selfpatch", "arch": "vit-tiny-p8", "data": "imagenet"}]
    before = dvc_stages.stages(_cfg(tmp_path, "a.yaml", runs=runs, evaluations=["patchseg_coco"]))
    after = dvc_stages.stages(_cfg(tmp_path, "b.yaml", runs=runs, evaluations=["patchseg_coco"],
                                   pretrain={"dino": {"train": {"lr": 1e-4}}}))
    assert set(before) == set(after)
    changed = {name for name in before if before[name]["cmd"] != after[name]["cmd"]}
    # the exported backbone carries its run's settings; the evaluation is rerun by DVC through that dependency
    assert changed == {"pretrain_dino_vit-tiny-p8-imagenet", "convert_dino_vit-tiny-p8-imagenet", "report"}
    assert all("params" not in stage for stage in after.values())

    # one more evaluation: its stages are new, and no existing stage but the report changes
    more = dvc_stages.stages(_cfg(tmp_path, "c.yaml", runs=runs, evaluations=["patchseg_coco", "davis2017"]))
    assert set(before) < set(more) and all(name.startswith(("eval_davis2017_", "data_davis"))
                                           for name in set(more) - set(before))
    assert {name for name in before if before[name]["cmd"] != more[name]["cmd"]} == {"report"}


def test_committed_dvc_config_has_a_group_shared_default_remote_beside_the_clone():
    from configobj import ConfigObj  # the reader DVC itself uses

    config = ConfigObj(str(REPO / ".dvc" / "config"))
    remote = config["core"]["remote"]
    section = config[f'remote "{remote}"']
    # relative to .dvc/: the folder next to the clone, on any machine the clone lands on
    assert (REPO / ".dvc" / section["url"]).resolve() == REPO.parent / "densessl-dvc-remote"
    assert section["shared"] == config["cache"]["shared"] == "group"
    ignored = (REPO / ".dvcignore").read_text().splitlines()
    assert "__pycache__/" in ignored and "*.py[cod]" in ignored
