"""Shared emitter for benchmark figures: one JSON object per figure, printed and appended to
``benchmarks/results/<benchmark>.jsonl`` (format: DESIGN.md, Testing and measuring)."""

from __future__ import annotations

import datetime as _dt
import json
import os
import shlex
import subprocess
import sys

if os.environ.get("DIFIX3D_GSPLAT_SO"):  # reuse a prebuilt gsplat extension on GPU hosts
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from difix3d import gsplat_prebuilt

    gsplat_prebuilt.install()

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def device_name() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except Exception:
        pass
    return "cpu"


def commit() -> str:
    """The short commit, with "-dirty" when tracked files other than the recorded results differ from it: the figures
    then come from code no commit holds."""
    root = os.path.dirname(RESULTS_DIR)
    try:
        head = subprocess.check_output(["git", "rev-parse", "--short=7", "HEAD"], text=True, cwd=root,
                                       stderr=subprocess.DEVNULL).strip()
        changed = subprocess.check_output(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)benchmarks/results",
             ":(exclude)benchmarks/RESULTS.md"], text=True, cwd=os.path.dirname(root), stderr=subprocess.DEVNULL)
    except Exception:
        return "unknown"
    return head + ("-dirty" if changed.strip() else "")


class Emitter:
    """``Emitter("fixer_latency").emit("ms_per_frame", 42.0, "ms", batch=4, ref=False)``."""

    def __init__(self, benchmark: str, write: bool = True):
        self.benchmark = benchmark
        self.write = write
        self.base = {"device": device_name(), "date": _dt.date.today().isoformat(), "commit": commit(),
                     "command": "python " + " ".join(shlex.quote(a) for a in sys.argv)}

    def emit(self, metric: str, value: float, unit: str, **settings) -> dict:
        row = {"benchmark": self.benchmark, "metric": metric, "value": float(value), "unit": unit, **self.base,
               **settings}
        line = json.dumps(row, sort_keys=False)
        print(line, flush=True)
        if self.write:
            os.makedirs(RESULTS_DIR, exist_ok=True)
            with open(os.path.join(RESULTS_DIR, f"{self.benchmark}.jsonl"), "a") as f:
                f.write(line + "\n")
        return row


def cuda_time_ms(fn, iters: int = 20, warmup: int = 3) -> float:
    """Mean milliseconds of ``fn()`` on the current CUDA stream, by CUDA events around ``iters`` back-to-back calls
    after ``warmup`` calls."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters
