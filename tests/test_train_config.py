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
