"""The Ray Data evaluation pipeline: rows → per-view metrics on an actor pool → per-view Parquet + FID/KID.

``rows (from_items | read_parquet) -> map_batches(MetricsUDF, ActorPoolStrategy) -> driver``: the driver streams
the result batches, appends the per-view rows to one Parquet file (``<out>/per_view.parquet``, written through a
``pyarrow.parquet.ParquetWriter`` to a temporary name and moved into place, so it is whole or absent) and folds the
feature columns into FID/KID statistics per method and per (split, method). Images are only ever decoded inside the
actors, so driver memory does not grow with the number of segments. Each row carries ``status`` ("ok" | "error")
and ``error``: a corrupt, missing or size-mismatched image is recorded on its row and the job goes on (Ray's
``max_errored_blocks`` would drop whole blocks). A re-run reuses the outputs only when their fingerprint
(:mod:`difix3d.eval.fingerprint`) matches.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from difix3d import storage
from difix3d.device import default_device
from difix3d.eval import metrics as M
from difix3d.eval.config import EvalConfig
from difix3d.eval.perceptual import build_feature_net, build_lpips, metric_availability
from difix3d.eval.fingerprint import check_reusable, fingerprint
from difix3d.eval.parts import PARTS_DIR, PartStore, features_of, row_key, with_features
from difix3d.eval.rows import DEFAULT_SPLIT, ROW_COLUMNS, SPLIT_COLUMN, ParquetRows, load_rows
from difix3d.eval.set_metrics import SetMetrics
from difix3d.imageio import read_image, to_tensor

log = logging.getLogger(__name__)

PER_VIEW_FILE = "per_view.parquet"
SET_METRICS_FILE = "set_metrics.json"
PER_VIEW_SCHEMA = pa.schema([
    ("segment", pa.string()), ("split", pa.string()), ("view", pa.string()), ("method", pa.string()),
    ("render_uri", pa.string()), ("gt_uri", pa.string()),
    ("status", pa.string()), ("error", pa.string()),
    ("height", pa.int32()), ("width", pa.int32()),
    ("psnr", pa.float64()), ("ssim", pa.float64()), ("lpips", pa.float64()),
])


@dataclass
class EvalResult:
    """Where the outputs are and what they say at the top level."""

    output: str
    n_views: int
    n_errors: int
    set_metrics: dict  # {method: {"fid", "kid", "kid_std", "n"}}, all splits pooled
    unavailable: dict[str, str]  # metric -> reason
    seconds: float
    skipped: bool = False  # outputs existed and were kept (no --overwrite)
    files: dict[str, str] = field(default_factory=dict)
    split_set_metrics: dict = field(default_factory=dict)  # {split: {method: {"fid", "kid", "kid_std", "n"}}}


def evaluate(config: EvalConfig) -> EvalResult:
    """Run the whole evaluation: per-view metrics and FID/KID (reused when their outputs exist with the same
    fingerprint, unless ``config.overwrite``), then the reports and plots (:mod:`difix3d.eval.report`,
    :mod:`difix3d.eval.plots`). Raises :class:`InputError` on an input without rows and on outputs computed from
    other settings or inputs."""
    from difix3d.eval import plots, report

    t0 = time.perf_counter()
    out = config.output
    per_view_uri, set_uri = storage.join(out, PER_VIEW_FILE), storage.join(out, SET_METRICS_FILE)
    rows = load_rows(config.input)  # bad or empty input fails here, before any Ray work
    current = fingerprint(config, rows)
    skipped = not config.overwrite and storage.exists(per_view_uri) and storage.exists(set_uri)
    if skipped:
        saved = storage.read_json(set_uri)
        check_reusable(out, saved.get("fingerprint"), current)
        log.info("evaluate: %s and %s exist, reusing them (--overwrite recomputes)", per_view_uri, set_uri)
        # outputs from before splits existed: one split, DEFAULT_SPLIT, as _read_per_view labels their rows
        splits = saved.get("splits") or {DEFAULT_SPLIT: saved["methods"]}
        set_results = {"methods": saved["methods"], "splits": splits}
        unavailable = saved["unavailable"]
        if unavailable:  # weights fetched since: the reused outputs still lack those metrics
            now = worker_metric_availability(replace(config, metrics=tuple(unavailable)))
            found = sorted(m for m, a in now.items() if a.available)
            if found:
                log.warning("evaluate: %s were unavailable when %s was computed and are available now: pass "
                            "--overwrite to compute them", ", ".join(found), per_view_uri)
    else:
        storage.write_json(storage.join(out, "config.json"), config.to_json())
        set_results, unavailable = compute_per_view(config, rows, per_view_uri, current)
        storage.write_json(set_uri, {**set_results, "unavailable": unavailable, "fingerprint": current})
        storage.delete(storage.join(out, PARTS_DIR))  # merged into per_view.parquet
    table = _read_per_view(per_view_uri)
    files = report.write_reports(table, set_results, unavailable, config)
    files.update(plots.write_plots(table, config))
    files.update({"per_view": per_view_uri, "set_metrics": set_uri})
    statuses = table.column("status").to_pylist()
    return EvalResult(out, len(statuses), sum(s != "ok" for s in statuses), set_results["methods"], unavailable,
                      time.perf_counter() - t0, skipped, files, set_results["splits"])


def compute_per_view(config: EvalConfig, rows: list[dict] | ParquetRows, per_view_uri: str,
                     current: dict) -> tuple[dict, dict[str, str]]:
    """Stream the rows not yet in the part files of an interrupted run with the same ``current`` fingerprint and
    the same available metrics through the actor pool into part files, then merge the parts into the per-view
    file; return (FID/KID as ``{"methods": {method: ..}, "splits": {split: {method: ..}}}``, unavailable
    metrics)."""
    import ray.data

    avail = worker_metric_availability(config)
    unavailable = {m: a.reason for m, a in avail.items() if not a.available}
    for m, reason in unavailable.items():
        log.warning("evaluate: %s unavailable: %s", m, reason)
    enabled = tuple(m for m in config.metrics if avail[m].available)
    features_needed = any(m in enabled for m in M.SET_METRICS)

    # parts hold the columns of the metrics that were available: another set (weights fetched since) starts over
    parts = PartStore(config.output, {**current, "config": {**current["config"], "available_metrics": list(enabled)}},
                      overwrite=config.overwrite)
    done = parts.done_keys()
    if done:
        log.info("evaluate: resuming: %d views already scored in %s", len(done), parts.root)
    if isinstance(rows, ParquetRows):  # exactly the files whose schemas load_rows checked
        columns = list(ROW_COLUMNS) + ([SPLIT_COLUMN] if rows.has_split else [])
        ds = ray.data.read_parquet([path for path, _ in rows.files], filesystem=rows.filesystem, columns=columns)
        if done:
            ds = ds.filter(lambda row: row_key(row) not in done)
    else:
        rows = [r for r in rows if row_key(r) not in done]
        ds = ray.data.from_items(rows) if rows else None
    if ds is not None:
        _score_into(parts, ds, config, enabled, features_needed)
    parts.flush()
    # one set per method (all splits pooled) and one per (split, method)
    sets = SetMetrics(enabled, config.kid_subset_size, config.kid_subsets, config.kid_max_samples,
                      config.seed)
    with _AtomicParquetWriter(per_view_uri, PER_VIEW_SCHEMA) as writer:
        for table in parts.tables():
            writer.write(table.select(PER_VIEW_SCHEMA.names))
            if features_needed:
                _update_sets(sets, table)
    results = sets.compute() if features_needed else {}
    split_results: dict[str, dict] = {}
    for key, res in results.items():
        if isinstance(key, tuple):
            split_results.setdefault(key[0], {})[key[1]] = res
    return {"methods": {k: r for k, r in results.items() if isinstance(k, str)},
            "splits": split_results}, unavailable


def _score_into(parts: PartStore, ds, config: EvalConfig, enabled: tuple[str, ...], features_needed: bool) -> None:
    """Score the dataset's rows on the actor pool; each result batch goes into the part files."""
    from ray.data import ActorPoolStrategy

    ds = ds.map_batches(
        MetricsUDF,
        fn_constructor_kwargs={"metrics": enabled, "lpips_net": config.lpips_net,
                               "lpips_weights": config.lpips_weights, "fid_features": config.fid_features,
                               "random_feature_dim": config.random_feature_dim, "hub_dir": config.hub_dir},
        compute=ActorPoolStrategy(min_size=config.min_workers, max_size=config.workers),
        num_gpus=config.num_gpus_per_worker, num_cpus=config.num_cpus_per_worker,
        batch_size=config.batch_size, batch_format="numpy",
    )
    for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
        table = pa.table({name: _column(batch[name], f.type) for name, f in
                          zip(PER_VIEW_SCHEMA.names, PER_VIEW_SCHEMA)}, schema=PER_VIEW_SCHEMA)
        parts.add(with_features(table, batch) if features_needed else table)


def _update_sets(sets: SetMetrics, table: pa.Table) -> None:
    """Fold one part's ok rows into the FID/KID sets: per (split, method) and per method over all splits."""
    ok = np.asarray(table.column("status").to_pylist()) == "ok"
    splits = np.asarray(table.column(SPLIT_COLUMN).to_pylist(), dtype=object)
    methods = np.asarray(table.column("method").to_pylist(), dtype=object)
    render, gt = features_of(table, "render_features"), features_of(table, "gt_features")  # [N, D] each
    for split, method in sorted(set(zip(splits[ok], methods[ok]))):
        sel = ok & (splits == split) & (methods == method)
        sets.update((split, method), render[sel], gt[sel])
    for method in sorted(set(methods[ok])):
        sel = ok & (methods == method)
        sets.update(method, render[sel], gt[sel])


def worker_metric_availability(config: EvalConfig) -> dict:
    """:func:`metric_availability` where the metric workers run: a Ray task with their CPUs and GPUs (a CPU head
    may lack the weights or packages its GPU workers have, or the other way round); on the driver only when Ray is
    not initialized."""
    import ray

    args = (config.metrics, config.lpips_net, config.lpips_weights, config.fid_features, config.hub_dir)
    if not ray.is_initialized():
        return metric_availability(*args)
    task = ray.remote(metric_availability).options(num_cpus=config.num_cpus_per_worker,
                                                   num_gpus=config.num_gpus_per_worker)
    return ray.get(task.remote(*args))


class MetricsUDF:
    """Ray Data callable class: a batch of rows → the same rows with status, error, sizes, per-view metrics and
    (when FID/KID are on) ``render_features`` / ``gt_features`` ``[B, D]``. Networks are built once per actor."""

    def __init__(self, metrics: tuple[str, ...], lpips_net: str = "alex", lpips_weights="pretrained",
                 fid_features="inception", random_feature_dim: int = 64, hub_dir: str | None = None):
        self.metrics = tuple(metrics)
        self.device = default_device()
        self.lpips = (build_lpips(lpips_net, lpips_weights, hub_dir).to(self.device)
                      if "lpips" in self.metrics else None)
        self.features = (build_feature_net(fid_features, hub_dir, random_feature_dim).to(self.device)
                         if any(m in self.metrics for m in M.SET_METRICS) else None)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["render_uri"])
        out = {c: np.asarray([str(v) for v in batch[c]], dtype=object) for c in ROW_COLUMNS}
        out[SPLIT_COLUMN] = (np.asarray([str(v) for v in batch[SPLIT_COLUMN]], dtype=object)
                             if SPLIT_COLUMN in batch else np.full(n, DEFAULT_SPLIT, dtype=object))
        out["status"] = np.full(n, "ok", dtype=object)
        out["error"] = np.full(n, "", dtype=object)
        out["height"] = np.zeros(n, np.int32)
        out["width"] = np.zeros(n, np.int32)
        for m in M.PER_VIEW_METRICS:
            out[m] = np.full(n, np.nan, np.float64)
        if self.features is not None:
            out["render_features"] = np.zeros((n, self.features.num_features), np.float32)
            out["gt_features"] = np.zeros((n, self.features.num_features), np.float32)

        pairs = self._load_pairs(out, n)  # {(H, W): [(row, render, gt)]}
        for (h, w), rows_in_group in pairs.items():
            idx = [i for i, _, _ in rows_in_group]
            failed = self._score(out, idx, [r for _, r, _ in rows_in_group], [g for _, _, g in rows_in_group])
            if failed:  # recorded per row; the metrics that worked keep their values in the per-view table
                problem = "; ".join(f"{m} failed on {w}x{h} images ({e!r})" for m, e in failed.items())
                for i in idx:
                    out["status"][i], out["error"][i] = "error", f"{out['render_uri'][i]}: {problem}"
        return out

    def _load_pairs(self, out: dict, n: int) -> dict[tuple[int, int], list]:
        gt_cache: dict[str, np.ndarray] = {}  # one view's ground truth is shared by every method in the batch
        groups: dict[tuple[int, int], list] = {}
        for i in range(n):
            try:
                render = read_image(out["render_uri"][i])
                gt_uri = out["gt_uri"][i]
                if gt_uri not in gt_cache:
                    gt_cache[gt_uri] = read_image(gt_uri)
                gt = gt_cache[gt_uri]
                out["height"][i], out["width"][i] = render.shape[0], render.shape[1]
                if render.shape != gt.shape:
                    raise ValueError(f"size mismatch: render {render.shape[1]}x{render.shape[0]} "
                                     f"({out['render_uri'][i]}) vs ground truth {gt.shape[1]}x{gt.shape[0]} "
                                     f"({gt_uri})")
            except Exception as e:  # noqa: BLE001 - corrupt/missing/mismatched input: recorded, not fatal
                out["status"][i], out["error"][i] = "error", str(e)
                continue
            groups.setdefault(render.shape[:2], []).append((i, render, gt))
        return groups

    @torch.no_grad()
    def _score(self, out: dict, idx: list[int], renders: list[np.ndarray], gts: list[np.ndarray]) -> dict:
        """Each metric of one same-size group into ``out``, each on its own: one that fails (LPIPS on images too
        small for its network, say) is returned as ``{metric: exception}`` and leaves the others' values."""
        preds = to_tensor(renders).to(self.device)  # [b, 3, H, W]
        target = to_tensor(gts).to(self.device)  # [b, 3, H, W]
        steps = {"psnr": lambda: M.psnr(preds, target), "ssim": lambda: M.ssim(preds, target),
                 "lpips": lambda: M.lpips(self.lpips, preds, target)}
        failed = {}
        for name, step in steps.items():
            if name not in self.metrics or (name == "lpips" and self.lpips is None):
                continue
            try:
                out[name][idx] = step().double().cpu().numpy()
            except Exception as e:  # noqa: BLE001 - one bad group must not end the job
                failed[name] = e
        if self.features is not None:
            try:
                out["render_features"][idx] = self.features(preds).float().cpu().numpy()
                out["gt_features"][idx] = self.features(target).float().cpu().numpy()
            except Exception as e:  # noqa: BLE001
                failed["features"] = e
        return failed


def _read_per_view(uri: str) -> pa.Table:
    """The per-view table; one written before splits existed gets ``split = DEFAULT_SPLIT``."""
    fs, path = storage.resolve(uri)
    table = pq.read_table(path, filesystem=fs)
    if SPLIT_COLUMN not in table.column_names:
        table = table.add_column(1, SPLIT_COLUMN, pa.array([DEFAULT_SPLIT] * table.num_rows, pa.string()))
    return table


def _column(values: np.ndarray, typ: pa.DataType) -> pa.Array:
    if pa.types.is_string(typ):
        return pa.array([str(v) for v in values], type=typ)
    return pa.array(np.asarray(values), type=typ)


class _AtomicParquetWriter:
    """One Parquet file written batch by batch to ``.tmp-<name>`` and moved into place on success."""

    def __init__(self, uri: str, schema: pa.Schema):
        self.uri = uri
        self.fs, self.path = storage.resolve(uri)
        parent, name = self.path.rsplit("/", 1) if "/" in self.path else ("", self.path)
        self.tmp_path = f"{parent}/.tmp-{name}" if parent else f".tmp-{name}"
        self.schema = schema

    def __enter__(self) -> "_AtomicParquetWriter":
        self.fs.create_dir(self.path.rsplit("/", 1)[0], recursive=True)
        self.writer = pq.ParquetWriter(self.tmp_path, self.schema, filesystem=self.fs)
        return self

    def write(self, table: pa.Table) -> None:
        self.writer.write_table(table)

    def __exit__(self, exc_type, exc, tb) -> None:
        self.writer.close()
        if exc_type is None:
            self.fs.move(self.tmp_path, self.path)
        else:
            self.fs.delete_file(self.tmp_path)
