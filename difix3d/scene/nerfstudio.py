"""nerfstudio ``transforms.json`` scenes: reader and writer.

Honoured fields: shared or per-frame ``fl_x fl_y cx cy w h`` (or Blender's ``camera_angle_x``), distortion
``k1 k2 k3 p1 p2`` and ``camera_model`` (pinhole/OpenCV models; fisheye and equirectangular ones are refused);
``frames[i]``
``file_path`` (relative to the JSON's folder) and ``transform_matrix`` (camera→world, OpenGL/Blender axes: x right,
y up, z back — converted once here to OpenCV by flipping y and z); ``ply_file_path`` (initial points);
``train_filenames``/``val_filenames``/``test_filenames`` (nerfstudio's explicit split). Without an explicit split
every 8th frame is a test frame. Splits nerfstudio has no key for (``shift_1m``, ...) go under ``difix3d_splits``.
The writer gives all three lists (nerfstudio refuses a dataset that lists some splits but not the one it asks for);
a scene without a val split has its test views listed as val views, and a val list equal to the test list is read
as no val split of its own.
"""

from __future__ import annotations

import io
import posixpath
import re

import numpy as np

from difix3d import storage
from difix3d.errors import InputError
from difix3d.imageio import IMAGE_EXTENSIONS, image_size
from difix3d.scene.camera import Camera
from difix3d.scene.poses import check_rigid, rigid_inverse
from difix3d.scene.scene import DEFAULT_TEST_EVERY, Scene, every_nth_split, finite_points

GL_TO_CV = np.diag([1.0, -1.0, -1.0, 1.0])  # flips y and z: OpenGL camera axes <-> OpenCV camera axes
_DIST_KEYS = ("k1", "k2", "p1", "p2", "k3")  # OpenCV order, as Camera.dist
PINHOLE_MODELS = ("OPENCV", "PINHOLE", "SIMPLE_PINHOLE", "SIMPLE_RADIAL", "RADIAL", "PERSPECTIVE")
_SPLIT_KEYS = {"train": "train_filenames", "val": "val_filenames", "test": "test_filenames"}


def load_nerfstudio(uri: str, test_every: int = DEFAULT_TEST_EVERY) -> Scene:
    """Read a ``transforms.json`` (the file's URI) into a :class:`Scene` with OpenCV cameras."""
    uri = str(uri)
    meta = storage.read_json(uri)
    base = uri.rsplit("/", 1)[0] if "/" in uri else "."
    frames = meta.get("frames") if isinstance(meta, dict) else None
    if not frames:
        raise InputError(uri, "no 'frames' in transforms.json")
    if not isinstance(frames, list) or not all(isinstance(f, dict) for f in frames):
        raise InputError(uri, "'frames' must be a list of objects")

    cameras, uris, paths = [], [], []
    stems = [posixpath.splitext(posixpath.basename(str(f.get("file_path", ""))))[0] for f in frames]
    unique_stems = len(set(stems)) == len(stems)
    for i, frame in enumerate(frames):
        fp = frame.get("file_path")
        if not fp or not isinstance(fp, str):
            raise InputError(uri, f"frame {i} has no file_path string")
        where = f"{uri} (frame {i}, {fp})"
        image_uri = _with_extension(storage.join(base, fp) if not fp.startswith(("/", "s3://", "gs://")) else fp)
        if "transform_matrix" not in frame:
            raise InputError(where, "has no transform_matrix")
        c2w_gl = check_rigid(frame["transform_matrix"], where, "transform_matrix")
        K, w, h, dist = _intrinsics(meta, frame, where, image_uri)
        timestamp = _finite_number(frame.get("time", i), where, "time")
        name = stems[i] if unique_stems else fp.replace("/", "_")
        cameras.append(Camera(viewmat=rigid_inverse(c2w_gl @ GL_TO_CV), K=K, width=w, height=h, dist=dist, name=name,
                              camera_id=str(frame.get("camera_id", "")), timestamp=timestamp,
                              meta={"file_path": fp, "transform_matrix": c2w_gl.tolist()}))
        uris.append(image_uri)
        paths.append(fp)

    splits = _splits(meta, paths, uri, test_every)
    points = colors = None
    if meta.get("ply_file_path"):
        if not isinstance(meta["ply_file_path"], str):
            raise InputError(uri, f"ply_file_path must be a path, got {meta['ply_file_path']!r}")
        points, colors = read_points_ply(storage.join(base, meta["ply_file_path"]))
    name = base.rstrip("/").rsplit("/", 1)[-1] or "scene"
    return Scene(name=name, cameras=cameras, image_uris=uris, splits=splits, points=points, point_colors=colors,
                 root=base, meta={"layout": "nerfstudio"})


def write_nerfstudio(scene: Scene, out_uri: str, images: str = "images") -> str:
    """Write ``scene`` as ``out_uri/transforms.json`` (+ its images under ``images/``, + ``points3D.ply``).

    Per-frame intrinsics (nerfstudio reads per-frame keys over shared ones). Returns the JSON's URI."""
    out_uri = str(out_uri).rstrip("/")
    names = [cam.name for cam in scene.cameras]
    # image files are named after their cameras; names that are empty, repeated or hold a path get an index, or one
    # view's image would replace another's (and a test view would be read back as a training view)
    indexed = len(set(names)) != len(names) or any(not n or "/" in n or "\\" in n for n in names)
    frames, paths = [], []
    for i, cam in enumerate(scene.cameras):
        data, ext = scene.image_file(i)
        stem = f"{i:05d}_{cam.name}".rstrip("_").replace("/", "_").replace("\\", "_") if indexed else cam.name
        fp = f"{images}/{stem}.{ext}"
        storage.write_bytes(storage.join(out_uri, fp), data)
        c2w_gl = _c2w_gl(cam)
        frame = {"file_path": fp, "transform_matrix": c2w_gl.tolist(), "fl_x": cam.K[0, 0], "fl_y": cam.K[1, 1],
                 "cx": cam.K[0, 2], "cy": cam.K[1, 2], "w": cam.width, "h": cam.height}
        if cam.dist is not None:
            frame.update({k: float(v) for k, v in zip(_DIST_KEYS, cam.dist)})
        if cam.camera_id:
            frame["camera_id"] = cam.camera_id
        frame["time"] = cam.timestamp
        frames.append(frame)
        paths.append(fp)
    meta: dict = {"camera_model": "OPENCV", "frames": frames}
    for split, idx in _nerfstudio_splits(scene.splits, len(paths)).items():
        meta[_SPLIT_KEYS[split]] = [paths[i] for i in idx]
    extra = {split: [paths[i] for i in idx] for split, idx in scene.splits.items() if split not in _SPLIT_KEYS}
    if extra:
        meta["difix3d_splits"] = extra
    if scene.points is not None and len(scene.points):
        write_points_ply(storage.join(out_uri, "points3D.ply"), scene.points, scene.point_colors)
        meta["ply_file_path"] = "points3D.ply"
    json_uri = storage.join(out_uri, "transforms.json")
    storage.write_json(json_uri, meta)
    return json_uri


# --- point clouds (the plain x y z red green blue vertex PLY that nerfstudio writes and reads)


def write_points_ply(uri: str, points: np.ndarray, colors: np.ndarray | None = None) -> None:
    points = np.asarray(points, dtype=np.float32).reshape(-1, 3)
    colors = np.full((len(points), 3), 128, np.uint8) if colors is None else np.asarray(colors, np.uint8)
    dtype = np.dtype([("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("red", "u1"), ("green", "u1"), ("blue", "u1")])
    rec = np.empty(len(points), dtype=dtype)
    rec["x"], rec["y"], rec["z"] = points.T
    rec["red"], rec["green"], rec["blue"] = colors.T
    header = ("ply\nformat binary_little_endian 1.0\n"
              f"element vertex {len(points)}\n"
              "property float x\nproperty float y\nproperty float z\n"
              "property uchar red\nproperty uchar green\nproperty uchar blue\nend_header\n")
    storage.write_bytes(uri, header.encode("ascii") + rec.tobytes())


_PLY_TYPES = {"float": "f4", "float32": "f4", "double": "f8", "float64": "f8", "uchar": "u1", "uint8": "u1",
              "char": "i1", "int8": "i1", "short": "i2", "int16": "i2", "ushort": "u2", "uint16": "u2",
              "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4"}


def read_points_ply(uri: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(points [N, 3] float32, colors [N, 3] uint8 or None) of a vertex PLY (ascii or binary little endian)."""
    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError as e:
        raise InputError(uri, "point cloud PLY not found") from e
    end = re.search(rb"(?m)^end_header[ \t]*\r?\n", data)  # a line of its own (LF or CRLF), not in a comment
    if not data.startswith(b"ply") or end is None:
        raise InputError(uri, "not a PLY file")
    header = data[:end.start()].decode("ascii", "replace").splitlines()
    body = data[end.end():]
    fmt, count, props, in_vertex = "", 0, [], False
    for line in header:
        parts = line.split()
        try:
            if parts[:1] == ["format"]:
                fmt = parts[1]
            elif parts[:1] == ["element"]:
                in_vertex = parts[1] == "vertex"
                count = int(parts[2]) if in_vertex else count
            elif parts[:1] == ["property"] and in_vertex:
                if parts[1] == "list":
                    raise InputError(uri, "list properties in the vertex element are not supported")
                if parts[1] not in _PLY_TYPES:
                    raise InputError(uri, f"vertex property type {parts[1]!r} is not supported "
                                          f"({', '.join(sorted(_PLY_TYPES))})")
                props.append((parts[2], "<" + _PLY_TYPES[parts[1]]))
        except InputError:
            raise
        except (IndexError, ValueError):
            raise InputError(uri, f"malformed PLY header line {line!r}") from None
    if count < 0:
        raise InputError(uri, f"negative vertex count {count}")
    names = [p for p, _ in props]
    if not {"x", "y", "z"} <= set(names):
        raise InputError(uri, f"vertex element lacks x/y/z (has {names})")
    if fmt not in ("binary_little_endian", "ascii"):
        raise InputError(uri, f"unsupported PLY format {fmt!r}")
    if count == 0:
        return np.zeros((0, 3), np.float32), None
    if fmt == "binary_little_endian":
        dtype = np.dtype(props)
        if len(body) < count * dtype.itemsize:
            raise InputError(uri, f"truncated: {count} vertices need {count * dtype.itemsize} bytes, the file holds "
                                  f"{len(body)}")
        rec = np.frombuffer(body, dtype=dtype, count=count)
        col = {n: rec[n] for n in names}
    elif fmt == "ascii":
        try:
            table = np.loadtxt(io.StringIO(body.decode("ascii")), ndmin=2, max_rows=count)
        except (ValueError, UnicodeDecodeError) as e:
            raise InputError(uri, f"ascii vertex table is not numeric ({e})") from e
        if (table.shape[0] < count or table.shape[1] < len(names)):
            raise InputError(uri, f"ascii vertex table has {table.shape[0]} rows of {table.shape[1]} values, the "
                                  f"header says {count} rows of {len(names)}")
        col = {n: table[:, j] for j, n in enumerate(names)}
    points = np.stack([col["x"], col["y"], col["z"]], axis=1).astype(np.float32)
    colors = None
    if {"red", "green", "blue"} <= set(names):
        colors = np.stack([col["red"], col["green"], col["blue"]], axis=1).astype(np.uint8)
    return finite_points(points, colors, uri)


# --- helpers


def _nerfstudio_splits(splits: dict[str, list[int]], n: int) -> dict[str, list[int]]:
    """train/val/test indices for all three of nerfstudio's split keys, or none when the scene has none of them.

    nerfstudio's dataparser raises "The dataset's list of filenames for split val is missing" when any split list is
    given but not the one it asks for, and ``ns-train`` asks for "train" and "val" ("test" under ``ns-eval``). Without
    a val split the test views are the val views, as in nerfstudio's own splitters (one eval set for both)."""
    if not any(s in splits for s in _SPLIT_KEYS):
        return {}
    test = splits.get("test", splits.get("val", []))
    val = splits.get("val", test)
    held = set(test) | set(val)
    train = splits.get("train", [i for i in range(n) if i not in held])  # what the reader takes for a missing train
    return {"train": list(train), "val": list(val), "test": list(test)}


def _c2w_gl(cam: Camera) -> np.ndarray:
    """OpenGL camera→world; the matrix read from file when it still matches the camera (exact round trips)."""
    if "transform_matrix" in cam.meta:
        T = np.asarray(cam.meta["transform_matrix"], dtype=np.float64)
        if T.shape == (4, 4) and np.allclose(rigid_inverse(T @ GL_TO_CV), cam.viewmat, atol=1e-12, rtol=0):
            return T
    return rigid_inverse(cam.viewmat) @ GL_TO_CV


def _intrinsics(meta: dict, frame: dict, where: str, image_uri: str):
    def get(key):
        v = frame.get(key, meta.get(key))
        return None if v is None else _finite_number(v, where, key)  # json reads NaN and Infinity

    model = str(frame.get("camera_model", meta.get("camera_model", "OPENCV"))).upper()
    if model not in PINHOLE_MODELS:  # fisheye k1..k4 read as OpenCV k1 k2 p1 p2 k3 would be silently wrong
        raise InputError(where, f"camera_model {model!r} is not supported (supported: {', '.join(PINHOLE_MODELS)}); "
                                "convert or undistort the images to a pinhole/OPENCV camera first")
    fx, fy, cx, cy = get("fl_x"), get("fl_y"), get("cx"), get("cy")
    angle_x = get("camera_angle_x")  # the Blender/NeRF-synthetic form: a horizontal field of view
    if fx is None and fy is None and angle_x is None:
        raise InputError(where, "no fl_x/fl_y (shared or per frame) and no camera_angle_x")
    w, h = get("w"), get("h")
    if w is None or h is None:
        try:  # the size of the image as read (upright: its EXIF orientation applied)
            w, h = image_size(storage.read_bytes(image_uri), image_uri)
        except FileNotFoundError as e:
            raise InputError(image_uri, f"image of {where} not found (and no w/h given)") from e
        except InputError as e:
            raise InputError(image_uri, f"cannot read the image size of {where} (no w/h given): {e.problem}") from e
    if w != int(w) or h != int(h):
        raise InputError(where, f"w={w} h={h} must be whole numbers of pixels")
    w, h = int(w), int(h)
    if fx is None and fy is None:
        fx = fy = 0.5 * w / np.tan(0.5 * angle_x)
    fx, fy = (fy if fx is None else fx), (fx if fy is None else fy)  # one focal length given: square pixels
    cx = w / 2.0 if cx is None else cx
    cy = h / 2.0 if cy is None else cy
    values = np.array([fx, fy, cx, cy])
    if not np.all(np.isfinite(values)) or fx <= 0 or fy <= 0 or w <= 0 or h <= 0:
        raise InputError(where, f"bad intrinsics fl_x={fx} fl_y={fy} cx={cx} cy={cy} w={w} h={h}")
    K = np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]])
    dist = np.array([get(k) or 0.0 for k in _DIST_KEYS])
    return K, w, h, (dist if np.any(dist) else None)


def _finite_number(value, where: str, key: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(where, f"{key} is {value!r}, not a number") from None
    if not np.isfinite(number):
        raise InputError(where, f"{key} is {value!r}, not a finite number")
    return number


def _with_extension(image_uri: str) -> str:
    """``file_path`` without an extension (the Blender/NeRF-synthetic form, ``./train/r_0``): the first image
    extension that exists; otherwise the path as given (reported as missing where it is read)."""
    if posixpath.splitext(image_uri)[1] or storage.exists(image_uri):
        return image_uri
    return next((image_uri + ext for ext in IMAGE_EXTENSIONS if storage.exists(image_uri + ext)), image_uri)


def _splits(meta: dict, paths: list[str], uri: str, test_every: int) -> dict[str, list[int]]:
    index = {p: i for i, p in enumerate(paths)}
    index.update({p.removeprefix("./"): i for i, p in enumerate(paths)})

    def lookup(split: str, names: list[str]) -> list[int]:
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise InputError(uri, f"{split} must be a list of file paths")
        missing = [n for n in names if n not in index and n.removeprefix("./") not in index]
        if missing:
            raise InputError(uri, f"{split} names files that are not frames: {missing[:3]}")
        return [index.get(n, index.get(n.removeprefix("./"))) for n in names]

    splits = {s: lookup(k, meta[k]) for s, k in _SPLIT_KEYS.items() if k in meta}
    extra = meta.get("difix3d_splits") or {}
    if not isinstance(extra, dict):
        raise InputError(uri, "difix3d_splits must map split names to lists of file paths")
    for s, names in extra.items():
        splits[s] = lookup(f"difix3d_splits[{s!r}]", names)
    held_extra = {i for s in extra for i in splits[s]}  # views of the extra splits (lane shifts...) are never trained on
    if "train" not in splits and "test" not in splits and "val" not in splits:
        nth = every_nth_split(len(paths), test_every)
        splits["test"] = nth["test"]
        splits["train"] = [i for i in nth["train"] if i not in held_extra]
    if "test" not in splits:
        splits["test"] = list(splits.get("val", []))
    if "train" not in splits:
        held = set(splits["test"]) | set(splits.get("val", [])) | held_extra
        splits["train"] = [i for i in range(len(paths)) if i not in held]
    if "val" in splits and set(splits["val"]) == set(splits["test"]):
        del splits["val"]  # the test views doubling as val views (as the writer gives them): no split of its own
    return splits
