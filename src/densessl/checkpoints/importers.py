"""Import the official released checkpoints of DINO, SelfPatch, GTSA, CLoVE and LOCA into our backbones.

Each importer reads one official file layout (the checkpoint each official repository's training script
saves, or its released backbone file), maps its names to the timm
``VisionTransformer`` built by :func:`densessl.models.backbones.create_backbone` (or to torchvision's ResNet-50
for CLoVE), checks every key and shape, and returns the backbone in eval mode. Following timm's
``checkpoint_filter_fn`` pattern, an importer is a pure "foreign state dict -> our state dict" mapping plus
one strict load; nothing is loaded silently non-strict, because a silently missing block would look like a weak
method rather than a broken import.

Pickled ``.pth`` files are read only with ``torch.load(weights_only=True)`` under an explicit allow-list
(``argparse.Namespace``, which DINO/SelfPatch/GTSA/CLoVE training checkpoints store as ``args``/``opt``):
an official file never gets to run code. LOCA's flax msgpack files are decoded here with ``msgpack`` alone,
so importing them needs neither flax, jax nor TensorFlow.

Use :func:`import_checkpoint` (by format name) and :data:`IMPORTERS` (``arch_kwargs`` tells the export step
which ``create_backbone`` overrides rebuild the imported variant, e.g. LOCA's class-token-free tanh-GELU ViT).
"""

from __future__ import annotations

import argparse
import logging
import pickle
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import msgpack
import numpy as np
import torch
import torchvision
from torch import Tensor, nn

from densessl.checkpoints.msra import MSRA_ARCH_KWARGS, import_msra
from densessl.errors import CheckpointError, ConfigError
from densessl.models.backbones import create_backbone
from densessl.models.variants import ARCH_VARIANTS

log = logging.getLogger(__name__)

# Classes an official .pth may hold besides tensors and plain containers: the argparse options stored as
# `args` (DINO main_dino.py, SelfPatch main_selfpatch.py, GTSA main_pretrain.py) or `opt` (CLoVE main_pretrain.py).
PICKLE_ALLOWED_GLOBALS: tuple[type, ...] = (argparse.Namespace,)

# How many key names an error message lists before it says "... and N more".
_SHOW_KEYS = 12


# --------------------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class ImporterSpec:
    """One registered importer: the function and the backbone variant it builds."""

    name: str
    fn: Callable[..., nn.Module]
    # `create_backbone(arch, **arch_kwargs)` rebuilds the imported variant (store it in the export sidecar);
    # None for non-ViT targets (CLoVE's ResNet-50).
    arch_kwargs: Mapping[str, Any] | None
    description: str
    options: Mapping[str, str] = field(default_factory=dict)


IMPORTERS: dict[str, ImporterSpec] = {}


def register(name: str, arch_kwargs: Mapping[str, Any] | None, description: str,
             options: Mapping[str, str] | None = None) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in IMPORTERS:
            raise ValueError(f"importer {name!r} registered twice")
        IMPORTERS[name] = ImporterSpec(name, fn, None if arch_kwargs is None else dict(arch_kwargs), description,
                                       dict(options or {}))
        return fn
    return deco


def import_checkpoint(fmt: str, path: str | Path, arch: str, **options: Any) -> nn.Module:
    """Import the official checkpoint ``path`` of format ``fmt`` (see :data:`IMPORTERS`) as backbone ``arch``."""
    if fmt not in IMPORTERS:
        raise ConfigError(f"unknown checkpoint format {fmt!r}; choose one of {sorted(IMPORTERS)}")
    spec = IMPORTERS[fmt]
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        raise ConfigError(f"checkpoint format {fmt!r} has no option(s) {unknown}; "
                          f"its options are {dict(spec.options) or 'none'}")
    return spec.fn(path, arch, **options)


# ------------------------------------------------------------------------------------------ pickle loading


def load_torch_checkpoint(path: str | Path, extra_allowed: Iterable[type] = ()) -> Any:
    """``torch.load(weights_only=True)`` with :data:`PICKLE_ALLOWED_GLOBALS` (+ ``extra_allowed``) allowed.

    Any other class in the pickle is refused before it is constructed; the error names it so that a user who
    trusts the file can allow-list exactly that class rather than fall back to ``weights_only=False``.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found; download the official release or fix the path")
    allowed = [*PICKLE_ALLOWED_GLOBALS, *extra_allowed]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL\s+([\w.]+)", str(exc))
        if found is None:  # not a refused class: corrupt or not a pickle at all
            raise CheckpointError(f"{path}: cannot be read as a PyTorch checkpoint ({str(exc).strip()[-200:]}); "
                                  f"is it the right file and format?") from exc
        what = found.group(1)
        raise CheckpointError(
            f"{path}: refused to unpickle {what}: only tensors, plain containers and "
            f"{[f'{c.__module__}.{c.__qualname__}' for c in allowed]} are allowed (weights_only=True). If you trust "
            f"this file and {what} is plain data, pass it in `extra_allowed`; never load it with "
            f"weights_only=False") from exc
    except Exception as exc:  # noqa: BLE001 - torch raises KeyError/RuntimeError/EOFError on a non-torch file
        raise CheckpointError(f"{path}: cannot be read as a PyTorch checkpoint ({type(exc).__name__}: {exc}); "
                              f"is it the right file and format?") from exc


# ------------------------------------------------------------------------------------------ shared helpers


def _preview(keys: Iterable[str]) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:_SHOW_KEYS])
    return f"[{shown}{f', ... and {len(keys) - _SHOW_KEYS} more' if len(keys) > _SHOW_KEYS else ''}]"


def _strip(state: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """Keys starting with ``prefix``, with the prefix removed (others dropped)."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _strip_module(state: Mapping[str, Any]) -> dict[str, Any]:
    """Remove DistributedDataParallel's ``module.`` prefix where every key carries it."""
    if state and all(k.startswith("module.") for k in state):
        return _strip(state, "module.")
    return dict(state)


def _as_state_dict(obj: Any, path: Path, what: str) -> dict[str, Tensor]:
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{path}: {what} is not a non-empty state dict (found {type(obj).__name__})")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise CheckpointError(f"{path}: {what} holds entries that are not tensors: {_preview(map(str, bad))}")
    return dict(obj)


def _load_checked(model: nn.Module, state: Mapping[str, Tensor], path: Path, fmt: str, arch: str,
                  sources: Mapping[str, str] | None = None, hint: str = "") -> nn.Module:
    """Strictly load ``state`` into ``model``, reporting every missing, unexpected and mis-shaped key at once.

    ``sources`` maps our key -> the key in the official file, so that errors name what the user can look up.
    """
    expected = model.state_dict()
    src = dict(sources or {})
    missing = [src.get(k, k) for k in expected if k not in state]
    unexpected = [src.get(k, k) for k in state if k not in expected]
    shapes = [f"{src.get(k, k)}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
              for k, v in state.items() if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {_preview(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_preview(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches {_preview(shapes)}")
        raise CheckpointError(
            f"{path}: {fmt} checkpoint does not fit backbone {arch!r}: " + "; ".join(parts)
            + f". Check that --arch matches the checkpoint (e.g. a ViT-B/16 file needs vit-b16) and that the format "
              f"is {fmt!r}{'; ' + hint if hint else ''}")
    model.load_state_dict(state, strict=True)
    return model.eval()


def _layout_hint(state: Mapping[str, Tensor], with_cls: bool) -> str:
    """Point at the likely mix-up between DINO-layout (CLS token) and SelfPatch-layout (no CLS) files."""
    has_cls = "cls_token" in state
    if has_cls and not with_cls:
        return "the file has a cls_token, so it is probably a DINO/GTSA-layout file (formats 'dino' or 'gtsa')"
    if not has_cls and with_cls and "pos_embed" in state:
        return "the file has no cls_token, so it is probably a SelfPatch-layout file (format 'selfpatch')"
    return ""


def _vit_backbone_from_pth(path: Path, ckpt: Any, checkpoint_key: str, head_prefixes: tuple[str, ...]
                           ) -> dict[str, Tensor]:
    """DINO-style extraction, after ``utils.load_pretrained_weights`` in facebookresearch/dino utils.py.

    A training checkpoint holds ``student`` (DDP: ``module.backbone.*``, ``module.head.*``) and ``teacher``
    (``backbone.*``, ``head.*``) dicts; a released backbone-only file is the bare backbone state dict. Unlike
    DINO's loader (which strips the prefixes and then loads with strict=False), keys outside ``backbone.`` are
    dropped by name and everything else must load strictly.
    """
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(f"{path}: expected a dict, found {type(ckpt).__name__}")
    if checkpoint_key in ckpt:
        state = _as_state_dict(ckpt[checkpoint_key], path, f"entry {checkpoint_key!r}")
    elif all(isinstance(v, Tensor) for v in ckpt.values()):
        state = _as_state_dict(ckpt, path, "the backbone-only file")  # released backbone-only weights
    else:
        raise CheckpointError(f"{path}: no {checkpoint_key!r} entry and not a backbone state dict; top-level keys "
                              f"{_preview(map(str, ckpt))} (choose another checkpoint_key?)")
    state = _strip_module(state)
    if any(k.startswith("backbone.") for k in state):
        dropped = [k for k in state if not k.startswith("backbone.")]
        state = _strip(state, "backbone.")
    else:
        dropped = [k for k in state if k.startswith(head_prefixes)]
        state = {k: v for k, v in state.items() if not k.startswith(head_prefixes)}
    if dropped:
        log.info("%s: dropped %d head keys %s", path, len(dropped), _preview(dropped))
    return state


# --------------------------------------------------------------------------------------------- ViT importers

# DINO's vision_transformer.py uses timm's own names (cls_token, pos_embed with the CLS slot first,
# patch_embed.proj, blocks.i.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}, norm) and the same fused qkv
# layout reshape(B, N, 3, H, Dh) (facebookresearch/dino @ 7c446df vision_transformer.py; hubconf.py loads the
# released files strictly into vit_small), so names map one to one. The strict check in _load_checked is what
# guards that claim for every file.


@register("dino", arch_kwargs={}, description="DINO .pth: training checkpoint (teacher/student) or released backbone",
          options={"checkpoint_key": "'teacher' (default, what the paper reports) or 'student'"})
def import_dino(path: str | Path, arch: str, *, checkpoint_key: str = "teacher") -> nn.Module:
    """DINO (facebookresearch/dino) ViT: ``ckpt[checkpoint_key]`` or a released backbone-only file."""
    path = Path(path)
    state = _vit_backbone_from_pth(path, load_torch_checkpoint(path), checkpoint_key, ("head.",))
    return _load_checked(create_backbone(arch), state, path, "dino", arch, hint=_layout_hint(state, with_cls=True))


# SelfPatch's backbone (alinlab/SelfPatch selfpatch_vision_transformer.py, VisionTransformer) has no CLS token,
# pos_embed (1, N, D) and no final norm: the CLS token and the norm live in the SelfPatchHead (`ca_head`).
SELFPATCH_ARCH_KWARGS: dict[str, Any] = ARCH_VARIANTS["selfpatch"]


@register("selfpatch", arch_kwargs=SELFPATCH_ARCH_KWARGS,
          description="SelfPatch .pth: training checkpoint (teacher/student); backbone without CLS token or final norm",
          options={"checkpoint_key": "'teacher' (default) or 'student'"})
def import_selfpatch(path: str | Path, arch: str, *, checkpoint_key: str = "teacher") -> nn.Module:
    """SelfPatch (alinlab/SelfPatch) ViT; heads ``ca_head``/``c_head``/``p_head`` are dropped."""
    path = Path(path)
    state = _vit_backbone_from_pth(path, load_torch_checkpoint(path), checkpoint_key,
                                   ("head.", "ca_head.", "c_head.", "p_head."))
    return _load_checked(create_backbone(arch, **SELFPATCH_ARCH_KWARGS), state, path, "selfpatch", arch,
                         hint=_layout_hint(state, with_cls=False))


# GTSA (bok3948/GTSA model_pretrain/gtsa.py) names its encoders after MoCo v3: `base_encoder` (online, trained
# by gradient) and `momentum_encoder` (EMA). Which one the authors exported is undocumented
# (bok3948/GTSA @ c0dfe2b ships no export script); the default follows MoCo v3's main_lincls.py, which keeps
# `base_encoder`.
_GTSA_PREFIX = {"student": "base_encoder.", "teacher": "momentum_encoder."}


@register("gtsa", arch_kwargs={},
          description="GTSA .pth: checkpoint-<ep>.pth (`model` with base_/momentum_encoder) or backbone-only file",
          options={"encoder": "'student' = base_encoder (default, as MoCo v3) or 'teacher' = momentum_encoder"})
def import_gtsa(path: str | Path, arch: str, *, encoder: Literal["student", "teacher"] = "student") -> nn.Module:
    """GTSA ViT (DINO-style, with CLS token and final norm) from a training or backbone-only checkpoint."""
    path = Path(path)
    if encoder not in _GTSA_PREFIX:
        raise ConfigError(f"GTSA option encoder={encoder!r}; choose 'student' (base_encoder) or 'teacher'")
    ckpt = load_torch_checkpoint(path)
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(f"{path}: expected a dict, found {type(ckpt).__name__}")
    if "model" in ckpt:  # main_pretrain.py / util/misc.py save_model: {model, optimizer, epoch, scaler, args}
        state = _strip_module(_as_state_dict(ckpt["model"], path, "entry 'model'"))
        prefix = _GTSA_PREFIX[encoder]
        if not any(k.startswith(prefix) for k in state):
            raise CheckpointError(f"{path}: entry 'model' has no {prefix!r} keys (GTSA encoder={encoder!r}); "
                                  f"its prefixes are {sorted({k.split('.')[0] for k in state})}")
        state = _strip(state, prefix)
    else:  # backbone-only timm-style file (e.g. CoCo_GTSA_99ep.pth used by the downstream configs)
        state = _strip_module(_as_state_dict(ckpt, path, "the backbone-only file"))
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
    return _load_checked(create_backbone(arch), state, path, "gtsa", arch, hint=_layout_hint(state, with_cls=True))


# ------------------------------------------------------------------------------------------ CLoVE (ResNet-50)

_CLOVE_PREFIX = {"student": "encoder.", "teacher": "encoder_k."}
RESNET_ARCHS = ("resnet50",)


def clove_target_resnet50() -> nn.Module:
    """torchvision ResNet-50 without the classifier: CLoVE trains no ``fc``, so it is replaced by Identity and
    the module returns 2048-d pooled features (layers up to ``layer4`` keep torchvision's names)."""
    model = torchvision.models.resnet50(weights=None)
    model.fc = nn.Identity()
    return model


@register("clove", arch_kwargs=None,
          description="CLoVE .pth: {opt (Namespace), model (DDP: module.encoder.*), ...} -> torchvision resnet50",
          options={"encoder": "'student' = module.encoder (default, as convert_pretrain_to_d2.py) or "
                              "'teacher' = module.encoder_k"})
def import_clove(path: str | Path, arch: str = "resnet50", *,
                 encoder: Literal["student", "teacher"] = "student") -> nn.Module:
    """CLoVE ResNet-50 (sthalles/CLoVE @ d706573 ``transfer/detection/convert_pretrain_to_d2.py``): keep
    ``module.encoder.``, strip it, torchvision names."""
    path = Path(path)
    if arch not in RESNET_ARCHS:
        raise ConfigError(f"CLoVE checkpoints hold a ResNet-50; arch must be one of {list(RESNET_ARCHS)}, "
                          f"got {arch!r}")
    if encoder not in _CLOVE_PREFIX:
        raise ConfigError(f"CLoVE option encoder={encoder!r}; choose 'student' (module.encoder) or 'teacher'")
    ckpt = load_torch_checkpoint(path)
    if not isinstance(ckpt, Mapping) or "model" not in ckpt:
        keys = list(ckpt) if isinstance(ckpt, Mapping) else type(ckpt).__name__
        raise CheckpointError(f"{path}: a CLoVE checkpoint is a dict with a 'model' entry; found {keys}")
    state = _strip_module(_as_state_dict(ckpt["model"], path, "entry 'model'"))
    prefix = _CLOVE_PREFIX[encoder]
    if not any(k.startswith(prefix) for k in state):
        raise CheckpointError(f"{path}: entry 'model' has no {('module.' + prefix)!r} keys; its prefixes are "
                              f"{sorted({k.split('.')[0] for k in state})}")
    state = _strip(state, prefix)  # projector(_k), self_attn and the other encoder are dropped
    return _load_checked(clove_target_resnet50(), state, path, "clove", arch)


# -------------------------------------------------------------------------------------- flax msgpack (LOCA)

# flax/serialization.py (_MsgpackExtType): an ndarray leaf is msgpack ExtType 1 whose payload is itself
# msgpack of (shape, dtype name, C-order bytes); 2 is a complex scalar (real, imag); 3 a numpy scalar stored
# like an ndarray. Arrays over 2**30 bytes are split into {'__msgpack_chunked_array__': True, 'shape': {...},
# 'chunks': {'0': flat part, ...}} (flax _chunk/_unchunk).
_EXT_NDARRAY, _EXT_COMPLEX, _EXT_NPSCALAR = 1, 2, 3
_CHUNKED = "__msgpack_chunked_array__"


def _decode_ndarray(payload: bytes) -> np.ndarray:
    shape, dtype_name, buffer = msgpack.unpackb(payload, raw=True)
    name = dtype_name.decode() if isinstance(dtype_name, bytes) else str(dtype_name)
    if name == "bfloat16":  # not a numpy dtype: bfloat16 is the upper half of a float32
        bits = np.frombuffer(buffer, dtype=np.uint16).astype(np.uint32) << 16
        return bits.view(np.float32).reshape(shape)
    dtype = np.dtype(name)
    if dtype.hasobject:
        raise ValueError(f"object dtype {name!r} is not a flax array")
    return np.frombuffer(buffer, dtype=dtype).reshape(shape)


def _flax_ext_hook(code: int, payload: bytes) -> Any:
    if code == _EXT_NDARRAY:
        return _decode_ndarray(payload)
    if code == _EXT_NPSCALAR:
        return _decode_ndarray(payload)[()]
    if code == _EXT_COMPLEX:
        real, imag = msgpack.unpackb(payload)
        return complex(real, imag)
    return msgpack.ExtType(code, payload)


def _unchunk(tree: Any) -> Any:
    if isinstance(tree, dict):
        if tree.get(_CHUNKED) is True:
            shape = tuple(tree["shape"][str(i)] for i in range(len(tree["shape"])))
            chunks = [tree["chunks"][str(i)] for i in range(len(tree["chunks"]))]
            return np.concatenate(chunks).reshape(shape)
        return {k: _unchunk(v) for k, v in tree.items()}
    return tree


def read_flax_msgpack(path: str | Path) -> dict[str, Any]:
    """Read a legacy flax checkpoint (``flax.training.checkpoints``, msgpack) into nested dicts of numpy arrays,
    without importing flax: the same result as ``restore_checkpoint(path, target=None)``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found; download the official release or fix the path")
    try:
        tree = msgpack.unpackb(path.read_bytes(), ext_hook=_flax_ext_hook, raw=False, strict_map_key=False)
        tree = _unchunk(tree)
    except Exception as exc:  # noqa: BLE001 - msgpack/numpy raise many types on a foreign file
        raise CheckpointError(f"{path}: cannot be read as a flax msgpack checkpoint ({type(exc).__name__}: {exc}); "
                              f"LOCA releases are legacy flax msgpack files, not Orbax directories") from exc
    if not isinstance(tree, dict):
        raise CheckpointError(f"{path}: flax checkpoint top level is {type(tree).__name__}, expected a dict")
    return tree


def flatten_tree(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> {'a/b/c': leaf}, the flax path notation used in errors (as flax's traversals write it)."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten_tree(v, key + "/"))
        else:
            out[key] = v
    return out


@dataclass(frozen=True)
class _FlaxRule:
    """One timm tensor made from flax leaves ``sources`` (each with its expected shape) by ``combine``."""

    target: str
    sources: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    combine: Callable[[list[Tensor]], Tensor]


def _same(ts: list[Tensor]) -> Tensor:
    return ts[0]


def _dense_kernel(ts: list[Tensor]) -> Tensor:
    return ts[0].t()  # flax Dense kernel (in, out) -> torch Linear weight (out, in)


def _loca_rules(model: nn.Module) -> list[_FlaxRule]:
    """Flax ViT4LOCA (google-research/scenic @ 4a38d47 projects/loca/vit.py + baselines
    vit.Encoder1DBlock) -> timm, the same transforms as timm's ``_load_weights`` for Google flax ViTs."""
    d = int(model.embed_dim)
    heads = int(model.blocks[0].attn.num_heads)
    dh = d // heads
    p = int(model.patch_embed.patch_size[0])
    gh, gw = (int(g) for g in model.patch_embed.grid_size)
    hidden = int(model.blocks[0].mlp.fc1.out_features)

    def conv_hwio(ts: list[Tensor]) -> Tensor:
        return ts[0].permute(3, 2, 0, 1)  # nn.Conv kernel (kh, kw, in, out) -> (out, in, kh, kw)

    def posemb(ts: list[Tensor]) -> Tensor:
        return ts[0].reshape(1, gh * gw, d)  # (1, gh, gw, D) row-major == timm's flatten(2) of (B, D, gh, gw)

    def qkv_weight(ts: list[Tensor]) -> Tensor:
        # each (D, H, Dh) -> (D, H*Dh) heads-major, transposed; stacked q;k;v as timm's reshape(B,N,3,H,Dh)
        return torch.cat([t.reshape(d, d).t() for t in ts], dim=0)

    def qkv_bias(ts: list[Tensor]) -> Tensor:
        return torch.cat([t.reshape(d) for t in ts], dim=0)

    def out_weight(ts: list[Tensor]) -> Tensor:
        return ts[0].reshape(d, d).t()  # (H, Dh, D) -> (H*Dh, D) -> (D, H*Dh)

    tok = "ToTokenSequence_0"
    rules = [
        _FlaxRule("patch_embed.proj.weight", (f"{tok}/embedding/kernel",), ((p, p, 3, d),), conv_hwio),
        _FlaxRule("patch_embed.proj.bias", (f"{tok}/embedding/bias",), ((d,),), _same),
        _FlaxRule("pos_embed", (f"{tok}/posembed_input",), ((1, gh, gw, d),), posemb),
    ]
    for i in range(len(model.blocks)):
        b, att, mlp = f"encoderblock_{i}", f"encoderblock_{i}/MultiHeadDotProductAttention_0", \
            f"encoderblock_{i}/MlpBlock_0"
        rules += [
            _FlaxRule(f"blocks.{i}.norm1.weight", (f"{b}/LayerNorm_0/scale",), ((d,),), _same),
            _FlaxRule(f"blocks.{i}.norm1.bias", (f"{b}/LayerNorm_0/bias",), ((d,),), _same),
            _FlaxRule(f"blocks.{i}.attn.qkv.weight", tuple(f"{att}/{n}/kernel" for n in ("query", "key", "value")),
                      ((d, heads, dh),) * 3, qkv_weight),
            _FlaxRule(f"blocks.{i}.attn.qkv.bias", tuple(f"{att}/{n}/bias" for n in ("query", "key", "value")),
                      ((heads, dh),) * 3, qkv_bias),
            _FlaxRule(f"blocks.{i}.attn.proj.weight", (f"{att}/out/kernel",), ((heads, dh, d),), out_weight),
            _FlaxRule(f"blocks.{i}.attn.proj.bias", (f"{att}/out/bias",), ((d,),), _same),
            _FlaxRule(f"blocks.{i}.norm2.weight", (f"{b}/LayerNorm_1/scale",), ((d,),), _same),
            _FlaxRule(f"blocks.{i}.norm2.bias", (f"{b}/LayerNorm_1/bias",), ((d,),), _same),
            _FlaxRule(f"blocks.{i}.mlp.fc1.weight", (f"{mlp}/Dense_0/kernel",), ((d, hidden),), _dense_kernel),
            _FlaxRule(f"blocks.{i}.mlp.fc1.bias", (f"{mlp}/Dense_0/bias",), ((hidden,),), _same),
            _FlaxRule(f"blocks.{i}.mlp.fc2.weight", (f"{mlp}/Dense_1/kernel",), ((hidden, d),), _dense_kernel),
            _FlaxRule(f"blocks.{i}.mlp.fc2.bias", (f"{mlp}/Dense_1/bias",), ((d,),), _same),
        ]
    rules += [
        _FlaxRule("norm.weight", ("encoder_norm/scale",), ((d,),), _same),
        _FlaxRule("norm.bias", ("encoder_norm/bias",), ((d,),), _same),
    ]
    return rules


# Top-level subtrees of ViT4LOCA that form the backbone; every other subtree (projection head, named
# `output_projection` in the released files, cross_attention_block, final_norm, position_predictor) is a head.
_LOCA_BACKBONE = re.compile(r"^(ToTokenSequence_0|encoderblock_\d+|encoder_norm)$")

# LOCA's ViT: no CLS token, tanh GELU (flax nn.gelu default), final LayerNorm on every token
# (scenic projects/loca/vit.py ViT4LOCA `encoder_norm`; create_backbone keeps `norm` for class_token=False).
LOCA_ARCH_KWARGS: dict[str, Any] = ARCH_VARIANTS["loca"]


@register("loca", arch_kwargs=LOCA_ARCH_KWARGS,
          description="LOCA flax msgpack (scenic loca_*): `teacher_weights` tree -> timm ViT without CLS, tanh GELU",
          options={"weights_key": "'teacher_weights' (default, released files) or e.g. 'ema_params'/'params' "
                                  "(open-source TrainState)"})
def import_loca(path: str | Path, arch: str, *, weights_key: str = "teacher_weights") -> nn.Module:
    """LOCA (google-research/scenic projects/loca) released checkpoint, decoded without flax."""
    path = Path(path)
    tree = read_flax_msgpack(path)
    if weights_key not in tree:
        raise CheckpointError(f"{path}: no {weights_key!r} in the flax checkpoint; top-level keys "
                              f"{_preview(map(str, tree))} (choose weights_key)")
    root = tree[weights_key]
    if isinstance(root, Mapping) and "encoder_norm" not in root and isinstance(root.get("params"), Mapping):
        root = root["params"]  # a {'params': ...} variables collection
    if not isinstance(root, Mapping) or not any(_LOCA_BACKBONE.match(str(k)) for k in root):
        keys = list(root) if isinstance(root, Mapping) else type(root).__name__
        raise CheckpointError(f"{path}: {weights_key!r} holds no LOCA ViT (ToTokenSequence_0, encoderblock_i, "
                              f"encoder_norm); found {keys}")
    heads = sorted(str(k) for k in root if not _LOCA_BACKBONE.match(str(k)))
    if heads:
        log.info("%s: dropped head subtrees %s", path, heads)
    flat = flatten_tree({k: v for k, v in root.items() if _LOCA_BACKBONE.match(str(k))})

    model = create_backbone(arch, **LOCA_ARCH_KWARGS)
    rules = _loca_rules(model)
    missing, shapes, used = [], [], set()
    state: dict[str, Tensor] = {}
    sources: dict[str, str] = {}
    for rule in rules:
        arrays = []
        for src, shape in zip(rule.sources, rule.shapes):
            used.add(src)
            if src not in flat:
                missing.append(src)
            elif not isinstance(flat[src], np.ndarray) or tuple(flat[src].shape) != shape:
                found = tuple(flat[src].shape) if isinstance(flat[src], np.ndarray) else type(flat[src]).__name__
                shapes.append(f"{src}: file {found} vs expected {shape}")
            else:
                arrays.append(torch.from_numpy(np.array(flat[src], dtype=np.float32)))
        if len(arrays) == len(rule.sources):
            state[rule.target] = rule.combine(arrays).contiguous()
            sources[rule.target] = "+".join(rule.sources)
    unexpected = sorted(set(flat) - used)
    if missing or shapes or unexpected:
        parts = [f"{name} {_preview(keys)}" for name, keys in
                 (("missing flax leaves", missing), ("unexpected flax leaves", unexpected),
                  ("shape mismatches", shapes)) if keys]
        raise CheckpointError(f"{path}: loca checkpoint does not fit backbone {arch!r}: " + "; ".join(parts)
                              + ". Check that --arch matches the checkpoint (loca_vsmall -> vit-s16, loca_vbase -> "
                                "vit-b16, loca_vlarge -> vit-l16, loca_vhuge -> vit-h16)")
    return _load_checked(model, state, path, "loca", arch, sources=sources)


# ------------------------------------------------------------------------------------ generic state dicts

# Compared methods that publish a plain ResNet-50 or ViT (PixPro, DetCo, SlotCon, DenseCL, MoCo v2, ...) differ
# only in where the backbone sits inside the file: which entry holds the state dict and which key prefix the
# backbone carries (e.g. PixPro's `model` / `module.encoder.`, MoCo v2's `state_dict` / `module.encoder_q.`).
GENERIC_LAYOUTS = ("timm_vit", "torchvision_resnet")


@register("state_dict", arch_kwargs={},
          description="any .pth holding a standard timm ViT or torchvision ResNet-50: an entry, a key prefix, a layout",
          options={"layout": f"one of {list(GENERIC_LAYOUTS)} (required)",
                   "checkpoint_key": "the entry holding the state dict, e.g. 'model' or 'state_dict' (absent: the "
                                     "file is the state dict)",
                   "prefix": "keep only keys with this prefix and strip it, e.g. 'module.encoder.' ('' keeps all)",
                   "drop": "key prefixes (after stripping) to leave out, e.g. ['fc.'] for a classifier"})
def import_state_dict(path: str | Path, arch: str, *, layout: str | None = None, checkpoint_key: str | None = None,
                      prefix: str = "", drop: Iterable[str] = ()) -> nn.Module:
    """A standard backbone from any state dict: ``ckpt[checkpoint_key]``, keys under ``prefix`` (stripped),
    ``drop`` removed, then one strict load into ``create_backbone(arch)`` or torchvision's ResNet-50."""
    path = Path(path)
    if layout not in GENERIC_LAYOUTS:
        raise ConfigError(f"state_dict option layout={layout!r}; set options.layout to one of {list(GENERIC_LAYOUTS)}")
    if layout == "torchvision_resnet" and arch not in RESNET_ARCHS:
        raise ConfigError(f"state_dict layout 'torchvision_resnet' builds a ResNet-50; arch must be one of "
                          f"{list(RESNET_ARCHS)}, got {arch!r}")
    ckpt = load_torch_checkpoint(path)
    if checkpoint_key is not None:
        if not isinstance(ckpt, Mapping) or checkpoint_key not in ckpt:
            keys = list(ckpt) if isinstance(ckpt, Mapping) else type(ckpt).__name__
            raise CheckpointError(f"{path}: no entry {checkpoint_key!r}; top-level keys {_preview(map(str, keys))} "
                                  f"(set options.checkpoint_key)")
        ckpt = ckpt[checkpoint_key]
    state = _as_state_dict(ckpt, path, f"entry {checkpoint_key!r}" if checkpoint_key else "the file")
    if prefix:
        kept = _strip(state, prefix)
        if not kept:
            raise CheckpointError(f"{path}: no key starts with prefix {prefix!r}; key prefixes in the file: "
                                  f"{sorted({k.split('.')[0] + '.' for k in state})} (set options.prefix)")
        state = kept
    drop = tuple(drop)
    if drop:
        state = {k: v for k, v in state.items() if not k.startswith(drop)}
    model = clove_target_resnet50() if layout == "torchvision_resnet" else create_backbone(arch)
    return _load_checked(model, state, path, "state_dict", arch,
                         hint="check options.checkpoint_key, prefix and drop against the file's keys")


# ---------------------------------------------------------------------------- MSRA caffe2 ResNet-50 (.pkl)


@register("detectron2_msra", arch_kwargs=MSRA_ARCH_KWARGS,
          description="detectron2 ImageNetPretrained/MSRA/R-50.pkl (caffe2 names, stride in 1x1, frozen-affine BN, "
                      "BGR 0-255 input) -> caffe-style torchvision resnet50 for RGB mean/std input (checkpoints/msra.py)")
def import_detectron2_msra(path: str | Path, arch: str = "resnet50") -> nn.Module:
    """MSRA's supervised ImageNet ResNet-50, the "Supervised" initialisation of the MoCo/PixPro detection tables."""
    return import_msra(path, arch)
