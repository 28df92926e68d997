"""``difix3d synth OUT --segments N``: write synthetic driving segments (driving layout) with exact ground truth."""

from __future__ import annotations

import argparse
import time


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("synth", help="write synthetic driving segments with exact ground truth",
                              description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("out", help="output folder URI; segments go to OUT/segment-000, OUT/segment-001, ...")
    p.add_argument("--segments", type=int, default=1, help="number of segments (seeds seed .. seed+N-1)")
    p.add_argument("--frames", type=int, default=64, help="frames per segment")
    p.add_argument("--height", type=int, default=576)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0, help="seed of the first segment")
    p.add_argument("--every-nth-train", type=int, default=2, help="train on every Nth frame (sparse views)")
    p.add_argument("--shifts", default="1,2,3", help="lane-change offsets in metres (comma-separated, '' for none)")
    p.add_argument("--holdout", default="", help="rig cameras held out as the cross_camera split (comma-separated)")
    p.add_argument("--points", type=int, default=100_000, help="initial surface points per segment")
    p.add_argument("--device", default=None, help="render device (default: CUDA when present)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from difix3d import storage
    from difix3d.scene.synthetic import make_segment

    shifts = tuple(float(s) for s in args.shifts.split(",") if s.strip())
    shifts = tuple(int(s) if s.is_integer() else s for s in shifts)
    holdout = tuple(c.strip() for c in args.holdout.split(",") if c.strip())
    cameras = tuple(c for c in ("front", "left", "right") if c not in holdout)
    for k in range(args.segments):
        uri = storage.join(args.out, f"segment-{k:03d}")
        t0 = time.perf_counter()
        scene = make_segment(uri, seed=args.seed + k, frames=args.frames, height=args.height, width=args.width,
                             cameras=cameras, every_nth_train=args.every_nth_train, shifts=shifts,
                             holdout_cameras=holdout, num_points=args.points, device=args.device)
        sizes = ", ".join(f"{s} {len(i)}" for s, i in scene.splits.items())
        print(f"{uri}: {len(scene)} views ({sizes}) in {time.perf_counter() - t0:.1f} s")
    return 0
