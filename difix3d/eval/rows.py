"""Evaluation rows (one render and its ground truth): from a rows file or from the fleet job's output folder.

A row is ``{"segment", "split", "view", "method", "render_uri", "gt_uri"}``; the fleet layout is
``<out>/scenes/<scene_id>/renders/<method>/<split>/<name>.png`` with ground truth under
``<out>/scenes/<scene_id>/renders/gt/<split>/<name>.png``. A rows file may leave ``split`` out: its rows then
belong to the split ``"all"`` (the split is never guessed from a view name).
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from dataclasses import dataclass

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from difix3d import storage
from difix3d.errors import InputError
from difix3d.imageio import IMAGE_EXTENSIONS

ROW_COLUMNS = ("segment", "view", "method", "render_uri", "gt_uri")  # required in a rows file
SPLIT_COLUMN, DEFAULT_SPLIT = "split", "all"  # optional in a rows file
ROW_FIELDS = ("segment", SPLIT_COLUMN, "view", "method", "render_uri", "gt_uri")  # every row after loading
GT_METHOD = "gt"


@dataclass(frozen=True)
class ParquetRows:
    """A Parquet rows input, checked on the driver and left for Ray Data to stream: ``files`` are
    ``(path inside filesystem, size in bytes)``; ``has_split`` says whether they carry a ``split`` column;
    ``digest`` hashes the rows' keys and image URIs (what the saved outputs were computed from)."""

    uri: str
    files: tuple[tuple[str, int], ...]
    has_split: bool
    digest: str = ""
    n_rows: int = 0

    @property
    def filesystem(self) -> pafs.FileSystem:
        return storage.resolve(self.uri)[0]


def rows_from_fleet_output(out_uri: str) -> list[dict]:
    """Every (scene, method, split/view) under ``out_uri``: each method's renders and each ground-truth view, paired.

    A render without ground truth, and a ground-truth view that a method (of any scene) has no render for, still
    yield a row pointing at the expected file, so the pipeline records an error instead of silently dropping the
    view: a method whose hard views failed to render must not average over its easy ones alone.
    """
    scenes_root = storage.join(out_uri, "scenes")
    if not storage.is_dir(scenes_root):
        raise InputError(out_uri, "not a fleet output folder (no scenes/ inside)")
    scenes = []  # (scene id, renders folder, gt views, {method: views})
    for scene_dir in storage.list_dir(scenes_root):
        renders = storage.join(scene_dir, "renders")
        methods = {_name(m): _images_by_view(m) for m in storage.list_dir(renders)
                   if _name(m) != GT_METHOD and storage.is_dir(m)}
        scenes.append((_name(scene_dir), renders, _images_by_view(storage.join(renders, GT_METHOD)), methods))
    all_methods = sorted({m for *_, methods in scenes for m in methods})
    rows = []
    for scene_id, renders, gt_files, methods in scenes:
        if not gt_files and not methods:
            continue
        for method in all_methods:
            views = methods.get(method, {})
            for view in sorted(set(views) | set(gt_files)):
                split = view.split("/", 1)[0]
                filename = (views.get(view) or gt_files[view])[1]
                render_uri = views.get(view, (storage.join(renders, method, split, filename), ""))[0]
                gt_uri = gt_files.get(view, (storage.join(renders, GT_METHOD, split, filename), ""))[0]
                rows.append({"segment": scene_id, "split": split, "view": view, "method": method,
                             "render_uri": render_uri, "gt_uri": gt_uri})
    return rows


def check_unique(keys, where: str) -> None:
    """An :class:`InputError` naming the first (segment, split, view, method) listed twice: counted twice, it would
    weigh in the means, intervals and FID/KID sets twice."""
    seen = set()
    for key in keys:
        if key in seen:
            raise InputError(where, f"view listed twice: segment {key[0]!r}, split {key[1]!r}, view {key[2]!r}, "
                                    f"method {key[3]!r}")
        seen.add(key)


def load_rows(input_uri: str) -> list[dict] | ParquetRows:
    """Rows from a JSON list / JSON lines file or a fleet output folder; a Parquet file or folder of ``*.parquet``
    comes back as :class:`ParquetRows` (Ray Data streams it) after its schemas are checked here. Raises
    :class:`InputError` when columns are missing or there are no rows."""
    if input_uri.endswith(".parquet") or (storage.is_dir(input_uri) and not storage.exists(
            storage.join(input_uri, "scenes")) and storage.glob(storage.join(input_uri, "*.parquet"))):
        return parquet_rows(input_uri)
    if storage.is_dir(input_uri):
        rows = rows_from_fleet_output(input_uri)
        if not rows:
            raise InputError(input_uri, "no renders found (expected scenes/<scene>/renders/<method>/<split>/"
                                        "<name>.png beside renders/gt/)")
        return rows
    text = storage.read_text(input_uri)
    try:
        if input_uri.endswith(".jsonl"):
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            rows = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(input_uri, f"not valid JSON ({e})") from e
    if isinstance(rows, dict) and "rows" in rows:
        rows = rows["rows"]
    if not isinstance(rows, list):
        raise InputError(input_uri, "expected a JSON list of rows")
    if not rows:
        raise InputError(input_uri, "no renders found (the rows file is empty)")
    for i, row in enumerate(rows):
        missing = [c for c in ROW_COLUMNS if c not in row]
        if missing:
            raise InputError(input_uri, f"row {i} lacks columns {missing} (need {list(ROW_COLUMNS)})")
    rows = [{c: str(row.get(c, DEFAULT_SPLIT)) for c in ROW_FIELDS} for row in rows]
    check_unique(((r["segment"], r["split"], r["view"], r["method"]) for r in rows), input_uri)
    return rows


def parquet_rows(uri: str) -> ParquetRows:
    """Check the footer of every Parquet file behind ``uri`` (a file or a folder of ``*.parquet``) on the driver,
    so a missing column is an error naming the file rather than a KeyError inside a Ray worker."""
    fs, path = storage.resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise InputError(uri, "rows file not found")
    if info.type == pafs.FileType.Directory:
        infos = fs.get_file_info(pafs.FileSelector(path))
        infos = sorted((i for i in infos if i.is_file and i.base_name.endswith(".parquet")), key=lambda i: i.path)
    else:
        infos = [info]
    files, has_split, n_rows = [], [], 0
    for i in infos:
        where = storage.join(uri, i.base_name) if info.type == pafs.FileType.Directory else uri
        try:
            meta = pq.read_metadata(i.path, filesystem=fs)
        except Exception as e:  # noqa: BLE001 - a corrupt footer: named, not a worker crash
            raise InputError(where, f"not a readable Parquet file ({e})") from e
        names = meta.schema.to_arrow_schema().names
        missing = [c for c in ROW_COLUMNS if c not in names]
        if missing:
            raise InputError(where, f"lacks columns {missing} (need {list(ROW_COLUMNS)}, optional "
                                    f"{SPLIT_COLUMN!r})")
        files.append((i.path, int(i.size)))
        has_split.append(SPLIT_COLUMN in names)
        n_rows += meta.num_rows
    if len(set(has_split)) > 1:
        raise InputError(uri, f"some Parquet files have a {SPLIT_COLUMN!r} column and others do not")
    if n_rows == 0:
        raise InputError(uri, "no renders found (the rows file has no rows)")
    split = bool(has_split and has_split[0])
    # the key and URI columns only (the driver never reads the images): duplicates are refused here, and the rows'
    # hash tells a rewritten file from the one saved outputs came from (a path and a size do not)
    columns = [*ROW_COLUMNS, *([SPLIT_COLUMN] if split else [])]
    keys = []
    for path, _ in files:
        t = pq.read_table(path, columns=columns, filesystem=fs).to_pydict()
        splits = t[SPLIT_COLUMN] if split else [DEFAULT_SPLIT] * len(t["view"])
        keys += [tuple(str(v) for v in k) for k in zip(t["segment"], splits, t["view"], t["method"],
                                                          t["render_uri"], t["gt_uri"])]
    check_unique((k[:4] for k in keys), uri)
    digest = hashlib.sha256(json.dumps(sorted(keys)).encode()).hexdigest()
    return ParquetRows(uri, tuple(files), split, digest, len(keys))


def _images_by_view(method_dir: str) -> dict[str, tuple[str, str]]:
    """``{"<split>/<stem>": (uri, filename)}`` for the images in ``method_dir/<split>/``."""
    out = {}
    for split_dir in storage.list_dir(method_dir):
        split = _name(split_dir)
        for uri in storage.list_dir(split_dir):
            filename = _name(uri)
            stem, ext = posixpath.splitext(filename)
            if ext.lower() in IMAGE_EXTENSIONS and not filename.startswith(".tmp-"):
                out[f"{split}/{stem}"] = (uri, filename)
    return out


def _name(uri: str) -> str:
    return posixpath.basename(str(uri).replace("\\", "/").rstrip("/"))
