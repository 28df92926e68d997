"""``difix3d evaluate`` and the argument parser shared with ``jobs/evaluate.py``."""

from __future__ import annotations

import argparse

from difix3d.argtypes import HelpFormatter, positive_int
from difix3d.errors import InputError
from difix3d.eval.config import EvalConfig
from difix3d.eval.metrics import ALL_METRICS


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = EvalConfig(input="", output="")
    p.add_argument("--input", required=True,
                   help="rows file (.parquet, .json list, .jsonl) or a fleet output folder/URI")
    p.add_argument("--output", required=True, help="output folder/URI")
    p.add_argument("--metrics", default=",".join(d.metrics), help=f"comma list of {','.join(ALL_METRICS)}")
    p.add_argument("--workers", type=int, default=d.workers, help="max metric actors")
    p.add_argument("--min-workers", type=int, default=d.min_workers, help="metric actors to start with (Ray Data grows the pool to --workers)")
    p.add_argument("--num-gpus-per-worker", type=float, default=d.num_gpus_per_worker, help="GPU share per actor")
    p.add_argument("--num-cpus-per-worker", type=float, default=d.num_cpus_per_worker, help="CPUs per actor")
    p.add_argument("--batch-size", type=positive_int, default=d.batch_size, help="views per actor call")
    p.add_argument("--lpips-net", default=d.lpips_net, choices=["alex", "vgg", "squeeze"])
    p.add_argument("--lpips-weights", default=d.lpips_weights, choices=["pretrained", "random"],
                   help="random: stand-in backbone (values not comparable to published LPIPS)")
    p.add_argument("--fid-features", default=d.fid_features, choices=["inception", "random"],
                   help="random: stand-in feature net (values not comparable to published FID/KID)")
    p.add_argument("--hub-dir", default=None, help="torch hub folder holding checkpoints/ (default: torch's)")
    p.add_argument("--baseline-method", default=d.baseline_method, help="method the others are compared against")
    p.add_argument("--bootstrap-resamples", type=positive_int, default=d.bootstrap_resamples,
                   help="resamples of the bootstrap confidence intervals")
    p.add_argument("--overwrite", action="store_true", help="recompute even when outputs exist")


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    return EvalConfig(input=args.input, output=args.output, metrics=args.metrics, workers=args.workers,
                      min_workers=min(args.min_workers, args.workers), num_gpus_per_worker=args.num_gpus_per_worker,
                      num_cpus_per_worker=args.num_cpus_per_worker, batch_size=args.batch_size,
                      lpips_net=args.lpips_net, lpips_weights=args.lpips_weights, fid_features=args.fid_features,
                      hub_dir=args.hub_dir, baseline_method=args.baseline_method,
                      bootstrap_resamples=args.bootstrap_resamples, overwrite=args.overwrite)


def checked_config(args: argparse.Namespace) -> EvalConfig:
    """:func:`config_from_args`, with a bad setting (an unknown metric, no workers) an :class:`InputError`."""
    try:
        return config_from_args(args)
    except InputError:
        raise
    except ValueError as e:
        raise InputError("evaluate arguments", str(e)) from e


def run(args: argparse.Namespace) -> int:
    from difix3d.eval.pipeline import evaluate

    result = evaluate(checked_config(args))
    print(f"evaluate: {result.n_views} views ({result.n_errors} errors) in {result.seconds:.1f} s -> {result.output}"
          + (" (reused existing per-view outputs)" if result.skipped else ""))
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("evaluate", help="PSNR/SSIM/LPIPS per view and FID/KID per method on Ray Data",
                              formatter_class=HelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)
