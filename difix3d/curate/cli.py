"""``difix3d pairs show SHARD -o sheet.png [--rows N]``: a contact sheet of a pair shard."""

from __future__ import annotations

import argparse

from difix3d.argtypes import non_negative_float, positive_int


def add_parser(subparsers) -> None:
    pairs = subparsers.add_parser("pairs", help="inspect curated pair shards")
    sub = pairs.add_subparsers(dest="pairs_command", required=True, metavar="ACTION")
    show = sub.add_parser("show", help="write a contact sheet (degraded | target | reference per row) as a PNG")
    show.add_argument("shard", help="pair shard URI (.parquet)")
    show.add_argument("-o", "--output", required=True, help="PNG to write")
    show.add_argument("--rows", type=positive_int, default=8, help="pairs shown (default 8)")
    show.set_defaults(func=_show)


def _show(args: argparse.Namespace) -> int:
    from difix3d.curate.contact import write_contact_sheet

    for i, meta in enumerate(write_contact_sheet(args.shard, args.output, args.rows)):
        print(f"row {i}: {meta['scene']} {meta['camera']} {meta['strategy']} psnr {meta['psnr']:.2f} dB")
    print(f"wrote {args.output}")
    return 0


def build_job_parser() -> argparse.ArgumentParser:
    """The curation job's command line (``jobs/curate.py``), built on :class:`CurateConfig`'s defaults."""
    from difix3d.curate.job import CurateConfig
    from difix3d.curate.strategies import STRATEGIES

    d = CurateConfig()
    from difix3d.argtypes import HelpFormatter

    p = argparse.ArgumentParser(prog="curate", formatter_class=HelpFormatter, description="Make (artifact render, clean image, reference) pair "
                                "shards from many scenes with the four Difix3D+ curation strategies, on Ray.")
    p.add_argument("--scenes", required=True, help="scene manifest: .parquet/.json list, glob, folder, comma list")
    p.add_argument("--output", required=True, help="output URI (shards/, _manifest/, summary.json)")
    p.add_argument("--strategies", default=",".join(d.strategies), help=f"comma list of {sorted(STRATEGIES)}")
    p.add_argument("--iterations", type=positive_int, default=d.recon.iterations, help="3DGS budget per model")
    p.add_argument("--every-nth", type=int, default=d.sparse.every_nth, help="sparse: train on every Nth frame")
    p.add_argument("--held-out-camera", default=None, help="cross_camera: rig camera left out (default: the "
                   "scene's cross_camera split, else the last camera)")
    p.add_argument("--underfit-range", type=float, nargs=2, default=d.underfit.fraction_range,
                   metavar=("LO", "HI"), help="underfit: fraction of the budget trained")
    p.add_argument("--shift-range", type=float, nargs=2, default=d.cycle.shift_range, metavar=("LO", "HI"),
                   help="cycle: lateral shift in metres")
    p.add_argument("--min-psnr", type=float, default=d.filter.min_psnr, help="drop pairs below (hopeless)")
    p.add_argument("--max-psnr", type=float, default=d.filter.max_psnr, help="drop pairs above (nearly perfect)")
    p.add_argument("--shard-size", type=positive_int, default=d.shard_size, help="pairs per shard")
    p.add_argument("--gpus-per-task", type=non_negative_float, default=None, help="default: 1 for units submitted while the cluster has a GPU, else 0 (they run on CPUs)")
    p.add_argument("--max-attempts", type=positive_int, default=d.max_attempts, help="tries per (scene, strategy) unit")
    p.add_argument("--seed", type=int, default=d.recon.seed, help="seed of the reconstructions")
    p.add_argument("--tiny", action="store_true", help="tiny 3DGS preset (demos, CPU); --iterations stays as given")
    return p


def config_from_args(args: argparse.Namespace):
    """A :class:`CurateConfig` from parsed job arguments."""
    from difix3d.curate.filters import PsnrFilter
    from difix3d.curate.job import CurateConfig
    from difix3d.curate.strategies import (CrossCamera, CycleReconstruction, ReconstructionSettings,
                                           SparseReconstruction, UnderFitted)
    from difix3d.recon.gaussians import GaussianConfig

    gaussian = GaussianConfig.tiny(sh_degree=0, densify=False) if args.tiny else GaussianConfig()
    return CurateConfig(
        scenes=args.scenes, output=args.output,
        strategies=tuple(s.strip() for s in args.strategies.split(",") if s.strip()),
        sparse=SparseReconstruction(every_nth=args.every_nth), cross_camera=CrossCamera(held_out=args.held_out_camera),
        underfit=UnderFitted(fraction_range=tuple(args.underfit_range)),
        cycle=CycleReconstruction(shift_range=tuple(args.shift_range)),
        recon=ReconstructionSettings(iterations=args.iterations, gaussian=gaussian, seed=args.seed),
        filter=PsnrFilter(args.min_psnr, args.max_psnr), shard_size=args.shard_size,
        gpus_per_task=args.gpus_per_task, max_attempts=args.max_attempts)


def print_report(report, config) -> int:
    """Print the per-strategy counts, totals and failures → the job's exit code (1 if any unit failed, or if no unit
    applied and the output holds no pairs)."""
    given_up = set(report.given_up)
    print(report.counts.table())
    print(f"{len(report.shards)} shards, {report.counts.total('kept')} pairs, {len(report.skipped)} units already "
          f"done, {len(set(report.failed) - given_up)} failed, {report.seconds:.1f} s -> {config.output}")
    if given_up:
        print(f"given up after {config.max_attempts} attempts (not run again): {len(given_up)} units; their errors "
              f"are below and in summary.json and _manifest/; a higher --max-attempts retries them")
    for unit, error in sorted(report.failed.items()):
        print(f"{'GAVE UP' if unit in given_up else 'FAILED'} {unit}: {error}")
    for unit, reason in sorted(report.not_applicable.items()):  # no pairs, no failure: said, or a typo goes unseen
        print(f"NOT APPLICABLE {unit}: {reason}")
    if report.not_applicable and not report.shards and not report.failed:
        print("no pairs: no unit applied to its scene (above); check --strategies and their options")
        return 1  # nothing to fine-tune on: a script chaining curation into fine-tuning should stop here
    return 1 if report.failed else 0
