"""``finetune(config)``: a Ray Train ``TorchTrainer`` running :func:`~difix3d.train.loop.train_loop_per_worker`.

The run lives at ``<storage_path>/<name>``: re-running with the same two resumes from its latest checkpoint, and
``FailureConfig(max_failures)`` restarts the worker group from it after a worker or node failure.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
from dataclasses import dataclass
from typing import Any

from difix3d import storage
from difix3d.train.config import FinetuneConfig
from difix3d.train.losses import build_perceptual_net

log = logging.getLogger(__name__)

PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"  # Ray Train's switch; see _preemption_watcher_off


@dataclass
class FinetuneResult:
    """What a finished run left behind."""

    final_uri: str  # the exported model (our checkpoint format; FixerRunner.from_checkpoint / load_checkpoint)
    checkpoint_path: str | None  # the latest Ray Train checkpoint folder (model/ + train_state.pt)
    metrics: dict[str, Any]  # last reported metrics
    summary: dict[str, Any]  # rank 0's summary (start/end step, rows seen, skipped rows)
    run_uri: str


def with_absolute_paths(config: FinetuneConfig) -> FinetuneConfig:
    """Relative local paths in ``config`` made absolute: workers resolve paths from Ray's session folder, so a
    relative ``pairs/`` was not found there and a relative storage path wrote the run into that folder."""
    paths = {"train_shards": config.train_shards, "val_shards": config.val_shards,
             "storage_path": config.storage_path, "export_uri": config.export_uri}
    changes = {k: storage.absolute(v) for k, v in paths.items()}
    for name in ("init", "base", "perceptual_weights"):  # presets, hub ids and keywords stay as they are
        value = getattr(config, name)
        if value and storage.is_local(value) and os.path.exists(os.path.expanduser(value)):
            changes[name] = storage.absolute(value)
    return dataclasses.replace(config, **changes)


def worker_env(config: FinetuneConfig) -> dict[str, str]:
    """Environment of each training worker.

    The CUDA allocator uses expandable segments unless the user set ``PYTORCH_CUDA_ALLOC_CONF``: a 576x1024 step
    frees and reallocates full-resolution activations of many sizes, and fixed segments leave gigabytes reserved but
    unusable (sd-turbo with the reference view fits a 23 GiB cap only this way; benchmarks/RESULTS.md).
    """
    return {"OMP_NUM_THREADS": str(max(1, int(config.cpus_per_worker))),
            "PYTORCH_CUDA_ALLOC_CONF": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")}


def check_shards(config: FinetuneConfig) -> None:
    """The training (and validation) shards exist and each footer holds the pair columns: an InputError naming the
    shard, on the driver. Workers would find the same, but only after Ray Train's restarts."""
    from difix3d.train.data import ShardIndex

    ShardIndex.build(config.train_shards)
    if config.val_shards:
        ShardIndex.build(config.val_shards)


def check_init(config: FinetuneConfig) -> None:
    """A new run's ``init`` checkpoint exists and is one the loaders know: checked on the driver, since a worker
    finding it missing fails every restart of the worker group alike. A run with checkpoints of its own resumes
    from those and needs no ``init``."""
    from difix3d.fixer.checkpoint import detect_format
    from difix3d.fixer.config import PRESETS

    if config.init in PRESETS and not config.train_vae:  # a random autoencoder, frozen: nothing to reconstruct with
        log.warning("init %r is a preset with random weights and the VAE stays frozen (--train-vae off): the fixer "
                    "cannot even reproduce its input; pass --train-vae, or start from a trained fixer (--init "
                    "bundled, or a checkpoint)", config.init)
    if config.init in PRESETS or config.init == "bundled":
        return
    if has_checkpoints(config):
        return
    if "/" not in config.init and "." not in config.init and not storage.exists(config.init):  # a mistyped preset
        from difix3d.errors import MissingWeightsError

        raise MissingWeightsError(f"{config.init}: no such checkpoint, nor a preset (init takes "
                                  f"{' | '.join([*PRESETS, 'bundled'])} or a checkpoint URI)")
    detect_format(config.init)  # MissingWeightsError / CheckpointError naming the location


CONFIG_RECORD = "finetune_config.json"


def has_checkpoints(config: FinetuneConfig) -> bool:
    """Whether the run already saved Ray Train checkpoints: a re-run resumes from them, not from ``init``."""
    return any(os.path.basename(u.rstrip("/")).startswith("checkpoint_") for u in storage.list_dir(config.run_uri()))


def check_resume_settings(config: FinetuneConfig) -> None:
    """A re-run of a run that has checkpoints resumes from them: refuse a changed ``init`` (where its weights
    started) or a change to what the workers check against each checkpoint (the optimizer setup and the pair stream,
    ``difix3d.train.loop``), comparing with the run's record (``finetune_config.json``) before it is rewritten or
    anything trains."""
    from difix3d.errors import InputError
    from difix3d.train.loop import _OPTIMIZER_SETUP, _STREAM_SETUP

    record = storage.join(config.run_uri(), CONFIG_RECORD)
    if not storage.exists(record) or not has_checkpoints(config):
        return
    try:
        saved = storage.read_json(record)
    except ValueError as e:
        raise InputError(record, f"not a readable run record ({e}); move it aside to resume") from e
    now = config.to_dict()
    changed = [f"{k} {saved[k]!r} -> {now[k]!r}" for k in ("init", *_OPTIMIZER_SETUP, *_STREAM_SETUP)
               if isinstance(saved, dict) and k in saved and saved[k] != now[k]]
    if changed:
        raise InputError(record, f"this run resumes from its checkpoints, which were trained with other settings "
                                 f"({'; '.join(changed)}): re-run with the recorded settings, or start a new --name")


def finetune(config: FinetuneConfig, _shards_checked: bool = False) -> FinetuneResult:
    """Run (or resume) a fine-tuning job on the Ray cluster this process is connected to. (``_shards_checked``: the
    CLI checked the shards before starting Ray; their footers are not read twice.)"""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from difix3d.fixer.checkpoint import SD_TURBO_ENV
    from difix3d.train.loop import INPUT_ERROR_FILE, recorded_input_error, train_loop_per_worker

    if config.base is None and os.environ.get(SD_TURBO_ENV):  # workers may run on machines without the variable
        config = dataclasses.replace(config, base=os.environ[SD_TURBO_ENV])
    config = with_absolute_paths(config)  # Ray Train workers run in another working folder than the driver
    if not _shards_checked:
        check_shards(config)  # fail here, naming the shard, rather than inside every worker after Ray's restarts
    check_init(config)
    storage.delete(storage.join(config.run_uri(), INPUT_ERROR_FILE))  # a re-run after fixing the data starts clean
    if config.perceptual_weights != "random" and (config.loss.lpips > 0 or config.loss.gram > 0):
        build_perceptual_net(config.perceptual_weights)  # MissingWeightsError before any worker starts
    storage_fs, storage_root = storage.resolve(config.storage_path)
    check_resume_settings(config)  # before the record below is rewritten with this run's settings
    config.write(storage.join(config.run_uri(), CONFIG_RECORD))
    resources = {"CPU": config.cpus_per_worker} | ({"GPU": 1} if config.use_gpu else {})
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config.to_dict(),
        scaling_config=ScalingConfig(num_workers=config.num_workers, use_gpu=config.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=config.name, storage_path=storage_root, storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=config.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=config.num_to_keep),
            worker_runtime_env={"env_vars": worker_env(config)},
        ),
    )
    try:
        with _preemption_watcher_off():
            result = trainer.fit()
        if result.error is not None:
            raise result.error
    except Exception as e:
        bad_input = recorded_input_error(config)  # names the file; Ray's own error names only the worker
        if bad_input is not None:
            raise bad_input from e
        raise
    summary = result.return_value or {}
    return FinetuneResult(final_uri=config.final_uri(),
                          checkpoint_path=result.checkpoint.path if result.checkpoint else None,
                          metrics=dict(result.metrics or {}), summary=summary, run_uri=config.run_uri())


@contextlib.contextmanager
def _preemption_watcher_off():
    """Ray Train's preemption watcher off for the runs started inside, unless the user set its variable.

    Ray Train starts a ``PreemptionWatcher`` actor (max_restarts=-1) with the workers' actor handles as constructor
    arguments, and Ray Core logs that at ERROR level on every run ("has constructor arguments in the object store and
    max_restarts > 0", ray-project/ray#53727): an alarm that means nothing here. The watcher gives advance notice of
    node drains (``ray.train.get_preemption_info``, which the loop does not read); without it a worker lost to a
    preempted node still restarts the group from the latest checkpoint (``max_preemption_failures``). Ray hands the
    variable from the driver to its controller in ``fit()``.
    """
    global _WATCHER_RUNS
    with _WATCHER_LOCK:  # runs in several threads of one process share the variable: the first sets it, the last
        ours = _WATCHER_RUNS > 0 or PREEMPTION_WATCHER_ENV not in os.environ  # clears it; a user's value stays
        if ours:
            _WATCHER_RUNS += 1
            os.environ[PREEMPTION_WATCHER_ENV] = "0"
    try:
        yield
    finally:
        if ours:
            with _WATCHER_LOCK:
                _WATCHER_RUNS -= 1
                if _WATCHER_RUNS == 0:
                    os.environ.pop(PREEMPTION_WATCHER_ENV, None)


_WATCHER_LOCK = threading.Lock()
_WATCHER_RUNS = 0  # fine-tuning runs in this process inside _preemption_watcher_off
