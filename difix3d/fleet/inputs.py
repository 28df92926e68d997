"""Which scenes a fleet run covers: parse a scene manifest (Parquet, JSON, glob, folder, comma list), or generate
the embedded demo's synthetic driving segments."""

from __future__ import annotations

import hashlib
import posixpath
from dataclasses import dataclass

from difix3d import storage
from difix3d.errors import InputError

_URI_COLUMNS = ("uri", "scene_uri", "path", "scene")
_SCENE_MARKERS = ("images", "transforms.json", "ego_pose")  # a folder holding one of these is a scene itself


@dataclass(frozen=True)
class SceneRef:
    """One unit of work: ``scene_id`` names its output folder and manifest record, ``uri`` is where it is read."""

    scene_id: str
    uri: str


def resolve_scenes(spec: str) -> list[SceneRef]:
    """Scene references from a manifest spec, in manifest order, with unique ids.

    ``spec`` is a ``.parquet`` file (a ``uri``/``scene_uri``/``path`` column, optional ``scene_id``), a ``.json``
    file (a list of URIs or of ``{"uri", "scene_id"}`` objects), a glob (``s3://b/segments/*``), a folder of scene
    folders (or one scene folder), or a comma-separated list of scene URIs. Local paths come back absolute.
    """
    spec = str(spec).strip()
    if "," in spec and not storage.exists(spec):
        pairs = [(None, s.strip()) for s in spec.split(",") if s.strip()]
    elif spec.endswith((".parquet", ".json")) and not storage.exists(spec):
        raise InputError(spec, "scene manifest not found")
    elif spec.endswith(".parquet"):
        pairs = _from_parquet(spec)
    elif spec.endswith(".json"):
        pairs = _from_json(spec)
    elif any(c in spec for c in "*?["):
        pairs = [(None, u) for u in storage.glob(spec) if _scene_folder(u)]
    elif storage.is_dir(spec):
        if _is_scene(spec):
            pairs = [(None, spec)]
        else:
            pairs = [(None, u) for u in storage.list_dir(spec) if _scene_folder(u)]
    else:
        raise InputError(spec, "scene manifest not found (expected a .parquet/.json list, a glob or a folder)")
    if not pairs:
        raise InputError(spec, "scene manifest lists no scenes")
    # local paths made absolute here: scene tasks on other nodes (or in a job's working folder) and readers of
    # summary.parquet resolve them from elsewhere than the driver's working folder
    return _unique_ids([(i, storage.absolute(u)) for i, u in pairs])


def scene_id_of(uri: str) -> str:
    name = posixpath.basename(str(uri).rstrip("/").replace("\\", "/"))
    return name or "scene"


def _scene_folder(uri: str) -> bool:
    """Folders only, and not hidden or private ones (``.DS_Store``, ``_manifest``, a README beside the scenes)."""
    return storage.is_dir(uri) and not posixpath.basename(uri.rstrip("/")).startswith((".", "_"))


def _is_scene(uri: str) -> bool:
    return any(storage.exists(storage.join(uri, m)) for m in _SCENE_MARKERS)


def _from_parquet(uri: str) -> list[tuple[str | None, str]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(storage.bytes_io(uri))
    except FileNotFoundError:
        raise
    except Exception as e:  # pyarrow raises ArrowInvalid and friends for a file that is not Parquet
        raise InputError(uri, f"not a readable Parquet file ({e})") from e
    col = next((c for c in _URI_COLUMNS if c in table.column_names), None)
    if col is None:
        raise InputError(uri, f"no scene URI column; expected one of {list(_URI_COLUMNS)}, got {table.column_names}")
    uris = table.column(col).to_pylist()
    ids = table.column("scene_id").to_pylist() if "scene_id" in table.column_names else [None] * len(uris)
    return [(i, _relative_to(uri, u)) for i, u in zip(ids, uris) if u]


def _from_json(uri: str) -> list[tuple[str | None, str]]:
    data = storage.read_json(uri)
    if isinstance(data, dict) and "scenes" in data:
        data = data["scenes"]
    if not isinstance(data, list):
        raise InputError(uri, "expected a JSON list of scene URIs (or {\"scenes\": [...]})")
    out = []
    for i, item in enumerate(data):
        if isinstance(item, str):
            out.append((None, _relative_to(uri, item)))
        elif isinstance(item, dict) and any(k in item for k in _URI_COLUMNS):
            u = next(item[k] for k in _URI_COLUMNS if k in item)
            out.append((item.get("scene_id"), _relative_to(uri, u)))
        else:
            raise InputError(uri, f"entry {i} is neither a URI string nor an object with a 'uri' field")
    return out


def _relative_to(manifest_uri: str, scene_uri: str) -> str:
    """Scene paths in a manifest are relative to the manifest's folder unless absolute or a URI."""
    scene_uri = str(scene_uri)
    if "://" in scene_uri or scene_uri.startswith("/"):
        return scene_uri
    parent = posixpath.dirname(str(manifest_uri)) or "."
    return storage.join(parent, scene_uri)


def _unique_ids(pairs: list[tuple[str | None, str]]) -> list[SceneRef]:
    """Ids from the given ``scene_id`` or the folder name; folder names shared by several scenes (``cityA/seg1``,
    ``cityB/seg1``) get a short hash of their URI, the same in every run whatever the manifest's order."""
    keys = [same_scene_key(u) for _, u in pairs]  # one spelling per location: a/seg1 and ./a/seg1/ are one scene
    if len(set(keys)) != len(keys):
        dup = next(u for (_, u), k in zip(pairs, keys) if keys.count(k) > 1)
        raise InputError(dup, "the scene manifest lists this scene twice")
    given = [str(g) for g, _ in pairs if g]
    if len(set(given)) != len(given):
        dup = next(g for g in given if given.count(g) > 1)
        raise InputError(dup, "the scene manifest gives this scene_id to two scenes")
    for g in given:
        if "/" in g or "\\" in g or g in (".", "..") or not g.strip():
            raise InputError(g, "a scene_id names files and folders of the outputs: it must be a non-empty name "
                                "without '/' or '\\'")
    bases = [str(g) if g else scene_id_of(u) for g, u in pairs]
    refs = []
    for (g, uri), base in zip(pairs, bases):
        clash = not g and bases.count(base) > 1
        digest = hashlib.sha1(same_scene_key(uri).encode()).hexdigest()[:8]
        refs.append(SceneRef(f"{base}-{digest}" if clash else base, uri))
    ids = [r.scene_id for r in refs]
    if len(set(ids)) != len(ids):  # a given scene_id equal to another scene's folder-name id
        dup = next(i for i in ids if ids.count(i) > 1)
        raise InputError(dup, "two scenes of the manifest would share this scene_id; give them scene_ids")
    return refs


def same_scene_key(uri: str) -> str:
    """One spelling per scene location (:func:`difix3d.storage.normalized`)."""
    return storage.normalized(uri)


def adopt_recorded_ids(scenes: list[SceneRef], manifest: storage.Manifest) -> list[SceneRef]:
    """Scenes whose location an earlier run recorded under another id (an older id scheme, or a basename that only
    now clashes) keep that id, so their finished work is found instead of redone beside it."""
    entries = list(manifest.entries())
    recorded = {same_scene_key(e.info["scene_uri"]): e.unit for e in entries if e.info.get("scene_uri")}
    return adopt_ids(scenes, recorded, {e.unit for e in entries})


def adopt_ids(scenes: list[SceneRef], recorded: dict[str, str], known: set[str]) -> list[SceneRef]:
    """``scenes`` with each one whose id ``known`` (the ids an earlier run recorded) lacks renamed to the id
    ``recorded`` holds for its location (``same_scene_key`` -> id), unless another scene of this run has that id."""
    if all(s.scene_id in known for s in scenes):
        return scenes
    taken = {s.scene_id for s in scenes}
    out = []
    for s in scenes:
        old = recorded.get(same_scene_key(s.uri)) if s.scene_id not in known else None
        if old is not None and old != s.scene_id and old not in taken:
            taken.add(old)
            s = SceneRef(old, s.uri)
        out.append(s)
    return out
