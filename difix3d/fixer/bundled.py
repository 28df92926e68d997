"""The small fixer shipped inside the package, so demos, tests and the quick start run with no download.

NOTE: the bundled checkpoint (difix3d/assets/difix-tiny/) is the ``tiny`` preset (1.9 M parameters), VAE included,
trained for 1 000 L2 steps on 456 curated synthetic pairs at 48×64 (``scripts/train_bundled_fixer.sh``). It exercises
the whole pipeline (shapes, batching, references, serving) and lifts held-out synthetic renders by 1.5-2 dB PSNR
(``benchmarks/RESULTS.md``), but it is a demo: real results need a real Difix checkpoint.
``python -m difix3d.fixer.bundled`` writes a random-init one instead (deterministic, seed 0).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

BUNDLED_DIR = Path(__file__).resolve().parent.parent / "assets" / "difix-tiny"
_warned = False


def default_checkpoint(warn: bool = True) -> str:
    """Path of the bundled ``tiny`` checkpoint (our format); logs once that it is a pipeline demo, not a real fixer
    (``warn=False``: the caller tells its user itself)."""
    global _warned
    if not (BUNDLED_DIR / "model.safetensors").exists():
        from difix3d.errors import MissingWeightsError

        raise MissingWeightsError(f"{BUNDLED_DIR}: the bundled fixer is missing from this install; regenerate it with "
                                  "`python -m difix3d.fixer.bundled`")
    if warn and not _warned:
        log.warning("using the bundled tiny fixer %s: a 1.9 M-parameter demo trained on synthetic pairs (+1.5 to +2 dB "
                    "PSNR on held-out synthetic renders, benchmarks/RESULTS.md), no substitute for a real Difix; pass "
                    "a real Difix checkpoint for real results", BUNDLED_DIR)
        _warned = True
    return str(BUNDLED_DIR)


def write_bundled(path: str | os.PathLike = BUNDLED_DIR, seed: int = 0) -> str:
    """(Re)write the bundled checkpoint: the ``tiny`` preset with random weights from ``seed``."""
    from difix3d.fixer.checkpoint import save_checkpoint
    from difix3d.fixer.model import build_model

    return save_checkpoint(build_model("tiny", seed=seed), str(path))


if __name__ == "__main__":
    print(write_bundled())
