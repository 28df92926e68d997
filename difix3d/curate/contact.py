"""Contact sheets: look at curated pairs as one PNG, a row per pair: degraded | target | reference."""

from __future__ import annotations

from typing import Iterable

import numpy as np
from PIL import Image

from difix3d import imageio
from difix3d.train.pairs import read_pair_shard

COLUMNS = ("degraded", "target", "reference")
PAD = 2  # pixels of background between tiles and around the sheet
BACKGROUND = 255  # white gutters
MISSING = 128  # grey tile where a pair has no reference


def contact_sheet(rows: Iterable[dict], max_rows: int = 8, pad: int = PAD) -> np.ndarray:
    """uint8 [n·H + (n+1)·pad, 3·W + 4·pad, 3]: one row per pair (decoded shard rows), tiles at the first
    pair's size (others are resized to it)."""
    tiles: list[list[np.ndarray]] = []
    size: tuple[int, int] | None = None  # (H, W)
    for row in rows:
        if len(tiles) >= max_rows:
            break
        size = size or tuple(np.asarray(row["target"]).shape[:2])
        tiles.append([_tile(row.get(c), size) for c in COLUMNS])
    if not tiles:
        raise ValueError("contact_sheet: no pairs to show")
    H, W = size
    sheet = np.full((len(tiles) * H + (len(tiles) + 1) * pad, len(COLUMNS) * W + (len(COLUMNS) + 1) * pad, 3),
                    BACKGROUND, np.uint8)
    for r, row_tiles in enumerate(tiles):
        y = pad + r * (H + pad)
        for c, tile in enumerate(row_tiles):
            x = pad + c * (W + pad)
            sheet[y:y + H, x:x + W] = tile
    return sheet


def write_contact_sheet(shard_uri: str, out_uri: str, max_rows: int = 8) -> list[dict]:
    """Write the first ``max_rows`` pairs of a shard as a PNG sheet → their metadata (camera, strategy, psnr)."""
    rows = []
    for row in read_pair_shard(shard_uri):
        rows.append(row)
        if len(rows) >= max_rows:
            break
    if not rows:
        from difix3d.errors import InputError

        raise InputError(shard_uri, "the shard has no pairs to show (0 rows)")
    imageio.write_image(out_uri, contact_sheet(rows, max_rows))
    return [{k: r[k] for k in ("scene", "camera", "strategy", "psnr")} for r in rows]


def _tile(image, size: tuple[int, int]) -> np.ndarray:
    H, W = size
    if image is None:
        return np.full((H, W, 3), MISSING, np.uint8)
    image = np.asarray(image, dtype=np.uint8)
    if image.shape[:2] != (H, W):
        image = np.asarray(Image.fromarray(image).resize((W, H), Image.BILINEAR))
    return image
