"""Distorted cameras become pinhole cameras whose remapped images put every point where the pinhole model says."""

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2")

from difix3d.imageio import write_image  # noqa: E402
from difix3d.scene.camera import Camera  # noqa: E402
from difix3d.scene.scene import Scene  # noqa: E402
from difix3d.scene.undistort import undistorted  # noqa: E402

W, H = 96, 72


def _scene(tmp_path, dist):
    K = np.array([[80.0, 0, 47.5], [0, 80.0, 35.5], [0, 0, 1]])
    cams, uris = [], []
    point = np.array([[0.45, -0.3, 1.0]])  # camera coordinates (the camera sits at the world origin)
    uv, _ = cv2.projectPoints(point, np.zeros(3), np.zeros(3), K, np.zeros(5) if dist is None else dist)
    image = np.zeros((H, W, 3), np.uint8)
    u, v = np.round(uv[0, 0]).astype(int)
    image[v - 1:v + 2, u - 1:u + 2] = 255  # a 3x3 dot where the distorted camera sees the point
    for i in range(2):
        uri = str(tmp_path / f"{i}.png")
        write_image(uri, image)
        cams.append(Camera(viewmat=np.eye(4), K=K, width=W, height=H, dist=dist, name=f"v{i}"))
        uris.append(uri)
    return Scene("s", cams, uris, {"train": [0], "test": [1]}), point


def test_distorted_views_are_remapped_to_their_pinhole_cameras(tmp_path):
    scene, point = _scene(tmp_path, np.array([-0.3, 0.05, 0.001, -0.001, 0.0]))
    pinhole = undistorted(scene)
    assert pinhole is not scene and all(c.dist is None for c in pinhole.cameras)
    assert scene.cameras[0].dist is not None  # the source scene is left as it was
    image = pinhole.load_image(0)
    assert image.shape == (H, W, 3)
    ys, xs = np.nonzero(image[..., 0] > 100)
    found = np.array([xs.mean(), ys.mean()])
    expected, _ = pinhole.cameras[0].project(point)  # the pinhole camera at the origin: world = camera coordinates
    assert np.linalg.norm(found - expected[0]) < 1.0
    distorted_at = np.array(np.nonzero(scene.load_image(0)[..., 0] > 100))[::-1].mean(1)
    as_pinhole, _ = scene.cameras[0].project(point)  # where a pinhole renderer with the raw K would expect it
    assert np.linalg.norm(distorted_at - as_pinhole[0]) > 3.0  # without the remap the view is misregistered


def test_an_undistorted_scene_is_returned_as_it_is(tmp_path):
    scene, _ = _scene(tmp_path, None)
    assert undistorted(scene) is scene
