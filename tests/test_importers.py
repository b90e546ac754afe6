"""Official-checkpoint importers: each test writes a file in the official key layout and shapes (built by hand
here, independently of the importer's mapping), imports it, and compares the imported backbone's features with
a reference forward pass that follows the official model code on the official tensors directly
(DINO/SelfPatch/GTSA vision_transformer.py semantics; flax ViT4LOCA semantics with einsums on flax kernels)."""

from __future__ import annotations

import argparse
import math
import os
import pickle

import msgpack
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision

from densessl.checkpoints.importers import (
    IMPORTERS,
    import_checkpoint,
    import_clove,
    import_dino,
    import_gtsa,
    import_loca,
    import_selfpatch,
    load_torch_checkpoint,
    read_flax_msgpack,
)
from densessl.checkpoints.io import load_backbone, save_backbone
from densessl.errors import CheckpointError, ConfigError

# vit-tiny-p8 (backbones.VIT_ARCHS): 64 px, patch 8 -> 8x8 grid, D 128, depth 4, 4 heads, MLP 512
ARCH, D, DEPTH, HEADS, P, GRID, HIDDEN = "vit-tiny-p8", 128, 4, 4, 8, 8, 512
DH = D // HEADS
ATOL = 2e-5  # timm uses fused scaled_dot_product_attention; the references use an explicit softmax


def _rand(gen: torch.Generator, shape: tuple[int, ...], kind: str) -> torch.Tensor:
    x = torch.randn(shape, generator=gen)
    return {"scale": 1.0 + 0.2 * x, "bias": 0.1 * x, "weight": 0.06 * x, "embed": 0.2 * x}[kind]


def official_vit_state(seed: int, cls: bool = True, final_norm: bool = True) -> dict[str, torch.Tensor]:
    """DINO vision_transformer.py names and shapes (SelfPatch: cls=False, final_norm=False), random values."""
    g = torch.Generator().manual_seed(seed)
    n = GRID * GRID + (1 if cls else 0)
    sd = {}
    if cls:
        sd["cls_token"] = _rand(g, (1, 1, D), "embed")
    sd["pos_embed"] = _rand(g, (1, n, D), "embed")
    sd["patch_embed.proj.weight"] = _rand(g, (D, 3, P, P), "weight")
    sd["patch_embed.proj.bias"] = _rand(g, (D,), "bias")
    for i in range(DEPTH):
        b = f"blocks.{i}."
        for name in ("norm1", "norm2"):
            sd[b + name + ".weight"], sd[b + name + ".bias"] = _rand(g, (D,), "scale"), _rand(g, (D,), "bias")
        for name, (o, i_) in (("attn.qkv", (3 * D, D)), ("attn.proj", (D, D)), ("mlp.fc1", (HIDDEN, D)),
                              ("mlp.fc2", (D, HIDDEN))):
            sd[b + name + ".weight"], sd[b + name + ".bias"] = _rand(g, (o, i_), "weight"), _rand(g, (o,), "bias")
    if final_norm:
        sd["norm.weight"], sd["norm.bias"] = _rand(g, (D,), "scale"), _rand(g, (D,), "bias")
    return sd


def official_vit_forward(sd: dict[str, torch.Tensor], x: torch.Tensor, cls: bool = True,
                         final_norm: bool = True, gelu: str = "none") -> torch.Tensor:
    """prepare_tokens -> blocks -> norm, as DINO's VisionTransformer (all tokens returned)."""
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=P).flatten(2).transpose(1, 2)
    if cls:
        t = torch.cat([sd["cls_token"].expand(x.shape[0], -1, -1), t], dim=1)
    t = t + sd["pos_embed"]
    b, n, _ = t.shape
    for i in range(DEPTH):
        p = f"blocks.{i}."
        h = F.layer_norm(t, (D,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], eps=1e-6)
        qkv = F.linear(h, sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"]).reshape(b, n, 3, HEADS, DH)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * DH ** -0.5).softmax(-1)
        y = (attn @ v).transpose(1, 2).reshape(b, n, D)
        t = t + F.linear(y, sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
        h = F.layer_norm(t, (D,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], eps=1e-6)
        h = F.gelu(F.linear(h, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"]), approximate=gelu)
        t = t + F.linear(h, sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
    if final_norm:
        t = F.layer_norm(t, (D,), sd["norm.weight"], sd["norm.bias"], eps=1e-6)
    return t


def _image(seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 3, GRID * P, GRID * P, generator=torch.Generator().manual_seed(seed))


def _features(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.forward_features(x)


def _head(seed: int, prefix: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"{prefix}mlp.0.weight": torch.randn(32, D, generator=g), f"{prefix}mlp.0.bias": torch.randn(32, generator=g),
            f"{prefix}last_layer.weight_g": torch.ones(64, 1), f"{prefix}last_layer.weight_v": torch.randn(64, 32)}


def _args() -> argparse.Namespace:
    return argparse.Namespace(arch="vit_small", patch_size=16, lr=0.0005, out_dim=65536, use_fp16=True,
                              data_path="/data/imagenet/train", local_crops_scale=(0.05, 0.4), seed=0)


def _dino_training_ckpt(teacher: dict, student: dict) -> dict:
    """main_dino.py save_dict: student DDP-wrapped MultiCropWrapper, teacher not wrapped."""
    return {
        "student": {**{f"module.backbone.{k}": v for k, v in student.items()}, **_head(1, "module.head.")},
        "teacher": {**{f"backbone.{k}": v for k, v in teacher.items()}, **_head(2, "head.")},
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.0, "weight_decay": 0.04, "params": [0, 1]}]},
        "epoch": 100, "args": _args(), "dino_loss": {"center": torch.zeros(1, 64)}, "fp16_scaler": None,
    }


# ------------------------------------------------------------------------------------------------ DINO


def test_dino_training_checkpoint_teacher_and_student(tmp_path):
    teacher, student = official_vit_state(1), official_vit_state(2)
    path = tmp_path / "checkpoint.pth"
    torch.save(_dino_training_ckpt(teacher, student), path)
    x = _image()
    t_model = import_dino(path, ARCH)
    torch.testing.assert_close(_features(t_model, x), official_vit_forward(teacher, x), atol=ATOL, rtol=1e-5)
    s_model = import_checkpoint("dino", path, ARCH, checkpoint_key="student")
    torch.testing.assert_close(_features(s_model, x), official_vit_forward(student, x), atol=ATOL, rtol=1e-5)
    # the two really differ, so picking the wrong dict would fail the comparisons above
    assert (_features(s_model, x) - _features(t_model, x)).abs().max() > 0.1


def test_dino_released_backbone_only_file(tmp_path):
    sd = official_vit_state(3)
    path = tmp_path / "dino_deitsmall16_pretrain.pth"
    torch.save(sd, path)
    x = _image(1)
    torch.testing.assert_close(_features(import_dino(path, ARCH), x), official_vit_forward(sd, x),
                               atol=ATOL, rtol=1e-5)


def test_dino_missing_and_wrong_shape_keys_are_named(tmp_path):
    sd = official_vit_state(4)
    del sd["blocks.2.mlp.fc1.bias"]
    sd["blocks.1.attn.qkv.weight"] = sd["blocks.1.attn.qkv.weight"][:, :64]
    path = tmp_path / "broken.pth"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in sd.items()}}, path)
    with pytest.raises(CheckpointError) as err:
        import_dino(path, ARCH)
    msg = str(err.value)
    assert str(path) in msg
    assert "missing keys [blocks.2.mlp.fc1.bias]" in msg
    assert "blocks.1.attn.qkv.weight: file (384, 64) vs model (384, 128)" in msg


def test_dino_wrong_arch_is_reported(tmp_path):
    path = tmp_path / "dino.pth"
    torch.save(official_vit_state(5), path)
    with pytest.raises(CheckpointError, match=r"does not fit backbone 'vit-s16'.*patch_embed.proj.weight: file "
                                              r"\(128, 3, 8, 8\) vs model \(384, 3, 16, 16\)"):
        import_dino(path, "vit-s16")


def test_dino_unknown_checkpoint_key(tmp_path):
    path = tmp_path / "checkpoint.pth"
    torch.save(_dino_training_ckpt(official_vit_state(1), official_vit_state(2)), path)
    with pytest.raises(CheckpointError, match=r"no 'ema' entry.*\[student, teacher, optimizer"):
        import_dino(path, ARCH, checkpoint_key="ema")


# ------------------------------------------------------------------------------------------- SelfPatch


def test_selfpatch_training_checkpoint(tmp_path):
    teacher = official_vit_state(6, cls=False, final_norm=False)
    g = torch.Generator().manual_seed(0)
    ca_head = {"ca_head.cls_token": torch.randn(1, 1, D, generator=g), "ca_head.norm.weight": torch.ones(D),
               "ca_head.cls_blocks.0.attn.q.weight": torch.randn(D, D, generator=g)}
    ckpt = {
        "student": {f"module.backbone.{k}": v for k, v in official_vit_state(7, False, False).items()},
        "teacher": {**{f"backbone.{k}": v for k, v in teacher.items()}, **ca_head, **_head(3, "c_head."),
                    **_head(4, "p_head.")},
        "optimizer": {}, "epoch": 200, "args": _args(),
        "dino_loss": {"center": torch.zeros(1, 1, 64), "patch_center": torch.zeros(1, 32)}, "fp16_scaler": None,
    }
    path = tmp_path / "selfpatch.pth"
    torch.save(ckpt, path)
    model = import_selfpatch(path, ARCH)
    x = _image(2)
    torch.testing.assert_close(_features(model, x), official_vit_forward(teacher, x, cls=False, final_norm=False),
                               atol=ATOL, rtol=1e-5)
    assert model.num_prefix_tokens == 0


def test_dino_file_into_selfpatch_gives_layout_hint(tmp_path):
    path = tmp_path / "dino.pth"
    torch.save(official_vit_state(8), path)
    with pytest.raises(CheckpointError) as err:
        import_selfpatch(path, ARCH)
    msg = str(err.value)
    assert "unexpected keys [cls_token, norm.weight, norm.bias]" in msg
    assert "pos_embed: file (1, 65, 128) vs model (1, 64, 128)" in msg
    assert "probably a DINO/GTSA-layout file" in msg


# ------------------------------------------------------------------------------------------------ GTSA


def test_gtsa_training_checkpoint_student_and_teacher(tmp_path):
    base, momentum = official_vit_state(9), official_vit_state(10)
    g = torch.Generator().manual_seed(1)
    model_sd = {
        **{f"base_encoder.{k}": v for k, v in base.items()},
        **{f"momentum_encoder.{k}": v for k, v in momentum.items()},
        "base_projector.blocks.0.0.weight": torch.randn(D, D, 3, 3, generator=g),
        "momentum_projector.proj.weight": torch.randn(768, D, 1, 1, generator=g),
        "base_predictor.proj.bias": torch.zeros(768),
        "rot_predictor.0.weight": torch.randn(768, 384, generator=g),
    }
    path = tmp_path / "checkpoint-99.pth"
    torch.save({"model": model_sd, "optimizer": {}, "epoch": 99, "scaler": {"scale": 65536.0}, "args": _args()},
               path)
    x = _image(3)
    torch.testing.assert_close(_features(import_gtsa(path, ARCH), x), official_vit_forward(base, x),
                               atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(_features(import_gtsa(path, ARCH, encoder="teacher"), x),
                               official_vit_forward(momentum, x), atol=ATOL, rtol=1e-5)


def test_gtsa_backbone_only_file_and_missing_key(tmp_path):
    sd = official_vit_state(11)
    path = tmp_path / "CoCo_GTSA_99ep.pth"
    torch.save(sd, path)
    x = _image(4)
    torch.testing.assert_close(_features(import_gtsa(path, ARCH), x), official_vit_forward(sd, x),
                               atol=ATOL, rtol=1e-5)
    del sd["norm.bias"]
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match=r"CoCo_GTSA_99ep.pth: gtsa checkpoint .* missing keys \[norm.bias\]"):
        import_gtsa(path, ARCH)


# ----------------------------------------------------------------------------------------------- CLoVE


def _random_resnet50_state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = torchvision.models.resnet50(weights=None).state_dict()
    out = {}
    for k, v in sd.items():
        if k.startswith("fc."):
            continue  # CLoVE's encoder has no classifier
        if k.endswith("num_batches_tracked"):
            out[k] = torch.tensor(1000)
        elif k.endswith("running_var"):
            out[k] = 0.5 + torch.rand(v.shape, generator=g)
        elif k.endswith(("running_mean", "bias")):
            out[k] = 0.1 * torch.randn(v.shape, generator=g)
        elif v.ndim == 1:  # BN weight
            out[k] = 1.0 + 0.1 * torch.randn(v.shape, generator=g)
        else:  # conv: He-like scale keeps activations finite through 50 layers
            out[k] = torch.randn(v.shape, generator=g) * math.sqrt(1.0 / v[0].numel())
    return out


def _clove_ckpt(encoder: dict[str, torch.Tensor]) -> dict:
    """contrast main_pretrain.py save: dict(opt=Namespace, model=DDP state_dict, optimizer, scaler, epoch)."""
    model = {f"module.encoder.{k}": v for k, v in encoder.items()}
    model.update({f"module.encoder_k.{k}": v.clone() + 1 for k, v in list(encoder.items())[:5]})
    model.update({"module.projector.linear1.weight": torch.zeros(4096, 2048, 1, 1),
                  "module.projector.bn2.running_mean": torch.zeros(256),
                  "module.self_attn.in_proj_weight": torch.zeros(768, 256),
                  "module.self_attn.out_proj.bias": torch.zeros(256)})
    opt = argparse.Namespace(arch="resnet50", model="CLoVE", clove_momentum=0.99, clove_pos_ratio=0.7,
                             base_lr=1.0, epochs=200, output_dir="./output", crop=0.2, aug="BYOL")
    return {"opt": opt, "model": model, "optimizer": {"state": {}, "param_groups": []},
            "scaler": {"scale": 1024.0, "growth_factor": 2.0}, "epoch": 200}


def test_clove_checkpoint_with_namespace_imports_exactly(tmp_path):
    encoder = _random_resnet50_state(0)
    path = tmp_path / "ckpt_epoch_200.pth"
    torch.save(_clove_ckpt(encoder), path)
    # the Namespace really is in the pickle: plain weights_only loading (no allow-list) refuses it
    with pytest.raises(pickle.UnpicklingError, match="argparse.Namespace"):
        torch.load(path, weights_only=True)
    assert load_torch_checkpoint(path)["opt"].clove_pos_ratio == 0.7

    model = import_clove(path, "resnet50")
    reference = torchvision.models.resnet50(weights=None)
    reference.fc = torch.nn.Identity()
    reference.load_state_dict(encoder)
    reference.eval()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out, ref = model(x), reference(x)
    assert out.shape == (1, 2048) and ref.abs().max() > 0
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert not model.training


def test_clove_wrong_shape_and_arch(tmp_path):
    encoder = _random_resnet50_state(1)
    encoder["layer2.0.conv1.weight"] = encoder["layer2.0.conv1.weight"][:64]
    path = tmp_path / "clove.pth"
    torch.save(_clove_ckpt(encoder), path)
    with pytest.raises(CheckpointError, match=r"clove.pth: clove checkpoint .*layer2.0.conv1.weight: "
                                              r"file \(64, 256, 1, 1\) vs model \(128, 256, 1, 1\)"):
        import_clove(path, "resnet50")
    with pytest.raises(ConfigError, match="arch must be one of"):
        import_clove(path, "vit-s16")


class _Payload:
    """A pickle that would create a directory when unpickled without restrictions."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (os.mkdir, (self.target,))


def test_disallowed_class_is_refused_without_running(tmp_path):
    live = tmp_path / "live"
    pickle.loads(pickle.dumps(_Payload(str(live))))  # the payload is real: plain unpickling runs it
    assert live.is_dir()

    marker = tmp_path / "marker"
    path = tmp_path / "evil.pth"
    torch.save({"opt": _Payload(str(marker)), "model": {"module.encoder.conv1.weight": torch.zeros(1)}}, path)
    with pytest.raises(CheckpointError, match=r"evil.pth: refused to unpickle posix.mkdir"):
        import_clove(path, "resnet50")
    assert not marker.exists()

    class_only = tmp_path / "class.pth"
    torch.save({"opt": _Opaque(), "model": {}}, class_only)
    with pytest.raises(CheckpointError, match=r"refused to unpickle [\w.]*_Opaque"):
        import_checkpoint("dino", class_only, ARCH)


class _Opaque:
    pass


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "junk.pth"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pth: cannot be read as a PyTorch checkpoint"):
        import_dino(path, ARCH)
    path.write_bytes(b"hello world")  # a different torch failure (KeyError in the legacy reader)
    with pytest.raises(CheckpointError, match="junk.pth: cannot be read as a PyTorch checkpoint"):
        import_clove(path, "resnet50")
    with pytest.raises(CheckpointError, match="cannot be read as a flax msgpack checkpoint"):
        import_loca(path, ARCH)
    with pytest.raises(CheckpointError, match="not found"):
        import_gtsa(tmp_path / "absent.pth", ARCH)


# ------------------------------------------------------------------------------------------------ LOCA


def _flax_pack(obj):
    """flax serialization._msgpack_ext_pack: ndarray -> ExtType(1, msgpack((shape, dtype, bytes)))."""
    if isinstance(obj, np.ndarray):
        return msgpack.ExtType(1, msgpack.packb((obj.shape, obj.dtype.name, obj.tobytes("C")), use_bin_type=True))
    if isinstance(obj, np.generic):
        arr = np.asarray(obj)
        return msgpack.ExtType(3, msgpack.packb((arr.shape, arr.dtype.name, arr.tobytes("C")), use_bin_type=True))
    raise TypeError(type(obj))


def _bf16_leaf(values: np.ndarray) -> tuple[msgpack.ExtType, np.ndarray]:
    """A flax 'bfloat16' leaf and the float32 values it stands for."""
    t = torch.from_numpy(values).to(torch.bfloat16)
    bits = t.view(torch.int16).numpy().tobytes()
    return msgpack.ExtType(1, msgpack.packb((list(values.shape), "bfloat16", bits), use_bin_type=True)), \
        t.float().numpy()


def loca_tree(seed: int) -> dict:
    """ViT4LOCA parameter tree (scenic projects/loca/vit.py): flax layouts HWIO / (D,H,Dh) / (in,out)."""
    rng = np.random.default_rng(seed)

    def r(*shape, kind="weight"):
        x = rng.standard_normal(shape).astype(np.float32)
        return {"scale": 1 + 0.2 * x, "bias": 0.1 * x, "weight": 0.06 * x, "embed": 0.2 * x}[kind]

    tree = {"ToTokenSequence_0": {"embedding": {"kernel": r(P, P, 3, D), "bias": r(D, kind="bias")},
                                  "posembed_input": r(1, GRID, GRID, D, kind="embed")}}
    for i in range(DEPTH):
        attn = {n: {"kernel": r(D, HEADS, DH), "bias": r(HEADS, DH, kind="bias")} for n in ("query", "key", "value")}
        attn["out"] = {"kernel": r(HEADS, DH, D), "bias": r(D, kind="bias")}
        tree[f"encoderblock_{i}"] = {
            "LayerNorm_0": {"scale": r(D, kind="scale"), "bias": r(D, kind="bias")},
            "MultiHeadDotProductAttention_0": attn,
            "LayerNorm_1": {"scale": r(D, kind="scale"), "bias": r(D, kind="bias")},
            "MlpBlock_0": {"Dense_0": {"kernel": r(D, HIDDEN), "bias": r(HIDDEN, kind="bias")},
                           "Dense_1": {"kernel": r(HIDDEN, D), "bias": r(D, kind="bias")}},
        }
    tree["encoder_norm"] = {"scale": r(D, kind="scale"), "bias": r(D, kind="bias")}
    return tree


def loca_heads() -> dict:
    """Head subtrees as named in the released files (google-research/scenic#1104, #1106) plus the position head."""
    z = np.zeros
    return {"output_projection": {"Dense_0": {"kernel": z((D, 32), np.float32), "bias": z(32, np.float32)},
                                  "prototypes": {"kernel": z((32, 64), np.float32)}},
            "cross_attention_block": {"LayerNorm_0": {"scale": z(D, np.float32), "bias": z(D, np.float32)}},
            "final_norm": {"scale": z(D, np.float32), "bias": z(D, np.float32)},
            "position_predictor": {"kernel": z((D, GRID * GRID), np.float32), "bias": z(GRID * GRID, np.float32)}}


def flax_vit_forward(tree: dict, x_nhwc: np.ndarray, posemb: np.ndarray | None = None) -> torch.Tensor:
    """ViT4LOCA encoder on flax tensors: nn.Conv (NHWC), learned PE, Encoder1DBlock (MHDPA einsums,
    tanh GELU = flax nn.gelu default), encoder_norm (flax LayerNorm eps 1e-6). ``posemb`` (1, h, w, D)
    replaces ``posembed_input`` for inputs of another grid."""
    def t(a):
        return torch.from_numpy(np.asarray(a, dtype=np.float32))

    def ln(v, p):
        mu = v.mean(-1, keepdim=True)
        var = ((v - mu) ** 2).mean(-1, keepdim=True)
        return (v - mu) / torch.sqrt(var + 1e-6) * t(p["scale"]) + t(p["bias"])

    x = t(x_nhwc)
    b = x.shape[0]
    tok = tree["ToTokenSequence_0"]
    gh, gw = x.shape[1] // P, x.shape[2] // P
    patches = x.reshape(b, gh, P, gw, P, 3)
    h = torch.einsum("bipjqc,pqcd->bijd", patches, t(tok["embedding"]["kernel"])) + t(tok["embedding"]["bias"])
    h = (h + t(tok["posembed_input"] if posemb is None else posemb)).reshape(b, gh * gw, D)
    for i in range(DEPTH):
        blk = tree[f"encoderblock_{i}"]
        a = blk["MultiHeadDotProductAttention_0"]
        y = ln(h, blk["LayerNorm_0"])
        q, k, v = (torch.einsum("bnd,dhk->bnhk", y, t(a[n]["kernel"])) + t(a[n]["bias"])
                   for n in ("query", "key", "value"))
        w = torch.einsum("bqhk,bshk->bhqs", q / math.sqrt(DH), k).softmax(-1)
        o = torch.einsum("bhqs,bshk->bqhk", w, v)
        h = h + torch.einsum("bqhk,hkd->bqd", o, t(a["out"]["kernel"])) + t(a["out"]["bias"])
        y = ln(h, blk["LayerNorm_1"])
        mlp = blk["MlpBlock_0"]
        y = F.gelu(y @ t(mlp["Dense_0"]["kernel"]) + t(mlp["Dense_0"]["bias"]), approximate="tanh")
        h = h + y @ t(mlp["Dense_1"]["kernel"]) + t(mlp["Dense_1"]["bias"])
    return ln(h, tree["encoder_norm"])


def _write_loca(path, teacher: dict, extra: dict | None = None) -> None:
    ckpt = {"teacher_weights": {**teacher, **loca_heads()},
            "params": {"encoder_norm": {"scale": np.zeros(D, np.float32)}},
            "global_step": np.int64(125100), **(extra or {})}
    path.write_bytes(msgpack.packb(ckpt, default=_flax_pack, strict_types=True))


def test_loca_msgpack_imports_with_flax_semantics(tmp_path):
    tree = loca_tree(0)
    # one leaf stored chunked the way flax splits huge arrays, to exercise the unchunking path
    pe = tree["ToTokenSequence_0"]["posembed_input"]
    flat = pe.reshape(-1)
    chunked = {"__msgpack_chunked_array__": True, "shape": {str(i): s for i, s in enumerate(pe.shape)},
               "chunks": {"0": flat[:1000], "1": flat[1000:5000], "2": flat[5000:]}}
    stored = {**tree, "ToTokenSequence_0": {**tree["ToTokenSequence_0"], "posembed_input": chunked}}
    path = tmp_path / "loca_vtiny"
    _write_loca(path, stored)

    model = import_loca(path, ARCH)
    assert model.num_prefix_tokens == 0 and model.blocks[0].mlp.act.approximate == "tanh"
    x_nhwc = np.random.default_rng(1).standard_normal((2, GRID * P, GRID * P, 3)).astype(np.float32)
    ours = _features(model, torch.from_numpy(x_nhwc).permute(0, 3, 1, 2).contiguous())
    torch.testing.assert_close(ours, flax_vit_forward(tree, x_nhwc), atol=ATOL, rtol=1e-5)


def test_flax_reader_decodes_bfloat16_and_scalars(tmp_path):
    values = np.array([[1.0, -2.5, 3.14159], [1e-3, 65504.0, -0.1]], dtype=np.float32)
    leaf, expected = _bf16_leaf(values)
    path = tmp_path / "small"
    path.write_bytes(msgpack.packb({"a": {"w": leaf}, "step": np.int32(7), "i": np.arange(3, dtype=np.int16)},
                                   default=_flax_pack, strict_types=True))
    tree = read_flax_msgpack(path)
    np.testing.assert_array_equal(tree["a"]["w"], expected)
    assert tree["a"]["w"].dtype == np.float32 and tree["a"]["w"][0, 2] != values[0, 2]  # bf16-rounded
    assert tree["step"] == 7 and tree["i"].tolist() == [0, 1, 2]


def test_loca_missing_and_wrong_shape_leaves_are_named(tmp_path):
    tree = loca_tree(1)
    del tree["encoderblock_3"]["LayerNorm_1"]["bias"]
    attn = tree["encoderblock_0"]["MultiHeadDotProductAttention_0"]
    attn["key"]["kernel"] = attn["key"]["kernel"].reshape(D, HEADS * 2, DH // 2)
    tree["encoderblock_4"] = tree["encoderblock_0"]  # one block too many for depth 4
    path = tmp_path / "loca_bad"
    _write_loca(path, tree)
    with pytest.raises(CheckpointError) as err:
        import_loca(path, ARCH)
    msg = str(err.value)
    assert str(path) in msg
    assert "missing flax leaves [encoderblock_3/LayerNorm_1/bias]" in msg
    assert "encoderblock_0/MultiHeadDotProductAttention_0/key/kernel: file (128, 8, 16) vs expected (128, 4, 32)" \
        in msg
    assert "unexpected flax leaves [encoderblock_4/" in msg


def test_loca_wrong_weights_key(tmp_path):
    path = tmp_path / "loca"
    _write_loca(path, loca_tree(2))
    with pytest.raises(CheckpointError, match=r"no 'ema_params'.*\[teacher_weights, params, global_step\]"):
        import_checkpoint("loca", path, ARCH, weights_key="ema_params")
    with pytest.raises(CheckpointError, match=r"'global_step' holds no LOCA ViT"):
        import_loca(path, ARCH, weights_key="global_step")


# ------------------------------------------------------------------------------------------- registry


def test_registry_and_generic_entry(tmp_path):
    assert set(IMPORTERS) == {"dino", "selfpatch", "gtsa", "clove", "loca", "state_dict", "detectron2_msra"}
    with pytest.raises(ConfigError, match=r"unknown checkpoint format 'moco'.*\['clove', 'detectron2_msra', 'dino'"):
        import_checkpoint("moco", tmp_path / "x.pth", ARCH)
    with pytest.raises(ConfigError, match="has no option"):
        import_checkpoint("dino", tmp_path / "x.pth", ARCH, encoder="teacher")


@pytest.mark.parametrize("fmt", ["selfpatch", "loca"])
def test_imported_variant_roundtrips_through_export(tmp_path, fmt):
    """arch_kwargs in the registry rebuild the imported variant when the exported backbone is loaded."""
    if fmt == "loca":
        src = tmp_path / "loca"
        _write_loca(src, loca_tree(3))
    else:
        src = tmp_path / "selfpatch.pth"
        torch.save({"teacher": {f"backbone.{k}": v for k, v in official_vit_state(12, False, False).items()}}, src)
    model = import_checkpoint(fmt, src, ARCH)
    out = tmp_path / "backbone.safetensors"
    save_backbone(out, model, ARCH, dict(IMPORTERS[fmt].arch_kwargs), {"source": fmt})
    loaded, _ = load_backbone(out)
    x = _image(6)
    torch.testing.assert_close(_features(loaded.eval(), x), _features(model, x), rtol=0, atol=0)


# ------------------------------------------------------------------------------- non-square inputs


def test_imported_dino_tokens_at_a_non_square_size(tmp_path):
    """A DINO-layout file at 48×64 px (6×8 grid, native 8×8): the tokens equal DINO's forward with the
    positional embedding resampled by an independent implementation of interpolate_pos_encoding."""
    from test_pos_embed import dino_reference

    sd = official_vit_state(5)
    path = tmp_path / "dino.pth"
    torch.save(sd, path)
    x = torch.randn(2, 3, 6 * P, 8 * P, generator=torch.Generator().manual_seed(3))
    grid = dino_reference(sd["pos_embed"][0, 1:].reshape(GRID, GRID, D).double().numpy(), 6, 8)
    pos = torch.cat([sd["pos_embed"][:, :1], torch.from_numpy(grid).float().reshape(1, 48, D)], dim=1)
    expected = official_vit_forward({**sd, "pos_embed": pos}, x)
    model = import_dino(path, ARCH)
    torch.testing.assert_close(_features(model, x), expected, atol=ATOL, rtol=1e-5)
    model.pos_resample = "timm"  # timm's exact-size antialiased bicubic differs visibly
    assert (_features(model, x) - expected).abs().max() > 1e-3


def test_imported_loca_tokens_at_a_non_square_size(tmp_path):
    """A LOCA msgpack at 40×56 px (5×7 grid, native 8×8): tokens equal the flax forward with
    jax.image.resize(posemb, (1, 5, 7, D), 'bilinear') computed independently (antialiased triangle)."""
    from test_pos_embed import scenic_reference

    tree = loca_tree(4)
    path = tmp_path / "loca_vtiny"
    _write_loca(path, tree)
    x_nhwc = np.random.default_rng(2).standard_normal((2, 5 * P, 7 * P, 3)).astype(np.float32)
    posemb = scenic_reference(tree["ToTokenSequence_0"]["posembed_input"][0].astype(np.float64), 5, 7)[None]
    model = import_loca(path, ARCH)
    assert model.pos_resample == "scenic"
    ours = _features(model, torch.from_numpy(x_nhwc).permute(0, 3, 1, 2).contiguous())
    torch.testing.assert_close(ours, flax_vit_forward(tree, x_nhwc, posemb), atol=ATOL, rtol=1e-5)


def test_state_dict_importer_takes_an_entry_a_prefix_and_a_layout(tmp_path):
    """A compared method's release (here MoCo-v2 style: `state_dict` / `module.encoder_q.` + a classifier `fc`)
    imports through the generic format with its entry, prefix and drop options, strictly."""
    from densessl.models.backbones import create_backbone

    torch.manual_seed(0)
    reference = create_backbone("vit-tiny-p8").eval()
    state = {f"module.encoder_q.{k}": v.clone() for k, v in reference.state_dict().items()}
    state["module.encoder_q.fc.weight"] = torch.zeros(10, 128)
    state["module.encoder_k.cls_token"] = torch.zeros(1, 1, 128)  # the other encoder: not under the prefix
    path = tmp_path / "release.pth"
    torch.save({"state_dict": state, "epoch": 200}, path)
    options = {"layout": "timm_vit", "checkpoint_key": "state_dict", "prefix": "module.encoder_q."}
    model = import_checkpoint("state_dict", path, "vit-tiny-p8", **options, drop=["fc."])
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.forward_features(x), reference.forward_features(x))
    with pytest.raises(CheckpointError, match=r"unexpected keys \[fc.weight\]"):
        import_checkpoint("state_dict", path, "vit-tiny-p8", **options)
    with pytest.raises(CheckpointError, match="no key starts with prefix 'module.encoder.'"):
        import_checkpoint("state_dict", path, "vit-tiny-p8", **{**options, "prefix": "module.encoder."})
    with pytest.raises(ConfigError, match="set options.layout"):
        import_checkpoint("state_dict", path, "vit-tiny-p8", checkpoint_key="state_dict")
    with pytest.raises(ConfigError, match="builds a ResNet-50"):
        import_checkpoint("state_dict", path, "vit-tiny-p8", layout="torchvision_resnet")
