"""3DGS speed and baseline quality on a synthetic driving segment.

Figures (benchmarks/results/gaussians.jsonl):
- ``iters_per_s`` and ``peak_mem_gb`` of training steps at H×W with a fixed Gaussian count (densification off so
  the count stays put), settings ``backend``, ``num_gaussians``, ``height``, ``width``;
- ``baseline_psnr`` / ``baseline_ssim`` of plain 3DGS (densification on, no Difix) on the lane-shift views,
  setting ``shift_m`` (0 = the interpolated ``test`` views) — the numbers the progressive Difix3D loop must beat.

    python benchmarks/gaussians.py              # 576×1024, ~1M Gaussians, 7000 training steps (GPU host)
    python benchmarks/gaussians.py --quick      # small sizes, runs on a CPU in a minute or two
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import Emitter  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes (CPU-friendly)")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--frames", type=int, default=None, help="segment frames (3 cameras each)")
    p.add_argument("--num-gaussians", type=int, default=None, help="Gaussians for the speed figure")
    p.add_argument("--timing-iters", type=int, default=None)
    p.add_argument("--train-iters", type=int, default=None, help="steps of the baseline-quality run")
    p.add_argument("--backend", default="auto", choices=["auto", "gsplat", "torch"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-quality", action="store_true")
    p.add_argument("--skip-speed", action="store_true", help="only the baseline-quality run")
    p.add_argument("--no-write", action="store_true", help="print figures without appending them to results/")
    a = p.parse_args(argv)
    if a.skip_speed and a.skip_quality:
        p.error("--skip-speed and --skip-quality together leave nothing to measure")

    import torch

    from difix3d.device import default_device
    from difix3d.recon.gaussians import GaussianConfig, GaussianSplat
    from difix3d.recon.trainer import TrainerConfig, load_views, train
    from difix3d.scene.synthetic import make_segment

    device = default_device()
    cuda = device.type == "cuda"
    quick_h, quick_w = (144, 256) if cuda else (32, 48)
    H = a.height or (quick_h if a.quick else 576)
    W = a.width or (quick_w if a.quick else 1024)
    frames = a.frames or (8 if a.quick else 32)
    n_gauss = a.num_gaussians or ((50_000 if cuda else 2_000) if a.quick else 1_000_000)
    timing_iters = a.timing_iters or (20 if a.quick else 200)
    train_iters = a.train_iters or ((300 if cuda else 100) if a.quick else 7000)
    backend = a.backend if a.backend != "auto" else ("gsplat" if cuda else "torch")
    em = Emitter("gaussians", write=not a.no_write)
    torch.manual_seed(a.seed)

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        scene = make_segment(os.path.join(tmp, "seg"), seed=a.seed, frames=frames, height=H, width=W,
                             num_points=n_gauss, device=None)
        print(f"# segment {frames} frames × 3 cameras at {H}×{W} in {time.perf_counter() - t0:.1f}s", flush=True)

        # ---- speed: fixed count, densification off ------------------------------------------------------------
        if not a.skip_speed:
            cfg = GaussianConfig(iterations=max(timing_iters, 1), densify=False, backend=backend)
            model = GaussianSplat.from_scene(scene, cfg, device=device)
            views = load_views(scene, "train")
            images = [v.image[None].to(device) for v in views]

            def step(i):
                model.train_step([views[i % len(views)].camera], images[i % len(views)])

            for i in range(min(5, timing_iters)):  # warm-up (kernel JIT, allocator)
                step(i)
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            for i in range(timing_iters):
                step(i)
            if cuda:
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
            settings = dict(backend=backend, num_gaussians=model.num_primitives, height=H, width=W, batch=1)
            em.emit("iters_per_s", timing_iters / seconds, "it/s", **settings)
            if cuda:
                em.emit("peak_mem_gb", torch.cuda.max_memory_allocated() / 1e9, "GB", **settings)
            else:
                import resource

                em.emit("peak_mem_gb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, "GB",
                        **settings, memory="process max RSS (CPU)")
            del model, images

        # ---- baseline quality on lane-shift views ------------------------------------------------------------
        if a.skip_quality:
            return
        torch.manual_seed(a.seed)
        gcfg = (GaussianConfig.tiny(train_iters, backend=backend) if (a.quick and not cuda)
                else GaussianConfig(iterations=train_iters, backend=backend))
        model = GaussianSplat.from_scene(scene, gcfg, device=device)
        splits = {0: "test", 1: "shift_1m", 2: "shift_2m", 3: "shift_3m"}
        eval_views = {s: load_views(scene, s) for s in splits.values() if scene.splits.get(s)}
        result = train(model, scene, TrainerConfig(iterations=train_iters, seed=a.seed), eval_views=eval_views,
                       progress=sys.stderr.isatty())
        common = dict(backend=backend, height=H, width=W, frames=frames, train_iters=train_iters,
                      init_points=n_gauss, final_gaussians=result.num_primitives,
                      train_iters_per_s=round(result.iters_per_s, 2))
        for shift_m, split in splits.items():
            if split in result.metrics:
                em.emit("baseline_psnr", result.metrics[split]["psnr"], "dB", shift_m=shift_m, split=split, **common)
                em.emit("baseline_ssim", result.metrics[split]["ssim"], "", shift_m=shift_m, split=split, **common)


if __name__ == "__main__":
    main()
