"""DAVIS 2017 semi-supervised video object segmentation data (davisvideochallenge/davis-2017 trainval 480p).

Layout of the trainval release (``DAVIS-2017-trainval-480p.zip`` extracts to ``DAVIS/``)::

    <root>/ImageSets/2017/{train,val}.txt           # one sequence name per line
    <root>/JPEGImages/480p/<sequence>/00000.jpg ...
    <root>/Annotations/480p/<sequence>/00000.png ...  # indexed PNGs: 0 = background, 1..n = objects,
                                                     # 255 = void

``root`` may be the ``DAVIS`` folder itself or the folder that contains it. Frames and annotations are
listed by sorted file name, exactly as both official tools do (``glob`` + ``sorted`` in DINO's
``eval_video_segmentation.py`` and ``np.sort(glob(...))`` in davis2017-evaluation ``davis2017/davis.py``),
so frame ``i`` of a sequence is the ``i``-th file name in sorted order.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from densessl.errors import DataError

DAVIS_DIRNAME = "DAVIS"
YEAR = "2017"
SPLITS = ("train", "val", "test-dev", "test-challenge")  # davis2017-evaluation DAVIS.SUBSET_OPTIONS
RESOLUTIONS = ("480p", "Full-Resolution")
VOID_LABEL = 255  # davis2017-evaluation evaluation.py _VOID_LABEL
DOWNLOAD_HINT = ("download DAVIS-2017-trainval-480p.zip (https://data.vision.ee.ethz.ch/csergi/share/davis/) "
                 "and point the DAVIS data root at the extracted DAVIS folder")


def resolve_davis_root(root: str | Path) -> Path:
    """Return the folder holding ``ImageSets``/``JPEGImages``/``Annotations`` given it or its parent."""
    root = Path(root)
    if (root / "ImageSets").is_dir() or (root / "JPEGImages").is_dir():
        return root
    if (root / DAVIS_DIRNAME / "ImageSets").is_dir():
        return root / DAVIS_DIRNAME
    if not root.exists():
        raise DataError(f"{root}: DAVIS data root does not exist; {DOWNLOAD_HINT}")
    raise DataError(f"{root}: neither {root}/ImageSets nor {root / DAVIS_DIRNAME}/ImageSets exists; "
                    f"{DOWNLOAD_HINT}")


def voc_palette() -> list[int]:
    """The Pascal VOC / DAVIS colour map (256 RGB triplets, flattened); used when an annotation has none."""
    out: list[int] = []
    for i in range(256):
        r = g = b = 0
        c = i
        for bit in range(8):
            r |= ((c >> 0) & 1) << (7 - bit)
            g |= ((c >> 1) & 1) << (7 - bit)
            b |= ((c >> 2) & 1) << (7 - bit)
            c >>= 3
        out += [r, g, b]
    return out


def read_rgb(path: str | Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB frame."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            return np.array(im.convert("RGB"), dtype=np.uint8)
    except FileNotFoundError as exc:
        raise DataError(f"{path}: frame not found; {DOWNLOAD_HINT}") from exc
    except Exception as exc:  # PIL raises several types for truncated/corrupt files
        raise DataError(f"{path}: cannot read frame ({exc}); re-extract the DAVIS archive") from exc


def read_annotation(path: str | Path) -> tuple[np.ndarray, list[int] | None]:
    """(H, W) uint8 object ids of an indexed PNG and its palette (None for a greyscale PNG).

    DAVIS annotations are palette ('P') PNGs whose indices are the object ids; an RGB colour-coded mask
    would silently give wrong ids, so it is refused.
    """
    path = Path(path)
    try:
        with Image.open(path) as im:
            if im.mode not in ("P", "L"):
                raise DataError(f"{path}: annotation has PIL mode {im.mode!r}; DAVIS annotations must be indexed "
                                f"('P') or greyscale ('L') PNGs holding object ids")
            palette = im.getpalette() if im.mode == "P" else None
            labels = np.array(im, dtype=np.uint8)
    except DataError:
        raise
    except FileNotFoundError as exc:
        raise DataError(f"{path}: annotation not found; {DOWNLOAD_HINT}") from exc
    except Exception as exc:
        raise DataError(f"{path}: cannot read annotation ({exc}); re-extract the DAVIS archive") from exc
    return labels, palette


@dataclass(frozen=True)
class DavisSequence:
    """One sequence: its frames and annotations, each sorted by file name."""

    name: str
    image_paths: tuple[Path, ...]
    annotation_paths: tuple[Path, ...]

    @property
    def frame_ids(self) -> list[str]:
        return [p.stem for p in self.image_paths]

    @property
    def annotation_ids(self) -> list[str]:
        return [p.stem for p in self.annotation_paths]

    @property
    def first_annotation(self) -> Path:
        """The annotation of the first frame (the semi-supervised task's only given mask)."""
        first = self.image_paths[0].stem
        for p in self.annotation_paths:
            if p.stem == first:
                return p
        folder = self.annotation_paths[0].parent if self.annotation_paths else "<Annotations folder>"
        raise DataError(f"{folder}/{first}.png: first-frame annotation of sequence {self.name!r} not found; "
                        f"the semi-supervised task needs the mask of the first frame ({DOWNLOAD_HINT})")

    def gt_labels(self) -> tuple[list[str], np.ndarray]:
        """All annotations as (frame ids, (T, H, W) uint8 ids) with void (255) set to 0.

        As davis2017-evaluation ``DAVIS._get_all_elements``: void pixels become background for the
        semi-supervised task.
        """
        if not self.annotation_paths:
            raise DataError(f"sequence {self.name!r}: no annotation PNGs; {DOWNLOAD_HINT}")
        frames = []
        for p in self.annotation_paths:
            labels, _ = read_annotation(p)
            if frames and labels.shape != frames[0].shape:
                raise DataError(f"{p}: annotation size {labels.shape} differs from {frames[0].shape} of "
                                f"{self.annotation_paths[0].name}; all frames of a sequence share one size")
            frames.append(labels)
        stack = np.stack(frames)
        stack[stack == VOID_LABEL] = 0
        return self.annotation_ids, stack


def _sorted_files(folder: Path, suffix: str) -> tuple[Path, ...]:
    if not folder.is_dir():
        return ()
    return tuple(sorted((p for p in folder.iterdir()
                         if p.is_file() and p.suffix.lower() == suffix and not p.name.startswith(".")),
                        key=lambda p: p.name))


class Davis2017:
    """The sequences of one DAVIS 2017 split, in the order of ``ImageSets/2017/<split>.txt``.

    ``sequences`` restricts to the named sequences (in that order), ``max_sequences`` keeps the first N.
    Missing files fail here, naming the file, rather than half-way through an evaluation.
    """

    def __init__(self, root: str | Path, split: str = "val", resolution: str = "480p",
                 sequences: Sequence[str] | None = None, max_sequences: int | None = None,
                 require_annotations: bool = True) -> None:
        if split not in SPLITS:
            raise DataError(f"DAVIS split {split!r} unknown; expected one of {list(SPLITS)}")
        if resolution not in RESOLUTIONS:
            raise DataError(f"DAVIS resolution {resolution!r} unknown; expected one of {list(RESOLUTIONS)}")
        self.root = resolve_davis_root(root)
        self.split = split
        self.resolution = resolution
        self.image_dir = self.root / "JPEGImages" / resolution
        self.annotation_dir = self.root / "Annotations" / resolution
        set_file = self.root / "ImageSets" / YEAR / f"{split}.txt"
        if not set_file.is_file():
            raise DataError(f"{set_file}: sequence list of split {split!r} not found; {DOWNLOAD_HINT}")
        listed = [line.strip() for line in set_file.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not listed:
            raise DataError(f"{set_file}: lists no sequences; re-extract the DAVIS archive")
        if sequences is not None:
            unknown = [s for s in sequences if s not in listed]
            if unknown:
                raise DataError(f"sequences {unknown} are not listed in {set_file}")
            listed = list(sequences)
        if max_sequences is not None:
            if max_sequences < 1:
                raise DataError(f"max_sequences={max_sequences} must be >= 1 (or None for all)")
            listed = listed[:max_sequences]
        if not self.image_dir.is_dir():
            raise DataError(f"{self.image_dir}: frame folder not found; {DOWNLOAD_HINT}")
        if require_annotations and not self.annotation_dir.is_dir():
            raise DataError(f"{self.annotation_dir}: annotation folder not found; {DOWNLOAD_HINT}")
        self._sequences: dict[str, DavisSequence] = {}
        for name in listed:
            images = _sorted_files(self.image_dir / name, ".jpg")
            if not images:
                raise DataError(f"{self.image_dir / name}: no *.jpg frames for sequence {name!r} listed in "
                                f"{set_file}; {DOWNLOAD_HINT}")
            annotations = _sorted_files(self.annotation_dir / name, ".png")
            if require_annotations and not annotations:
                raise DataError(f"{self.annotation_dir / name}: no *.png annotations for sequence {name!r}; "
                                f"{DOWNLOAD_HINT}")
            self._sequences[name] = DavisSequence(name, images, annotations)

    @property
    def sequences(self) -> list[str]:
        return list(self._sequences)

    def __len__(self) -> int:
        return len(self._sequences)

    def __iter__(self) -> Iterator[DavisSequence]:
        return iter(self._sequences.values())

    def __getitem__(self, name: str) -> DavisSequence:
        if name not in self._sequences:
            raise DataError(f"sequence {name!r} is not part of DAVIS {self.split} as loaded from {self.root}")
        return self._sequences[name]
