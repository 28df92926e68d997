"""What runs inside one scene's Ray task: reconstruct the scene, then record it as done in the manifest.

The task writes its own ``done`` record right after its outputs, so a driver that dies between the two never makes
a finished scene look unfinished. Errors come back as a value (not raised) so the driver can tell bad input, which
fails at once, from anything else, which is retried.
"""

from __future__ import annotations

import os
import time
import traceback
from typing import Any, Callable

from difix3d import storage
from difix3d.errors import InputError

from .config import FleetConfig
from .inputs import SceneRef

# (scene, scene_output_uri, config, fixer) -> result dict with "metrics" {split: {method: {metric: value}}},
# "frames_fixed", "timings"; the default is reconstruct_with_progressive below, tests pass stand-ins.
SceneFn = Callable[[SceneRef, str, FleetConfig, Any], dict]


def scene_output(output: str, scene_id: str) -> str:
    return storage.join(output, "scenes", scene_id)


def run_scene_task(scene_fn: SceneFn | None, scene: SceneRef, config: FleetConfig, fixer: Any,
                   attempt: int, num_cpus: float) -> dict:
    """Body of the per-scene Ray task; returns ``{"ok": True, **record}`` or ``{"ok": False, "error", ...}``."""
    _limit_threads(num_cpus)
    scene_fn = scene_fn or reconstruct_with_progressive
    started = time.time()
    try:
        result = dict(scene_fn(scene, scene_output(config.output, scene.scene_id), config, fixer) or {})
    except Exception as e:  # noqa: BLE001 - every error becomes this scene's record; the fleet goes on
        return {"ok": False, "retryable": not isinstance(e, InputError), "error": f"{type(e).__name__}: {e}",
                "traceback": traceback.format_exc()[-4000:], "started": started, "finished": time.time()}
    finished = time.time()
    record = {"scene_uri": scene.uri, "started": started, "finished": finished, "seconds": finished - started,
              "frames_fixed": int(result.get("frames_fixed", 0) or 0), "metrics": result.get("metrics", {}),
              "timings": result.get("timings", {})}
    storage.Manifest(config.output).mark(scene.scene_id, "done", attempts=attempt, **record)
    return {"ok": True, **record}


def reconstruct_with_progressive(scene: SceneRef, out: str, config: FleetConfig, fixer: Any) -> dict:
    """The real per-scene work: the progressive Difix3D/Difix3D+ loop, resumable from its last round under ``out``."""
    from difix3d.recon.progressive import reconstruct_scene

    from .fixers import materialize_fixer

    recon_config = progressive_config(config)
    device = None if config.device == "auto" else config.device
    result = reconstruct_scene(scene.uri, out, recon_config, materialize_fixer(fixer), progress=False, device=device)
    return result.to_dict() if hasattr(result, "to_dict") else dict(result)


def progressive_config(config: FleetConfig) -> Any:
    """Each scene's ``ProgressiveConfig``: the preset, the representation and the ``--set`` overrides (ValueError
    naming a field that does not exist)."""
    from difix3d.recon.progressive import ProgressiveConfig

    tiny = config.recon_preset == "tiny"
    base = ProgressiveConfig.tiny() if tiny else ProgressiveConfig()
    if config.representation != "3dgs":
        import dataclasses

        from difix3d.recon.factory import default_config

        # iterations None: the run's budget (trainer.iterations, after --set) fills it in, see ProgressiveConfig.budgeted
        nerf = dataclasses.replace(default_config(config.representation, tiny=tiny), iterations=None)
        base = dataclasses.replace(base, representation=config.representation, nerf=nerf)
    return _with_overrides(base, config.extra)


def check_scene_settings(config: FleetConfig) -> None:
    """On the driver, before any scene runs: a ``--set`` typo is a ValueError here, not the same failure recorded
    against every scene (failures that stick: a corrected re-run would skip them). The budget checks
    (``ProgressiveConfig.budgeted``) run in ``FleetConfig.validate``."""
    progressive_config(config)


def backend_problem(representation: str) -> str | None:
    """Why this process cannot build ``representation`` (nerfstudio missing), or None; run where scenes run."""
    if representation != "nerfacto":
        return None
    from difix3d.recon.nerf import _nerfstudio

    try:
        _nerfstudio()
    except ImportError as e:
        return str(e)
    return None


def _with_overrides(cfg: Any, extra: dict) -> Any:
    """``{"trainer.iterations": 100, "baseline": False}`` applied to a (nested) dataclass config."""
    for key, value in (extra or {}).items():
        cfg = _replace_path(cfg, key.split("."), value, key)
    return cfg


def _replace_path(obj: Any, path: list[str], value: Any, key: str) -> Any:
    import dataclasses

    names = {f.name for f in dataclasses.fields(obj)} if dataclasses.is_dataclass(obj) else set()
    if path[0] not in names:
        raise ValueError(f"--set {key}: {type(obj).__name__} has no field {path[0]!r} (fields: {sorted(names)})")
    if len(path) > 1:
        value = _replace_path(getattr(obj, path[0]), path[1:], value, key)
    elif isinstance(getattr(obj, path[0]), tuple) and isinstance(value, list):
        value = tuple(value)
    else:
        _check_override_type(getattr(obj, path[0]), value, key)
    return dataclasses.replace(obj, **{path[0]: value})


def _check_override_type(current: Any, value: Any, key: str) -> None:
    """A --set value of the field's kind (its current value's type; a None field takes anything), so a typo fails
    here, naming the setting, instead of deep inside the run."""
    kinds = {bool: (bool,), int: (int,), float: (int, float), str: (str,)}
    want = next((ok for t, ok in kinds.items() if type(current) is t), None)
    if want is not None and (not isinstance(value, want) or (bool not in want and isinstance(value, bool))):
        raise ValueError(f"--set {key}={value!r}: expected {type(current).__name__} (like {current!r})")


def _limit_threads(num_cpus: float) -> None:
    """Torch would start one thread per core of the node in every task; give each task the CPUs Ray granted it."""
    n = max(1, int(num_cpus))
    os.environ.setdefault("OMP_NUM_THREADS", str(n))
    try:
        import torch

        torch.set_num_threads(n)
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
