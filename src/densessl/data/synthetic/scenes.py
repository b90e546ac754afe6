"""Scene renderer for the synthetic datasets: textured shapes ("things") over textured regions ("stuff").

Every class is a fixed (shape, texture) pair for things and a fixed texture for stuff; every instance and every
region draws its own random colours, so colour never identifies a class (with class colours a random-init
backbone already scores as well as a trained one). The image, the semantic map and
the instance map come from one rasterisation on a pixel grid, so the labels are exact. All randomness comes from
the ``numpy.random.Generator`` passed in (see :func:`scene_rng`), so a scene is a pure function of its seed.

Internal label convention (each writer maps it to its dataset's ids):
    semantic map: 0..NUM_THINGS-1 = thing classes (THING_CLASSES), NUM_THINGS..NUM_CLASSES-1 = stuff classes
    (STUFF_CLASSES), UNLABELLED (255) = unlabelled pixels (stuff region borders and "clutter" blobs);
    instance map: 0 = no thing, i + 1 = ``scene.things[i]`` (things are listed in paint order, later on top).
"""

from __future__ import annotations

import colorsys
import io
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

THING_CLASSES: tuple[str, ...] = (
    "disc-stripes",
    "square-checker",
    "triangle-dots",
    "star-speckle",
    "ring-concentric",
    "cross-grid",
    "oval-zigzag",
    "hexagon-gradient",
)
STUFF_CLASSES: tuple[str, ...] = ("sky-gradient", "grass-noise", "brick-wall", "water-waves")
NUM_THINGS = len(THING_CLASSES)
NUM_STUFF = len(STUFF_CLASSES)
NUM_CLASSES = NUM_THINGS + NUM_STUFF
UNLABELLED = 255
RADIUS_RANGE = (0.15, 0.48)  # thing radius as a fraction of the short image side (log-uniform)

# Bounding radius of each shape in units of its nominal radius (the triangle and star reach past 1).
_SHAPE_EXTENT = np.array([1.0, 1.16, 1.24, 1.0, 1.0, 1.05, 1.0, 1.0])


@dataclass(frozen=True)
class Pose:
    """Placement of a thing: centre (pixels), nominal radius (pixels), rotation (radians), aspect (>1 = wide)."""

    cx: float
    cy: float
    radius: float
    angle: float
    aspect: float


@dataclass
class Thing:
    cls: int
    pose: Pose
    colors: np.ndarray  # (2, 3) float: texture colour A and B
    phase: np.ndarray  # (2,) texture offset in pixels
    period: float  # texture scale factor (≈1)
    noise_seed: int
    amodal: np.ndarray | None = None  # full (unoccluded) mask, filled by paint_things


@dataclass
class Scene:
    image: np.ndarray  # (H, W, 3) uint8
    semantic: np.ndarray  # (H, W) uint8, internal ids (see module docstring)
    instance: np.ndarray  # (H, W) int32, 0 = none, i + 1 = things[i]
    things: list[Thing]
    regions: np.ndarray  # (H, W) int8: index into region_classes
    region_classes: list[int]  # internal stuff ids (NUM_THINGS + s)
    main: int | None = None  # index into things of the dominant object, when one was requested

    def visible(self, i: int) -> np.ndarray:
        return self.instance == i + 1


@dataclass
class Frame:
    image: np.ndarray  # (H, W, 3) uint8
    objects: np.ndarray  # (H, W) uint8: 0 background, k = object k (1-based)
    things: list[Thing] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------- randomness


def scene_rng(seed: int, dataset_index: int, split_index: int, index: int) -> np.random.Generator:
    """The generator of one image (or one video): independent of generation order and of the other images."""
    return np.random.default_rng([seed, dataset_index, split_index, index])


def hash_noise(ix: np.ndarray, iy: np.ndarray, seed: int) -> np.ndarray:
    """Deterministic white noise in [0, 1) on an integer lattice (moves with its coordinates across frames)."""
    h = ix.astype(np.int64) * 374761393 + iy.astype(np.int64) * 668265263 + (seed & 0xFFFFFF) * 2246822519
    h &= 0xFFFFFFFF
    h = ((h ^ (h >> 13)) * 1274126177) & 0xFFFFFFFF
    h ^= h >> 16
    return h.astype(np.float32) / np.float32(2**32)


def smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int = 3) -> np.ndarray:
    """Low-frequency noise in [0, 1]: a random (cells+1)² lattice, bilinearly interpolated."""
    g = rng.random((cells + 1, cells + 1))
    ys = (np.arange(h) + 0.5) / h * cells
    xs = (np.arange(w) + 0.5) / w * cells
    y0 = np.minimum(ys.astype(int), cells - 1)
    x0 = np.minimum(xs.astype(int), cells - 1)
    fy = (ys - y0)[:, None]
    fx = (xs - x0)[None, :]
    top = g[y0][:, x0] * (1 - fx) + g[y0][:, x0 + 1] * fx
    bottom = g[y0 + 1][:, x0] * (1 - fx) + g[y0 + 1][:, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


def random_colors(rng: np.random.Generator, n: int, min_dist: float = 90.0) -> np.ndarray:
    """n random colour pairs, (n, 2, 3) float RGB in [0, 255], whose contrast is mostly luminance.

    Why this colour model (generator version 2): in natural images luminance carries most of the contrast and
    chroma varies much less; uniform random RGB pairs (version 1) made chroma the dominant, per-instance
    nuisance. Measured on the smoke data (2 CPU cores, vit-tiny-p8, Patch-Seg mlp probe): with uniform RGB a
    random-init backbone scored macro recall 0.12-0.13 and scored 0.16-0.17 on the same images turned grey, and
    DINO learned each instance's colours (shared by its two views) instead of texture and shape: no margin over
    random init. With this model random init scores 0.22 and DINO 0.24 after the same 620 steps.

    Colour still never gives a class away: hue is uniform, saturation and value are random per instance.
    A pair shares its hue up to 0.08 turn and differs in value by at least ``min_dist``/255 (so the texture
    is always visible), with saturation in [0.05, 0.5].
    """
    out = np.empty((n, 2, 3))
    hue = rng.uniform(0.0, 1.0, size=n)
    hue_b = (hue + rng.uniform(-0.08, 0.08, size=n)) % 1.0
    sat = rng.uniform(0.05, 0.5, size=(n, 2))
    gap = min_dist / 255.0 * rng.uniform(1.0, 2.0, size=n)
    low = rng.uniform(0.05, 1.0 - gap)
    swap = rng.random(n) < 0.5
    for i in range(n):
        values = (low[i] + gap[i], low[i]) if swap[i] else (low[i], low[i] + gap[i])
        out[i, 0] = colorsys.hsv_to_rgb(hue[i], sat[i, 0], values[0])
        out[i, 1] = colorsys.hsv_to_rgb(hue_b[i], sat[i, 1], values[1])
    return out * 255.0


# ----------------------------------------------------------------------------------------------- things


def _local(pose: Pose, xx: np.ndarray, yy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pixel offsets from the centre in the thing's rotated frame."""
    dx, dy = xx - pose.cx, yy - pose.cy
    c, s = np.cos(pose.angle), np.sin(pose.angle)
    return c * dx + s * dy, -s * dx + c * dy


def shape_mask(cls: int, pu: np.ndarray, pv: np.ndarray, pose: Pose) -> np.ndarray:
    """Silhouette of thing class ``cls`` at rotated pixel offsets (pu, pv)."""
    u = pu / (pose.radius * pose.aspect)
    v = pv * pose.aspect / pose.radius
    if cls == 0:  # disc
        return u * u + v * v <= 1.0
    if cls == 1:  # square
        return np.maximum(np.abs(u), np.abs(v)) <= 0.82
    if cls == 2:  # equilateral triangle (inradius 0.62)
        out = v <= 0.62
        for ang in (np.pi / 6, 5 * np.pi / 6):
            out &= -(np.cos(ang) * u + np.sin(ang) * v) <= 0.62
        return out
    if cls == 3:  # five-pointed star
        rho, phi = np.hypot(u, v), np.arctan2(v, u)
        tri = np.abs(((phi * 5 / (2 * np.pi)) % 1.0) * 2 - 1)  # 1 at the tips, 0 between
        return rho <= 0.5 + 0.5 * tri**1.5
    if cls == 4:  # ring
        r2 = u * u + v * v
        return (r2 <= 1.0) & (r2 >= 0.5**2)
    if cls == 5:  # cross
        au, av = np.abs(u), np.abs(v)
        return ((au <= 0.34) & (av <= 1.0)) | ((av <= 0.34) & (au <= 1.0))
    if cls == 6:  # oval
        return u * u + (v / 0.5) ** 2 <= 1.0
    if cls == 7:  # hexagon
        out = np.ones(u.shape, bool)
        for ang in (0.0, np.pi / 3, 2 * np.pi / 3):
            out &= np.abs(np.cos(ang) * u + np.sin(ang) * v) <= 0.88
        return out
    raise ValueError(f"unknown thing class {cls}")


def thing_texture(thing: Thing, pu: np.ndarray, pv: np.ndarray) -> np.ndarray:
    """Blend factor in [0, 1] between the thing's two colours; the pattern is the class's, in its own frame."""
    cls, p = thing.cls, thing.period
    a, b = pu + thing.phase[0], pv + thing.phase[1]
    if cls == 0:  # stripes
        return (np.sin(2 * np.pi * a / (6.0 * p)) > 0).astype(np.float32)
    if cls == 1:  # checker
        c = 3.5 * p
        return ((np.floor(a / c) + np.floor(b / c)) % 2).astype(np.float32)
    if cls == 2:  # dots
        s = 5.5 * p
        return ((((a % s) - s / 2) ** 2 + ((b % s) - s / 2) ** 2) < (0.3 * s) ** 2).astype(np.float32)
    if cls == 3:  # speckle
        n = hash_noise(np.floor(pu / 1.5), np.floor(pv / 1.5), thing.noise_seed)
        return (n > 0.7).astype(np.float32)
    if cls == 4:  # concentric rings
        return (np.sin(2 * np.pi * (np.hypot(pu, pv) + thing.phase[0]) / (4.5 * p)) > 0).astype(np.float32)
    if cls == 5:  # grid lines
        s = 5.0 * p
        return (((a % s) < 1.5) | ((b % s) < 1.5)).astype(np.float32)
    if cls == 6:  # zigzag stripes
        zig = np.abs(((a / (6.0 * p)) % 1.0) * 2 - 1) * 3.0
        return (np.sin(2 * np.pi * (b + zig) / (5.0 * p)) > 0).astype(np.float32)
    if cls == 7:  # smooth gradient across the object
        return np.clip(0.5 + 0.5 * pu / thing.pose.radius, 0, 1).astype(np.float32)
    raise ValueError(f"unknown thing class {cls}")


def paint_things(
    canvas: np.ndarray, semantic: np.ndarray | None, instance: np.ndarray, things: list[Thing]
) -> None:
    """Paint things in order (later ones occlude earlier ones); fills ``thing.amodal`` with the full mask."""
    h, w = instance.shape
    for i, t in enumerate(things):
        ext = t.pose.radius * max(t.pose.aspect, 1 / t.pose.aspect) * _SHAPE_EXTENT[t.cls] + 1.5
        y0, y1 = max(int(t.pose.cy - ext), 0), min(int(t.pose.cy + ext) + 1, h)
        x0, x1 = max(int(t.pose.cx - ext), 0), min(int(t.pose.cx + ext) + 1, w)
        amodal = np.zeros((h, w), bool)
        t.amodal = amodal
        if y0 >= y1 or x0 >= x1:
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32) + np.float32(0.5)
        pu, pv = _local(t.pose, xx, yy)
        m = shape_mask(t.cls, pu, pv, t.pose)
        amodal[y0:y1, x0:x1] = m
        tex = thing_texture(t, pu, pv)[..., None]
        col = t.colors[0] * (1 - tex) + t.colors[1] * tex
        canvas[y0:y1, x0:x1][m] = col[m]
        instance[y0:y1, x0:x1][m] = i + 1
        if semantic is not None:
            semantic[y0:y1, x0:x1][m] = t.cls


def sample_thing(rng: np.random.Generator, cls: int, pose: Pose, colors: np.ndarray | None = None) -> Thing:
    return Thing(
        cls=int(cls),
        pose=pose,
        colors=random_colors(rng, 1)[0] if colors is None else colors,
        phase=rng.uniform(0, 20, size=2),
        period=float(rng.uniform(0.85, 1.15)),
        noise_seed=int(rng.integers(1 << 24)),
    )


def sample_pose(rng: np.random.Generator, h: int, w: int, radius: float) -> Pose:
    return Pose(
        cx=float(rng.uniform(0.12, 0.88) * w),
        cy=float(rng.uniform(0.12, 0.88) * h),
        radius=float(radius),
        angle=float(rng.uniform(0, 2 * np.pi)),
        aspect=float(np.exp(rng.uniform(-0.15, 0.15))),
    )


# ----------------------------------------------------------------------------------------------- stuff


def stuff_layout(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, list[int]]:
    """Partition the canvas into 2–3 regions with wavy (warped Voronoi) borders; returns the region map and
    the internal stuff id of each region (distinct classes)."""
    n = int(rng.integers(2, 4))
    side = max(h, w)
    seeds = rng.uniform(0, 1, size=(n, 2)) * np.array([w, h])
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) + np.float32(0.5)
    dist = np.stack(
        [np.hypot(xx - sx, yy - sy) + 0.35 * side * smooth_noise(rng, h, w, 3) for sx, sy in seeds]
    )
    regions = dist.argmin(0).astype(np.int8)
    classes = [NUM_THINGS + int(c) for c in rng.choice(NUM_STUFF, size=n, replace=False)]
    return regions, classes


def stuff_texture(cls: int, xx: np.ndarray, yy: np.ndarray, params: np.ndarray, seed: int) -> np.ndarray:
    """Blend factor in [0, 1] of stuff class ``cls`` (internal id) at canvas coordinates; ``params`` are 4
    uniform [0, 1) numbers that set orientation and phase."""
    s = cls - NUM_THINGS
    ang = (params[0] - 0.5) * 0.6
    c, sn = np.cos(ang), np.sin(ang)
    a, b = c * xx + sn * yy, -sn * xx + c * yy
    if s == 0:  # sky: smooth gradient along a near-vertical direction
        span = max(xx.max() - xx.min(), yy.max() - yy.min(), 1.0)
        return np.clip((b - b.min()) / span * (0.7 + 0.6 * params[1]), 0, 1)
    if s == 1:  # grass: fine vertical-streaked noise
        return hash_noise(np.floor(xx), np.floor(yy / 3.0), seed) ** 1.5
    if s == 2:  # brick: staggered rows, mortar lines
        bh, bw = 6.0, 12.0
        row = np.floor((b + params[1] * bh) / bh)
        off = (row % 2) * bw / 2
        mortar = ((b + params[1] * bh) % bh < 1.3) | ((a + off + params[2] * bw) % bw < 1.3)
        return mortar.astype(np.float32)
    if s == 3:  # water: soft wavy bands
        phase = 2 * np.pi * params[2]
        return 0.5 + 0.5 * np.sin(2 * np.pi * (b + 3.0 * np.sin(2 * np.pi * a / 22.0 + phase)) / 8.0 + phase)
    raise ValueError(f"unknown stuff class {cls}")


def paint_stuff(
    rng: np.random.Generator,
    canvas: np.ndarray,
    regions: np.ndarray,
    classes: list[int],
    colors: np.ndarray | None = None,
    origin: tuple[float, float] = (0.0, 0.0),
) -> None:
    h, w = regions.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) + np.float32(0.5)
    xx, yy = xx + origin[0], yy + origin[1]
    cols = random_colors(rng, len(classes), min_dist=60.0) if colors is None else colors
    for k, cls in enumerate(classes):
        m = regions == k
        params = rng.random(4)
        seed = int(rng.integers(1 << 24))
        if not m.any():
            continue
        t = stuff_texture(cls, xx[m], yy[m], params, seed)[:, None]
        canvas[m] = cols[k, 0] * (1 - t) + cols[k, 1] * t


def region_borders(regions: np.ndarray) -> np.ndarray:
    """One-pixel band on the borders between stuff regions (left unlabelled, as annotators do)."""
    out = np.zeros(regions.shape, bool)
    out[:, :-1] |= regions[:, :-1] != regions[:, 1:]
    out[:-1, :] |= regions[:-1, :] != regions[1:, :]
    return out


# ----------------------------------------------------------------------------------------------- scenes


def render_scene(
    rng: np.random.Generator,
    h: int,
    w: int,
    *,
    main_class: int | None = None,
    max_things: int = 4,
    class_weights: np.ndarray | None = None,
    noise_std: float = 4.0,
) -> Scene:
    """One scene: 2–3 stuff regions, a clutter blob now and then (unlabelled), then 1–``max_things`` things.

    With ``main_class`` one thing of that class is the largest and painted last (on top): the image's label
    for classification layouts (ImageNet, iNat)."""
    canvas = np.zeros((h, w, 3), np.float32)
    regions, region_classes = stuff_layout(rng, h, w)
    paint_stuff(rng, canvas, regions, region_classes)
    semantic = np.array(region_classes, np.uint8)[regions]
    semantic[region_borders(regions)] = UNLABELLED

    if rng.random() < 0.4:  # clutter: an unlabelled blob of noise under the things
        side = min(h, w)
        pose = sample_pose(rng, h, w, rng.uniform(0.08, 0.16) * side)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) + np.float32(0.5)
        pu, pv = _local(pose, xx, yy)
        m = shape_mask(0, pu, pv, pose)
        cols = random_colors(rng, 1)[0]
        t = hash_noise(xx.astype(int), yy.astype(int), int(rng.integers(1 << 24)))[..., None]
        canvas[m] = (cols[0] * (1 - t) + cols[1] * t)[m]
        semantic[m] = UNLABELLED

    side = min(h, w)
    n = int(rng.choice(np.arange(1, max_things + 1), p=_count_probs(max_things)))
    p = None if class_weights is None else np.asarray(class_weights, float) / np.sum(class_weights)
    classes = list(rng.choice(NUM_THINGS, size=n, p=p))
    # radius as a fraction of the short side, log-uniform in RADIUS_RANGE (extents ≈ 30–95 % of the side,
    # often cut by the border or occluded): things cover ≈ 40 % of the pixels on average
    radii = np.exp(rng.uniform(np.log(RADIUS_RANGE[0]), np.log(RADIUS_RANGE[1]), size=n)) * side
    main = None
    if main_class is not None:
        radii[0] = max(radii.max(), rng.uniform(0.3, 0.42) * side)
        classes[0] = main_class
        order = list(range(1, n)) + [0]  # main thing painted last
        classes = [classes[i] for i in order]
        radii = radii[order]
        main = n - 1
    things = [sample_thing(rng, c, sample_pose(rng, h, w, r)) for c, r in zip(classes, radii)]
    if main is not None:  # keep the dominant object near the centre so crops usually contain it
        things[main].pose = replace(
            things[main].pose, cx=float(rng.uniform(0.3, 0.7) * w), cy=float(rng.uniform(0.3, 0.7) * h)
        )
    instance = np.zeros((h, w), np.int32)
    paint_things(canvas, semantic, instance, things)
    image = _finish(rng, canvas, noise_std)
    return Scene(image, semantic, instance, things, regions, region_classes, main)


def _count_probs(max_things: int) -> np.ndarray:
    p = np.array([0.1, 0.2, 0.35, 0.35, 0.1, 0.1, 0.1, 0.1][:max_things])
    return p / p.sum()


def _finish(rng: np.random.Generator, canvas: np.ndarray, noise_std: float) -> np.ndarray:
    noisy = canvas + rng.normal(0, noise_std, size=canvas.shape).astype(np.float32)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------- videos


def render_sequence(
    rng: np.random.Generator, h: int, w: int, n_frames: int, noise_std: float = 3.0
) -> list[Frame]:
    """A DAVIS-like clip: 2–3 objects that move along smooth crossing paths, scale, rotate and squash, occlude
    each other, over a textured background that pans. Objects share the clip's two colours (and often the
    class), and the background reuses them, so tracking needs shape, texture and position, not colour."""
    pad = max(6, w // 12)
    big_h, big_w = h + 2 * pad, w + 2 * pad
    n_obj = int(rng.integers(2, 4))
    base = random_colors(rng, 1)[0]  # the clip's colour pair

    def jitter(c: np.ndarray, amount: float = 25.0) -> np.ndarray:
        return np.clip(c + rng.uniform(-amount, amount, size=c.shape), 0, 255)

    regions, region_classes = stuff_layout(rng, big_h, big_w)
    bg_cols = np.stack(
        [jitter(base if rng.random() < 0.6 else random_colors(rng, 1)[0], 40.0) for _ in region_classes]
    )
    for k in range(len(bg_cols)):
        if rng.random() < 0.5:
            bg_cols[k] = bg_cols[k, ::-1]
    background = np.zeros((big_h, big_w, 3), np.float32)
    paint_stuff(rng, background, regions, region_classes, colors=bg_cols)
    pan0, pan1 = rng.uniform(0, 2 * pad, size=2), rng.uniform(0, 2 * pad, size=2)

    first = int(rng.integers(NUM_THINGS))
    classes = [first if rng.random() < 0.5 else int(rng.integers(NUM_THINGS)) for _ in range(n_obj)]
    side = min(h, w)
    starts = _spread_points(rng, n_obj, h, w)
    ends = np.stack([w - starts[:, 0], h - starts[:, 1]], 1) + rng.uniform(-0.1, 0.1, size=(n_obj, 2)) * [
        w,
        h,
    ]
    ends = np.clip(ends, [0.15 * w, 0.15 * h], [0.85 * w, 0.85 * h])
    r0 = rng.uniform(0.17, 0.28, size=n_obj) * side
    scale_rate = rng.uniform(-0.35, 0.35, size=n_obj)
    ang0 = rng.uniform(0, 2 * np.pi, size=n_obj)
    spin = rng.choice([-1, 1], size=n_obj) * rng.uniform(0.04, 0.14, size=n_obj)
    squash = rng.uniform(0.1, 0.25, size=n_obj)
    squash_phase = rng.uniform(0, 2 * np.pi, size=n_obj)
    wiggle = rng.uniform(-0.08, 0.08, size=n_obj) * side
    templates = []
    for k in range(n_obj):
        cols = np.stack([jitter(base[0]), jitter(base[1])])
        if rng.random() < 0.5:
            cols = cols[::-1]
        templates.append(sample_thing(rng, classes[k], Pose(0, 0, 1, 0, 1), colors=cols))
    depth = rng.permutation(n_obj)  # paint order: object depth[-1] is in front

    frames = []
    for f in range(n_frames):
        s = f / max(n_frames - 1, 1)
        e = s * s * (3 - 2 * s)  # smoothstep along the path
        ox, oy = pan0 + (pan1 - pan0) * s
        canvas = background[round(oy) : round(oy) + h, round(ox) : round(ox) + w].copy()
        things = []
        for k in depth:
            d = ends[k] - starts[k]
            normal = np.array([-d[1], d[0]]) / (np.linalg.norm(d) + 1e-6)
            c = starts[k] + d * e + normal * wiggle[k] * np.sin(np.pi * s)
            pose = Pose(
                cx=float(c[0]),
                cy=float(c[1]),
                radius=float(r0[k] * (1 + scale_rate[k] * s)),
                angle=float(ang0[k] + spin[k] * f),
                aspect=float(np.exp(squash[k] * np.sin(2 * np.pi * s + squash_phase[k]))),
            )
            things.append(replace(templates[k], pose=pose))
        ids = np.zeros((h, w), np.int32)
        paint_things(canvas, None, ids, things)
        objects = np.zeros((h, w), np.uint8)
        for i, k in enumerate(depth):
            objects[ids == i + 1] = k + 1
        frames.append(Frame(_finish(rng, canvas, noise_std), objects, things))
    return frames


def _spread_points(rng: np.random.Generator, n: int, h: int, w: int, tries: int = 50) -> np.ndarray:
    """n start points in the frame, kept apart so that every object is visible in the first frame."""
    best, best_d = None, -1.0
    for _ in range(tries):
        pts = rng.uniform(0.2, 0.8, size=(n, 2)) * [w, h]
        d = min(np.hypot(*(pts[i] - pts[j])) for i in range(n) for j in range(i + 1, n))
        if d > best_d:
            best, best_d = pts, d
        if d > 0.45 * min(h, w):
            break
    assert best is not None
    return best


# ----------------------------------------------------------------------------------------------- geometry


def mask_to_polygons(mask: np.ndarray) -> list[list[float]]:
    """Polygons (COCO flat [x0, y0, x1, y1, ...], pixel-corner coordinates) of a binary mask: one per
    4-connected component, tracing pixel boundaries exactly. Holes are joined to the outer boundary by a
    zero-width bridge, so even-odd rasterisers (pycocotools, PIL) reproduce the mask, holes included."""
    labels, _n = ndimage.label(mask)
    polys = []
    for k, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None:
            continue
        comp = labels[sl] == k
        loops = _trace_loops(comp)
        poly = loops[0]
        for hole in loops[1:]:
            poly = _bridge(poly, hole)
        off = np.array([sl[1].start, sl[0].start])
        polys.append((np.asarray(poly, np.float64) + off).ravel().tolist())
    return polys


_RIGHT_TURN = {(1, 0): (0, 1), (0, 1): (-1, 0), (-1, 0): (0, -1), (0, -1): (1, 0)}


def _trace_loops(m: np.ndarray) -> list[list[tuple[int, int]]]:
    """Closed loops of pixel-boundary edges (clockwise in image coordinates), collinear vertices removed,
    longest loop first."""
    p = np.pad(m, 1)
    inside = p[1:-1, 1:-1]
    out: dict[tuple[int, int], list[tuple[int, int]]] = {}
    specs = (
        (~p[:-2, 1:-1], (0, 0), (1, 0)),  # top edge, going right
        (~p[1:-1, 2:], (1, 0), (0, 1)),  # right edge, going down
        (~p[2:, 1:-1], (1, 1), (-1, 0)),  # bottom edge, going left
        (~p[1:-1, :-2], (0, 1), (0, -1)),  # left edge, going up
    )
    for outside, (ox, oy), d in specs:
        r, c = np.nonzero(inside & outside)
        for x, y in zip((c + ox).tolist(), (r + oy).tolist()):
            out.setdefault((x, y), []).append(d)
    loops = []
    while out:
        start = next(iter(out))
        d = _pop(out, start, None)
        v, loop = start, [start]
        while True:
            v = (v[0] + d[0], v[1] + d[1])
            if v not in out:
                break
            nd = _pop(out, v, d)
            if nd != d:
                loop.append(v)
            d = nd
        if loop[0] == v and len(loop) > 1 and _collinear(loop[-1], loop[0], loop[1]):
            loop = loop[1:]
        loops.append(loop)
    loops.sort(key=len, reverse=True)
    return loops


def _pop(out: dict, v: tuple[int, int], d: tuple[int, int] | None) -> tuple[int, int]:
    dirs = out[v]
    choice = dirs[0]
    if d is not None and len(dirs) > 1:  # saddle: prefer turning right, then straight
        r = _RIGHT_TURN[d]
        choice = r if r in dirs else (d if d in dirs else dirs[0])
    dirs.remove(choice)
    if not dirs:
        del out[v]
    return choice


def _collinear(a: tuple[int, int], b: tuple[int, int], c: tuple[int, int]) -> bool:
    return (b[0] - a[0]) * (c[1] - b[1]) == (b[1] - a[1]) * (c[0] - b[0])


def _bridge(outer: list[tuple[int, int]], hole: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Join ``hole`` into ``outer`` through the closest vertex pair (there and back along the same segment)."""
    a, b = np.asarray(outer), np.asarray(hole)
    d = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
    i, j = np.unravel_index(int(d.argmin()), d.shape)
    return outer[: i + 1] + hole[j:] + hole[: j + 1] + outer[i:]


def polygon_bbox(mask: np.ndarray) -> list[float]:
    """COCO bbox [x, y, w, h] of a non-empty mask (pixel-corner coordinates)."""
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]


# ----------------------------------------------------------------------------------------------- files


def save_jpeg(path: Path, image: np.ndarray, quality: int = 92) -> None:
    """Fixed encoder settings (no EXIF, no optimisation passes), so the bytes depend on the pixels only."""
    buf = io.BytesIO()
    Image.fromarray(image, "RGB").save(buf, format="JPEG", quality=quality, subsampling=0)
    path.write_bytes(buf.getvalue())


def save_png(path: Path, image: Image.Image) -> None:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=6)
    path.write_bytes(buf.getvalue())
