"""difix3d.storage: URIs (plain paths and file://), atomic writes, listing, globbing and the per-unit Manifest."""

import json
import os
import stat
import types

import pytest

from difix3d import storage
from difix3d.errors import InputError


@pytest.fixture(params=["path", "file_uri"])
def root(request, tmp_path):
    """The same tests against a plain local path and a ``file://`` URI of it."""
    return str(tmp_path) if request.param == "path" else "file://" + str(tmp_path)


def _local(uri: str) -> str:
    return uri[len("file://"):] if uri.startswith("file://") else uri


def test_write_read_roundtrip_creates_parents(root):
    uri = storage.join(root, "a", "b", "c.bin")
    storage.write_bytes(uri, b"\x00\x01payload")
    assert storage.read_bytes(uri) == b"\x00\x01payload"
    assert storage.exists(uri) and not storage.is_dir(uri)
    assert storage.is_dir(storage.join(root, "a", "b"))
    storage.write_json(storage.join(root, "x.json"), {"b": 1, "a": [1.5, "s"]})
    assert storage.read_json(storage.join(root, "x.json")) == {"a": [1.5, "s"], "b": 1}
    storage.write_text(storage.join(root, "t.txt"), "héllo")
    assert storage.read_text(storage.join(root, "t.txt")) == "héllo"


def test_write_json_numpy_values(root):
    np = pytest.importorskip("numpy")
    uri = storage.join(root, "n.json")
    storage.write_json(uri, {"f": np.float32(0.5), "a": np.arange(3)})
    assert storage.read_json(uri) == {"a": [0, 1, 2], "f": 0.5}


def test_atomic_write_leaves_no_temp_and_overwrites(root, tmp_path):
    uri = storage.join(root, "d", "f.txt")
    storage.write_text(uri, "one")
    storage.write_text(uri, "two")
    assert storage.read_text(uri) == "two"
    assert os.listdir(tmp_path / "d") == ["f.txt"]  # no .tmp-* leftovers
    mode = stat.S_IMODE(os.stat(tmp_path / "d" / "f.txt").st_mode)
    assert mode == 0o666 & ~storage._UMASK  # what open() would give, not mkstemp's 0600


def test_atomic_write_keeps_old_file_when_writing_fails(root, tmp_path):
    uri = storage.join(root, "f.json")
    storage.write_json(uri, {"v": 1})
    with pytest.raises(TypeError):
        storage.write_json(uri, {"v": object()})  # serialisation fails before any byte is written
    assert storage.read_json(uri) == {"v": 1}

    real_replace = os.replace

    def failing_replace(src, dst):
        raise OSError("disk full")

    os.replace = failing_replace
    try:
        with pytest.raises(OSError, match="disk full"):
            storage.write_bytes(uri, b"new")
    finally:
        os.replace = real_replace
    assert storage.read_json(uri) == {"v": 1}
    assert sorted(os.listdir(tmp_path)) == ["f.json"]  # the temp file was removed


def test_missing_and_bad_files_name_the_uri(root):
    missing = storage.join(root, "nope.bin")
    assert not storage.exists(missing)
    with pytest.raises(FileNotFoundError, match="nope.bin"):
        storage.read_bytes(missing)
    bad = storage.join(root, "bad.json")
    storage.write_text(bad, "{not json")
    with pytest.raises(InputError, match="bad.json.*not valid JSON"):
        storage.read_json(bad)


def test_join_keeps_scheme():
    assert storage.join("s3://bucket/out", "scenes", "a.json") == "s3://bucket/out/scenes/a.json"
    assert storage.join("file:///tmp/x", "y") == "file:///tmp/x/y"
    assert storage.is_local("file:///tmp/x") and storage.is_local("rel/path")
    assert not storage.is_local("s3://b/k") and not storage.is_local("gs://b/k")


def test_resolve_file_uri_and_relative_path(tmp_path, monkeypatch):
    _, p = storage.resolve("file://" + str(tmp_path / "a"))
    assert p == str(tmp_path / "a")
    monkeypatch.chdir(tmp_path)
    _, p = storage.resolve("rel/x")
    assert p == str(tmp_path / "rel" / "x")


def test_list_dir_sorted_full_uris_and_missing(root):
    for name in ["b.txt", "a.txt", "sub/c.txt"]:
        storage.write_text(storage.join(root, name), name)
    assert storage.list_dir(root) == [storage.join(root, n) for n in ["a.txt", "b.txt", "sub"]]
    assert storage.list_dir(storage.join(root, "missing")) == []
    assert storage.list_dir(storage.join(root, "a.txt")) == []


def test_glob_matches_within_one_component(root):
    for name in ["seg-00/images/0.jpg", "seg-00/images/1.png", "seg-01/images/0.jpg", "seg-01/x/deep/0.jpg",
                 "top.jpg"]:
        storage.write_bytes(storage.join(root, name), b"x")
    j = lambda *p: storage.join(root, *p)  # noqa: E731
    assert storage.glob(j("seg-*")) == [j("seg-00"), j("seg-01")]
    assert storage.glob(j("*.jpg")) == [j("top.jpg")]  # '*' does not cross '/'
    assert storage.glob(j("seg-0?", "images", "*.jpg")) == [j("seg-00", "images", "0.jpg"),
                                                            j("seg-01", "images", "0.jpg")]
    assert storage.glob(j("seg-0[1]", "*")) == [j("seg-01", "images"), j("seg-01", "x")]
    assert storage.glob(j("top.jpg")) == [j("top.jpg")]  # no wildcard: the path itself when it exists
    assert storage.glob(j("nothing-*")) == []
    assert storage.glob(j("missing-dir", "*")) == []


def test_glob_relative_pattern_stays_relative(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ["a/x.json", "a/b/y.json", "z.json"]:
        storage.write_text(name, "{}")
    assert storage.glob("*.json") == ["z.json"]
    assert storage.glob("a/*.json") == [os.path.join("a", "x.json")]
    assert storage.glob("*/b") == [os.path.join("a", "b")]


def test_delete_file_and_folder(root):
    storage.write_text(storage.join(root, "d", "f"), "x")
    storage.write_text(storage.join(root, "g"), "x")
    storage.delete(storage.join(root, "g"))
    storage.delete(storage.join(root, "d"))
    storage.delete(storage.join(root, "never-existed"))  # a no-op
    assert storage.list_dir(root) == []


def test_open_output_stream_for_parquet(root):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    uri = storage.join(root, "sub", "t.parquet")
    with storage.open_output_stream(uri) as f:
        pq.write_table(pa.table({"a": [1, 2]}), f)
    assert pq.read_table(storage.bytes_io(uri)).column("a").to_pylist() == [1, 2]


def test_manifest_records_status_attempts_and_info(root):
    m = storage.Manifest(root)
    assert m.get("scene-a") is None and not m.is_done("scene-a")
    m.mark("scene-a", "running", attempts=1)
    assert not m.is_done("scene-a")
    m.mark("scene-a", "failed", attempts=1, error="x.png: truncated")
    e = m.get("scene-a")
    assert (e.status, e.attempts, e.info) == ("failed", 1, {"error": "x.png: truncated"})
    m.mark("scene-a", "done", seconds=1.5)  # attempts carried over when not given
    assert m.is_done("scene-a") and m.get("scene-a").attempts == 1
    m.mark("scene-b", "done", attempts=2)
    # a second Manifest on the same root (a re-run of the driver) sees the same records
    again = storage.Manifest(root)
    assert {e.unit: (e.status, e.attempts) for e in again.entries()} == {"scene-a": ("done", 1),
                                                                         "scene-b": ("done", 2)}
    assert storage.is_dir(storage.join(root, "_manifest"))


def test_manifest_unit_names_with_separators_do_not_collide(root):
    m = storage.Manifest(root)
    m.mark("a/b", "done")
    m.mark("a_b", "failed")
    m.mark("s3://bucket/seg 1", "done")
    assert m.get("a/b").status == "done" and m.get("a_b").status == "failed"
    assert sorted(e.unit for e in m.entries()) == ["a/b", "a_b", "s3://bucket/seg 1"]
    assert all("/" not in os.path.basename(_local(u)) for u in storage.list_dir(m.root))


def test_manifest_entries_skip_temp_files(root, tmp_path):
    m = storage.Manifest(root)
    m.mark("u", "done")
    (tmp_path / "_manifest" / ".tmp-u.json-abc").write_text("{half")
    assert [e.unit for e in m.entries()] == ["u"]


def test_join_keeps_a_remote_uris_settings_after_its_path():
    """s3://b/out?region=...: parts joined after the query all named the object b/out."""
    assert storage.join("s3://b/out?region=us-east-1", "_manifest", "a.json") == \
        "s3://b/out/_manifest/a.json?region=us-east-1"
    assert storage.join("s3://b/out", "x") == "s3://b/out/x"


def test_json_in_any_unicode_encoding_reads_and_other_bytes_are_named(tmp_path):
    for encoding in ("utf-8", "utf-16", "utf-8-sig"):
        path = tmp_path / f"{encoding}.json"
        path.write_bytes(json.dumps({"a": "é"}).encode(encoding))
        assert storage.read_json(str(path)) == {"a": "é"}
    bad = tmp_path / "latin1.json"
    bad.write_bytes('{"a": "é"}'.encode("latin-1"))
    with pytest.raises(InputError, match="latin1.json: not valid JSON"):
        storage.read_json(str(bad))


def test_glob_stars_skip_hidden_names_as_a_shell_does(tmp_path):
    for name in ("a", ".DS_Store", ".tmp-x"):
        (tmp_path / name).mkdir()
    assert [os.path.basename(u) for u in storage.glob(str(tmp_path / "*"))] == ["a"]
    assert sorted(os.path.basename(u) for u in storage.glob(str(tmp_path / ".*"))) == [".DS_Store", ".tmp-x"]


def test_remote_dot_segments_are_resolved_so_one_object_has_one_name():
    """Object stores keep ``..`` as a literal key part: s3://b/x/../y and s3://b/y must not be two objects."""
    assert storage.join("s3://b/scenes/a", "../b", "transforms.json") == "s3://b/scenes/b/transforms.json"
    assert storage.join("gs://b/x", "./y", "..", "z") == "gs://b/x/z"
    assert storage.join("s3://b/x", "..") == "s3://b"
    assert storage.join("s3://b/x?region=us-east-1", "..", "y") == "s3://b/y?region=us-east-1"
    assert storage.join("s3://b/x", "y/") == "s3://b/x/y/"  # a trailing slash stays
    assert storage.normalized("s3://b/x/../y") == storage.normalized("s3://b/y") == "s3://b/y"
    assert storage.normalized("s3://b/./x//y/") == "s3://b/x/y"
    assert storage.normalized("gs://b/x/..") == "gs://b"
    # only the path: the settings after "?" (which may hold "/.." themselves) and the bucket stay as written
    assert storage.normalized("s3://b/x/../y?endpoint_override=h/../p") == "s3://b/y?endpoint_override=h/../p"
    assert storage.remote_normpath("s3://b/plain/key.json") == "s3://b/plain/key.json"
    assert storage.remote_normpath("s3://b") == "s3://b" and storage.remote_normpath("s3://b/") == "s3://b/"


def test_remote_dot_dot_above_the_bucket_names_the_uri():
    for uri in ("s3://b/..", "s3://b/x/../../y", "gs://b/../other-bucket/k"):
        with pytest.raises(InputError, match=r"climbs above the bucket") as err:
            storage.normalized(uri)
        assert err.value.source == uri
    with pytest.raises(InputError, match=r"s3://b/x/\.\./\.\./y.*above the bucket s3://b"):
        storage.join("s3://b/x", "../../y")


def test_resolve_hands_pyarrow_the_normalized_key(monkeypatch):
    seen = []
    fake_fs = types.SimpleNamespace(from_uri=lambda uri: seen.append(uri) or (None, uri))  # no S3 here
    monkeypatch.setattr(storage, "pafs", types.SimpleNamespace(FileSystem=fake_fs))
    storage.resolve("s3://b/x/../y/./z.json?region=eu-west-1")
    assert seen == ["s3://b/y/z.json?region=eu-west-1"]
    with pytest.raises(InputError, match="above the bucket"):
        storage.resolve("s3://b/../z")
