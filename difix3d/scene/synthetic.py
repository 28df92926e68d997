"""Synthetic driving segments with exact ground truth, written in the driving layout (see ``driving.py``).

A three-camera rig (front, front-left, front-right) drives a gently curving lane through a :class:`StreetScene`.
The splits mirror the paper's hard cases for driving (Difix3D+, Wu et al., CVPR 2025, Sec. 5.3):
- ``train``: sparse views — every ``every_nth_train``-th frame of the rig's cameras;
- ``test``: the other frames of the same cameras (interpolation);
- ``cross_camera``: every frame of the ``holdout_cameras`` (never trained on);
- ``shift_1m`` / ``shift_2m`` / ``shift_3m``: the ``shift_cameras`` moved 1/2/3 m to the left of the driven
  trajectory (a lane change), written as cameras ``{cam}_shift{s}m`` with their own extrinsics.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import numpy as np

from difix3d import storage
from difix3d.scene.camera import Camera
from difix3d.scene.driving import OPENCV2DATASET, write_driving
from difix3d.scene.scene import Scene
from difix3d.scene.street import StreetLayout, StreetScene

SYNTHETIC_FILE = "difix3d_synthetic.json"

__all__ = ["RigCamera", "DEFAULT_RIG", "StreetScene", "StreetLayout", "make_segment", "segment_cameras",
           "ego_pose", "load_street_scene"]


@dataclass(frozen=True)
class RigCamera:
    """One camera of the rig, mounted on the ego (x forward, y left, z up, metres / degrees)."""

    name: str
    position: tuple[float, float, float]
    yaw_deg: float  # left positive
    pitch_deg: float = 4.0  # down positive: a little more road in view
    fx_per_width: float = 0.75  # fx = 0.75 W: ~67° horizontal field of view

    def cam_to_ego(self) -> np.ndarray:
        """4x4 camera→ego in drivestudio's dataset camera axes (x forward, y left, z up)."""
        yaw, pitch = math.radians(self.yaw_deg), math.radians(self.pitch_deg)
        Rz = np.array([[math.cos(yaw), -math.sin(yaw), 0], [math.sin(yaw), math.cos(yaw), 0], [0, 0, 1]])
        Ry = np.array([[math.cos(pitch), 0, math.sin(pitch)], [0, 1, 0], [-math.sin(pitch), 0, math.cos(pitch)]])
        T = np.eye(4)
        T[:3, :3] = Rz @ Ry
        T[:3, 3] = self.position
        return T


# yaws ±50° with ~67° fields of view: neighbouring cameras overlap by ~17°, as on a real front rig
DEFAULT_RIG = {
    "front": RigCamera("front", (1.5, 0.0, 1.6), 0.0),
    "left": RigCamera("left", (1.3, 0.4, 1.6), 50.0),
    "right": RigCamera("right", (1.3, -0.4, 1.6), -50.0),
}
SPEED = 1.0  # metres per frame (10 Hz at 36 km/h, a typical Waymo urban segment)
SWAY, SWAY_LENGTH = 0.8, 25.0  # lateral drift y(x) = SWAY (1 - cos(x / SWAY_LENGTH)): zero pose at frame 0


def ego_pose(t: int, speed: float = SPEED) -> np.ndarray:
    """4x4 ego→world at frame ``t``; the identity at t = 0 (the world is the first ego frame)."""
    x = speed * t
    y = SWAY * (1.0 - math.cos(x / SWAY_LENGTH))
    yaw = math.atan(SWAY / SWAY_LENGTH * math.sin(x / SWAY_LENGTH))
    T = np.eye(4)
    T[:3, :3] = [[math.cos(yaw), -math.sin(yaw), 0], [math.sin(yaw), math.cos(yaw), 0], [0, 0, 1]]
    T[:3, 3] = [x, y, 0.0]
    return T


def segment_cameras(frames: int, height: int, width: int, cameras=("front", "left", "right"),
                    every_nth_train: int = 2, shifts=(1, 2, 3), holdout_cameras=(), shift_cameras=("front",),
                    rig: dict[str, RigCamera] | None = None) -> tuple[list[Camera], dict[str, list[int]]]:
    """The segment's cameras (frame-major) and splits, without rendering anything."""
    rig = rig or DEFAULT_RIG
    unknown = [c for c in (*cameras, *holdout_cameras, *shift_cameras) if c not in rig]
    if unknown:
        raise ValueError(f"unknown rig cameras {unknown}; the rig has {sorted(rig)}")
    rig_names = list(dict.fromkeys((*cameras, *holdout_cameras)))
    mounts = [(name, rig[name].cam_to_ego(), None) for name in rig_names]
    for s in shifts:
        for name in shift_cameras:
            T = rig[name].cam_to_ego()
            T[1, 3] += s  # a lane change to the left, in the ego frame
            mounts.append((f"{name}_shift{s:g}m", T, s))
    K = np.array([[0.0, 0, width / 2.0], [0, 0, height / 2.0], [0, 0, 1]])
    cams, splits = [], {"train": [], "test": []}
    if holdout_cameras:
        splits["cross_camera"] = []
    for s in shifts:
        splits[f"shift_{s:g}m"] = []
    for t in range(frames):
        ego = ego_pose(t)
        for name, cam_to_ego, shift in mounts:
            base = name.split("_shift")[0]
            Kc = K.copy()
            Kc[0, 0] = Kc[1, 1] = rig[base].fx_per_width * width
            c2w = ego @ cam_to_ego @ OPENCV2DATASET
            i = len(cams)
            cams.append(Camera.from_c2w(c2w, Kc, width, height, name=f"{t:03d}_{name}", camera_id=name,
                                        timestamp=float(t), meta={"frame": t, "ego_to_world": ego.tolist(),
                                                                  "cam_to_ego": cam_to_ego.tolist()}))
            if shift is not None:
                splits[f"shift_{shift:g}m"].append(i)
            elif name in holdout_cameras:
                splits["cross_camera"].append(i)
            elif t % every_nth_train == 0:
                splits["train"].append(i)
            else:
                splits["test"].append(i)
    return cams, splits


def make_segment(out_uri: str, seed: int = 0, frames: int = 64, height: int = 576, width: int = 1024,
                 cameras=("front", "left", "right"), every_nth_train: int = 2, shifts=(1, 2, 3),
                 holdout_cameras=(), shift_cameras=("front",), num_points: int = 100_000,
                 progress: bool = False, device: str | None = "cpu") -> Scene:
    """Render a synthetic segment and write it in the driving layout (+ split, points and generator files).

    ``device``: where rays are cast ("cpu" keeps ground truth bit-identical across machines; None picks CUDA when
    present, ~100x faster). Returns the scene as read back from ``out_uri``."""
    from difix3d.scene.driving import load_driving

    t0 = time.perf_counter()
    cams, splits = segment_cameras(frames, height, width, cameras, every_nth_train, shifts, holdout_cameras,
                                   shift_cameras)
    street = StreetScene(seed, length=SPEED * frames, device=device)
    iterator = range(len(cams))
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, desc=f"synth {out_uri}", unit="view")
    images = {i: street.render(cams[i]) for i in iterator}
    points, colors = street.sample_points(num_points, x_range=(-20.0, SPEED * frames + 60.0))
    scene = Scene(name=str(out_uri).rstrip("/").rsplit("/", 1)[-1], cameras=cams, image_uris=[""] * len(cams),
                  splits=splits, points=points, point_colors=colors, root=str(out_uri))
    write_driving(scene, out_uri, images=images, image_format="png")
    storage.write_json(storage.join(out_uri, SYNTHETIC_FILE), {
        "generator": "difix3d.scene.synthetic", "seed": int(seed), "frames": frames, "height": height,
        "width": width, "speed": SPEED, "layout": asdict(street.layout), "seconds": time.perf_counter() - t0})
    return load_driving(out_uri)


def load_street_scene(segment_uri: str, device: str | None = "cpu") -> StreetScene:
    """The :class:`StreetScene` a synthetic segment was rendered from (for exact ground truth at any camera).

    ``device``: where rays are cast ("cpu" is bit-identical across machines; None picks CUDA when present, which
    a 576×1024 oracle needs to keep up with training)."""
    meta = storage.read_json(storage.join(segment_uri, SYNTHETIC_FILE))
    return StreetScene(meta["seed"], layout=StreetLayout(**meta["layout"]), device=device)
