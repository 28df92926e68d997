"""Figures under ``<out>/plots/``: metric distributions per method, per-segment improvement over the baseline (both
over all splits, and per split when there are several), and a grid of the best and worst views per method.
matplotlib with the Agg backend (no display on cluster nodes)."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

from difix3d import storage  # noqa: E402
from difix3d.eval.config import EvalConfig  # noqa: E402
from difix3d.eval.metrics import HIGHER_IS_BETTER, PER_VIEW_METRICS  # noqa: E402
from difix3d.eval.report import per_segment_table  # noqa: E402
from difix3d.imageio import read_image  # noqa: E402


def write_plots(per_view: pa.Table, config: EvalConfig) -> dict[str, str]:
    """Write every figure that the data supports; returns ``{name: uri}``."""
    df = per_view.to_pandas()
    metrics = [m for m in PER_VIEW_METRICS if m in config.metrics and np.isfinite(df[m]).any()]
    out = {}
    if not metrics:
        return out
    root = storage.join(config.output, "plots")
    seg = per_segment_table(per_view, metrics)
    out.update(_overview(df, seg, metrics, config.baseline_method, root))
    splits = sorted(df["split"].unique())
    for split in splits if len(splits) > 1 else []:
        out.update(_overview(df[df["split"] == split], seg[seg["split"] == split], metrics, config.baseline_method,
                             root, split))
    rank = config.rank_metric if config.rank_metric in metrics else metrics[0]
    for method in sorted(df["method"].unique()):
        fig = plot_examples(df[df["method"] == method], rank, config.examples_per_end, method)
        if fig is not None:
            out[f"examples_{method}"] = _save(fig, storage.join(root, f"examples_{_safe(method)}.png"))
    return out


def plot_distributions(df, metrics: list[str]):
    """One box plot per metric, one box per method, over the finite per-view values of ok rows."""
    methods = sorted(df["method"].unique())
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 4), squeeze=False)
    for ax, m in zip(axes[0], metrics):
        data = [_finite(df[(df["method"] == k) & (df["status"] == "ok")][m]) for k in methods]
        ax.boxplot(data, tick_labels=methods, showfliers=True)
        ax.set_title(f"{m.upper()} ({'higher' if HIGHER_IS_BETTER[m] else 'lower'} is better)")
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    return fig


def plot_segment_improvement(seg, metrics: list[str], baseline: str):
    """Per-(segment, split) mean of each method (y) against the baseline (x); points above the diagonal improve
    (below, for lower-is-better metrics). None when there is no baseline or no other method."""
    methods = [m for m in sorted(seg["method"].unique()) if m != baseline]
    if baseline not in set(seg["method"]) or not methods:
        return None
    base = seg[seg["method"] == baseline].set_index(["segment", "split"])
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 4.2), squeeze=False)
    for ax, m in zip(axes[0], metrics):
        lo, hi = np.inf, -np.inf
        for method in methods:
            other = seg[seg["method"] == method].set_index(["segment", "split"])
            joined = base[[m]].join(other[[m]], lsuffix="_base", rsuffix="_method", how="inner").dropna()
            if joined.empty:
                continue
            x, y = joined[f"{m}_base"].to_numpy(), joined[f"{m}_method"].to_numpy()
            ax.scatter(x, y, s=12, alpha=0.7, label=method)
            lo, hi = min(lo, x.min(), y.min()), max(hi, x.max(), y.max())
        if np.isfinite(lo):
            ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        ax.set_xlabel(f"{baseline} {m.upper()}")
        ax.set_ylabel(f"method {m.upper()}")
        ax.set_title(f"per-segment {m.upper()}")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_examples(df, metric: str, k: int, method: str):
    """The ``k`` worst then the ``k`` best ok views by ``metric``: render beside ground truth. Reads only those
    ``2k`` pairs."""
    ok = df[(df["status"] == "ok") & np.isfinite(df[metric].replace(np.inf, np.finfo(float).max))]
    if ok.empty or k < 1:
        return None
    ranked = ok.sort_values(metric, ascending=HIGHER_IS_BETTER[metric])  # worst first
    picks = [("worst", r) for r in ranked.head(k).itertuples()]
    picks += [("best", r) for r in ranked.tail(min(k, max(0, len(ranked) - k))).iloc[::-1].itertuples()]
    fig, axes = plt.subplots(len(picks), 2, figsize=(6, 2.2 * len(picks)), squeeze=False)
    for row, (kind, r) in zip(axes, picks):
        for ax, uri, label in ((row[0], r.render_uri, method), (row[1], r.gt_uri, "ground truth")):
            try:
                ax.imshow(read_image(uri))
            except Exception as e:  # noqa: BLE001 - a file gone since scoring: show the error, keep the grid
                ax.text(0.5, 0.5, str(e)[:60], ha="center", va="center", fontsize=6, wrap=True)
            ax.set_xticks([]), ax.set_yticks([])
            ax.set_title(f"{label}" if label == "ground truth" else
                         f"{kind}: {r.segment} {r.view}\n{metric.upper()} {getattr(r, metric):.3f}", fontsize=7)
    fig.tight_layout()
    return fig


def _overview(df, seg, metrics: list[str], baseline: str, root: str, split: str | None = None) -> dict[str, str]:
    """Distributions and per-segment improvement of one split (None: all splits), saved as
    ``<name>[_<split>].png``."""
    suffix = f"_{split}" if split is not None else ""
    out = {}
    fig = plot_distributions(df, metrics)
    if split is not None:
        fig.suptitle(f"split {split}")
        fig.tight_layout()
    out[f"distributions{suffix}"] = _save(fig, storage.join(root, f"distributions{_safe(suffix)}.png"))
    fig = plot_segment_improvement(seg, metrics, baseline)
    if fig is not None:
        out[f"segment_improvement{suffix}"] = _save(fig, storage.join(root, f"segment_improvement{_safe(suffix)}.png"))
    return out


def _save(fig, uri: str) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    storage.write_bytes(uri, buf.getvalue())
    return uri


def _finite(series) -> np.ndarray:
    x = series.to_numpy(dtype=np.float64)
    return x[np.isfinite(x)]


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
