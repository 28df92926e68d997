"""The main job: progressive Difix3D+ reconstruction of many scenes sharing one fixing pool.

    python jobs/reconstruct_fleet.py                       # laptop demo: synthetic segments, CPU, a few minutes
    ray job submit --working-dir . -- python jobs/reconstruct_fleet.py \
        --scenes s3://bucket/segments/* --checkpoint s3://bucket/difix.safetensors --output s3://bucket/runs/r1

All logic lives in difix3d.fleet; this file only hands the command line over. Re-running the same command resumes.
"""

import sys

from difix3d.fleet.cli import main

if __name__ == "__main__":
    sys.exit(main())
