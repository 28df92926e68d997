"""The one place that chooses devices and dtypes: CUDA when present, CPU otherwise."""

from __future__ import annotations

import torch


def default_device(prefer: str | torch.device | None = None) -> torch.device:
    """``prefer`` if given ("cpu", "cuda", "cuda:1"), else CUDA when available, else CPU."""
    if prefer is not None:
        from difix3d.errors import Difix3DError

        try:
            device = torch.device(prefer)
        except (RuntimeError, TypeError):
            raise Difix3DError(f"device {str(prefer)!r} is not a torch device: use cpu, cuda or cuda:N") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise Difix3DError(f"device {str(prefer)!r} was asked for, but torch sees no CUDA GPU here "
                               "(torch.cuda.is_available() is False): use the CPU (--device cpu) or a GPU host")
        return device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA (fast, no loss scaling needed), fp32 on CPU (bf16 matmuls are slow there)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def global_rng_state() -> dict:
    """torch's global generators (CPU, and every CUDA device's), as checkpoints save them: ``torch_rng``,
    ``cuda_rng`` (None without CUDA). Densification and other library code draw from these."""
    return {"torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_global_rng_state(state: dict) -> None:
    """Restore :func:`global_rng_state` (CUDA generators only when saved and CUDA is present)."""
    torch.set_rng_state(state["torch_rng"])
    if state.get("cuda_rng") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
