"""config.yaml + preset → one resolved configuration, validated with messages that name the field.

The preset file (workflow/presets/<preset>.yaml) supplies every default and config.yaml overrides any key
of it; both are checked against workflow/schemas/config.schema.yaml. Snakemake (the Snakefile), DVC (dvc.yaml)
and the CLI all resolve the configuration through this module, so the orchestrators hold no logic.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from densessl.errors import ConfigError
from densessl.evaluate.transfer.mmdet_protocols import PROTOCOLS as MMDET_PROTOCOLS
from densessl.models.variants import variant_init_kwargs, variant_kwargs, variant_of

PRESETS = ("smoke", "paper")
METHOD_DISPLAY = {"dino": "DINO", "loca": "LOCA", "selfpatch": "SelfPatch", "gtsa": "GTSA", "clove": "CLoVE",
                  "random-init": "random init"}
DATA_DISPLAY = {"imagenet": "ImageNet-1k", "coco": "COCO", "ade20k": "ADE20K", "davis": "DAVIS-2017",
                "inat": "iNat-2019"}


def find_project_root(start: Path | None = None) -> Path:
    """The folder holding workflow/presets (the repository root): DENSESSL_ROOT, else the current folder or a
    parent of it, else the checkout this package was installed from (editable install)."""
    if os.environ.get("DENSESSL_ROOT"):
        return Path(os.environ["DENSESSL_ROOT"]).resolve()
    start = (start or Path.cwd()).resolve()
    for candidate in (start, *start.parents, *Path(__file__).resolve().parents):
        if (candidate / "workflow" / "presets").is_dir():
            return candidate
    raise ConfigError(f"{start}: no workflow/presets folder here or above; run densessl from the repository root "
                      f"or set DENSESSL_ROOT to it")


def load_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def _schema(root: Path) -> dict[str, Any]:
    return load_yaml(root / "workflow" / "schemas" / "config.schema.yaml")


def validate(data: dict[str, Any], source: str, root: Path) -> None:
    """Raise ConfigError naming the field, the bad value and what is allowed."""
    validator = jsonschema.Draft202012Validator(_schema(root))
    errors = sorted(validator.iter_errors(data), key=lambda e: list(e.absolute_path))
    if not errors:
        return
    lines = []
    for err in errors[:10]:
        field = ".".join(str(p) for p in err.absolute_path) or "(top level)"
        hint = ""
        if err.validator == "enum":
            hint = f"; allowed values: {', '.join(map(str, err.validator_value))}"
        elif err.validator == "additionalProperties":
            allowed = sorted(err.schema.get("properties", {}))
            hint = f"; allowed fields here: {', '.join(allowed)}"
        lines.append(f"  {field}: {err.message}{hint}")
    raise ConfigError(f"{source}: invalid configuration\n" + "\n".join(lines))


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def stable_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Run:
    """One backbone to evaluate: a pretraining run or a random-init baseline."""

    method: str
    arch: str
    data: str           # pretraining data, or "seed<k>" for random init
    epochs: int | None = None
    released: bool = False  # backbone imported from an official release instead of our pretraining
    variant: str | None = None  # random init only: the method's architecture variant (models/variants.py)

    @property
    def name(self) -> str:
        """``<arch>[.<variant>]-<data>[-<E>ep][-released]``: a run that sets its own epochs is named by them, so
        the papers' epoch variants of one recipe (CLoVE 200/400, SelfPatch 200/300) are separate rows."""
        arch = f"{self.arch}.{self.variant}" if self.variant else self.arch
        epochs = f"-{self.epochs}ep" if self.epochs is not None else ""
        return f"{arch}-{self.data}{epochs}" + ("-released" if self.released else "")

    @property
    def id(self) -> str:
        return f"{self.method}/{self.name}"

    @property
    def is_random_init(self) -> bool:
        return self.method == "random-init"

    @property
    def seed(self) -> int:
        return int(self.data.removeprefix("seed"))


class Config:
    """The resolved configuration and the paths every stage reads and writes."""

    def __init__(self, data: dict[str, Any], root: Path):
        self.data = data
        self.root = root

    # ------------------------------------------------------------------ basic fields
    @property
    def preset(self) -> str:
        return self.data["preset"]

    @property
    def threads(self) -> int:
        return int(self.data.get("threads", 1))

    @property
    def hash(self) -> str:
        return stable_hash(self.data)

    @property
    def results(self) -> Path:
        return Path(self.data.get("results_dir", "results")) / self.preset

    @property
    def pretrain_runs(self) -> list[Run]:
        return [Run(r["method"], r["arch"], r["data"], r.get("epochs")) for r in self.data.get("runs", [])]

    @property
    def released_runs(self) -> list[Run]:
        """Eval-only rows: official released weights, imported (and downloaded) by the convert stage."""
        return [Run(r["method"], r["arch"], r["data"], released=True) for r in self.data.get("released", [])]

    def released_spec(self, run: Run) -> dict[str, Any]:
        for r in self.data.get("released", []):
            if (r["method"], r["arch"], r["data"]) == (run.method, run.arch, run.data):
                return dict(r)
        raise ConfigError(f"run {run.id!r} is not listed under 'released' in the configuration")

    def download_path(self, url: str) -> Path:
        return self.results / "downloads" / url.rstrip("/").rsplit("/", 1)[-1]

    def variant_of(self, run: Run) -> str | None:
        """The architecture variant ``run``'s backbone has: random-init rows carry it, pretraining runs take
        their method's, released runs their checkpoint format's (models/variants.py)."""
        if run.is_random_init:
            return run.variant
        key = self.released_spec(run)["format"] if run.released else run.method
        return variant_of(key, run.arch)

    @property
    def baseline_runs(self) -> list[Run]:
        """Random-init rows: the seeds for every (architecture, variant) a pretrained or released run has, so each
        method is compared with the very network it trains (e.g. SelfPatch's ViT has no final LayerNorm)."""
        shapes = sorted({(r.arch, self.variant_of(r) or "") for r in self.pretrain_runs + self.released_runs})
        return [Run("random-init", arch, f"seed{s}", variant=variant or None) for arch, variant in shapes
                for s in self.data.get("random_init_seeds", [])]

    @property
    def all_runs(self) -> list[Run]:
        return self.pretrain_runs + self.released_runs + self.baseline_runs

    def run(self, run_id: str) -> Run:
        for r in self.all_runs:
            if r.id == run_id:
                return r
        raise ConfigError(f"run {run_id!r} is not in the configuration; runs: {[r.id for r in self.all_runs]}")

    @property
    def evaluations(self) -> list[str]:
        return list(self.data.get("evaluations", []))

    def applies(self, protocol: str, run: Run) -> bool:
        """Whether ``protocol`` can evaluate ``run``'s backbone: iNat fine-tuning is the GTSA protocol for ViTs
        (layer-wise lr decay over the blocks, a class-token or mean-pooled head), so ResNet rows skip it; every
        other protocol reads a patch grid and takes both families."""
        return backbone_family(run.arch) in EVALUATIONS[protocol]["backbones"]

    def evaluation_jobs(self) -> list[tuple[str, Run]]:
        """Every (protocol, run) the DAG evaluates and the report shows: the configured protocols × all runs,
        less the pairs a protocol does not apply to (the report marks those "n/a")."""
        return [(p, r) for p in self.evaluations for r in self.all_runs if self.applies(p, r)]

    @property
    def datasets(self) -> list[str]:
        """Datasets the configured runs and evaluations read."""
        needed = {r.data for r in self.pretrain_runs}
        needed |= {EVALUATIONS[e]["dataset"] for e in self.evaluations}
        return sorted(needed)

    # ------------------------------------------------------------------ per-stage settings
    def pretrain_settings(self, run: Run) -> dict[str, Any]:
        """{'method': {...}, 'train': {...}} for one run, per-arch overrides applied."""
        settings = copy.deepcopy(self.data.get("pretrain", {}).get(run.method, {}))
        per_arch = settings.pop("arch", {}) or {}
        settings = deep_merge({"method": {}, "train": {}}, settings)
        settings = deep_merge(settings, per_arch.get(run.arch, {}))
        if run.epochs is not None:
            settings["train"]["epochs"] = run.epochs
        return settings

    def eval_settings(self, protocol: str) -> dict[str, Any]:
        key = EVALUATIONS[protocol]["settings"]
        return copy.deepcopy(self.data.get("evaluate", {}).get(key, {}))

    def eval_gpus(self, protocol: str) -> int:
        """GPUs an evaluation job asks the scheduler for: none at smoke scale (CPU); an mmdet protocol its
        settings' ``gpus`` (the published batch is per that many processes, one per GPU); any other one."""
        if self.preset == "smoke":
            return 0
        if protocol in MMDET_PROTOCOLS:
            return int(self.eval_settings(protocol).get("gpus", 8))
        return 1

    def convert_settings(self, run: Run) -> dict[str, Any]:
        """What determines an exported backbone besides its input files (the convert rule hashes it into its params,
        a rerun trigger). A released entry's url / sha256 / path / format / options are not files: without this,
        editing options.checkpoint_key left the old backbone.safetensors "up to date". Random-init rows: the
        architecture, variant (its create_backbone and init kwargs, code that has changed before) and seed.
        Pretrained runs: their pretrain settings, as the pretrain rule."""
        if run.released:
            return {"released": self.released_spec(run)}
        if run.is_random_init:
            return {"random_init": {"arch": run.arch, "variant": run.variant, "seed": run.seed,
                                    "arch_kwargs": variant_kwargs(run.variant),
                                    "init_kwargs": variant_init_kwargs(run.variant)}}
        return {"pretrained": self.pretrain_settings(run)}

    def data_settings(self, dataset: str) -> dict[str, Any]:
        """What determines a dataset stage's output. For synthetic data this includes the generator's spec and
        version, so that a change to the smoke sizes (session 7: DAVIS 4 → 32 clips) reruns the data and what
        depends on it instead of leaving the old files "up to date"."""
        d = self.data.get("data", {})
        settings: dict[str, Any] = {"synthetic": bool(d.get("synthetic", False)),
                                    "size": d.get("synthetic_size", "smoke"), "seed": int(d.get("synthetic_seed", 0)),
                                    "root": (d.get("roots") or {}).get(dataset)}
        if settings["synthetic"]:
            from densessl.data.synthetic import DATASETS, GENERATOR_VERSION, PRESETS

            size = PRESETS.get(str(settings["size"]))
            if size is not None and dataset in DATASETS:
                settings["generator"] = {"version": GENERATOR_VERSION, "spec": size.spec(dataset)}
        return settings

    # ------------------------------------------------------------------ paths
    def data_manifest(self, dataset: str) -> Path:
        return self.results / "data" / dataset / "manifest.json"

    def pretrain_dir(self, run: Run) -> Path:
        return self.results / "pretrain" / run.method / run.name

    def final_checkpoint(self, run: Run) -> Path:
        return self.pretrain_dir(run) / "final.pt"

    def backbone(self, run: Run) -> Path:
        return self.pretrain_dir(run) / "backbone.safetensors"

    def eval_metrics(self, protocol: str, run: Run) -> Path:
        return self.results / "eval" / protocol / run.method / run.name / "metrics.json"

    @property
    def report_dir(self) -> Path:
        return self.results / "report"

    def report_outputs(self) -> list[Path]:
        return [self.report_dir / name for name in ("report.md", "index.html", "tables.json")]

    def all_targets(self) -> list[Path]:
        return self.report_outputs()


def backbone_family(arch: str) -> str:
    """"resnet" for the torchvision ResNets (CLoVE), "vit" for every timm ViT."""
    return "resnet" if arch.startswith("resnet") else "vit"


# Evaluation protocols: the dataset each reads, the settings block that configures it and the backbone families
# it can evaluate.
EVALUATIONS: dict[str, dict[str, Any]] = {
    "patchseg_coco": {"dataset": "coco", "settings": "patchseg", "protocol_file": "protocols/patchseg.md",
                      "title": "Patch-Seg probe (frozen backbone), COCO-Stuff", "backbones": ("vit", "resnet")},
    "patchseg_ade20k": {"dataset": "ade20k", "settings": "patchseg", "protocol_file": "protocols/patchseg.md",
                        "title": "Patch-Seg probe (frozen backbone), ADE20K", "backbones": ("vit", "resnet")},
    "linear_ade20k": {"dataset": "ade20k", "settings": "linear_seg",
                      "protocol_file": "protocols/segmenter_linear_ade20k.md",
                      "title": "Segmenter linear decoder, ADE20K", "backbones": ("vit", "resnet")},
    "inat19_finetune": {"dataset": "inat", "settings": "inat_finetune",
                        "protocol_file": "protocols/inat19_finetune.md",
                        "title": "iNaturalist 2019 fine-tuning (GTSA protocol), top-1/top-5", "backbones": ("vit",)},
    "davis2017": {"dataset": "davis", "settings": "davis", "protocol_file": "protocols/davis2017.md",
                  "title": "DAVIS-2017 video object segmentation (label propagation, frozen features), J&F",
                  "backbones": ("vit", "resnet")},
}
# The mmdetection transfer protocols (evaluate/transfer/mmdet_protocols.py): one settings block each, since each
# carries its own published schedule.
EVALUATIONS.update({
    name: {"dataset": spec["dataset"], "settings": name, "protocol_file": "protocols/mmdet_maskrcnn.md",
           "title": spec["title"], "backbones": spec["backbones"], "tables": spec["tables"]}
    for name, spec in MMDET_PROTOCOLS.items()})


def snakemake_config_files(configfiles: Iterable[str | Path], cwd: Path) -> list[str]:
    """Snakemake's config files in merge order, each once, relative to ``cwd`` where possible.

    The Snakefile's ``configfile:`` and a ``--configfile config.yaml`` on the command line name the same file
    (one absolute, one relative); rule params hold these paths, so ``make smoke`` and a plain ``snakemake``
    must spell them identically or Snakemake would rerun every job for "params changed"."""
    here = cwd.resolve()
    seen: set[Path] = set()
    out: list[str] = []
    for f in configfiles:
        path = Path(f).resolve()
        if path in seen:
            continue
        seen.add(path)
        out.append(str(path.relative_to(here)) if path.is_relative_to(here) else str(path))
    return out


def load_config(config_files: Iterable[str | Path] = ("config.yaml",), preset: str | None = None,
                overrides: dict[str, Any] | None = None, root: Path | None = None) -> Config:
    """Merge preset ← config files ← overrides, validating each user layer and the result."""
    user: dict[str, Any] = {}
    root = root or find_project_root()
    for f in config_files:
        path = Path(f)
        layer = load_yaml(path if path.is_absolute() else Path.cwd() / path)
        validate(layer, str(path), root)
        user = deep_merge(user, layer)
    if overrides:
        validate(overrides, "command-line overrides", root)
        user = deep_merge(user, overrides)
    if preset is not None:
        user["preset"] = preset
    name = user.get("preset", "smoke")
    if name not in PRESETS:
        raise ConfigError(f"preset: {name!r} is not a preset; allowed values: {', '.join(PRESETS)}")
    preset_path = root / "workflow" / "presets" / f"{name}.yaml"
    base = load_yaml(preset_path)
    validate(base, str(preset_path), root)
    merged = deep_merge(base, user)
    merged["preset"] = name
    where = f"{preset_path} merged with {', '.join(map(str, config_files))}"
    validate(merged, where, root)
    cfg = Config(merged, root)
    ids = [r.id for r in cfg.pretrain_runs + cfg.released_runs]
    repeated = sorted({i for i in ids if ids.count(i) > 1})
    if repeated:
        raise ConfigError(f"{where}: runs {repeated} are listed more than once (a run is method, arch, data and "
                          f"its epochs); remove the repeat, or give each copy its own 'epochs'")
    return cfg
