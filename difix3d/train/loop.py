"""The per-worker Ray Train function: DDP fine-tuning of Difix on pair shards, with checkpoints and resume.

Every rank runs :func:`train_loop_per_worker`; ``ray.train.report`` is a barrier, so all ranks report at the same
steps (log, validation and checkpoint steps are decided by the step counter alone). A checkpoint folder holds
``model/`` (our fixer format, loadable by ``load_checkpoint``) and ``train_state.pt`` (optimizer, the names of its
parameters, step, every rank's data-stream position), so a restarted worker group or a re-run job continues where it
stopped.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import sys
import tempfile
import time
from typing import Any

import torch
import torch.distributed as dist

from difix3d import storage
from difix3d.errors import CheckpointError, InputError
from difix3d.train.config import FinetuneConfig
from difix3d.train.data import PairStream, ShardIndex, batches, collate_pairs, read_rows
from difix3d.train.losses import DifixLoss, build_perceptual_net
from difix3d.train.optim import (build_optimizer, load_optimizer_state, trained_parameter_names,
                                 trained_parameter_names_before_decoder_only_lora)
from difix3d.train.validate import validation_sums, write_sample_grid
from difix3d.train.views import AllViewsFixer, training_targets

log = logging.getLogger(__name__)

MODEL_DIR = "model"
STATE_FILE = "train_state.pt"
INPUT_ERROR_FILE = "input-error.json"  # written by the worker that met bad input (see train_loop_per_worker)
MAX_RECORDED_IDS = 10_000  # rows named in a worker's summary (enough to audit small runs, bounded for big ones)


# settings a saved optimizer state depends on, with their values in checkpoints written before they existed
_OPTIMIZER_SETUP = {"optimizer": "adamw", "train_vae": False}
# settings the saved position in the pair stream depends on: another row order would train some rows twice and
# skip others (None: not recorded by older checkpoints, not checked)
_STREAM_SETUP = ("train_shards", "seed", "shuffle_window")


def _check_same_optimizer_setup(cfg: FinetuneConfig, saved: dict[str, Any]) -> None:
    """A resumed run must train the same parameters with the same optimizer, or its saved state does not fit, and
    read the same shards in the same order, or its saved stream position means other rows."""
    checks = [(name, saved.get(name, default), "its saved optimizer state does not fit")
              for name, default in _OPTIMIZER_SETUP.items()]
    checks += [(name, saved.get(name), "its saved position in the training pairs would point at other rows")
               for name in _STREAM_SETUP if name in saved]
    for name, was, why in checks:
        now = getattr(cfg, name)
        if was != now:
            # an InputError: recorded, so a restarted worker group fails at once instead of Ray retrying it
            raise InputError(cfg.run_uri(), f"the run was started with {name}={was!r} and is resumed with "
                                            f"{name}={now!r}: {why}; resume with the same setting or start a new "
                                            "--name")


def _due(step: int, every: int, steps: int) -> bool:
    """A cadence: every ``every`` steps and at the last one (``every`` 0: only at the last)."""
    return step == steps or (every > 0 and step % every == 0)


def _apply_optimizer_settings(cfg: FinetuneConfig, opt: torch.optim.Optimizer) -> None:
    """The configured lr, betas, eps and weight decay on every param group: loading a saved state restores the saved
    ones, and a resumed run is told to train with its new settings (a changed lr is logged)."""
    wanted = {"lr": cfg.lr, "betas": tuple(cfg.betas), "eps": cfg.eps, "weight_decay": cfg.weight_decay}
    changed = set()
    for group in opt.param_groups:
        for key, value in wanted.items():
            if key not in group:
                continue
            old = group[key]
            if isinstance(old, torch.Tensor):  # torchao keeps lr as a tensor (no recompile when it changes)
                if float(old) != value:
                    changed.add(f"{key} {float(old):g} -> {value:g}")
                old.fill_(value)
            else:
                if (tuple(old) if isinstance(old, (tuple, list)) else old) != value:
                    changed.add(f"{key} {old} -> {value}")
                group[key] = value
    if changed:
        log.warning("resumed with new optimizer settings: %s", ", ".join(sorted(changed)))


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Fine-tune on this worker's slice of the pair shards; returns a summary (rank 0's is the run's result).

    Bad input (a corrupt row, a checkpoint that does not load) is recorded in the run's ``input-error.json``: a
    worker group restarted after it fails at once instead of training up to the same row, and the driver raises the
    recorded error, which names the file (see :func:`recorded_input_error`).
    """
    cfg = FinetuneConfig.from_dict(config)
    record = storage.join(cfg.run_uri(), INPUT_ERROR_FILE)
    if storage.exists(record):
        raise recorded_input_error(cfg)  # the same data fails the same way on every restart
    try:
        return _train(cfg)
    except InputError as e:
        try:
            storage.write_json(record, {"type": type(e).__name__, "source": e.source, "problem": e.problem})
        except Exception as write_error:  # noqa: BLE001 - the input error is the one to raise
            log.warning("could not record the input error in %s: %s", record, write_error)
        raise


def recorded_input_error(cfg: FinetuneConfig) -> InputError | None:
    """The bad-input error a worker of this run recorded, or None."""
    record = storage.join(cfg.run_uri(), INPUT_ERROR_FILE)
    if not storage.exists(record):
        return None
    e = storage.read_json(record)
    return (CheckpointError if e.get("type") == "CheckpointError" else InputError)(e["source"], e["problem"])


def _train(cfg: FinetuneConfig) -> dict[str, Any]:
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()

    if device.type == "cuda" and cfg.gpu_memory_limit_gib > 0:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cfg.gpu_memory_limit_gib * 2**30 / total), device)
    checkpoint = ray.train.get_checkpoint()
    model, state = _initial_model_and_state(cfg, checkpoint)
    # paper: UNet full, decoder LoRA + skip convs, encoder frozen (train_vae: the whole VAE too, for random presets)
    counts = model.prepare_for_training(train_vae=cfg.train_vae)
    if cfg.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    net = ray.train.torch.prepare_model(AllViewsFixer(model))  # moves to device; DDP when world > 1
    params = model.trainable_parameters()
    opt = build_optimizer(cfg.optimizer, params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                          weight_decay=cfg.weight_decay, device=device)
    step, start = 0, (0, 0)
    if state is not None:
        _check_same_optimizer_setup(cfg, state.get("config", {}))
        _load_optimizer(cfg, model, opt, state, _state_uri(cfg, checkpoint), device)
        _apply_optimizer_settings(cfg, opt)
        step = int(state["step"])
        streams = state["streams"]
        start = tuple(streams[rank]) if len(streams) == world else (max(s[0] for s in streams) + 1, 0)
    start_step = step
    final = cfg.final_uri()
    complete = rank == 0 and step >= cfg.steps and _exported_at(cfg, step)  # a re-run of a finished run

    # an L2-only run (lpips = gram = 0) needs no VGG: pretrained weights may then be absent
    needs_vgg = cfg.loss.lpips > 0 or cfg.loss.gram > 0
    perceptual = build_perceptual_net(cfg.perceptual_weights, seed=cfg.seed) if needs_vgg else None  # same on every rank
    loss_fn = DifixLoss(cfg.loss, perceptual, seed=cfg.seed * 7919 + rank,
                        checkpointing=cfg.gradient_checkpointing).to(device)
    # stand-in LPIPS means nothing
    lpips_for_val = None if cfg.perceptual_weights == "random" or perceptual is None else loss_fn.perceptual
    stream = PairStream(ShardIndex.build(cfg.train_shards), rank, world, cfg.seed, cfg.shuffle_window,
                        cfg.skip_corrupt, start=start)
    train_batches = batches(stream, cfg.batch_size, cfg.height, cfg.width, seed=cfg.seed * 1000 + rank + step,
                            use_reference=cfg.use_reference)
    val_batches = _validation_batches(cfg, rank, world)
    autocast = _autocast(cfg, device)
    logger = _RankZeroLogger(cfg, rank, start_step) if rank == 0 else None
    if logger and complete:
        logger.console(f"the run was already complete: step {step} of {cfg.steps}, final model in {final}; nothing "
                       f"to train or export")
    elif logger:
        logger.console(f"fine-tuning {cfg.init} from step {step} on {world} worker(s) ({device.type}); "
                       f"trainable {counts['trainable']:,} (unet {counts['unet']:,}, decoder LoRA "
                       f"{counts['decoder_lora']:,}, skip convs {counts['skip_convs']:,}, "
                       f"VAE base {counts['vae_base']:,}), frozen {counts['frozen']:,}")

    seen: dict[str, None] = {}
    window = {"total": 0.0, "l2": 0.0, "lpips": 0.0, "gram": 0.0, "n": 0}
    t0, samples = time.perf_counter(), 0
    net.train()
    while step < cfg.steps:
        batch = next(train_batches)
        for i in batch["ids"]:
            if len(seen) < MAX_RECORDED_IDS:
                seen.setdefault(i)
        x, target = batch["x"].to(device), batch["target"].to(device)  # [B, 3, H, W]
        ref = batch["ref"].to(device) if batch["ref"] is not None else None
        with autocast():
            pred = net(x, ref)  # [B, V, 3, H, W]: both views supervised, as in the original
            losses = loss_fn(pred.flatten(0, 1), training_targets(target, ref).flatten(0, 1), step)
        opt.zero_grad(set_to_none=True)
        losses["total"].backward()
        # grad_clip 0: no clipping (the norm is still measured for the log)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        opt.step()
        step += 1
        samples += x.shape[0]
        _maybe_fail(cfg, step, rank)
        for k in ("total", "l2", "lpips", "gram"):
            window[k] += float(losses[k].detach())
        window["n"] += 1
        if logger:
            logger.step_loss(step, float(losses["total"].detach()))

        is_log, is_val, is_ckpt = (_due(step, every, cfg.steps) for every in (cfg.log_every, cfg.val_every,
                                                                             cfg.ckpt_every))
        if not (is_log or is_val or is_ckpt):
            continue
        elapsed = time.perf_counter() - t0
        metrics = {f"train_{k}": v for k, v in _mean_over_ranks(window, device).items()}
        metrics.update(step=step, grad_norm=float(grad_norm), samples_per_s=_sum_over_ranks(samples / elapsed, device),
                       lr=float(opt.param_groups[0]["lr"]))  # torchao keeps lr as a tensor
        if device.type == "cuda":
            metrics["peak_mem_gb"] = _max_over_ranks(torch.cuda.max_memory_allocated(device) / 1e9, device)
            # what the caching allocator held at most: what a card must have, besides the CUDA context
            metrics["peak_reserved_gb"] = _max_over_ranks(torch.cuda.max_memory_reserved(device) / 1e9, device)
        window = dict.fromkeys(window, 0.0) | {"n": 0}
        if is_val and cfg.val_rows > 0:  # every rank joins the all-reduce, also one that got no validation rows
            metrics.update(_validate(model, val_batches, device, lpips_for_val, autocast, logger, step, cfg))
        if logger:
            logger.metrics(step, metrics, sync=is_val or is_ckpt)
        _report(metrics, model, opt, step, stream, cfg, save=is_ckpt, rank=rank)
        t0, samples = time.perf_counter(), 0  # throughput windows exclude validation and checkpointing

    if rank == 0:
        from difix3d.fixer.checkpoint import save_checkpoint

        if not complete:
            save_checkpoint(model, final, provenance=_provenance(cfg, step))
            logger.console(f"final model written to {final}")
        logger.close()
    summary = {"rank": rank, "world_size": world, "start_step": start_step, "end_step": step, "final": final,
               "rows_seen": list(seen), "skipped": stream.skipped, "stream_state": list(stream.state())}
    storage.write_json(_summary_uri(cfg, rank), summary)
    return summary


# ------------------------------------------------------------------------------------------------ helpers

def _initial_model_and_state(cfg: FinetuneConfig, checkpoint) -> tuple[torch.nn.Module, dict | None]:
    """From the run's latest checkpoint when there is one (restart / re-run), else from ``cfg.init``; in fp32 and
    training mode whatever dtype the weights were saved in. These are the master weights AdamW updates (bf16 compute
    is autocast's job): a checkpoint saved from a bf16 serving model, trained as it is, would lose most updates of a
    small learning rate to bf16 rounding."""
    model, state = _initial_weights(cfg, checkpoint)
    dtypes = {p.dtype for p in model.parameters()} - {torch.float32}
    if dtypes:
        log.info("%s: weights saved in %s, trained in float32", cfg.init, ", ".join(sorted(map(str, dtypes))))
    return model.float().train(), state


def _initial_weights(cfg: FinetuneConfig, checkpoint) -> tuple[torch.nn.Module, dict | None]:
    from difix3d.fixer.checkpoint import load_checkpoint
    from difix3d.fixer.config import PRESETS
    from difix3d.fixer.model import build_model

    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            model = load_checkpoint(os.path.join(d, MODEL_DIR))
            state = torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=False)
        return model, state
    if cfg.init in PRESETS:
        return build_model(cfg.init, seed=cfg.seed), None
    if cfg.init == "bundled":  # the small fixer shipped with the package
        from difix3d.fixer.bundled import default_checkpoint

        return load_checkpoint(default_checkpoint()), None
    return load_checkpoint(cfg.init, base=cfg.base), None


def _summary_uri(cfg: FinetuneConfig, rank: int) -> str:
    return storage.join(cfg.run_uri(), "workers", f"rank-{rank}.json")


def _provenance(cfg: FinetuneConfig, step: int) -> dict:
    """What an exported model records of the run that exported it (see :func:`_exported_at`)."""
    return {"finetune_run": cfg.run_uri(), "step": step}


def _exported_at(cfg: FinetuneConfig, step: int) -> bool:
    """Whether the final model at ``cfg.final_uri()`` is this run's export of the model of ``step``: the export is
    whole (its config, written last, is there) and records this run and step. A run resumed further, one cut short
    between its last checkpoint and the export, or one whose export folder another run has written since (a shared
    ``export_uri``) exports again."""
    from difix3d.fixer.checkpoint import checkpoint_provenance

    return checkpoint_provenance(cfg.final_uri()) == _provenance(cfg, step)


def _state_uri(cfg: FinetuneConfig, checkpoint) -> str:
    """Where the checkpoint's training state lies in the run storage (Ray Train's ``path`` drops the URI scheme)."""
    return storage.join(cfg.run_uri(), os.path.basename(checkpoint.path.rstrip("/")), STATE_FILE)


def _load_optimizer(cfg: FinetuneConfig, model, opt: torch.optim.Optimizer, state: dict, source: str,
                    device: torch.device) -> None:
    """The saved optimizer state into ``opt``, its moments matched to ``model``'s trained parameters by name (a
    resumed model may train fewer: the VAE encoder's LoRA, trained under ``train_vae`` before the adapter wrapped the
    decoder only, is folded into the encoder's weights on load). A state that does not fit is a CheckpointError
    naming ``source``: bad input, which the run records and does not train again (see :func:`train_loop_per_worker`).
    """
    names = trained_parameter_names(model)
    saved_names = state.get("param_names")
    try:
        if saved_names is None:  # saved before the names were recorded: ordered as the model of then
            saved_names = trained_parameter_names_before_decoder_only_lora(model)
            saved = sum(len(group["params"]) for group in state["optimizer"]["param_groups"])
            if saved != len(saved_names):
                raise CheckpointError(source, f"its optimizer state names no parameters and holds {saved}: this "
                                              f"model trains {len(names)}, {len(saved_names)} as built before the "
                                              f"VAE's LoRA wrapped the decoder only")
        load_optimizer_state(opt, state["optimizer"], cfg.optimizer, device, names=names, saved_names=saved_names,
                             source=source)
    except ValueError as e:  # CheckpointError, or a ValueError of the old names' reconstruction or of torch
        problem = e.problem if isinstance(e, CheckpointError) else str(e)
        model_uri = storage.join(os.path.dirname(source), MODEL_DIR)
        raise CheckpointError(source, f"{problem}; the run cannot resume its optimizer: to go on from its weights "
                                      f"with new optimizer moments, start a new run: --init {model_uri} "
                                      f"--name <new name>") from e


def _report(metrics: dict, model, opt, step: int, stream: PairStream, cfg: FinetuneConfig, save: bool,
            rank: int) -> None:
    """``ray.train.report`` on every rank; on checkpoint steps rank 0 attaches model + optimizer + streams."""
    import ray.train

    if not save:
        ray.train.report(metrics)
        return
    streams = _gather(list(stream.state()))  # collective: every rank takes part
    if rank != 0:
        ray.train.report(metrics)
        return
    from difix3d.fixer.checkpoint import save_checkpoint

    with tempfile.TemporaryDirectory() as d:
        save_checkpoint(model, os.path.join(d, MODEL_DIR))
        # the parameters' names: a later model that trains others resumes the moments of those it still has
        torch.save({"optimizer": opt.state_dict(), "param_names": trained_parameter_names(model), "step": step,
                    "streams": streams, "config": cfg.to_dict()}, os.path.join(d, STATE_FILE))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def _validation_batches(cfg: FinetuneConfig, rank: int, world: int) -> list[dict]:
    """This rank's share of the fixed validation rows, centre-cropped to the training size."""
    if cfg.val_rows <= 0:
        return []
    index = ShardIndex.build(cfg.val_shards or cfg.train_shards)
    rows = read_rows(index, cfg.val_rows, rank, world, skip_corrupt=cfg.skip_corrupt)
    return [collate_pairs(rows[i:i + cfg.batch_size], cfg.height, cfg.width, None, cfg.use_reference)
            for i in range(0, len(rows), cfg.batch_size)]


def _validate(model, val_batches, device, lpips_net, autocast, logger, step: int, cfg: FinetuneConfig) -> dict:
    sums, grid = validation_sums(model, val_batches, device, lpips_net, autocast)
    keys = sorted(sums)
    totals = dict(zip(keys, _all_reduce([sums[k] for k in keys], device)))
    if totals["n"] == 0:  # every validation row was skipped as corrupt
        return {}
    n = totals["n"]
    out = {"val_l2": totals["l2"] / n, "val_psnr": totals["psnr"] / n}
    if lpips_net is not None:
        out["val_lpips"] = totals["lpips"] / n
    if logger:
        uri = storage.join(cfg.run_uri(), "samples", f"step-{step:07d}.png")
        write_sample_grid(uri, grid, cfg.sample_grid_rows)
        logger.image(step, grid, cfg.sample_grid_rows)
    return out


def _autocast(cfg: FinetuneConfig, device: torch.device):
    """bf16 autocast on CUDA (weights and optimizer stay fp32: the master copy); fp32 elsewhere."""
    if device.type == "cuda" and cfg.mixed_precision == "bf16":
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


def _all_reduce(values: list[float], device: torch.device) -> list[float]:
    if not (dist.is_available() and dist.is_initialized()):
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def _mean_over_ranks(window: dict, device: torch.device) -> dict[str, float]:
    keys = [k for k in window if k != "n"]
    totals = _all_reduce([window[k] for k in keys] + [window["n"]], device)
    return {k: v / max(totals[-1], 1.0) for k, v in zip(keys, totals[:-1])}


def _sum_over_ranks(value: float, device: torch.device) -> float:
    return _all_reduce([value], device)[0]


def _max_over_ranks(value: float, device: torch.device) -> float:
    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def _gather(obj: Any) -> list:
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _maybe_fail(cfg: FinetuneConfig, step: int, rank: int) -> None:
    """Fault injection for recovery tests: the last rank's process dies once at ``cfg.fail_once_at_step``."""
    if cfg.fail_once_at_step <= 0 or step != cfg.fail_once_at_step:
        return
    import ray.train

    if rank != ray.train.get_context().get_world_size() - 1:
        return
    marker = storage.join(cfg.run_uri(), "fault-injected")
    if storage.exists(marker):
        return
    storage.write_text(marker, f"step {step}\n")
    log.warning("fault injection: worker %d exits at step %d", rank, step)
    # Ray Train's controller polls workers for reported checkpoints: a process that dies right after a report can
    # take the unpolled report with it (recovery then starts from the checkpoint before). Wait past a poll so the
    # test exercises a restart from the latest checkpoint deterministically.
    time.sleep(5.0)
    os._exit(1)


class _RankZeroLogger:
    """Console lines, TensorBoard scalars/images and a ``history.json`` of per-step losses (rank 0 only)."""

    def __init__(self, cfg: FinetuneConfig, rank: int, start_step: int = 0):
        from torch.utils.tensorboard import SummaryWriter

        self.cfg = cfg
        self.history_uri = storage.join(cfg.run_uri(), "history.json")
        self.history = storage.read_json(self.history_uri) if storage.exists(self.history_uri) else {}
        # steps after the checkpoint this run resumes from were logged by an attempt that did not save them: they
        # are trained (and logged) again
        self.history["loss"] = {k: v for k, v in self.history.get("loss", {}).items() if int(k) <= start_step}
        self.history["metrics"] = [m for m in self.history.get("metrics", []) if m.get("step", 0) <= start_step]
        self.local_dir = _tensorboard_dir(cfg)
        self.writer = SummaryWriter(log_dir=self.local_dir)

    def console(self, line: str) -> None:
        # not print(): Ray Train makes a worker's print() log to the root logger (shown on stderr) and also echo to
        # stdout, since Ray wraps sys.stdout: every line reached the console twice
        sys.stdout.write(f"[finetune] {line}\n")
        sys.stdout.flush()

    def step_loss(self, step: int, loss: float) -> None:
        self.history["loss"][str(step)] = loss

    def metrics(self, step: int, metrics: dict, sync: bool = False) -> None:
        for k, v in metrics.items():
            if k != "step" and isinstance(v, (int, float)):
                self.writer.add_scalar(k, v, step)
        self.writer.flush()
        if sync:  # at validation and checkpoint steps (and close): event files are re-uploaded whole
            self._sync_tensorboard()
        self.history["metrics"].append(metrics)
        storage.write_json(self.history_uri, self.history)
        shown = " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k != "step")
        self.console(f"step {step}/{self.cfg.steps} {shown}")

    def image(self, step: int, rows, max_rows: int) -> None:
        import numpy as np

        if rows:
            self.writer.add_image("samples", np.concatenate(rows[:max_rows], axis=0), step, dataformats="HWC")

    def close(self) -> None:
        self.writer.close()
        self._sync_tensorboard()

    def _sync_tensorboard(self) -> None:
        """With remote storage, copy the local event files to ``<run>/tensorboard/`` (local runs write there)."""
        if storage.is_local(self.cfg.run_uri()):
            return
        for root, _, files in os.walk(self.local_dir):
            for name in files:
                path = os.path.join(root, name)
                rel = os.path.relpath(path, self.local_dir).replace(os.sep, "/")
                with open(path, "rb") as f:
                    storage.write_bytes(storage.join(self.cfg.run_uri(), "tensorboard", rel), f.read())


def _tensorboard_dir(cfg: FinetuneConfig) -> str:
    """TensorBoard writes local files: under the run folder when storage is local, else a local folder by name."""
    if storage.is_local(cfg.run_uri()):
        return storage.resolve(storage.join(cfg.run_uri(), "tensorboard"))[1]
    run_key = hashlib.sha1(cfg.run_uri().encode()).hexdigest()[:12]  # not another run's files of the same name
    return os.path.join(tempfile.gettempdir(), "difix3d-tensorboard", f"{cfg.name}-{run_key}")


def load_history(cfg: FinetuneConfig) -> dict:
    """The run's ``history.json``: ``loss`` {step: loss of rank 0} and the reported ``metrics`` list."""
    return json.loads(storage.read_text(storage.join(cfg.run_uri(), "history.json")))
