"""What a result was produced with: package versions, device, git commit."""

import os
import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

PACKAGES = [
    "torch",
    "transformers",
    "peft",
    "datasets",
    "numpy",
    "pandas",
    "scikit-learn",
    "nvidia-ml-py",
    "petl-harness",
]


def git_commit() -> str | None:
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        return commit.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def describe(device: torch.device) -> dict:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    env = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": versions,
        "device": device_name(device),
        "device_type": device.type,
        "git_commit": git_commit(),
        "hostname": platform.node(),
        "cpu_count": os.cpu_count(),
    }
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
        env["gpu_total_bytes"] = torch.cuda.get_device_properties(device).total_memory
    return env


# Dense peak FLOP/s of GPUs from their vendors' datasheets (no sparsity), per autocast precision: bf16 and fp16
# on the tensor cores, fp32 without TF32 (torch's default for matmuls). Matched in order against
# torch.cuda.get_device_name; a device not listed gets no peak, and its MFU is left empty.
PEAK_FLOPS = [
    ("H100 PCIe", {"bf16": 756e12, "fp16": 756e12, "fp32": 51.2e12}),
    ("H100", {"bf16": 989.4e12, "fp16": 989.4e12, "fp32": 66.9e12}),  # SXM
    ("H200", {"bf16": 989.4e12, "fp16": 989.4e12, "fp32": 66.9e12}),
    ("A100", {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12}),
]


def peak_flops(device: torch.device, precision: str) -> float | None:
    """The device's datasheet peak FLOP/s at `precision` (fp32, bf16, fp16), or None where unknown (any CPU)."""
    if device.type != "cuda":
        return None
    name = device_name(device)
    return next((peaks.get(precision) for part, peaks in PEAK_FLOPS if part in name), None)
