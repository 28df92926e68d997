"""The small fixer shipped inside the package, so demos, tests and the quick start run with no download.

NOTE: the bundled ``tiny`` checkpoint (difix3d/assets/difix-tiny/) is RANDOM-INIT and UNTRAINED until a trained one
replaces it: it exercises the whole pipeline (shapes, batching, references, serving) but does not remove artifacts.
Regenerate it with ``python -m difix3d.fixer.bundled`` (deterministic, seed 0).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

BUNDLED_DIR = Path(__file__).resolve().parent.parent / "assets" / "difix-tiny"
_warned = False


def default_checkpoint() -> str:
    """Path of the bundled ``tiny`` checkpoint (our format); logs once that it is untrained."""
    global _warned
    if not (BUNDLED_DIR / "model.safetensors").exists():
        from difix3d.errors import MissingWeightsError

        raise MissingWeightsError(f"{BUNDLED_DIR}: the bundled fixer is missing from this install; regenerate it with "
                                  "`python -m difix3d.fixer.bundled`")
    if not _warned:
        log.warning("using the bundled tiny fixer %s: it is random-init and untrained (it runs the pipeline, it does "
                    "not remove artifacts); pass a trained checkpoint for real results", BUNDLED_DIR)
        _warned = True
    return str(BUNDLED_DIR)


def write_bundled(path: str | os.PathLike = BUNDLED_DIR, seed: int = 0) -> str:
    """(Re)write the bundled checkpoint: the ``tiny`` preset with random weights from ``seed``."""
    from difix3d.fixer.checkpoint import save_checkpoint
    from difix3d.fixer.model import build_model

    return save_checkpoint(build_model("tiny", seed=seed), str(path))


if __name__ == "__main__":
    print(write_bundled())
