"""Periodic validation of a fine-tuning run: L2, PSNR and LPIPS over held-out pairs, and a sample grid image."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from difix3d.imageio import to_uint8, write_image


@torch.no_grad()
def validation_sums(model: nn.Module, batches: list[dict], device: torch.device, lpips_net: nn.Module | None,
                    autocast) -> tuple[dict[str, float], list[np.ndarray]]:
    """Per-worker sums over its validation batches (``n``, ``l2``, ``psnr``, ``lpips``) to all-reduce, and the
    uint8 rows ``degraded | output | target`` of its first batch for a sample grid.

    ``model`` is the plain fixer (``forward(x, ref)`` → input view only): validation measures what serving gets.
    """
    sums = {"n": 0.0, "l2": 0.0, "psnr": 0.0, "lpips": 0.0}
    grid_rows: list[np.ndarray] = []
    was_training = model.training
    model.eval()
    for batch in batches:
        x, target = batch["x"].to(device), batch["target"].to(device)  # [B, 3, H, W] in [-1, 1]
        ref = batch["ref"].to(device) if batch["ref"] is not None else None
        with autocast():
            out = model(x, ref).float()
        mse = ((out - target) / 2).pow(2).flatten(1).mean(1)  # per image, on [0, 1] images
        sums["n"] += float(x.shape[0])
        sums["l2"] += float(mse.sum())
        sums["psnr"] += float((-10.0 * torch.log10(mse.clamp_min(1e-10))).sum())
        if lpips_net is not None:
            sums["lpips"] += float(lpips_net(out, target).flatten().sum())
        if not grid_rows:
            images = [to_uint8((t.float().cpu() + 1) / 2) for t in (x, out, target)]  # 3 × [B, H, W, 3]
            grid_rows = [np.concatenate([im[i] for im in images], axis=1) for i in range(x.shape[0])]
    model.train(was_training)
    return sums, grid_rows


def write_sample_grid(uri: str, rows: list[np.ndarray], max_rows: int) -> None:
    """Stack ``degraded | output | target`` rows into one PNG at ``uri``."""
    if rows:
        write_image(uri, np.concatenate(rows[:max_rows], axis=0))
