"""The Ray Data evaluation pipeline end to end on a tiny fleet output folder (32×32 images)."""

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from difix3d.eval.config import EvalConfig
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
    assert "cannot decode" in bad.loc[("seg-0", "baseline", "test/000"), "error"]
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
