"""The per-scene output layout of a progressive Difix3D+ reconstruction (the evaluation job reads these paths).

```
<out>/renders/<method>/<split>/<view_name>.png   method: baseline | difix3d | difix3d_plus
<out>/renders/gt/<split>/<view_name>.png
<out>/gaussians.ply                               final representation (Difix3D)
<out>/pseudo/round_<k>/<view_name>.png            fixed pseudo views added in round k
<out>/metrics.json                                {split: {method: {psnr, ssim, lpips?}}} + timings
<out>/config.json                                 the ProgressiveConfig used
<out>/state/                                      resume state (see difix3d.recon.progressive)
```
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from difix3d import imageio, storage

METHODS = ("baseline", "difix3d", "difix3d_plus")  # the paper's three rows (Tab. 1-3, arXiv 2503.01774)
GT = "gt"


@dataclass(frozen=True)
class SceneOutputs:
    """Paths of one scene's outputs under ``root`` (any storage URI)."""

    root: str

    def render(self, method: str, split: str, view_name: str) -> str:
        return storage.join(self.root, "renders", method, split, f"{view_name}.png")

    def gt(self, split: str, view_name: str) -> str:
        return self.render(GT, split, view_name)

    def pseudo(self, round_index: int, view_name: str) -> str:
        return storage.join(self.root, "pseudo", f"round_{round_index}", f"{view_name}.png")

    @property
    def gaussians(self) -> str:
        return storage.join(self.root, "gaussians.ply")

    def representation(self, kind: str) -> str:
        """Where the final representation is exported: the 3DGS PLY, or the NeRF's weights file."""
        return self.gaussians if kind == "3dgs" else storage.join(self.root, f"{kind}.pt")

    @property
    def metrics(self) -> str:
        return storage.join(self.root, "metrics.json")

    @property
    def config(self) -> str:
        return storage.join(self.root, "config.json")

    def state(self, *parts: str) -> str:
        return storage.join(self.root, "state", *parts)

    def write_renders(self, method: str, split: str, names: list[str], images: np.ndarray | list[np.ndarray]) -> None:
        """uint8 ``[H, W, 3]`` images (a list, or a ``[B, H, W, 3]`` array) named ``names`` under
        ``renders/<method>/<split>/``."""
        for name, image in zip(names, images):
            imageio.write_image(self.render(method, split, name), image)
