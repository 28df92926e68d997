"""What the saved per-view outputs were computed from, so a re-run reuses them only when nothing that changes the
numbers has changed: the metric settings and the list of rows (the image files themselves are not hashed)."""

from __future__ import annotations

import hashlib
import json
import logging

from difix3d.errors import InputError
from difix3d.eval.config import EvalConfig
from difix3d.eval.rows import ROW_FIELDS, ParquetRows

log = logging.getLogger(__name__)

# EvalConfig fields that change per-view values or FID/KID; worker counts and report settings do not (reports are
# rebuilt on every run). hub_dir is in because it decides whether a metric is available at all.
METRIC_FIELDS = ("metrics", "lpips_net", "lpips_weights", "fid_features", "random_feature_dim", "hub_dir",
                 "kid_subset_size", "kid_subsets", "kid_max_samples", "seed")


def fingerprint(config: EvalConfig, rows: list[dict] | ParquetRows) -> dict:
    """``{"config": {field: value}, "rows": sha256, "n_rows": int}``: ``rows`` hashes every row's keys and image
    URIs (for a Parquet input, as :func:`~difix3d.eval.rows.parquet_rows` read them on the driver)."""
    settings = config.to_json()
    if isinstance(rows, ParquetRows):
        digest, n_rows = rows.digest, rows.n_rows
    else:
        listing = sorted([r[c] for c in ROW_FIELDS] for r in rows)
        digest, n_rows = hashlib.sha256(json.dumps(listing).encode()).hexdigest(), len(listing)
    fields = json.loads(json.dumps({k: settings[k] for k in METRIC_FIELDS}))
    if config.fid_features == "inception" and {"fid", "kid"} & set(config.metrics):
        from difix3d.eval.perceptual import INCEPTION_RESIZE

        fields["inception_resize"] = INCEPTION_RESIZE  # outputs from the earlier antialiased resize are not reused
    return {"config": fields, "rows": digest, "n_rows": n_rows}


def check_reusable(output: str, saved: dict | None, current: dict) -> None:
    """Raise :class:`InputError` naming ``output`` and what differs when ``saved`` does not match ``current``; a
    folder written before fingerprints existed (``saved`` None) is reused with a warning."""
    if saved is None:
        log.warning("evaluate: %s has no fingerprint (written by an older version): reusing it without checking "
                    "that settings and inputs are unchanged; pass --overwrite to recompute", output)
        return
    diffs = [f"{k}: {saved['config'].get(k)!r} -> {v!r}" for k, v in current["config"].items()
             if saved["config"].get(k) != v]
    if saved["rows"] != current["rows"]:
        diffs.append(f"input rows changed ({saved['n_rows']} -> {current['n_rows']} entries, different hash)")
    if diffs:
        raise InputError(output, "existing outputs were computed from other settings or inputs ("
                                 + "; ".join(diffs) + "); pass --overwrite to recompute them")
