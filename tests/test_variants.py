"""Random-init baselines per architecture variant: each method is compared with the network it trains."""

from __future__ import annotations

import pytest
import torch
import yaml

from densessl.checkpoints.importers import IMPORTERS
from densessl.checkpoints.io import load_backbone
from densessl.config import Run, load_config
from densessl.methods import get_method
from densessl.models.variants import ARCH_VARIANTS, variant_kwargs, variant_of
from densessl.report.build import _summary_cell, baseline_margins, display
from densessl.stages.convert import run_convert

ALL_METHODS = [
    {"method": "dino", "arch": "vit-tiny-p8", "data": "imagenet"},
    {"method": "selfpatch", "arch": "vit-tiny-p8", "data": "imagenet"},
    {"method": "loca", "arch": "vit-tiny-p8", "data": "imagenet"},
    {"method": "gtsa", "arch": "vit-tiny-p8", "data": "imagenet"},
    {"method": "clove", "arch": "resnet-tiny", "data": "imagenet"},
]


def _cfg(tmp_path, runs=ALL_METHODS, seeds=(0, 1, 2), supervised=True):
    path = tmp_path / "c.yaml"
    extra = {} if supervised else {"baselines": {"supervised_reference": []}}
    path.write_text(yaml.safe_dump({"preset": "smoke", "results_dir": str(tmp_path / "results"),
                                    "runs": list(runs), "random_init_seeds": list(seeds), **extra}))
    return load_config([path])


def test_every_variant_gets_its_own_seeds(tmp_path):
    cfg = _cfg(tmp_path)
    shapes = {}
    for r in cfg.baseline_runs:
        shapes.setdefault((r.arch, r.variant), []).append(r.seed)
    assert shapes == {("vit-tiny-p8", None): [0, 1, 2], ("vit-tiny-p8", "loca"): [0, 1, 2],
                      ("vit-tiny-p8", "selfpatch"): [0, 1, 2], ("resnet-tiny", "clove"): [0, 1, 2]}
    assert "random-init/vit-tiny-p8.selfpatch-seed1" in [r.id for r in cfg.all_runs]
    # a configuration of standard-ViT methods only has no variant rows
    only_dino = _cfg(tmp_path, runs=ALL_METHODS[:1], supervised=False)
    assert [r.id for r in only_dino.baseline_runs] == [f"random-init/vit-tiny-p8-seed{s}" for s in range(3)]


@pytest.mark.parametrize("method", ["dino", "selfpatch", "loca", "gtsa"])
def test_table_matches_what_methods_and_importers_build(method):
    """The variant table is the single source: the method's exported backbone and the importer of the same name
    rebuild exactly variant_kwargs(variant_of(method))."""
    expected = variant_kwargs(variant_of(method, "vit-tiny-p8"))
    settings = load_config(preset="smoke").pretrain_settings(Run(method, "vit-tiny-p8", "imagenet"))
    built = get_method(method)("vit-tiny-p8", settings["method"], epochs=1)
    assert built.arch_kwargs == expected
    assert (IMPORTERS[method].arch_kwargs or {}) == expected


def test_random_init_row_is_built_as_the_variant(tmp_path):
    cfg = _cfg(tmp_path)
    run = cfg.run("random-init/vit-tiny-p8.selfpatch-seed0")
    model, meta = load_backbone(run_convert(cfg, run.id))
    assert meta["arch_kwargs"] == ARCH_VARIANTS["selfpatch"] and meta["source"]["variant"] == "selfpatch"
    assert model.cls_token is None and isinstance(model.norm, torch.nn.Identity)
    standard, _ = load_backbone(run_convert(cfg, "random-init/vit-tiny-p8-seed0"))
    assert standard.cls_token is not None and isinstance(standard.norm, torch.nn.LayerNorm)
    # same seed, same standard-ViT init otherwise: the patch embedding draws the same numbers
    torch.testing.assert_close(model.patch_embed.proj.weight, standard.patch_embed.proj.weight)


def test_margins_compare_within_the_variant(tmp_path):
    cfg = _cfg(tmp_path)
    by_id = {r.id: r for r in cfg.all_runs}
    values = {"dino/vit-tiny-p8-imagenet": 0.25, "selfpatch/vit-tiny-p8-imagenet": 0.18}
    for s, (std, sp) in enumerate([(0.22, 0.15), (0.21, 0.16), (0.20, 0.14)]):
        values[f"random-init/vit-tiny-p8-seed{s}"] = std
        values[f"random-init/vit-tiny-p8.selfpatch-seed{s}"] = sp
    rows = [(by_id[k], {"macro_recall": v}) for k, v in values.items()]
    margins = {line[0]: line for line in baseline_margins(cfg, rows, ["macro_recall"])}
    assert margins["DINO"][2].startswith("+0.03 (best of 3 seeds 0.22)")
    # SelfPatch is measured against its own network (best 0.16), not the standard ViT's 0.22
    assert margins["SelfPatch"][1].endswith("SelfPatch variant")
    assert margins["SelfPatch"][2].startswith("+0.02 (best of 3 seeds 0.16)")
    assert display(by_id["random-init/vit-tiny-p8.loca-seed2"])[1] == "ViT-Tiny/8 (smoke), LOCA variant"
    # the report's summary cell: value (margin over its own network's best seed)
    sp = by_id["selfpatch/vit-tiny-p8-imagenet"]
    assert _summary_cell(cfg, rows, sp, {"macro_recall": 0.18}, "macro_recall") == "0.18 (+0.02)"
    assert _summary_cell(cfg, rows, sp, {"macro_recall": float("nan")}, "macro_recall") == "–"


def test_davis_margins_carry_paired_errors_and_flag_noise(tmp_path):
    cfg = _cfg(tmp_path)
    by_id = {r.id: r for r in cfg.all_runs}

    def davis(scores):  # per-object J = F = score
        return {"JF_mean": 100 * sum(scores) / len(scores),
                "per_object": {f"s_{i}": {"J-Mean": x, "F-Mean": x} for i, x in enumerate(scores)}}

    values = {"dino/vit-tiny-p8-imagenet": davis([0.5, 0.3, 0.6, 0.2]),      # vs seed 0: +10, -10, +10, -8
              "random-init/vit-tiny-p8-seed0": davis([0.4, 0.4, 0.5, 0.28]),  # the best seed, 39.5
              "random-init/vit-tiny-p8-seed1": davis([0.3, 0.3, 0.3, 0.3]),
              "random-init/vit-tiny-p8-seed2": davis([0.1, 0.1, 0.1, 0.1])}
    rows = [(by_id[k], v) for k, v in values.items()]
    line = {row[0]: row for row in baseline_margins(cfg, rows, ["JF_mean"], "davis2017")}["DINO"]
    # sample std of the paired differences is 11, over sqrt(4) objects: 5.5
    assert line[2] == "+0.50 ± 5.50 (best of 3 seeds 39.50; within 2 standard errors)"
    dino = by_id["dino/vit-tiny-p8-imagenet"]
    assert _summary_cell(cfg, rows, dino, values[dino.id], "JF_mean", "davis2017") == "40.00 (+0.50 ± 5.50)"


def test_variants_apply_to_their_architecture_family():
    # CLoVE's ResNet differs only in its initialisation (zero-init residual): same architecture, own baseline
    assert variant_of("clove", "resnet-tiny") == "clove" and variant_kwargs("clove") == {}
    assert variant_of("clove", "vit-s16") is None and variant_of("loca", "resnet50") is None
    assert variant_of("dino", "vit-s16") is None and variant_of("gtsa", "resnet50") is None
    with pytest.raises(KeyError, match="unknown architecture variant"):
        variant_kwargs("nope")


def test_loca_baseline_starts_where_loca_starts(tmp_path):
    """The LOCA random-init row is LOCA's step-0 backbone: flax-style init (zero qkv bias), not timm's default."""
    cfg = _cfg(tmp_path)
    model, meta = load_backbone(run_convert(cfg, "random-init/vit-tiny-p8.loca-seed0"))
    assert "weight_init" not in meta["arch_kwargs"]  # init values are not part of the rebuilt architecture
    settings = cfg.pretrain_settings(Run("loca", "vit-tiny-p8", "imagenet"))
    torch.manual_seed(0)
    step0 = get_method("loca")("vit-tiny-p8", settings["method"], epochs=1).student.backbone
    standard, _ = load_backbone(run_convert(cfg, "random-init/vit-tiny-p8-seed0"))
    # flax-style init: mlp biases N(0, 1e-6) (timm default: zeros), xavier-uniform qkv (std 0.0625 at D=128,
    # timm default: trunc-normal 0.02); the baseline matches LOCA's own step-0 network in both
    bias = model.blocks[0].mlp.fc1.bias
    assert 0 < bias.abs().max() < 1e-4 and step0.blocks[0].mlp.fc1.bias.abs().max() < 1e-4
    assert standard.blocks[0].mlp.fc1.bias.abs().max() == 0
    qkv_std = model.blocks[0].attn.qkv.weight.std()
    assert abs(qkv_std / step0.blocks[0].attn.qkv.weight.std() - 1) < 0.05
    assert qkv_std > 2.5 * standard.blocks[0].attn.qkv.weight.std()


@pytest.mark.parametrize("method", ["dino", "selfpatch", "loca", "gtsa", "clove"])
@pytest.mark.parametrize("seed", [0, 3])
def test_random_init_row_is_the_methods_step_zero_network(method, seed):
    """A margin measures what training changed only if the baseline is the very network training starts from:
    the pretrain stage seeds and builds the method; its step-0 export must equal the random-init row of that
    seed, every tensor (LOCA's positional embedding once differed: N(0, 0.02) vs N(0, 1/D))."""
    from densessl.stages.convert import random_init_backbone

    arch = "resnet-tiny" if method == "clove" else "vit-tiny-p8"
    settings = load_config(preset="smoke").pretrain_settings(Run(method, arch, "imagenet"))
    torch.manual_seed(seed)
    step0 = get_method(method)(arch, settings["method"], epochs=1).export_backbone().state_dict()
    baseline, _ = random_init_backbone(arch, variant_of(method, arch), seed)
    baseline_sd = baseline.state_dict()
    assert step0.keys() == baseline_sd.keys()
    for key, value in step0.items():
        torch.testing.assert_close(value, baseline_sd[key], rtol=0, atol=0, msg=f"{method} {key}")
