"""Per-view results kept in part files while an evaluation runs, so an interrupted run resumes where it stopped.

``<out>/per_view.parts/`` holds ``fingerprint.json`` (what the rows are scored with, :mod:`difix3d.eval.fingerprint`)
and ``part-NNNNN.parquet`` files of scored rows, each written whole (one put) once it holds ``part_rows`` rows, with
the FID/KID feature columns when those metrics are on. A re-run with the same fingerprint skips the rows the parts
hold; the finished run merges them into ``per_view.parquet`` and removes the folder. A crash loses at most the rows
of the part being filled.
"""

from __future__ import annotations

import io
import logging
import posixpath
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from difix3d import storage
from difix3d.eval.fingerprint import check_reusable
from difix3d.eval.rows import DEFAULT_SPLIT, SPLIT_COLUMN

log = logging.getLogger(__name__)

PARTS_DIR = "per_view.parts"
FINGERPRINT_FILE = "fingerprint.json"
KEY_COLUMNS = ("segment", SPLIT_COLUMN, "view", "method", "render_uri")
FEATURE_COLUMNS = ("render_features", "gt_features")
PART_ROWS = 2048  # rows per part: a crash redoes at most this many


def row_key(row) -> tuple[str, ...]:
    """What identifies one evaluation row (a rows file without ``split`` counts as :data:`DEFAULT_SPLIT`)."""
    return tuple(str(row.get(c, DEFAULT_SPLIT) if c == SPLIT_COLUMN else row[c]) for c in KEY_COLUMNS)


class PartStore:
    """The part files of one output folder: opened (checked against ``fingerprint``, or emptied when
    ``overwrite``), appended to batch by batch, read back in order, removed when the run is complete."""

    def __init__(self, output: str, fingerprint: dict, overwrite: bool = False, part_rows: int | None = None):
        self.root = storage.join(output, PARTS_DIR)
        self.part_rows = part_rows or PART_ROWS
        fp_uri = storage.join(self.root, FINGERPRINT_FILE)
        saved = storage.read_json(fp_uri) if storage.exists(fp_uri) else None
        metrics = fingerprint["config"].get("available_metrics")
        if saved is not None and not overwrite and saved["config"].get("available_metrics") != metrics:
            log.warning("evaluate: %s was scored with metrics %s available, now %s: scoring every row again",
                        self.root, saved["config"].get("available_metrics"), metrics)
            overwrite = True  # their columns differ (e.g. FID features missing): they cannot be merged
        if overwrite or (saved is None and storage.exists(self.root)):  # parts without a record cannot be trusted
            storage.delete(self.root)
            saved = None
        if saved is not None:
            check_reusable(output, saved, fingerprint)  # InputError naming what changed; parts kept for --overwrite
        storage.write_json(fp_uri, fingerprint)
        self.parts = sorted(u for u in storage.list_dir(self.root) if _is_part(u)) if storage.exists(self.root) else []
        self._buffer: list[pa.Table] = []
        self._buffered = 0

    def done_keys(self) -> set[tuple[str, ...]]:
        """Keys (:func:`row_key`) of every row the parts hold."""
        done = set()
        for table in self.tables(columns=list(KEY_COLUMNS)):
            done.update(zip(*(table.column(c).to_pylist() for c in KEY_COLUMNS)))
        return done

    def add(self, table: pa.Table) -> None:
        self._buffer.append(table)
        self._buffered += table.num_rows
        if self._buffered >= self.part_rows:
            self.flush()

    def flush(self) -> None:
        if not self._buffered:
            return
        buf = io.BytesIO()
        pq.write_table(pa.concat_tables(self._buffer), buf)
        uri = storage.join(self.root, f"part-{len(self.parts):05d}.parquet")
        storage.write_bytes(uri, buf.getvalue())  # atomic: a part is whole or absent
        self.parts.append(uri)
        self._buffer, self._buffered = [], 0

    def tables(self, columns: list[str] | None = None) -> Iterator[pa.Table]:
        """The parts one at a time (memory stays one part's)."""
        for uri in self.parts:
            yield pq.read_table(storage.bytes_io(uri), columns=columns)

    def remove(self) -> None:
        storage.delete(self.root)


def with_features(table: pa.Table, batch: dict[str, np.ndarray]) -> pa.Table:
    """``table`` plus the batch's ``[N, D]`` feature arrays as fixed-size float32 list columns."""
    for name in FEATURE_COLUMNS:
        feats = np.ascontiguousarray(batch[name], dtype=np.float32)  # [N, D]
        flat = pa.array(feats.reshape(-1), type=pa.float32())
        table = table.append_column(name, pa.FixedSizeListArray.from_arrays(flat, feats.shape[1]))
    return table


def features_of(table: pa.Table, name: str) -> np.ndarray:
    """A feature column back as ``[N, D]`` float32."""
    col = table.column(name).combine_chunks()
    return col.values.to_numpy(zero_copy_only=False).reshape(len(col), col.type.list_size)


def _is_part(uri: str) -> bool:
    name = posixpath.basename(str(uri).replace("\\", "/"))
    return name.startswith("part-") and name.endswith(".parquet")
