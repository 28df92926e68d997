"""Pair shards: the schema curation writes and fine-tuning reads."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from difix3d.errors import InputError
from difix3d.train.pairs import PAIR_SCHEMA, list_shards, psnr_uint8, read_pair_shard, write_pair_shard


def _rows(n, size=8, ref=True, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        target = rng.integers(0, 256, (size, size + 2, 3), dtype=np.uint8)
        degraded = np.clip(target.astype(int) + rng.integers(-20, 20, target.shape), 0, 255).astype(np.uint8)
        rows.append({"degraded": degraded, "target": target, "reference": target[::-1].copy() if ref and i % 2 == 0
                     else None, "scene": f"s{i}", "camera": "front", "strategy": "sparse"})
    return rows


def test_round_trip_keeps_pixels_and_metadata(tmp_path):
    rows = _rows(3)
    uri = str(tmp_path / "pairs" / "shard-000.parquet")
    assert write_pair_shard(uri, rows) == 3
    assert pq.read_schema(uri).equals(PAIR_SCHEMA)
    back = list(read_pair_shard(uri))
    assert len(back) == 3
    for r, b in zip(rows, back):
        np.testing.assert_array_equal(b["degraded"], r["degraded"])
        np.testing.assert_array_equal(b["target"], r["target"])
        if r["reference"] is None:
            assert b["reference"] is None
        else:
            np.testing.assert_array_equal(b["reference"], r["reference"])
        assert (b["height"], b["width"]) == (8, 10)
        assert b["scene"] == r["scene"] and b["camera"] == "front" and b["strategy"] == "sparse"
        assert b["psnr"] == pytest.approx(psnr_uint8(r["degraded"], r["target"]), rel=1e-5)


def test_write_rejects_mismatched_shapes(tmp_path):
    rows = _rows(1)
    rows[0]["target"] = rows[0]["target"][:4]
    with pytest.raises(InputError, match="row 0"):
        write_pair_shard(str(tmp_path / "x.parquet"), rows)
    assert not (tmp_path / "x.parquet").exists()


def test_corrupt_image_error_names_shard_row_and_column(tmp_path):
    uri = str(tmp_path / "bad.parquet")
    write_pair_shard(uri, _rows(2, ref=False))
    table = pq.read_table(uri)
    target = table.column("target").to_pylist()
    target[1] = b"not a png"
    pq.write_table(table.set_column(1, PAIR_SCHEMA.field("target"), pa.array(target, pa.binary())), uri)
    with pytest.raises(InputError, match=r"bad.parquet row 1 column target"):
        list(read_pair_shard(uri))


def test_list_shards_folder_glob_and_missing(tmp_path):
    for i in range(3):
        write_pair_shard(str(tmp_path / f"shard-{i}.parquet"), _rows(1))
    (tmp_path / "notes.txt").write_text("x")
    expect = [str(tmp_path / f"shard-{i}.parquet") for i in range(3)]
    assert list_shards(str(tmp_path)) == expect
    assert list_shards(str(tmp_path / "shard-*.parquet")) == expect
    assert list_shards(expect[1]) == [expect[1]]
    with pytest.raises(InputError, match="no pair shards"):
        list_shards(str(tmp_path / "empty"))


def test_list_shards_of_a_curation_output_reads_its_shards_folder(tmp_path):
    out = tmp_path / "curated"
    expect = [str(out / "shards" / f"seg-sparse-{i:05d}.parquet") for i in range(2)]
    for uri in expect:
        write_pair_shard(uri, _rows(1))
    (out / "shards" / ".tmp-seg-sparse-00002.parquet-x").write_bytes(b"partial")
    (out / "config.json").write_text("{}")
    assert list_shards(str(out)) == expect  # what curation's --output names is what fine-tuning can take
    (tmp_path / "none" / "shards").mkdir(parents=True)
    with pytest.raises(InputError, match=r"none: no pair shards .* in this folder or in its shards/ subfolder"):
        list_shards(str(tmp_path / "none"))


def test_reading_a_folder_as_a_shard_says_which_file_to_name(tmp_path):
    with pytest.raises(InputError, match=r"a folder, not a pair shard.*shards/<shard>\.parquet"):
        list(read_pair_shard(str(tmp_path)))
