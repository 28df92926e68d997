"""Scene formats: nerfstudio transforms.json and drivestudio driving segments — hand-computed projections, exact
round trips, split handling, and bad inputs that name the file and frame."""

import json
import os

import numpy as np
import pytest

from difix3d import imageio
from difix3d.errors import InputError
from difix3d.scene import Scene, load_scene
from difix3d.scene.driving import load_driving, write_driving
from difix3d.scene.nerfstudio import load_nerfstudio, write_nerfstudio, write_points_ply

W, H = 32, 24


def _image(seed: int, w: int = W, h: int = H) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _assert_same_scene(a: Scene, b: Scene, exact: bool = True):
    assert len(a) == len(b)
    assert a.splits == b.splits
    for ca, cb in zip(a.cameras, b.cameras):
        assert (ca.name, ca.camera_id, ca.width, ca.height) == (cb.name, cb.camera_id, cb.width, cb.height)
        if exact:
            np.testing.assert_array_equal(ca.viewmat, cb.viewmat)
        else:
            np.testing.assert_allclose(ca.viewmat, cb.viewmat, atol=1e-12)
        np.testing.assert_array_equal(ca.K, cb.K)
        assert (ca.dist is None) == (cb.dist is None)
        if ca.dist is not None:
            np.testing.assert_array_equal(ca.dist, cb.dist)
    for i in range(len(a)):
        np.testing.assert_array_equal(a.load_image(i), b.load_image(i))
    if a.points is None:
        assert b.points is None
    else:
        np.testing.assert_array_equal(a.points, b.points)
        np.testing.assert_array_equal(a.point_colors, b.point_colors)


# --- nerfstudio


def _nerfstudio(tmp_path, n=10, split=True, per_frame=False) -> str:
    root = tmp_path / "ns"
    frames = []
    rng = np.random.default_rng(0)
    for i in range(n):
        c2w = np.eye(4)
        a = rng.uniform(-0.5, 0.5)
        c2w[:3, :3] = [[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]]
        c2w[:3, 3] = rng.normal(size=3)
        fp = f"images/frame_{i:05d}.png"
        imageio.write_image(str(root / fp), _image(i))
        frame = {"file_path": fp, "transform_matrix": c2w.tolist()}
        if per_frame:
            frame.update({"fl_x": 40.0 + i, "fl_y": 41.0 + i, "cx": 16.0, "cy": 12.0, "w": W, "h": H})
        frames.append(frame)
    meta = {"camera_model": "OPENCV", "fl_x": 40.0, "fl_y": 42.0, "cx": 15.5, "cy": 11.5, "w": W, "h": H,
            "k1": 0.01, "k2": -0.002, "p1": 0.0005, "p2": 0.0, "frames": frames}
    if split:
        meta["train_filenames"] = [f["file_path"] for f in frames[1:]]
        meta["test_filenames"] = [frames[0]["file_path"]]
    write_points_ply(str(root / "sparse.ply"), rng.normal(size=(50, 3)), rng.integers(0, 256, (50, 3)))
    meta["ply_file_path"] = "sparse.ply"
    (root / "transforms.json").write_text(json.dumps(meta))
    return str(root)


def test_nerfstudio_opengl_to_opencv_hand_computed_projection(tmp_path):
    root = tmp_path / "one"
    imageio.write_image(str(root / "a.png"), _image(0))
    meta = {"fl_x": 100.0, "fl_y": 80.0, "cx": 16.0, "cy": 12.0, "w": W, "h": H,
            "frames": [{"file_path": "a.png", "transform_matrix": np.eye(4).tolist()}]}
    (root / "transforms.json").write_text(json.dumps(meta))
    cam = load_scene(str(root)).cameras[0]
    # OpenGL camera at the origin looks down -z with y up: world (1, 2, -10) is 10 m ahead, right and up
    uv, z = cam.project(np.array([[1.0, 2.0, -10.0]]))
    np.testing.assert_allclose(uv[0], [100 * 0.1 + 16, 80 * -0.2 + 12])
    assert z[0] == pytest.approx(10.0)


def test_nerfstudio_reads_intrinsics_distortion_split_and_points(tmp_path):
    scene = load_scene(_nerfstudio(tmp_path))
    assert scene.splits == {"train": list(range(1, 10)), "test": [0]}
    c = scene.cameras[3]
    np.testing.assert_array_equal(c.K, [[40, 0, 15.5], [0, 42, 11.5], [0, 0, 1]])
    np.testing.assert_allclose(c.dist, [0.01, -0.002, 0.0005, 0.0, 0.0])
    assert scene.points.shape == (50, 3) and scene.point_colors.dtype == np.uint8
    assert scene.load_image(3).shape == (H, W, 3)
    cams, uris = scene.subset("test")
    assert [c.name for c in cams] == ["frame_00000"] and uris[0].endswith("frame_00000.png")

    per_frame = load_scene(_nerfstudio(tmp_path / "pf", split=False, per_frame=True))
    assert per_frame.cameras[2].K[0, 0] == 42.0 and per_frame.cameras[2].K[1, 1] == 43.0
    assert per_frame.splits["test"] == [0, 8]  # every 8th without an explicit split
    assert sorted(per_frame.splits["train"] + per_frame.splits["test"]) == list(range(10))


def test_nerfstudio_unsupported_camera_models_and_bad_numbers_are_named(tmp_path):
    root = _nerfstudio(tmp_path)
    meta = json.loads(open(os.path.join(root, "transforms.json")).read())
    for model in ("OPENCV_FISHEYE", "EQUIRECTANGULAR"):
        json.dump({**meta, "camera_model": model}, open(os.path.join(root, "transforms.json"), "w"))
        with pytest.raises(InputError, match=f"camera_model '{model}' is not supported"):
            load_scene(root)
    json.dump({**meta, "fl_x": "abc"}, open(os.path.join(root, "transforms.json"), "w"))
    with pytest.raises(InputError, match="fl_x is 'abc', not a number"):
        load_scene(root)
    json.dump({**meta, "frames": {"a": 1}}, open(os.path.join(root, "transforms.json"), "w"))
    with pytest.raises(InputError, match="'frames' must be a list"):
        load_scene(root)
    json.dump({**meta, "camera_model": "PINHOLE"}, open(os.path.join(root, "transforms.json"), "w"))
    assert len(load_scene(root).cameras) == 10


def test_blender_form_with_camera_angle_and_extensionless_paths(tmp_path):
    root = tmp_path / "lego"
    imageio.write_image(str(root / "train" / "r_0.png"), _image(0))
    meta = {"camera_angle_x": 0.6911, "frames": [{"file_path": "./train/r_0", "transform_matrix": np.eye(4).tolist()}]}
    (root / "transforms.json").write_text(json.dumps(meta))
    scene = load_scene(str(root))
    cam = scene.cameras[0]
    assert cam.K[0, 0] == pytest.approx(0.5 * W / np.tan(0.5 * 0.6911)) and cam.K[1, 1] == cam.K[0, 0]
    assert (cam.width, cam.height) == (W, H) and scene.image_uris[0].endswith("r_0.png")
    assert scene.load_image(0).shape == (H, W, 3)


def test_nerfstudio_round_trip_is_exact(tmp_path):
    a = load_scene(_nerfstudio(tmp_path))
    a.splits["shift_1m"] = [2, 5]  # a split nerfstudio has no key for survives too
    json_uri = write_nerfstudio(a, str(tmp_path / "out"))
    b = load_nerfstudio(json_uri)
    _assert_same_scene(a, b)
    c = load_nerfstudio(write_nerfstudio(b, str(tmp_path / "out2")))
    _assert_same_scene(b, c)


def test_views_of_extra_splits_never_land_in_an_implicit_train_split(tmp_path):
    root = _nerfstudio(tmp_path, split=False)
    meta = json.loads((tmp_path / "ns" / "transforms.json").read_text())
    paths = [f["file_path"] for f in meta["frames"]]
    meta["difix3d_splits"] = {"shift_1m": [paths[3], paths[5]]}
    (tmp_path / "ns" / "transforms.json").write_text(json.dumps(meta))
    no_keys = load_scene(root)  # every 8th view is test, the rest train...
    assert no_keys.splits["test"] == [0, 8] and not {3, 5} & set(no_keys.splits["train"])  # ...but the shifts
    meta["test_filenames"] = [paths[1]]
    (tmp_path / "ns" / "transforms.json").write_text(json.dumps(meta))
    only_test = load_scene(root)
    assert only_test.splits["train"] == [0, 2, 4, 6, 7, 8, 9] and only_test.splits["shift_1m"] == [3, 5]


def test_written_nerfstudio_dataset_lists_every_split_and_reads_back_the_same_split(tmp_path):
    """nerfstudio refuses a dataset that lists some splits but not the one it asks for (``ns-train`` asks for val):
    the test views double as val views, and that val list is not read back as a split of its own."""
    a = load_scene(_nerfstudio(tmp_path))
    meta = json.loads(open(write_nerfstudio(a, str(tmp_path / "out"))).read())
    assert meta["val_filenames"] == meta["test_filenames"] == ["images/frame_00000.png"]
    assert len(meta["train_filenames"]) == 9
    b = load_nerfstudio(str(tmp_path / "out" / "transforms.json"))
    assert b.splits == a.splits == {"train": list(range(1, 10)), "test": [0]}

    a.splits = {"train": [1, 2, 4, 5, 6, 7, 8, 9], "val": [3], "test": [0]}  # a val split of its own survives
    meta = json.loads(open(write_nerfstudio(a, str(tmp_path / "own_val"))).read())
    assert (meta["val_filenames"], meta["test_filenames"]) == (["images/frame_00003.png"], ["images/frame_00000.png"])
    assert load_nerfstudio(str(tmp_path / "own_val" / "transforms.json")).splits == a.splits

    a.splits = {"train": list(range(1, 10)), "val": [0]}  # val only: it is the test split too, as the reader says
    meta = json.loads(open(write_nerfstudio(a, str(tmp_path / "val_only"))).read())
    assert meta["val_filenames"] == meta["test_filenames"] == ["images/frame_00000.png"]
    assert load_nerfstudio(str(tmp_path / "val_only" / "transforms.json")).splits == \
        {"train": list(range(1, 10)), "test": [0]}


def test_nerfstudios_own_dataparser_reads_every_split_of_a_written_dataset(tmp_path):
    parser = pytest.importorskip("nerfstudio.data.dataparsers.nerfstudio_dataparser",
                                 reason="needs nerfstudio (the optional extra difix3d[nerf])")
    a = load_scene(_nerfstudio(tmp_path))
    for out, splits in (("tv", {"train": list(range(1, 10)), "test": [0]}),
                        ("own_val", {"train": [1, 2, 4, 5, 6, 7, 8, 9], "val": [3], "test": [0]})):
        a.splits = {**splits, "shift_1m": [2, 5]}  # shift_1m under difix3d_splits: nerfstudio does not look there
        write_nerfstudio(a, str(tmp_path / out))
        config = parser.NerfstudioDataParserConfig(data=tmp_path / out, downscale_factor=1, load_3D_points=False)
        dataparser = config.setup()
        for split, want in (("train", splits["train"]), ("val", splits.get("val", splits["test"])),
                            ("test", splits["test"])):
            outputs = dataparser._generate_dataparser_outputs(split=split)
            got = sorted(os.path.relpath(f, tmp_path / out) for f in outputs.image_filenames)
            assert got == sorted(f"images/frame_{i:05d}.png" for i in want), (out, split)
            assert outputs.cameras.shape[0] == len(want)
            assert int(outputs.cameras.width[0]) == W and int(outputs.cameras.height[0]) == H


# --- driving segments

OPENCV2DATASET = np.array([[0, 0, 1, 0], [-1, 0, 0, 0], [0, -1, 0, 0], [0, 0, 0, 1]], dtype=float)


def _driving(tmp_path, frames=4, cams=("0", "1"), first_ego=None, lidar=True, ext="jpg") -> str:
    """A plain drivestudio folder (no difix3d files): Waymo-style numeric camera ids, JPEG images."""
    root = tmp_path / "seg"
    for t in range(frames):
        ego = np.eye(4) if first_ego is None else first_ego.copy()
        ego[0, 3] += 2.0 * t
        os.makedirs(root / "ego_pose", exist_ok=True)
        np.savetxt(root / "ego_pose" / f"{t:03d}.txt", ego)
        for c in cams:
            imageio.write_image(str(root / "images" / f"{t:03d}_{c}.{ext}"), _image(t * 10 + int(c)))
        if lidar:
            pts = np.zeros((3, 14), np.float32)
            pts[:, 3:6] = [[10, 0, 0], [0, 5, 0], [1, 1, 1]]  # ego frame of frame t
            os.makedirs(root / "lidar", exist_ok=True)
            pts.tofile(root / "lidar" / f"{t:03d}.bin")
    os.makedirs(root / "extrinsics", exist_ok=True)
    os.makedirs(root / "intrinsics", exist_ok=True)
    for k, c in enumerate(cams):
        E = np.eye(4)
        yaw = 0.7 * k
        E[:3, :3] = [[np.cos(yaw), -np.sin(yaw), 0], [np.sin(yaw), np.cos(yaw), 0], [0, 0, 1]]
        E[:3, 3] = [1.5, 0.1 * k, 2.0]
        np.savetxt(root / "extrinsics" / f"{c}.txt", E)
        np.savetxt(root / "intrinsics" / f"{c}.txt", [100.0, 100.0, 16.0, 12.0, 0.1, 0, 0, 0, 0])
    return str(root)


def test_driving_hand_computed_projection(tmp_path):
    root = tmp_path / "p"
    os.makedirs(root / "ego_pose"), os.makedirs(root / "extrinsics"), os.makedirs(root / "intrinsics")
    np.savetxt(root / "ego_pose" / "000.txt", np.eye(4))
    np.savetxt(root / "extrinsics" / "front.txt", np.eye(4))  # camera at the ego origin, looking along ego x
    np.savetxt(root / "intrinsics" / "front.txt", [100.0, 100.0, 50.0, 40.0, 0, 0, 0, 0, 0])
    imageio.write_image(str(root / "images" / "000_front.png"), _image(0, 100, 80))
    cam = load_scene(str(root)).cameras[0]
    assert (cam.width, cam.height, cam.dist) == (100, 80, None)
    # 10 m ahead, 2 m left, 1 m up -> OpenCV (x right, y down, z forward) = (-2, -1, 10)
    uv, z = cam.project(np.array([[10.0, 2.0, 1.0]]))
    np.testing.assert_allclose(uv[0], [100 * -0.2 + 50, 100 * -0.1 + 40])
    assert z[0] == pytest.approx(10.0)


def test_plain_drivestudio_folder_loads_with_every_nth_split_world_at_first_ego_and_lidar(tmp_path):
    first = np.eye(4)
    first[:3, 3] = [500000.0, 4000000.0, 30.0]  # UTM-like: re-expressed relative to the first ego pose
    scene = load_scene(_driving(tmp_path, frames=9, first_ego=first), test_every=4)
    assert len(scene) == 18 and scene.cameras[0].name == "000_0" and scene.cameras[1].camera_id == "1"
    test_frames = sorted({scene.cameras[i].meta["frame"] for i in scene.splits["test"]})
    assert test_frames == [0, 4, 8]
    assert len(scene.splits["train"]) == 12
    np.testing.assert_allclose(scene.cameras[2].meta["ego_to_world"], np.eye(4) + np.pad([[2.0]], ((0, 3), (3, 0))))
    # camera 0 sits 1.5 m ahead, 2 m up of the ego; frame 1 ego is 2 m further along x
    np.testing.assert_allclose(scene.cameras[2].position, [3.5, 0.0, 2.0], atol=1e-9)
    np.testing.assert_allclose(scene.cameras[0].dist, [0.1, 0, 0, 0, 0])
    assert scene.points.shape == (27, 3)
    np.testing.assert_allclose(scene.points[:3], [[10, 0, 0], [0, 5, 0], [1, 1, 1]], atol=1e-3)
    np.testing.assert_allclose(scene.points[3], [12, 0, 0], atol=1e-3)  # frame 1: ego moved 2 m
    assert scene.points is not None and scene.point_colors is None
    assert scene.load_image(0).shape == (H, W, 3)


def _opencv_axes_segment(root, lidar=True):
    """An Argoverse2/KITTI-style segment (drivestudio): extrinsics with the camera in OpenCV axes, N x 4 lidar."""
    for d in ("ego_pose", "extrinsics", "intrinsics", "lidar"):
        os.makedirs(root / d)
    E = np.eye(4)
    E[:3, :3] = [[0, 0, 1], [-1, 0, 0], [0, -1, 0]]  # camera z -> ego x (forward), x -> -y (right), y -> -z (down)
    E[:3, 3] = [1.5, 0.0, 1.6]
    for t in range(2):
        ego = np.eye(4)
        ego[0, 3] = 2.0 * t
        np.savetxt(root / "ego_pose" / f"{t:03d}.txt", ego)
        imageio.write_image(str(root / "images" / f"{t:03d}_0.jpg"), _image(t, 64, 48))
        if lidar:  # x y z intensity, in the ego frame
            np.array([[10.0, 0.0, 0.0, 0.5], [0.0, 5.0, 0.0, 0.5]], np.float32).tofile(root / "lidar" / f"{t:03d}.bin")
    np.savetxt(root / "extrinsics" / "0.txt", E)
    np.savetxt(root / "intrinsics" / "0.txt", [50.0, 50.0, 32.0, 24.0, 0, 0, 0, 0, 0])
    return str(root)


def test_driving_segments_with_opencv_camera_axes_load_looking_forward(tmp_path):
    scene = load_scene(_opencv_axes_segment(tmp_path / "argo"))
    assert scene.meta["camera_axes"] == "opencv"
    cam = scene.cameras[0]
    np.testing.assert_allclose(cam.rotation_c2w[:, 2], [1, 0, 0], atol=1e-12)  # looks along ego forward
    np.testing.assert_allclose(cam.rotation_c2w[:, 1], [0, 0, -1], atol=1e-12)  # image down is world down
    uv, z = cam.project(np.array([[21.5, 0.0, 1.6]]))  # 20 m straight ahead: the image centre
    np.testing.assert_allclose(uv[0], [32.0, 24.0], atol=1e-9)
    assert z[0] == pytest.approx(20.0)
    np.testing.assert_allclose(scene.points[:2], [[10, 0, 0], [0, 5, 0]], atol=1e-6)  # x y z of N x 4 points
    np.testing.assert_allclose(scene.points[2], [12, 0, 0], atol=1e-6)  # frame 1: the ego moved 2 m
    # written back in our (dataset-axes) layout, it reads back as the same cameras
    write_driving(scene, str(tmp_path / "out"))
    again = load_driving(str(tmp_path / "out"))
    assert again.meta["camera_axes"] == "dataset"
    for a, b in zip(scene.cameras, again.cameras):
        np.testing.assert_allclose(a.c2w, b.c2w, atol=1e-12)
    # the waymo-style reading of the same files, when forced, is the one that looks sideways
    forced = load_driving(_opencv_axes_segment(tmp_path / "argo2", lidar=False), camera_axes="dataset")
    assert abs(forced.cameras[0].rotation_c2w[0, 2]) < 1e-9


def _yaw(degrees: float, t=(0.0, 0.0, 0.0)) -> np.ndarray:
    a = np.radians(degrees)
    M = np.eye(4)
    M[:2, :2] = [[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]
    M[:3, 3] = t
    return M


# OpenCV camera axes of a front camera and a left-looking one, in a z-up ego frame (x forward, y left)
_FRONT = np.array([[0, 0, 1], [-1, 0, 0], [0, -1, 0]], dtype=np.float64)
_LEFT = np.array([[1, 0, 0], [0, 0, 1], [0, -1, 0]], dtype=np.float64)


def _per_frame_segment(root, nuscenes: bool):
    """drivestudio's per-frame layout: camera→world per frame (OpenCV axes) in a UTM-like world (yawed 30 degrees,
    thousands of metres off); PandaSet with ego poses and N x 5 lidar in the ego frame, nuScenes without ego poses
    and N x 4 lidar in a lidar frame posed by lidar_pose/."""
    for d in ("extrinsics", "intrinsics", "lidar", "lidar_pose" if nuscenes else "ego_pose"):
        os.makedirs(root / d)
    world = _yaw(30.0, (4000.0, -2500.0, 30.0))
    mounts = {"0": (_FRONT, [1.5, 0.0, 1.6]), "1": (_LEFT, [1.0, 0.5, 1.6])}
    lidar_to_ego = _yaw(90.0, (0.9, 0.0, 1.8))  # a lidar mounted turned: its x looks left
    for t in range(2):
        ego = world @ _yaw(0.0, (2.0 * t, 0.0, 0.0))  # the car drives 2 m forward a frame
        for cam, (R, pos) in mounts.items():
            cam_to_ego = np.eye(4)
            cam_to_ego[:3, :3], cam_to_ego[:3, 3] = R, pos
            np.savetxt(root / "extrinsics" / f"{t:03d}_{cam}.txt", ego @ cam_to_ego)
            imageio.write_image(str(root / "images" / f"{t:03d}_{cam}.jpg"), _image(t, 64, 48))
        if nuscenes:  # a point 10 m ahead of the ego origin and one 5 m to its left, in the lidar frame
            np.savetxt(root / "lidar_pose" / f"{t:03d}.txt", ego @ lidar_to_ego)
            in_lidar = np.linalg.inv(lidar_to_ego) @ np.array([[10.0, 0, 0, 1], [0, 5.0, 0, 1]]).T
            rows = np.c_[in_lidar[:3].T, [0.5, 0.5]]
        else:
            np.savetxt(root / "ego_pose" / f"{t:03d}.txt", ego)
            rows = np.array([[10.0, 0, 0, 0.5, 0], [0, 5.0, 0, 0.5, 1]])  # x y z intensity laser id
        rows.astype(np.float32).tofile(root / "lidar" / f"{t:03d}.bin")
    for cam in mounts:
        np.savetxt(root / "intrinsics" / f"{cam}.txt", [50.0, 50.0, 32.0, 24.0, 0, 0, 0, 0, 0])
    return str(root)


@pytest.mark.parametrize("nuscenes", [False, True], ids=["pandaset", "nuscenes"])
def test_driving_segments_with_a_camera_pose_per_frame_load(tmp_path, nuscenes):
    scene = load_scene(_per_frame_segment(tmp_path / "seg", nuscenes))
    assert scene.meta["extrinsics"] == "per_frame" and scene.meta["camera_axes"] == "opencv"
    front0, left0, front1, left1 = scene.cameras
    assert [c.name for c in scene.cameras] == ["000_0", "000_1", "001_0", "001_1"]
    # world = the first ego frame (PandaSet) or the first front camera's frame with z up (nuScenes): where the
    # first ego frame's origin lies in it
    ego_origin = np.array([-1.5, 0.0, -1.6]) if nuscenes else np.zeros(3)
    np.testing.assert_allclose(front0.position, ego_origin + [1.5, 0.0, 1.6], atol=1e-6)
    np.testing.assert_allclose(front1.position, front0.position + [2.0, 0, 0], atol=1e-6)  # 2 m forward
    np.testing.assert_allclose(front0.rotation_c2w[:, 2], [1, 0, 0], atol=1e-9)  # looks forward
    np.testing.assert_allclose(front0.rotation_c2w[:, 1], [0, 0, -1], atol=1e-9)  # image down is world down
    np.testing.assert_allclose(left0.rotation_c2w[:, 2], [0, 1, 0], atol=1e-9)  # the side camera looks left
    np.testing.assert_allclose(left0.position - front0.position, [-0.5, 0.5, 0.0], atol=1e-6)
    # "left" for lane shifts is the ego's +y, the same for every camera of a frame
    for cam in scene.cameras:
        np.testing.assert_allclose(np.asarray(cam.meta["ego_to_world"])[:3, 1], [0, 1, 0], atol=1e-9)
    # lidar points 10 m ahead of and 5 m left of the ego origin, each frame's (2 m further at frame 1)
    np.testing.assert_allclose(scene.points, ego_origin + np.array([[10, 0, 0], [0, 5, 0], [12, 0, 0], [2, 5, 0]]),
                               atol=1e-3)
    # written in our per-camera layout, it reads back as the same cameras
    write_driving(scene, str(tmp_path / "out"))
    again = load_driving(str(tmp_path / "out"))
    for a, b in zip(scene.cameras, again.cameras):
        np.testing.assert_allclose(a.c2w, b.c2w, atol=1e-9)


def test_a_camera_that_moves_on_its_rig_is_not_written_as_one_mount(tmp_path):
    """In real per-frame segments each camera fires at its own time, so its pose relative to the ego (here the front
    camera) changes between frames: the per-camera layout cannot store that, and says so instead of moving it."""
    root = _per_frame_segment(tmp_path / "seg", nuscenes=True)
    moved = np.loadtxt(os.path.join(root, "extrinsics", "001_1.txt"))
    moved[:3, 3] += moved[:3, :3] @ [0.0, 0.0, 0.4]  # 0.4 m along the camera's view
    np.savetxt(os.path.join(root, "extrinsics", "001_1.txt"), moved)
    scene = load_scene(root)
    with pytest.raises(InputError, match=r"camera '001_1' sits elsewhere on its rig than '000_1'.*by 0\.4 m"):
        write_driving(scene, str(tmp_path / "out"))


def test_per_frame_segments_name_what_they_lack(tmp_path):
    root = _per_frame_segment(tmp_path / "cols", nuscenes=False)
    np.zeros((3, 4), np.float32).tofile(os.path.join(root, "lidar", "000.bin"))  # 48 bytes: not N x 5
    with pytest.raises(InputError, match=r"not a multiple of 5 float32 \(the points of a PandaSet segment\)"):
        load_scene(root)
    root = _per_frame_segment(tmp_path / "noref", nuscenes=True)
    os.remove(os.path.join(root, "images", "001_0.jpg"))
    os.remove(os.path.join(root, "extrinsics", "001_0.txt"))
    with pytest.raises(InputError, match=r"frames \[1\] have no image of camera '0'"):
        load_scene(root)
    root = _per_frame_segment(tmp_path / "nopose", nuscenes=True)
    os.remove(os.path.join(root, "lidar_pose", "001.txt"))
    with pytest.raises(InputError, match=r"lidar/001.bin: no pose for this scan"):
        load_scene(root)
    root = _per_frame_segment(tmp_path / "gap", nuscenes=False)
    os.remove(os.path.join(root, "extrinsics", "001_1.txt"))
    with pytest.raises(InputError, match=r"001_1.txt: missing camera→world of camera '1' at frame 001"):
        load_scene(root)
    root = _per_frame_segment(tmp_path / "mixed", nuscenes=False)
    for t in range(2):
        os.remove(os.path.join(root, "extrinsics", f"{t:03d}_1.txt"))
    np.savetxt(os.path.join(root, "extrinsics", "1.txt"), np.eye(4))
    with pytest.raises(InputError, match="a segment uses one layout"):
        load_scene(root)


def test_driving_layouts_that_are_not_read_are_named(tmp_path):
    root = _opencv_axes_segment(tmp_path / "tilted", lidar=False)
    E = np.eye(4)
    E[:3, :3] = [[0, 1, 0], [1, 0, 0], [0, 0, -1]]  # looking straight down: level under neither convention
    np.savetxt(os.path.join(root, "extrinsics", "0.txt"), E)
    with pytest.raises(InputError, match="cannot tell the cameras' axes"):
        load_scene(root)
    root = _opencv_axes_segment(tmp_path / "scaled", lidar=False)
    np.savetxt(os.path.join(root, "intrinsics", "0.txt"), [200.0, 200.0, 128.0, 96.0])  # for 4x larger images
    with pytest.raises(InputError, match=r"principal point \(128, 96\) of camera '0' lies outside its 64x48 images"):
        load_scene(root)
    np.savetxt(os.path.join(root, "intrinsics", "0.txt"), [50.0, 50.0, 32.0, 24.0, 0, 0, 0, 0, 0, 0, 0])
    with pytest.raises(InputError, match="must be 'fx fy cx cy"):
        load_scene(root)


def test_driving_round_trip_is_exact(tmp_path):
    a = load_scene(_driving(tmp_path, frames=5, lidar=False))
    a.splits["shift_1m"] = [1, 3]
    a.points = np.random.default_rng(0).normal(size=(20, 3)).astype(np.float32)
    a.point_colors = np.random.default_rng(1).integers(0, 256, (20, 3)).astype(np.uint8)
    write_driving(a, str(tmp_path / "out"))
    b = load_driving(str(tmp_path / "out"))
    _assert_same_scene(a, b)
    write_driving(b, str(tmp_path / "out2"))
    _assert_same_scene(b, load_driving(str(tmp_path / "out2")))


def test_driving_to_nerfstudio_keeps_cameras(tmp_path):
    a = load_scene(_driving(tmp_path, frames=3, lidar=False))
    b = load_scene(os.path.dirname(write_nerfstudio(a, str(tmp_path / "ns"))))
    _assert_same_scene(a, b, exact=False)


# --- bad inputs name the file and the frame


def test_missing_image_names_file_and_frame(tmp_path):
    scene = load_scene(_driving(tmp_path, frames=2, lidar=False))
    os.remove(scene.image_uris[1])
    with pytest.raises(InputError, match="001_0.jpg|000_1.jpg") as e:
        scene.load_image(1)
    assert scene.cameras[1].name in str(e.value) and "not found" in str(e.value)


def test_inconsistent_image_size_is_named(tmp_path):
    scene = load_scene(_driving(tmp_path, frames=2, lidar=False))
    imageio.write_image(scene.image_uris[3], _image(0, W + 2, H))
    with pytest.raises(InputError, match="inconsistent sizes") as e:
        scene.load_image(3)
    assert scene.image_uris[3] in str(e.value) and scene.cameras[3].name in str(e.value)


def test_nan_ego_pose_names_the_file(tmp_path):
    root = _driving(tmp_path, frames=3, lidar=False)
    np.savetxt(os.path.join(root, "ego_pose", "002.txt"), np.full((4, 4), np.nan))
    with pytest.raises(InputError, match="NaN") as e:
        load_scene(root)
    assert "002.txt" in str(e.value) and "frame 002" in str(e.value)


def test_missing_intrinsics_and_degenerate_extrinsics_are_named(tmp_path):
    root = _driving(tmp_path, frames=2, lidar=False)
    os.remove(os.path.join(root, "intrinsics", "1.txt"))
    with pytest.raises(InputError, match="missing intrinsics") as e:
        load_scene(root)
    assert os.path.join("intrinsics", "1.txt") in str(e.value)
    np.savetxt(os.path.join(root, "intrinsics", "1.txt"), [100.0, 100.0, 16.0, 12.0])
    np.savetxt(os.path.join(root, "extrinsics", "0.txt"), np.diag([1.0, 1.0, 0.0, 1.0]))
    with pytest.raises(InputError, match="orthonormal") as e:
        load_scene(root)
    assert os.path.join("extrinsics", "0.txt") in str(e.value)


def test_missing_ego_pose_for_an_image_is_named(tmp_path):
    root = _driving(tmp_path, frames=2, lidar=False)
    os.remove(os.path.join(root, "ego_pose", "001.txt"))
    with pytest.raises(InputError, match="missing ego pose of frame 001"):
        load_scene(root)


def test_nerfstudio_bad_pose_names_the_frame(tmp_path):
    root = _nerfstudio(tmp_path, n=3)
    meta = json.loads(open(os.path.join(root, "transforms.json")).read())
    meta["frames"][2]["transform_matrix"] = (np.eye(4) * 3).tolist()
    open(os.path.join(root, "transforms.json"), "w").write(json.dumps(meta))
    with pytest.raises(InputError, match="frame 2") as e:
        load_scene(root)
    assert "transforms.json" in str(e.value) and "frame_00002.png" in str(e.value)


def test_unknown_layout_and_missing_scene(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="unknown scene layout"):
        load_scene(str(tmp_path / "empty"))
    with pytest.raises(InputError, match="not found"):
        load_scene(str(tmp_path / "nope"))
