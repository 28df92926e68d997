"""Driving segments in drivestudio's (OmniRe's) processed per-segment layout: reader and writer.

Layout of one segment folder (as drivestudio's converters write it for Waymo, Argoverse2, KITTI, NuPlan)::

    images/{t:03d}_{cam}.jpg     frame t of camera cam (we also read .png/.jpeg; our synthetic segments write .png)
    ego_pose/{t:03d}.txt         4x4 ego→world (ego axes x forward, y left, z up)
    extrinsics/{cam}.txt         4x4 camera→ego; camera axes in the *dataset* convention (x forward, y left, z up:
                                 Waymo, ours) or OpenCV's (x right, y down, z forward: Argoverse2, KITTI, NuPlan)
    intrinsics/{cam}.txt         fx fy cx cy k1 k2 p1 p2 k3 (pixels, OpenCV distortion order)
    lidar/{t:03d}.bin            optional float32, points in the ego frame of frame t: N x 14 with dataset axes
                                 (Waymo: origin(3) point(3) flow(3) flow class, ground, intensity, elongation, laser
                                 id), N x 4 with OpenCV axes (Argoverse2, KITTI: point(3) intensity)

drivestudio's nuScenes and PandaSet segments store one camera→world per frame instead (``extrinsics/{t:03d}_{cam}.txt``,
OpenCV camera axes), and their lidar differently:

- PandaSet: ``ego_pose/{t:03d}.txt`` as above; ``lidar/{t:03d}.bin`` N x 5 (point(3), intensity, laser id) in the ego
  frame of frame t.
- nuScenes: no ego poses; ``lidar_pose/{t:03d}.txt`` 4x4 lidar→world and ``lidar/{t:03d}.bin`` N x 4 (point(3),
  intensity) in the lidar frame. The ego frame of a frame is taken to be its reference camera's (``0``, nuScenes'
  CAM_FRONT; else the first camera named front) with dataset axes (x forward, y left, z up): what "left" means for
  lane shifts.

Conventions, as drivestudio's ``datasets/*/…_sourceloader.py`` read them:
- OpenCV camera→world = ``ego_to_world @ extrinsic @ OPENCV2DATASET`` with ``OPENCV2DATASET`` mapping OpenCV axes
  (x right, y down, z forward) to the dataset camera axes (x forward, y left, z up) for Waymo, and the identity for
  the others. Which one a segment uses is not written in it: ``camera_axes="auto"`` tells them apart by where each
  camera's "down" points in the ego frame (down, under the right convention; sideways or up under the other).
- World = the first ego pose (drivestudio re-expresses every pose relative to ``ego_pose/{first}.txt``, which also
  keeps float32 rasterization away from UTM-sized coordinates). We do the same; segments whose first ego pose is the
  identity (ours) load unchanged. Per-frame segments without ego poses (nuScenes) take the first frame's reference
  camera frame, so that the world's z is up (drivestudio takes the camera's own OpenCV frame there).
- Camera names are the file-name token after ``{t:03d}_``: drivestudio's Waymo ids are ``0``..``4`` (front,
  front-left, front-right, side-left, side-right); any token is accepted (ours: ``front``, ``left``, ``front_shift1m``).
- Image sizes are not in the layout: they come from ``difix3d_split.json`` when present, else the first image of
  each camera. Distortion is kept on the camera (``dist``); drivestudio itself ignores it.

difix3d additions, both optional, so a plain drivestudio folder still loads:
- ``difix3d_split.json``: ``{"format": "difix3d-driving", "version": 1, "cameras": {cam: {"width", "height"}},
  "splits": {split: [image file names]}}`` — the train/test/cross_camera/shift_Xm views of synthetic segments.
  Without it the split is every ``test_every``-th frame (all its cameras) for test, the rest train.
- ``difix3d_points.npz``: ``points`` [N, 3] float32 (world, same frame as ``ego_pose``) and ``colors`` [N, 3] uint8.
  Without it, lidar points (if any) initialize the scene, uncoloured.
"""

from __future__ import annotations

import io
import re

import numpy as np

from difix3d import storage
from difix3d.errors import InputError
from difix3d.imageio import image_size
from difix3d.scene.camera import Camera
from difix3d.scene.poses import check_rigid, rigid_inverse
from difix3d.scene.scene import DEFAULT_TEST_EVERY, Scene, finite_points

# OpenCV camera axes -> dataset camera axes (drivestudio's OPENCV2DATASET); a signed permutation, so exact
OPENCV2DATASET = np.array([[0, 0, 1, 0], [-1, 0, 0, 0], [0, -1, 0, 0], [0, 0, 0, 1]], dtype=np.float64)
SPLIT_FILE = "difix3d_split.json"
POINTS_FILE = "difix3d_points.npz"
LIDAR_COLUMNS = {"dataset": 14, "opencv": 4}  # float32 columns of a lidar point, by the segment's camera axes
LIDAR_XYZ = {"dataset": slice(3, 6), "opencv": slice(0, 3)}
CAMERA_AXES = ("auto", "dataset", "opencv")
_IMAGE_RE = re.compile(r"^(\d+)_(.+)\.(jpg|jpeg|png)$", re.IGNORECASE)


def load_driving(uri: str, test_every: int = DEFAULT_TEST_EVERY, max_lidar_points: int = 300_000,
                 normalize_world: bool = True, camera_axes: str = "auto") -> Scene:
    """Read a driving segment folder (layout in the module docstring) into a :class:`Scene`. ``camera_axes``: the
    extrinsics' camera axes, ``"dataset"`` (Waymo), ``"opencv"`` (Argoverse2, KITTI, NuPlan) or ``"auto"``."""
    if camera_axes not in CAMERA_AXES:
        raise ValueError(f"camera_axes: expected one of {CAMERA_AXES}, got {camera_axes!r}")
    uri = str(uri).rstrip("/")
    meta = _read_split_file(uri)
    frames = _list_images(uri)  # {(t, cam): image uri}
    if not frames:
        raise InputError(storage.join(uri, "images"), "no images named {t:03d}_{cam}.jpg/.png")
    times = sorted({t for t, _ in frames})
    cam_order = list(meta["cameras"]) if meta else []
    cam_order += sorted({c for _, c in frames} - set(cam_order))
    cam_order = [c for c in cam_order if any(cc == c for _, cc in frames)]

    rigs = {c: _read_rig_camera(uri, c, frames, meta) for c in cam_order}
    per_frame = [c for c in cam_order if rigs[c][4] is None]
    if per_frame and len(per_frame) != len(cam_order):
        raise InputError(storage.join(uri, "extrinsics"), f"cameras {per_frame} have one camera→world per frame and "
                         f"{[c for c in cam_order if c not in per_frame]} one camera→ego: a segment uses one layout")
    if per_frame:
        ego, c2w_by_frame, axes, lidar = _per_frame_poses(uri, frames, times, cam_order, camera_axes)
    else:
        ego = {t: _read_matrix(storage.join(uri, "ego_pose", f"{t:03d}.txt"), f"ego pose of frame {t:03d}")
               for t in times}
        axes = _camera_axes(camera_axes, {c: r[4] for c, r in rigs.items()}, uri)
        lidar = (LIDAR_COLUMNS[axes], LIDAR_XYZ[axes], None,  # points in each frame's ego frame
                 f"a segment with {axes} camera axes")
    origin_inv = None
    if normalize_world and not np.array_equal(ego[times[0]], np.eye(4)):
        origin_inv = rigid_inverse(ego[times[0]])
        ego = {t: origin_inv @ e for t, e in ego.items()}
    to_opencv = OPENCV2DATASET if axes == "dataset" else np.eye(4)
    # cameras keep their extrinsics in dataset axes (what write_driving writes), whatever the file's convention
    to_dataset = to_opencv @ rigid_inverse(OPENCV2DATASET)

    cameras, uris, by_file = [], [], {}
    for t in times:
        for c in cam_order:
            if (t, c) not in frames:
                continue
            K, dist, w, h, cam_to_ego = rigs[c]
            if per_frame:  # camera→ego of this frame, in the file's camera axes
                c2w_file = c2w_by_frame[t, c] if origin_inv is None else origin_inv @ c2w_by_frame[t, c]
                cam_to_ego = rigid_inverse(ego[t]) @ c2w_file
            c2w = ego[t] @ cam_to_ego @ to_opencv
            name = f"{t:03d}_{c}"
            cameras.append(Camera.from_c2w(c2w, K, w, h, dist=dist, name=name, camera_id=c, timestamp=float(t),
                                           meta={"frame": t, "ego_to_world": ego[t].tolist(),
                                                 "cam_to_ego": (cam_to_ego @ to_dataset).tolist()}))
            uris.append(frames[(t, c)])
            by_file[uris[-1].rsplit("/", 1)[-1].rsplit("\\", 1)[-1]] = len(cameras) - 1

    if meta:
        splits = {}
        for split, files in meta["splits"].items():
            missing = [f for f in files if f not in by_file]
            if missing:
                raise InputError(storage.join(uri, SPLIT_FILE),
                                 f"split {split!r} names images that are not in images/: {missing[:3]}")
            splits[split] = [by_file[f] for f in files]
    else:
        test_t = set(times[::test_every]) if test_every > 0 else set()
        splits = {"train": [i for i, c in enumerate(cameras) if c.meta["frame"] not in test_t],
                  "test": [i for i, c in enumerate(cameras) if c.meta["frame"] in test_t]}
    columns, xyz, lidar_poses, kind = lidar
    if lidar_poses is not None:  # nuScenes: lidar frame -> world, re-expressed like every pose
        to_world = {t: p if origin_inv is None else origin_inv @ p for t, p in lidar_poses.items()}
    else:
        to_world = ego
    points, colors = _read_points(uri, times, to_world, origin_inv, max_lidar_points, columns, xyz, kind)
    name = uri.rsplit("/", 1)[-1] or "segment"
    return Scene(name=name, cameras=cameras, image_uris=uris, splits=splits, points=points, point_colors=colors,
                 root=uri, meta={"layout": "driving", "camera_axes": axes,
                                 "extrinsics": "per_frame" if per_frame else "per_camera"})


def _camera_axes(choice: str, extrinsics: dict[str, np.ndarray], uri: str) -> str:
    """The extrinsics' camera axes: ``choice`` unless ``"auto"``; then the convention under which every camera's
    "down" (OpenCV +y) points down in the ego frame (z up), as a car's cameras do. Neither or both: an error asking
    for ``camera_axes``."""
    if choice != "auto":
        return choice
    fits = {axes: all((E @ (OPENCV2DATASET if axes == "dataset" else np.eye(4)))[2, 1] < -0.5
                      for E in extrinsics.values()) for axes in ("dataset", "opencv")}
    if fits["dataset"] != fits["opencv"]:
        return "dataset" if fits["dataset"] else "opencv"
    raise InputError(storage.join(uri, "extrinsics"), "cannot tell the cameras' axes: under neither or both of the "
                     "conventions (Waymo's x forward/y left/z up, OpenCV's x right/y down/z forward) does every "
                     "camera look level with the ego frame's z up; load it with camera_axes='dataset' or 'opencv'")


def write_driving(scene: Scene, out_uri: str, images: dict[int, np.ndarray] | None = None,
                  image_format: str = "png") -> None:
    """Write ``scene`` in the driving layout (+ ``difix3d_split.json``, + ``difix3d_points.npz`` when it has points).

    Each camera needs ``camera_id`` and ``meta`` with ``frame``, ``ego_to_world`` and ``cam_to_ego`` (what
    :func:`load_driving` and the synthetic generator set). Images: ``images[i]`` (uint8 [H, W, 3]) when given, else
    the bytes of ``scene.image_uris[i]`` copied as they are.
    """
    from difix3d import imageio

    out_uri = str(out_uri).rstrip("/")
    ego_written: dict[int, np.ndarray] = {}
    rig: dict[str, Camera] = {}
    files: list[str] = []
    for i, cam in enumerate(scene.cameras):
        if not cam.camera_id or not {"frame", "ego_to_world", "cam_to_ego"} <= set(cam.meta):
            raise InputError(scene.root or scene.name, f"camera {cam.name!r} lacks camera_id or its frame/ego_to_world/"
                                                       "cam_to_ego meta: not a driving-rig camera")
        t = int(cam.meta["frame"])
        ego = np.asarray(cam.meta["ego_to_world"], dtype=np.float64)
        _check_rig_pose(scene, cam, ego, rig.get(cam.camera_id))
        if t in ego_written and not np.array_equal(ego_written[t], ego):
            raise InputError(scene.root or scene.name, f"frame {t:03d}: cameras disagree on the ego pose")
        if t not in ego_written:
            ego_written[t] = ego
            storage.write_text(storage.join(out_uri, "ego_pose", f"{t:03d}.txt"), _format_matrix(ego))
        if cam.camera_id not in rig:
            rig[cam.camera_id] = cam
            storage.write_text(storage.join(out_uri, "extrinsics", f"{cam.camera_id}.txt"),
                               _format_matrix(np.asarray(cam.meta["cam_to_ego"], dtype=np.float64)))
            dist = np.zeros(5) if cam.dist is None else np.pad(cam.dist, (0, max(0, 5 - len(cam.dist))))[:5]
            values = [cam.K[0, 0], cam.K[1, 1], cam.K[0, 2], cam.K[1, 2], *dist]
            storage.write_text(storage.join(out_uri, "intrinsics", f"{cam.camera_id}.txt"),
                               "\n".join(_fmt(v) for v in values) + "\n")
        if images is not None and i in images:
            fname = f"{t:03d}_{cam.camera_id}.{image_format}"
            imageio.write_image(storage.join(out_uri, "images", fname), images[i])
        else:
            data, ext = scene.image_file(i)
            fname = f"{t:03d}_{cam.camera_id}.{ext}"
            storage.write_bytes(storage.join(out_uri, "images", fname), data)
        files.append(fname)
    if scene.points is not None and len(scene.points):
        buf = io.BytesIO()
        colors = scene.point_colors if scene.point_colors is not None else np.full((len(scene.points), 3), 128,
                                                                                   np.uint8)
        np.savez(buf, points=scene.points.astype(np.float32), colors=colors.astype(np.uint8))
        storage.write_bytes(storage.join(out_uri, POINTS_FILE), buf.getvalue())
    storage.write_json(storage.join(out_uri, SPLIT_FILE), {
        "format": "difix3d-driving", "version": 1,
        "cameras": {c: {"width": cam.width, "height": cam.height} for c, cam in rig.items()},
        "splits": {s: [files[i] for i in idx] for s, idx in scene.splits.items()},
    })


# --- helpers


def _read_split_file(uri: str) -> dict | None:
    path = storage.join(uri, SPLIT_FILE)
    if not storage.exists(path):
        return None
    meta = storage.read_json(path)
    if not isinstance(meta, dict) or not isinstance(meta.get("splits"), dict) or not isinstance(
            meta.get("cameras"), dict):
        raise InputError(path, "expected {'cameras': {...}, 'splits': {...}}")
    for cam, size in meta["cameras"].items():
        w = size.get("width") if isinstance(size, dict) else None
        h = size.get("height") if isinstance(size, dict) else None
        if not (type(w) is int and type(h) is int and w > 0 and h > 0):
            raise InputError(path, f"cameras[{cam!r}] needs positive integer width and height, got {size!r}")
    for split, files in meta["splits"].items():
        if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
            raise InputError(path, f"splits[{split!r}] must be a list of image file names")
    missing = [s for s in ("train", "test") if s not in meta["splits"]]
    if missing:
        raise InputError(path, f"splits lacks {missing}: a scene needs train and test views")
    return meta


def _list_images(uri: str) -> dict[tuple[int, str], str]:
    out = {}
    for f in storage.list_dir(storage.join(uri, "images")):
        m = _IMAGE_RE.match(f.replace("\\", "/").rsplit("/", 1)[-1])
        if m:
            key = (int(m.group(1)), m.group(2))
            if key in out:
                raise InputError(f, f"two images for frame {key[0]:03d} of camera {key[1]!r}")
            out[key] = f
    return out


def _read_matrix(path: str, what: str) -> np.ndarray:
    try:
        text = storage.read_text(path)
    except FileNotFoundError as e:
        raise InputError(path, f"missing {what}") from e
    try:
        values = np.array(text.split(), dtype=np.float64)
    except ValueError as e:
        raise InputError(path, f"{what} is not numeric ({e})") from e
    if values.size not in (12, 16):
        raise InputError(path, f"{what}: expected a 4x4 matrix, got {values.size} numbers")
    return check_rigid(values.reshape(-1, 4), path, what)


def _per_frame_poses(uri: str, frames: dict, times: list[int], cam_order: list[str], camera_axes: str):
    """A per-frame segment's (ego→world by frame, camera→world by (frame, camera) in the files' camera axes, those
    axes, lidar layout ``(columns, xyz, lidar→world by frame or None)``), before re-expressing the world."""
    c2w = {}
    for t, c in frames:
        path = storage.join(uri, "extrinsics", f"{t:03d}_{c}.txt")
        c2w[t, c] = _read_matrix(path, f"camera→world of camera {c!r} at frame {t:03d}")
    if storage.is_dir(storage.join(uri, "ego_pose")):  # PandaSet
        ego = {t: _read_matrix(storage.join(uri, "ego_pose", f"{t:03d}.txt"), f"ego pose of frame {t:03d}")
               for t in times}
        t0 = times[0]
        axes = _camera_axes(camera_axes, {c: rigid_inverse(ego[t0]) @ c2w[t0, c] for c in cam_order
                                          if (t0, c) in c2w}, uri)
        return ego, c2w, axes, (5, slice(0, 3), None, "a PandaSet segment")
    # nuScenes: each frame's ego frame is its reference camera's, in dataset axes
    axes = "opencv" if camera_axes == "auto" else camera_axes  # drivestudio writes nuScenes poses in OpenCV axes
    to_opencv = OPENCV2DATASET if axes == "dataset" else np.eye(4)
    ref = _reference_camera(cam_order)
    missing = [t for t in times if (t, ref) not in c2w]
    if missing:
        raise InputError(storage.join(uri, "images"), f"frames {missing[:5]} have no image of camera {ref!r}: without "
                                                      "ego_pose/ each frame's ego frame is that camera's, so every "
                                                      "frame needs it")
    ego = {t: c2w[t, ref] @ to_opencv @ rigid_inverse(OPENCV2DATASET) for t in times}
    lidar_poses = {}
    if not storage.exists(storage.join(uri, POINTS_FILE)):  # the poses place lidar scans, which the file replaces
        for t in times:
            path = storage.join(uri, "lidar_pose", f"{t:03d}.txt")
            if storage.exists(path):
                lidar_poses[t] = _read_matrix(path, f"lidar pose of frame {t:03d}")
    return ego, c2w, axes, (4, slice(0, 3), lidar_poses, "a nuScenes segment")


def _reference_camera(cam_order: list[str]) -> str:
    """The camera whose frame stands for the ego's in a segment without ego poses: ``0`` (nuScenes' CAM_FRONT in
    drivestudio's numbering), else the first whose name says front, else the first."""
    if "0" in cam_order:
        return "0"
    return next((c for c in cam_order if "front" in c.lower()), cam_order[0])


def _read_rig_camera(uri: str, cam: str, frames: dict, meta: dict | None):
    """(K [3, 3], dist [5] or None, width, height, camera→ego [4, 4] in the file's camera axes, or None for a camera
    with one camera→world per frame) of one rig camera."""
    ipath = storage.join(uri, "intrinsics", f"{cam}.txt")
    try:
        values = np.array(storage.read_text(ipath).split(), dtype=np.float64)
    except FileNotFoundError as e:
        raise InputError(ipath, f"missing intrinsics of camera {cam!r}") from e
    except ValueError as e:
        raise InputError(ipath, f"intrinsics of camera {cam!r} are not numeric ({e})") from e
    if not 4 <= values.size <= 9 or not np.all(np.isfinite(values)) or values[0] <= 0 or values[1] <= 0:
        raise InputError(ipath, f"intrinsics of camera {cam!r} must be 'fx fy cx cy [k1 k2 p1 p2 k3]' with "
                                f"positive focal lengths, got {values.tolist()}")
    K = np.array([[values[0], 0, values[2]], [0, values[1], values[3]], [0, 0, 1]])
    dist = np.pad(values[4:9], (0, 5 - values[4:9].size))
    dist = None if not np.any(dist) else dist
    epath = storage.join(uri, "extrinsics", f"{cam}.txt")
    first_t = min(t for t, c in frames if c == cam)
    if not storage.exists(epath) and storage.exists(storage.join(uri, "extrinsics", f"{first_t:03d}_{cam}.txt")):
        extrinsic = None  # one camera→world per frame (nuScenes/PandaSet): read by _per_frame_poses
    else:
        extrinsic = _read_matrix(epath, f"extrinsics of camera {cam!r}")
    if meta and cam in meta["cameras"]:
        w, h = int(meta["cameras"][cam]["width"]), int(meta["cameras"][cam]["height"])
    else:
        first = frames[min(t for t, c in frames if c == cam), cam]
        try:  # the size of the image as read (upright: its EXIF orientation applied)
            w, h = image_size(storage.read_bytes(first), first)
        except Exception as e:  # noqa: BLE001 - any decoder failure is a bad image
            raise InputError(first, f"cannot read image size of camera {cam!r} ({e})") from e
    if not (0 < K[0, 2] < w and 0 < K[1, 2] < h):  # intrinsics of another resolution than the images
        raise InputError(ipath, f"principal point ({K[0, 2]:g}, {K[1, 2]:g}) of camera {cam!r} lies outside its "
                                f"{w}x{h} images: intrinsics for another image size? (scale fx fy cx cy by the "
                                "resize the images had)")
    return K, dist, w, h, extrinsic


def _read_points(uri: str, times: list[int], to_world: dict, origin_inv, max_lidar_points: int, columns: int,
                 xyz: slice, kind: str):
    """The segment's points: ``difix3d_points.npz`` when present, else every lidar scan (``columns`` float32 per
    point, ``xyz`` its coordinates) taken to the world by ``to_world[t]``."""
    path = storage.join(uri, POINTS_FILE)
    if storage.exists(path):
        try:
            data = np.load(io.BytesIO(storage.read_bytes(path)))
            points, colors = data["points"].astype(np.float64), data["colors"]
        except Exception as e:  # noqa: BLE001
            raise InputError(path, f"expected an npz with 'points' [N, 3] and 'colors' [N, 3] ({e})") from e
        points, colors = finite_points(points, colors, path)
        if origin_inv is not None:
            points = points @ origin_inv[:3, :3].T + origin_inv[:3, 3]
        return points.astype(np.float32), colors
    chunks = []
    for t in times:
        lpath = storage.join(uri, "lidar", f"{t:03d}.bin")
        if not storage.exists(lpath):
            continue
        raw = storage.read_bytes(lpath)
        if len(raw) % (4 * columns):
            raise InputError(lpath, f"lidar file size {len(raw)} is not a multiple of {columns} float32 (the points "
                                    f"of {kind})")
        if t not in to_world:
            raise InputError(lpath, f"no pose for this scan (lidar_pose/{t:03d}.txt)")
        pts = np.frombuffer(raw, dtype=np.float32).reshape(-1, columns)[:, xyz].astype(np.float64)
        pts = finite_points(pts, None, lpath, allow_empty=True)[0]
        chunks.append(pts @ to_world[t][:3, :3].T + to_world[t][:3, 3])  # sensor or ego frame of t -> world
    if not chunks:
        return None, None
    points = np.concatenate(chunks)
    if len(points) > max_lidar_points:  # a deterministic even subsample
        points = points[np.linspace(0, len(points) - 1, max_lidar_points).astype(np.int64)]
    return points.astype(np.float32), None


def _check_rig_pose(scene: Scene, cam: Camera, ego: np.ndarray, first: Camera | None) -> None:
    """The layout stores a camera as its frame's ego pose times its rig camera's extrinsics and intrinsics: refuse a
    camera that is not (moved off its rig with ``with_pose``, or intrinsics that differ within one camera id) rather
    than write a pose or intrinsics other than its own."""
    where = scene.root or scene.name
    stored = ego @ np.asarray(cam.meta["cam_to_ego"], dtype=np.float64) @ OPENCV2DATASET
    if not np.allclose(stored, cam.c2w, atol=1e-6, rtol=0):
        raise InputError(where, f"camera {cam.name!r} is not at its rig pose (ego_to_world @ cam_to_ego): the driving "
                                "layout cannot store a moved camera; write it with write_nerfstudio")
    if first is not None:
        moved = np.asarray(cam.meta["cam_to_ego"], dtype=np.float64) - np.asarray(first.meta["cam_to_ego"], np.float64)
        if np.abs(moved).max() > 1e-6:  # per-frame segments (nuScenes, PandaSet): each camera fires at its own time
            raise InputError(where, f"camera {cam.name!r} sits elsewhere on its rig than {first.name!r}, the first of "
                                    f"camera id {cam.camera_id!r} (by {np.abs(moved[:3, 3]).max():.3g} m): the "
                                    "driving layout stores one mount per camera id; write it with write_nerfstudio")
    if first is not None and not (np.allclose(first.K, cam.K, atol=1e-9, rtol=0) and (first.width, first.height)
                                  == (cam.width, cam.height) and _same_dist(first.dist, cam.dist)):
        raise InputError(where, f"camera {cam.name!r} has other intrinsics or size than {first.name!r}, the first "
                                f"of camera id {cam.camera_id!r}: the driving layout stores one per camera id")


def _same_dist(a, b) -> bool:
    a = np.zeros(5) if a is None else np.pad(np.asarray(a, float), (0, max(0, 5 - len(a))))[:5]
    b = np.zeros(5) if b is None else np.pad(np.asarray(b, float), (0, max(0, 5 - len(b))))[:5]
    return bool(np.allclose(a, b, atol=1e-12, rtol=0))


def _fmt(v: float) -> str:
    return repr(float(v))  # shortest exact round-trip text


def _format_matrix(M: np.ndarray) -> str:
    return "\n".join(" ".join(_fmt(v) for v in row) for row in M) + "\n"
