"""Evaluation rows (one render and its ground truth): from a rows file or from the fleet job's output folder.

A row is ``{"segment", "view", "method", "render_uri", "gt_uri"}``; the fleet layout is
``<out>/scenes/<scene_id>/renders/<method>/<split>/<name>.png`` with ground truth under
``<out>/scenes/<scene_id>/renders/gt/<split>/<name>.png``.
"""

from __future__ import annotations

import json
import posixpath

from difix3d import storage
from difix3d.errors import InputError
from difix3d.imageio import IMAGE_EXTENSIONS

ROW_COLUMNS = ("segment", "view", "method", "render_uri", "gt_uri")
GT_METHOD = "gt"


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
                rows.append({"segment": scene_id, "view": view, "method": method, "render_uri": render_uri,
                             "gt_uri": gt_uri})
    return rows


def load_rows(input_uri: str) -> list[dict] | str:
    """Rows from a JSON list / JSON lines file or a fleet output folder; a Parquet path is returned as is (Ray
    Data reads it in a streaming way). Raises :class:`InputError` when columns are missing."""
    if input_uri.endswith(".parquet") or (storage.is_dir(input_uri) and not storage.exists(
            storage.join(input_uri, "scenes")) and storage.glob(storage.join(input_uri, "*.parquet"))):
        return input_uri
    if storage.is_dir(input_uri):
        return rows_from_fleet_output(input_uri)
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
    for i, row in enumerate(rows):
        missing = [c for c in ROW_COLUMNS if c not in row]
        if missing:
            raise InputError(input_uri, f"row {i} lacks columns {missing} (need {list(ROW_COLUMNS)})")
    return [{c: str(row[c]) for c in ROW_COLUMNS} for row in rows]


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
