"""Use a prebuilt gsplat CUDA extension instead of JIT-compiling it in every fresh process.

gsplat 1.5.3 ships as a pure-Python wheel and JIT-compiles its CUDA kernels (~90 s on 16 cores) the first time
each machine imports them; ephemeral GPU workers would pay that on every start. Point ``DIFIX3D_GSPLAT_SO`` at a
``gsplat_cuda.so`` built once for the same torch/CUDA/arch, and :func:`install` registers it as gsplat's backend.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import logging
import os
import sys
import types

log = logging.getLogger(__name__)


def install(path: str | None = None) -> bool:
    """Register the prebuilt extension at ``path`` (default ``$DIFIX3D_GSPLAT_SO``) as gsplat's ``_C``.

    Returns True when installed; False when no path is set, gsplat's backend is already imported, or CUDA is
    absent (gsplat then behaves as usual).
    """
    path = path or os.environ.get("DIFIX3D_GSPLAT_SO")
    if not path or "gsplat.cuda._backend" in sys.modules:
        return False
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: DIFIX3D_GSPLAT_SO points to a file that does not exist")
    import torch  # the extension links against torch's libraries: load them first

    if not torch.cuda.is_available():
        return False
    loader = importlib.machinery.ExtensionFileLoader("gsplat_cuda", path)
    spec = importlib.util.spec_from_file_location("gsplat_cuda", path, loader=loader)
    ext = importlib.util.module_from_spec(spec)
    loader.exec_module(ext)
    import gsplat.cuda  # noqa: F401  (the package, not its backend)

    backend = types.ModuleType("gsplat.cuda._backend")
    backend._C = ext
    sys.modules["gsplat.cuda._backend"] = backend
    gsplat.cuda._backend = backend
    log.info("gsplat: using prebuilt CUDA extension %s", path)
    return True
