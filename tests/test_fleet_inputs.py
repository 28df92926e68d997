"""Scene manifests: Parquet, JSON, glob, folder of scenes, comma list; relative paths, unique ids, clear errors."""

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from difix3d.errors import InputError
from difix3d.fleet.inputs import SceneRef, resolve_scenes


@pytest.fixture
def segments(tmp_path):
    for name in ["seg-b", "seg-a", "other"]:
        (tmp_path / "segs" / name / "images").mkdir(parents=True)
    (tmp_path / "segs" / "_manifest").mkdir()  # bookkeeping folders are not scenes
    (tmp_path / "segs" / "notes.txt").write_text("not a scene")
    return tmp_path / "segs"


def test_folder_of_scenes_and_single_scene_folder(segments):
    refs = resolve_scenes(str(segments))
    assert refs == [SceneRef(n, str(segments / n)) for n in ["other", "seg-a", "seg-b"]]
    assert resolve_scenes(str(segments / "seg-a")) == [SceneRef("seg-a", str(segments / "seg-a"))]
    assert [r.scene_id for r in resolve_scenes("file://" + str(segments))] == ["other", "seg-a", "seg-b"]


def test_glob_and_comma_list(segments):
    assert [r.scene_id for r in resolve_scenes(str(segments / "seg-*"))] == ["seg-a", "seg-b"]
    (segments / "README.txt").write_text("notes")  # files and hidden entries beside the scenes are not scenes
    (segments / ".cache").mkdir()
    assert [r.scene_id for r in resolve_scenes(str(segments / "*"))] == ["other", "seg-a", "seg-b"]
    refs = resolve_scenes(f"{segments / 'seg-b'}, {segments / 'other'}")
    assert [r.scene_id for r in refs] == ["seg-b", "other"]  # manifest order is kept


def test_relative_scene_paths_come_back_absolute(segments, monkeypatch):
    monkeypatch.chdir(segments.parent)  # scene tasks and summary readers resolve them from other working folders
    for spec in ["segs", "segs/seg-*", "segs/seg-a,segs/seg-b", "./segs/seg-a/"]:
        refs = resolve_scenes(spec)
        assert refs and all(os.path.isabs(r.uri) and os.path.isdir(r.uri) for r in refs), spec
    assert resolve_scenes("segs/seg-a") == [SceneRef("seg-a", str(segments / "seg-a"))]


def test_json_manifest_strings_objects_and_relative_paths(segments):
    m = segments.parent / "scenes.json"
    m.write_text(json.dumps(["segs/seg-a", {"uri": "s3://bucket/x/seg-a", "scene_id": "remote-a"},
                             {"scene_uri": str(segments / "other")}]))
    refs = resolve_scenes(str(m))
    assert refs == [SceneRef("seg-a", os.path.join(str(segments.parent), "segs/seg-a")),
                    SceneRef("remote-a", "s3://bucket/x/seg-a"), SceneRef("other", str(segments / "other"))]
    m.write_text(json.dumps({"scenes": ["s3://b/one"]}))
    assert resolve_scenes(str(m)) == [SceneRef("one", "s3://b/one")]


def test_parquet_manifest(tmp_path):
    p = tmp_path / "m.parquet"
    pq.write_table(pa.table({"uri": ["s3://b/a/seg", "gs://c/d/seg", "rel/seg2"]}), p)
    refs = resolve_scenes(str(p))
    ids = [r.scene_id for r in refs]
    assert ids[0].startswith("seg-") and ids[1].startswith("seg-") and ids[0] != ids[1] and ids[2] == "seg2"
    pq.write_table(pa.table({"uri": ["gs://c/d/seg", "rel/seg2", "s3://b/a/seg"]}), p)  # another order, same ids
    assert {r.uri: r.scene_id for r in resolve_scenes(str(p))} == {r.uri: r.scene_id for r in refs}
    assert refs[2].uri == os.path.join(str(tmp_path), "rel/seg2")
    pq.write_table(pa.table({"scene_uri": ["s3://b/x"], "scene_id": ["custom"]}), p)
    assert resolve_scenes(str(p)) == [SceneRef("custom", "s3://b/x")]


def test_bad_manifests_name_the_file_and_problem(tmp_path):
    with pytest.raises(InputError, match="nope.*not found"):
        resolve_scenes(str(tmp_path / "nope"))
    p = tmp_path / "m.parquet"
    pq.write_table(pa.table({"name": ["x"]}), p)
    with pytest.raises(InputError, match="m.parquet.*no scene URI column"):
        resolve_scenes(str(p))
    p.write_bytes(b"not parquet at all")
    with pytest.raises(InputError, match="m.parquet.*not a readable Parquet"):
        resolve_scenes(str(p))
    j = tmp_path / "m.json"
    j.write_text(json.dumps([1, 2]))
    with pytest.raises(InputError, match="m.json.*entry 0"):
        resolve_scenes(str(j))
    j.write_text(json.dumps(["s3://b/a", "s3://b/a"]))
    with pytest.raises(InputError, match="s3://b/a.*twice"):
        resolve_scenes(str(j))
    j.write_text(json.dumps([{"uri": "s3://b/a", "scene_id": "x"}, {"uri": "s3://b/b", "scene_id": "x"}]))
    with pytest.raises(InputError, match="x: .*scene_id to two scenes"):
        resolve_scenes(str(j))
    for missing in ("gone.json", "gone.parquet"):  # named, as an InputError (the CLI's clean exit), not a traceback
        with pytest.raises(InputError, match=f"{missing}: scene manifest not found"):
            resolve_scenes(str(tmp_path / missing))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no scenes"):
        resolve_scenes(str(tmp_path / "empty"))


def test_job_cli_is_built_from_fleet_config():
    from difix3d.fleet import FleetConfig
    from difix3d.fleet.cli import build_parser, config_from_args

    assert config_from_args(build_parser().parse_args([])) == FleetConfig()  # no arguments: the embedded demo
    cfg = config_from_args(build_parser().parse_args(
        ["--scenes", "s3://b/segs/*", "--output", "s3://b/out", "--scene-num-gpus", "0.5", "--max-attempts", "3",
         "--retry-failed", "--no-progress", "--fixer-mode", "local", "--set", "rounds=2", "--set", "name=x"]))
    assert (cfg.scenes, cfg.output, cfg.scene_num_gpus, cfg.max_attempts) == ("s3://b/segs/*", "s3://b/out", 0.5, 3)
    assert cfg.retry_failed and not cfg.progress and cfg.fixer_mode == "local"
    assert cfg.extra == {"rounds": 2, "name": "x"}
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--device", "tpu"])
    assert "bundled" in build_parser().format_help()  # field docstrings become --help text


def test_set_overrides_nested_config_fields():
    from dataclasses import dataclass, field

    from difix3d.fleet.scene_task import _with_overrides

    @dataclass
    class Inner:
        iterations: int = 300

    @dataclass
    class Outer:
        inner: Inner = field(default_factory=Inner)
        splits: tuple = ("test",)
        baseline: bool = True

    cfg = _with_overrides(Outer(), {"inner.iterations": 50, "splits": ["a", "b"], "baseline": False})
    assert cfg == Outer(Inner(50), ("a", "b"), False)
    with pytest.raises(ValueError, match="inner.nope.*Inner has no field 'nope'"):
        _with_overrides(Outer(), {"inner.nope": 1})


@pytest.mark.parametrize("scene_id", ["cityA/seg1", "..", " "])
def test_a_scene_id_that_is_not_a_plain_name_is_refused(tmp_path, scene_id):
    manifest = tmp_path / "scenes.json"
    manifest.write_text(json.dumps([{"uri": str(tmp_path / "a"), "scene_id": scene_id}]))
    with pytest.raises(InputError, match="must be a non-empty name without '/'"):
        resolve_scenes(str(manifest))


def test_one_scene_spelled_two_ways_is_listed_twice_not_run_twice(tmp_path, monkeypatch):
    """a/seg1 and ./a/seg1/ are one location: two tasks would write one scenes/<id>/ folder at once."""
    seg = tmp_path / "a" / "seg1"
    seg.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match="twice"):
        resolve_scenes("a/seg1,./a/seg1/")
    j = tmp_path / "m.json"
    j.write_text(json.dumps([{"uri": "s3://b/x/seg1", "scene_id": "seg1-b"}, "s3://b/seg1", "s3://c/seg1"]))
    ids = [r.scene_id for r in resolve_scenes(str(j))]
    assert len(set(ids)) == 3
