"""The one place that chooses devices and dtypes: CUDA when present, CPU otherwise."""

from __future__ import annotations

import torch


def default_device(prefer: str | torch.device | None = None) -> torch.device:
    """``prefer`` if given ("cpu", "cuda", "cuda:1"), else CUDA when available, else CPU."""
    if prefer is not None:
        return torch.device(prefer)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA (fast, no loss scaling needed), fp32 on CPU (bf16 matmuls are slow there)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32
