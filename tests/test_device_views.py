"""The device data path (train.data_path: device) against the CPU path: same batch layout, same view statistics,
crop boxes and flips that describe the crop's content, and training through the trainer."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image
from torch.utils.data import default_collate

from densessl.data.device_views import DeviceMultiCrop, normalised_boxes, sample_resized_crops
from densessl.data.imagenet import FlatImageFolder
from densessl.data.jpeg_bytes import EncodedImages, collate_encoded, decode_images, pil_to_uint8
from densessl.data.synthetic.scenes import render_scene
from densessl.data.views import ColorAugmentation, CropSpec, MultiCropViews, crop_box
from densessl.errors import ConfigError
from densessl.methods import get_method
from densessl.train.data_path import build_data_path
from densessl.train.trainer import TrainConfig, Trainer

CPU = torch.device("cpu")
DINO_CROPS = [CropSpec(32, (0.4, 1.0), 1, blur_prob=1.0), CropSpec(32, (0.4, 1.0), 1, blur_prob=0.1, solarize_prob=0.2),
              CropSpec(16, (0.05, 0.4), 2, blur_prob=0.5)]


@pytest.fixture(scope="module")
def scenes() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(render_scene(rng, int(rng.integers(80, 130)), int(rng.integers(80, 130))).image)
            for _ in range(60)]


def test_normalised_boxes_are_crop_box_for_both_conventions():
    g = torch.Generator().manual_seed(0)
    heights, widths = torch.randint(20, 300, (50,), generator=g), torch.randint(20, 300, (50,), generator=g)
    crops = sample_resized_crops(heights, widths, (0.05, 1.0))
    for convention in ("edges", "pixel_index"):
        got = normalised_boxes(crops, heights, widths, convention)
        for k in range(50):
            top, left, h, w = crops[k].tolist()
            want = crop_box(left, top, w, h, int(widths[k]), int(heights[k]), convention)
            assert got[k].tolist() == pytest.approx(want, abs=1e-6)


def test_crop_sampler_draws_as_torchvision_get_params():
    """Same distribution of crop area and aspect; the fallback (no draw fits) is the same centred crop."""
    torch.manual_seed(0)
    image = Image.new("RGB", (120, 90))
    ref = torch.tensor([T.RandomResizedCrop.get_params(image, (0.08, 1.0), (3 / 4, 4 / 3)) for _ in range(3000)],
                       dtype=torch.float64)
    ours = sample_resized_crops(torch.full((3000,), 90), torch.full((3000,), 120), (0.08, 1.0)).to(torch.float64)
    q = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9], dtype=torch.float64)
    for crops in (ref, ours):
        assert ((crops[:, 0] + crops[:, 2] <= 90) & (crops[:, 1] + crops[:, 3] <= 120)).all()
    area_ref, area_ours = ref[:, 2] * ref[:, 3] / 10800, ours[:, 2] * ours[:, 3] / 10800
    assert torch.quantile(area_ours, q).tolist() == pytest.approx(torch.quantile(area_ref, q).tolist(), abs=0.03)
    aspect_ref, aspect_ours = (ref[:, 3] / ref[:, 2]).log(), (ours[:, 3] / ours[:, 2]).log()
    assert torch.quantile(aspect_ours, q).tolist() == pytest.approx(torch.quantile(aspect_ref, q).tolist(), abs=0.04)
    left_ref, left_ours = ref[:, 1] / (120 - ref[:, 3] + 1), ours[:, 1] / (120 - ours[:, 3] + 1)
    assert float(left_ours.mean()) == pytest.approx(float(left_ref.mean()), abs=0.03)
    wide = Image.new("RGB", (200, 10))  # no draw fits: the whole height, width cut to ratio 4/3, centred
    assert sample_resized_crops(torch.tensor([10]), torch.tensor([200]), (0.9, 1.0))[0].tolist() == \
        list(T.RandomResizedCrop.get_params(wide, (0.9, 1.0), (3 / 4, 4 / 3)))


def _plain_views(size: int, convention: str) -> MultiCropViews:
    """Geometry only: no colour, blur or solarisation, identity normalisation (crop values = pixels / 255)."""
    color = ColorAugmentation(jitter_prob=0.0, grayscale_prob=0.0, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    return MultiCropViews([CropSpec(size, (0.05, 1.0), 64, blur_prob=0.0)], color, box_convention=convention)


@pytest.mark.parametrize("convention", ["edges", "pixel_index"])
def test_boxes_and_flips_describe_the_crop_content(convention):
    """Red = x and green = y of the source pixel: the crop's ramps give back the box it reports and its flip."""
    height, width, size = 160, 200, 24
    yy, xx = np.mgrid[0:height, 0:width]
    image = torch.from_numpy(np.stack([xx, yy, np.zeros_like(xx)]).astype(np.uint8))
    torch.manual_seed(1)
    views = _plain_views(size, convention)
    out = DeviceMultiCrop(views)([image])
    crops = torch.cat(out["crops"]) * 255  # (64, 3, S, S)
    boxes, flips = out["boxes"][0], out["flips"][0]
    assert 10 < int(flips.sum()) < 54
    u = torch.arange(size, dtype=torch.float64)
    for k in range(64):
        x1, y1, x2, y2 = boxes[k].tolist()
        if convention == "edges":
            left, top, w, h = x1 * width, y1 * height, (x2 - x1) * width, (y2 - y1) * height
        else:
            left, top = x1 * (width - 1), y1 * (height - 1)
            w, h = (x2 - x1) * (width - 1) + 1, (y2 - y1) * (height - 1) + 1
        # where the bins lie inside the image, the sampled value is the bin centre's coordinate
        x_centre = left + (u + 0.5) * w / size - 0.5
        y_centre = top + (u + 0.5) * h / size - 0.5
        inside_x = (left + u * w / size - 0.5 >= 0) & (left + (u + 1) * w / size - 0.5 <= width - 1)
        inside_y = (top + u * h / size - 0.5 >= 0) & (top + (u + 1) * h / size - 0.5 <= height - 1)
        red = crops[k, 0].mean(0).to(torch.float64)  # per column
        green = crops[k, 1].mean(1).to(torch.float64)  # per row
        if flips[k]:
            red = red.flip(0)
        assert torch.allclose(red[inside_x], x_centre[inside_x], atol=0.02), (k, red, x_centre)
        assert torch.allclose(green[inside_y], y_centre[inside_y], atol=0.02), (k, green, y_centre)


def _batches(path, epochs: int) -> list[dict]:
    if path.name == "cpu":
        return [default_collate([path.dataset[(e, i)] for i in range(len(path.dataset))]) for e in range(epochs)]
    return [path.on_batch(collate_encoded([path.dataset[(e, i)] for i in range(len(path.dataset))]))
            for e in range(epochs)]


def test_device_views_have_the_cpu_views_statistics(scenes):
    """600 samples of DINO's recipe from both paths: per-channel mean/std of every crop kind, flip rate and the
    distribution of box areas agree. Measured here: between two CPU-path seeds the channel means differ by up to
    0.07 and the stds by up to 0.025; device vs CPU path by up to 0.07 and 0.036."""
    views = MultiCropViews(DINO_CROPS, ColorAugmentation())
    cpu = _batches(build_data_path("cpu", scenes, views, 0, CPU), 10)
    dev = _batches(build_data_path("device", scenes, views, 0, CPU), 10)
    for a, b in zip(cpu[0].values(), dev[0].values()):  # same layout
        assert [t.shape for t in a] == [t.shape for t in b] if isinstance(a, list) else a.shape == b.shape
        assert [t.dtype for t in a] == [t.dtype for t in b] if isinstance(a, list) else a.dtype == b.dtype
    for k in range(4):
        a = torch.cat([batch["crops"][k] for batch in cpu])
        b = torch.cat([batch["crops"][k] for batch in dev])
        assert b.mean((0, 2, 3)).tolist() == pytest.approx(a.mean((0, 2, 3)).tolist(), abs=0.1), k
        assert b.std((0, 2, 3)).tolist() == pytest.approx(a.std((0, 2, 3)).tolist(), abs=0.06), k
    q = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9])
    for batches in (cpu, dev):
        flips = torch.cat([batch["flips"] for batch in batches]).float()
        assert flips.mean().item() == pytest.approx(0.5, abs=0.05)
    for k in (0, 2):
        area = [torch.cat([(bx[:, k, 2] - bx[:, k, 0]) * (bx[:, k, 3] - bx[:, k, 1])
                           for bx in (batch["boxes"] for batch in batches)]) for batches in (cpu, dev)]
        assert torch.quantile(area[1], q).tolist() == pytest.approx(torch.quantile(area[0], q).tolist(), abs=0.05)


def test_jpeg_bytes_decode_like_pil_and_other_files_travel_as_pixels(scenes, tmp_path):
    buf = io.BytesIO()
    scenes[0].save(buf, format="JPEG", quality=92)
    (tmp_path / "a.jpg").write_bytes(buf.getvalue())
    scenes[1].save(tmp_path / "b.png")
    data = EncodedImages(FlatImageFolder(tmp_path))
    jpeg, png = data[(3, 0)], data[1]
    assert jpeg["epoch"] == 3 and jpeg["image"].ndim == 1 and png["image"].ndim == 3
    decoded = decode_images([jpeg["image"], png["image"]], CPU)
    with Image.open(tmp_path / "a.jpg") as im:
        reference = pil_to_uint8(im)
    assert decoded[0].shape == reference.shape
    assert (decoded[0].int() - reference.int()).abs().float().mean() < 1.0
    assert torch.equal(decoded[1], pil_to_uint8(scenes[1]))


def test_data_path_errors_name_the_setting(scenes):
    loca = get_method("loca")("vit-tiny-p8", {"reference_size": 32, "query_size": 32, "focal_size": 16}, epochs=1)
    with pytest.raises(ConfigError, match="data_path: cpu"):
        build_data_path("device", scenes, loca.views(), 0, CPU, "loca")
    with pytest.raises(ConfigError, match="allowed values: cpu, device"):
        build_data_path("gpu", scenes, MultiCropViews(DINO_CROPS), 0, CPU)


SMOKE = {
    "dino": ("vit-tiny-p8", dict(out_dim=16, hidden_dim=32, bottleneck_dim=8, global_size=32, local_size=16,
                                 local_crops_number=1)),
    "clove": ("resnet-tiny", dict(projector_hidden_dim=64, projector_out_dim=32, attn_heads=4, global_size=64,
                                  local_size=32, local_crops_number=1)),
}


def _jpeg_folder(scenes, folder):
    folder.mkdir()
    for i, image in enumerate(scenes[:16]):
        image.save(folder / f"{i:03d}.jpg", quality=92)
    return FlatImageFolder(folder)


def _trainer(name, data, out, workers=0, data_path="device"):
    arch, settings = SMOKE[name]
    torch.manual_seed(0)
    method = get_method(name)(arch, settings, epochs=2)
    cfg = TrainConfig(epochs=2, batch_size_per_gpu=4, lr=1e-3, warmup_epochs=1, num_workers=workers,
                      log_every_steps=1, precision="fp32", tensorboard=False, data_path=data_path)
    return Trainer(method, data, cfg, out, device="cpu")


@pytest.mark.parametrize("name,workers,data_path", [("dino", 1, "device"), ("clove", 0, "device"), ("dino", 1, "cpu")])
def test_pretraining_trains_and_resumes_exactly_with_persistent_workers(name, workers, data_path, scenes, tmp_path):
    """A few steps through the trainer from JPEG files (a persistent worker reading bytes for DINO on the device
    path, running the PIL views on the CPU path); stopping after 5 steps (one into epoch 1) and resuming gives the
    weights of the uninterrupted run, whose worker carried on into epoch 1 (the sampler hands it the epoch)."""
    data = _jpeg_folder(scenes, tmp_path / "images")
    whole = _trainer(name, data, tmp_path / "whole", workers, data_path)
    summary = whole.fit(max_steps=6)
    assert math.isfinite(summary["last_loss"])
    _trainer(name, data, tmp_path / "split", workers, data_path).fit(max_steps=5)
    resumed = _trainer(name, data, tmp_path / "split", workers, data_path)
    resumed.fit(max_steps=1)
    assert resumed.step == whole.step == 6  # 4 steps per epoch
    for (key, a), b in zip(whole._student().state_dict().items(), resumed._student().state_dict().values()):
        assert torch.equal(a, b), key
