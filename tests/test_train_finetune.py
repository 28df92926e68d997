"""Ray Train fine-tuning end to end: two gloo workers, the tiny preset, 32x32 pairs (CPU)."""

import glob
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import pyarrow as pa
import pyarrow.parquet as pq

from difix3d.errors import InputError, MissingWeightsError
from difix3d.fixer.checkpoint import load_checkpoint
from difix3d.fixer.runner import FixerRunner
from difix3d.train.config import FinetuneConfig, LossWeights
from difix3d.train.loop import load_history
from difix3d.train.pairs import write_pair_shard
from difix3d.train.trainer import finetune


def _shard(root, n=2):
    """One row per worker: each worker trains on a fixed pair, so the loss must fall."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        target = np.repeat(np.repeat(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), 4, 0), 4, 1)  # [32, 32, 3]
        noisy = np.clip(target.astype(int) + rng.integers(-40, 40, target.shape), 0, 255).astype(np.uint8)
        rows.append({"degraded": noisy, "target": target, "reference": target, "scene": f"scene-{i}", "camera": "cam"})
    write_pair_shard(str(root / "pairs" / "shard-000.parquet"), rows)
    return str(root / "pairs")


def _config(tmp_path, shards, **kw):
    base = dict(train_shards=shards, storage_path=str(tmp_path / "runs"), name="ft", num_workers=2, batch_size=1,
                height=32, width=32, lr=1e-3, perceptual_weights="random", steps=12, log_every=3, val_every=6,
                ckpt_every=6, val_rows=2, loss=LossWeights(gram_warmup_steps=4, gram_crop=16))
    base.update(kw)
    return FinetuneConfig(**base)


def test_two_workers_train_checkpoint_survive_a_crash_and_resume(tmp_path, ray_local):
    shards = _shard(tmp_path)
    # a worker process dies at step 8: the group restarts from the step-6 checkpoint and finishes
    cfg = _config(tmp_path, shards, fail_once_at_step=8)
    result = finetune(cfg)
    run = tmp_path / "runs" / "ft"
    assert (run / "fault-injected").exists()
    assert result.summary["start_step"] == 6 and result.summary["end_step"] == 12  # rank 0 after the restart

    history = load_history(cfg)
    losses = [history["loss"][str(s)] for s in range(1, 13)]
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3])
    assert result.metrics["step"] == 12 and 0 < result.metrics["val_l2"] < 1 and "val_psnr" in result.metrics

    seen = [set(json.loads((run / "workers" / f"rank-{r}.json").read_text())["rows_seen"]) for r in (0, 1)]
    assert seen[0] and seen[1] and not seen[0] & seen[1]  # disjoint data
    assert seen[0] | seen[1] == {"scene-0/cam", "scene-1/cam"}
    assert list((run / "samples").glob("step-*.png")) and list((run / "tensorboard").iterdir())

    # the exported model and the Ray checkpoint load with the fixer's loader and fix an image
    final = load_checkpoint(result.final_uri)
    ckpt_model = load_checkpoint(os.path.join(result.checkpoint_path, "model"))
    for name, p in final.state_dict().items():
        assert torch.equal(p, ckpt_model.state_dict()[name]), name
    state = torch.load(os.path.join(result.checkpoint_path, "train_state.pt"), weights_only=False)
    assert state["step"] == 12 and len(state["streams"]) == 2 and state["optimizer"]["state"]
    assert len(state["param_names"]) == len(state["optimizer"]["param_groups"][0]["params"])  # resumable by name
    fixed = FixerRunner.from_checkpoint(result.final_uri, device="cpu").fix(np.zeros((32, 40, 3), np.uint8))
    assert fixed.shape == (32, 40, 3) and fixed.dtype == np.uint8

    # what the console shows (worker stdout and stderr): each line once, and no error from Ray Train's PreemptionWatcher
    output = _worker_output(ray_local)
    assert output.count(f"[finetune] final model written to {result.final_uri}") == 1
    assert not [line for line in output.splitlines() if "PreemptionWatcher" in line]

    # a re-run of the finished run says so and leaves the exported model as it is
    exported = _file_versions(run / "final")
    again = finetune(cfg)
    assert again.summary["start_step"] == again.summary["end_step"] == 12
    assert _file_versions(run / "final") == exported
    assert _worker_output(ray_local).count(f"[finetune] the run was already complete: step 12 of 12, final model in "
                                           f"{result.final_uri}") == 1

    # a re-run of the same name + storage with more steps continues from the saved step
    more = finetune(_config(tmp_path, shards, steps=14))
    assert more.summary["start_step"] == 12 and more.summary["end_step"] == 14
    assert more.metrics["step"] == 14
    assert _file_versions(run / "final") != exported  # trained on: exported again


def _file_versions(folder) -> dict:
    """Each file's inode and modification time: an atomic rewrite changes both."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.iterdir()}


def _worker_output(ray) -> str:
    """What this session's Ray workers wrote to stdout and stderr: what a driver's console shows of them."""
    logs = ray._private.worker._global_node.get_logs_dir_path()
    return "".join(Path(path).read_text(errors="replace") for path in glob.glob(os.path.join(logs, "worker-*")))


def _corrupt_first_row(shards):
    uri = os.path.join(shards, "shard-000.parquet")
    table = pq.read_table(uri)
    col = table.column("degraded").to_pylist()
    col[0] = b"garbage"
    pq.write_table(table.set_column(0, table.schema.field("degraded"), pa.array(col, pa.binary())), uri)


def test_a_corrupt_row_is_skipped_or_fails_the_job_naming_it(tmp_path, ray_local):
    shards = _shard(tmp_path, n=4)  # two rows a worker: rank 0 reads rows 0 (corrupt) and 1
    _corrupt_first_row(shards)
    # row 0 is also the first validation row: skipped, rank 0 is left with no validation rows and must still take
    # part in validation's all-reduce (it used to wait there forever)
    result = finetune(_config(tmp_path, shards, name="skip", steps=4, val_every=2, ckpt_every=4, skip_corrupt=True))
    assert result.summary["end_step"] == 4 and "val_psnr" in result.metrics
    skipped = [json.loads((tmp_path / "runs" / "skip" / "workers" / f"rank-{r}.json").read_text())["skipped"]
               for r in (0, 1)]
    assert any("row 0 column degraded" in s for rank in skipped for s in rank)

    # without skipping, the job stops with the row named, and restarts fail at once instead of training again
    with pytest.raises(InputError, match=r"shard-000.parquet row 0 column degraded"):
        finetune(_config(tmp_path, shards, name="strict", steps=4, max_failures=1))
    assert (tmp_path / "runs" / "strict" / "input-error.json").exists()
    assert not (tmp_path / "runs" / "strict" / "final").exists()


def test_tensorboard_files_reach_remote_run_storage(tmp_path, monkeypatch):
    from difix3d import storage
    from difix3d.train import loop

    written = {}
    monkeypatch.setattr(storage, "write_bytes", lambda uri, data: written.__setitem__(uri, data))
    monkeypatch.setattr(storage, "write_json", lambda uri, obj: written.__setitem__(uri, obj))
    monkeypatch.setattr(storage, "exists", lambda uri: False)
    monkeypatch.setattr(loop.tempfile, "gettempdir", lambda: str(tmp_path))
    cfg = FinetuneConfig(storage_path="s3://bucket/runs", name="tb", steps=2)
    logger = loop._RankZeroLogger(cfg, 0)
    logger.metrics(1, {"step": 1, "train_total": 0.5})
    logger.close()
    events = [u for u in written if u.startswith("s3://bucket/runs/tb/tensorboard/events.out.tfevents")]
    assert events and all(written[u] for u in events)
    assert written["s3://bucket/runs/tb/history.json"]["metrics"][0]["train_total"] == 0.5


def test_relative_paths_are_made_absolute_for_the_workers(tmp_path, monkeypatch):
    from difix3d.train.trainer import with_absolute_paths

    monkeypatch.chdir(tmp_path)
    (tmp_path / "ckpt").mkdir()
    cfg = with_absolute_paths(FinetuneConfig(train_shards="pairs/", val_shards="val/*.parquet", init="ckpt",
                                             storage_path="outputs/finetune", base="stabilityai/sd-turbo"))
    assert cfg.train_shards == str(tmp_path / "pairs") and cfg.val_shards == str(tmp_path / "val" / "*.parquet")
    assert cfg.storage_path == str(tmp_path / "outputs" / "finetune") and cfg.init == str(tmp_path / "ckpt")
    assert cfg.base == "stabilityai/sd-turbo" and cfg.export_uri == ""  # a hub id and "unset" stay as they are
    remote = FinetuneConfig(train_shards="s3://b/pairs", storage_path="gs://b/runs", init="tiny")
    assert with_absolute_paths(remote) == remote


def test_workers_use_expandable_segments_unless_the_user_chose_an_allocator(monkeypatch):
    from difix3d.train.trainer import worker_env

    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    env = worker_env(FinetuneConfig(cpus_per_worker=3))
    assert env == {"OMP_NUM_THREADS": "3", "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128")
    assert worker_env(FinetuneConfig())["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:128"


def test_missing_vgg_weights_stop_the_job_before_workers_start(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    cfg = _config(tmp_path, _shard(tmp_path), perceptual_weights="pretrained")
    with pytest.raises(MissingWeightsError, match="allow-random-perceptual"):
        finetune(cfg)
    assert not (tmp_path / "runs" / "ft").exists()


@pytest.mark.gpu
def test_one_gpu_worker_trains_in_bf16_and_reports_memory(tmp_path, ray_local):
    cfg = _config(tmp_path, _shard(tmp_path), num_workers=1, use_gpu=True, steps=4, ckpt_every=4, val_every=4,
                  gradient_checkpointing=True, gpu_memory_limit_gib=2.0)
    result = finetune(cfg)
    assert result.metrics["peak_mem_gb"] > 0 and np.isfinite(result.metrics["train_total"])
    assert result.metrics["peak_mem_gb"] <= result.metrics["peak_reserved_gb"] <= 2.0 * 2**30 / 1e9
    assert load_checkpoint(result.final_uri).config.preset == "tiny"


def test_fine_tuning_a_bf16_checkpoint_trains_fp32_master_weights(tmp_path):
    """A checkpoint saved from a bf16 serving model: its weights are trained in fp32 (autocast computes in bf16)."""
    from difix3d.fixer.checkpoint import save_checkpoint
    from difix3d.fixer.model import build_model
    from difix3d.train.loop import _initial_model_and_state

    saved = build_model("tiny", seed=0).to(torch.bfloat16)
    save_checkpoint(saved, str(tmp_path / "bf16"))
    model, state = _initial_model_and_state(FinetuneConfig(init=str(tmp_path / "bf16")), checkpoint=None)
    model.prepare_for_training()
    assert state is None and model.training
    assert {p.dtype for p in model.trainable_parameters()} == {torch.float32}
    assert all(t.dtype == torch.float32 for t in model.state_dict().values())
    w = model.unet.conv_in.weight
    assert torch.equal(w, saved.unet.conv_in.weight.float())  # the saved values, exactly
    w0 = w.detach().clone()
    w.grad = torch.ones_like(w)
    torch.optim.AdamW([w], lr=5e-6, weight_decay=0.0).step()  # a fine-tuning step: lost to rounding in bf16
    assert bool((w.detach() != w0).all())


def _checkpoint_before_decoder_only_lora(run, monkeypatch, train_vae):
    """A checkpoint of a run started before the VAE's LoRA wrapped the decoder only: peft matched the target suffixes
    in the whole VAE, and ``train_vae`` trained the encoder's adapters; its training state names no parameters.
    Returns the checkpoint folder and the old model's moments by parameter name."""
    import difix3d.fixer.model
    from difix3d.fixer.checkpoint import save_checkpoint
    from difix3d.fixer.model import build_model

    with monkeypatch.context() as m:
        m.setattr(difix3d.fixer.model, "decoder_lora_modules", lambda vae, targets: list(targets))
        old = build_model("tiny", seed=0)
    old.prepare_for_training(train_vae=train_vae)
    assert any(".encoder." in n and "lora_" in n for n, _ in old.named_parameters())
    opt = torch.optim.AdamW(old.trainable_parameters(), lr=1e-3)
    for _ in range(2):
        opt.zero_grad()
        old(torch.rand(1, 3, 32, 32) * 2 - 1).square().mean().backward()
        opt.step()
    folder = run / "checkpoint_000000"
    save_checkpoint(old, str(folder / "model"))
    cfg = FinetuneConfig(train_vae=train_vae, name=run.name, storage_path=str(run.parent))
    torch.save({"optimizer": opt.state_dict(), "step": 2, "streams": [[0, 2]], "config": cfg.to_dict()},
               folder / "train_state.pt")
    moments = {n: opt.state[p]["exp_avg"] for n, p in old.named_parameters() if p in opt.state}
    return cfg, folder, moments


@pytest.mark.parametrize("train_vae", [True, False], ids=["train-vae", "frozen-encoder"])
def test_a_run_checkpointed_with_an_encoder_adapter_resumes_its_moments(tmp_path, monkeypatch, train_vae):
    """Its model loads with the encoder adapter folded into the encoder (44 trained tensors fewer under ``train_vae``):
    the optimizer keeps the moments of every parameter that remains and drops the adapter's."""
    from ray.train import Checkpoint

    from difix3d.train.loop import _initial_model_and_state, _load_optimizer, _state_uri
    from difix3d.train.optim import build_optimizer, trained_parameter_names

    cfg, folder, old_moments = _checkpoint_before_decoder_only_lora(tmp_path / "ft", monkeypatch, train_vae)
    checkpoint = Checkpoint.from_directory(str(folder))
    model, state = _initial_model_and_state(cfg, checkpoint)
    model.prepare_for_training(train_vae=train_vae)
    opt = build_optimizer("adamw", model.trainable_parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                          weight_decay=0.0, device=torch.device("cpu"))
    assert _state_uri(cfg, checkpoint) == str(folder / "train_state.pt")
    _load_optimizer(cfg, model, opt, state, _state_uri(cfg, checkpoint), torch.device("cpu"))

    folded = {n for n in old_moments if ".encoder." in n and "lora_" in n}
    assert len(folded) == (44 if train_vae else 0) and len(opt.state) == len(old_moments) - len(folded)
    kept = {n.replace(".base_layer.", "."): v for n, v in old_moments.items() if n not in folded}
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert torch.equal(opt.state[p]["exp_avg"], kept.pop(name.replace(".base_layer.", "."))), name
            assert float(opt.state[p]["step"]) == 2
    assert not kept
    opt.zero_grad()
    model(torch.rand(1, 3, 32, 32) * 2 - 1).square().mean().backward()
    opt.step()  # trains on from the resumed state

    # states written from now on name their parameters, and a later model maps them by name
    named = {"optimizer": opt.state_dict(), "param_names": trained_parameter_names(model)} | {
        k: state[k] for k in ("step", "streams", "config")}
    resumed = build_optimizer("adamw", model.trainable_parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                              weight_decay=0.0, device=torch.device("cpu"))
    _load_optimizer(cfg, model, resumed, named, "s", torch.device("cpu"))
    assert all(torch.equal(resumed.state[p]["exp_avg"], opt.state[p]["exp_avg"]) for p in model.trainable_parameters())


def test_an_optimizer_state_that_cannot_be_matched_is_recorded_bad_input(tmp_path, monkeypatch):
    """A training state without names whose parameters are not those of the model of then: a CheckpointError naming
    the file and the way on, recorded so that a restarted worker group fails at once instead of training again."""
    from ray.train import Checkpoint

    from difix3d.errors import CheckpointError
    from difix3d.train import loop
    from difix3d.train.optim import build_optimizer

    cfg, folder, _ = _checkpoint_before_decoder_only_lora(tmp_path / "ft", monkeypatch, train_vae=True)
    state = torch.load(folder / "train_state.pt", weights_only=False)
    del state["optimizer"]["param_groups"][0]["params"][-1]  # one parameter too few
    checkpoint = Checkpoint.from_directory(str(folder))
    model, _ = loop._initial_model_and_state(cfg, checkpoint)
    model.prepare_for_training(train_vae=True)
    opt = build_optimizer("adamw", model.trainable_parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                          weight_decay=0.0, device=torch.device("cpu"))
    calls = []

    def train(c):
        calls.append(c)
        loop._load_optimizer(cfg, model, opt, state, loop._state_uri(cfg, checkpoint), torch.device("cpu"))

    monkeypatch.setattr(loop, "_train", train)
    message = (rf"{folder}/train_state.pt: its optimizer state names no parameters and holds 503: this model trains "
               rf"460, 504 as built before .* start a new run: --init {folder}/model --name")
    for _ in range(2):  # the first attempt records the error; a restart raises it before training
        with pytest.raises(CheckpointError, match=message):
            loop.train_loop_per_worker(cfg.to_dict())
    assert len(calls) == 1
    assert isinstance(loop.recorded_input_error(cfg), CheckpointError)


def test_preemption_watcher_variable_is_shared_by_concurrent_runs_and_a_users_value_kept(monkeypatch):
    """Two fine-tuning runs in threads of one process: the second still sees the watcher off after the first ends,
    the variable is gone after both, and a value the user set is never changed."""
    import threading
    import time

    from difix3d.train import trainer

    env = trainer.PREEMPTION_WATCHER_ENV
    monkeypatch.delenv(env, raising=False)
    seen = {}

    def run(name, hold):
        with trainer._preemption_watcher_off():
            time.sleep(hold)
            seen[name] = os.environ.get(env)

    first = threading.Thread(target=run, args=("first", 0.2))
    second = threading.Thread(target=run, args=("second", 0.6))
    first.start()
    time.sleep(0.05)
    second.start()
    first.join(), second.join()
    assert seen == {"first": "0", "second": "0"} and env not in os.environ
    monkeypatch.setenv(env, "1")
    with trainer._preemption_watcher_off():
        assert os.environ[env] == "1"
    assert os.environ[env] == "1"


def test_a_shared_export_folder_is_complete_only_for_the_run_that_wrote_it_last(tmp_path):
    """Two runs exporting to one ``export_uri``: a re-run of the first must export again, not call itself complete
    over the second run's model."""
    from difix3d.fixer.checkpoint import checkpoint_provenance, save_checkpoint
    from difix3d.fixer.model import build_model
    from difix3d.train.loop import _exported_at, _provenance

    export = str(tmp_path / "shared-export")
    first = _config(tmp_path, "unused", name="first", export_uri=export)
    second = _config(tmp_path, "unused", name="second", export_uri=export)
    assert checkpoint_provenance(export) is None and not _exported_at(first, 12)  # nothing exported yet
    model = build_model("tiny", seed=0)
    save_checkpoint(model, export, provenance=_provenance(first, 12))
    assert _exported_at(first, 12) and not _exported_at(first, 14) and not _exported_at(second, 12)
    save_checkpoint(model, export, provenance=_provenance(second, 12))  # the second run exports over it
    assert not _exported_at(first, 12) and _exported_at(second, 12)
    assert checkpoint_provenance(export) == {"finetune_run": second.run_uri(), "step": 12}
    assert load_checkpoint(export).config.preset == "tiny"  # loading ignores the provenance
    save_checkpoint(model, export)  # a plain export (difix3d convert) records none
    assert checkpoint_provenance(export) is None and not _exported_at(second, 12)
    (Path(export) / "config.json").write_text("{not json")
    assert checkpoint_provenance(export) is None


def test_a_resumed_run_refuses_other_weights_or_stream_settings_and_keeps_its_record(tmp_path):
    from difix3d.train.trainer import CONFIG_RECORD, check_resume_settings

    cfg = _config(tmp_path, str(tmp_path / "pairs"), init="bundled")
    run = tmp_path / "runs" / "ft"
    run.mkdir(parents=True)
    cfg.write(str(run / CONFIG_RECORD))
    check_resume_settings(_config(tmp_path, str(tmp_path / "pairs"), init="tiny"))  # no checkpoint yet: a new start
    (run / "checkpoint_000000").mkdir()
    check_resume_settings(_config(tmp_path, str(tmp_path / "pairs"), init="bundled", steps=20, lr=1e-4))  # may change
    with pytest.raises(InputError, match=r"init 'bundled' -> 'tiny'; train_vae False -> True"):
        check_resume_settings(_config(tmp_path, str(tmp_path / "pairs"), init="tiny", train_vae=True))
    assert json.loads((run / CONFIG_RECORD).read_text())["init"] == "bundled"
    with pytest.raises(ValueError, match="multiples of 8"):
        _config(tmp_path, "p", height=30)
