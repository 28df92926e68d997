"""The fleet driver's orchestration on a local Ray cluster with a stand-in per-scene function (fast): statuses,
retries, a bad scene failing alone, resume after an abandoned run, summary.parquet, local path and file:// outputs."""

import json
import math
import os

import pyarrow.parquet as pq
import pytest

from difix3d import storage
from difix3d.fleet import FleetConfig, run_fleet
from difix3d.fleet.driver import in_flight_limit, plan, scene_task_options
from difix3d.errors import InputError
from difix3d.fleet.inputs import SceneRef


def make_fake_scenes(root, specs: dict[str, dict]) -> str:
    """Scene folders with a ``scene.json`` telling the stand-in how to behave; returns a JSON scene manifest."""
    uris = []
    for name, spec in specs.items():
        d = root / "scenes-in" / name
        (d / "images").mkdir(parents=True)
        (d / "scene.json").write_text(json.dumps(spec))
        uris.append(str(d))
    manifest = root / "scenes.json"
    manifest.write_text(json.dumps(uris))
    return str(manifest)


def fake_scene_fn():
    """A stand-in for the progressive loop, defined in a closure so Ray pickles it by value into its workers.

    It counts its calls per scene in files, fails as its scene.json asks, and returns paper-shaped metrics.
    """

    def scene_fn(scene, out, config, fixer):
        import json as _json
        import os as _os
        import time as _time
        import uuid as _uuid

        from difix3d import storage as _st
        from difix3d.errors import InputError

        spec = _json.loads(_st.read_text(_st.join(scene.uri, "scene.json")))
        calls = _os.path.join(_st.resolve(scene.uri)[1], "calls")
        _os.makedirs(calls, exist_ok=True)
        open(_os.path.join(calls, _uuid.uuid4().hex), "w").close()
        n_calls = len(_os.listdir(calls))
        _time.sleep(spec.get("sleep", 0.0))
        if spec.get("corrupt"):
            raise InputError(_st.join(scene.uri, "images", "000_0.jpg"), "truncated JPEG")
        if n_calls <= spec.get("fail_times", 0):
            raise RuntimeError(f"transient failure {n_calls}")
        assert fixer == "fake-fixer"
        _st.write_json(_st.join(out, "metrics.json"), {"calls": n_calls})
        psnr = spec.get("psnr", 20.0)
        return {"frames_fixed": 4, "timings": {"total": 0.1},
                "metrics": {"test": {"baseline": {"psnr": psnr, "ssim": 0.5},
                                     "difix3d": {"psnr": psnr + 1, "ssim": 0.6},
                                     "difix3d+": {"psnr": psnr + 2, "ssim": 0.7}}}}

    return scene_fn


def calls_of(tmp_path, name) -> int:
    d = tmp_path / "scenes-in" / name / "calls"
    return len(os.listdir(d)) if d.exists() else 0


@pytest.fixture(params=["path", "file_uri"])
def output(request, tmp_path):
    out = tmp_path / "out"
    return str(out) if request.param == "path" else "file://" + str(out)


def test_fleet_mixed_scenes_statuses_retries_and_summary(ray_local, tmp_path, output, capsys):
    scenes = make_fake_scenes(tmp_path, {
        "good": {"psnr": 20.0},
        "good2": {"psnr": 22.0},
        "flaky": {"fail_times": 1, "psnr": 24.0},  # fails once, then succeeds on the retry
        "broken": {"fail_times": 99},  # fails every time: retried up to max_attempts, then failed
        "corrupt": {"corrupt": True},  # bad input: failed at once, no retry
    })
    cfg = FleetConfig(scenes=scenes, output=output, max_attempts=2, progress=False)
    report = run_fleet(cfg, scene_fn=fake_scene_fn(), fixer="fake-fixer")

    assert report.counts == {"done": 3, "failed": 2} and not report.interrupted
    rows = {r["scene_id"]: r for r in report.rows}
    assert rows["flaky"]["attempts"] == 2 and rows["good"]["attempts"] == 1
    assert rows["broken"]["attempts"] == 2 and "transient failure 2" in rows["broken"]["error"]
    assert rows["corrupt"]["attempts"] == 1 and calls_of(tmp_path, "corrupt") == 1
    assert "000_0.jpg" in rows["corrupt"]["error"] and "truncated JPEG" in rows["corrupt"]["error"]
    # outputs of each done scene under <out>/scenes/<id>/, the config, and the manifest records
    for sid in ("good", "good2", "flaky"):
        assert storage.exists(storage.join(output, "scenes", sid, "metrics.json"))
    assert storage.read_json(storage.join(output, "config.json"))["max_attempts"] == 2
    entry = storage.Manifest(output).get("corrupt")
    assert entry.status == "failed" and "Traceback" in entry.info["traceback"]

    table = pq.read_table(storage.bytes_io(storage.join(output, "summary.parquet")))
    assert table.num_rows == 5
    summary = {r["scene_id"]: r for r in table.to_pylist()}
    assert summary["good2"]["test.difix3d+.psnr"] == 24.0 and summary["good"]["test.baseline.ssim"] == 0.5
    assert summary["corrupt"]["status"] == "failed" and summary["corrupt"]["test.baseline.psnr"] is None
    assert summary["good"]["frames_fixed"] == 4 and math.isfinite(summary["good"]["seconds"])

    printed = capsys.readouterr().out
    assert "3 done" in printed and "2 failed" in printed and "failed corrupt" in printed
    mean_line = next(line for line in printed.splitlines() if line.startswith("difix3d+ "))
    assert float(mean_line.split()[1]) == pytest.approx((22 + 24 + 26) / 3)  # mean PSNR over done scenes


def test_abandoned_run_resumes_without_recomputing_finished_scenes(ray_local, tmp_path):
    scenes = make_fake_scenes(tmp_path, {f"s{i}": {"sleep": 0.2} for i in range(4)})
    out = str(tmp_path / "out")
    cfg = FleetConfig(scenes=scenes, output=out, max_in_flight=1, progress=False)
    first = run_fleet(cfg, scene_fn=fake_scene_fn(), fixer="fake-fixer", stop_after=2)
    assert first.interrupted and len(first.ran) == 2 and first.summary_uri is None
    assert sorted(e.status for e in storage.Manifest(out).entries()).count("done") == 2

    second = run_fleet(cfg, scene_fn=fake_scene_fn(), fixer="fake-fixer")
    assert sorted(second.skipped) == sorted(first.ran)
    assert second.counts == {"done": 4}
    for i in range(4):
        assert calls_of(tmp_path, f"s{i}") == 1, f"s{i} recomputed"  # nothing ran twice, even the cancelled one
    # a third run is a no-op that still writes the summary
    third = run_fleet(cfg, scene_fn=fake_scene_fn(), fixer="fake-fixer")
    assert third.ran == [] and len(third.skipped) == 4
    assert pq.read_table(os.path.join(out, "summary.parquet")).num_rows == 4


def test_failed_scenes_stay_failed_unless_retry_failed(ray_local, tmp_path):
    scenes = make_fake_scenes(tmp_path, {"ok": {}, "bad": {"fail_times": 1}})
    out = str(tmp_path / "out")
    cfg = FleetConfig(scenes=scenes, output=out, max_attempts=1, progress=False)
    assert run_fleet(cfg, scene_fn=fake_scene_fn(), fixer="fake-fixer").counts == {"done": 1, "failed": 1}
    again = run_fleet(cfg, scene_fn=fake_scene_fn(), fixer="fake-fixer")
    assert again.ran == [] and again.status_of("bad") == "failed" and calls_of(tmp_path, "bad") == 1
    cfg.retry_failed = True
    retried = run_fleet(cfg, scene_fn=fake_scene_fn(), fixer="fake-fixer")
    assert retried.ran == ["bad"] and retried.counts == {"done": 2}


def test_plan_skips_done_and_exhausted_and_resumes_interrupted(tmp_path):
    m = storage.Manifest(str(tmp_path))
    m.mark("done", "done", attempts=1)
    m.mark("exhausted", "failed", attempts=2, failures=2, error="x")
    m.mark("one-failure", "failed", attempts=1, failures=1, error="x")
    m.mark("interrupted", "running", attempts=3, failures=0)
    m.mark("bad-input", "failed", attempts=1, failures=1, retryable=False, error="x.png: truncated")
    refs = [SceneRef(s, "/x/" + s) for s in ["done", "exhausted", "one-failure", "interrupted", "new", "bad-input"]]
    todo, done = plan(refs, m, FleetConfig(max_attempts=2))
    assert [s.scene_id for s in done] == ["done"]
    assert [(w.scene.scene_id, w.attempts, w.failures) for w in todo] == [
        ("one-failure", 1, 1), ("interrupted", 3, 0), ("new", 0, 0)]  # an interruption is not a failure
    todo, _ = plan(refs, m, FleetConfig(max_attempts=2, retry_failed=True))
    assert [w.scene.scene_id for w in todo] == ["exhausted", "one-failure", "interrupted", "new", "bad-input"]


def test_a_scene_recorded_done_stays_done_when_its_worker_is_lost_after(ray_local, tmp_path):
    def finishes_then_dies(scene, out, config, fixer):
        from difix3d import storage as _st

        _st.Manifest(config.output).mark(scene.scene_id, "done", attempts=1, scene_uri=scene.uri, frames_fixed=3)
        raise RuntimeError("node lost after the scene's done record")  # what the driver sees of a lost worker

    scenes = make_fake_scenes(tmp_path, {"a": {}})
    report = run_fleet(FleetConfig(scenes=scenes, output=str(tmp_path / "out"), progress=False),
                       scene_fn=finishes_then_dies, fixer="fake-fixer")
    assert report.counts == {"done": 1} and report.ran == ["a"]


def test_plan_refuses_an_id_whose_outputs_belong_to_another_scene(tmp_path):
    m = storage.Manifest(str(tmp_path))
    m.mark("seg1", "done", attempts=1, scene_uri="/data/cityB/seg1")
    with pytest.raises(InputError, match="holds scene /data/cityB/seg1, not /data/cityA/seg1"):
        plan([SceneRef("seg1", "/data/cityA/seg1")], m, FleetConfig(output=str(tmp_path)))
    todo, done = plan([SceneRef("seg1", "/data/cityB/./seg1/")], m, FleetConfig(output=str(tmp_path)))
    assert not todo and [s.scene_id for s in done] == ["seg1"]  # the same folder, spelled differently


def test_scenes_keep_the_ids_an_earlier_run_recorded_for_them(tmp_path, monkeypatch):
    from difix3d.fleet.inputs import adopt_recorded_ids

    monkeypatch.chdir(tmp_path)
    m = storage.Manifest(str(tmp_path / "out"))
    m.mark("seg1-1", "done", attempts=1, scene_uri="data/cityB/seg1")  # an older id scheme, a relative spelling
    scenes = [SceneRef("seg1-aaaa", str(tmp_path / "data/cityA/seg1")),
              SceneRef("seg1-bbbb", str(tmp_path / "data/cityB/seg1"))]
    adopted = adopt_recorded_ids(scenes, m)
    assert [s.scene_id for s in adopted] == ["seg1-aaaa", "seg1-1"]
    todo, done = plan(adopted, m, FleetConfig(output=str(tmp_path / "out")))
    assert [s.scene_id for s in done] == ["seg1-1"] and [w.scene.scene_id for w in todo] == ["seg1-aaaa"]


def test_a_rerun_with_other_result_settings_is_refused(tmp_path):
    from difix3d.fleet.driver import check_same_results_settings

    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({**FleetConfig(output=str(out)).to_dict(), "max_in_flight": 3}))
    # no scene recorded yet (a run that stopped before any, e.g. at a mistyped checkpoint): settings may change
    check_same_results_settings(FleetConfig(output=str(out), recon_preset="paper", checkpoint="ck"))
    storage.Manifest(str(out)).mark("seg1", "running", attempts=1)
    check_same_results_settings(FleetConfig(output=str(out), max_in_flight=8, retry_failed=True))  # not results
    with pytest.raises(InputError, match=r"config.json: .*checkpoint None -> 'ck'; recon_preset 'tiny' -> 'paper'"):
        check_same_results_settings(FleetConfig(output=str(out), recon_preset="paper", checkpoint="ck"))


def test_a_set_typo_fails_on_the_driver_before_any_scene(tmp_path):
    cfg = FleetConfig(output=str(tmp_path / "out"), synthetic_scenes=1, extra={"trainer.iteratons": 5})
    with pytest.raises(ValueError, match="iteratons"):
        run_fleet(cfg)
    assert not (tmp_path / "out").exists()  # nothing recorded against any scene, no config.json


def test_report_compares_methods_over_the_same_scenes():
    from difix3d.fleet.summary import format_report

    rows = [{"scene_id": "a", "status": "done", "test.baseline.psnr": 20.0, "test.difix3d.psnr": 21.0},
            {"scene_id": "b", "status": "done", "test.baseline.psnr": 30.0, "test.difix3d.psnr": 32.0},
            {"scene_id": "c", "status": "done", "test.baseline.psnr": 10.0, "test.difix3d.psnr": float("nan")}]
    text = format_report(rows)
    assert "test (mean of 2 of 3 with every method)" in text
    lines = {ln.split()[0]: float(ln.split()[1]) for ln in text.splitlines() if ln.startswith(("baseline", "difix3d"))}
    assert lines == {"baseline": 25.0, "difix3d": 26.5}  # not 20.0 (three scenes) vs 26.5 (two)


def test_scene_resources_and_in_flight_bound():
    cfg = FleetConfig(scene_num_cpus=2, scene_num_gpus=0.25, scene_memory_gb=8, replica_num_gpus=0.5)
    assert scene_task_options(cfg, use_gpu=True) == {"num_cpus": 2, "num_gpus": 0.25, "memory": 8 * 2**30,
                                                     "max_retries": 0}
    assert scene_task_options(cfg, use_gpu=False)["num_gpus"] == 0
    # 8 GPUs: 8 replicas x 0.5 GPU leave 4 GPUs = 16 scene slots; CPUs (64 - 8) / 2 = 28: GPUs bound it
    assert in_flight_limit(cfg, {"CPU": 64, "GPU": 8}, use_gpu=True) == 16 + 4
    # a 2-core laptop: one CPU for the replica, one scene running, one queued
    assert in_flight_limit(FleetConfig(), {"CPU": 2}, use_gpu=False) == 2
    assert in_flight_limit(FleetConfig(max_in_flight=7), {"CPU": 2}, use_gpu=False) == 7
    # tenths of a GPU: 10 scenes on a GPU the pool does not use (1 // 0.1 is 9.0 in floats)
    tenths = FleetConfig(scene_num_cpus=1, scene_num_gpus=0.1, fixer_mode="local")
    assert in_flight_limit(tenths, {"CPU": 64, "GPU": 1}, use_gpu=True) == 10 + 2


def test_in_flight_bound_follows_the_cluster_as_it_grows():
    from difix3d.fleet.driver import in_flight_bound

    now, cluster = [0.0], {"CPU": 4, "GPU": 1}
    cfg = FleetConfig(scene_num_cpus=1, scene_num_gpus=0.25, replica_num_gpus=0.5)
    bound = in_flight_bound(cfg, True, lambda: dict(cluster), dict(cluster), every_s=10, clock=lambda: now[0])
    first = bound.current()
    assert first == in_flight_limit(cfg, {"CPU": 4, "GPU": 1}, use_gpu=True)
    cluster.update(CPU=68, GPU=9)  # the autoscaler added an 8-GPU node
    now[0] = 5.0
    assert bound.current() == first  # not re-read before every_s
    now[0] = 11.0
    assert bound.current() == in_flight_limit(cfg, {"CPU": 68, "GPU": 9}, use_gpu=True) > first
    fixed = in_flight_bound(FleetConfig(max_in_flight=3), True, lambda: dict(cluster), {"CPU": 1}, every_s=0)
    assert fixed.current() == 3


def test_config_roundtrip_and_validation():
    cfg = FleetConfig(scenes="s3://b/segs/*", extra={"rounds": 2})
    assert FleetConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="unknown fields"):
        FleetConfig.from_dict({"nope": 1})
    with pytest.raises(ValueError, match="fixer_mode"):
        FleetConfig(fixer_mode="serve").validate()
    with pytest.raises(ValueError, match="max_attempts"):
        FleetConfig(max_attempts=0).validate()


_KILLED_DRIVER = r"""
import sys, time
import ray
from difix3d.fleet import FleetConfig, run_fleet

def scene_fn(scene, out, config, fixer):
    import os, uuid, time
    from difix3d import storage
    calls = os.path.join(scene.uri, "calls")
    os.makedirs(calls, exist_ok=True)
    open(os.path.join(calls, uuid.uuid4().hex), "w").close()
    time.sleep(1.0 if scene.scene_id == "s0" else 60.0)  # s0 finishes; the others are still running at the kill
    storage.write_json(storage.join(out, "metrics.json"), {})
    return {"frames_fixed": 1, "metrics": {"test": {"baseline": {"psnr": 1.0}}}}

ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
run_fleet(FleetConfig(scenes=sys.argv[1], output=sys.argv[2], max_in_flight=2, scene_num_cpus=1, progress=False),
          scene_fn=scene_fn, fixer="fake-fixer")
"""


@pytest.mark.slow
def test_killed_driver_rerun_keeps_finished_scenes(ray_local, tmp_path):
    """SIGKILL the driver process (its embedded Ray dies with it) after one scene finished; the re-run skips it."""
    import signal
    import subprocess
    import sys
    import time

    scenes = make_fake_scenes(tmp_path, {f"s{i}": {} for i in range(3)})
    out = str(tmp_path / "out")
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_DRIVER, scenes, out], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    manifest = storage.Manifest(out)
    try:
        deadline = time.time() + 90
        while not manifest.is_done("s0"):
            assert proc.poll() is None and time.time() < deadline, "the driver died or never finished s0"
            time.sleep(0.3)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole session: driver and the local Ray it started
        proc.wait()
    assert manifest.get("s1").status == "running"  # interrupted mid-scene
    assert not storage.exists(os.path.join(out, "summary.parquet"))

    report = run_fleet(FleetConfig(scenes=scenes, output=out, progress=False), scene_fn=fake_scene_fn(),
                       fixer="fake-fixer")
    assert report.skipped == ["s0"] and sorted(report.ran) == ["s1", "s2"]
    assert report.counts == {"done": 3}
    assert calls_of(tmp_path, "s0") == 1  # not recomputed
    assert storage.Manifest(out).get("s1").attempts == 2  # the interrupted try plus the resumed one


def test_a_missing_representation_backend_is_bad_input_in_one_line(ray_local, tmp_path, monkeypatch):
    import difix3d.fleet.driver as driver

    monkeypatch.setattr(driver, "backend_problem", lambda name: f"{name} needs nerfstudio: pip install ...")
    cfg = FleetConfig(output=str(tmp_path / "out"), synthetic_scenes=1, synthetic_frames=2, synthetic_height=32,
                      synthetic_width=48, representation="nerfacto")
    with pytest.raises(InputError, match="representation nerfacto: nerfacto needs nerfstudio"):
        run_fleet(cfg, echo=lambda line: None)


def test_the_pool_admits_enough_frames_to_keep_every_replica_busy(monkeypatch):
    from difix3d import pool
    from difix3d.fleet.fixers import inflight_frames, open_fixer

    assert inflight_frames(1) == 64 and inflight_frames(16) == 2 * 16 * 4 * 2
    seen = {}
    monkeypatch.setattr(pool, "get_pool", lambda name: (_ for _ in ()).throw(pool.PoolUnavailableError(name)))
    monkeypatch.setattr(pool, "start_pool", lambda checkpoint, **kw: seen.update(kw) or object())
    open_fixer(FleetConfig(pool_replicas=12), "ck", cluster_gpus=12)
    assert seen["max_replicas"] == 12 and seen["max_inflight_frames"] == 192
    assert seen["compile_mode"] == "default"
    open_fixer(FleetConfig(pool_compile_mode="reduce-overhead"), "ck", cluster_gpus=1)
    assert seen["compile_mode"] == "reduce-overhead"  # CUDA graphs in the replicas, when a user asks
    with pytest.raises(ValueError, match="pool_compile_mode must be one of default, reduce-overhead"):
        FleetConfig(pool_compile_mode="reduce_overhead").validate()
    from difix3d.fixer.runner import COMPILE_MODES
    from difix3d.fleet.cli import _CHOICES, build_parser, config_from_args

    assert _CHOICES["pool_compile_mode"] == COMPILE_MODES  # the flag offers what the runner takes
    args = build_parser().parse_args(["--pool-compile-mode", "reduce-overhead"])
    assert config_from_args(args).pool_compile_mode == "reduce-overhead"


def test_a_set_value_of_the_wrong_kind_names_the_setting(tmp_path):
    from difix3d.fleet.cli import build_parser, config_from_args

    args = build_parser().parse_args(["-o", str(tmp_path / "out"), "--set", "trainer.iterations=abc"])
    cfg = config_from_args(args)
    assert cfg.output == str(tmp_path / "out")
    with pytest.raises(ValueError, match=r"--set trainer.iterations='abc': expected int"):
        run_fleet(cfg)
    cfg = FleetConfig(output=str(tmp_path / "out"), extra={"schedule.step_size": 1})  # an int for a float: fine
    cfg.validate()


def test_a_missing_checkpoint_fails_before_inputs_are_generated(tmp_path, ray_local):
    from difix3d.pool import PoolUnavailableError

    cfg = FleetConfig(output=str(tmp_path / "out"), synthetic_scenes=1, checkpoint=str(tmp_path / "nockpt"))
    with pytest.raises(PoolUnavailableError, match="nockpt: fixer checkpoint does not exist"):
        run_fleet(cfg, echo=lambda line: None)
    assert not (tmp_path / "out").exists()  # no inputs, no config.json: the corrected command starts clean


def test_device_cuda_sizes_a_gpu_pool_before_gpu_nodes_join():
    from difix3d.fleet.fixers import pool_size

    # an autoscaling cluster that has no GPU node yet: the replicas ask for GPUs (the autoscaler adds nodes for them)
    assert pool_size(FleetConfig(device="cuda"), 0.0) == (1, 1, 0.51)
    assert pool_size(FleetConfig(device="cuda", pool_replicas=4, pool_max_replicas=8), 0.0) == (4, 8, 0.51)
    assert pool_size(FleetConfig(), 0.0) == (1, 1, 0.0)  # a laptop: one CPU replica
    assert pool_size(FleetConfig(), 8.0) == (8, 8, 0.51)
    assert pool_size(FleetConfig(device="cpu"), 8.0) == (1, 1, 0.0)
