"""The fixer as the original trains it: every view of a sample is decoded and supervised, the reference too.

``DifixModel.forward`` decodes only the input view (what serving needs); training with a reference needs the
reference view's output as well (original ``train_difix.py``: targets are ``[target, reference]``), so this wrapper
runs the fixer's own ``encode`` → ``denoise`` → ``decode`` stages on all views. It is the module DDP wraps, so
every stage runs inside DDP's forward.
"""

from __future__ import annotations

import torch
from torch import nn


class AllViewsFixer(nn.Module):
    """``forward(x, ref=None)`` → ``[B, V, 3, H, W]`` in [-1, 1]: view 0 fixes ``x``, view 1 (if any) ``ref``."""

    def __init__(self, fixer: nn.Module):
        super().__init__()
        self.fixer = fixer

    def forward(self, x: torch.Tensor, ref: torch.Tensor | None = None) -> torch.Tensor:
        b = x.shape[0]  # x, ref: [B, 3, H, W]
        views = x[:, None] if ref is None else torch.stack([x, ref], dim=1)  # [B, V, 3, H, W]
        v = views.shape[1]
        z, skips = self.fixer.encode(views.flatten(0, 1))  # [(B V), 4, H/8, W/8], a sample's views adjacent
        z0 = self.fixer.denoise(z, num_views=v)
        out = self.fixer.decode(z0, skips).clamp(-1.0, 1.0)  # the original clamps its output too
        return out.reshape(b, v, *out.shape[1:])


def training_targets(target: torch.Tensor, ref: torch.Tensor | None) -> torch.Tensor:
    """``[B, V, 3, H, W]`` targets matching :class:`AllViewsFixer`: the clean view, then the reference itself."""
    return target[:, None] if ref is None else torch.stack([target, ref], dim=1)
