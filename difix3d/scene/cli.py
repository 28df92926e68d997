"""``difix3d synth OUT --segments N``: write synthetic driving segments (driving layout) with exact ground truth."""

from __future__ import annotations

import argparse
import time

from difix3d.argtypes import HelpFormatter, number_list, positive_int
from difix3d.errors import InputError

RIG = ("front", "left", "right")  # the synthetic rig's cameras


def _shifts(text: str) -> tuple[float, ...]:
    values = number_list(text)
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"repeated shifts in {text!r}: each names its own cameras")
    return values


def _holdout(text: str) -> tuple[str, ...]:
    names = tuple(c.strip() for c in text.split(",") if c.strip())
    unknown = sorted(set(names) - set(RIG))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown rig cameras {unknown} (the rig has {', '.join(RIG)})")
    if set(names) >= set(RIG):
        raise argparse.ArgumentTypeError("holding out every rig camera leaves none to train on")
    return names


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("synth", help="write synthetic driving segments with exact ground truth",
                              description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("out", help="output folder URI; segments go to OUT/segment-000, OUT/segment-001, ...")
    p.add_argument("--segments", type=positive_int, default=1, help="number of segments (seeds seed .. seed+N-1)")
    p.add_argument("--frames", type=positive_int, default=64, help="frames per segment")
    p.add_argument("--height", type=positive_int, default=576, help="image height in pixels")
    p.add_argument("--width", type=positive_int, default=1024, help="image width in pixels")
    p.add_argument("--seed", type=int, default=0, help="seed of the first segment")
    p.add_argument("--every-nth-train", type=positive_int, default=2, help="train on every Nth frame (sparse views)")
    p.add_argument("--shifts", type=_shifts, default="1,2,3",
                   help="lane-change offsets in metres (comma-separated, '' for none)")
    p.add_argument("--holdout", type=_holdout, default="",
                   help="rig cameras held out as the cross_camera split (comma-separated)")
    p.add_argument("--points", type=int, default=100_000, help="initial surface points per segment")
    p.add_argument("--device", default=None, help="render device (default: CUDA when present)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from difix3d import storage
    from difix3d.scene.synthetic import make_segment

    shifts = tuple(int(s) if s.is_integer() else s for s in args.shifts)
    holdout = args.holdout
    cameras = tuple(c for c in RIG if c not in holdout)
    for k in range(args.segments):
        uri = storage.join(args.out, f"segment-{k:03d}")
        if storage.is_dir(uri) and storage.list_dir(uri):  # its old frames would stay beside the new ones
            raise InputError(uri, "segment folder is not empty: remove it or write to another OUT")
        t0 = time.perf_counter()
        scene = make_segment(uri, seed=args.seed + k, frames=args.frames, height=args.height, width=args.width,
                             cameras=cameras, every_nth_train=args.every_nth_train, shifts=shifts,
                             holdout_cameras=holdout, num_points=args.points, device=args.device)
        sizes = ", ".join(f"{s} {len(i)}" for s, i in scene.splits.items())
        print(f"{uri}: {len(scene)} views ({sizes}) in {time.perf_counter() - t0:.1f} s")
    return 0
