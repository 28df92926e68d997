"""A pinhole camera in the OpenCV convention (x right, y down, z forward).

``viewmat`` is world→camera (what gsplat takes), ``K`` the 3×3 pixel intrinsics. Other conventions
(nerfstudio/Blender OpenGL camera→world, drivestudio camera→ego) are converted at the readers, once.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch


@dataclass
class Camera:
    viewmat: np.ndarray  # [4, 4] float64, world -> camera (OpenCV)
    K: np.ndarray  # [3, 3] float64 pixel intrinsics
    width: int
    height: int
    dist: np.ndarray | None = None  # [5] k1 k2 p1 p2 k3 (OpenCV order), None = undistorted
    name: str = ""  # e.g. "000_front" — unique within a scene
    camera_id: str = ""  # rig camera name, e.g. "front"
    timestamp: float = 0.0
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.viewmat = np.asarray(self.viewmat, dtype=np.float64).reshape(4, 4)
        self.K = np.asarray(self.K, dtype=np.float64).reshape(3, 3)
        self.width, self.height = int(self.width), int(self.height)
        if self.dist is not None:
            self.dist = np.asarray(self.dist, dtype=np.float64).reshape(-1)
        # a NaN pose or a 0-pixel camera renders nothing and trains every Gaussian into NaN: refused where it is made
        if not (np.isfinite(self.viewmat).all() and np.isfinite(self.K).all()):
            raise ValueError(f"camera {self.name!r}: its pose or intrinsics hold NaN or inf")
        if self.width < 1 or self.height < 1:
            raise ValueError(f"camera {self.name!r}: size {self.width}x{self.height} has no pixels")

    @property
    def c2w(self) -> np.ndarray:
        """camera→world [4, 4] (OpenCV axes)."""
        return np.linalg.inv(self.viewmat)

    @property
    def position(self) -> np.ndarray:
        """camera centre in world coordinates [3]."""
        R, t = self.viewmat[:3, :3], self.viewmat[:3, 3]
        return -R.T @ t

    @property
    def rotation_c2w(self) -> np.ndarray:
        return self.viewmat[:3, :3].T

    @classmethod
    def from_c2w(cls, c2w: np.ndarray, K: np.ndarray, width: int, height: int, **kw) -> "Camera":
        return cls(viewmat=np.linalg.inv(np.asarray(c2w, dtype=np.float64)), K=K, width=width, height=height, **kw)

    def with_pose(self, viewmat: np.ndarray, **kw) -> "Camera":
        return replace(self, viewmat=np.asarray(viewmat, dtype=np.float64), **kw)

    def scaled(self, factor: float) -> "Camera":
        """The same camera at ``factor`` × resolution (intrinsics scaled with it)."""
        K = self.K.copy()
        K[:2] *= factor
        return replace(self, K=K, width=int(round(self.width * factor)), height=int(round(self.height * factor)))

    def project(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """World points [N, 3] → (pixel coords [N, 2], depth [N]) ignoring distortion."""
        pc = points @ self.viewmat[:3, :3].T + self.viewmat[:3, 3]
        z = pc[:, 2]
        uv = (pc[:, :2] / np.where(np.abs(z) < 1e-12, 1e-12, z)[:, None]) @ self.K[:2, :2].T + self.K[:2, 2]
        return uv, z

    def torch_viewmat(self, device=None) -> torch.Tensor:
        return torch.as_tensor(self.viewmat, dtype=torch.float32, device=device)

    def torch_K(self, device=None) -> torch.Tensor:
        return torch.as_tensor(self.K, dtype=torch.float32, device=device)

    def to_dict(self) -> dict:
        return {
            "viewmat": self.viewmat.tolist(), "K": self.K.tolist(), "width": self.width, "height": self.height,
            "dist": None if self.dist is None else self.dist.tolist(), "name": self.name,
            "camera_id": self.camera_id, "timestamp": self.timestamp, "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Camera":
        return cls(viewmat=np.array(d["viewmat"]), K=np.array(d["K"]), width=d["width"], height=d["height"],
                   dist=None if d.get("dist") is None else np.array(d["dist"]), name=d.get("name", ""),
                   camera_id=d.get("camera_id", ""), timestamp=d.get("timestamp", 0.0), meta=d.get("meta", {}))
