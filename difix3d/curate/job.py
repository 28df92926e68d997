"""The curation job: one Ray task per (scene, strategy), each writing its filtered pairs as Parquet shards.

Output layout under ``CurateConfig.output`` (any storage URI)::

    shards/{scene_id}-{strategy}-{k:05d}.parquet   pair shards (difix3d.train.pairs schema)
    _manifest/…                                     one record per unit: done (shards, counts) / failed (error)
    config.json, summary.json                       the run's settings; kept/dropped counts and failures

Re-running the same command skips units the manifest marks done, retries failed ones up to ``max_attempts``;
a bad scene fails its own units only (the error names the file) and the job goes on. A re-run whose pair settings
differ from ``config.json`` is refused: the output would mix two curations under one record.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

from difix3d import storage
from difix3d.curate.filters import FilterCounts, PsnrFilter
from difix3d.curate.strategies import (STRATEGIES, CrossCamera, CurationStrategy, CycleReconstruction, NotApplicable,
                                       ReconstructionSettings, SparseReconstruction, UnderFitted)
from difix3d.errors import InputError
from difix3d.inflight import InFlightBound
from difix3d.settings import nested_changes
from difix3d.fleet.inputs import SceneRef, adopt_ids, resolve_scenes
from difix3d.train.pairs import SHARD_SUFFIX, SHARDS_DIR, write_pair_shard

log = logging.getLogger(__name__)

# config fields that decide which pairs a unit makes; inside them, _NOT_PAIRS only change how they are computed
PAIR_SETTINGS = ("sparse", "cross_camera", "underfit", "cycle", "recon", "filter")
_NOT_PAIRS = frozenset({"device", "render_batch", "render_chunk", "backend"})


@dataclass
class CurateConfig:
    scenes: str = ""  # scene manifest: .parquet/.json list, glob, folder of scenes, or comma list (fleet.inputs)
    output: str = "curated"  # output URI
    strategies: tuple[str, ...] = ("sparse", "cross_camera", "underfit", "cycle")
    sparse: SparseReconstruction = field(default_factory=SparseReconstruction)
    cross_camera: CrossCamera = field(default_factory=CrossCamera)
    underfit: UnderFitted = field(default_factory=UnderFitted)
    cycle: CycleReconstruction = field(default_factory=CycleReconstruction)
    recon: ReconstructionSettings = field(default_factory=ReconstructionSettings)
    filter: PsnrFilter = field(default_factory=PsnrFilter)
    shard_size: int = 256  # pairs per shard (~256 × 3 PNGs at 576×1024 ≈ 0.5 GB)
    max_attempts: int = 2  # a failed unit is retried by later runs until it has failed this often
    cpus_per_task: float = 1.0
    gpus_per_task: float | None = None  # None: 1 when the cluster has GPUs, else 0
    max_in_flight: int = 0  # tasks submitted at once (0: as many as the cluster can run)

    def strategy(self, name: str) -> CurationStrategy:
        """The settings of strategy ``name``, checked (ValueError naming a bad one)."""
        if name not in STRATEGIES:
            raise ValueError(f"unknown strategy {name!r} (known: {sorted(STRATEGIES)})")
        strategy = getattr(self, name)
        strategy.check()
        return strategy

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "strategies": list(self.strategies)}


@dataclass
class CurationReport:
    units: dict[str, dict[str, Any]]  # unit -> {"status", "shards", "pairs", "counts", "error", ...}
    counts: FilterCounts  # kept / dropped per strategy over every done unit (this run's and earlier ones)
    skipped: list[str]  # units already done before this run
    given_up: list[str] = field(default_factory=list)  # failed max_attempts times before this run: not run again
    seconds: float = 0.0

    @property
    def failed(self) -> dict[str, str]:
        return {u: r.get("error", "") for u, r in self.units.items() if r["status"] == "failed"}

    @property
    def not_applicable(self) -> dict[str, str]:
        """Units whose strategy did not apply to their scene (no test views, no such camera...), with the reason."""
        return {u: r.get("error", "") for u, r in self.units.items() if r.get("outcome") == "not_applicable"}

    def unit_seconds_by_strategy(self) -> dict[str, float]:
        """Task seconds summed per strategy over done units: where a fleet's curation time goes."""
        out: dict[str, float] = {}
        for r in self.units.values():
            if r["status"] == "done":
                out[r.get("strategy", "")] = out.get(r.get("strategy", ""), 0.0) + float(r.get("seconds", 0.0))
        return dict(sorted(out.items()))

    @property
    def shards(self) -> list[str]:
        return sorted(s for r in self.units.values() if r["status"] == "done" for s in r.get("shards", []))


def unit_name(scene_id: str, strategy: str) -> str:
    return f"{scene_id}/{strategy}"


def run_curation(config: CurateConfig, scenes: list[SceneRef] | None = None, progress: bool = True) -> CurationReport:
    """Curate every (scene, strategy) unit not yet done, on the Ray cluster ``ray.init()`` joined (or starts)."""
    import ray

    t0 = time.perf_counter()
    scenes = scenes if scenes is not None else resolve_scenes(config.scenes)
    if len(set(config.strategies)) != len(config.strategies):  # twice: two tasks writing one unit's shards at once
        raise ValueError(f"strategies: each once, got {list(config.strategies)}")
    for name in config.strategies:
        config.strategy(name)  # unknown names and bad settings fail before any work starts
    manifest = storage.Manifest(config.output)
    check_settings(config, manifest)
    storage.write_json(storage.join(config.output, "config.json"), config.to_dict())
    scenes = adopt_recorded_scene_ids(scenes, manifest)
    todo, skipped, given_up = plan(scenes, config, manifest)
    if not ray.is_initialized():
        ray.init()
    cluster = ray.cluster_resources()
    if cluster.get("GPU", 0) <= 0 and config.gpus_per_task is None and todo:
        log.info("curate: no GPU in the cluster now, so units run on CPUs until one joins; to keep them all for GPU "
                 "nodes an autoscaler adds, pass --gpus-per-task 1")
    bound = in_flight_bound(config, None, ray.cluster_resources, cluster)
    for unit, result in _stream(UnitTask(config, bound), todo, config, bound, progress):
        prev = manifest.get(unit)
        attempts = (prev.attempts if prev else 0) + 1
        info = {**{k: v for k, v in result.items() if k != "status"}, "outcome": result["status"]}
        manifest.mark(unit, "done" if result["status"] in ("done", "not_applicable") else "failed", attempts, **info)
        if result["status"] == "failed":
            log.warning("curation unit %s failed: %s", unit, result.get("error"))
    report = summarize(scenes, config, manifest, skipped, given_up)
    report.seconds = time.perf_counter() - t0
    storage.write_json(storage.join(config.output, "summary.json"), {
        "counts": report.counts.to_dict(), "failed": report.failed, "skipped": report.skipped,
        "given_up": report.given_up, "not_applicable": report.not_applicable,
        "shards": len(report.shards), "pairs": report.counts.total("kept"), "seconds": report.seconds,
        "unit_seconds_by_strategy": report.unit_seconds_by_strategy()})
    return report


def check_settings(config: CurateConfig, manifest: storage.Manifest | None = None) -> None:
    """Refuse to curate into an output whose ``config.json`` records other pair settings (:data:`PAIR_SETTINGS`):
    its shards were made with those, and the new record would misdescribe them. Fields the old record lacks count
    as unchanged; worker counts, resources and other fields that do not change the pairs are not compared. An
    output with no finished unit in ``manifest`` holds no pairs yet: any settings may start over there."""
    uri = storage.join(config.output, "config.json")
    if not storage.exists(uri):
        return
    if manifest is not None and not any(e.status == "done" and e.info.get("shards") for e in manifest.entries()):
        return  # no unit wrote pairs (none finished, or none applied): nothing the new settings would misdescribe
    saved = storage.read_json(uri)
    if not isinstance(saved, dict):
        raise InputError(uri, "not a curation config (expected a JSON object)")
    now = json.loads(json.dumps(config.to_dict(), default=storage._json_default))  # tuples -> lists, as saved
    changes = [f"{key} {old!r} -> {new!r}" for k in PAIR_SETTINGS if k in saved and k in now
               for key, old, new in nested_changes(saved[k], now[k], k, _NOT_PAIRS)]
    if changes:
        raise InputError(uri, f"this output holds pairs curated with other settings ({'; '.join(changes)}); "
                              "re-run with the earlier settings, or write to a new output folder")


def adopt_recorded_scene_ids(scenes: list[SceneRef], manifest: storage.Manifest) -> list[SceneRef]:
    """Scenes an earlier run curated under another id (a folder name that only now clashes with another scene's
    gets a hash) keep that id: their units are found done instead of curated again beside their old shards."""
    entries = [e for e in manifest.entries() if e.info.get("scene") and e.info.get("uri")]
    recorded = {storage.normalized(e.info["uri"]): e.info["scene"] for e in entries}
    return adopt_ids(scenes, recorded, {e.info["scene"] for e in entries})


def plan(scenes: list[SceneRef], config: CurateConfig, manifest: storage.Manifest
         ) -> tuple[list[tuple[str, SceneRef, str]], list[str], list[str]]:
    """(units to run as (unit, scene, strategy), units already done, units given up on after max_attempts)."""
    todo, skipped, given_up = [], [], []
    for ref in scenes:
        for name in config.strategies:
            unit = unit_name(ref.scene_id, name)
            entry = manifest.get(unit)
            recorded = entry.info.get("uri") if entry is not None else None
            if recorded and storage.normalized(recorded) != storage.normalized(ref.uri):
                raise InputError(storage.join(config.output, "_manifest"),
                                 f"scene id {ref.scene_id!r} was curated from {recorded}, not {ref.uri}: give the "
                                 "scenes distinct scene_ids, or write to a new output folder")
            if entry is not None and entry.status == "done":
                skipped.append(unit)
            elif entry is not None and entry.status == "failed" and entry.attempts >= config.max_attempts:
                given_up.append(unit)  # its failure stays in the manifest
            else:
                todo.append((unit, ref, name))
    return todo, skipped, given_up


class UnitTask:
    """:func:`curate_unit` as a Ray task whose resources follow the cluster: with ``gpus_per_task`` unset, a unit
    submitted while the cluster has no GPU runs on CPUs, and one submitted after a GPU node has joined (as
    ``bound.cluster`` last read it) takes a GPU. The bound then counts GPU slots, so the CPU units still running are
    extra to it (:meth:`uncounted`): the GPUs fill at once instead of after the CPU units end."""

    def __init__(self, config: CurateConfig, bound: InFlightBound):
        import ray

        self.bound, self.config = bound, config
        self.tasks = {gpu: ray.remote(curate_unit).options(**unit_task_options(config, gpu)) for gpu in (False, True)}
        self.use_gpu = self.gpu_now()
        self.on_cpu: set = set()  # object refs of the units submitted without a GPU

    def gpu_now(self) -> bool:
        return self.config.gpus_per_task is None and self.bound.cluster.get("GPU", 0) > 0

    def remote(self, ref: SceneRef, name: str, config: CurateConfig):
        use_gpu = self.gpu_now()
        if use_gpu != self.use_gpu:
            log.info("curate: %s; the next units run on %s", "a GPU joined the cluster" if use_gpu else
                     "the cluster has no GPU now", "GPUs" if use_gpu else "CPUs")
        self.use_gpu = use_gpu
        out = self.tasks[use_gpu].remote(ref, name, config)
        if not use_gpu:
            self.on_cpu.add(out)
        return out

    def uncounted(self, running: Iterable) -> int:
        """In-flight units the bound does not count: those on CPUs while new units go to GPUs."""
        self.on_cpu &= set(running)
        return len(self.on_cpu) if self.gpu_now() else 0


def unit_task_options(config: CurateConfig, use_gpu: bool) -> dict[str, Any]:
    """Resources of one (scene, strategy) task: it fits one or two 3DGS models on one GPU (or CPU)."""
    gpus = config.gpus_per_task if config.gpus_per_task is not None else (1.0 if use_gpu else 0.0)
    return {"num_cpus": config.cpus_per_task, "num_gpus": gpus, "max_retries": 0}


def in_flight_limit(config: CurateConfig, cluster: dict[str, float], use_gpu: bool) -> int:
    """Units the cluster's CPUs (and GPUs, when a unit takes some) run at once, plus a few queued: an autoscaler
    adds nodes for pending tasks only."""
    if config.max_in_flight > 0:
        return config.max_in_flight
    opts = unit_task_options(config, use_gpu)
    slots = float(cluster.get("CPU", 1)) / max(opts["num_cpus"], 1e-3)
    if opts["num_gpus"] > 0:
        slots = min(slots, float(cluster.get("GPU", 0)) / opts["num_gpus"])
    slots = max(1, int(slots + 1e-6))  # 7 GPUs / 0.07 each: 100 tasks (99.99999999999999 in floats)
    return slots + max(1, slots // 4)


def in_flight_bound(config: CurateConfig, use_gpu: bool | None, resources: Callable[[], dict[str, float]],
                    initial: dict[str, float], **kw) -> InFlightBound:
    """:func:`in_flight_limit`, re-read as an autoscaling cluster adds (or drops) nodes; ``use_gpu=None``: units take
    a GPU whenever the cluster has one at that reading (as :class:`UnitTask` places them)."""
    def limit(cluster: dict[str, float]) -> int:
        return in_flight_limit(config, cluster, cluster.get("GPU", 0) > 0 if use_gpu is None else use_gpu)

    return InFlightBound(limit, resources, initial,
                         fixed=config.max_in_flight or None, job="curate", what="units", **kw)


def curate_unit(scene: SceneRef, strategy_name: str, config: CurateConfig) -> dict[str, Any]:
    """Run one strategy on one scene and write its kept pairs as shards → a result dict that never raises:
    ``{"status": "done" | "not_applicable" | "failed", "shards", "pairs", "counts", "seconds", "error"}``."""
    from difix3d.scene.scene import load_scene
    from difix3d.scene.undistort import undistorted

    t0 = time.perf_counter()
    counts = FilterCounts()
    written: list[str] = []
    try:
        _delete_unit_shards(config, scene.scene_id, strategy_name)  # an earlier attempt killed mid-way left them
        # 3DGS renders pinhole cameras: distorted images would be targets out of register with their renders, a warp
        # the fixer would learn (and never see at inference, where the fleet undistorts too)
        loaded = undistorted(load_scene(scene.uri))
        pairs = config.strategy(strategy_name).make_pairs(loaded, config.recon)
        for k, rows in enumerate(_chunks(config.filter.apply(pairs, counts), config.shard_size)):
            uri = _shard_uri(config, scene.scene_id, strategy_name, k)
            write_pair_shard(uri, rows)
            written.append(uri)
        status, error = "done", ""
    except NotApplicable as e:
        status, error = "not_applicable", str(e)
    except Exception as e:  # noqa: BLE001 — any failure is this unit's alone; recorded, the job goes on
        _delete_unit_shards(config, scene.scene_id, strategy_name)  # none of a failed unit's for the reader to find
        written = []
        log.debug("unit %s/%s failed:\n%s", scene.scene_id, strategy_name, traceback.format_exc())
        status, error = "failed", f"{type(e).__name__}: {e}"
    return {"status": status, "scene": scene.scene_id, "uri": scene.uri, "strategy": strategy_name,
            "shards": written, "pairs": counts.total("kept"), "counts": counts.to_dict(),
            "seconds": time.perf_counter() - t0, "error": error}


def _shard_uri(config: CurateConfig, scene_id: str, strategy: str, k: int) -> str:
    return storage.join(config.output, SHARDS_DIR, f"{scene_id}-{strategy}-{k:05d}{SHARD_SUFFIX}")


def _delete_unit_shards(config: CurateConfig, scene_id: str, strategy: str) -> None:
    """Delete the unit's shard files. A unit writes them numbered from 0, in order, and each write is atomic, so
    what any earlier attempts left is shards 0..m-1: deleting up to the first missing number gets them all."""
    k = 0
    while storage.exists(uri := _shard_uri(config, scene_id, strategy, k)):
        storage.delete(uri)
        k += 1


def summarize(scenes: list[SceneRef], config: CurateConfig, manifest: storage.Manifest,
              skipped: list[str], given_up: list[str] | None = None) -> CurationReport:
    """Every unit of this run's scenes × strategies as the manifest now records it."""
    units, counts = {}, FilterCounts()
    for ref in scenes:
        for name in config.strategies:
            unit = unit_name(ref.scene_id, name)
            entry = manifest.get(unit)
            if entry is None:
                continue
            units[unit] = {**entry.info, "status": entry.status, "attempts": entry.attempts}
            if entry.status == "done":
                counts.merge(entry.info.get("counts", {}))
    return CurationReport(units=units, counts=counts, skipped=skipped, given_up=list(given_up or []))


def _stream(task, todo: list[tuple[str, SceneRef, str]], config: CurateConfig, bound: InFlightBound,
            progress: bool) -> Iterator[tuple[str, dict]]:
    """Submit at most ``bound.current()`` tasks at once; yield (unit, result) as they finish. A task that dies
    (worker crash, OOM kill) yields a failed result instead of ending the job."""
    import ray
    from tqdm.auto import tqdm

    pending, running = list(todo), {}
    uncounted = getattr(task, "uncounted", None)  # UnitTask: CPU units still running once GPUs take new ones
    bar = tqdm(total=len(todo), disable=not progress, desc="curate", unit="unit", dynamic_ncols=True)
    while pending or running:
        limit = bound.current() + (uncounted(running) if uncounted else 0)
        while pending and len(running) < limit:
            unit, ref, name = pending.pop(0)
            running[task.remote(ref, name, config)] = (unit, ref, name)
        done, _ = ray.wait(list(running), num_returns=1, timeout=5.0)  # wake to re-read the bound as nodes join
        for ref_done in done:
            unit, ref, name = running.pop(ref_done)
            try:
                result = ray.get(ref_done)
            except Exception as e:  # noqa: BLE001 — the task itself died
                _delete_unit_shards(config, ref.scene_id, name)  # what it wrote before dying: not for the reader
                result = {"status": "failed", "scene": ref.scene_id, "uri": ref.uri, "strategy": name, "shards": [],
                          "pairs": 0, "counts": {}, "error": f"{type(e).__name__}: {e}"}
            bar.update(1)
            bar.set_postfix(unit=unit, status=result["status"], pairs=result.get("pairs", 0), refresh=False)
            yield unit, result
    bar.close()


def _chunks(items: Iterable[dict], size: int) -> Iterator[list[dict]]:
    chunk: list[dict] = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
