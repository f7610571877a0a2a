"""What both benchmark suites write: the machine, targets with their verdicts, PNG plots, the files."""

from __future__ import annotations

import os
import platform

import ray
import torch

from talora.io.storage import StorageOptions, join, write_bytes


def machine(device: torch.device) -> dict:
    """Cores, torch threads, versions and device name: numbers belong to the machine they were taken on."""
    return {"device": device.type, "name": torch.cuda.get_device_name() if device.type == "cuda" else
            (platform.processor() or platform.machine()), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "ray": ray.__version__,
            "python": platform.python_version()}


def verdicts(measured: dict[str, tuple[float | None, float]]) -> dict:
    """{name: (value or None, target)} -> {name: {value, target, met}}: a target is shown, never asserted."""
    return {k: {"value": v, "target": t, "met": None if v is None else v >= t} for k, (v, t) in measured.items()}


def write_files(files: dict[str, bytes], out: str, storage: StorageOptions | None = None) -> list[str]:
    """Each {name: bytes} under `out` (any URI); returns the written URIs."""
    for name, data in files.items():
        write_bytes(join(out, name), data, storage)
    return [join(out, name) for name in files]
