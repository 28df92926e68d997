"""The fleet job end to end with the real pieces (synthetic segments, progressive loop, bundled fixer, pool) on the
session's local Ray: outputs exist, metrics are finite, a corrupt segment fails alone, a re-run recomputes nothing."""

import math
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

pytest.importorskip("difix3d.scene.synthetic")
pytest.importorskip("difix3d.recon.progressive")
pytest.importorskip("difix3d.pool")
pytest.importorskip("difix3d.fixer.bundled")

from difix3d import storage  # noqa: E402
from difix3d.fleet import FleetConfig, run_fleet  # noqa: E402
from difix3d.fleet.driver import synthetic_scenes  # noqa: E402


def _corrupt_pose(segment: str) -> str:
    """Write NaNs into one ego pose of a synthetic segment; returns the file."""
    poses = sorted(os.listdir(os.path.join(segment, "ego_pose")))
    bad = os.path.join(segment, "ego_pose", poses[0])
    np.savetxt(bad, np.full((4, 4), np.nan))
    return bad


@pytest.mark.slow
def test_default_run_end_to_end_with_a_corrupt_segment(ray_local, tmp_path, capsys):
    out = str(tmp_path / "difix3d-results")
    # the default run, with a smaller iteration budget so that the test stays within the CPU test budget
    fast = {"trainer.iterations": 40, "gaussian.iterations": 40, "schedule.pretrain_iters": 20,
            "schedule.round_every": 10, "eval_splits": ["test", "shift_1m"], "target_splits": ["test", "shift_1m"]}
    cfg = FleetConfig(output=out, synthetic_scenes=2, progress=False, extra=fast)
    refs = synthetic_scenes(cfg)  # what the default run generates; corrupt the last one before the run
    bad_file = _corrupt_pose(refs[-1].uri)

    report = run_fleet(cfg)
    assert report.counts == {"done": 1, "failed": 1}
    rows = {r["scene_id"]: r for r in report.rows}
    assert rows[refs[-1].scene_id]["attempts"] == 1  # bad input: no retry
    assert os.path.basename(bad_file) in rows[refs[-1].scene_id]["error"]

    table = pq.read_table(os.path.join(out, "summary.parquet"))
    assert table.num_rows == 2
    metric_cols = [c for c in table.column_names if c.count(".") >= 2]
    assert any(c.endswith(".psnr") for c in metric_cols) and any(c.endswith(".ssim") for c in metric_cols)
    for row in table.to_pylist():
        if row["status"] == "done":
            values = [row[c] for c in metric_cols if row[c] is not None]
            assert values and all(math.isfinite(v) for v in values), row
            scene_out = os.path.join(out, "scenes", row["scene_id"])
            assert storage.exists(os.path.join(scene_out, "metrics.json"))
            renders = storage.glob(os.path.join(scene_out, "renders", "*", "*", "*.png"))
            assert renders, f"no renders under {scene_out}"
    printed = capsys.readouterr().out
    assert "1 done" in printed and "1 failed" in printed and out in printed and "no substitute for a real Difix" in printed

    again = run_fleet(cfg)  # finished scenes skipped, the failed one stays failed
    assert again.ran == [] and again.skipped == [refs[0].scene_id]
