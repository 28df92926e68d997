"""Ray job: evaluate renders against ground truth over many segments (difix3d.eval.pipeline).

    ray job submit --working-dir . -- python jobs/evaluate.py --input s3://bucket/fleet-out \
        --output s3://bucket/eval --workers 8 --num-gpus-per-worker 1
"""

from __future__ import annotations

import argparse
import logging
import sys

import ray

from difix3d import storage
from difix3d.argtypes import HelpFormatter
from difix3d.errors import InputError, exit_code_of_user_errors
from difix3d.eval.cli import add_arguments, checked_config, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        checked_config(args)  # settings checked before Ray starts
    except InputError as e:
        parser.error(e.problem)
    if not storage.exists(args.input):  # a mistyped path: said at once, not after Ray's start
        print(f"evaluate: error: {args.input}: no such file or folder", file=sys.stderr)
        return 2
    ray.init()  # joins the cluster under `ray job submit`, starts a local one otherwise
    return exit_code_of_user_errors("evaluate", run, args)


if __name__ == "__main__":
    sys.exit(main())
