"""LOCA: location-aware self-supervised transformers (Caron et al., arXiv 2212.02400 v2).

Follows the official code google-research/scenic @ 4a38d47, ``scenic/projects/loca/``:
``trainer.py`` (``loca_train_step``: forward passes and losses), ``vit.py`` (``ViT4LOCA``, ``ProjectionHead``,
``CrossAttentionEncoderBlock``, ``token_indexes_not_to_drop``), ``utils.py`` (``sinkhorn``) and
``configs/loca_imnet1k_base16.py`` (every default below, unless noted).

One step (v2 objective, ``apply_cluster_loss=True``):
1. the EMA teacher encodes the whole reference view; its projection head gives cluster logits for every
   reference patch, sharpened (T 0.05) and balanced by Sinkhorn–Knopp; then 80 % of the teacher's reference
   tokens are dropped (a consecutive raster run of 20 % is kept) and the rest serve as keys/values;
2. the student encodes query0 (70 random tokens kept before the encoder) and the focal queries (all tokens);
   a cross-attention block lets each query patch look at the kept reference tokens and a linear layer
   predicts its position among all reference patches (cross-entropy, patches outside the reference ignored);
3. the student's projection head on the query tokens (before cross-attention) predicts, at T 0.1, the
   Sinkhorn assignment of the reference patch it lands on; plus me-max on the mean prediction.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.layers import lecun_normal_
from torch import nn

from densessl.errors import ConfigError
from densessl.methods.base import PretrainMethod, build_dataclass, register
from densessl.methods.loca_config import LOCAConfig
from densessl.methods.loca_views import POSITION_TARGETS, CropRecipe, LOCAViews
from densessl.models.backbones import backbone_info, create_backbone
from densessl.models.variants import ARCH_VARIANTS, INIT_KWARGS

# The LOCA ViT (vit.py ViT4LOCA): no CLS token, tanh GELU, final LayerNorm on every token (`encoder_norm`).
LOCA_ARCH_KWARGS: dict[str, Any] = ARCH_VARIANTS["loca"]

TOKEN_SELECTIONS = ("consecutive", "unstructured", "first")


# ------------------------------------------------------------------------------------------------- losses
def sinkhorn(probs: torch.Tensor, iterations: int) -> torch.Tensor:
    """``utils.sinkhorn``: divide by per-prototype sums (all-reduced over ranks), then renormalise rows to 1.

    Rows are patches, columns prototypes; after the last iteration each row is an assignment summing to 1
    and the column sums are pushed towards equal shares (N/K each).
    """
    x = probs.clone()
    for _ in range(iterations):
        per_prototype = x.sum(dim=0, keepdim=True)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(per_prototype)
        x = x / per_prototype
        x = x / x.sum(dim=1, keepdim=True)
    return x


def weighted_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """scenic ``model_utils.weighted_softmax_cross_entropy``: Σ w·CE / (Σ w + 1e-8).

    ``targets`` are class indices (position loss, one-hot in the official code) or distributions
    (cluster loss); ``weights`` are 1 for query patches inside the reference and 0 elsewhere.
    """
    log_probs = F.log_softmax(logits.float(), dim=-1)
    if targets.dtype in (torch.int64, torch.int32):
        ce = -log_probs.gather(-1, targets.clamp_min(0).long().unsqueeze(-1)).squeeze(-1)
    else:
        ce = -(targets.float() * log_probs).sum(-1)
    weights = weights.to(ce.dtype)
    return (ce * weights).sum() / (weights.sum() + 1e-8)


def me_max(mean_probs: torch.Tensor) -> torch.Tensor:
    """Σ p̄ log p̄ (negative entropy of the mean prediction): minimising it spreads patches over prototypes."""
    return (mean_probs * torch.log(mean_probs)).sum()


def _global_mean(x: torch.Tensor) -> torch.Tensor:
    """``jax.lax.pmean`` with gradient: the mean over ranks, differentiable through the all-reduce."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        import torch.distributed.nn.functional as dist_fn
        return dist_fn.all_reduce(x) / dist.get_world_size()
    return x


def keep_indices(n_tokens: int, keep: int, selection: str, batch: int | None = None,
                 device: torch.device | None = None) -> torch.Tensor:
    """``vit.token_indexes_not_to_drop``: which tokens survive; shape (keep,), or (batch, keep) per image.

    ``consecutive``: a raster run from a uniform offset in [0, n − keep]; ``first``: the first ``keep``;
    ``unstructured``: a uniform random subset. ``keep`` ≤ 0 or ≥ ``n_tokens`` keeps every token in order.
    """
    if selection not in TOKEN_SELECTIONS:
        raise ConfigError(f"token selection {selection!r}; allowed values: {list(TOKEN_SELECTIONS)}")
    rows = 1 if batch is None else batch
    if keep <= 0 or keep >= n_tokens:
        out = torch.arange(n_tokens).expand(rows, n_tokens)
    elif selection == "first":
        out = torch.arange(keep).expand(rows, keep)
    elif selection == "consecutive":
        offsets = torch.randint(0, n_tokens - keep + 1, (rows, 1))
        out = offsets + torch.arange(keep)
    else:
        out = torch.stack([torch.randperm(n_tokens)[:keep] for _ in range(rows)])
    out = out.to(device) if device is not None else out
    return out[0] if batch is None else out


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Take tokens ``index`` ((k,) shared, or (B, k) per image) along dim 1 of ``x`` (B, N, ...)."""
    if index.ndim == 1:
        return x.index_select(1, index)
    expand = index.reshape(*index.shape, *([1] * (x.ndim - 2))).expand(-1, -1, *x.shape[2:])
    return x.gather(1, expand)


def query_cluster_targets(assignments: torch.Tensor, query0_positions: torch.Tensor,
                          focal_positions: torch.Tensor) -> torch.Tensor:
    """Soft cluster target of every query patch, in the order of the concatenated student predictions.

    ``assignments`` (B, N, K): Sinkhorn rows of the reference patches; ``query0_positions`` (B, k) and
    ``focal_positions`` (n·B, Nf, query-major) hold reference positions or −1. Each query patch takes the row
    of the reference patch at its true position, among all N (also those hidden from cross-attention);
    −1 is read as position 0 and must be given weight 0 by the caller (trainer.py ``take_along_axis``).
    """
    b, _, k = assignments.shape
    n_focal = focal_positions.shape[0] // b
    q0 = gather_tokens(assignments, query0_positions.clamp_min(0))
    focal = gather_tokens(assignments.repeat(n_focal, 1, 1), focal_positions.clamp_min(0))  # jnp.tile
    return torch.cat([q0.reshape(-1, k), focal.reshape(-1, k)])


# ------------------------------------------------------------------------------------------------- modules
def _lecun_linear(layer: nn.Linear) -> nn.Linear:
    """flax ``nn.Dense`` default init: lecun-normal kernel (truncated), zero bias."""
    lecun_normal_(layer.weight)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


class ProjectionHead(nn.Module):
    """``vit.ProjectionHead``: Dense–GELU–Dense–GELU–Dense → L2 norm → weight-normalised prototypes (no bias).

    The prototype vectors are divided by their norm at every call (``WeightNormDense`` without a learned
    gain), so logits are cosine similarities in [−1, 1] before the temperatures.
    """

    def __init__(self, in_dim: int, hidden_dim: int, bottleneck_dim: int, output_dim: int, n_layers: int = 2):
        super().__init__()
        layers: list[nn.Module] = []
        dim = in_dim
        for _ in range(n_layers):
            layers += [_lecun_linear(nn.Linear(dim, hidden_dim)), nn.GELU(approximate="tanh")]  # flax nn.gelu
            dim = hidden_dim
        layers.append(_lecun_linear(nn.Linear(dim, bottleneck_dim)))
        self.mlp = nn.Sequential(*layers)
        self.prototypes = nn.Parameter(torch.empty(output_dim, bottleneck_dim))
        lecun_normal_(self.prototypes)  # norm_kernel_init_fn: lecun normal, then unit columns
        with torch.no_grad():
            self.prototypes.div_(self.prototypes.norm(dim=1, keepdim=True) + 1e-10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1)
        weight = self.prototypes / (self.prototypes.norm(dim=1, keepdim=True) + 1e-10)
        return F.linear(x, weight)


class CrossAttentionBlock(nn.Module):
    """``vit.CrossAttentionEncoderBlock``: pre-LN cross-attention (separate LNs on queries and keys/values),
    residual, then LN + MLP + residual. Xavier-uniform kernels, MLP biases N(0, 1e-6), as the flax block."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int):
        super().__init__()
        if dim % num_heads:
            raise ConfigError(f"embedding dim {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.norm_q = nn.LayerNorm(dim, eps=1e-6)
        self.norm_kv = nn.LayerNorm(dim, eps=1e-6)
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.norm_mlp = nn.LayerNorm(dim, eps=1e-6)
        self.fc1 = nn.Linear(dim, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, dim)
        for layer in (self.q, self.k, self.v, self.proj, self.fc1, self.fc2):
            nn.init.xavier_uniform_(layer.weight)
        for layer in (self.q, self.k, self.v, self.proj):
            nn.init.zeros_(layer.bias)
        for layer in (self.fc1, self.fc2):
            nn.init.normal_(layer.bias, std=1e-6)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        return x.reshape(b, n, self.num_heads, d // self.num_heads).transpose(1, 2)

    def forward(self, x: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        q_in, kv_in = self.norm_q(x), self.norm_kv(kv)
        attn = F.scaled_dot_product_attention(self._heads(self.q(q_in)), self._heads(self.k(kv_in)),
                                              self._heads(self.v(kv_in)))
        x = x + self.proj(attn.transpose(1, 2).reshape(x.shape))
        y = self.fc2(F.gelu(self.fc1(self.norm_mlp(x)), approximate="tanh"))
        return x + y


class LOCANetwork(nn.Module):
    """``ViT4LOCA``: backbone + clustering projection head + cross-attention position predictor.

    ``forward`` is the whole student computation of one step, so that DistributedDataParallel (which only
    wraps ``forward``) sees every student parameter used once.
    """

    def __init__(self, arch: str, cfg: LOCAConfig, drop_path_rate: float):
        super().__init__()
        # weight_init="jax": timm's flax-ViT init (xavier Linear, mlp biases N(0, 1e-6), lecun conv), as
        # scenic's Encoder1DBlock, and pos_embed_init="flax" (ToTokenSequence posembed_input N(0, 1/D)); only
        # the initial values differ from create_backbone's default.
        self.backbone = create_backbone(arch, drop_path_rate=drop_path_rate, **INIT_KWARGS["loca"], **LOCA_ARCH_KWARGS)
        info = backbone_info(self.backbone)
        dim = info.embed_dim
        self.patch_size = info.patch_size
        self.native_grid = tuple(self.backbone.patch_embed.grid_size)
        self.n_ref_positions = (cfg.reference_size // info.patch_size) ** 2  # config.n_ref_positions
        self.head = (ProjectionHead(dim, cfg.head_hidden_dim, cfg.head_bottleneck_dim, cfg.head_output_dim)
                     if cfg.apply_cluster_loss else None)
        mlp_dim = self.backbone.blocks[0].mlp.fc1.out_features
        self.cross_attention = CrossAttentionBlock(dim, info.num_heads, mlp_dim)
        self.final_norm = nn.LayerNorm(dim, eps=1e-6)
        self.position_predictor = _lecun_linear(nn.Linear(dim, self.n_ref_positions))

    def encode(self, images: torch.Tensor, keep: torch.Tensor | None = None, use_pe: bool = True) -> torch.Tensor:
        """Patch tokens after ``encoder_norm``; tokens not in ``keep`` are dropped after the PE, before the blocks.

        The learned PE is resized by the backbone's ``pos_resample`` rule (``'scenic'``: bilinear with
        antialiasing, as ``jax.image.resize`` in ``ToTokenSequence``) for other grids.
        """
        bb = self.backbone
        x = bb.patch_embed(images)  # (B, H, W, D): dynamic_img_size keeps the grid
        b, h, w, d = x.shape
        x = x.reshape(b, h * w, d)
        if use_pe:  # official use_pe=False ('pe_not_in_use') adds no PE at all
            x = x + bb.resampled_pos_embed(h, w)  # the backbone's rule: 'scenic' for LOCA's variant
        if keep is not None:
            x = gather_tokens(x, keep)
        x = bb.norm_pre(x)
        x = bb.blocks(x)
        return bb.norm(x)

    def predict_positions(self, queries: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        return self.position_predictor(self.final_norm(self.cross_attention(queries, kv)))

    def cluster_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.head is None:
            raise ConfigError("pretrain.loca.method.apply_cluster_loss is false: no projection head was built")
        return self.head(tokens)

    def forward(self, query0: torch.Tensor, focal: torch.Tensor | None, query0_keep: torch.Tensor | None,
                kv: torch.Tensor | None = None, reference: torch.Tensor | None = None,
                reference_keep: torch.Tensor | None = None, use_pe: bool = True) -> dict[str, torch.Tensor]:
        """Student pass of ``loca_train_step``; ``focal`` is (n·B, 3, s, s), query-major.

        With ``reference`` given (v1, ``drop_moment='early'``) the keys/values are the student's own reference
        tokens, dropped before the encoder; otherwise ``kv`` are the teacher's kept reference tokens.
        """
        if kv is None:
            if reference is None:
                raise ValueError("LOCANetwork.forward needs either kv or reference")
            kv = self.encode(reference, keep=reference_keep)
        b = query0.shape[0]
        out: dict[str, torch.Tensor] = {}
        q0 = self.encode(query0, keep=query0_keep, use_pe=use_pe)
        out["query0_positions"] = self.predict_positions(q0, kv)
        if self.head is not None:
            out["query0_clusters"] = self.head(q0)  # on encoder_norm tokens, before cross-attention
        if focal is not None and focal.shape[0] > 0:
            n = focal.shape[0] // b
            qf = self.encode(focal, use_pe=use_pe)
            out["focal_positions"] = self.predict_positions(qf, kv.repeat(n, 1, 1))  # jnp.tile(r, (n, 1, 1))
            if self.head is not None:
                out["focal_clusters"] = self.head(qf)
        return out


# ------------------------------------------------------------------------------------------------- method
@register
class LOCA(PretrainMethod):
    name = "loca"
    config_cls = LOCAConfig

    def __init__(self, arch: str, config: dict[str, Any] | LOCAConfig | None, epochs: int):
        super().__init__()
        cfg = config if isinstance(config, LOCAConfig) else build_dataclass(LOCAConfig, config, "method config (loca)")
        _validate(cfg)
        self.cfg = cfg
        self.arch = arch
        self.arch_kwargs = dict(LOCA_ARCH_KWARGS)  # exported backbone: LOCA ViT, no drop path
        self.student = LOCANetwork(arch, cfg, cfg.drop_path_rate)
        self.teacher = LOCANetwork(arch, cfg, cfg.drop_path_rate if cfg.teacher_drop_path else 0.0)
        self.teacher.load_state_dict(self.student.state_dict())  # trainer.py: ema_params = deepcopy(params)
        for p in self.teacher.parameters():
            p.requires_grad = False
        if cfg.reference_size % self.teacher.patch_size:
            raise ConfigError(f"pretrain.loca.method.reference_size={cfg.reference_size} is not a multiple of "
                              f"the patch size {self.teacher.patch_size} of {arch}")
        self.n_ref = self.teacher.n_ref_positions
        self.reference_keep = int(cfg.reference_keep_fraction * self.n_ref)  # int(0.2 · 196) = 39
        if self.reference_keep < 1:
            raise ConfigError(f"pretrain.loca.method.reference_keep_fraction={cfg.reference_keep_fraction} keeps "
                              f"no token of the {self.n_ref} reference patches; raise it")

    def views(self) -> LOCAViews:
        c = self.cfg
        ref_blur, q0_blur, focal_blur = c.blur_probs
        return LOCAViews(
            patch_size=self.teacher.patch_size,
            reference=CropRecipe(c.reference_size, c.reference_scale, 0.5 if c.reference_flip else 0.0, ref_blur),
            query0=CropRecipe(c.query_size, c.query_scale, c.flip_prob, q0_blur, c.solarize_prob),
            focal=CropRecipe(c.focal_size, c.focal_scale, c.flip_prob, focal_blur),
            num_focal=c.num_focal_queries,
            jitter=c.color_jitter, jitter_prob=c.color_jitter_prob, grayscale_prob=c.grayscale_prob,
            blur=c.blur, blur_sigma=c.blur_sigma, position_targets=c.position_targets,
        )

    def _keep(self, n_tokens: int, keep: int, selection: str, batch: int, device: torch.device) -> torch.Tensor:
        return keep_indices(n_tokens, keep, selection, batch if self.cfg.per_image_token_drop else None, device)

    def loss(self, batch: dict[str, Any], epoch: int) -> tuple[torch.Tensor, dict[str, Any]]:
        c = self.cfg
        reference, query0 = batch["reference"], batch["query0"]
        b, device = reference.shape[0], reference.device
        focal = batch["focal"]  # (B, n, 3, s, s) → query-major (n·B, ...), as utils.prepare_input concatenates
        n_focal = focal.shape[1]
        focal = focal.transpose(0, 1).reshape(n_focal * b, *focal.shape[2:]) if n_focal else None
        q0_targets = batch["query0_positions"].long()                                        # (B, Nq0)
        focal_targets = batch["focal_positions"].long()  # (B, n, Nf) → (n·B, Nf)
        focal_targets = focal_targets.transpose(0, 1).reshape(n_focal * b, focal_targets.shape[-1])
        ref_keep = self._keep(self.n_ref, self.reference_keep, c.reference_selection, b, device)
        q0_keep = self._keep(q0_targets.shape[1], c.query0_keep_tokens, c.query0_selection, b, device)

        if c.apply_cluster_loss:
            # Step 1: reference → EMA teacher, all tokens; drop_moment='late'
            with torch.no_grad():
                ref_tokens = self.teacher.encode(reference)
                teacher_logits = self.teacher.cluster_logits(ref_tokens).float()  # (B, N, K)
                kv = gather_tokens(ref_tokens, ref_keep)
                k = teacher_logits.shape[-1]
                assignments = sinkhorn(F.softmax(teacher_logits.reshape(-1, k) / c.teacher_temperature, dim=-1),
                                       c.sinkhorn_iterations).reshape(b, self.n_ref, k)
            out = self.student(query0, focal, q0_keep, kv=kv)
        else:
            # v1: reference → student with drop_moment='early'; queries without PE (trainer.py use_pe)
            out = self.student(query0, focal, q0_keep, reference=reference, reference_keep=ref_keep, use_pe=False)

        q0_targets = gather_tokens(q0_targets, q0_keep)  # targets of the kept query0 tokens
        targets = torch.cat([q0_targets.reshape(-1), focal_targets.reshape(-1)])
        logits = [out["query0_positions"].reshape(-1, self.n_ref)]
        if "focal_positions" in out:
            logits.append(out["focal_positions"].reshape(-1, self.n_ref))
        logits_all = torch.cat(logits)
        valid = targets != -1  # intersection of the query with the reference
        position_loss = weighted_cross_entropy(logits_all, targets, valid)
        with torch.no_grad():
            correct = (logits_all.argmax(-1) == targets) & valid
            accuracy = correct.sum() / valid.sum().clamp_min(1)
        # 0-dim tensors: the trainer reads logs back only at log steps (no host sync per step)
        logs = {"position_loss": position_loss.detach(), "position_accuracy": accuracy,
                "valid_fraction": valid.float().mean()}
        total = c.position_loss_weight * position_loss

        if c.apply_cluster_loss:
            k = assignments.shape[-1]
            soft_targets = query_cluster_targets(assignments, q0_targets, focal_targets)
            student_logits = [out["query0_clusters"].reshape(-1, k)]
            if "focal_clusters" in out:
                student_logits.append(out["focal_clusters"].reshape(-1, k))
            scaled = torch.cat(student_logits).float() / c.student_temperature
            cluster_loss = weighted_cross_entropy(scaled, soft_targets, valid)
            # me-max over all query patches, including those outside the reference (trainer.py), and ranks
            mean_probs = _global_mean(F.softmax(scaled, dim=-1).mean(0))
            reg = me_max(mean_probs)
            total = total + c.cluster_loss_weight * cluster_loss + c.me_max_weight * reg
            with torch.no_grad():
                # prototypes chosen at least once; a scatter, not unique(), whose output size needs a sync
                chosen = assignments.reshape(-1, k).argmax(-1)
                usage = torch.zeros(k, device=chosen.device).index_fill_(0, chosen, 1.0).sum()
            logs.update({"cluster_loss": cluster_loss.detach(), "me_max": reg.detach(),
                         "prediction_entropy": -reg.detach(), "teacher_prototypes_used": usage})
        return total, logs

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """EMA of the whole tree (backbone, cross-attention block, heads), trainer.py ``new_ema_params``."""
        for ps, pt in zip(self.student.parameters(), self.teacher.parameters()):
            pt.mul_(momentum).add_(ps.detach(), alpha=1 - momentum)

    def export_backbone(self) -> nn.Module:
        if self.cfg.export_weights not in ("teacher", "student"):
            raise ConfigError(f"pretrain.loca.method.export_weights: {self.cfg.export_weights!r}; "
                              f"allowed values: teacher, student")
        source = self.teacher if self.cfg.export_weights == "teacher" else self.student
        source = source.module if isinstance(source, nn.parallel.DistributedDataParallel) else source
        backbone = create_backbone(self.arch, **self.arch_kwargs)
        backbone.load_state_dict(copy.deepcopy(source.backbone.state_dict()))
        return backbone


def _validate(cfg: LOCAConfig) -> None:
    where = "pretrain.loca.method"
    for field in ("reference_selection", "query0_selection"):
        if getattr(cfg, field) not in TOKEN_SELECTIONS:
            raise ConfigError(f"{where}.{field}: {getattr(cfg, field)!r}; allowed values: {list(TOKEN_SELECTIONS)}")
    if not 0 < cfg.reference_keep_fraction <= 1:
        raise ConfigError(f"{where}.reference_keep_fraction={cfg.reference_keep_fraction}: must be in (0, 1] "
                          f"(the official value 0.2 masks 80 % of the reference)")
    for field in ("student_temperature", "teacher_temperature"):
        if getattr(cfg, field) <= 0:
            raise ConfigError(f"{where}.{field}={getattr(cfg, field)}: must be positive")
    if cfg.num_focal_queries < 0:
        raise ConfigError(f"{where}.num_focal_queries={cfg.num_focal_queries}: must be ≥ 0")
    if cfg.export_weights not in ("teacher", "student"):
        raise ConfigError(f"{where}.export_weights: {cfg.export_weights!r}; allowed values: teacher, student")
    if cfg.position_targets not in POSITION_TARGETS:
        raise ConfigError(f"{where}.position_targets: {cfg.position_targets!r}; allowed values: "
                          f"{', '.join(POSITION_TARGETS)} (official: the ops.py id-map chain)")
    if cfg.blur not in ("code", "intended"):
        raise ConfigError(f"{where}.blur: {cfg.blur!r}; allowed values: code (as shipped: no blur), intended")
