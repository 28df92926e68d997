"""Per-view image metrics on float ``[B, 3, H, W]`` images in ``[0, 1]``, one value per image.

Thin wrappers over torchmetrics' functional metrics that fix the conventions used across the project (data range
1.0, per-image reduction, SSIM with the Gaussian 11×11 / σ = 1.5 window of Wang et al. 2004, the torchmetrics
default), so every caller reports the same numbers.
"""

from __future__ import annotations

import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

PER_VIEW_METRICS = ("psnr", "ssim", "lpips")  # one value per view
SET_METRICS = ("fid", "kid")  # one value per method over the whole set
ALL_METRICS = PER_VIEW_METRICS + SET_METRICS
HIGHER_IS_BETTER = {"psnr": True, "ssim": True, "lpips": False, "fid": False, "kid": False}


def psnr(preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """PSNR in dB per image: ``[B, 3, H, W]`` x2 → ``[B]``; identical images give ``+inf`` (MSE = 0)."""
    _check_pair(preds, target)
    return peak_signal_noise_ratio(preds.float(), target.float(), data_range=1.0, reduction="none", dim=(1, 2, 3))


def ssim(preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """SSIM per image: ``[B, 3, H, W]`` x2 → ``[B]`` in [-1, 1]; identical images give 1."""
    _check_pair(preds, target)
    out = structural_similarity_index_measure(preds.float(), target.float(), data_range=1.0, reduction="none")
    return out.reshape(preds.shape[0])


@torch.no_grad()
def lpips(model: torch.nn.Module, preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """LPIPS per image with an ``lpips.LPIPS``-like ``model`` (inputs in [-1, 1]): ``[B, 3, H, W]`` x2 → ``[B]``."""
    _check_pair(preds, target)
    return model(preds * 2.0 - 1.0, target * 2.0 - 1.0).reshape(preds.shape[0]).float()


def _check_pair(preds: torch.Tensor, target: torch.Tensor) -> None:
    if preds.shape != target.shape or preds.ndim != 4 or preds.shape[1] != 3:
        raise ValueError(f"expected two [B, 3, H, W] batches of one shape, got {tuple(preds.shape)} and "
                         f"{tuple(target.shape)}")
