"""Evaluation rows (one render and its ground truth): from a rows file or from the fleet job's output folder.

A row is ``{"segment", "split", "view", "method", "render_uri", "gt_uri"}``; the fleet layout is
``<out>/scenes/<scene_id>/renders/<method>/<split>/<name>.png`` with ground truth under
``<out>/scenes/<scene_id>/renders/gt/<split>/<name>.png``. A rows file may leave ``split`` out: its rows then
belong to the split ``"all"`` (the split is never guessed from a view name).
"""

from __future__ import annotations

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
    ``(path inside filesystem, size in bytes)``; ``has_split`` says whether they carry a ``split`` column."""

    uri: str
    files: tuple[tuple[str, int], ...]
    has_split: bool

    @property
    def filesystem(self) -> pafs.FileSystem:
        return storage.resolve(self.uri)[0]


def rows_from_fleet_output(out_uri: str) -> list[dict]:
    """Every (scene, method, split/view) render under ``out_uri`` paired with its ground truth, sorted.

    A render without ground truth still yields a row (pointing at the expected file), so the pipeline records it
    as an error instead of silently dropping the view.
    """
    scenes_root = storage.join(out_uri, "scenes")
    if not storage.is_dir(scenes_root):
        raise InputError(out_uri, "not a fleet output folder (no scenes/ inside)")
    rows = []
    for scene_dir in storage.list_dir(scenes_root):
        scene_id = _name(scene_dir)
        renders = storage.join(scene_dir, "renders")
        gt_files = _images_by_view(storage.join(renders, GT_METHOD))
        for method_dir in storage.list_dir(renders):
            method = _name(method_dir)
            if method == GT_METHOD or not storage.is_dir(method_dir):
                continue
            for view, (render_uri, filename) in sorted(_images_by_view(method_dir).items()):
                split = view.split("/", 1)[0]
                gt_uri = gt_files.get(view, (storage.join(renders, GT_METHOD, split, filename), ""))[0]
                rows.append({"segment": scene_id, "split": split, "view": view, "method": method,
                             "render_uri": render_uri, "gt_uri": gt_uri})
    return rows


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
    return [{c: str(row.get(c, DEFAULT_SPLIT)) for c in ROW_FIELDS} for row in rows]


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
    return ParquetRows(uri, tuple(files), bool(has_split and has_split[0]))


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
