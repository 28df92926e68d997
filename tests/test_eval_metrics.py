"""Per-view metrics, the missing-weights policy, FID/KID aggregation, rows discovery: no Ray needed."""

import json
import math

import numpy as np
import pytest
import torch

from difix3d.errors import InputError, MissingWeightsError
from difix3d.eval import metrics as M
from difix3d.eval.perceptual import (RandomFeatureNet, build_feature_net, build_lpips, feature_availability,
                                     lpips_availability)
from difix3d.eval.report import describe
from difix3d.eval.rows import load_rows, rows_from_fleet_output
from difix3d.eval.set_metrics import SetMetrics
from difix3d.imageio import write_image


def test_psnr_identical_is_inf_and_known_mse_is_exact():
    x = torch.rand(2, 3, 32, 32)
    assert torch.isinf(M.psnr(x, x)).all()
    y = torch.full((1, 3, 32, 32), 0.5)
    noisy = y + 0.1 * torch.from_numpy(np.where(np.indices((32, 32)).sum(0) % 2 == 0, 1.0, -1.0)).float()
    # MSE = 0.01 exactly → PSNR = 10 log10(1 / 0.01) = 20 dB
    assert M.psnr(noisy, y).item() == pytest.approx(20.0, abs=1e-4)
    two = M.psnr(torch.cat([noisy, y]), torch.cat([y, y]))
    assert two.shape == (2,) and two[0].item() == pytest.approx(20.0, abs=1e-4) and math.isinf(two[1].item())


def test_ssim_identical_is_one_and_noise_lowers_it():
    x = torch.rand(3, 3, 32, 32)
    assert torch.allclose(M.ssim(x, x), torch.ones(3), atol=1e-5)
    noisy = (x + 0.2 * torch.randn_like(x)).clamp(0, 1)
    s = M.ssim(noisy, x)
    assert s.shape == (3,) and (s < 0.95).all()


def test_metrics_reject_mismatched_shapes():
    with pytest.raises(ValueError, match="shape"):
        M.psnr(torch.rand(1, 3, 32, 32), torch.rand(1, 3, 16, 16))


def test_lpips_unavailable_when_backbone_missing(tmp_path):
    a = lpips_availability("alex", "pretrained", hub_dir=str(tmp_path))  # an empty hub: no backbone weights
    assert not a.available and "alexnet-owt-7be5be79.pth" in a.reason and str(tmp_path) in a.reason
    with pytest.raises(MissingWeightsError, match="not found"):
        build_lpips("alex", "pretrained", hub_dir=str(tmp_path))
    assert not lpips_availability("resnet", "pretrained").available


def test_lpips_with_stand_in_backbone():
    model = build_lpips("alex", "random")  # the lpips wheel's linear heads over a random backbone: no download
    x = torch.rand(2, 3, 32, 32)
    assert torch.allclose(M.lpips(model, x, x), torch.zeros(2), atol=1e-6)
    d = M.lpips(model, x, torch.rand(2, 3, 32, 32))
    assert d.shape == (2,) and (d > 0).all()


def test_inception_unavailable_without_weights(tmp_path):
    a = feature_availability("inception", hub_dir=str(tmp_path))
    assert not a.available and ("torch-fidelity" in a.reason or "weights-inception" in a.reason)
    with pytest.raises(MissingWeightsError):
        build_feature_net("inception", hub_dir=str(tmp_path))


def test_fid_of_a_set_against_itself_is_zero_with_a_stand_in_net():
    net = RandomFeatureNet(16)
    assert torch.equal(net(torch.ones(1, 3, 8, 8)), RandomFeatureNet(16)(torch.ones(1, 3, 8, 8)))  # same on workers
    gen = torch.Generator().manual_seed(0)
    imgs = torch.rand(40, 3, 32, 32, generator=gen)
    feats = net(imgs).numpy()
    other = net((imgs * 0.3).clamp(0, 1)).numpy()  # a darker set: its statistics differ
    sets = SetMetrics(("fid", "kid"), kid_subset_size=20, kid_subsets=10)
    sets.update("same", feats[:25], feats[:25])
    sets.update("same", feats[25:], feats[25:])  # streamed in two batches
    sets.update("dark", other, feats)
    res = sets.compute()
    assert res["same"]["fid"] == pytest.approx(0.0, abs=1e-3)
    assert res["dark"]["fid"] > 100 * max(res["same"]["fid"], 1e-4)
    assert abs(res["same"]["kid"]) < 0.01 * res["dark"]["kid"]  # KID is unbiased: ≈ 0 up to subset noise
    assert res["same"]["n"] == 40


def test_set_metrics_too_few_views_reported_not_raised():
    sets = SetMetrics(("fid", "kid"))
    sets.update("one", np.ones((1, 4)), np.ones((1, 4)))
    res = sets.compute()["one"]
    assert math.isnan(res["fid"]) and "at least 2" in res["fid_error"] and math.isnan(res["kid"])


def test_describe_bootstrap_interval_brackets_the_mean():
    x = np.random.default_rng(0).normal(10.0, 1.0, 200)
    d = describe(np.concatenate([x, [np.inf, np.nan]]), resamples=200)
    assert d["n"] == 200 and d["mean"] == pytest.approx(x.mean()) and d["median"] == pytest.approx(np.median(x))
    assert d["ci_low"] < d["mean"] < d["ci_high"] and d["ci_high"] - d["ci_low"] < 0.5
    assert describe([])["n"] == 0 and describe([3.0])["ci_low"] == 3.0


def test_rows_from_fleet_output(tmp_path):
    img = np.zeros((4, 4, 3), np.uint8)
    for scene in ("seg-a", "seg-b"):
        for method in ("gt", "baseline", "difix3d"):
            for view in ("test/000", "test/001"):
                write_image(str(tmp_path / "scenes" / scene / "renders" / method / f"{view}.png"), img)
    write_image(str(tmp_path / "scenes" / "seg-b" / "renders" / "difix3d" / "test" / "002.png"), img)  # no gt
    rows = rows_from_fleet_output(str(tmp_path))
    assert len(rows) == 9
    r = next(r for r in rows if r["segment"] == "seg-a" and r["method"] == "difix3d" and r["view"] == "test/001")
    assert r["render_uri"].endswith("seg-a/renders/difix3d/test/001.png")
    assert r["gt_uri"].endswith("seg-a/renders/gt/test/001.png")
    orphan = next(r for r in rows if r["view"] == "test/002")
    assert orphan["gt_uri"].endswith("seg-b/renders/gt/test/002.png")  # recorded as an error later, not dropped
    assert {r["method"] for r in rows} == {"baseline", "difix3d"}
    assert load_rows(str(tmp_path)) == rows
    with pytest.raises(InputError, match="scenes"):
        rows_from_fleet_output(str(tmp_path / "scenes"))


def test_load_rows_json_jsonl_parquet_and_column_check(tmp_path):
    row = {"segment": 7, "view": "test/000", "method": "m", "render_uri": "r.png", "gt_uri": "g.png", "extra": 1}
    (tmp_path / "rows.json").write_text(json.dumps([row]))
    (tmp_path / "rows.jsonl").write_text(json.dumps(row) + "\n\n" + json.dumps(row) + "\n")
    expected = {**{k: str(v) for k, v in row.items() if k != "extra"}}
    assert load_rows(str(tmp_path / "rows.json")) == [expected]
    assert load_rows(str(tmp_path / "rows.jsonl")) == [expected, expected]
    assert load_rows(str(tmp_path / "rows.parquet")) == str(tmp_path / "rows.parquet")  # Ray Data streams it
    (tmp_path / "bad.json").write_text('[{"segment": "s", "view": "v", "method": "m", "render_uri": "a.png"}]')
    with pytest.raises(InputError, match="gt_uri"):
        load_rows(str(tmp_path / "bad.json"))


def test_job_arguments_build_the_config():
    import argparse

    from difix3d.eval.cli import add_arguments, config_from_args

    p = argparse.ArgumentParser()
    add_arguments(p)
    cfg = config_from_args(p.parse_args(["--input", "s3://b/fleet", "--output", "s3://b/eval", "--metrics",
                                         "psnr,ssim,fid", "--workers", "8", "--num-gpus-per-worker", "0.5"]))
    assert cfg.metrics == ("psnr", "ssim", "fid") and cfg.workers == 8 and cfg.num_gpus_per_worker == 0.5
    assert cfg.min_workers == 1 and not cfg.overwrite
    with pytest.raises(ValueError, match="unknown metrics"):
        config_from_args(p.parse_args(["--input", "a", "--output", "b", "--metrics", "psnr,mse"]))


@pytest.mark.gpu
def test_cuda_metrics_match_cpu():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(2, 3, 64, 96, generator=gen), torch.rand(2, 3, 64, 96, generator=gen)
    model = build_lpips("alex", "random")
    for fn in (M.psnr, M.ssim):
        assert torch.allclose(fn(x.cuda(), y.cuda()).cpu(), fn(x, y), rtol=1e-4, atol=1e-4)
    assert torch.allclose(M.lpips(model.cuda(), x.cuda(), y.cuda()).cpu(), M.lpips(model.cpu(), x, y), atol=1e-4)
