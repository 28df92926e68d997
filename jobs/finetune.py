"""Fine-tune Difix on pair shards with Ray Train (DDP): ``python jobs/finetune.py --train-shards s3://b/pairs
--num-workers 8 --use-gpu --init sd-turbo-folder``; all logic lives in ``difix3d.train``."""

import argparse
import sys

from difix3d.argtypes import HelpFormatter
from difix3d.errors import exit_code_of_user_errors
from difix3d.train.cli import add_arguments, run

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_arguments(parser)
    sys.exit(exit_code_of_user_errors("finetune", run, parser.parse_args()))
