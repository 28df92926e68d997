"""The Ray Data evaluation pipeline end to end on a tiny fleet output folder (32×32 images)."""

import json
import logging
import math
import os
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from difix3d.errors import InputError
from difix3d.eval.config import EvalConfig
from difix3d.eval.perceptual import hub_checkpoint
from difix3d.eval.pipeline import evaluate
from difix3d.imageio import write_image

SEGMENTS, VIEWS = ("seg-0", "seg-1", "seg-2"), ("test/000", "test/001", "test/002")
NOISE = {"baseline": 0.12, "difix3d": 0.04}


@pytest.fixture(scope="module")
def fleet_out(tmp_path_factory):
    """renders/{gt,baseline,difix3d,difix3d_plus}; difix3d_plus = exact copies of gt; one corrupt baseline render,
    one size-mismatched difix3d render."""
    root = tmp_path_factory.mktemp("fleet")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:32, 0:32] / 31.0
    for s, seg in enumerate(SEGMENTS):
        base = root / "scenes" / seg / "renders"
        for v, view in enumerate(VIEWS):
            phase = rng.uniform(0, 6)
            gt = np.stack([np.sin(3 * xx + phase), np.cos(2 * yy + phase), xx * yy], -1) * 0.4 + 0.5
            write_image(str(base / "gt" / f"{view}.png"), (gt * 255).round().astype(np.uint8))
            write_image(str(base / "difix3d_plus" / f"{view}.png"), (gt * 255).round().astype(np.uint8))
            for method, sigma in NOISE.items():
                noisy = np.clip(gt + rng.normal(0, sigma, gt.shape), 0, 1)
                write_image(str(base / method / f"{view}.png"), (noisy * 255).round().astype(np.uint8))
    (root / "scenes/seg-0/renders/baseline/test/000.png").write_bytes(b"not a png at all")
    write_image(str(root / "scenes/seg-1/renders/difix3d/test/001.png"), np.zeros((16, 16, 3), np.uint8))
    return root


@pytest.fixture(scope="module")
def evaluated(fleet_out, tmp_path_factory, ray_local):
    out = tmp_path_factory.mktemp("eval")
    empty_hub = tmp_path_factory.mktemp("hub")  # no LPIPS backbone here: LPIPS must be reported unavailable
    cfg = EvalConfig(input=str(fleet_out), output=str(out), metrics=("psnr", "ssim", "lpips", "fid", "kid"),
                     hub_dir=str(empty_hub), fid_features="random", random_feature_dim=16, workers=2,
                     batch_size=4, bootstrap_resamples=200, kid_subset_size=4, kid_subsets=5, examples_per_end=2)
    return cfg, evaluate(cfg)


def test_per_view_rows_with_errors_recorded_not_fatal(evaluated):
    cfg, result = evaluated
    df = pq.read_table(f"{cfg.output}/per_view.parquet").to_pandas()
    assert len(df) == result.n_views == 27 and result.n_errors == 2
    bad = df[df["status"] == "error"].set_index(["segment", "method", "view"])
    assert "not a readable image" in bad.loc[("seg-0", "baseline", "test/000"), "error"]
    assert "size mismatch" in bad.loc[("seg-1", "difix3d", "test/001"), "error"]
    assert bad["psnr"].isna().all()
    ok = df[df["status"] == "ok"]
    assert (ok["height"] == 32).all() and ok["ssim"].notna().all()
    assert np.isinf(ok[ok["method"] == "difix3d_plus"]["psnr"]).all()  # exact copies
    assert (ok[ok["method"] == "difix3d_plus"]["ssim"] > 0.9999).all()
    means = ok[ok["method"] != "difix3d_plus"].groupby("method")["psnr"].mean()
    assert means["difix3d"] > means["baseline"] + 5  # σ 0.04 vs 0.12 noise: ~9.5 dB apart
    assert df["lpips"].isna().all()


def test_unavailable_metric_named_with_reason_others_go_on(evaluated):
    cfg, result = evaluated
    assert set(result.unavailable) == {"lpips"} and "alexnet" in result.unavailable["lpips"]
    md = open(f"{cfg.output}/summary.md").read()
    assert "lpips" in md and "unavailable" in md and "PSNR" in md


def test_fid_zero_for_exact_copies_and_larger_for_noisier_method(evaluated):
    _, result = evaluated
    fid = {m: r["fid"] for m, r in result.set_metrics.items()}
    assert fid["difix3d_plus"] == pytest.approx(0.0, abs=1e-3)
    assert fid["baseline"] > fid["difix3d"] > 1e-3
    assert result.set_metrics["baseline"]["n"] == 8  # the corrupt view is left out
    assert all(math.isfinite(r["kid"]) for r in result.set_metrics.values())


def test_reports_exist_and_summary_matches_per_view(evaluated):
    cfg, result = evaluated
    out = cfg.output
    for name in ("per_segment.parquet", "summary.md", "summary.json", "set_metrics.json", "config.json",
                 "plots/distributions.png", "plots/segment_improvement.png", "plots/examples_difix3d.png"):
        assert (Path(out) / name).stat().st_size > 0, name
    df = pq.read_table(f"{out}/per_view.parquet").to_pandas()
    summary = json.load(open(f"{out}/summary.json"))["methods"]
    for method in ("baseline", "difix3d"):
        vals = df[(df["method"] == method) & (df["status"] == "ok")]["psnr"]
        s = summary[method]["psnr"]
        assert s["n"] == len(vals) and s["mean"] == pytest.approx(vals.mean()) and \
            s["median"] == pytest.approx(vals.median())
        assert s["ci_low"] <= s["mean"] <= s["ci_high"]
        assert summary[method]["n_errors"] == 1 and summary[method]["fid"] == result.set_metrics[method]["fid"]
    assert summary["difix3d_plus"]["psnr"]["n"] == 0 and summary["difix3d_plus"]["psnr"]["n_inf"] == 9
    seg = pd.read_parquet(f"{out}/per_segment.parquet")
    row = seg[(seg["segment"] == "seg-1") & (seg["method"] == "difix3d")].iloc[0]
    ok = df[(df["segment"] == "seg-1") & (df["method"] == "difix3d") & (df["status"] == "ok")]
    assert row["n_views"] == 3 and row["n_errors"] == 1 and row["psnr"] == pytest.approx(ok["psnr"].mean())
    assert f"{summary['baseline']['psnr']['mean']:.2f}" in open(f"{out}/summary.md").read()


def test_rerun_reuses_outputs_unless_overwrite(evaluated):
    cfg, first = evaluated
    again = evaluate(cfg)  # per_view + set metrics exist: no Ray work
    assert again.skipped and again.n_views == first.n_views and again.set_metrics == first.set_metrics


def test_a_rerun_says_when_a_metric_unavailable_before_is_available_now(evaluated, monkeypatch, caplog):
    from difix3d.eval import pipeline
    from difix3d.eval.perceptual import Availability

    cfg, first = evaluated
    assert "lpips" in first.unavailable
    monkeypatch.setattr(pipeline, "worker_metric_availability",
                        lambda c: {m: Availability(True) for m in c.metrics})  # its weights were fetched since
    with caplog.at_level(logging.WARNING):
        again = evaluate(cfg)
    assert again.skipped and "lpips were unavailable" in caplog.text and "--overwrite" in caplog.text


def test_an_interrupted_run_resumes_from_its_parts(evaluated, tmp_path, monkeypatch, caplog):
    from difix3d.eval import parts as parts_mod

    cfg, full = evaluated
    cfg = replace(cfg, output=str(tmp_path / "out"))
    monkeypatch.setattr(parts_mod, "PART_ROWS", 4)
    original_add, calls = parts_mod.PartStore.add, []

    def add_then_die(self, table):
        calls.append(table.num_rows)
        if sum(calls) > 9:
            raise KeyboardInterrupt  # the driver is stopped mid-run
        original_add(self, table)

    monkeypatch.setattr(parts_mod.PartStore, "add", add_then_die)
    with pytest.raises(KeyboardInterrupt):
        evaluate(cfg)
    kept = sorted((tmp_path / "out" / parts_mod.PARTS_DIR).glob("part-*.parquet"))
    assert kept and not (tmp_path / "out" / "per_view.parquet").exists()
    monkeypatch.setattr(parts_mod.PartStore, "add", original_add)
    with caplog.at_level("INFO", logger="difix3d.eval.pipeline"):
        resumed = evaluate(cfg)
    assert f"resuming: {4 * len(kept)} views already scored" in caplog.text
    assert not (tmp_path / "out" / parts_mod.PARTS_DIR).exists()  # merged and removed
    key = ["segment", "split", "view", "method"]
    a = pq.read_table(tmp_path / "out" / "per_view.parquet").to_pandas().sort_values(key).reset_index(drop=True)
    b = pq.read_table(os.path.join(full.output, "per_view.parquet")).to_pandas().sort_values(key).reset_index(drop=True)
    assert len(a) == len(b) == full.n_views
    np.testing.assert_allclose(a["psnr"].to_numpy(), b["psnr"].to_numpy())
    for method, r in full.set_metrics.items():
        assert resumed.set_metrics[method]["fid"] == pytest.approx(r["fid"], rel=1e-4)  # summed in another order
    with pytest.raises(InputError, match="kid_subsets: 5 -> 6"):  # parts of other settings are not mixed in
        monkeypatch.setattr(parts_mod.PartStore, "add", add_then_die)
        calls.clear()
        other = replace(cfg, output=str(tmp_path / "out2"))
        with pytest.raises(KeyboardInterrupt):
            evaluate(other)
        evaluate(replace(other, kid_subsets=6))


def test_parquet_rows_input_with_stand_in_lpips(fleet_out, tmp_path, ray_local):
    rows = [{"segment": "s", "view": f"v{i}", "method": m,
             "render_uri": str(fleet_out / f"scenes/seg-2/renders/{m}/test/00{i}.png"),
             "gt_uri": str(fleet_out / f"scenes/seg-2/renders/gt/test/00{i}.png")}
            for i in range(3) for m in ("baseline", "difix3d_plus")]
    rows.append({**rows[0], "view": "missing", "render_uri": str(tmp_path / "nope.png")})
    pd.DataFrame(rows).to_parquet(tmp_path / "rows.parquet")  # read by ray.data.read_parquet
    cfg = EvalConfig(input=str(tmp_path / "rows.parquet"), output=str(tmp_path / "out"), metrics="psnr,lpips",
                     lpips_weights="random", workers=1, batch_size=8, bootstrap_resamples=100)
    result = evaluate(cfg)
    df = pq.read_table(str(tmp_path / "out/per_view.parquet")).to_pandas()
    assert result.unavailable == {} and result.n_errors == 1
    assert "not found" in df[df["view"] == "missing"]["error"].iloc[0]
    ok = df[df["status"] == "ok"]
    assert (ok[ok["method"] == "difix3d_plus"]["lpips"].abs() < 1e-6).all()
    assert (ok[ok["method"] == "baseline"]["lpips"] > 0).all() and ok["ssim"].isna().all()
    assert (tmp_path / "out/plots/examples_baseline.png").exists()
    assert set(df["split"]) == {"all"}  # no split column in the rows file
    pd.DataFrame(rows + [{**rows[1], "view": "v9"}]).to_parquet(tmp_path / "rows.parquet")  # one more row
    with pytest.raises(InputError, match=r"input rows changed.*--overwrite") as e:
        evaluate(cfg)
    assert e.value.source == str(tmp_path / "out")


def test_rerun_with_other_metric_settings_is_refused(evaluated):
    cfg, _ = evaluated
    with pytest.raises(InputError, match=r"kid_subset_size: 4 -> 8.*--overwrite") as e:
        evaluate(replace(cfg, kid_subset_size=8))
    assert e.value.source == cfg.output
    assert evaluate(replace(cfg, workers=1, batch_size=2)).skipped  # worker settings do not change the numbers


def test_outputs_without_fingerprint_are_reused_with_a_warning(evaluated, tmp_path, caplog):
    cfg, first = evaluated
    old = tmp_path / "old"
    shutil.copytree(cfg.output, old)
    saved = json.loads((old / "set_metrics.json").read_text())  # as an older version wrote it
    (old / "set_metrics.json").write_text(json.dumps({k: saved[k] for k in ("methods", "unavailable")}))
    pq.write_table(pq.read_table(old / "per_view.parquet").drop(["split"]), old / "per_view.parquet")
    with caplog.at_level(logging.WARNING):
        again = evaluate(replace(cfg, output=str(old)))
    assert again.skipped and again.n_views == first.n_views and "no fingerprint" in caplog.text
    assert list(json.loads((old / "summary.json").read_text())["splits"]) == ["all"]


@pytest.fixture(scope="module")
def split_fleet(tmp_path_factory):
    """Two segments, splits test and shift_1m, two views each: difix3d beats the baseline on test and loses to it
    on shift_1m (the lane-shift regression that pooling hides)."""
    root = tmp_path_factory.mktemp("split_fleet")
    rng = np.random.default_rng(1)
    noise = {("test", "baseline"): 0.12, ("test", "difix3d"): 0.02,
             ("shift_1m", "baseline"): 0.05, ("shift_1m", "difix3d"): 0.10}
    for seg in ("seg-0", "seg-1"):
        for split in ("test", "shift_1m"):
            for view in ("000", "001"):
                gt = rng.uniform(0.2, 0.8, (32, 32, 3))
                base = root / "scenes" / seg / "renders"
                write_image(str(base / "gt" / split / f"{view}.png"), (gt * 255).round().astype(np.uint8))
                for method in ("baseline", "difix3d"):
                    noisy = np.clip(gt + rng.normal(0, noise[split, method], gt.shape), 0, 1)
                    write_image(str(base / method / split / f"{view}.png"), (noisy * 255).round().astype(np.uint8))
    return root


def test_splits_reported_separately_with_set_sizes(split_fleet, tmp_path, ray_local):
    cfg = EvalConfig(input=str(split_fleet), output=str(tmp_path), metrics="psnr,fid,kid", fid_features="random",
                     random_feature_dim=16, kid_subsets=5, workers=1, batch_size=8, bootstrap_resamples=100)
    result = evaluate(cfg)
    df = pq.read_table(tmp_path / "per_view.parquet").to_pandas()
    assert sorted(df["split"].unique()) == ["shift_1m", "test"] and result.n_views == 16
    seg = pd.read_parquet(tmp_path / "per_segment.parquet")
    assert len(seg) == 8 and (seg["n_views"] == 2).all()  # (segment, split, method)
    summary = json.loads((tmp_path / "summary.json").read_text())
    psnr = {s: {m: e["psnr"]["mean"] for m, e in methods.items()} for s, methods in summary["splits"].items()}
    assert psnr["test"]["difix3d"] > psnr["test"]["baseline"] and \
        psnr["shift_1m"]["difix3d"] < psnr["shift_1m"]["baseline"]
    assert summary["methods"]["difix3d"]["n_views"] == 8  # pooled, kept for compatibility
    assert summary["splits"]["test"]["difix3d"]["fid_kid_n"] == 4 and summary["methods"]["difix3d"]["fid_kid_n"] == 8
    assert summary["splits"]["test"]["difix3d"]["fid"] == result.split_set_metrics["test"]["difix3d"]["fid"]
    assert result.split_set_metrics["test"]["difix3d"]["fid"] != result.set_metrics["difix3d"]["fid"]
    assert "rank-deficient" in summary["splits"]["test"]["difix3d"]["fid_note"]  # 4 views < 16 features
    assert "meaningless" in summary["methods"]["baseline"]["kid_note"]  # subset 1000 -> the whole set of 8
    md = (tmp_path / "summary.md").read_text()
    assert md.index("## Split `shift_1m`") < md.index("## Split `test`") < md.index("## All splits")
    assert "FID/KID views" in md and "rank-deficient" in md and "meaningless" in md
    for name in ("distributions", "distributions_test", "distributions_shift_1m", "segment_improvement_shift_1m"):
        assert (tmp_path / "plots" / f"{name}.png").stat().st_size > 0, name


def test_pretrained_weights_checked_where_the_workers_run(fleet_out, tmp_path, monkeypatch, ray_local):
    """The driver sees LPIPS weights its workers lack (a CPU head unlike its GPU workers): the workers' view wins."""
    url = "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"
    if os.path.isfile(hub_checkpoint(url)):
        pytest.skip("the workers' torch hub has the AlexNet weights")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "driver_torch"))  # the driver only: workers are running
    Path(hub_checkpoint(url)).parent.mkdir(parents=True)
    Path(hub_checkpoint(url)).write_bytes(b"driver-only weights")
    rows = [{"segment": "s", "view": "test/000", "method": "baseline",
             "render_uri": str(fleet_out / "scenes/seg-2/renders/baseline/test/000.png"),
             "gt_uri": str(fleet_out / "scenes/seg-2/renders/gt/test/000.png")}]
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    result = evaluate(EvalConfig(input=str(tmp_path / "rows.json"), output=str(tmp_path / "out"),
                                 metrics="psnr,lpips", workers=1, bootstrap_resamples=10))
    assert set(result.unavailable) == {"lpips"} and "driver_torch" not in result.unavailable["lpips"]
    assert result.n_errors == 0


def test_input_problems_raised_before_any_ray_work(tmp_path):
    (tmp_path / "fleet" / "scenes").mkdir(parents=True)
    with pytest.raises(InputError, match="no renders found") as e:
        evaluate(EvalConfig(input=str(tmp_path / "fleet"), output=str(tmp_path / "out")))
    assert e.value.source == str(tmp_path / "fleet")
    pd.DataFrame([{"segment": "s", "view": "v", "method": "m", "render_uri": "r.png"}]).to_parquet(
        tmp_path / "rows.parquet")
    with pytest.raises(InputError, match=r"rows\.parquet.*\['gt_uri'\]"):
        evaluate(EvalConfig(input=str(tmp_path / "rows.parquet"), output=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()


def test_a_metric_that_fails_on_a_group_keeps_the_others_and_names_the_file(tmp_path):
    from difix3d.eval.pipeline import MetricsUDF
    from difix3d.imageio import write_image

    rng = np.random.default_rng(0)
    rows = []
    for i, size in enumerate([(64, 64), (24, 24)]):  # 24 px is below what AlexNet's LPIPS layers can take
        gt = rng.integers(0, 255, (*size, 3), dtype=np.uint8)
        render = np.clip(gt.astype(int) + rng.integers(-10, 10, gt.shape), 0, 255).astype(np.uint8)
        write_image(str(tmp_path / f"gt{i}.png"), gt)
        write_image(str(tmp_path / f"r{i}.png"), render)
        rows.append(dict(segment="s", view=f"v{i}", method="m", render_uri=str(tmp_path / f"r{i}.png"),
                         gt_uri=str(tmp_path / f"gt{i}.png")))
    batch = {k: np.array([r[k] for r in rows], dtype=object) for k in rows[0]}
    out = MetricsUDF(("psnr", "ssim", "lpips"), lpips_weights="random")(batch)
    assert out["status"][0] == "ok" and np.isfinite(out["lpips"][0])
    assert out["status"][1] == "error" and np.isnan(out["lpips"][1])
    assert 25 < out["psnr"][1] < 40 and 0 < out["ssim"][1] <= 1  # kept in the per-view table
    assert out["error"][1].startswith(rows[1]["render_uri"]) and "lpips failed on 24x24 images" in out["error"][1]
