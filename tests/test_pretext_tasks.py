"""Each method learns its own pretext task on constructed data whose answer is known.

Why: at smoke scale on the synthetic scenes the methods' margins over random init are small, which cannot
tell "the implementation cannot learn its task" from "the data gives little to learn". Here the data makes
the task solvable — colours that encode each pixel's position (red = x, green = y, as tests/test_loca.py),
or a few distinct image classes — and a short run of the shared trainer must solve it well above chance.
Each test trains the smoke ViT (or ResNet) for a few dozen steps on one CPU thread.
"""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import default_collate

from densessl.methods.clove import CLoVE, oriented_boxes, positive_mask
from densessl.methods.dino import DINO
from densessl.methods.gtsa import GTSA
from densessl.methods.selfpatch import SelfPatch, neighbour_candidates
from densessl.train.trainer import TrainConfig, Trainer


def position_images(n: int, size: int = 48, seed: int = 0) -> list[Image.Image]:
    """Red = x, green = y (0..255 across the image), blue a per-image constant, plus mild noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    images = []
    for _ in range(n):
        pixels = np.stack([xx * 255, yy * 255, np.full_like(xx, rng.uniform(0, 255))], -1)
        pixels = pixels + rng.normal(0, 4, (size, size, 3))
        images.append(Image.fromarray(np.clip(pixels, 0, 255).astype("uint8")))
    return images


def train(method, images, tmp_path, epochs: int, batch: int, lr: float, **overrides) -> list[dict]:
    torch.manual_seed(0)
    cfg = TrainConfig(epochs=epochs, batch_size_per_gpu=batch, lr=lr, warmup_epochs=1, num_workers=0,
                      tensorboard=False, log_every_steps=1, checkpoint_every_steps=10**6, precision="fp32",
                      **overrides)
    Trainer(method, images, cfg, tmp_path, device="cpu").fit()
    return [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]


def batch_of(method, images: list[Image.Image], seed: int = 1) -> dict:
    torch.manual_seed(seed)
    views = method.views()
    return default_collate([views(im) for im in images])


@pytest.fixture(autouse=True)
def _one_thread_seeded():
    """One thread, and the initial weights (drawn when the method is built) fixed."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    random.seed(0)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------ GTSA
GTSA_TINY = dict(global_size=48, local_size=24, local_crops_number=2, projector_dim=32, out_dim=32, predictor_dim=32,
                 rot_hidden_dim=32, rot_bottleneck_dim=16, roi_out_size=(4, 2), num_matches=(18, 4),
                 drop_path_rate=0.0, pc_warmup_epochs=0, color_jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0)


def test_gtsa_learns_rotation_and_correspondence(tmp_path):
    """Position colours make both GTSA tasks solvable: which quarter turn a crop had (the colour gradient's
    direction; chance 1/4) and what the other view shows at the same place. The rotation accuracy of the last
    steps must be well above chance, and the crop loss — −cos between the student's predictor map and the
    teacher's projector map on corresponding RoI cells, −1 for perfect agreement — must fall from about 0
    to below −0.5, and the patch-correspondence loss must improve without the teacher collapsing (measured:
    rotation accuracy 0.81, crop loss 0.03 → −0.59, pc loss −0.33 → −0.72, teacher spread 0.142 → 0.147).
    Not shown at this scale: that
    a cell is much more similar to its own counterpart than to other cells of the overlap (0.60 of cell
    pairs ranked right after training, 0.56 at initialisation, chance 0.5), so it is not asserted."""
    method = GTSA("vit-tiny-p8", GTSA_TINY, epochs=6)
    logs = train(method, position_images(96), tmp_path, epochs=6, batch=16, lr=2e-3)
    rot_acc = float(np.mean([r["rot_acc"] for r in logs[-8:]]))
    assert rot_acc > 0.25 + 0.3, rot_acc
    first, last = logs[0]["crop_loss"], float(np.mean([r["crop_loss"] for r in logs[-8:]]))
    assert first > -0.2 and last < -0.5, (first, last)
    # the patch-correspondence loss (nearest teacher token of each student token) improves as well ...
    pc_first, pc_last = logs[0]["pc_loss"], float(np.mean([r["pc_loss"] for r in logs[-8:]]))
    assert pc_last < pc_first - 0.2, (pc_first, pc_last)
    # ... and not by collapse: the normalised teacher vectors keep their spread (0 = one vector everywhere)
    assert float(np.mean([r["teacher_std"] for r in logs[-8:]])) > 0.5 * logs[0]["teacher_std"]


# ------------------------------------------------------------------------------------------------ CLoVE
CLOVE_TINY = dict(projector_hidden_dim=64, projector_out_dim=32, attn_heads=4, global_size=64, local_size=32,
                  local_crops_number=1, color_jitter_prob=0.0, grayscale_prob=0.0, global_blur_prob=(0.0, 0.0),
                  local_blur_prob=0.0, global_solarize_prob=(0.0, 0.0))


def test_clove_positive_pairs_become_similar(tmp_path):
    """Position colours make CLoVE's matching solvable: a student cell and the teacher cells of the other
    global view that cover the same image region (its geometric positives) show the same colours. After
    training, the positive-pair cosine rises from about 0 (measured −0.11 at initialisation, 0.28 trained)
    and a cell's positives are more similar to it than a random non-positive cell of the other view (chance
    0.5; measured 0.48 at initialisation, 0.61 trained)."""
    method = CLoVE("resnet-tiny", CLOVE_TINY, epochs=6)
    logs = train(method, position_images(96, size=64), tmp_path, epochs=6, batch=16, lr=2.0)
    assert float(np.mean([r["pos_cos"] for r in logs[-6:]])) > 0.15
    batch = batch_of(method, position_images(32, size=64, seed=5))
    method.eval()
    with torch.no_grad():
        crops = torch.cat(batch["crops"][:2])
        student_global, _ = method.student(crops, None)
        teacher_global = method.teacher(crops)
    query = F.normalize(student_global.chunk(2)[1].flatten(2), dim=1)  # view 1 (student)
    key = F.normalize(teacher_global.chunk(2)[0].flatten(2), dim=1)    # view 0 (teacher)
    boxes = oriented_boxes(batch["boxes"], batch["flips"])
    mask = positive_mask(boxes[:, 1], boxes[:, 0], tuple(student_global.shape[-2:]), tuple(teacher_global.shape[-2:]),
                         method.cfg.pos_ratio)  # (B, Nq, Nk)
    sim = torch.einsum("bcn,bcm->bnm", query, key)
    has_positive = mask.any(-1)
    positive = (sim * mask).sum(-1) / mask.sum(-1).clamp_min(1)
    beats = ((positive.unsqueeze(-1) > sim) & ~mask).sum(-1).float() / (~mask).sum(-1)
    positive_cos, ranking = float(positive[has_positive].mean()), float(beats[has_positive].mean())
    assert positive_cos > 0.15, positive_cos
    assert ranking > 0.55, ranking


# ------------------------------------------------------------------------------------------------ SelfPatch
SELFPATCH_TINY = dict(out_dim=64, out_dim_selfpatch=64, hidden_dim=64, bottleneck_dim=16, global_size=48,
                      local_size=24, local_crops_number=2, drop_path_rate=0.0, color_jitter_prob=0.0,
                      grayscale_prob=0.0)


def test_selfpatch_patches_match_their_neighbours(tmp_path):
    """SelfPatch trains every student patch to predict the teacher's aggregate of its 3×3 neighbours. With
    position colours the neighbourhood of a patch is unique in the image, so the student patch's prediction
    should be closest to the aggregate of its own neighbourhood among all patches of the image (a hit when
    the retrieved patch is the patch itself or one of its 8 neighbours; chance 9/36 on the 6×6 grid; measured
    0.19 at initialisation, 0.51 trained)."""
    method = SelfPatch("vit-tiny-p8", SELFPATCH_TINY, epochs=5)
    train(method, position_images(96), tmp_path, epochs=5, batch=16, lr=5e-3)
    batch = batch_of(method, position_images(32, seed=5))
    with torch.no_grad():
        crop = batch["crops"][0]
        _, student_patches = method.student([crop])
        _, teacher_patches = method.teacher([crop], loc=True)
    p = F.softmax(student_patches[0] / 0.1, dim=-1)                       # (B, N, K)
    q = F.softmax((teacher_patches[0] - method.criterion.patch_center) / 0.04, dim=-1)
    retrieved = torch.einsum("bnk,bmk->bnm", p, q).argmax(-1)             # (B, N)
    g = SELFPATCH_TINY["global_size"] // 8
    window = neighbour_candidates(g, g)                                   # (N, 8), wraps at the border
    own = torch.arange(g * g)
    hit = (retrieved == own) | (retrieved.unsqueeze(-1) == window).any(-1)
    accuracy = float(hit.float().mean())
    assert accuracy > 9 / (g * g) + 0.2, accuracy


# ------------------------------------------------------------------------------------------------ DINO
def class_images(n: int, classes: int = 8, size: int = 48, seed: int = 0) -> tuple[list[Image.Image], list[int]]:
    """``classes`` kinds of image: a class colour pair in stripes of a class orientation, with noise."""
    rng = np.random.default_rng(seed)
    palette = np.random.default_rng(123).uniform(0, 255, (classes, 2, 3))
    yy, xx = np.mgrid[0:size, 0:size]
    images, labels = [], []
    for i in range(n):
        c = i % classes
        stripes = ((xx if c % 2 else yy) // 6) % 2
        pixels = np.where(stripes[..., None] == 1, palette[c, 0], palette[c, 1]) + rng.normal(0, 10, (size, size, 3))
        images.append(Image.fromarray(np.clip(pixels, 0, 255).astype("uint8")))
        labels.append(c)
    return images, labels


DINO_TINY = dict(out_dim=256, hidden_dim=64, bottleneck_dim=16, global_size=32, local_size=16, local_crops_number=2,
                 drop_path_rate=0.0)


def test_dino_teacher_stays_clear_of_collapse_and_separates_classes(tmp_path):
    """DINO fails by collapse: a uniform teacher (per-image entropy → ln K) or one prototype for every image
    (entropy of the batch-mean → 0). On 8 image classes the trained teacher must be sharp per image and spread
    over at least several prototypes, and its prototype assignment must not mix the classes (chance 1/8).
    Measured: per-image entropy 1.60 (ln 256 = 5.55), batch-mean entropy 3.83, purity 0.75 over 31 used
    prototypes (0.84 at initialisation: purity guards against collapse, it does not show learning)."""
    images, labels = class_images(128)
    method = DINO("vit-tiny-p8", DINO_TINY, epochs=6)
    logs = train(method, images, tmp_path, epochs=6, batch=16, lr=2e-3)
    k = DINO_TINY["out_dim"]
    last = logs[-8:]
    entropy = float(np.mean([r["teacher_entropy"] for r in last]))
    batch_entropy = float(np.mean([r["teacher_batch_entropy"] for r in last]))
    assert entropy < 0.5 * math.log(k), entropy          # not uniform
    assert batch_entropy > math.log(3), batch_entropy    # not one prototype

    test_images, test_labels = class_images(64, seed=7)
    views = method.views()
    torch.manual_seed(2)
    crops = torch.stack([views(im)["crops"][0] for im in test_images])
    with torch.no_grad():
        assignment = method.teacher([crops]).argmax(-1)
    labels_t = torch.tensor(test_labels)
    # purity: each prototype votes for its majority class
    correct = sum(int(torch.bincount(labels_t[assignment == a]).max()) for a in assignment.unique())
    purity = correct / len(test_labels)
    assert purity > 1 / 8 + 0.4, purity
