"""The curation job on a local Ray cluster: two tiny synthetic segments and one corrupt scene, all four strategies.

Every strategy must yield pairs whose degraded render is clearly worse than its target, the shards must read back
with the fine-tuning reader, a re-run must skip finished units, and the corrupt scene must fail alone."""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys

import numpy as np
import pytest

from difix3d import storage
from difix3d.curate.cli import build_job_parser, config_from_args
from difix3d.curate.filters import PsnrFilter
from difix3d.curate.job import CurateConfig, run_curation, unit_name
from difix3d.curate.strategies import CrossCamera, CycleReconstruction, ReconstructionSettings, SparseReconstruction
from difix3d.errors import InputError
from difix3d.fleet.inputs import SceneRef
from difix3d.recon.gaussians import GaussianConfig
from difix3d.scene.synthetic import make_segment
from difix3d.train.pairs import list_shards, psnr_uint8, read_pair_shard

import ray  # noqa: E402

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import this test module

H, W = 24, 32
STRATEGIES = ("sparse", "cross_camera", "underfit", "cycle")


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    root = tmp_path_factory.mktemp("segments")
    refs = []
    for seed, name in ((0, "seg-a"), (1, "seg-b")):
        make_segment(str(root / name), seed=seed, frames=6, height=H, width=W, cameras=("front", "left"),
                     holdout_cameras=("right",), shifts=(), num_points=200)
        refs.append(SceneRef(name, str(root / name)))
    bad = root / "seg-bad"
    shutil.copytree(root / "seg-a", bad)
    (bad / "ego_pose" / "002.txt").write_text("nan 0 0 0\n0 1 0 0\n0 0 1 0\n0 0 0 1\n")
    refs.append(SceneRef("seg-bad", str(bad)))
    return refs


def tiny_config(output: str) -> CurateConfig:
    return CurateConfig(
        output=output, strategies=STRATEGIES, sparse=SparseReconstruction(every_nth=2),
        cycle=CycleReconstruction(shift_range=(1.0, 1.5)),
        recon=ReconstructionSettings(iterations=20, gaussian=GaussianConfig.tiny(sh_degree=0, densify=False),
                                     device="cpu"),
        filter=PsnrFilter(min_psnr=5.0, max_psnr=40.0), shard_size=4, max_attempts=2, gpus_per_task=0,
        max_in_flight=2)  # two workers on two cores: each worker pays the torch import once


@pytest.fixture(scope="module")
def first_run(ray_local, scenes, tmp_path_factory):
    config = tiny_config(str(tmp_path_factory.mktemp("curated")))
    return run_curation(config, scenes, progress=False), config


def test_every_strategy_yields_clearly_degraded_pairs_that_read_back(first_run):
    report, config = first_run
    rows = [r for uri in list_shards(storage.join(config.output, "shards")) for r in read_pair_shard(uri)]
    assert sorted(report.shards) == list_shards(storage.join(config.output, "shards")) == list_shards(config.output)
    for scene in ("seg-a", "seg-b"):
        for strategy in STRATEGIES:
            mine = [r for r in rows if r["scene"] == scene and r["strategy"] == strategy]
            assert len(mine) == 6, (scene, strategy, len(mine))  # 6 targets per strategy on these segments
            assert report.units[unit_name(scene, strategy)]["pairs"] == 6
            for r in mine:
                assert r["degraded"].shape == r["target"].shape == r["reference"].shape == (H, W, 3)
                assert r["psnr"] == pytest.approx(psnr_uint8(r["degraded"], r["target"]), abs=1e-3)
                # clearly worse than the target: far from a perfect score and below target-vs-target
                assert r["psnr"] < 28.0 < psnr_uint8(r["target"], r["target"])
                assert not np.array_equal(r["reference"], r["target"])  # the nearest *other* training image
            assert np.mean([r["psnr"] for r in mine]) < 24.0
    cross = [r for r in rows if r["strategy"] == "cross_camera"]
    assert {r["camera"].split("_", 1)[1] for r in cross} == {"right"}
    counts = report.counts.to_dict()
    assert set(counts) == set(STRATEGIES) and all(c["kept"] == 12 for c in counts.values())
    summary = storage.read_json(storage.join(config.output, "summary.json"))
    assert summary["counts"] == counts and summary["pairs"] == 48 and summary["shards"] == len(report.shards)
    assert set(summary["unit_seconds_by_strategy"]) == set(STRATEGIES)


def test_a_corrupt_scene_fails_alone_and_is_recorded(first_run):
    report, config = first_run
    assert set(report.failed) == {unit_name("seg-bad", s) for s in STRATEGIES}
    for error in report.failed.values():
        assert "002.txt" in error and "NaN" in error  # names the file and the problem
    assert not [u for u in report.shards if "seg-bad" in u]
    entry = storage.Manifest(config.output).get(unit_name("seg-bad", "cycle"))
    assert entry.status == "failed" and entry.attempts == 1
    summary = storage.read_json(storage.join(config.output, "summary.json"))
    assert set(summary["failed"]) == set(report.failed)


def test_rerun_skips_finished_units_and_retries_failed_ones_up_to_max_attempts(first_run, scenes):
    report, config = first_run
    mtimes = {u: os.path.getmtime(u) for u in report.shards}
    again = run_curation(config, scenes, progress=False)
    done = {unit_name(s, k) for s in ("seg-a", "seg-b") for k in STRATEGIES}
    assert set(again.skipped) == done
    assert {u: os.path.getmtime(u) for u in again.shards} == mtimes  # nothing rewritten
    assert again.counts.to_dict() == report.counts.to_dict()  # counts of earlier runs stay in the report
    manifest = storage.Manifest(config.output)
    assert manifest.get(unit_name("seg-bad", "sparse")).attempts == 2
    third = run_curation(config, scenes, progress=False)  # max_attempts reached: nothing runs
    assert set(third.skipped) == done and set(third.given_up) == set(report.failed)  # given up: not "done"
    assert set(storage.read_json(storage.join(config.output, "summary.json"))["given_up"]) == set(report.failed)


def test_a_rerun_with_other_pair_settings_is_refused_and_keeps_config_json(first_run, scenes):
    _, config = first_run
    uri = storage.join(config.output, "config.json")
    before = storage.read_text(uri)
    other = dataclasses.replace(config, sparse=SparseReconstruction(every_nth=3), filter=PsnrFilter(50.0, 60.0))
    with pytest.raises(InputError, match="config.json") as e:
        run_curation(other, scenes, progress=False)
    assert "sparse.every_nth 2 -> 3" in str(e.value) and "filter.min_psnr 5.0 -> 50.0" in str(e.value)
    assert "new output folder" in str(e.value)
    assert storage.read_text(uri) == before  # still describes the shards that are there


def test_job_command_line_builds_the_config():
    args = build_job_parser().parse_args([
        "--scenes", "a,b", "--output", "out", "--strategies", "sparse,cycle", "--iterations", "50",
        "--every-nth", "3", "--held-out-camera", "left", "--underfit-range", "0.3", "0.6", "--shift-range", "2", "4",
        "--min-psnr", "9", "--max-psnr", "33", "--shard-size", "16", "--tiny"])
    config = config_from_args(args)
    assert config.strategies == ("sparse", "cycle") and config.recon.iterations == 50
    assert config.sparse.every_nth == 3 and config.cross_camera == CrossCamera(held_out="left")
    assert config.underfit.fraction_range == (0.3, 0.6) and config.cycle.shift_range == (2.0, 4.0)
    assert (config.filter.min_psnr, config.filter.max_psnr, config.shard_size) == (9.0, 33.0, 16)
    assert config.recon.gaussian.sh_degree == 0
    with pytest.raises(ValueError, match="unknown strategy"):
        CurateConfig(strategies=("sparse", "nope")).strategy("nope")


def _dies_after_one_shard(ref, name, config):
    """A unit task killed after writing its first shard (an OOM kill): curate_unit never got to clean up."""
    from difix3d.curate.job import _shard_uri
    from difix3d.train.pairs import write_pair_shard

    target = np.zeros((H, W, 3), np.uint8)
    write_pair_shard(_shard_uri(config, ref.scene_id, name, 0), [
        {"degraded": target + 9, "target": target, "scene": ref.scene_id, "camera": "000_front",
         "strategy": name, "psnr": 20.0}])
    raise RuntimeError("worker killed")


def test_a_unit_whose_task_dies_leaves_no_shards(ray_local, scenes, tmp_path):
    from difix3d.curate.job import _stream, in_flight_bound

    config = tiny_config(str(tmp_path))
    task = ray.remote(_dies_after_one_shard).options(max_retries=0)
    bound = in_flight_bound(config, False, ray.cluster_resources, {})
    results = list(_stream(task, [("seg-a/sparse", scenes[0], "sparse")], config, bound, progress=False))
    assert results[0][1]["status"] == "failed" and "worker killed" in results[0][1]["error"]
    assert not os.path.exists(os.path.join(str(tmp_path), "shards", "seg-a-sparse-00000.parquet"))
