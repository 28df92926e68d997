"""Fleet throughput on one GPU: N synthetic driving segments through the fleet job's shared fixing pool vs the same
scenes one after another with an in-process fixer (the usual shell-loop baseline).

    python benchmarks/fleet.py            # 8 segments
    python benchmarks/fleet.py --quick    # 2 tiny segments, a smoke run

Figures (benchmarks/results/fleet.jsonl): scenes_per_hour and gpu_util_mean (setting mode: pool|sequential),
speedup_vs_sequential.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import Emitter  # noqa: E402


class GpuUtilisation:
    """Mean GPU utilisation (%) over a block, polled every ``interval`` s from nvidia-smi (torch as a fallback)."""

    def __init__(self, interval: float = 0.5, index: int = 0):
        self.interval, self.index, self.samples = interval, index, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @property
    def mean(self) -> float:
        return sum(self.samples) / len(self.samples) if self.samples else float("nan")

    def _sample(self) -> float | None:
        try:
            out = subprocess.check_output(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                           "-i", str(self.index)], text=True, timeout=5)
            return float(out.strip().splitlines()[0])
        except Exception:  # noqa: BLE001 - no nvidia-smi: ask torch (needs pynvml)
            try:
                import torch

                return float(torch.cuda.utilization(self.index))
            except Exception:  # noqa: BLE001
                return None

    def _poll(self):
        while not self._stop.is_set():
            v = self._sample()
            if v is not None:
                self.samples.append(v)
            self._stop.wait(self.interval)


def make_segments(root: str, n: int, frames: int, height: int, width: int) -> list:
    from difix3d.fleet.inputs import SceneRef
    from difix3d.scene.synthetic import make_segment

    refs = []
    for i in range(n):
        uri = os.path.join(root, f"seg-{i:03d}")
        make_segment(uri, seed=i, frames=frames, height=height, width=width)
        refs.append(SceneRef(f"seg-{i:03d}", uri))
    return refs


def run_sequential(refs, out: str, config) -> float:
    """One scene after another in this process, one fixer loaded once: seconds for all scenes."""
    from difix3d.fleet.fixers import LocalFixerSpec, materialize_fixer
    from difix3d.fleet.scene_task import reconstruct_with_progressive, scene_output

    fixer = materialize_fixer(LocalFixerSpec(config.checkpoint, "cuda"))
    t0 = time.perf_counter()
    for ref in refs:
        reconstruct_with_progressive(ref, scene_output(out, ref.scene_id), config, fixer)
    return time.perf_counter() - t0


def run_pool(refs, out: str, config) -> float:
    """The fleet job's path: scene tasks on a local Ray cluster sharing one pool: seconds for all scenes."""
    import json

    import ray

    from difix3d.fleet import run_fleet

    manifest = os.path.join(out, "scenes.json")
    os.makedirs(out, exist_ok=True)
    with open(manifest, "w") as f:
        json.dump([r.uri for r in refs], f)
    config.scenes = manifest
    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False)
    t0 = time.perf_counter()
    report = run_fleet(config, echo=lambda s: None)
    seconds = time.perf_counter() - t0
    if report.counts.get("done", 0) != len(refs):
        raise RuntimeError(f"pool run did not finish every scene: {report.counts}")
    return seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scenes", type=int, default=8)
    p.add_argument("--frames", type=int, default=24)
    p.add_argument("--height", type=int, default=176)
    p.add_argument("--width", type=int, default=320)
    p.add_argument("--recon-preset", default="tiny", choices=["tiny", "paper"])
    p.add_argument("--checkpoint", default=None, help="fixer checkpoint (default: the bundled tiny one)")
    p.add_argument("--scene-num-gpus", type=float, default=0.25)
    p.add_argument("--replica-num-gpus", type=float, default=0.5)
    p.add_argument("--modes", default="sequential,pool")
    p.add_argument("--quick", action="store_true", help="2 small segments")
    p.add_argument("--no-write", action="store_true", help="print only, do not append to results/fleet.jsonl")
    args = p.parse_args()
    if args.quick:
        args.scenes, args.frames, args.height, args.width = 2, 6, 48, 64

    from difix3d.fleet import FleetConfig
    from difix3d.fleet.fixers import resolve_checkpoint

    checkpoint, _ = resolve_checkpoint(args.checkpoint)
    emitter = Emitter("fleet", write=not args.no_write)
    settings = dict(scenes=args.scenes, frames=args.frames, resolution=f"{args.height}x{args.width}",
                    recon_preset=args.recon_preset, checkpoint=args.checkpoint or "bundled", quick=args.quick)
    tmp = tempfile.mkdtemp(prefix="difix3d-bench-fleet-")
    try:
        refs = make_segments(os.path.join(tmp, "inputs"), args.scenes, args.frames, args.height, args.width)
        seconds = {}
        for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
            config = FleetConfig(checkpoint=checkpoint, output=os.path.join(tmp, f"out-{mode}"),
                                 recon_preset=args.recon_preset, device="cuda", progress=False,
                                 fixer_mode="pool", pool_replicas=1, scene_num_gpus=args.scene_num_gpus,
                                 replica_num_gpus=args.replica_num_gpus)
            with GpuUtilisation() as util:
                seconds[mode] = (run_sequential if mode == "sequential" else run_pool)(refs, config.output, config)
            emitter.emit("scenes_per_hour", args.scenes / seconds[mode] * 3600, "scenes/h", mode=mode,
                         seconds=round(seconds[mode], 2), **settings)
            emitter.emit("gpu_util_mean", util.mean, "%", mode=mode, samples=len(util.samples), **settings)
        if "pool" in seconds and "sequential" in seconds:
            emitter.emit("speedup_vs_sequential", seconds["sequential"] / seconds["pool"], "x", **settings)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
