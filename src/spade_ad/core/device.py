"""Which torch device a setting names: `resolve_device("auto")` is CUDA when available, else the CPU; an
unavailable CUDA device is a SettingError naming `device`."""

from __future__ import annotations

import torch

from ..errors import SettingError


def resolve_device(device: str) -> torch.device:
    """"auto" -> cuda when available, else cpu; an unavailable CUDA device is a SettingError naming `device`."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise SettingError("device", "asks for CUDA, which is not available here", device, "cpu or auto")
    return resolved
