"""The interface every 3D representation implements (3DGS now, NeRF later), so the trainer, the progressive
Difix3D loop and curation never depend on one backend."""

from __future__ import annotations

import abc
from dataclasses import dataclass

from torch import Tensor

from difix3d.scene.camera import Camera


@dataclass
class RenderOutput:
    rgb: Tensor  # [B, 3, H, W] float in [0, 1]
    alpha: Tensor  # [B, 1, H, W] accumulated opacity
    depth: Tensor | None = None  # [B, 1, H, W] expected depth (camera z), None when the backend has none


class Representation(abc.ABC):
    """A trainable scene representation: render any cameras, take optimizer steps on posed images."""

    @abc.abstractmethod
    def render(self, cameras: list[Camera]) -> RenderOutput:
        """Render cameras (same width/height) without gradients."""

    @abc.abstractmethod
    def train_step(self, cameras: list[Camera], images: Tensor, weights: Tensor | None = None,
                   masks: Tensor | None = None) -> dict:
        """One optimizer step on images [B, 3, H, W] in [0, 1] seen by cameras, with per-view loss weights [B]
        and pixel masks [B, 1, H, W]; includes the backend's own bookkeeping (e.g. densification).
        Returns scalars for logging (at least "loss")."""

    @abc.abstractmethod
    def state_dict(self) -> dict:
        """Everything needed to resume training exactly: parameters, optimizer and strategy state, step. Tensors may
        be the live ones on the training device (as torch's ``Optimizer.state_dict``): copy before training goes on
        (``recon.background_writes.snapshot`` / ``DeviceSnapshot``), or write at once."""

    @abc.abstractmethod
    def load_state_dict(self, state: dict) -> None:
        ...

    @abc.abstractmethod
    def export(self, uri: str) -> None:
        """Write the representation in its standard interchange format (PLY for 3DGS)."""

    @property
    @abc.abstractmethod
    def num_primitives(self) -> int:
        """Gaussians, or samples/cells for other backends; shown in progress bars."""

    @property
    @abc.abstractmethod
    def step(self) -> int:
        """Optimizer steps taken so far."""


def common_size(cameras: list[Camera]) -> tuple[int, int]:
    """(width, height) shared by a batch of cameras: every backend renders a batch at one size."""
    if not cameras:
        raise ValueError("no cameras given")
    sizes = {(c.width, c.height) for c in cameras}
    if len(sizes) > 1:
        raise ValueError(f"cameras of one batch must share a size, got {sorted(sizes)}")
    return sizes.pop()
