"""Photometric loss of 3DGS: (1 − λ)·L1 + λ·(1 − SSIM), λ = 0.2 (3DGS paper, Kerbl et al. 2023, Eq. 7),
with a per-view weight and an optional per-pixel mask (the progressive Difix3D loop down-weights pseudo views
and masks their unreliable pixels).

SSIM is written here rather than taken from torchmetrics because the masked loss needs the per-pixel SSIM map;
the window is the standard 11×11 Gaussian with σ = 1.5 (Wang et al. 2004), zero-padded as in the 3DGS code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

SSIM_C1 = 0.01 ** 2
SSIM_C2 = 0.03 ** 2


def photometric_loss(
    render: Tensor,  # [B, 3, H, W] in [0, 1]
    target: Tensor,  # [B, 3, H, W] in [0, 1]
    weights: Tensor | None = None,  # [B] per-view loss weights (1 = a real training view)
    masks: Tensor | None = None,  # [B, 1, H, W] in [0, 1]; 0 = pixel ignored
    ssim_lambda: float = 0.2,
) -> tuple[Tensor, dict]:
    """→ (scalar loss = mean_b w_b·loss_b, {"l1": [B], "ssim": [B]} detached per-view terms).

    A view's terms average over its masked pixels only, so a mask removes pixels without shrinking the rest;
    the weight scales the view's whole contribution (weight 0 ⇒ no gradient from that view).
    """
    if render.shape != target.shape:
        raise ValueError(f"render {tuple(render.shape)} and target {tuple(target.shape)} differ in shape")
    B = render.shape[0]
    if masks is None:
        masks = render.new_ones(B, 1, *render.shape[-2:])
    elif masks.shape != (B, 1, *render.shape[-2:]):
        raise ValueError(f"masks {tuple(masks.shape)}: expected {(B, 1, *render.shape[-2:])}")
    if weights is None:
        weights = render.new_ones(B)
    elif weights.shape != (B,):
        raise ValueError(f"weights {tuple(weights.shape)}: expected ({B},)")
    area = masks.flatten(1).sum(dim=1).clamp_min(1e-8)  # [B]
    l1 = ((render - target).abs().mean(dim=1, keepdim=True) * masks).flatten(1).sum(dim=1) / area  # [B]
    dssim = ((1.0 - ssim_map(render, target).mean(dim=1, keepdim=True)) * masks).flatten(1).sum(dim=1) / area
    per_view = (1.0 - ssim_lambda) * l1 + ssim_lambda * dssim  # [B]; a fully masked view gives 0
    loss = (weights.to(per_view) * per_view).mean()
    return loss, {"l1": l1.detach(), "ssim": (1.0 - dssim).detach()}


def ssim_map(x: Tensor, y: Tensor, window_size: int = 11, sigma: float = 1.5) -> Tensor:
    """Per-pixel SSIM [B, C, H, W] of two image batches [B, C, H, W] in [0, 1]."""
    C = x.shape[1]
    coords = torch.arange(window_size, dtype=x.dtype, device=x.device) - window_size // 2
    g = torch.exp(-coords ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    window = (g[:, None] * g[None, :]).expand(C, 1, window_size, window_size).contiguous()  # [C, 1, k, k]

    def blur(t: Tensor) -> Tensor:
        return F.conv2d(t, window, padding=window_size // 2, groups=C)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x ** 2
    var_y = blur(y * y) - mu_y ** 2
    cov = blur(x * y) - mu_x * mu_y
    return ((2 * mu_x * mu_y + SSIM_C1) * (2 * cov + SSIM_C2)) / (
        (mu_x ** 2 + mu_y ** 2 + SSIM_C1) * (var_x + var_y + SSIM_C2))
