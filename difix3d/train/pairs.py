"""The pair-shard format: Parquet files of (degraded render, clean target, optional reference) PNG triplets.

Curation writes them with :func:`write_pair_shard`, fine-tuning reads them with :func:`read_pair_shard`. Images
travel as PNG bytes (lossless, compact) and come back as uint8 ``[H, W, 3]`` arrays (DESIGN.md, Conventions).
"""

from __future__ import annotations

import io
import posixpath
from typing import Any, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from difix3d import storage
from difix3d.errors import InputError
from difix3d.imageio import decode_image, encode_image

PAIR_SCHEMA = pa.schema([
    pa.field("degraded", pa.binary(), nullable=False),   # PNG: the render with artifacts (fixer input)
    pa.field("target", pa.binary(), nullable=False),     # PNG: the clean ground-truth view
    pa.field("reference", pa.binary(), nullable=True),   # PNG: a nearby clean training view, or null
    pa.field("height", pa.int32(), nullable=False),
    pa.field("width", pa.int32(), nullable=False),
    pa.field("scene", pa.string(), nullable=False),
    pa.field("camera", pa.string(), nullable=False),
    pa.field("strategy", pa.string(), nullable=False),   # curation strategy that made the pair (sparse, cycle, ...)
    pa.field("psnr", pa.float32(), nullable=False),      # PSNR of degraded vs target, dB
])

IMAGE_COLUMNS = ("degraded", "target", "reference")
SHARD_SUFFIX = ".parquet"
SHARDS_DIR = "shards"  # where a curation output (difix3d.curate.job) keeps its shards


def write_pair_shard(uri: str, rows: Iterable[dict[str, Any]]) -> int:
    """Encode ``rows`` (uint8 ``[H, W, 3]`` images, or PNG bytes) as one Parquet shard at ``uri``, atomically.

    Each row holds ``degraded`` and ``target`` (same shape), optionally ``reference`` (same shape), and the
    metadata ``scene``, ``camera``, ``strategy`` (default ``""``) and ``psnr`` (computed when absent).
    Returns the number of rows written.
    """
    columns: dict[str, list] = {f.name: [] for f in PAIR_SCHEMA}
    for i, row in enumerate(rows):
        degraded, target = _image(row, "degraded", uri, i), _image(row, "target", uri, i)
        if degraded.shape != target.shape:
            raise InputError(uri, f"row {i}: degraded {degraded.shape} and target {target.shape} differ in shape")
        reference = row.get("reference")
        if reference is not None:
            reference = _image(row, "reference", uri, i)
            if reference.shape != target.shape:
                raise InputError(uri, f"row {i}: reference {reference.shape} and target {target.shape} differ")
        psnr = row.get("psnr")
        columns["degraded"].append(_png(row["degraded"], degraded))
        columns["target"].append(_png(row["target"], target))
        columns["reference"].append(None if reference is None else _png(row["reference"], reference))
        columns["height"].append(int(target.shape[0]))
        columns["width"].append(int(target.shape[1]))
        columns["scene"].append(str(row.get("scene", "")))
        columns["camera"].append(str(row.get("camera", "")))
        columns["strategy"].append(str(row.get("strategy", "")))
        columns["psnr"].append(float(psnr_uint8(degraded, target) if psnr is None else psnr))
    table = pa.Table.from_pydict(columns, schema=PAIR_SCHEMA)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="none")  # PNG payloads do not compress further
    storage.write_bytes(uri, buf.getvalue())
    return table.num_rows


def read_pair_shard(uri: str, decode: bool = True) -> Iterator[dict[str, Any]]:
    """Rows of one shard as dicts; images decoded to uint8 ``[H, W, 3]`` (``reference`` may be None).

    A corrupt image raises :class:`InputError` naming the shard and the row. With ``decode=False`` the PNG
    bytes come back as they are (cheap metadata scans).
    """
    table = read_pair_table(uri)
    for i, row in enumerate(table.to_pylist()):
        if decode:
            decode_pair_row(row, f"{uri} row {i}")
        yield row


def read_pair_table(uri: str, columns: list[str] | None = None) -> pa.Table:
    """The shard as an Arrow table (checked against :data:`PAIR_SCHEMA`)."""
    if storage.is_dir(uri):
        raise InputError(uri, f"a folder, not a pair shard: name one of its *{SHARD_SUFFIX} files (for a curation "
                              f"output, {SHARDS_DIR}/<shard>{SHARD_SUFFIX})")
    try:
        table = pq.read_table(storage.bytes_io(uri), columns=columns)
    except FileNotFoundError:
        raise InputError(uri, "pair shard not found") from None
    except pa.ArrowInvalid as e:
        raise InputError(uri, f"not a readable Parquet pair shard ({e})") from e
    except OSError as e:  # storage I/O (a network error can pass): not bad input, so a restart may read it again
        raise OSError(f"{uri}: cannot read the pair shard ({e})") from e
    missing = [n for n in (columns or PAIR_SCHEMA.names) if n not in table.schema.names]
    if missing:
        raise InputError(uri, f"not a pair shard: missing columns {missing}")
    return table


def decode_pair_row(row: dict[str, Any], source: str) -> dict[str, Any]:
    """Decode a row's PNG columns in place to uint8 ``[H, W, 3]``; errors name ``source`` and the column. A row's
    images must share one size (they are cropped in one window): shards written by other tools are checked here."""
    for name in IMAGE_COLUMNS:
        if row.get(name) is not None:
            row[name] = decode_image(row[name], source=f"{source} column {name}")
    sizes = {name: row[name].shape[:2] for name in IMAGE_COLUMNS if row.get(name) is not None}
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"{name} {h}x{w}" for name, (h, w) in sizes.items())
        raise InputError(source, f"the row's images differ in size ({listed}); a pair's images must share one size")
    return row


def list_shards(uri_or_glob: str) -> list[str]:
    """Sorted shard URIs: a glob (``s3://b/pairs/*.parquet``), a folder (its ``*.parquet``, else those of its
    ``shards/`` subfolder: a curation output), or one file."""
    uri = str(uri_or_glob)
    if any(c in uri for c in "*?["):
        found = storage.glob(uri)
    elif storage.is_dir(uri):
        found = _shards_in(uri) or _shards_in(storage.join(uri, SHARDS_DIR))
        if not found:
            raise InputError(uri, f"no pair shards (*.parquet) found in this folder or in its {SHARDS_DIR}/ subfolder")
    else:
        found = [uri] if storage.exists(uri) else []
    found = [u for u in found if not _hidden(u)]
    if not found:
        raise InputError(uri, "no pair shards (*.parquet) found")
    return sorted(found)


def _shards_in(folder: str) -> list[str]:
    return [u for u in storage.list_dir(folder) if u.endswith(SHARD_SUFFIX) and not _hidden(u)]


def _hidden(uri: str) -> bool:
    """Temporary (``.tmp-…``) and private (``_…``) files are never shards."""
    return posixpath.basename(uri.replace("\\", "/")).startswith((".", "_"))


def psnr_uint8(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB between two uint8 images (inf-safe: identical images give 100 dB)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 100.0 if mse == 0 else float(10.0 * np.log10(255.0 ** 2 / mse))


def _image(row: dict, name: str, uri: str, i: int) -> np.ndarray:
    if row.get(name) is None:
        raise InputError(uri, f"row {i}: missing image {name!r}")
    value = row[name]
    if isinstance(value, (bytes, bytearray, memoryview)):
        return decode_image(bytes(value), source=f"{uri} row {i} column {name}")
    image = np.asarray(value)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise InputError(uri, f"row {i}: {name} must be uint8 [H, W, 3], got {image.dtype} {image.shape}")
    return image


def _png(value: Any, image: np.ndarray) -> bytes:
    return bytes(value) if isinstance(value, (bytes, bytearray, memoryview)) else encode_image(image, "png")
