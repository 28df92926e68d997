"""Pose utilities: interpolation, distance, nearest camera, stepping towards a target, pose validation.

Difix3D (Wu et al., CVPR 2025, Sec. 4.2) moves cameras from training views towards target views a little each
round; these are the geometric pieces of that schedule. Distances are ``‖Δ centre‖ + w · angle(ΔR)`` (scene units
plus radians × ``rotation_weight``); interpolation is linear in the centre and slerp in the rotation, so the
distance travelled along an interpolation is linear in ``t`` and :func:`step_towards` reaches its target in exactly
``ceil(d / step)`` calls.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy.spatial.transform import Rotation

from difix3d.errors import InputError
from difix3d.scene.camera import Camera

_SNAP_EPS = 1e-9  # a step this close to the target is the target (absorbs float error)


def interpolate_cameras(a: Camera, b: Camera, t: float) -> Camera:
    """``a`` moved a fraction ``t`` of the way to ``b`` (t=0: a's pose, t=1: b's pose); intrinsics stay a's."""
    ca, cb = a.position, b.position
    centre = (1.0 - t) * ca + t * cb  # [3]
    Ra, Rb = a.rotation_c2w, b.rotation_c2w  # [3, 3] camera→world
    rel = Rotation.from_matrix(Ra.T @ Rb).as_rotvec()  # axis·angle in a's camera frame, angle ≤ π
    R = Ra @ Rotation.from_rotvec(t * rel).as_matrix()
    if t == 1.0:  # exact endpoint: no slerp round-off
        R, centre = Rb, cb
    elif t == 0.0:
        R, centre = Ra, ca
    return a.with_pose(viewmat_from_c2w(R, centre))


def rotation_angle(a: Camera, b: Camera) -> float:
    """Angle in radians of the rotation between two cameras' orientations, in [0, π]."""
    rel = a.rotation_c2w.T @ b.rotation_c2w
    # atan2(sin, cos) stays accurate near 0 (arccos of the trace loses half the digits there)
    sin = 0.5 * np.linalg.norm([rel[2, 1] - rel[1, 2], rel[0, 2] - rel[2, 0], rel[1, 0] - rel[0, 1]])
    return float(np.arctan2(sin, (np.trace(rel) - 1.0) / 2.0))


def pose_distance(a: Camera, b: Camera, rotation_weight: float = 1.0) -> float:
    """Centre distance + ``rotation_weight`` × rotation angle (radians)."""
    return float(np.linalg.norm(a.position - b.position)) + rotation_weight * rotation_angle(a, b)


def nearest_camera(cam: Camera, candidates: Sequence[Camera], rotation_weight: float = 1.0) -> int:
    """Index of the candidate nearest to ``cam`` by :func:`pose_distance` (first one on ties)."""
    if not candidates:
        raise ValueError("nearest_camera: no candidate cameras")
    d = [pose_distance(cam, c, rotation_weight) for c in candidates]
    return int(np.argmin(d))


def step_towards(cam: Camera, target: Camera, step: float, rotation_weight: float = 1.0) -> Camera:
    """``cam`` moved by at most ``step`` (pose distance) towards ``target``; snapped onto it when within a step.

    Keeps ``cam``'s intrinsics and name; only the pose moves."""
    if step <= 0:
        raise ValueError(f"step must be positive, got {step}")
    d = pose_distance(cam, target, rotation_weight)
    if d <= step + _SNAP_EPS:
        return cam.with_pose(target.viewmat.copy())
    return interpolate_cameras(cam, target, step / d)


def viewmat_from_c2w(R: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """world→camera [4, 4] from a camera→world rotation [3, 3] and centre [3] (rigid inverse, no LU)."""
    V = np.eye(4)
    V[:3, :3] = R.T
    V[:3, 3] = -R.T @ centre
    return V


def rigid_inverse(T: np.ndarray) -> np.ndarray:
    """Inverse of a rigid 4×4 transform."""
    return viewmat_from_c2w(T[:3, :3], T[:3, 3])


def check_rigid(T: np.ndarray, source: str, what: str = "pose", tol: float = 1e-3) -> np.ndarray:
    """``T`` as a float64 [4, 4] rigid transform, or :class:`InputError` naming ``source`` and the problem
    (wrong shape, NaN/Inf, a rotation that is not orthonormal or is a reflection, a bad last row)."""
    try:
        T = np.asarray(T, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise InputError(source, f"{what} is not numeric ({e})") from e
    if T.shape == (3, 4):
        T = np.vstack([T, [0.0, 0.0, 0.0, 1.0]])
    if T.shape != (4, 4):
        raise InputError(source, f"{what} must be a 4x4 matrix, got shape {T.shape}")
    if not np.all(np.isfinite(T)):
        raise InputError(source, f"{what} contains NaN or Inf")
    if not np.allclose(T[3], [0.0, 0.0, 0.0, 1.0], atol=tol):
        raise InputError(source, f"{what} last row is {T[3].tolist()}, expected [0, 0, 0, 1]")
    R = T[:3, :3]
    err = float(np.abs(R.T @ R - np.eye(3)).max())
    if err > tol:
        raise InputError(source, f"{what} rotation is not orthonormal (max |RᵀR − I| = {err:.3g}; "
                                 "degenerate or scaled)")
    if np.linalg.det(R) < 0:
        raise InputError(source, f"{what} rotation is a reflection (det < 0)")
    return T
