"""A ``Scene``: cameras, their image URIs, named splits and optional points — what every reconstruction reads.

``load_scene(uri)`` picks the reader from what is at ``uri``: a nerfstudio ``transforms.json`` (the file or a
folder holding it) or a driving segment folder (``images/``, ``ego_pose/``, ``extrinsics/``, ``intrinsics/``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from difix3d import imageio, storage
from difix3d.errors import InputError
from difix3d.scene.camera import Camera

log = logging.getLogger(__name__)

# LLFF / Mip-NeRF 360 convention: every 8th view is held out for testing (also what gsplat's parser does)
DEFAULT_TEST_EVERY = 8


@dataclass
class Scene:
    name: str
    cameras: list[Camera]
    image_uris: list[str]  # one per camera
    splits: dict[str, list[int]]  # split name -> indices into cameras; at least "train" and "test"
    points: np.ndarray | None = None  # [N, 3] float32 world points for initialization
    point_colors: np.ndarray | None = None  # [N, 3] uint8
    root: str = ""  # URI the scene was read from
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.cameras) != len(self.image_uris):
            raise InputError(self.root or self.name,
                             f"{len(self.cameras)} cameras but {len(self.image_uris)} image URIs")
        for split, idx in self.splits.items():
            bad = [i for i in idx if not 0 <= i < len(self.cameras)]
            if bad:
                raise InputError(self.root or self.name, f"split {split!r} indexes missing views {bad[:5]}")
        if self.points is not None:
            self.points = np.asarray(self.points, dtype=np.float32).reshape(-1, 3)
            if self.point_colors is not None:
                self.point_colors = np.asarray(self.point_colors, dtype=np.uint8).reshape(-1, 3)
                if len(self.point_colors) != len(self.points):
                    raise InputError(self.root or self.name,
                                     f"{len(self.points)} points but {len(self.point_colors)} point colours")

    def __len__(self) -> int:
        return len(self.cameras)

    def load_image(self, i: int) -> np.ndarray:
        """uint8 [H, W, 3] of view ``i``; :class:`InputError` naming the file and frame when it is missing, corrupt
        or not the size its camera says."""
        return read_view_image(self.image_uris[i], self.cameras[i])

    def image_file(self, i: int) -> tuple[bytes, str]:
        """(file bytes, extension without the dot) of view ``i`` as a writer should store it: the file as it is."""
        uri = self.image_uris[i]
        return storage.read_bytes(uri), uri.rsplit(".", 1)[-1].lower() if "." in uri.rsplit("/", 1)[-1] else "png"

    def subset(self, split: str) -> tuple[list[Camera], list[str]]:
        """(cameras, image URIs) of a split; KeyError listing the splits there are."""
        if split not in self.splits:
            raise KeyError(f"scene {self.name!r} has no split {split!r} (has {sorted(self.splits)})")
        idx = self.splits[split]
        return [self.cameras[i] for i in idx], [self.image_uris[i] for i in idx]

    def index_of(self, name: str) -> int:
        """Index of the camera called ``name``."""
        for i, c in enumerate(self.cameras):
            if c.name == name:
                return i
        raise KeyError(f"scene {self.name!r} has no camera {name!r}")


def read_view_image(uri: str, cam: Camera) -> np.ndarray:
    """uint8 [H, W, 3] at ``uri``, checked to be ``cam``'s size; errors name the file and the frame."""
    try:
        image = imageio.read_image(uri)
    except InputError as e:
        raise InputError(uri, f"frame {cam.name!r}: {e.problem}") from e
    if image.shape[:2] != (cam.height, cam.width):
        raise InputError(uri, f"frame {cam.name!r}: image is {image.shape[1]}x{image.shape[0]} but its camera "
                              f"is {cam.width}x{cam.height} (inconsistent sizes)")
    return image


def finite_points(points: np.ndarray, colors: np.ndarray | None, uri: str,
                  allow_empty: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """Initial points [N, 3] (and their colors) without the rows holding NaN or infinity (lidar files mark missing
    returns so), with a warning naming ``uri``; an error when none is left (unless ``allow_empty``: one lidar sweep
    of many). Points only seed a reconstruction, so dropping a few beats failing the scene, while a non-finite one
    would fail it later naming no file."""
    points = np.asarray(points)
    if points.ndim != 2 or points.shape[1] != 3:
        raise InputError(uri, f"points must be [N, 3], got shape {list(points.shape)}")
    if colors is not None and (np.shape(colors) != points.shape):
        raise InputError(uri, f"colors shape {list(np.shape(colors))} does not match points {list(points.shape)}")
    keep = np.isfinite(points).all(axis=1)
    if keep.all():
        return points, colors
    if not keep.any() and not allow_empty:
        raise InputError(uri, f"all {len(points)} points are NaN or infinite")
    log.warning("%s: dropped %d of %d points holding NaN or infinity", uri, int((~keep).sum()), len(points))
    return points[keep], None if colors is None else np.asarray(colors)[keep]


def every_nth_split(n_views: int, test_every: int = DEFAULT_TEST_EVERY) -> dict[str, list[int]]:
    """Every ``test_every``-th view (0, N, 2N, ...) is a test view, the rest train."""
    test = list(range(0, n_views, test_every)) if test_every > 0 else []
    held = set(test)
    return {"train": [i for i in range(n_views) if i not in held], "test": test}


def load_scene(uri: str, **kw) -> Scene:
    """Read a scene, detecting its layout: nerfstudio ``transforms.json`` (file or folder) or a driving segment."""
    uri = str(uri)
    if uri.endswith(".json"):
        from difix3d.scene.nerfstudio import load_nerfstudio

        return load_nerfstudio(uri, **kw)
    if storage.exists(storage.join(uri, "transforms.json")):
        from difix3d.scene.nerfstudio import load_nerfstudio

        return load_nerfstudio(storage.join(uri, "transforms.json"), **kw)
    if storage.exists(storage.join(uri, "ego_pose")) or storage.exists(storage.join(uri, "extrinsics")):
        from difix3d.scene.driving import load_driving

        return load_driving(uri, **kw)
    if not storage.exists(uri):
        raise InputError(uri, "scene not found")
    raise InputError(uri, "unknown scene layout: expected transforms.json (nerfstudio) or a driving segment "
                          "(images/, ego_pose/, extrinsics/, intrinsics/)")
