"""Storage behind URIs: local paths, ``file://``, ``s3://``, ``gs://`` (anything ``pyarrow.fs`` resolves).

Every write is atomic (local: temp file + rename; object stores: one put), so a killed job never leaves a
half-written file that a re-run would take for finished work. A :class:`Manifest` records one entry per unit
of work (a scene, a shard) as its own small JSON object, so concurrent workers never rewrite a shared file.
Remote paths are kept normalized (``s3://b/x/../y`` is ``s3://b/y``): object stores do not resolve ``..`` themselves.
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import json
import os
import posixpath
import tempfile
import time
import uuid
from dataclasses import dataclass
from typing import Any, Iterator

import pyarrow.fs as pafs

_UMASK = os.umask(0)
os.umask(_UMASK)

_REMOTE_SCHEMES = ("s3://", "gs://", "gcs://", "hdfs://", "viewfs://", "abfs://", "abfss://")


def is_local(uri: str) -> bool:
    return not str(uri).startswith(_REMOTE_SCHEMES)


def _local_path(uri: str) -> str:
    uri = str(uri)
    return uri[len("file://"):] if uri.startswith("file://") else os.path.expanduser(uri)  # ~ as absolute() reads it


def absolute(uri: str) -> str:
    """A relative local path made absolute against this process's working folder; URIs and absolute paths as they
    are. For paths handed to other Ray processes, whose working folder is not the driver's."""
    uri = str(uri)
    if not uri or not is_local(uri) or uri.startswith("file://"):
        return uri
    return os.path.abspath(os.path.expanduser(uri))


def normalized(uri: str) -> str:
    """One spelling per location, for comparing and hashing recorded locations: local paths absolute and normalized
    (``sc/a``, ``./sc/a/``, ``file://`` and the absolute path agree), URIs with ``.``/``..`` resolved
    (:func:`remote_normpath`) and without a trailing slash."""
    uri = str(uri)
    if is_local(uri):
        return posixpath.normpath(absolute(uri.removeprefix("file://")).replace("\\", "/"))
    base, sep, query = remote_normpath(uri).partition("?")
    return base.rstrip("/") + sep + query


def remote_normpath(uri: str) -> str:
    """A remote URI with its path normalized as ``posixpath.normpath`` does for local paths (``s3://b/x/../y`` ->
    ``s3://b/y``; ``.`` segments and ``//`` dropped); the bucket, a trailing slash and the ``?settings`` stay.

    Object stores do not resolve ``..``: ``b/x/../y`` is another key than ``b/y`` (a literal ``..`` object), so one
    object would go under two names (and pyarrow refuses ``//`` outright). A ``..`` that climbs above the bucket names
    nothing: an :class:`~difix3d.errors.InputError` naming the URI."""
    uri = str(uri)
    base, sep, query = uri.partition("?")
    scheme, _, rest = base.partition("://")
    bucket, _, path = rest.partition("/")
    segments = path.split("/")[:-1] if path.endswith("/") else path.split("/")
    if not path or all(p not in ("", ".", "..") for p in segments):
        return uri
    parts: list[str] = []
    for p in segments:
        if p == "..":
            if not parts:
                from difix3d.errors import InputError

                raise InputError(uri, f"'..' climbs above the bucket {scheme}://{bucket}")
            parts.pop()
        elif p not in ("", "."):
            parts.append(p)
    norm = "/".join(parts) + ("/" if parts and path.endswith("/") else "")
    return f"{scheme}://{bucket}" + (f"/{norm}" if norm else "") + sep + query


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a URI or a plain local path."""
    uri = str(uri)
    if is_local(uri):
        return pafs.LocalFileSystem(), os.path.abspath(_local_path(uri))
    return pafs.FileSystem.from_uri(remote_normpath(uri))


def join(uri: str, *parts: str) -> str:
    uri = str(uri)
    if is_local(uri):
        return os.path.join(uri, *parts)
    base, sep, query = uri.partition("?")  # s3://b/out?region=...: the parts go into the path, before the settings
    return remote_normpath(posixpath.join(base, *parts) + sep + query)  # "../x" parts: object stores keep ".."


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_dir(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type == pafs.FileType.Directory


def makedirs(uri: str) -> None:
    fs, path = resolve(uri)
    if is_local(uri):  # os's errors name the path, so errors.user_error_message can say what is in the way
        os.makedirs(path, exist_ok=True)
        return
    fs.create_dir(path, recursive=True)


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{uri}: no such file") from e


def write_bytes(uri: str, data: bytes) -> None:
    """Write ``data`` to ``uri`` atomically, creating parent folders."""
    fs, path = resolve(uri)
    if is_local(uri):
        parent = os.path.dirname(path)
        os.makedirs(parent, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=parent, prefix=".tmp-" + os.path.basename(path) + "-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())  # the data is on disk before the name is: a crashed machine keeps old or new
            os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the file the usual permissions
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return
    fs.create_dir(posixpath.dirname(path), recursive=True)
    with fs.open_output_stream(path) as f:  # one PUT on object stores: visible whole or not at all
        f.write(data)


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def write_torch(uri: str, obj: Any) -> None:
    """``torch.save(obj)`` to ``uri``, atomically (:func:`write_bytes`)."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    write_bytes(uri, buf.getvalue())


def read_json(uri: str) -> Any:
    data = read_bytes(uri)  # json.loads finds UTF-8, -16 or -32 (and a UTF-8 BOM) itself
    try:
        return json.loads(data[3:] if data.startswith(b"\xef\xbb\xbf") else data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        from difix3d.errors import InputError

        raise InputError(uri, f"not valid JSON ({e})") from e


def write_json(uri: str, obj: Any) -> None:
    write_text(uri, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if hasattr(o, "__fspath__"):
        return os.fspath(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def list_dir(uri: str) -> list[str]:
    """Full URIs of the entries directly inside ``uri`` (sorted); empty when it does not exist."""
    fs, path = resolve(uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(join(uri, posixpath.basename(i.path)) for i in infos)


def glob(pattern: str) -> list[str]:
    """Expand a glob such as ``s3://b/segments/*`` or ``data/seg-??/images/*.jpg`` (sorted full URIs).

    Wildcards match within one path component (``*`` never crosses ``/``, as in the shell); the listing goes one
    level per wildcard component, so a pattern never scans more than the folders it names.
    """
    pattern = str(pattern)
    if not _has_magic(pattern):
        return [pattern] if exists(pattern) else []
    parts = pattern.split("/")
    first_wild = next(i for i, p in enumerate(parts) if _has_magic(p))
    base = "/".join(parts[:first_wild])
    if first_wild == 1 and parts[0] == "":  # "/*": the filesystem root
        base = "/"
    candidates = [base]
    for part in parts[first_wild:]:
        if part == "":  # trailing "/": keep folders only
            candidates = [c for c in candidates if is_dir(c or ".")]
            continue
        nxt = []
        for c in candidates:
            if not _has_magic(part):
                child = join(c, part) if c else part
                if exists(child):
                    nxt.append(child)
                continue
            for child in list_dir(c or "."):
                name = posixpath.basename(child.replace(os.sep, "/"))
                if fnmatch.fnmatchcase(name, part) and (part.startswith(".") or not name.startswith(".")):
                    nxt.append(join(c, name) if c else name)
        candidates = nxt
    return sorted(candidates)


def _has_magic(s: str) -> bool:
    return any(c in s for c in "*?[")


def delete(uri: str) -> None:
    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)


def open_output_stream(uri: str):
    """A writable binary stream (for Parquet and other streaming writers); not atomic on local disks."""
    fs, path = resolve(uri)
    if is_local(uri):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    return fs.open_output_stream(path)


@dataclass(frozen=True)
class ManifestEntry:
    unit: str
    status: str  # "done" | "failed" | "running"
    attempts: int
    updated: float
    info: dict


class Manifest:
    """Per-unit status records under ``<root>/_manifest/<unit>.json``.

    Re-running a job asks :meth:`is_done` and skips finished units; a failed unit keeps its error and attempt
    count so bounded retries survive restarts of the driver.
    """

    def __init__(self, root: str):
        self.root = join(str(root), "_manifest")

    def _uri(self, unit: str) -> str:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in unit)
        if safe != unit:  # "a/b" and "a_b" must not share a record
            safe += "-" + hashlib.sha1(unit.encode("utf-8")).hexdigest()[:8]
        return join(self.root, safe + ".json")

    def get(self, unit: str) -> ManifestEntry | None:
        uri = self._uri(unit)
        if not exists(uri):
            return None
        d = read_json(uri)
        return ManifestEntry(d["unit"], d["status"], int(d.get("attempts", 0)), float(d["updated"]), d.get("info", {}))

    def is_done(self, unit: str) -> bool:
        e = self.get(unit)
        return e is not None and e.status == "done"

    def mark(self, unit: str, status: str, attempts: int | None = None, **info: Any) -> ManifestEntry:
        prev = self.get(unit)
        if attempts is None:
            attempts = prev.attempts if prev else 0
        entry = {"unit": unit, "status": status, "attempts": attempts, "updated": time.time(), "info": info}
        write_json(self._uri(unit), entry)
        return ManifestEntry(unit, status, attempts, entry["updated"], info)

    def entries(self) -> Iterator[ManifestEntry]:
        for uri in list_dir(self.root):
            if uri.endswith(".json") and not posixpath.basename(uri).startswith(".tmp-"):
                d = read_json(uri)
                yield ManifestEntry(d["unit"], d["status"], int(d.get("attempts", 0)), float(d["updated"]),
                                    d.get("info", {}))


def unique_suffix() -> str:
    return uuid.uuid4().hex[:8]


def bytes_io(uri: str) -> io.BytesIO:
    return io.BytesIO(read_bytes(uri))
