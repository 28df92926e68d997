"""Per-view metrics, the missing-weights policy, FID/KID aggregation, rows discovery: no Ray needed."""

import json
import math
import os

import logging

import numpy as np
import pandas as pd
import pytest
import torch

from difix3d.errors import InputError, MissingWeightsError
from difix3d.eval import metrics as M
from difix3d.eval.perceptual import (RandomFeatureNet, build_feature_net, build_lpips, feature_availability,
                                     lpips_availability)
from difix3d.eval.report import describe
from difix3d.eval.rows import ParquetRows, load_rows, rows_from_fleet_output
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


def test_a_view_a_method_has_no_render_for_is_a_row_not_a_gap(tmp_path):
    img = np.zeros((4, 4, 3), np.uint8)
    for scene, methods in (("seg-a", ("gt", "baseline", "difix3d")), ("seg-b", ("gt", "baseline"))):
        for method in methods:
            for view in ("test/000", "test/001"):
                if (scene, method, view) != ("seg-a", "difix3d", "test/001"):  # its hard view failed to render
                    write_image(str(tmp_path / "scenes" / scene / "renders" / method / f"{view}.png"), img)
    rows = rows_from_fleet_output(str(tmp_path))
    assert len(rows) == 8  # 2 scenes x 2 methods x 2 views: seg-b's difix3d folder is missing altogether
    missing = [r for r in rows if r["method"] == "difix3d" and not os.path.exists(r["render_uri"])]
    assert sorted((r["segment"], r["view"]) for r in missing) == [("seg-a", "test/001"), ("seg-b", "test/000"),
                                                                   ("seg-b", "test/001")]
    assert missing[0]["render_uri"].endswith("seg-a/renders/difix3d/test/001.png")


def test_views_listed_twice_are_refused_and_a_rewritten_parquet_file_is_seen(tmp_path):
    from difix3d.eval.config import EvalConfig
    from difix3d.eval.fingerprint import fingerprint

    row = {"segment": "s", "view": "test/000", "method": "m", "render_uri": "r1/a.png", "gt_uri": "g.png"}
    (tmp_path / "dup.json").write_text(json.dumps([row, {**row, "render_uri": "r1/b.png"}]))
    with pytest.raises(InputError, match="view listed twice: segment 's', split 'all', view 'test/000'"):
        load_rows(str(tmp_path / "dup.json"))
    pd.DataFrame([row, row]).to_parquet(tmp_path / "dup.parquet")
    with pytest.raises(InputError, match="view listed twice"):
        load_rows(str(tmp_path / "dup.parquet"))
    cfg = EvalConfig(input="in", output=str(tmp_path), metrics="psnr")
    pd.DataFrame([row]).to_parquet(tmp_path / "rows.parquet")
    first = fingerprint(cfg, load_rows(str(tmp_path / "rows.parquet")))
    pd.DataFrame([{**row, "render_uri": "r2/a.png"}]).to_parquet(tmp_path / "rows.parquet")  # same size, new run
    assert fingerprint(cfg, load_rows(str(tmp_path / "rows.parquet")))["rows"] != first["rows"]


def test_intervals_resample_whole_segments():
    rng = np.random.default_rng(0)
    segment_effect = rng.normal(0, 2.0, 30)
    x = np.concatenate([20 + e + rng.normal(0, 1.0, 40) for e in segment_effect])
    groups = np.repeat([f"seg{i}" for i in range(30)], 40)
    by_view = describe(x, resamples=500)
    by_segment = describe(x, resamples=500, groups=groups)
    assert by_segment["mean"] == pytest.approx(x.mean())
    width = lambda d: d["ci_high"] - d["ci_low"]  # noqa: E731
    assert width(by_segment) > 3 * width(by_view)  # 2 dB between segments dominates: ~0.7 dB wide, not ~0.2
    assert by_segment["ci_low"] < x.mean() < by_segment["ci_high"]
    one = describe(x[:40], resamples=200, groups=groups[:40])  # one segment: its views are the unit
    assert one["ci_low"] < one["mean"] < one["ci_high"]


def test_inception_features_resize_as_the_original_fid_code(monkeypatch):
    from torchmetrics.image.fid import NoTrainInceptionV3

    from difix3d.eval.perceptual import InceptionFeatures

    built = []

    def record(self, *args, **kwargs):  # no weights here: only how the network is built matters
        built.append(kwargs.get("antialias", True))
        raise RuntimeError("stop")

    monkeypatch.setattr(NoTrainInceptionV3, "__init__", record)
    with pytest.raises(RuntimeError, match="stop"):
        InceptionFeatures("weights.pth")
    assert built == [False]  # torch-fidelity's and pytorch-fid's resize, not torchmetrics' antialiased one


def test_load_rows_json_jsonl_parquet_and_column_check(tmp_path):
    row = {"segment": 7, "view": "test/000", "method": "m", "render_uri": "r.png", "gt_uri": "g.png", "extra": 1}
    (tmp_path / "rows.json").write_text(json.dumps([row]))
    other = {**row, "view": "test/001"}
    (tmp_path / "rows.jsonl").write_text(json.dumps(row) + "\n\n" + json.dumps(other) + "\n")
    expected = {**{k: str(v) for k, v in row.items() if k != "extra"}, "split": "all"}
    assert load_rows(str(tmp_path / "rows.json")) == [expected]
    assert load_rows(str(tmp_path / "rows.jsonl")) == [expected, {**expected, "view": "test/001"}]
    pd.DataFrame([row]).to_parquet(tmp_path / "rows.parquet")
    parquet = load_rows(str(tmp_path / "rows.parquet"))  # checked here, streamed by Ray Data
    assert isinstance(parquet, ParquetRows) and parquet.uri == str(tmp_path / "rows.parquet")
    assert len(parquet.files) == 1 and parquet.files[0][1] > 0 and not parquet.has_split
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


def test_rows_carry_the_split_from_the_fleet_layout_or_the_rows_file(tmp_path):
    img = np.zeros((4, 4, 3), np.uint8)
    for method in ("gt", "difix3d"):
        for view in ("test/000", "shift_1m/000"):
            write_image(str(tmp_path / "fleet" / "scenes" / "s" / "renders" / method / f"{view}.png"), img)
    rows = rows_from_fleet_output(str(tmp_path / "fleet"))
    assert sorted((r["split"], r["view"]) for r in rows) == [("shift_1m", "shift_1m/000"), ("test", "test/000")]
    row = {"segment": "s", "view": "shift_2m/000", "method": "m", "render_uri": "r.png", "gt_uri": "g.png"}
    (tmp_path / "rows.json").write_text(json.dumps([row, {**row, "split": "shift_3m"}]))
    # no split field: "all", never guessed from the view name
    assert [r["split"] for r in load_rows(str(tmp_path / "rows.json"))] == ["all", "shift_3m"]
    pd.DataFrame([{**row, "split": "test"}]).to_parquet(tmp_path / "rows.parquet")
    assert load_rows(str(tmp_path / "rows.parquet")).has_split


def test_parquet_rows_missing_columns_named_on_the_driver(tmp_path):
    row = {"segment": "s", "view": "v", "method": "m", "render_uri": "r.png", "gt_uri": "g.png"}
    pd.DataFrame([{k: v for k, v in row.items() if k not in ("gt_uri", "method")}]).to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(InputError, match=r"bad\.parquet.*\['method', 'gt_uri'\]"):
        load_rows(str(tmp_path / "bad.parquet"))
    folder = tmp_path / "shards"
    folder.mkdir()
    pd.DataFrame([row]).to_parquet(folder / "part-0.parquet")
    pd.DataFrame([{k: v for k, v in row.items() if k != "view"}]).to_parquet(folder / "part-1.parquet")
    with pytest.raises(InputError, match=r"part-1\.parquet.*\['view'\]"):
        load_rows(str(folder))
    (folder / "part-1.parquet").unlink()
    assert [path.endswith("part-0.parquet") for path, _ in load_rows(str(folder)).files] == [True]
    with pytest.raises(InputError, match="not found"):
        load_rows(str(tmp_path / "nope.parquet"))


def test_input_without_rows_is_an_error(tmp_path):
    (tmp_path / "fleet" / "scenes" / "seg-0" / "renders" / "gt").mkdir(parents=True)
    with pytest.raises(InputError, match="no renders found") as e:
        load_rows(str(tmp_path / "fleet"))
    assert e.value.source == str(tmp_path / "fleet")
    (tmp_path / "rows.json").write_text("[]")
    with pytest.raises(InputError, match="no renders found"):
        load_rows(str(tmp_path / "rows.json"))
    pd.DataFrame({c: pd.Series([], dtype=str) for c in ("segment", "view", "method", "render_uri", "gt_uri")}) \
        .to_parquet(tmp_path / "rows.parquet")
    with pytest.raises(InputError, match="no renders found"):
        load_rows(str(tmp_path / "rows.parquet"))


def test_set_metrics_notes_for_sets_smaller_than_the_features_or_the_kid_subset(caplog):
    rng = np.random.default_rng(0)
    sets = SetMetrics(("fid", "kid"), kid_subset_size=10, kid_subsets=5)
    sets.update("tiny", rng.normal(size=(6, 16)), rng.normal(size=(6, 16)))  # 6 views, 16-d features
    sets.update(("shift_1m", "big"), rng.normal(size=(40, 16)), rng.normal(size=(40, 16)))
    with caplog.at_level(logging.WARNING):
        res = sets.compute()
    assert res["tiny"]["n"] == 6 and "rank-deficient" in res["tiny"]["fid_note"]
    assert "meaningless" in res["tiny"]["kid_note"] and res["tiny"]["kid_std"] == pytest.approx(0.0, abs=1e-12)
    assert "fid_note" not in res[("shift_1m", "big")] and "kid_note" not in res[("shift_1m", "big")]
    assert "tiny: FID over 6 views" in caplog.text and "tiny: KID subsets of 6 views" in caplog.text
    assert "shift_1m/big" not in caplog.text


def test_fingerprint_follows_metric_settings_and_rows_not_worker_counts(tmp_path, caplog):
    from dataclasses import replace

    from difix3d.eval.config import EvalConfig
    from difix3d.eval.fingerprint import check_reusable, fingerprint

    rows = [{"segment": "s", "split": "test", "view": "test/000", "method": "m", "render_uri": "r.png",
             "gt_uri": "g.png"}]
    cfg = EvalConfig(input="in", output=str(tmp_path), metrics="psnr,fid", fid_features="random")
    saved = json.loads(json.dumps(fingerprint(cfg, rows)))  # as read back from set_metrics.json
    check_reusable(cfg.output, saved, fingerprint(replace(cfg, workers=8, min_workers=2, batch_size=4), rows))
    with pytest.raises(InputError, match=r"kid_subsets: 100 -> 7.*--overwrite") as e:
        check_reusable(cfg.output, saved, fingerprint(replace(cfg, kid_subsets=7), rows))
    assert e.value.source == str(tmp_path)
    with pytest.raises(InputError, match=r"metrics: \['psnr', 'fid'\] -> \['psnr'\]"):
        check_reusable(cfg.output, saved, fingerprint(replace(cfg, metrics=("psnr",)), rows))
    with pytest.raises(InputError, match=r"input rows changed \(1 -> 1"):
        check_reusable(cfg.output, saved, fingerprint(cfg, [{**rows[0], "split": "shift_1m"}]))
    with caplog.at_level(logging.WARNING):
        check_reusable(cfg.output, None, fingerprint(cfg, rows))  # written before fingerprints: reused, warned
    assert "no fingerprint" in caplog.text


def test_summary_markdown_one_table_per_split_and_pooled():
    from difix3d.eval.report import summary_markdown

    def entry(psnr, fid, n):
        return {"n_views": n, "n_errors": 0, "fid": fid, "fid_kid_n": n,
                "psnr": {"n": n, "n_inf": 0, "mean": psnr, "median": psnr, "ci_low": psnr, "ci_high": psnr}}

    splits = {"shift_1m": {"difix3d": entry(17.0, 30.0, 4)}, "test": {"difix3d": entry(25.0, 10.0, 4)}}
    md = summary_markdown({"difix3d": entry(21.0, 20.0, 8)}, ["psnr"], ["fid"], {}, 0.95, splits)
    sections = md.split("## ")[1:]
    assert [s.splitlines()[0] for s in sections] == ["Split `shift_1m`", "Split `test`", "All splits (pooled)"]
    assert "17.00" in sections[0] and "25.00" in sections[1] and "21.00" in sections[2]
    assert "FID/KID views" in sections[0] and "| 30.00 | 4 |" in sections[0] and "| 20.00 | 8 |" in sections[2]
    one = summary_markdown(splits["test"], ["psnr"], ["fid"], {}, 0.95, {"test": splits["test"]})
    assert "Split `test`" in one and "All splits" not in one and "over different views" not in one
    failed = {"baseline": entry(20.0, 30.0, 4), "difix3d": {**entry(30.0, 10.0, 4), "n_errors": 2}}
    assert "statistics are over different views" in summary_markdown(failed, ["psnr"], ["fid"], {}, 0.95)
    assert "**FID/KID from stand-in networks**" in summary_markdown(failed, ["psnr"], ["fid"], {}, 0.95, None,
                                                                    ["FID/KID"])


@pytest.mark.gpu
def test_cuda_metrics_match_cpu():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(2, 3, 64, 96, generator=gen), torch.rand(2, 3, 64, 96, generator=gen)
    model = build_lpips("alex", "random")
    for fn in (M.psnr, M.ssim):
        assert torch.allclose(fn(x.cuda(), y.cuda()).cpu(), fn(x, y), rtol=1e-4, atol=1e-4)
    assert torch.allclose(M.lpips(model.cuda(), x.cuda(), y.cuda()).cpu(), M.lpips(model.cpu(), x, y), atol=1e-4)


def test_parts_scored_with_other_available_metrics_start_over(tmp_path):
    import pyarrow as pa

    from difix3d.errors import InputError
    from difix3d.eval.parts import PartStore

    def fp(available, kid_subsets=5):
        return {"config": {"kid_subsets": kid_subsets, "available_metrics": available}, "rows": "h", "n_rows": 1}

    row = pa.table({"segment": ["s"], "split": ["test"], "view": ["v"], "method": ["m"], "render_uri": ["r.png"]})
    first = PartStore(str(tmp_path), fp(["psnr"]), part_rows=1)
    first.add(row)
    assert PartStore(str(tmp_path), fp(["psnr"])).done_keys() == {("s", "test", "v", "m", "r.png")}  # resumed
    with pytest.raises(InputError, match="kid_subsets: 5 -> 6"):  # other settings: refused, parts kept
        PartStore(str(tmp_path), fp(["psnr"], kid_subsets=6))
    assert PartStore(str(tmp_path), fp(["psnr"])).done_keys()
    assert PartStore(str(tmp_path), fp(["psnr", "fid"])).done_keys() == set()  # FID weights fetched since: redone
