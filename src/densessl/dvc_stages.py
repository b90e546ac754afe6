"""dvc.yaml, generated from the resolved configuration: the same stages, files and CLI calls as the Snakefile.

Generating the file (rather than writing it by hand) keeps DVC and Snakemake from drifting apart: a test
checks that the committed dvc.yaml equals what this module writes for config.yaml, and another that DVC's own
reading of the stages declares the files Snakemake's dry run plans, for both presets.

Choices (docs/operations.md, "DVC"):

* One pipeline per preset. The file is rendered for one preset (config.yaml's, or ``dvc-yaml --preset``) and
  every command passes ``--preset``, so a rendered file runs the preset it was rendered for whatever
  config.yaml's ``preset`` says.
* A stage reruns when its own settings change, as under Snakemake: its command ends in a comment with their
  hash (``_cmd``) instead of naming config.yaml as a params file, which would rerun every stage on any edit.
  So dvc.yaml must be rendered again after each configuration change (a test checks the committed one).
* Everything a stage writes that a later stage or the report reads is a cached output, metrics included, so
  ``dvc push`` / ``dvc pull`` carry a whole result tree and a pulled clone has nothing to rerun.
* Real datasets are versioned by content hash without entering the cache: a dataset root that exists before
  the stage (``data.download: false``) is an external *dependency* of its data stage, one that the stage
  downloads into (``data.download: true``) an external *output* with ``cache: false`` and ``persist: true``.
  Either way DVC hashes every file (MD5, one full read, then cached by inode, size and mtime) and records
  the tree's hash in dvc.lock, so a changed dataset reruns its data stage and what reads it, and no byte is
  copied; ``persist`` stops DVC from deleting the root before a rerun. The cached manifest next to it holds
  the verified archive checksums (SHA-256) the root was prepared from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from densessl.config import EVALUATIONS, Config, stable_hash

CODE = {
    "data": ["src/densessl/data", "src/densessl/stages/data.py"],
    "pretrain": ["src/densessl/methods", "src/densessl/train", "src/densessl/models", "src/densessl/data/views.py",
                 "src/densessl/stages/pretrain.py"],
    "convert": ["src/densessl/checkpoints", "src/densessl/stages/convert.py"],
    "evaluate": ["src/densessl/evaluate", "src/densessl/stages/evaluate.py"],
    "report": ["src/densessl/report"],
}
# What a data stage writes next to its manifest (stages/data.py): the synthetic dataset, and for Cityscapes
# the COCO-style instance files made from gtFine that mmdet reads.
SYNTHETIC_FOLDER = "files"
CITYSCAPES_ANNOTATIONS = "annotations"


def _name(*parts: str) -> str:
    return "_".join(p.replace("/", "_") for p in parts)


def _cmd(cfg: Config, stage: str, *args: str, settings: Any) -> str:
    """The stage's CLI call, pinned to the preset the file was rendered for, and ending in a shell comment with
    the hash of the stage's own resolved settings (the hash the Snakemake rule's ``params.settings`` holds):
    DVC reruns a stage whose command changed, so a configuration edit reruns the stages it changes and no
    other (declaring config.yaml as a params file would rerun all of them, pretrainings included)."""
    return " ".join(["python -m densessl", stage, "--preset", cfg.preset, *args, "# settings", stable_hash(settings)])


def dataset_root(cfg: Config, dataset: str) -> str | None:
    """The real dataset's root as DVC should name it (relative paths stay relative to the repository), or
    None for synthetic data and for a root not configured (the stage then stops with the fix)."""
    settings = cfg.data_settings(dataset)
    if settings["synthetic"] or not settings["root"]:
        return None
    return Path(settings["root"]).expanduser().as_posix()


def data_stage(cfg: Config, dataset: str) -> dict[str, Any]:
    manifest = cfg.data_manifest(dataset)
    outs: list[Any] = [str(manifest)]
    settings = cfg.data_settings(dataset)
    if settings["synthetic"]:
        outs.append(str(manifest.parent / SYNTHETIC_FOLDER))
    if dataset == "cityscapes":
        outs.append(str(manifest.parent / CITYSCAPES_ANNOTATIONS))
    deps: list[str] = []
    root = dataset_root(cfg, dataset)
    if root is not None and settings.get("download"):
        outs.append({root: {"cache": False, "persist": True}})
    elif root is not None:
        deps.append(root)
    return {"cmd": _cmd(cfg, "data", "--dataset", dataset, settings=settings),
            "deps": [*deps, *CODE["data"]], "outs": outs}


def stages(cfg: Config) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for dataset in cfg.datasets:
        out[_name("data", dataset)] = data_stage(cfg, dataset)
    for run in cfg.pretrain_runs:
        out[_name("pretrain", run.id)] = {
            "cmd": _cmd(cfg, "pretrain", "--run", run.id, settings=cfg.pretrain_settings(run)),
            "deps": [str(cfg.data_manifest(run.data)), *CODE["pretrain"]],
            "outs": [str(cfg.final_checkpoint(run))],
            "metrics": [str(cfg.pretrain_dir(run) / "train_summary.json")],
        }
    for run in cfg.all_runs:
        if run.is_random_init:
            deps = []
        elif run.released:
            deps = cfg.release_inputs(run)
        else:
            deps = [str(cfg.final_checkpoint(run))]
        out[_name("convert", run.id)] = {
            "cmd": _cmd(cfg, "convert", "--run", run.id, settings=cfg.convert_settings(run)),
            "deps": deps + CODE["convert"],
            "outs": [str(cfg.backbone(run)), str(cfg.backbone(run).with_suffix(".json"))],
        }
    for protocol, run in cfg.evaluation_jobs():
        out[_name("eval", protocol, run.id)] = {
            "cmd": _cmd(cfg, "evaluate", protocol, "--run", run.id, settings=cfg.eval_settings(protocol)),
            "deps": [str(cfg.backbone(run)), str(cfg.data_manifest(EVALUATIONS[protocol]["dataset"])),
                     *CODE["evaluate"]],
            "metrics": [str(cfg.eval_metrics(protocol, run))],
        }
    out["report"] = {
        # the report shows the whole configuration's hash: any edit rebuilds it (seconds)
        "cmd": _cmd(cfg, "report", settings=cfg.data),
        "deps": [str(cfg.eval_metrics(p, r)) for p, r in cfg.evaluation_jobs()] + CODE["report"],
        "outs": [str(p) for p in cfg.report_outputs()],
    }
    return out


def render(cfg: Config) -> str:
    header = (f"# Generated by `python -m densessl dvc-yaml > dvc.yaml` from config.yaml for the {cfg.preset} "
              "preset; do not edit by hand.\n"
              "# Each stage calls the same CLI as the Snakemake rule that writes the same files "
              "(docs/operations.md, DVC).\n")
    return header + yaml.safe_dump({"stages": stages(cfg)}, sort_keys=False, width=120)
