"""Offline validation of a Ray cluster-launcher YAML against the schema the installed ray package ships.

``prepare_config``/``validate_config`` are private Ray API (``ray.autoscaler._private.util``); this is the one place
that calls them, so a Ray upgrade that moves them breaks here only.
"""

from __future__ import annotations

from typing import Any

import yaml

from difix3d.errors import InputError


def validate_cluster_yaml(path: str) -> dict[str, Any]:
    """The prepared config (Ray's defaults filled in); InputError naming the file and the problem otherwise."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as e:
        raise InputError(path, f"not a readable YAML file ({e})") from e
    if not isinstance(raw, dict):
        raise InputError(path, "a cluster config must be a YAML mapping")
    try:
        config = prepare_config(raw)
        validate_config(config)
    except Exception as e:  # jsonschema.ValidationError, ValueError, RuntimeError from Ray's checks
        msg = getattr(e, "message", None) or str(e)
        where = "/".join(str(p) for p in getattr(e, "absolute_path", []) or [])
        raise InputError(path, f"invalid Ray cluster config{' at ' + where if where else ''}: {msg}") from e
    return config
