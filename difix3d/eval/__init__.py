"""Evaluation of rendered views against ground truth at fleet scale: per-view PSNR/SSIM/LPIPS, per-method FID/KID,
a Ray Data pipeline that streams thousands of segments, and the reports and plots people read."""

from difix3d.eval.config import EvalConfig
from difix3d.eval.rows import load_rows, rows_from_fleet_output

__all__ = ["EvalConfig", "load_rows", "rows_from_fleet_output"]
