"""FinetuneConfig defaults, JSON round trip and the command line built from it."""

import argparse
import json

import pytest

from difix3d.train.cli import add_arguments, config_from_args
from difix3d.train.config import FinetuneConfig


def test_defaults_are_the_original_recipe_and_round_trip(tmp_path):
    cfg = FinetuneConfig()
    assert (cfg.lr, cfg.weight_decay, cfg.grad_clip, cfg.steps) == (2e-5, 1e-2, 1.0, 10_000)
    assert (cfg.loss.l2, cfg.loss.lpips, cfg.loss.gram, cfg.loss.gram_warmup_steps) == (1.0, 1.0, 1.0, 2000)
    assert cfg.mixed_precision == "bf16" and cfg.perceptual_weights == "pretrained"
    cfg.write(str(tmp_path / "c.json"))
    assert FinetuneConfig.from_dict(json.loads((tmp_path / "c.json").read_text())) == cfg
    with pytest.raises(ValueError, match="unknown FinetuneConfig fields"):
        FinetuneConfig.from_dict({"learning_rate": 1})


def test_cli_flags_override_config_file(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"steps": 7, "loss": {"gram": 0.5}, "name": "x"}))
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--config", str(tmp_path / "c.json"), "--train-shards", "s3://b/pairs", "--use-gpu",
                              "--num-workers", "8", "--loss.gram-warmup-steps", "10", "--allow-random-perceptual"])
    cfg = config_from_args(args)
    assert (cfg.steps, cfg.name, cfg.train_shards, cfg.use_gpu, cfg.num_workers) == (7, "x", "s3://b/pairs", True, 8)
    assert (cfg.loss.gram, cfg.loss.gram_warmup_steps, cfg.loss.lpips) == (0.5, 10, 1.0)
    assert cfg.perceptual_weights == "random"
    vgg = config_from_args(parser.parse_args(["--vgg-weights", "/w/vgg16.pth"]))
    assert vgg.perceptual_weights == "/w/vgg16.pth" and vgg.steps == 10_000


@pytest.mark.parametrize("field, value", [("val_every", -1), ("mixed_precision", "fp16"), ("batch_size", 0),
                                          ("lr", float("nan")), ("grad_clip", -1.0), ("betas", (0.9, 1.0)),
                                          ("num_workers", 0), ("steps", "10")])
def test_settings_out_of_range_are_named(field, value):
    with pytest.raises(ValueError, match=field):
        FinetuneConfig(**{field: value})


def test_zero_cadences_mean_only_at_the_last_step_and_zero_clip_means_none():
    from difix3d.train.loop import _due

    FinetuneConfig(log_every=0, val_every=0, ckpt_every=0, grad_clip=0.0)
    assert [s for s in range(1, 8) if _due(s, 0, 7)] == [7]
    assert [s for s in range(1, 8) if _due(s, 3, 7)] == [3, 6, 7]


def test_history_drops_steps_an_interrupted_attempt_logged_after_its_last_checkpoint(tmp_path):
    from difix3d.train.loop import _RankZeroLogger, load_history

    cfg = FinetuneConfig(storage_path=str(tmp_path), name="ft", steps=12)
    first = _RankZeroLogger(cfg, 0)
    for step in (3, 6, 9):  # checkpoint at 6, then the worker dies
        first.step_loss(step, 1.0)
        first.metrics(step, {"step": step, "train_total": 1.0})
    again = _RankZeroLogger(cfg, 0, start_step=6)
    for step in (9, 12):
        again.step_loss(step, 2.0)
        again.metrics(step, {"step": step, "train_total": 2.0})
    history = load_history(cfg)
    assert [m["step"] for m in history["metrics"]] == [3, 6, 9, 12]
    assert history["loss"] == {"3": 1.0, "6": 1.0, "9": 2.0, "12": 2.0}
