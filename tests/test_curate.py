"""Curation pieces without Ray: which views each strategy trains on and renders, references, lateral shifts, the
PSNR filter and its counts, contact sheets and ``difix3d pairs show``."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from difix3d import imageio
from difix3d.cli import main as cli_main
from difix3d.curate.contact import PAD, contact_sheet
from difix3d.curate.filters import FilterCounts, PsnrFilter
from difix3d.curate.strategies import (CrossCamera, CurationStrategy, NotApplicable, ReconstructionSettings,
                                       SparseReconstruction, UnderFitted, pairs_from_renders, shift_laterally)
from difix3d.errors import InputError
from difix3d.recon.gaussians import GaussianConfig
from difix3d.scene.scene import Scene
from difix3d.scene.synthetic import make_segment
from difix3d.train.pairs import psnr_uint8, read_pair_shard, write_pair_shard

H, W = 24, 32


@pytest.fixture(scope="module")
def segment(tmp_path_factory):
    return make_segment(str(tmp_path_factory.mktemp("seg") / "seg-a"), seed=3, frames=6, height=H, width=W,
                        cameras=("front", "left"), holdout_cameras=("right",), shifts=(), num_points=300)


def _tiny_recon(iterations: int = 30) -> ReconstructionSettings:
    return ReconstructionSettings(iterations=iterations, gaussian=GaussianConfig.tiny(sh_degree=0, densify=False),
                                  device="cpu")


def test_sparse_trains_on_every_nth_frame_per_camera_and_renders_the_rest(segment):
    train, targets = SparseReconstruction(every_nth=3).split_views(segment)
    frames = {i: (segment.cameras[i].camera_id, segment.cameras[i].meta["frame"]) for i in train + targets}
    assert sorted(frames[i] for i in train) == sorted((c, t) for c in ("front", "left") for t in (0, 3))
    assert sorted(frames[i] for i in targets) == sorted((c, t) for c in ("front", "left") for t in (1, 2, 4, 5))
    assert not set(segment.splits["cross_camera"]) & set(train + targets)  # the held-out rig camera is not used
    with pytest.raises(ValueError):
        SparseReconstruction(every_nth=1).split_views(segment)


def test_cross_camera_holds_out_one_rig_camera(segment):
    train, targets = CrossCamera().split_views(segment)  # default: the scene's cross_camera split
    assert {segment.cameras[i].camera_id for i in targets} == {"right"}
    assert {segment.cameras[i].camera_id for i in train} == {"front", "left"} and len(train) == 12
    train, targets = CrossCamera(held_out="left").split_views(segment)
    assert {segment.cameras[i].camera_id for i in targets} == {"left"} and len(targets) == 6
    assert {segment.cameras[i].camera_id for i in train} == {"front", "right"}
    one_camera = Scene("mono", [segment.cameras[i] for i in range(3)], [""] * 3,
                       {"train": [0, 1, 2], "test": []})
    for cam in one_camera.cameras:
        cam.camera_id = "front"
    with pytest.raises(NotApplicable):
        CrossCamera().split_views(one_camera)
    with pytest.raises(NotApplicable):
        CrossCamera(held_out="rear").split_views(segment)


def test_underfit_fraction_is_in_range_and_repeatable(segment):
    s = UnderFitted()
    f = s.fraction(segment)
    assert 0.25 <= f <= 0.75 and f == s.fraction(segment)
    assert UnderFitted(fraction_range=(0.5, 0.5)).fraction(segment) == 0.5
    with pytest.raises(ValueError):
        UnderFitted(fraction_range=(0.8, 0.2)).fraction(segment)


def test_lateral_shift_moves_along_the_ego_left_axis_and_keeps_orientation(segment):
    cam = segment.cameras[segment.splits["train"][2]]
    moved = shift_laterally(cam, 2.0)
    left = np.asarray(cam.meta["ego_to_world"])[:3, 1]
    np.testing.assert_allclose(moved.position - cam.position, 2.0 * left, atol=1e-9)
    np.testing.assert_allclose(moved.rotation_c2w, cam.rotation_c2w, atol=1e-12)
    bare = cam.with_pose(cam.viewmat, meta={})  # no ego: the camera's own left (−x)
    np.testing.assert_allclose(shift_laterally(bare, 1.0).position - cam.position, -cam.rotation_c2w[:, 0],
                               atol=1e-9)


def test_pairs_carry_the_nearest_other_training_image_as_reference(segment):
    train = segment.splits["train"]
    target = train[0]  # a training view itself (as in cycle): its reference must be another image
    renders = [np.zeros((H, W, 3), np.uint8)]
    (pair,) = pairs_from_renders(segment, "cycle", [target], renders, train)
    assert pair["reference_camera"] != segment.cameras[target].name
    assert pair["reference_camera"] in {segment.cameras[i].name for i in train}
    np.testing.assert_array_equal(pair["target"], segment.load_image(target))
    assert pair["psnr"] == pytest.approx(psnr_uint8(renders[0], pair["target"]))


def test_underfit_yields_degraded_renders_of_the_test_views(segment):
    pairs = list(UnderFitted(fraction_range=(0.5, 0.5)).make_pairs(segment, _tiny_recon(20)))
    assert [p["camera"] for p in pairs] == [segment.cameras[i].name for i in segment.splits["test"]]
    for p in pairs:
        assert p["degraded"].shape == p["target"].shape == p["reference"].shape == (H, W, 3)
        assert 5.0 < p["psnr"] < 30.0 and p["strategy"] == "underfit"


def _pair(psnr: float, strategy: str) -> dict:
    return {"psnr": psnr, "strategy": strategy}


def test_psnr_filter_drops_pairs_outside_the_bounds_and_counts_them():
    f = PsnrFilter(min_psnr=12.0, max_psnr=30.0)
    counts = FilterCounts()
    pairs = [_pair(p, s) for p, s in [(10.0, "sparse"), (15.0, "sparse"), (31.0, "sparse"), (29.9, "cycle"),
                                      (float("nan"), "cycle"), (12.0, "cycle"), (100.0, "cycle")]]
    kept = list(f.apply(pairs, counts))
    assert [p["psnr"] for p in kept] == [15.0, 29.9, 12.0]
    assert counts.to_dict() == {"cycle": {"kept": 2, "too_bad": 1, "too_good": 1},
                                "sparse": {"kept": 1, "too_bad": 1, "too_good": 1}}
    merged = FilterCounts().merge(counts).merge(counts.to_dict())
    assert merged.total("kept") == 6 and merged.total("too_good") == 4
    assert "sparse" in merged.table() and "too_good" in merged.table()
    with pytest.raises(ValueError):
        PsnrFilter(min_psnr=30.0, max_psnr=10.0)


def test_contact_sheet_rows_are_degraded_target_reference(tmp_path):
    rng = np.random.default_rng(0)
    rows = [{"degraded": rng.integers(0, 256, (H, W, 3), dtype=np.uint8),
             "target": rng.integers(0, 256, (H, W, 3), dtype=np.uint8),
             "reference": None if i == 1 else rng.integers(0, 256, (H, W, 3), dtype=np.uint8),
             "scene": "s", "camera": f"{i:03d}_front", "strategy": "sparse"} for i in range(3)]
    sheet = contact_sheet(rows, max_rows=2)
    assert sheet.shape == (2 * H + 3 * PAD, 3 * W + 4 * PAD, 3)
    np.testing.assert_array_equal(sheet[PAD:PAD + H, PAD:PAD + W], rows[0]["degraded"])
    np.testing.assert_array_equal(sheet[PAD:PAD + H, 2 * PAD + W:2 * PAD + 2 * W], rows[0]["target"])
    np.testing.assert_array_equal(sheet[2 * PAD + H:2 * PAD + 2 * H, 3 * PAD + 2 * W:3 * PAD + 3 * W], 128)
    shard = str(tmp_path / "pairs.parquet")
    write_pair_shard(shard, rows)
    assert [r["camera"] for r in read_pair_shard(shard)] == ["000_front", "001_front", "002_front"]
    png = str(tmp_path / "sheet.png")
    assert cli_main(["pairs", "show", shard, "-o", png, "--rows", "3"]) == 0
    assert imageio.read_image(png).shape == (3 * H + 4 * PAD, 3 * W + 4 * PAD, 3)
    assert cli_main(["pairs", "show", str(tmp_path / "missing.parquet"), "-o", png]) == 2  # names the file


def test_a_unit_whose_strategy_does_not_apply_is_reported_not_failed(segment, tmp_path):
    from difix3d.curate.job import CurateConfig, curate_unit
    from difix3d.fleet.inputs import SceneRef

    config = CurateConfig(output=str(tmp_path), cross_camera=CrossCamera(held_out="rear"))
    result = curate_unit(SceneRef("seg-a", segment.root), "cross_camera", config)
    assert result["status"] == "not_applicable" and "rear" in result["error"] and result["shards"] == []
    missing = curate_unit(SceneRef("gone", str(tmp_path / "gone")), "sparse", config)
    assert missing["status"] == "failed" and "gone" in missing["error"] and "not found" in missing["error"]


def test_a_changed_pair_setting_is_refused_but_worker_settings_and_old_records_are_not(tmp_path):
    from difix3d import storage
    from difix3d.curate.job import CurateConfig, check_settings
    from difix3d.errors import InputError

    first = CurateConfig(output=str(tmp_path), sparse=SparseReconstruction(every_nth=2), filter=PsnrFilter(0.0, 35.0))
    check_settings(first)  # a new output: nothing to compare
    uri = str(tmp_path / "config.json")
    storage.write_json(uri, first.to_dict())
    other = dataclasses.replace(first, sparse=SparseReconstruction(every_nth=3), filter=PsnrFilter(50.0, 60.0))
    with pytest.raises(InputError, match=r"config\.json: .*sparse\.every_nth 2 -> 3.*filter\.min_psnr 0\.0 -> 50\.0"):
        check_settings(other)
    # how the work runs is not what it makes: workers, resources, attempts, shard size, render batches, device
    check_settings(dataclasses.replace(
        first, max_in_flight=7, cpus_per_task=2, gpus_per_task=1, max_attempts=5, shard_size=3, strategies=("cycle",),
        recon=dataclasses.replace(first.recon, device="cpu", render_batch=2)))
    saved = storage.read_json(uri)
    del saved["cycle"], saved["filter"]["max_psnr"]  # written before those fields existed
    storage.write_json(uri, saved)
    check_settings(dataclasses.replace(first, filter=PsnrFilter(0.0, 30.0)))


def test_units_given_up_on_are_counted_apart_from_done_ones(segment, tmp_path, capsys):
    from difix3d import storage
    from difix3d.curate.cli import print_report
    from difix3d.curate.job import CurateConfig, plan, summarize
    from difix3d.fleet.inputs import SceneRef

    config = CurateConfig(output=str(tmp_path), strategies=("sparse", "cycle", "underfit"), max_attempts=2)
    manifest = storage.Manifest(config.output)
    manifest.mark("seg-a/sparse", "done", 1, counts={"sparse": {"kept": 3}})
    manifest.mark("seg-a/cycle", "failed", 2, error="InputError: x.txt: NaN")
    scenes = [SceneRef("seg-a", segment.root)]
    todo, skipped, given_up = plan(scenes, config, manifest)
    assert ([u for u, _, _ in todo], skipped, given_up) == (["seg-a/underfit"], ["seg-a/sparse"], ["seg-a/cycle"])
    assert print_report(summarize(scenes, config, manifest, skipped, given_up), config) == 1
    out = capsys.readouterr().out
    assert "1 units already done, 0 failed" in out
    assert "given up after 2 attempts (not run again): 1 units" in out and "--max-attempts" in out
    assert "GAVE UP seg-a/cycle: InputError: x.txt: NaN" in out


@dataclasses.dataclass
class _FixedPairs(CurationStrategy):
    """A stand-in strategy: ``n`` pairs at once, then ``fail`` raises (a scene that breaks half-way)."""

    n: int = 2
    fail: bool = False

    def make_pairs(self, scene, recon):
        rng = np.random.default_rng(self.n)
        for i in range(self.n):
            target = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
            yield {"degraded": 255 - target, "target": target, "scene": scene.name, "camera": f"{i:03d}_front",
                   "strategy": "sparse", "psnr": 20.0}
        if self.fail:
            raise InputError("x.txt", "broken")


def test_a_retry_leaves_no_shard_of_an_earlier_killed_attempt(segment, tmp_path):
    from difix3d.curate.job import CurateConfig, curate_unit
    from difix3d.fleet.inputs import SceneRef
    from difix3d.train.pairs import list_shards

    shards = tmp_path / "shards"
    killed = _FixedPairs(n=3)  # an attempt killed after writing 3 one-pair shards: no manifest entry names them
    for k, rows in enumerate(killed.make_pairs(segment, None)):
        write_pair_shard(str(shards / f"seg-a-sparse-{k:05d}.parquet"), [rows])
    other_unit = str(shards / "seg-a-cycle-00000.parquet")
    write_pair_shard(other_unit, [next(killed.make_pairs(segment, None))])
    ref = SceneRef("seg-a", segment.root)

    retry = curate_unit(ref, "sparse", CurateConfig(output=str(tmp_path), sparse=_FixedPairs(n=2), shard_size=4))
    assert retry["status"] == "done" and len(retry["shards"]) == 1
    assert list_shards(str(shards)) == sorted(retry["shards"] + [other_unit])  # the killed attempt's are gone
    assert [r["camera"] for r in read_pair_shard(retry["shards"][0])] == ["000_front", "001_front"]

    broken = curate_unit(ref, "sparse", CurateConfig(output=str(tmp_path), sparse=_FixedPairs(n=2, fail=True),
                                                     shard_size=1))
    assert broken["status"] == "failed" and broken["shards"] == []
    assert list_shards(str(shards)) == [other_unit]  # a failed unit leaves none of its shards, old or new


def test_the_reference_is_the_nearest_training_view_of_the_targets_size():
    from types import SimpleNamespace

    from difix3d.scene.camera import Camera

    K = np.array([[20.0, 0, 16], [0, 20, 12], [0, 0, 1]])

    def cam(name, cid, x, h):
        viewmat = np.eye(4)
        viewmat[0, 3] = -x
        return Camera(viewmat, K, W, h, name=name, camera_id=cid)

    # the target (a front camera), a shorter side camera right beside it, another front frame 1 m away
    cams = [cam("000_front", "front", 0.0, H), cam("000_side", "side", 0.1, 16), cam("001_front", "front", 1.0, H)]
    scene = SimpleNamespace(name="s", cameras=cams,
                            load_image=lambda i: np.full((cams[i].height, W, 3), 10 * i, np.uint8))
    pair = next(pairs_from_renders(scene, "underfit", [0], [np.zeros((H, W, 3), np.uint8)], train_idx=[1, 2]))
    assert pair["reference_camera"] == "001_front" and pair["reference"].shape == (H, W, 3)
    alone = next(pairs_from_renders(scene, "underfit", [0], [np.zeros((H, W, 3), np.uint8)], train_idx=[1]))
    assert alone["reference"] is None and alone["reference_camera"] == ""


def test_settings_of_the_strategies_that_run_are_checked_before_any_task():
    from difix3d.curate.job import CurateConfig
    from difix3d.curate.strategies import CycleReconstruction

    config = CurateConfig(strategies=("cycle",), sparse=SparseReconstruction(every_nth=1),
                          underfit=UnderFitted(fraction_range=(0.0, 0.5)),
                          cycle=CycleReconstruction(shift_range=(-3.0, -1.0)))  # to the right: allowed
    config.strategy("cycle")  # the strategies that do not run are not held to their settings
    with pytest.raises(ValueError, match="sparse.every_nth must be an integer >= 2, got 1"):
        config.strategy("sparse")
    with pytest.raises(ValueError, match=r"underfit.fraction_range must satisfy 0 < lo <= hi <= 1"):
        config.strategy("underfit")
    with pytest.raises(ValueError, match="cycle.shift_range must satisfy lo <= hi"):
        CycleReconstruction(shift_range=(2.0, 1.0)).check()
    with pytest.raises(ValueError, match="cycle.shift_range must be finite"):
        CycleReconstruction(shift_range=(1.0, float("nan"))).check()
    for near_zero in ((0.0, 0.0), (-1.0, 1.0), (0.05, 2.0)):  # shifts of ~0 render the views the model trained on
        with pytest.raises(ValueError, match="at least 0.1 m from 0"):
            CycleReconstruction(shift_range=near_zero).check()


def test_settings_may_change_while_no_unit_is_done(tmp_path):
    from difix3d import storage
    from difix3d.curate.job import CurateConfig, check_settings

    first = CurateConfig(output=str(tmp_path), sparse=SparseReconstruction(every_nth=2))
    storage.write_json(str(tmp_path / "config.json"), first.to_dict())
    manifest = storage.Manifest(first.output)
    manifest.mark("seg-a/sparse", "failed", 2, error="ValueError: broken")
    other = dataclasses.replace(first, sparse=SparseReconstruction(every_nth=3))
    check_settings(other, manifest)  # every unit failed: the folder holds no pairs to misdescribe
    manifest.mark("seg-c/cross_camera", "done", 1, outcome="not_applicable", shards=[])
    check_settings(other, manifest)  # a unit that did not apply wrote no pairs either
    manifest.mark("seg-b/sparse", "done", 1, shards=["shards/seg-b__sparse__0000.parquet"])
    with pytest.raises(InputError, match="sparse.every_nth 2 -> 3"):
        check_settings(other, manifest)


def test_scenes_keep_the_ids_an_earlier_run_curated_them_under(tmp_path):
    from difix3d import storage
    from difix3d.curate.job import adopt_recorded_scene_ids
    from difix3d.fleet.inputs import SceneRef

    manifest = storage.Manifest(str(tmp_path / "out"))
    a, b = str(tmp_path / "cityA" / "seg1"), str(tmp_path / "cityB" / "seg1")
    manifest.mark("seg1/sparse", "done", 1, scene="seg1", uri=a + "/")  # when seg1 was the only one of its name
    scenes = [SceneRef("seg1-aaaa", a), SceneRef("seg1-bbbb", b)]  # now its name clashes: hashed ids
    assert adopt_recorded_scene_ids(scenes, manifest) == [SceneRef("seg1", a), SceneRef("seg1-bbbb", b)]


def test_an_id_recorded_for_another_scene_location_is_refused(segment, tmp_path):
    from difix3d import storage
    from difix3d.curate.job import CurateConfig, plan
    from difix3d.fleet.inputs import SceneRef

    config = CurateConfig(output=str(tmp_path / "out"), strategies=("sparse",))
    manifest = storage.Manifest(config.output)
    manifest.mark("seg1/sparse", "done", 1, scene="seg1", uri=str(tmp_path / "x" / "seg1"))
    with pytest.raises(InputError, match=r"scene id 'seg1' was curated from .*x/seg1, not .*y/seg1"):
        plan([SceneRef("seg1", str(tmp_path / "y" / "seg1"))], config, manifest)
    todo, skipped, _ = plan([SceneRef("seg1", str(tmp_path / "x" / "seg1") + "/")], config, manifest)
    assert skipped == ["seg1/sparse"] and not todo


def test_underfit_never_fits_its_own_targets(segment):
    leaky = dataclasses.replace(segment, splits={**segment.splits,
                                                 "train": sorted(set(segment.splits["train"]) | set(segment.splits["test"]))})
    fitted = []

    class Spy(ReconstructionSettings):
        def fit(self, scene, views, steps=None, seed_key=""):
            fitted.extend(v.camera.name for v in views)
            raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        next(UnderFitted().make_pairs(leaky, Spy(iterations=10)))
    targets = {segment.cameras[i].name for i in segment.splits["test"]}
    assert fitted and not targets & set(fitted)


def test_curation_undistorts_scenes_and_reports_units_that_do_not_apply(segment, tmp_path, monkeypatch, capsys):
    from difix3d.curate import job
    from difix3d.curate.cli import print_report
    from difix3d.fleet.inputs import SceneRef
    from difix3d.scene import undistort

    seen = []
    monkeypatch.setattr(undistort, "undistorted", lambda scene: seen.append(scene.name) or scene)
    config = job.CurateConfig(output=str(tmp_path), cross_camera=CrossCamera(held_out="Left"), recon=_tiny_recon())
    result = job.curate_unit(SceneRef("seg-a", segment.root), "cross_camera", config)
    assert seen == [segment.name]  # 3DGS renders pinhole cameras: targets must be undistorted like the renders
    assert result["status"] == "not_applicable" and "Left" in result["error"]
    report = job.CurationReport(units={"seg-a/cross_camera": {**result, "outcome": "not_applicable",
                                                              "status": "done"}},
                                counts=FilterCounts(), skipped=[])
    assert print_report(report, config) == 1  # nothing applied and no pairs: not a success
    out = capsys.readouterr().out
    assert "NOT APPLICABLE seg-a/cross_camera:" in out and "no pairs: no unit applied" in out


def test_curation_settings_that_cannot_work_are_refused_before_any_task(tmp_path):
    from difix3d.curate import job
    from difix3d.curate.cli import build_job_parser

    with pytest.raises(ValueError, match="strategies: each once"):
        job.run_curation(job.CurateConfig(output=str(tmp_path), strategies=("sparse", "sparse")), scenes=[])
    parser = build_job_parser()
    for flag, value in (("--iterations", "0"), ("--shard-size", "-3"), ("--max-attempts", "0"),
                        ("--gpus-per-task", "-1")):
        with pytest.raises(SystemExit):
            parser.parse_args(["--scenes", "s", "--output", "o", flag, value])


def test_curation_keeps_as_many_units_in_flight_as_the_clusters_cpus_and_gpus_run():
    from difix3d.curate.job import CurateConfig, in_flight_limit

    # CPU-only tasks: 16 CPUs / 2 per task = 8 running, 2 queued for the autoscaler; GPUs then bound nothing
    assert in_flight_limit(CurateConfig(cpus_per_task=2), {"CPU": 16}, use_gpu=False) == 8 + 2
    assert in_flight_limit(CurateConfig(cpus_per_task=2, gpus_per_task=0), {"CPU": 16, "GPU": 1}, True) == 8 + 2
    # one GPU per task (the default on a GPU cluster): 4 GPUs run 4 units, not the 64 the CPUs would
    assert in_flight_limit(CurateConfig(), {"CPU": 64, "GPU": 4}, use_gpu=True) == 4 + 1
    # fractional GPUs: 0.25 each on 4 GPUs = 16; 0.1 on one = 10 and 0.07 on 7 = 100, as Ray counts them, though
    # in floats 1 // 0.1 == 9.0 and 7 / 0.07 < 100
    assert in_flight_limit(CurateConfig(gpus_per_task=0.25), {"CPU": 64, "GPU": 4}, use_gpu=True) == 16 + 4
    assert in_flight_limit(CurateConfig(gpus_per_task=0.1), {"CPU": 64, "GPU": 1}, use_gpu=True) == 10 + 2
    assert in_flight_limit(CurateConfig(gpus_per_task=0.07), {"CPU": 128, "GPU": 7}, use_gpu=True) == 100 + 25
    # GPU tasks on a cluster with no GPU node yet: one queued at least, the demand an autoscaler adds nodes for
    assert in_flight_limit(CurateConfig(gpus_per_task=1), {"CPU": 8}, use_gpu=False) == 1 + 1
    assert in_flight_limit(CurateConfig(max_in_flight=3, cpus_per_task=2), {"CPU": 64, "GPU": 4}, True) == 3


def test_curation_in_flight_bound_follows_the_cluster_as_nodes_join_and_leave():
    from difix3d.curate.job import CurateConfig, in_flight_bound

    now, cluster = [0.0], {"CPU": 8, "GPU": 1}
    bound = in_flight_bound(CurateConfig(), True, lambda: dict(cluster), dict(cluster), every_s=10,
                            clock=lambda: now[0])
    assert bound.current() == 1 + 1
    cluster.update(CPU=40, GPU=5)  # the autoscaler added a 4-GPU node for the queued unit
    now[0] = 5.0
    assert bound.current() == 1 + 1  # not re-read before every_s
    now[0] = 11.0
    assert bound.current() == 5 + 1
    cluster.update(CPU=8, GPU=1)  # the node went idle and was removed
    now[0] = 22.0
    assert bound.current() == 1 + 1
    cpu_only = {"CPU": 2}
    bound = in_flight_bound(CurateConfig(), False, lambda: dict(cpu_only), dict(cpu_only), every_s=10,
                            clock=lambda: now[0])
    cpu_only["CPU"] = 34
    now[0] = 33.0
    assert bound.current() == 34 + 8
    now[0] = 44.0
    bound.resources = lambda: 1 / 0  # the GCS did not answer: the last bound holds
    assert bound.current() == 34 + 8
    fixed = in_flight_bound(CurateConfig(max_in_flight=3), True, lambda: dict(cluster, CPU=99, GPU=99), dict(cluster),
                            every_s=0)
    assert fixed.current() == 3


def test_curation_units_take_a_gpu_once_one_joins_the_cluster():
    """gpus_per_task unset: units submitted before any GPU node joined run on CPUs, later ones take a GPU, and the
    bound counts them as such from the reading that saw the GPUs."""
    from types import SimpleNamespace

    from difix3d.curate.job import CurateConfig, UnitTask, in_flight_bound, in_flight_limit, unit_task_options
    from difix3d.fleet.inputs import SceneRef

    config, now, cluster = CurateConfig(), [0.0], {"CPU": 8}
    bound = in_flight_bound(config, None, lambda: dict(cluster), dict(cluster), every_s=10, clock=lambda: now[0])
    assert bound.current() == in_flight_limit(config, {"CPU": 8}, use_gpu=False)
    task = UnitTask(config, bound)
    assert not task.use_gpu
    assert unit_task_options(config, True)["num_gpus"] == 1 and unit_task_options(config, False)["num_gpus"] == 0
    placed = []

    def submit(gpu):
        placed.append(gpu)
        return f"unit-{len(placed)}"

    task.tasks = {gpu: SimpleNamespace(remote=lambda ref, name, cfg, gpu=gpu: submit(gpu)) for gpu in (0, 1)}
    ref = SceneRef("s0", "/x/s0")
    cpu_units = [task.remote(ref, "sparse", config) for _ in range(3)]
    assert task.uncounted(cpu_units) == 0  # no GPU yet: the bound counts every unit
    cluster.update(CPU=40, GPU=4)  # an autoscaler added a GPU node
    now[0] = 11.0
    assert bound.current() == 4 + 1  # one GPU per unit now bounds it
    gpu_unit = task.remote(ref, "sparse", config)
    assert placed == [False, False, False, True]
    # the CPU units still running do not hold GPU units back: 5 GPU slots besides them
    assert task.uncounted(cpu_units + [gpu_unit]) == 3 and task.uncounted([cpu_units[0], gpu_unit]) == 1
    assert unit_task_options(CurateConfig(gpus_per_task=0.5), False) == unit_task_options(
        CurateConfig(gpus_per_task=0.5), True)  # a given share never changes
    fixed = in_flight_bound(CurateConfig(max_in_flight=3), None, lambda: dict(cluster), {"CPU": 8}, every_s=0)
    assert fixed.current() == 3 and fixed.cluster["GPU"] == 4  # a fixed cap still sees the GPUs for placement


def test_curation_submits_more_units_as_the_bound_grows(monkeypatch):
    """_stream re-reads the bound each round: a job started on a small cluster fills the nodes that join."""
    import ray

    from difix3d.curate.job import CurateConfig, _stream, in_flight_bound
    from difix3d.fleet.inputs import SceneRef

    now, cluster, in_flight = [0.0], {"CPU": 1}, []

    def wait(refs, num_returns=1, timeout=None):
        in_flight.append(len(refs))
        now[0] += 20.0  # each round takes past every_s
        if len(in_flight) == 2:
            cluster["CPU"] = 8  # a node joined while the first units ran
        return refs[:1], refs[1:]

    monkeypatch.setattr(ray, "wait", wait)
    monkeypatch.setattr(ray, "get", lambda ref: {"status": "done", "pairs": 0, "unit": ref})

    class Task:
        @staticmethod
        def remote(ref, name, config):
            return f"{ref.scene_id}/{name}"

    todo = [(f"s{i}/sparse", SceneRef(f"s{i}", f"/x/s{i}"), "sparse") for i in range(20)]
    bound = in_flight_bound(CurateConfig(), False, lambda: dict(cluster), dict(cluster), clock=lambda: now[0])
    done = [unit for unit, _ in _stream(Task, todo, CurateConfig(), bound, progress=False)]
    assert sorted(done) == sorted(u for u, _, _ in todo)
    assert in_flight[:2] == [2, 2] and max(in_flight) == 8 + 2  # 1 CPU: 1 + 1 queued; 8 CPUs: 8 + 2
