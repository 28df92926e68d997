"""Distributed, resumable streams of training pairs read from Parquet pair shards with pyarrow.

Each epoch orders the shards by a seeded shuffle (the same on every worker) and cuts the concatenated rows into
``world_size`` contiguous equal slices: worker ``rank`` reads only its slice (disjoint data, roughly 1/world of
the bytes), shuffles it in windows of ``shuffle_window`` rows (reads stay sequential), and crops every row to the
training size. Positions are deterministic, so a stream resumes exactly from ``(epoch, offset)``.
We read with pyarrow rather than Ray Data here: the loop needs exact per-rank resume positions and in-process
random crops, and a shard is a handful of PNG rows, so a Ray Data pipeline would add scheduling and no speed.
"""

from __future__ import annotations

import logging
import random
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from difix3d import storage
from difix3d.errors import InputError
from difix3d.imageio import to_tensor
from difix3d.train.pairs import PAIR_SCHEMA, decode_pair_row, list_shards, read_pair_table

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardIndex:
    """Shard URIs and their row counts (from Parquet footers only)."""

    shards: tuple[str, ...]
    rows: tuple[int, ...]

    @classmethod
    def build(cls, uri_or_glob: str) -> "ShardIndex":
        shards = list_shards(uri_or_glob)
        rows = []
        for uri in shards:
            if storage.is_dir(uri):  # a Spark-style folder named *.parquet
                raise InputError(uri, "a folder, not a pair shard: name the *.parquet files inside it")
            try:
                fs, path = storage.resolve(uri)
                with fs.open_input_file(path) as f:  # random access: only the footer is read, not the images
                    meta = pq.read_metadata(f)
                missing = [n for n in PAIR_SCHEMA.names if n not in meta.schema.to_arrow_schema().names]
                rows.append(meta.num_rows)
            except FileNotFoundError:
                raise InputError(uri, "pair shard not found") from None
            except (pa.ArrowInvalid, ValueError, TypeError) as e:  # a footer that is not Parquet's
                raise InputError(uri, f"not a readable Parquet pair shard ({e})") from e
            except OSError as e:  # storage I/O: may pass, so not recorded as bad input (see train.loop)
                raise OSError(f"{uri}: cannot read the pair shard's footer ({e})") from e
            if missing:  # said from the footer, before any row is read
                raise InputError(uri, f"not a pair shard: missing columns {missing} (pair shards are written by "
                                      "`difix3d curate`; see difix3d.train.pairs.PAIR_SCHEMA)")
        return cls(tuple(shards), tuple(rows))

    @property
    def total(self) -> int:
        return sum(self.rows)


def epoch_slice(index: ShardIndex, rank: int, world_size: int, seed: int, epoch: int) -> list[tuple[int, int]]:
    """``(shard, row)`` pairs worker ``rank`` reads in ``epoch``: a contiguous 1/world of the seeded shard order
    (equal length on every worker; up to ``world_size - 1`` trailing rows wait for another epoch)."""
    order = list(range(len(index.shards)))
    random.Random(seed * 100_003 + epoch).shuffle(order)
    flat = [(s, r) for s in order for r in range(index.rows[s])]
    per_rank = len(flat) // world_size
    if per_rank == 0:
        raise InputError(index.shards[0] if index.shards else "<no shards>",
                         f"{len(flat)} rows cannot feed {world_size} workers")
    return flat[rank * per_rank:(rank + 1) * per_rank]


def windowed_shuffle(items: list, window: int, rng: random.Random) -> list:
    """Shuffle ``items`` inside consecutive windows of ``window`` (1 = keep order)."""
    out = []
    for i in range(0, len(items), max(1, window)):
        chunk = items[i:i + max(1, window)]
        rng.shuffle(chunk)
        out.extend(chunk)
    return out


class PairStream:
    """Endless per-worker iterator of decoded training rows; ``state()`` / ``start`` resume it exactly.

    Yields dicts with uint8 ``[H, W, 3]`` ``degraded``, ``target``, ``reference`` (or None) plus the metadata.
    A corrupt row raises :class:`InputError` naming shard, row and column, or is logged and skipped when
    ``skip_corrupt``.
    """

    def __init__(self, index: ShardIndex, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle_window: int = 64, skip_corrupt: bool = False, start: tuple[int, int] = (0, 0),
                 cache_shards: int = 2):
        self.index, self.rank, self.world_size, self.seed = index, rank, world_size, seed
        self.shuffle_window, self.skip_corrupt = shuffle_window, skip_corrupt
        self.epoch, self.offset = start
        self.skipped: list[str] = []
        self._bad: set[tuple[int, int]] = set()  # (shard, row) positions found corrupt
        self._tables: OrderedDict[int, object] = OrderedDict()
        self._cache_shards = cache_shards

    def state(self) -> tuple[int, int]:
        """``(epoch, offset)`` of the next row: pass it as ``start`` to continue from here."""
        return self.epoch, self.offset

    def positions(self, epoch: int) -> list[tuple[int, int]]:
        items = epoch_slice(self.index, self.rank, self.world_size, self.seed, epoch)
        return windowed_shuffle(items, self.shuffle_window, random.Random(f"{self.seed}/{epoch}/{self.rank}"))

    def __iter__(self) -> Iterator[dict]:
        while True:
            positions = self.positions(self.epoch)
            bad = 0
            while self.offset < len(positions):
                shard, row = positions[self.offset]
                self.offset += 1
                try:
                    record = self._row(shard, row)
                except InputError as e:
                    if not self.skip_corrupt:
                        raise
                    log.warning("skipping corrupt training row: %s", e)
                    self.skipped.append(str(e))
                    self._bad.add((shard, row))
                    bad += 1
                    continue
                yield record
            # a whole epoch of corrupt rows spins forever when the next epochs read the same rows (one worker, or one
            # shard), or when every row of the data is known corrupt; otherwise later epochs deal other shards here
            same_rows_each_epoch = self.world_size == 1 or len(self.index.shards) == 1
            if positions and bad == len(positions) and (same_rows_each_epoch or len(self._bad) >= self.index.total):
                raise InputError(self.index.shards[positions[0][0]],
                                 f"all {len(positions)} rows worker {self.rank} of {self.world_size} reads in epoch "
                                 f"{self.epoch} are corrupt ({self.skipped[-1]})")
            self.epoch, self.offset = self.epoch + 1, 0

    def _row(self, shard: int, row: int) -> dict:
        table = self._tables.get(shard)
        if table is None:
            table = read_pair_table(self.index.shards[shard])
            self._tables[shard] = table
            while len(self._tables) > self._cache_shards:
                self._tables.popitem(last=False)
        self._tables.move_to_end(shard)
        record = table.slice(row, 1).to_pylist()[0]
        return decode_pair_row(record, f"{self.index.shards[shard]} row {row}")


def collate_pairs(rows: list[dict], height: int, width: int, rng: random.Random | None, use_reference: bool = True
                  ) -> dict:
    """Rows → model batch in [-1, 1]: ``x``, ``target`` ``[B, 3, h, w]``, ``ref`` ``[B, 3, h, w]`` or None, and
    ``ids`` (``"scene/camera"`` per row).

    Each row is resized (keeping aspect) until it covers ``height`` × ``width`` and cropped there, the same window
    for all of its images. ``ref`` is present only when every row has a reference (the model takes a whole
    batch with or without one); rows without one then train single-view.
    """
    xs, ts, rs = [], [], []
    ids = [f"{r.get('scene', '')}/{r.get('camera', '')}" for r in rows]
    with_ref = use_reference and all(r.get("reference") is not None for r in rows)
    for r in rows:
        imgs = [r["degraded"], r["target"]] + ([r["reference"]] if with_ref else [])
        stack = to_tensor(np.stack(imgs))  # [V, 3, H, W] in [0, 1]
        stack = _cover_and_crop(stack, height, width, rng)  # rng None: centre crop
        xs.append(stack[0])
        ts.append(stack[1])
        if with_ref:
            rs.append(stack[2])
    batch = {"x": torch.stack(xs) * 2 - 1, "target": torch.stack(ts) * 2 - 1, "ids": ids}
    batch["ref"] = torch.stack(rs) * 2 - 1 if with_ref else None
    return batch


def _cover_and_crop(images: torch.Tensor, height: int, width: int, rng: random.Random | None) -> torch.Tensor:
    h, w = images.shape[-2:]  # images: [V, 3, H, W]
    scale = max(height / h, width / w)
    if scale > 1.0:  # smaller than the crop: upsample to cover it
        nh, nw = max(height, round(h * scale)), max(width, round(w * scale))
        images = F.interpolate(images, size=(nh, nw), mode="bilinear", align_corners=False, antialias=False)
        h, w = nh, nw
    top = rng.randint(0, h - height) if rng else (h - height) // 2
    left = rng.randint(0, w - width) if rng else (w - width) // 2
    return images[..., top:top + height, left:left + width]


def batches(stream: PairStream, batch_size: int, height: int, width: int, seed: int = 0,
            use_reference: bool = True) -> Iterator[dict[str, torch.Tensor]]:
    """Endless model batches from ``stream`` (see :func:`collate_pairs`)."""
    rng = random.Random(seed)
    it = iter(stream)
    while True:
        yield collate_pairs([next(it) for _ in range(batch_size)], height, width, rng, use_reference)


def read_rows(index: ShardIndex, limit: int, rank: int = 0, world_size: int = 1, skip_corrupt: bool = False
              ) -> list[dict]:
    """The first ``limit`` rows in shard order, dealt round-robin: worker ``rank`` gets rows rank, rank+world, ...
    (validation: fixed, disjoint per worker, no shuffle). A corrupt row raises :class:`InputError` naming it, or
    is logged and left out when ``skip_corrupt``."""
    out, i = [], 0
    for shard, n in zip(index.shards, index.rows):
        if i >= limit:
            break
        table = read_pair_table(shard)
        for row in range(n):
            if i >= limit:
                break
            if i % world_size == rank:
                try:
                    out.append(decode_pair_row(table.slice(row, 1).to_pylist()[0], f"{shard} row {row}"))
                except InputError as e:
                    if not skip_corrupt:
                        raise
                    log.warning("skipping corrupt validation row: %s", e)
            i += 1
    return out
