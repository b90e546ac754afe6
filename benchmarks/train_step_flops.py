"""FLOPs of one training step and the device's peak, for the model FLOP utilisation of benchmarks/train_step.py.

MFU = images/s × FLOPs per image / peak FLOP/s. The FLOPs are those ``torch.utils.flop_counter.FlopCounterMode``
counts on one step of the method (student and teacher forward, loss, backward: matmuls, convolutions and
attention; element-wise work is not counted, as in the usual MFU definition). The peak is the dense bf16
tensor-core figure of the vendor's data sheet (fp16 dense is the same on these parts, so the official-style
fp16 loop is measured against the same peak); a device not in the table, and the CPU, get no MFU.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

# dense bf16 tensor-core peak, FLOP/s, by a substring of torch.cuda.get_device_name() (first match wins)
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989e12),            # NVIDIA H200 data sheet: 1979 TFLOP/s with sparsity, 989 dense
    ("H100 80GB HBM3", 989e12),  # the H100 SXM part's name in torch
    ("H100 SXM", 989e12),
    ("A100", 312e12),            # A100 data sheet: 312 TFLOP/s bf16 dense (SXM and PCIe)
)


def peak_flops(device: torch.device) -> float | None:
    """The table's dense bf16 peak for a CUDA device, None for the CPU or a device not in the table."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS if key in name), None)


def step_flops(method: Any, batch: Any, device: torch.device, to_device: Any) -> int:
    """FLOPs of one forward + backward of ``method.loss`` on ``batch``, on a copy (the method's state, e.g.
    DINO's centre, stays untouched)."""
    counted = copy.deepcopy(method).to(device)
    with FlopCounterMode(display=False) as counter:
        loss, _ = counted.loss(to_device(batch, device), 0)
        loss.backward()
    del counted
    return int(counter.get_total_flops())


def mfu(images_per_s: float, flops_per_image: float, peak: float | None) -> float | None:
    return None if peak is None or flops_per_image <= 0 else images_per_s * flops_per_image / peak
