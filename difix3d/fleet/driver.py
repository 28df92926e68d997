"""The fleet driver: one Ray task per scene, all sharing one fixing pool, as many in flight as the cluster fits.

Resumable and idempotent through :class:`difix3d.storage.Manifest` under the output URI: scenes recorded ``done``
are skipped on a re-run, an interrupted scene resumes from its last round (``reconstruct_scene`` keeps its state
under the scene's output), a failing scene is retried up to ``max_attempts`` times (bad input fails at once) and
then recorded ``failed`` with its error while the rest go on.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from difix3d import storage
from difix3d.errors import InputError
from difix3d.inflight import InFlightBound

from .config import FleetConfig
from .fixers import open_fixer, pool_frames, pool_size, resolve_checkpoint, uses_gpu
from .inputs import SceneRef, adopt_recorded_ids, resolve_scenes, same_scene_key
from .progress import FleetProgress
from .scene_task import SceneFn, backend_problem, check_scene_settings, run_scene_task
from .summary import format_report, summary_rows, write_summary


@dataclass
class FleetReport:
    """What a run did: every scene's summary row, and which scenes this invocation ran or skipped."""

    output: str
    rows: list[dict[str, Any]]
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    summary_uri: str | None = None
    interrupted: bool = False

    def status_of(self, scene_id: str) -> str:
        return next(r["status"] for r in self.rows if r["scene_id"] == scene_id)

    @property
    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.rows:
            out[r["status"]] = out.get(r["status"], 0) + 1
        return out


@dataclass
class _Work:
    scene: SceneRef
    attempts: int = 0  # tries started, interrupted ones included
    failures: int = 0  # tries that ended in an error; bounded by max_attempts


def run_fleet(config: FleetConfig, *, scene_fn: SceneFn | None = None, fixer: Any = None,
              stop_after: int | None = None, echo: Callable[[str], None] = print) -> FleetReport:
    """Reconstruct every scene of ``config`` on the connected Ray cluster (``ray.init()`` first, or one starts here).

    ``scene_fn`` replaces the per-scene work (default: the progressive Difix3D+ loop) and ``fixer`` the shared
    pool; ``stop_after=N`` abandons the run after N scenes finished, as a killed driver would (for tests).
    """
    import ray

    # what a bad input can fail is checked first: before Ray starts (seconds) and before anything is written
    config.validate()
    if scene_fn is None:
        check_scene_settings(config)
    out = config.output
    check_same_results_settings(config)
    if fixer is None and config.checkpoint:
        from difix3d.pool.client import check_checkpoint_exists

        check_checkpoint_exists(config.checkpoint)
    scenes = resolve_scenes(config.scenes) if config.scenes else None
    if not ray.is_initialized():
        ray.init()
    storage.makedirs(out)
    storage.write_json(storage.join(out, "config.json"), config.to_dict())

    if scenes is None:
        scenes = synthetic_scenes(config, echo)
    manifest = storage.Manifest(out)
    scenes = adopt_recorded_ids(scenes, manifest)
    todo, skipped = plan(scenes, manifest, config)
    if skipped:
        echo(f"[fleet] {len(skipped)} scene(s) already finished in {out}: skipped")

    cluster = ray.cluster_resources()
    gpus = float(cluster.get("GPU", 0.0))
    use_gpu = uses_gpu(config, gpus)
    if config.device == "cuda" and gpus == 0 and todo:
        echo("[fleet] WARNING: --device cuda, but the Ray cluster has no GPU now: scene tasks wait until GPU nodes "
             "join (an autoscaling cluster adds them; a local one never will: Ctrl-C and use --device cpu or auto)")
    if todo and scene_fn is None and config.representation != "3dgs":  # checked where scene tasks run, not here
        problem = ray.get(ray.remote(backend_problem).options(**scene_task_options(config, use_gpu)).remote(
            config.representation))
        if problem:  # bad input, said in one line by the command line (a ValueError was a traceback)
            raise InputError(f"representation {config.representation}", problem)
    close = lambda: None  # noqa: E731
    if todo and fixer is None:
        checkpoint, notice = resolve_checkpoint(config.checkpoint)
        if notice:
            echo(f"[fleet] NOTE: {notice}")
        fixer, close = open_fixer(config, checkpoint, gpus if use_gpu else 0.0)

    report = FleetReport(output=out, rows=[], skipped=[s.scene_id for s in skipped])
    try:
        report.ran, report.interrupted = _stream(todo, manifest, config, scene_fn, fixer, use_gpu, cluster,
                                                 stop_after, len(skipped))
    finally:
        close()
    report.rows = summary_rows(scenes, {s.scene_id: manifest.get(s.scene_id) for s in scenes})
    if not report.interrupted:
        report.summary_uri = storage.join(out, "summary.parquet")
        write_summary(report.rows, report.summary_uri)
        echo(format_report(report.rows))
        echo(f"[fleet] results: {out} (summary.parquet, scenes/<id>/, config.json)")
    return report


# FleetConfig fields that change a scene's results (the synthetic ones: its input); the others (resources,
# retries, the scene list, progress) may change between runs of one output folder
RESULT_FIELDS = ("checkpoint", "recon_preset", "representation", "extra", "seed", "synthetic_frames",
                 "synthetic_height", "synthetic_width", "synthetic_points")


def check_same_results_settings(config: FleetConfig) -> None:
    """Refuse a run whose result settings differ from the output's ``config.json``: finished scenes are skipped, so
    the summary would mix scenes made under two settings while config.json named only the new ones."""
    uri = storage.join(config.output, "config.json")
    if not storage.exists(uri) or not any(True for _ in storage.Manifest(config.output).entries()):
        return  # no scene recorded yet (e.g. the pool could not start): the settings may be corrected
    saved, now = storage.read_json(uri), config.to_dict()
    changed = [f"{k} {saved[k]!r} -> {now[k]!r}" for k in RESULT_FIELDS if k in saved and saved[k] != now[k]]
    if changed:
        raise InputError(uri, f"this output holds scenes made with other settings ({'; '.join(changed)}); run with "
                              "the same settings, or write to another --output")


def plan(scenes: list[SceneRef], manifest: storage.Manifest, config: FleetConfig) -> tuple[list[_Work], list[SceneRef]]:
    """(work to do, scenes already done): failed scenes out of attempts stay failed unless ``retry_failed``."""
    todo, done = [], []
    for s in scenes:
        e = manifest.get(s.scene_id)
        earlier = e.info.get("scene_uri") if e is not None else None
        if earlier and same_scene_key(earlier) != same_scene_key(s.uri):  # another scene under the same id: its outputs must not pass for this one's
            raise InputError(storage.join(config.output, "scenes", s.scene_id),
                             f"holds scene {earlier}, not {s.uri} (both have the id {s.scene_id!r}); give the "
                             f"scenes distinct scene_id values in the manifest, or write to another --output")
        if e is not None and e.status == "done":
            done.append(s)
            continue
        failures = int(e.info.get("failures", 0)) if e is not None and not config.retry_failed else 0
        exhausted = failures >= config.max_attempts or e is not None and e.info.get("retryable") is False
        if e is not None and e.status == "failed" and exhausted and not config.retry_failed:
            continue
        todo.append(_Work(s, attempts=e.attempts if e is not None else 0, failures=failures))
    return todo, done


def scene_task_options(config: FleetConfig, use_gpu: bool) -> dict[str, Any]:
    """Resources of one scene task, declared here once; retries are the driver's (they go into the manifest)."""
    opts: dict[str, Any] = {"num_cpus": config.scene_num_cpus, "num_gpus": config.scene_num_gpus if use_gpu else 0,
                            "max_retries": 0}
    if config.scene_memory_gb > 0:
        opts["memory"] = int(config.scene_memory_gb * 2**30)
    return opts


def in_flight_limit(config: FleetConfig, cluster: dict[str, float], use_gpu: bool) -> int:
    """Scenes the cluster runs at once beside the pool's replicas, plus a few queued (autoscalers scale on demand)."""
    if config.max_in_flight > 0:
        return config.max_in_flight
    replicas, _, gpus_per_replica = pool_size(config, float(cluster.get("GPU", 0)) if use_gpu else 0.0)
    pool_cpus = replicas if config.fixer_mode == "pool" else 0  # a replica actor holds one CPU while it lives
    slots = (float(cluster.get("CPU", 1)) - pool_cpus) / max(config.scene_num_cpus, 1e-3)
    if use_gpu and config.scene_num_gpus > 0:
        free_gpus = float(cluster.get("GPU", 0)) - (replicas * gpus_per_replica if config.fixer_mode == "pool" else 0)
        slots = min(slots, free_gpus / config.scene_num_gpus)
    slots = max(1, int(slots + 1e-6))  # not //: 1 GPU // 0.1 is 9.0 in floats
    return slots + max(1, slots // 4)


def in_flight_bound(config: FleetConfig, use_gpu: bool, resources: Callable[[], dict[str, float]],
                    initial: dict[str, float], **kw) -> InFlightBound:
    """:func:`in_flight_limit`, re-read as an autoscaling cluster adds GPU nodes for the queued scene tasks."""
    return InFlightBound(lambda cluster: in_flight_limit(config, cluster, use_gpu), resources, initial,
                         fixed=config.max_in_flight or None, job="fleet", what="scenes", **kw)


def _stream(todo: list[_Work], manifest: storage.Manifest, config: FleetConfig, scene_fn, fixer, use_gpu: bool,
            cluster: dict[str, float], stop_after: int | None, already_done: int) -> tuple[list[str], bool]:
    """Submit scene tasks up to the in-flight bound, collect them with ray.wait, retry or record failures."""
    import ray

    task = ray.remote(run_scene_task)
    opts = scene_task_options(config, use_gpu)
    bound = in_flight_bound(config, use_gpu, ray.cluster_resources, cluster)
    queue = collections.deque(todo)
    running: dict[Any, _Work] = {}
    ran: list[str] = []
    progress = FleetProgress(len(todo), enabled=config.progress, already_done=already_done)
    try:
        while queue or running:
            limit = bound.current()
            while queue and len(running) < limit:
                w = queue.popleft()
                w.attempts += 1
                manifest.mark(w.scene.scene_id, "running", attempts=w.attempts, failures=w.failures,
                              scene_uri=w.scene.uri, submitted=time.time())
                ref = task.options(**opts, name=f"scene:{w.scene.scene_id}").remote(
                    scene_fn, w.scene, config, fixer, w.attempts, config.scene_num_cpus)
                running[ref] = w
            progress.started(len(running), pool_frames(fixer))
            ready, _ = ray.wait(list(running), num_returns=1, timeout=5.0)
            for ref in ready:
                w = running.pop(ref)
                res = _result_of(ref)
                if res["ok"]:
                    ran.append(w.scene.scene_id)
                    progress.finished(w.scene.scene_id, True, res.get("frames_fixed", 0), len(running),
                                      f"in {res.get('seconds', 0):.1f}s")
                    continue
                recorded = manifest.get(w.scene.scene_id)
                if recorded is not None and recorded.status == "done":  # it finished, then its worker was lost
                    ran.append(w.scene.scene_id)
                    progress.finished(w.scene.scene_id, True, int(recorded.info.get("frames_fixed", 0)),
                                      len(running), "(recorded done before its worker was lost)")
                    continue
                w.failures += 1
                retry = res.get("retryable", True) and w.failures < config.max_attempts
                manifest.mark(w.scene.scene_id, "failed", attempts=w.attempts, failures=w.failures,
                              retryable=bool(res.get("retryable", True)), scene_uri=w.scene.uri,
                              error=res["error"], traceback=res.get("traceback", ""),
                              started=res.get("started"), finished=res.get("finished"))
                if retry:
                    progress.retrying(w.scene.scene_id, res["error"])
                    queue.append(w)
                else:
                    ran.append(w.scene.scene_id)
                    progress.finished(w.scene.scene_id, False, 0, len(running), res["error"])
            if stop_after is not None and len(ran) >= stop_after and (queue or running):
                _cancel(running)
                return ran, True
    except KeyboardInterrupt:
        _cancel(running)
        print(f"\n[fleet] interrupted: re-run the same command to resume (finished scenes are kept in "
              f"{config.output})", flush=True)
        raise
    finally:
        progress.close()
    return ran, False


def _result_of(ref) -> dict[str, Any]:
    """The task's own result, or a retryable error when the task died (worker crash, OOM kill, node loss)."""
    import ray

    try:
        return ray.get(ref)
    except Exception as e:  # noqa: BLE001 - a system failure of one scene task
        return {"ok": False, "retryable": True, "error": f"{type(e).__name__}: {str(e)[:2000]}"}


def _cancel(running: dict[Any, _Work]) -> None:
    import ray

    for ref in running:
        ray.cancel(ref, force=True)
    running.clear()


def synthetic_scenes(config: FleetConfig, echo: Callable[[str], None] = print) -> list[SceneRef]:
    """The embedded demo's input: ``synthetic_scenes`` tiny driving segments under ``<output>/inputs/`` (made once)."""
    from difix3d.scene.synthetic import make_segment

    refs = []
    for i in range(config.synthetic_scenes):
        sid = f"synthetic-{i:03d}"
        uri = storage.join(config.output, "inputs", sid)
        marker = storage.join(uri, ".complete")
        if not storage.exists(marker):
            echo(f"[fleet] generating synthetic driving segment {uri}")
            make_segment(uri, seed=config.seed + i, frames=config.synthetic_frames, height=config.synthetic_height,
                         width=config.synthetic_width, num_points=config.synthetic_points)
            storage.write_text(marker, "")
        refs.append(SceneRef(sid, uri))
    return refs
