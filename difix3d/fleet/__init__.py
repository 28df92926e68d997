"""The fleet job's logic: many scenes on a Ray cluster sharing one fixing pool (``jobs/reconstruct_fleet.py``)."""

from .config import FleetConfig
from .driver import FleetReport, run_fleet
from .inputs import SceneRef, resolve_scenes

__all__ = ["FleetConfig", "FleetReport", "SceneRef", "resolve_scenes", "run_fleet"]
