"""Paired-data curation at scale: the four Difix3D+ strategies over many scenes, one Ray task per (scene, strategy).

    python jobs/curate.py --scenes data/segments/ --output out/pairs --tiny --iterations 200   # laptop demo
    ray job submit --working-dir . -- python jobs/curate.py \
        --scenes s3://bucket/segments/* --output s3://bucket/pairs/v1

All logic lives in difix3d.curate; re-running the same command resumes (finished units are skipped).
"""

import logging
import sys

from difix3d.curate.cli import build_job_parser, config_from_args, print_report
from difix3d.curate.job import run_curation
from difix3d.errors import exit_code_of_user_errors

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = build_job_parser()
    try:
        config = config_from_args(parser.parse_args())  # strategy settings are checked as they are built
        for name in config.strategies:
            config.strategy(name)
    except ValueError as e:
        parser.error(str(e))  # usage and exit 2, before Ray starts
    # run_curation resolves the scenes, then joins the cluster under `ray job submit` (RAY_ADDRESS) or starts a local
    # one: a mistyped --scenes fails in a second, not after Ray's start
    sys.exit(exit_code_of_user_errors("curate", lambda: print_report(run_curation(config), config)))
