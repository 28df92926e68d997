"""Synthetic driving segments: exact ground truth consistent across cameras, determinism by seed, splits and
layout written by make_segment, the ``difix3d synth`` command, and a tiny speed smoke test."""

import argparse
import os
import time

import numpy as np
import pytest

from difix3d.cli import _COMMANDS
from difix3d.scene import cli as synth_cli
from difix3d.scene import load_scene
from difix3d.scene.poses import pose_distance
from difix3d.scene.synthetic import StreetScene, ego_pose, load_street_scene, make_segment, segment_cameras

H, W = 24, 32


@pytest.fixture(scope="module")
def street():
    return StreetScene(seed=3)


@pytest.fixture(scope="module")
def segment(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("synth") / "seg")
    return make_segment(out, seed=5, frames=4, height=H, width=W, every_nth_train=2, shifts=(1, 3),
                        holdout_cameras=("right",), cameras=("front", "left"), num_points=300)


def _visible_in(street, cam, points):
    """Sub-pixel positions of ``points`` in ``cam`` and a mask of those in the image, in front, and unoccluded."""
    uv, z = cam.project(points.astype(np.float64))
    inside = (z > 0.5) & (uv[:, 0] > 0) & (uv[:, 0] < cam.width) & (uv[:, 1] > 0) & (uv[:, 1] < cam.height)
    depth = np.full(len(points), -1.0)
    depth[inside] = street.depth_at(cam, uv[inside])
    visible = inside & (np.abs(depth - z) < 1e-3 * np.maximum(z, 1.0))
    return uv, visible


def test_a_surface_point_has_the_same_colour_in_two_cameras(street):
    cams, _ = segment_cameras(6, 96, 128, cameras=("front", "left"), shifts=())
    a, b = cams[0], cams[2 * 5]  # frame 0 front and frame 5 front: 5 m apart, same surfaces from two places
    c = cams[1]  # frame 0 left: a different rig camera overlapping the front one
    points, colors = street.sample_points(6000, x_range=(0.0, 60.0))
    checked = 0
    for other in (b, c):
        uv_a, vis_a = _visible_in(street, a, points)
        uv_o, vis_o = _visible_in(street, other, points)
        both = vis_a & vis_o
        checked += int(both.sum())
        col_a = street.colors_at(a, uv_a[both]).astype(int)
        col_o = street.colors_at(other, uv_o[both]).astype(int)
        # same surface point -> the same colour in both views, and the colour sample_points gave it (float32 hit
        # points may fall on the other side of a painted edge or window border for a handful of points: ≤ 1%)
        assert np.mean(np.abs(col_a - col_o).max(1) <= 2) >= 0.99
        assert np.mean(np.abs(col_a - colors[both].astype(int)).max(1) <= 2) >= 0.99
        assert np.median(np.abs(col_a - col_o)) == 0
    assert checked > 100


def test_sampled_points_skip_ground_hidden_under_boxes(street):
    points, _ = street.sample_points(20000, x_range=(0.0, 80.0))
    lo, hi = street.box_min.cpu().numpy(), street.box_max.cpu().numpy()
    ground = points[np.abs(points[:, 2]) < 1e-6]
    assert len(ground) > 1000
    standing = lo[:, 2] <= 0.0  # sidewalks and buildings stand on the ground: their footprints hide it
    under = ((ground[:, None, :2] > lo[None, standing, :2] + 1e-3)
             & (ground[:, None, :2] < hi[None, standing, :2] - 1e-3)).all(-1).any(1)
    assert not under.any(), ground[under][:3]


def test_render_is_colors_at_pixel_centres_and_points_lie_on_surfaces(street):
    cam = segment_cameras(1, H, W, cameras=("front",), shifts=())[0][0]
    image = street.render(cam)
    assert image.shape == (H, W, 3) and image.dtype == np.uint8
    v, u = np.mgrid[0:H, 0:W] + 0.5
    np.testing.assert_array_equal(street.colors_at(cam, np.stack([u.ravel(), v.ravel()], 1)).reshape(H, W, 3), image)
    assert image[0].mean(axis=0)[2] > image[0].mean(axis=0)[0]  # sky at the top: blue
    assert image.std() > 10  # textured, not flat


def test_deterministic_by_seed(street):
    cam = segment_cameras(3, H, W, cameras=("left",), shifts=())[0][2]
    np.testing.assert_array_equal(StreetScene(seed=3).render(cam), street.render(cam))
    assert not np.array_equal(StreetScene(seed=4).render(cam), street.render(cam))
    p1, c1 = street.sample_points(100)
    p2, c2 = StreetScene(seed=3).sample_points(100)
    np.testing.assert_array_equal(p1, p2), np.testing.assert_array_equal(c1, c2)


def test_a_longer_street_keeps_the_objects_of_a_shorter_one():
    short, long = StreetScene(1), StreetScene(1, length=400.0)
    def boxes(s):  # façades and cars (the sidewalks simply run longer)
        return {tuple(np.r_[a, b]) for a, b in zip(s.box_min.numpy(), s.box_max.numpy()) if b[2] > 0.2}

    assert boxes(short) < boxes(long)
    assert {tuple(p) for p in short.cyl["xy"].numpy()} < {tuple(p) for p in long.cyl["xy"].numpy()}


def test_make_segment_splits_and_layout(segment):
    root = segment.root
    for sub in ("images", "ego_pose", "extrinsics", "intrinsics"):
        assert os.path.isdir(os.path.join(root, sub))
    assert os.path.exists(os.path.join(root, "images", "003_front_shift3m.png"))
    names = lambda split: sorted(segment.cameras[i].name for i in segment.splits[split])  # noqa: E731
    assert names("train") == ["000_front", "000_left", "002_front", "002_left"]
    assert names("test") == ["001_front", "001_left", "003_front", "003_left"]
    assert names("cross_camera") == [f"{t:03d}_right" for t in range(4)]
    assert names("shift_1m") == [f"{t:03d}_front_shift1m" for t in range(4)]
    assert set(segment.splits) == {"train", "test", "cross_camera", "shift_1m", "shift_3m"}
    # a lane change: the shifted camera is 3 m to the ego's left of the front camera, same orientation
    f, s = (segment.cameras[segment.index_of(n)] for n in ("002_front", "002_front_shift3m"))
    left = ego_pose(2)[:3, 1]
    np.testing.assert_allclose(s.position - f.position, 3.0 * left, atol=1e-9)
    assert pose_distance(f, s) == pytest.approx(3.0)
    assert segment.points.shape == (300, 3) and segment.point_colors.shape == (300, 3)
    # the images are the exact ground truth of the scene the segment records
    street = load_street_scene(root)
    for name in ("001_left", "003_front_shift3m"):
        i = segment.index_of(name)
        np.testing.assert_array_equal(segment.load_image(i), street.render(segment.cameras[i]))


def test_segment_is_deterministic_and_a_plain_reader_still_loads_it(segment, tmp_path):
    again = make_segment(str(tmp_path / "again"), seed=5, frames=4, height=H, width=W, every_nth_train=2,
                         shifts=(1, 3), holdout_cameras=("right",), cameras=("front", "left"), num_points=300)
    assert [c.name for c in again.cameras] == [c.name for c in segment.cameras]
    for i in (0, 5, len(again) - 1):
        np.testing.assert_array_equal(again.cameras[i].viewmat, segment.cameras[i].viewmat)
        np.testing.assert_array_equal(again.load_image(i), segment.load_image(i))
    np.testing.assert_array_equal(again.points, segment.points)
    os.remove(os.path.join(str(tmp_path / "again"), "difix3d_split.json"))  # as drivestudio would see it
    plain = load_scene(str(tmp_path / "again"), test_every=2)
    assert len(plain) == len(again)
    assert sorted(plain.splits) == ["test", "train"]


def test_synth_command_writes_segments(tmp_path, capsys):
    out = str(tmp_path / "segs")
    parser = argparse.ArgumentParser()  # only this feature's subcommand: `difix3d` imports every feature's CLI
    synth_cli.add_parser(parser.add_subparsers())
    args = parser.parse_args(["synth", out, "--segments", "2", "--frames", "2", "--height", "12", "--width", "16",
                              "--points", "50", "--shifts", "1", "--seed", "7", "--device", "cpu"])
    assert args.func(args) == 0
    a, b = (load_scene(os.path.join(out, f"segment-{k:03d}")) for k in range(2))
    assert len(a) == len(b) == 2 * 3 + 2  # 3 rig cameras + 1 shifted front camera per frame
    assert "shift_1m" in a.splits
    assert not np.array_equal(a.load_image(0), b.load_image(0))  # seeds 7 and 8
    assert "segment-001" in capsys.readouterr().out
    assert _COMMANDS["synth"] == synth_cli.__name__  # what `difix3d synth` dispatches to


def test_speed_smoke(street):
    cams, _ = segment_cameras(4, 48, 64, shifts=())
    street.render(cams[0])  # warm-up
    t0 = time.perf_counter()
    for cam in cams:
        street.render(cam)
    per_view = (time.perf_counter() - t0) / len(cams)
    assert per_view < 2.0, f"{per_view:.2f} s per 48x64 view"


@pytest.mark.gpu
def test_cuda_render_matches_cpu():
    cam = segment_cameras(2, 96, 128, shifts=())[0][1]
    cpu = StreetScene(2).render(cam).astype(int)
    gpu = StreetScene(2, device="cuda").render(cam).astype(int)
    assert np.mean(np.abs(cpu - gpu).max(-1) <= 2) > 0.995  # float32 rounding differs at paint/window edges only
