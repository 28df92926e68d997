"""The end of a fleet run: ``summary.parquet`` (one row per scene, metrics flattened per split/method) and the
short table a person reads (baseline vs Difix3D vs Difix3D+ mean PSNR/SSIM per split)."""

from __future__ import annotations

import math
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from difix3d import storage
from difix3d.storage import ManifestEntry

from .inputs import SceneRef

# The paper's three rows (Tab. 1-3, arXiv 2503.01774): the reconstruction alone, with progressive Difix3D updates,
# and with the Difix3D+ post-render pass. Other method names the loop reports are listed after these.
_METHOD_ORDER = ("baseline", "difix3d", "difix3d+", "difix3d_plus")
_METRIC_ORDER = ("psnr", "ssim", "lpips")
_BASE_COLUMNS = ("scene_id", "scene_uri", "status", "attempts", "error", "started", "finished", "seconds",
                 "frames_fixed")


def summary_rows(scenes: Iterable[SceneRef], entries: dict[str, ManifestEntry | None]) -> list[dict[str, Any]]:
    """One flat row per scene from its manifest record (scenes never started have status ``pending``)."""
    rows = []
    for ref in scenes:
        e = entries.get(ref.scene_id)
        info = e.info if e else {}
        row = {"scene_id": ref.scene_id, "scene_uri": ref.uri, "status": e.status if e else "pending",
               "attempts": e.attempts if e else 0, "error": info.get("error"),
               "started": info.get("started"), "finished": info.get("finished"), "seconds": info.get("seconds"),
               "frames_fixed": info.get("frames_fixed")}
        row.update(flatten_metrics(info.get("metrics") or {}))
        rows.append(row)
    return rows


def flatten_metrics(metrics: dict) -> dict[str, float]:
    """``{split: {method: {metric: v}}}`` -> ``{"<split>.<method>.<metric>": v}``."""
    flat = {}
    for split, methods in (metrics or {}).items():
        for method, values in (methods or {}).items():
            for name, v in (values or {}).items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    flat[f"{split}.{method}.{name}"] = float(v)
    return flat


def summary_table(rows: list[dict[str, Any]]) -> pa.Table:
    metric_cols = sorted({k for r in rows for k in r if k not in _BASE_COLUMNS})
    types = {"scene_id": pa.string(), "scene_uri": pa.string(), "status": pa.string(), "attempts": pa.int32(),
             "error": pa.string(), "started": pa.float64(), "finished": pa.float64(), "seconds": pa.float64(),
             "frames_fixed": pa.int64()}
    fields = [pa.field(c, types[c]) for c in _BASE_COLUMNS] + [pa.field(c, pa.float64()) for c in metric_cols]
    schema = pa.schema(fields)
    return pa.Table.from_pylist([{c: r.get(c) for c in schema.names} for r in rows], schema=schema)


def write_summary(rows: list[dict[str, Any]], uri: str) -> pa.Table:
    """Write ``summary.parquet`` in one atomic put (a re-run replaces it whole)."""
    table = summary_table(rows)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    storage.write_bytes(uri, sink.getvalue().to_pybytes())
    return table


def format_report(rows: list[dict[str, Any]]) -> str:
    """Status counts, then per split a table of mean metrics over finished scenes, one line per method."""
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    lines = ["scenes: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))]
    for r in rows:
        if r["status"] == "failed":
            lines.append(f"  failed {r['scene_id']}: {r['error']}")
    if counts.get("failed"):
        lines.append("  (a re-run skips failed scenes; add --retry-failed to try them again once their cause is fixed)")
    done = [r for r in rows if r["status"] == "done"]
    keys = sorted({k for r in done for k in r if k.count(".") >= 2 and k not in _BASE_COLUMNS})
    splits = _ordered({k.split(".")[0] for k in keys}, ("test",))
    for split in splits:
        methods = _ordered({k.split(".", 2)[1] for k in keys if k.startswith(split + ".")}, _METHOD_ORDER)
        metrics = _ordered({k.split(".", 2)[2] for k in keys if k.startswith(split + ".")}, _METRIC_ORDER)
        cols = [f"{split}.{method}.{m}" for method in methods for m in metrics]
        cols = [c for c in cols if any(_finite(r.get(c)) for r in done)]  # a metric measured nowhere (no LPIPS)
        # methods are compared over the same scenes: those with every method's value, or the means would mix sets
        paired = [r for r in done if all(_finite(r.get(c)) for c in cols)]
        title = f"{split} (mean of {len(paired)}" + (f" of {len(done)} with every method)" if len(paired) < len(done)
                                                     else ")")
        header = f"{title:<24}" + "".join(f"{m.upper():>10}" for m in metrics)
        lines += ["", header, "-" * len(header)]
        for method in methods:
            cells = []
            for m in metrics:
                vals = [r[f"{split}.{method}.{m}"] for r in paired if _finite(r.get(f"{split}.{method}.{m}"))]
                cells.append(f"{sum(vals) / len(vals):>10.4f}" if vals else f"{'-':>10}")
            lines.append(f"{method:<24}" + "".join(cells))
    return "\n".join(lines)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _ordered(names: set[str], preferred: tuple[str, ...]) -> list[str]:
    return [n for n in preferred if n in names] + sorted(names - set(preferred))
