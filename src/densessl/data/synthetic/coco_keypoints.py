"""COCO person keypoints for the synthetic COCO scenes: ``annotations/person_keypoints_{train,val}2017.json``.

Why this design: the synthetic COCO images, instance files and COCO-Stuff maps feed other evaluations and must
stay byte-identical, so the keypoint files annotate the *existing* images, as the real
``person_keypoints_*.json`` annotate the same images as ``instances_*.json``. The "person" category is the thing
class with COCO category id 1 (real COCO's person id; here the "disc-stripes" shape). Each of its instances gets
the 17 COCO keypoints, placed where the image shows them:

* ``nose`` = the centre of the instance's full (unoccluded) mask;
* the 8 left/right pairs = the mask's extreme point along a fixed image direction (support point), the
  ``left_*`` joints on the image's right half-plane at 22.5-degree steps, each ``right_*`` joint at the mirror
  direction. A horizontal flip therefore maps every left joint onto its right partner, which is exactly what
  COCO's flip map (swap ``left_*`` and ``right_*``) assumes, so flip augmentation stays correct.

Visibility follows COCO: 2 = labelled and visible (the joint's pixel belongs to the visible mask), 1 = labelled
but occluded (inside the full mask, covered by a later shape), 0 = not labelled, coordinates (0, 0), for joints
whose extreme point lies on the image border (the shape continues outside the image, as a person's ankle cut by
the frame). Coordinates are integer pixel indices like real COCO keypoints (detectron2 adds 0.5 on load).
Crowd (``iscrowd=1``) persons carry 17 zero triplets and ``num_keypoints`` 0, as in the real files.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .scenes import Scene

PERSON_CATEGORY_ID = 1  # COCO's person id; the synthetic thing class with this id is the "person"
PERSON_THING_CLASS = 0  # index into scenes.THING_CLASSES of that class (coco.THING_CATEGORY_IDS[0] == 1)

# COCO 2017 keypoint names and skeleton (1-based joint indices), as in person_keypoints_{train,val}2017.json.
KEYPOINT_NAMES: tuple[str, ...] = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder", "left_elbow",
    "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle",
    "right_ankle",
)
SKELETON: tuple[tuple[int, int], ...] = (
    (16, 14), (14, 12), (17, 15), (15, 13), (12, 13), (6, 12), (7, 13), (6, 7), (6, 8), (7, 9), (8, 10), (9, 11),
    (2, 3), (1, 2), (1, 3), (2, 4), (3, 5), (4, 6), (5, 7),
)
# Direction (degrees from +x, image y pointing down) of each left joint's extreme point, top to bottom;
# the right partner uses 180 - angle.
_LEFT_ANGLES = (-78.75, -56.25, -33.75, -11.25, 11.25, 33.75, 56.25, 78.75)


def person_category() -> dict[str, Any]:
    """The single category of the real keypoint files (supercategory, id, name, keypoints, skeleton)."""
    return {"supercategory": "person", "id": PERSON_CATEGORY_ID, "name": "person",
            "keypoints": list(KEYPOINT_NAMES), "skeleton": [list(pair) for pair in SKELETON]}


def joint_directions() -> np.ndarray:
    """(16, 2) unit vectors of joints 1..16 in COCO order (left_eye, right_eye, left_ear, ...)."""
    out = []
    for angle in _LEFT_ANGLES:
        for a in (angle, 180.0 - angle):
            r = np.deg2rad(a)
            out.append((np.cos(r), np.sin(r)))
    return np.asarray(out)


def person_keypoints(full: np.ndarray, visible: np.ndarray) -> list[int]:
    """COCO ``keypoints`` [x1, y1, v1, ...] (integer pixel indices) of one person from its masks.

    A joint's pixel is the one holding the mean of its extreme pixels (a flat edge gives several); it is visible
    when most of those pixels are. Both rules commute with a mirror image (up to a pixel at exact ties)."""
    h, w = full.shape
    ys, xs = np.nonzero(full)
    centres = np.stack([xs + 0.5, ys + 0.5], 1)
    cx, cy = (int(np.floor(v)) for v in centres.mean(0))
    out: list[int] = [cx, cy, 2 if visible[cy, cx] else 1]
    for d in joint_directions():
        reach = centres @ d
        near = reach >= reach.max() - 0.5
        x, y = (int(np.floor(v)) for v in centres[near].mean(0))
        if x in (0, w - 1) or y in (0, h - 1):
            out += [0, 0, 0]  # the shape continues outside the image: not labelled
        else:
            out += [x, y, 2 if visible[ys[near], xs[near]].mean() >= 0.5 else 1]
    return out


def person_annotations(scene: Scene, instance_anns: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The person-keypoint annotations of one image: ``instance_anns`` (``coco.instance_annotations`` of the
    same scene, one per thing with a visible pixel, in paint order) restricted to the person class, with the
    same id, bbox, area, segmentation and iscrowd, plus keypoints, in the real files' key order."""
    shown = [i for i in range(len(scene.things)) if scene.visible(i).any()]
    out = []
    for i, ann in zip(shown, instance_anns, strict=True):
        if ann["category_id"] != PERSON_CATEGORY_ID:
            continue
        thing = scene.things[i]
        assert thing.cls == PERSON_THING_CLASS and thing.amodal is not None
        if ann.get("iscrowd", 0):
            keypoints = [0] * (3 * len(KEYPOINT_NAMES))
        else:
            keypoints = person_keypoints(thing.amodal | scene.visible(i), scene.visible(i))
        out.append({"segmentation": ann["segmentation"], "num_keypoints": sum(v > 0 for v in keypoints[2::3]),
                    "area": ann["area"], "iscrowd": ann.get("iscrowd", 0), "keypoints": keypoints,
                    "image_id": ann["image_id"], "bbox": ann["bbox"], "category_id": PERSON_CATEGORY_ID,
                    "id": ann["id"]})
    return out
