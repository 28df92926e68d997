"""Comparing the settings a re-run asks for with those an output folder's ``config.json`` records.

Jobs refuse to add to an output made with settings that change its results (a resume would mix two runs under one
record); this is the comparison they share.
"""

from __future__ import annotations

from typing import Any


def nested_changes(saved: Any, now: Any, key: str, ignore: frozenset[str] = frozenset()) -> list[tuple[str, Any, Any]]:
    """(dotted key, saved value, new value) of each difference between two JSON values. In mappings only keys both
    have count (a field added in a later version keeps older outputs usable) and keys in ``ignore`` (settings that
    do not change results, such as chunk sizes or logging cadence) are skipped."""
    if isinstance(saved, dict) and isinstance(now, dict):
        return [c for k in sorted(saved.keys() & now.keys()) if k not in ignore
                for c in nested_changes(saved[k], now[k], f"{key}.{k}", ignore)]
    return [(key, saved, now)] if saved != now else []
