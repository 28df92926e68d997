"""Pose utilities: interpolation endpoints and slerp midpoint, pose distance, nearest camera, step_towards."""

import math

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from difix3d.errors import InputError
from difix3d.scene import Camera
from difix3d.scene.poses import (check_rigid, interpolate_cameras, nearest_camera, pose_distance, rotation_angle,
                                 step_towards)

K = np.array([[50.0, 0, 32], [0, 50.0, 24], [0, 0, 1]])


def cam(centre, yaw_deg=0.0, axis="y", name="c") -> Camera:
    c2w = np.eye(4)
    c2w[:3, :3] = Rotation.from_euler(axis, yaw_deg, degrees=True).as_matrix()
    c2w[:3, 3] = centre
    return Camera.from_c2w(c2w, K, 64, 48, name=name)


def test_interpolation_endpoints_are_exact():
    a, b = cam([0, 0, 0], 10), cam([4, -2, 1], 70)
    np.testing.assert_array_equal(interpolate_cameras(a, b, 0.0).viewmat, a.viewmat)
    np.testing.assert_allclose(interpolate_cameras(a, b, 1.0).viewmat, b.viewmat, atol=1e-12)
    assert interpolate_cameras(a, b, 0.5).K is a.K or np.array_equal(interpolate_cameras(a, b, 0.5).K, a.K)


def test_slerp_midpoint_halves_the_angle_and_translation_is_linear():
    a, b = cam([0, 0, 0], 0), cam([2, 4, 6], 100)
    m = interpolate_cameras(a, b, 0.5)
    assert rotation_angle(a, m) == pytest.approx(math.radians(50), abs=1e-9)
    assert rotation_angle(m, b) == pytest.approx(math.radians(50), abs=1e-9)
    np.testing.assert_allclose(m.position, [1, 2, 3], atol=1e-12)
    R = m.rotation_c2w
    np.testing.assert_allclose(R @ R.T, np.eye(3), atol=1e-12)  # still a rotation


def test_pose_distance_is_translation_plus_weighted_angle():
    a, b = cam([0, 0, 0], 0), cam([3, 0, 4], 90)
    assert pose_distance(a, b) == pytest.approx(5 + math.pi / 2)
    assert pose_distance(a, b, rotation_weight=2.0) == pytest.approx(5 + math.pi)
    assert pose_distance(a, a) == pytest.approx(0.0, abs=1e-7)


def test_nearest_camera_uses_rotation_too():
    q = cam([0, 0, 0], 0)
    same_place_turned = cam([0, 0, 0], 180)  # distance π
    a_bit_away = cam([1.0, 0, 0], 0)  # distance 1
    assert nearest_camera(q, [same_place_turned, a_bit_away]) == 1
    assert nearest_camera(q, [same_place_turned, a_bit_away], rotation_weight=0.0) == 0
    with pytest.raises(ValueError):
        nearest_camera(q, [])


@pytest.mark.parametrize("step", [0.5, 1.0, 1.7, 10.0])
def test_step_towards_reaches_target_in_ceil_d_over_step_steps(step):
    start, target = cam([0, 0, 0], 0, name="start"), cam([2.0, 1.0, -1.5], 40, name="target")
    d = pose_distance(start, target)
    c, n = start, 0
    while pose_distance(c, target) > 1e-9:
        before = pose_distance(c, target)
        c = step_towards(c, target, step)
        n += 1
        assert before - pose_distance(c, target) <= step + 1e-9  # never more than one step
        assert n <= 100
    assert n == math.ceil(d / step)
    np.testing.assert_array_equal(c.viewmat, target.viewmat)  # snapped exactly
    assert c.name == "start"  # only the pose moves


def test_check_rigid_rejects_nan_scaled_and_reflected_poses():
    good = np.eye(4)
    check_rigid(good, "f")
    for bad, words in [(np.full((4, 4), np.nan), "NaN"), (np.diag([2.0, 1, 1, 1]), "orthonormal"),
                       (np.diag([-1.0, 1, 1, 1]), "reflection"), (np.eye(3), "4x4")]:
        with pytest.raises(InputError, match=words) as e:
            check_rigid(bad, "poses/007.txt")
        assert "poses/007.txt" in str(e.value)
