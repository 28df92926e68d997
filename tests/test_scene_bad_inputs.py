"""Bad scene inputs the readers and writers meet: each is refused naming the file and the problem (or, for a few
non-finite points in a point cloud, dropped with a warning), never trained on or written wrongly."""

import json
import os

import numpy as np
import pytest

from difix3d import imageio, storage
from difix3d.errors import InputError
from difix3d.scene.driving import load_driving, write_driving
from difix3d.scene.nerfstudio import load_nerfstudio, read_points_ply, write_nerfstudio, write_points_ply

from test_scene_formats import _driving, _image, _nerfstudio


def _edit_transforms(root, **changes):
    path = os.path.join(root, "transforms.json")
    meta = json.load(open(path))
    for key, value in changes.items():
        if key.startswith("frame0_"):
            meta["frames"][0][key.removeprefix("frame0_")] = value
        elif value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    with open(path, "w") as f:
        f.write(json.dumps(meta))  # json writes NaN and Infinity as the bare words Python's reader accepts
    return path


@pytest.mark.parametrize("changes,problem", [
    ({"k1": float("nan")}, "k1 is nan, not a finite number"),
    ({"fl_x": float("inf")}, "fl_x is inf, not a finite number"),
    ({"frame0_time": "t0"}, "time is 't0', not a number"),
    ({"train_filenames": "images/frame_00001.png"}, "train_filenames must be a list of file paths"),
    ({"w": 31.5}, "must be whole numbers of pixels"),
])
def test_transforms_json_fields_are_checked(tmp_path, changes, problem):
    path = _edit_transforms(_nerfstudio(tmp_path), **changes)
    with pytest.raises(InputError, match=problem) as e:
        load_nerfstudio(path)
    assert "transforms.json" in str(e.value)


def test_a_frame_without_transform_matrix_says_so(tmp_path):
    root = _nerfstudio(tmp_path)
    meta = json.load(open(os.path.join(root, "transforms.json")))
    del meta["frames"][2]["transform_matrix"]
    (tmp_path / "ns" / "transforms.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match=r"frame 2, images/frame_00002.png\): has no transform_matrix"):
        load_nerfstudio(os.path.join(root, "transforms.json"))


def test_a_corrupt_image_sized_from_its_file_is_named(tmp_path):
    path = _edit_transforms(_nerfstudio(tmp_path), w=None, h=None)
    with open(tmp_path / "ns" / "images" / "frame_00000.png", "wb") as f:
        f.write(b"not an image")
    with pytest.raises(InputError, match="frame_00000.png: cannot read the image size"):
        load_nerfstudio(path)


def _ply(tmp_path, header: str, body: bytes) -> str:
    path = str(tmp_path / "p.ply")
    with open(path, "wb") as f:
        f.write(header.encode("ascii") + body)
    return path


@pytest.mark.parametrize("header,body,problem", [
    ("ply\nformat binary_little_endian 1.0\nelement vertex 10\nproperty float x\nproperty float y\n"
     "property float z\nend_header\n", b"\0" * 100, "truncated: 10 vertices need 120 bytes, the file holds 100"),
    ("ply\nformat ascii 1.0\nelement vertex 5\nproperty float x\nproperty float y\nproperty float z\n"
     "end_header\n", b"1 2 3\n4 5 6\n", "has 2 rows of 3 values, the header says 5 rows of 3"),
    ("ply\nformat ascii 1.0\nelement vertex 1\nproperty float x\nproperty float y\nproperty float z\n"
     "end_header\n", b"1 x 3\n", "not numeric"),
    ("ply\nformat ascii 1.0\nelement vertex ten\nend_header\n", b"", "malformed PLY header line 'element vertex ten'"),
    ("ply\nformat binary_little_endian 1.0\nelement vertex 1\nproperty half x\nend_header\n", b"",
     "vertex property type 'half' is not supported"),
])
def test_malformed_ply_files_are_named(tmp_path, header, body, problem):
    path = _ply(tmp_path, header, body)
    with pytest.raises(InputError, match=problem) as e:
        read_points_ply(path)
    assert str(e.value).startswith(path)


def test_ply_header_comments_and_empty_vertex_tables_read(tmp_path):
    path = _ply(tmp_path, "ply\nformat ascii 1.0\ncomment written before end_header by a tool\nelement vertex 1\n"
                          "property float x\nproperty float y\nproperty float z\nend_header\n", b"1 2 3\n")
    np.testing.assert_array_equal(read_points_ply(path)[0], [[1, 2, 3]])
    path = _ply(tmp_path, "ply\nformat ascii 1.0\nelement vertex 0\nproperty float x\nproperty float y\n"
                          "property float z\nelement face 0\nproperty list uchar int vertex_indices\nend_header\n", b"")
    assert read_points_ply(path)[0].shape == (0, 3)


def test_ply_with_crlf_header_reads_and_non_finite_points_are_dropped(tmp_path, caplog):
    points = np.array([[0, 1, 2], [np.nan, 0, 0], [3, 4, 5]], np.float32)
    path = str(tmp_path / "a.ply")
    write_points_ply(path, points, np.full((3, 3), 7, np.uint8))
    data = open(path, "rb").read()
    head, body = data.split(b"end_header\n")
    with open(path, "wb") as f:
        f.write(head.replace(b"\n", b"\r\n") + b"end_header\r\n" + body)
    got, colors = read_points_ply(path)
    np.testing.assert_array_equal(got, points[[0, 2]])
    assert colors.shape == (2, 3)
    assert "dropped 1 of 3 points holding NaN or infinity" in caplog.text and path in caplog.text
    write_points_ply(path, np.full((2, 3), np.inf))
    with pytest.raises(InputError, match="all 2 points are NaN or infinite"):
        read_points_ply(path)


def test_driving_points_are_checked(tmp_path, caplog):
    root = _driving(tmp_path)
    pts = np.zeros((3, 14), np.float32)
    pts[:, 3:6] = [[10, 0, 0], [np.nan, 5, 0], [1, 1, 1]]
    pts.tofile(os.path.join(root, "lidar", "001.bin"))
    scene = load_driving(root)
    assert np.isfinite(scene.points).all() and len(scene.points) == 4 * 3 - 1
    assert "lidar/001.bin: dropped 1 of 3 points" in caplog.text.replace("\\", "/")
    np.savez(os.path.join(root, "difix3d_points.npz"), points=np.zeros((4, 6), np.float32),
             colors=np.zeros((4, 3), np.uint8))
    with pytest.raises(InputError, match=r"difix3d_points.npz: points must be \[N, 3\], got shape \[4, 6\]"):
        load_driving(root)


@pytest.mark.parametrize("cameras,problem", [
    ({"0": {"width": 32}}, r"cameras\['0'\] needs positive integer width and height"),
    ({"0": {"width": "wide", "height": 24}}, r"cameras\['0'\] needs positive integer width and height"),
    ({"0": {"width": 0, "height": 0}}, r"cameras\['0'\] needs positive integer width and height"),
])
def test_split_file_camera_sizes_are_checked(tmp_path, cameras, problem):
    root = _driving(tmp_path, cams=("0",))
    with open(os.path.join(root, "difix3d_split.json"), "w") as f:
        json.dump({"format": "difix3d-driving", "version": 1, "cameras": cameras, "splits": {"train": []}}, f)
    with pytest.raises(InputError, match=problem) as e:
        load_driving(root)
    assert "difix3d_split.json" in str(e.value)


def test_driving_writer_refuses_what_its_layout_cannot_store(tmp_path):
    scene = load_driving(_driving(tmp_path))
    moved = load_driving(_driving(tmp_path))
    c2w = moved.cameras[2].c2w.copy()
    c2w[0, 3] += 1.0
    moved.cameras[2] = moved.cameras[2].with_pose(np.linalg.inv(c2w))
    with pytest.raises(InputError, match="is not at its rig pose"):
        write_driving(moved, str(tmp_path / "out_moved"))
    scene.cameras[2].K = scene.cameras[2].K.copy()
    scene.cameras[2].K[0, 0] += 5.0
    with pytest.raises(InputError, match="has other intrinsics or size than"):
        write_driving(scene, str(tmp_path / "out_k"))


def test_an_undistorted_scene_is_written_with_its_undistorted_pixels(tmp_path):
    pytest.importorskip("cv2")
    from difix3d.scene.undistort import undistorted

    scene = undistorted(load_nerfstudio(os.path.join(_nerfstudio(tmp_path, n=3), "transforms.json")))
    back = load_nerfstudio(write_nerfstudio(scene, str(tmp_path / "out")))
    for i in range(len(scene)):
        assert back.cameras[i].dist is None
        np.testing.assert_array_equal(back.load_image(i), scene.load_image(i))


def test_home_folder_paths_are_read_where_they_are_resolved(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    storage.write_text("~/a/b.txt", "x")
    assert (tmp_path / "a" / "b.txt").read_text() == "x"
    assert storage.read_text(str(tmp_path / "a" / "b.txt")) == "x"


def test_image_format_comes_from_the_file_name(tmp_path):
    img = _image(0)
    for name in ("run.v2/out", "x.tif", "y.JPG"):
        imageio.write_image(str(tmp_path / name), img)
        assert imageio.read_image(str(tmp_path / name)).shape == img.shape
    with pytest.raises(InputError, match=r"cannot write images as \.xyz"):
        imageio.write_image(str(tmp_path / "z.xyz"), img)


def test_cameras_without_unique_names_keep_one_image_each_and_their_splits(tmp_path):
    """Images are named after cameras: two unnamed cameras wrote one images/.png, and the test view came back as a
    training view."""
    import dataclasses

    scene = load_nerfstudio(os.path.join(_nerfstudio(tmp_path, n=3), "transforms.json"))
    scene.cameras = [dataclasses.replace(c, name="") for c in scene.cameras[:2]] + [
        dataclasses.replace(scene.cameras[2], name="a/b")]
    scene.image_uris = scene.image_uris[:3]
    scene.splits = {"train": [0], "test": [1, 2]}
    back = load_nerfstudio(write_nerfstudio(scene, str(tmp_path / "out")))
    assert back.splits["train"] == [0] and back.splits["test"] == [1, 2]
    for i in range(3):
        np.testing.assert_array_equal(back.load_image(i), scene.load_image(i))
    assert len({c.name for c in back.cameras}) == 3


def test_one_given_focal_length_is_kept_and_a_bad_ply_path_is_named(tmp_path):
    root = tmp_path / "s"
    imageio.write_image(str(root / "a.png"), np.zeros((20, 30, 3), np.uint8))
    meta = {"camera_angle_x": 0.7, "fl_x": 20.0, "frames": [{"file_path": "a.png",
                                                             "transform_matrix": np.eye(4).tolist()}]}
    (root / "transforms.json").write_text(json.dumps(meta))
    cam = load_nerfstudio(str(root / "transforms.json")).cameras[0]
    assert cam.K[0, 0] == cam.K[1, 1] == 20.0  # was replaced by the field of view's 0.5 w / tan(0.35)
    meta["ply_file_path"] = 5
    (root / "transforms.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match="transforms.json: ply_file_path must be a path"):
        load_nerfstudio(str(root / "transforms.json"))
