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
from densessl.protocol_names import ProtocolRegistry

PRESETS = ("smoke", "paper")
METHOD_DISPLAY = {"dino": "DINO", "loca": "LOCA", "selfpatch": "SelfPatch", "gtsa": "GTSA", "clove": "CLoVE",
                  "random-init": "random init", "supervised": "supervised reference",
                  # compared methods, evaluated from their released weights only (format state_dict)
                  "pixpro": "PixPro", "densecl": "DenseCL", "slotcon": "SlotCon", "vicregl": "VICRegL",
                  "mocov2": "MoCo v2", "imagenet-supervised": "ImageNet-supervised"}
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
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        context = getattr(exc, "context", None)
        raise ConfigError(f"{where}: not valid YAML: {problem}{f' ({context})' if context else ''}; fix that "
                          f"line (indentation with spaces only, a space after each ':')") from exc
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
        elif err.validator == "anyOf":  # e.g. evaluations: a listed name or a Patch-Seg grid point
            allowed = [str(v) for sub in err.validator_value for v in sub.get("enum", [])]
            patterns = [f"a name matching {sub['pattern']}" for sub in err.validator_value if "pattern" in sub]
            hint = f"; allowed values: {', '.join(allowed + patterns)}"
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
    """One backbone to evaluate: a pretraining run, a released checkpoint or a baseline (random init, or the
    supervised reference, whose method is "supervised")."""

    method: str
    arch: str
    data: str           # pretraining data, or "seed<k>" for random init
    epochs: int | None = None
    released: bool = False  # backbone imported from an official release instead of our pretraining
    # random init and supervised reference: the architecture variant the network is drawn as (models/variants.py)
    variant: str | None = None
    # a pretraining run listed with ``seeds``: one replica per seed (train.seed), so the report can tell a
    # published gain from seed noise
    train_seed: int | None = None

    @property
    def name(self) -> str:
        """``<arch>[.<variant>]-<data>[-<E>ep][-seed<S>][-released]``: a run that sets its own epochs is named by
        them, so the papers' epoch variants of one recipe (CLoVE 200/400, SelfPatch 200/300) are separate rows;
        a run listed with several seeds has one replica per seed."""
        arch = f"{self.arch}.{self.variant}" if self.variant else self.arch
        epochs = f"-{self.epochs}ep" if self.epochs is not None else ""
        seed = f"-seed{self.train_seed}" if self.train_seed is not None else ""
        return f"{arch}-{self.data}{epochs}{seed}" + ("-released" if self.released else "")

    @property
    def id(self) -> str:
        return f"{self.method}/{self.name}"

    @property
    def is_random_init(self) -> bool:
        return self.method == "random-init"

    @property
    def is_supervised(self) -> bool:
        return self.method == "supervised"

    @property
    def role(self) -> str:
        """What the row is for the report: pretrained | released | random-init | supervised-reference."""
        if self.is_random_init:
            return "random-init"
        if self.is_supervised:
            return "supervised-reference"
        return "released" if self.released else "pretrained"

    @property
    def seed(self) -> int | None:
        """A random-init row's seed; a seed replica's train seed; None for the other runs (their train.seed)."""
        if self.is_random_init:
            return int(self.data.removeprefix("seed"))
        return self.train_seed


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
    def method_runs(self) -> list[Run]:
        """The self-supervised pretraining runs of ``runs``: the rows the papers' tables are about. An entry with
        ``seeds`` is one run per seed (seed replicas of one row)."""
        return [Run(r["method"], r["arch"], r["data"], r.get("epochs"), train_seed=seed)
                for r in self.data.get("runs", []) for seed in (r.get("seeds") or [None])]

    @property
    def supervised_runs(self) -> list[Run]:
        """``baselines.supervised_reference``: the compared networks trained with labels (methods/supervised.py)."""
        entries = (self.data.get("baselines") or {}).get("supervised_reference") or []
        return [Run("supervised", r["arch"], r["data"], r.get("epochs"), variant=r.get("variant")) for r in entries]

    @property
    def pretrain_runs(self) -> list[Run]:
        """Every run the pretrain stage trains: the methods' runs and the supervised references."""
        return self.method_runs + self.supervised_runs

    @property
    def released_runs(self) -> list[Run]:
        """Eval-only rows: official released weights, imported (and downloaded) by the convert stage. A release
        that states its pretraining epochs (PixPro 100/400) is named by them, so two releases stay two rows."""
        return [Run(r["method"], r["arch"], r["data"], r.get("epochs"), released=True)
                for r in self.data.get("released", [])]

    def released_spec(self, run: Run) -> dict[str, Any]:
        for r in self.data.get("released", []):
            if (r["method"], r["arch"], r["data"], r.get("epochs")) == (run.method, run.arch, run.data, run.epochs):
                return dict(r)
        raise ConfigError(f"run {run.id!r} is not listed under 'released' in the configuration")

    def download_path(self, url: str) -> Path:
        return self.results / "downloads" / url.rstrip("/").rsplit("/", 1)[-1]

    def release_download_path(self, run: Run) -> Path | None:
        """Where a released entry's url is downloaded to: ``file`` where given (a url such as cloudstor's
        ``.../download`` names no file), else the url's last segment; None for a local ``path``."""
        spec = self.released_spec(run)
        if not spec.get("url"):
            return None
        return self.results / "downloads" / spec["file"] if spec.get("file") else self.download_path(spec["url"])

    def release_inputs(self, run: Run) -> list[str]:
        """A released run's input files for Snakemake and DVC: its local ``path`` once the file is there. A url
        is downloaded by the convert stage; a manually placed file not there yet is no input, so the convert job
        runs and says where to download it (checkpoints/released.py) instead of the orchestrator refusing the
        whole DAG over one missing input."""
        path = self.released_spec(run).get("path")
        return [path] if path and Path(path).expanduser().is_file() else []

    @property
    def released_lock(self) -> Path:
        """The lock file of the checksums recorded on first use (``released_lock``, relative to the repository
        root; checkpoints/released.py)."""
        from densessl.checkpoints.released import lock_file

        return lock_file(self.root, self.data.get("released_lock"))

    def release_evaluated_by(self, run: Run, protocol: str) -> bool:
        """Whether ``protocol`` evaluates released ``run``: its entry's ``evaluations`` (absent = every one), so a
        release runs only the protocols of the tables that print it (a ViT-H/16 is not fine-tuned on iNat
        for a table that has no such row)."""
        chosen = self.released_spec(run).get("evaluations")
        return chosen is None or protocol in chosen

    def variant_of(self, run: Run) -> str | None:
        """The architecture variant ``run``'s backbone has: random-init rows carry it, pretraining runs take
        their method's, released runs their checkpoint format's (models/variants.py)."""
        if run.is_random_init or run.is_supervised:
            return run.variant
        key = self.released_spec(run)["format"] if run.released else run.method
        return variant_of(key, run.arch)

    @property
    def random_init_seeds(self) -> list[int]:
        return [int(s) for s in self.data.get("random_init_seeds", [])]

    def baseline_selection(self, protocol: str) -> dict[str, Any]:
        """``baselines.protocols.<protocol>``: which runs ``protocol`` evaluates. ``methods`` (the compared runs'
        methods, trained or released; absent = all), ``random_init_seeds`` (absent = the top-level list) and
        ``supervised_reference`` (absent = true)."""
        return dict(((self.data.get("baselines") or {}).get("protocols") or {}).get(protocol) or {})

    def reference_check_enforced(self, protocol: str) -> bool:
        """Whether ``check-report`` fails on ``protocol``'s supervised-reference check
        (``baselines.protocols.<protocol>.enforce_reference_check``, default true)."""
        return bool(self.baseline_selection(protocol).get("enforce_reference_check", True))

    def _random_init_rows(self, compared: list[Run], seeds: list[int]) -> list[Run]:
        """Random-init rows for every (architecture, variant) of ``compared``, so each row is compared with the
        very network it trains (e.g. SelfPatch's ViT has no final LayerNorm)."""
        shapes = sorted({(r.arch, self.variant_of(r) or "") for r in compared})
        return [Run("random-init", arch, f"seed{s}", variant=variant or None) for arch, variant in shapes
                for s in seeds]

    def protocol_runs(self, protocol: str) -> list[Run]:
        """The rows ``protocol`` evaluates (and the report shows): the selected methods' runs, the supervised
        references and the random-init seeds of their networks, less the backbone families the protocol does not
        apply to. A protocol that selects nothing evaluates every run with the top-level seeds."""
        sel = self.baseline_selection(protocol)
        methods = sel.get("methods")
        compared = [r for r in self.method_runs + self.released_runs if methods is None or r.method in methods]
        compared = [r for r in compared if not r.released or self.release_evaluated_by(r, protocol)]
        supervised = self.supervised_runs if sel.get("supervised_reference", True) else []
        seeds = [int(s) for s in sel["random_init_seeds"]] if "random_init_seeds" in sel else self.random_init_seeds
        rows = compared + supervised
        # random-init rows for the networks trained here: a release was not, so it draws none of its own (a
        # compared method's ResNet-50 would add a second ResNet-50 random init, detection fine-tunes included,
        # that no table prints); it is compared with those of its architecture where the margins find one
        trained = [r for r in rows if not r.released and self.applies(protocol, r)]
        rows = rows + self._random_init_rows(trained, seeds)
        return [r for r in rows if self.applies(protocol, r)]

    @property
    def baseline_runs(self) -> list[Run]:
        """Random-init rows some protocol evaluates; with no protocol configured, the top-level seeds for every
        network of the compared runs (so ``convert`` can still export them)."""
        if not self.evaluations:
            return self._random_init_rows(self.method_runs + self.released_runs + self.supervised_runs,
                                          self.random_init_seeds)
        seen: dict[str, Run] = {}
        for protocol in self.evaluations:
            for r in self.protocol_runs(protocol):
                if r.is_random_init:
                    seen.setdefault(r.id, r)
        return sorted(seen.values(), key=lambda r: (r.arch, r.variant or "", r.seed))

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
        (layer-wise lr decay over the blocks, a class-token or mean-pooled head), so ResNet rows skip it; the
        COCO keypoint protocol is Keypoint R-CNN R50-FPN, an FPN over a ResNet's stages, so ViT rows skip it;
        every other protocol reads a patch grid and takes both families."""
        return backbone_family(run.arch) in EVALUATIONS[protocol]["backbones"]

    def evaluation_jobs(self) -> list[tuple[str, Run]]:
        """Every (protocol, run) the DAG evaluates and the report shows: each configured protocol × the rows it
        selects (``protocol_runs``); the pairs a protocol does not apply to are left out (the report says "n/a")."""
        return [(p, r) for p in self.evaluations for r in self.protocol_runs(p)]

    @property
    def datasets(self) -> list[str]:
        """Datasets the DAG's jobs read: each evaluation's, and the pretraining data of the runs they evaluate (a
        configured run that no evaluation selects is not trained, so its data is not made either)."""
        jobs = self.evaluation_jobs()
        needed = {EVALUATIONS[p]["dataset"] for p, _ in jobs}
        needed |= {r.data for _, r in jobs if not r.released and not r.is_random_init}
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
        if run.train_seed is not None:
            settings["train"]["seed"] = run.train_seed
        if run.is_supervised:  # the reference is drawn as the network it is compared with
            settings["method"]["variant"] = run.variant
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
        version, so that a change to the smoke sizes (e.g. the number of DAVIS clips) reruns the data and what
        depends on it instead of leaving the old files "up to date"."""
        d = self.data.get("data", {})
        settings: dict[str, Any] = {"synthetic": bool(d.get("synthetic", False)),
                                    "size": d.get("synthetic_size", "smoke"), "seed": int(d.get("synthetic_seed", 0)),
                                    "root": (d.get("roots") or {}).get(dataset)}
        if not settings["synthetic"]:
            # the mirror is left out: it changes where bytes come from, not which bytes (same checksums)
            settings["download"] = bool(d.get("download", False))
        if settings["synthetic"]:
            from densessl.data.synthetic import DATASETS, GENERATOR_VERSION, PRESETS, resized

            counts = (d.get("synthetic_counts") or {}).get(dataset)
            if counts:
                settings["counts"] = dict(counts)  # data.synthetic_counts: this dataset's splits resized
            if str(settings["size"]) in PRESETS and dataset in DATASETS:
                size = resized(str(settings["size"]), {dataset: counts} if counts else None)
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
        return [self.report_dir / name for name in ("report.md", "index.html", "tables.json", "checks.json")]

    def all_targets(self) -> list[Path]:
        return self.report_outputs()


def backbone_family(arch: str) -> str:
    """"resnet" for the torchvision ResNets (CLoVE), "vit" for every timm ViT."""
    return "resnet" if arch.startswith("resnet") else "vit"


# Evaluation protocols: the dataset each reads, the settings block that configures it and the backbone families
# it can evaluate. ``protocol_file`` is an identifier, not a path in this repository: the key that matches a
# protocol to the published tables of report/paper_tables.yaml (their ``protocol:`` field).
# ``fixed``: settings the protocol's name fixes (they override its settings block). Patch-Seg grid points
# (``patchseg_coco.majority-mlp``, ...) resolve through ProtocolRegistry (protocol_names.py).
EVALUATIONS: ProtocolRegistry = ProtocolRegistry({
    "patchseg_coco": {"dataset": "coco", "settings": "patchseg", "protocol_file": "protocols/patchseg.md",
                      "title": "Patch-Seg probe (frozen backbone), COCO-Stuff", "backbones": ("vit", "resnet"),
                      "fixed": {"dataset": "coco"}},
    "patchseg_coco_things": {"dataset": "coco", "settings": "patchseg", "protocol_file": "protocols/patchseg.md",
                             "title": "Patch-Seg probe (frozen backbone), COCO things (stuff folded into unlabelled)",
                             "backbones": ("vit", "resnet"), "fixed": {"dataset": "coco", "class_set": "things"}},
    "patchseg_ade20k": {"dataset": "ade20k", "settings": "patchseg", "protocol_file": "protocols/patchseg.md",
                        "title": "Patch-Seg probe (frozen backbone), ADE20K", "backbones": ("vit", "resnet"),
                        "fixed": {"dataset": "ade20k"}},
    "linear_ade20k": {"dataset": "ade20k", "settings": "linear_seg",
                      "protocol_file": "protocols/segmenter_linear_ade20k.md",
                      "title": "Segmenter linear decoder, ADE20K", "backbones": ("vit", "resnet")},
    "inat19_finetune": {"dataset": "inat", "settings": "inat_finetune",
                        "protocol_file": "protocols/inat19_finetune.md",
                        "title": "iNaturalist 2019 fine-tuning (GTSA protocol), top-1/top-5", "backbones": ("vit",)},
    "davis2017": {"dataset": "davis", "settings": "davis", "protocol_file": "protocols/davis2017.md",
                  "title": "DAVIS-2017 video object segmentation (label propagation, frozen features), J&F",
                  "backbones": ("vit", "resnet")},
    # DINO's eval_knn.py / eval_linear.py; the published numbers are the DINO README's table
    # (report/paper_tables.yaml dino_imagenet_readme names these protocols per column).
    "knn_imagenet": {"dataset": "imagenet", "settings": "knn", "protocol_file": "methods/dino.md",
                     "title": "ImageNet weighted 20-NN on frozen features (DINO eval_knn.py), top-1",
                     "backbones": ("vit", "resnet")},
    "linear_imagenet": {"dataset": "imagenet", "settings": "linear_cls", "protocol_file": "methods/dino.md",
                        "title": "ImageNet linear classification on frozen features (DINO eval_linear.py), top-1",
                        "backbones": ("vit", "resnet")},
    "keypointrcnn_r50_fpn_coco": {"dataset": "coco", "settings": "keypoints",
                                  "protocol_file": "protocols/mmdet_maskrcnn.md",
                                  "title": "COCO keypoints, Keypoint R-CNN R50-FPN (torchvision), AP^kp",
                                  "backbones": ("resnet",)},
    # Toolkit protocols (evaluate/transfer): "toolkit" names the OpenMMLab package whose runner trains them; the
    # evaluate stage gives them a work_dir next to metrics.json for the toolkit's logs and checkpoints. "tables":
    # the paper tables (report/paper_tables.yaml ids) of a protocol whose protocol key is shared with another.
    "semfpn_ade20k": {"dataset": "ade20k", "settings": "semfpn", "protocol_file": "protocols/mmseg_semfpn_upernet.md",
                      "title": "Semantic FPN 40k (mmsegmentation, fine-tuned ViT), ADE20K", "backbones": ("vit",),
                      "toolkit": "mmseg", "tables": ("selfpatch_ade20k_semfpn", "gtsa_ade20k_semfpn")},
    "upernet_ade20k": {"dataset": "ade20k", "settings": "upernet",
                       "protocol_file": "protocols/mmseg_semfpn_upernet.md",
                       "title": "UperNet 160k (mmsegmentation, fine-tuned ViT), ADE20K", "backbones": ("vit",),
                       "toolkit": "mmseg", "tables": ("selfpatch_ade20k_upernet",)},
})
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


SNAKEMAKE_CONFIG_KEYS = frozenset({"preset"})


def check_snakemake_overrides(overrides: dict[str, Any]) -> None:
    """``snakemake --config KEY=VALUE`` takes only ``preset``: other settings belong in a config file, where
    they are validated and hashed into the rule params; silently ignoring them would run something else."""
    unsupported = sorted(set(overrides) - SNAKEMAKE_CONFIG_KEYS)
    if unsupported:
        raise ConfigError(f"snakemake --config: unsupported key(s) {unsupported}; only "
                          f"{sorted(SNAKEMAKE_CONFIG_KEYS)} is read there. Put other settings in a YAML file and "
                          f"pass it with --configfile config.yaml <file>")


def load_config(config_files: Iterable[str | Path] = ("config.yaml",), preset: str | None = None,
                overrides: dict[str, Any] | None = None, root: Path | None = None,
                check_settings: bool = True) -> Config:
    """Merge preset ← config files ← overrides, validating each user layer and the result; with
    ``check_settings`` also every run's and protocol's settings (``densessl.settings_check``; a configuration
    that passed with the same code is not checked again)."""
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
    _check_baselines(cfg, where)
    ids = [r.id for r in cfg.pretrain_runs + cfg.released_runs]
    repeated = sorted({i for i in ids if ids.count(i) > 1})
    if repeated:
        raise ConfigError(f"{where}: runs {repeated} are listed more than once (a run is method, arch, data, "
                          f"its epochs and seed); remove the repeat, or give each copy its own 'epochs' (or list "
                          f"its replicas under 'seeds')")
    if check_settings:
        from densessl.settings_check import check_stage_settings_cached

        check_stage_settings_cached(cfg)
    return cfg


# The labels a supervised reference's data has: ImageNet's folders (one class per image), COCO's semantic maps
# (one class per patch; methods/supervised.py)
SUPERVISED_TARGET_OF_DATA = {"imagenet": "image", "coco": "patch"}


def _check_baselines(cfg: Config, where: str) -> None:
    """What the schema cannot say: ``baselines.protocols`` names protocols (the registry below), a supervised
    reference's variant belongs to its architecture's family, and its target is the kind of labels its data
    has."""
    from densessl.models.variants import VARIANT_FAMILY

    for run in cfg.supervised_runs:
        if run.variant is not None and VARIANT_FAMILY.get(run.variant) != backbone_family(run.arch):
            raise ConfigError(f"{where}: baselines.supervised_reference {run.arch}: variant {run.variant!r} is not a "
                              f"{backbone_family(run.arch)} variant; use one of "
                              f"{sorted(v for v, f in VARIANT_FAMILY.items() if f == backbone_family(run.arch))} "
                              f"or leave it out")
        target = cfg.pretrain_settings(run)["method"].get("target", "image")
        wanted = SUPERVISED_TARGET_OF_DATA.get(run.data)
        if target != wanted:
            raise ConfigError(f"{where}: baselines.supervised_reference {run.arch}-{run.data}: the supervised target "
                              f"is {target!r}, but {run.data} has {wanted}-level labels; set "
                              f"pretrain.supervised.arch.{run.arch}.method.target: {wanted}, or data: "
                              f"{'coco' if target == 'patch' else 'imagenet'}")
    for i, entry in enumerate(cfg.data.get("released") or []):
        unknown = [p for p in entry.get("evaluations") or [] if p not in EVALUATIONS]
        if unknown:
            raise ConfigError(f"{where}: released.{i}.evaluations: {unknown} are not protocols; allowed: "
                              f"{', '.join(EVALUATIONS)}")
    selections = (cfg.data.get("baselines") or {}).get("protocols") or {}
    for protocol in selections:
        if protocol not in EVALUATIONS:
            raise ConfigError(f"{where}: baselines.protocols.{protocol}: not a protocol; allowed: "
                              f"{', '.join(EVALUATIONS)}")
