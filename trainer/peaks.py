"""Peak dense FLOP/s of known GPUs, without torch: the trainer's MFU (trainer/mfu.py) and the rented-
cluster plan (launch/vast/plan.py, which runs on a laptop that may have no torch) read one table."""
from __future__ import annotations

import re

# name fragment (as torch.cuda.get_device_name prints it) -> dense FLOP/s of (bf16 tensor cores,
# TF32 tensor cores, fp32 without tensor cores): the datasheets' figures, halved where they are given
# with sparsity
GPU_PEAKS = {
    "H200": (989e12, 494.7e12, 67e12),
    "H200 NVL": (835e12, 417.5e12, 60e12),
    "H100 SXM": (989e12, 494.7e12, 67e12),
    "H100 80GB HBM3": (989e12, 494.7e12, 67e12),   # the SXM part's device name
    "H100 PCIe": (756e12, 378e12, 51e12),
    "H100 NVL": (835e12, 417.5e12, 60e12),
    "A100": (312e12, 156e12, 19.5e12),
    "L40S": (362e12, 183e12, 91.6e12),
    "L40": (181e12, 90.5e12, 90.5e12),
    "L4": (121e12, 60e12, 30.3e12),
    "A10": (125e12, 62.5e12, 31.2e12),
}


def gpu_peak(name: str, precision: str, tf32: bool = True) -> float | None:
    """The longest fragment found in the name as a whole word, so an "A10G" or an "A100" is not
    taken for an "A10", nor an "H200 NVL" for an "H200"; None for a GPU not in the table."""
    found = [f for f in GPU_PEAKS if re.search(rf"(?<!\w){re.escape(f)}(?!\w)", name)]
    if not found:
        return None
    bf16, tensor_fp32, plain_fp32 = GPU_PEAKS[max(found, key=len)]
    if precision == "bf16":
        return bf16
    return tensor_fp32 if tf32 else plain_fp32
