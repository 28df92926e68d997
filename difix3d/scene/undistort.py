"""Pinhole views of a scene whose cameras have lens distortion, for renderers that take no distortion (3DGS).

Each distorted camera becomes a pinhole camera of the same size (OpenCV's ``getOptimalNewCameraMatrix`` with
``alpha=0``: only valid pixels, as COLMAP's undistorter and gsplat's COLMAP parser do), and its images are remapped
when they are loaded. Written by hand because the scene readers keep the raw images; the maths is OpenCV's.
"""

from __future__ import annotations

import copy
import dataclasses
import logging

import numpy as np

from difix3d.scene.camera import Camera
from difix3d.scene.scene import Scene, read_view_image

log = logging.getLogger(__name__)


def is_distorted(camera: Camera) -> bool:
    return camera.dist is not None and bool(np.any(np.abs(camera.dist) > 1e-9))


@dataclasses.dataclass
class UndistortedScene(Scene):
    """A :class:`Scene` whose ``load_image`` remaps the views listed in ``remaps`` (view index -> cv2 maps)."""

    remaps: dict = dataclasses.field(default_factory=dict)
    source_cameras: list = dataclasses.field(default_factory=list)  # the distorted cameras the files were taken with

    def load_image(self, i: int) -> np.ndarray:
        if i not in self.remaps:
            return super().load_image(i)
        import cv2

        image = read_view_image(self.image_uris[i], self.source_cameras[i])
        map1, map2 = self.remaps[i]
        return cv2.remap(image, map1, map2, interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)

    def image_file(self, i: int) -> tuple[bytes, str]:
        """A remapped view is stored as its undistorted pixels (PNG): its file holds the distorted ones, which the
        pinhole camera written beside it does not describe."""
        if i not in self.remaps:
            return super().image_file(i)
        from difix3d.imageio import encode_image

        return encode_image(self.load_image(i), fmt="png"), "png"


def undistorted(scene: Scene) -> Scene:
    """``scene`` itself when no camera is distorted (or OpenCV is missing: then a warning), else an
    :class:`UndistortedScene` with pinhole cameras; frames of one physical camera share one remap table."""
    distorted = [i for i, c in enumerate(scene.cameras) if is_distorted(c)]
    if not distorted:
        return scene
    try:
        import cv2
    except ImportError:
        log.warning("%s: %d cameras have lens distortion, and undistorting their images needs OpenCV "
                    "(pip install opencv-python-headless): training them as pinhole views",
                    scene.root or scene.name, len(distorted))
        return scene
    cameras, remaps, tables = list(scene.cameras), {}, {}
    for i in distorted:
        cam = scene.cameras[i]
        key = (cam.K.tobytes(), cam.dist.tobytes(), cam.width, cam.height)
        if key not in tables:
            size = (cam.width, cam.height)
            new_k, _ = cv2.getOptimalNewCameraMatrix(cam.K, cam.dist, size, 0.0, size)
            maps = cv2.initUndistortRectifyMap(cam.K, cam.dist, None, new_k, size, cv2.CV_32FC1)
            tables[key] = (np.asarray(new_k, dtype=np.float64), maps)
        new_k, maps = tables[key]
        pinhole = copy.copy(cam)
        pinhole.K, pinhole.dist = new_k.copy(), None
        cameras[i], remaps[i] = pinhole, maps
    log.info("%s: undistorted %d views (%d distinct intrinsics) to pinhole cameras for rendering",
             scene.root or scene.name, len(distorted), len(tables))
    fields = {f.name: getattr(scene, f.name) for f in dataclasses.fields(Scene)}
    return UndistortedScene(**{**fields, "cameras": cameras}, remaps=remaps, source_cameras=list(scene.cameras))
