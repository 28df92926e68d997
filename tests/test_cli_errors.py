"""Bad command-line input is a one-line error with exit status 2 (argparse's usage errors included), raised before
any Ray work starts, never a traceback."""

import os
import sys

import numpy as np
import pytest

from difix3d.cli import main as difix3d_main
from difix3d.errors import Difix3DError, InputError, MissingWeightsError

JOBS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jobs")


def _exit_code(run, argv) -> int:
    try:
        return run(argv)
    except SystemExit as e:  # argparse's usage errors
        return e.code


@pytest.mark.parametrize("argv,message", [
    (["synth", "OUT", "--height", "-5"], "argument --height: must be at least 1, got -5"),
    (["synth", "OUT", "--shifts", "a,b"], "argument --shifts: expected comma-separated numbers"),
    (["synth", "OUT", "--holdout", "back"], "unknown rig cameras ['back']"),
    (["synth", "OUT", "--holdout", "front,left,right"], "leaves none to train on"),
    (["synth", "OUT", "--shifts", "1,nan"], "argument --shifts: expected finite numbers"),
    (["synth", "OUT", "--shifts", "1,1.0"], "argument --shifts: repeated shifts"),
    (["synth", "OUT", "--every-nth-train", "0"], "argument --every-nth-train: must be at least 1"),
    (["pairs", "show", "x.parquet", "-o", "y.png", "--rows", "0"], "argument --rows: must be at least 1"),
    (["evaluate", "--input", "IN", "--output", "OUT", "--workers", "0"], "need 1 <= min_workers <= workers"),
    (["finetune", "--train-shards", "S", "--optimizer", "sgd"], "optimizer 'sgd': expected one of adamw"),
])
def test_bad_arguments_exit_2_with_one_line(argv, message, capsys, tmp_path):
    argv = [str(tmp_path / a) if a in ("OUT", "IN", "S") else a for a in argv]
    assert _exit_code(difix3d_main, argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not os.path.exists(tmp_path / "OUT")  # nothing written


def test_finetune_config_files_that_are_not_valid_are_named(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    for text, problem in (('{"stepz": 3}', "unknown FinetuneConfig fields: ['stepz']"),
                          ('{"loss": {"lpip": 1.0}}', "unknown LossWeights fields: ['lpip']"),
                          ('{"loss": 1}', "loss must be an object of LossWeights fields"),
                          ("[1, 2]", f"{bad}: expected a JSON object of FinetuneConfig fields, got list"),
                          ("{bad", f"{bad}: not valid JSON")):
        bad.write_text(text)
        assert difix3d_main(["finetune", "--train-shards", str(tmp_path), "--config", str(bad)]) == 2
        err = capsys.readouterr().err
        assert problem in err and "Traceback" not in err
    good = tmp_path / "good.json"
    good.write_text("{}")
    assert difix3d_main(["finetune", "--train-shards", str(tmp_path), "--config", str(good), "--optimizer", "sgd"]) == 2
    assert f"finetune settings (--config {good} and the options): optimizer 'sgd'" in capsys.readouterr().err


def test_fleet_job_settings_are_checked_before_work(tmp_path, capsys):
    from difix3d.fleet.cli import main as fleet_main

    assert _exit_code(fleet_main, ["--set", "foo"]) == 2
    assert "--set expects FIELD=VALUE, got 'foo'" in capsys.readouterr().err
    out = tmp_path / "fleet"
    assert fleet_main(["--scene-num-cpus", "-1", "--output", str(out)]) == 2
    assert "scene_num_cpus must be >= 0, got -1.0" in capsys.readouterr().err
    assert not out.exists()
    assert fleet_main(["--set", "trainer.iterations=5", "--output", str(out)]) == 2  # the tiny preset's first round: 100
    assert "is not below trainer.iterations 5: no Difix3D round would run" in capsys.readouterr().err
    assert not out.exists()
    from difix3d.fleet.config import FleetConfig

    FleetConfig(scene_num_cpus=0.0).validate()  # GPU-share scheduling: scene tasks take no CPU of their own
    FleetConfig(scenes="s/", synthetic_frames=0).validate()  # synthetic sizes only matter without --scenes


def test_fleet_job_checks_its_inputs_before_ray_starts(tmp_path, capsys, monkeypatch):
    import ray

    from difix3d.fleet.cli import main as fleet_main

    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # as in a fresh driver, whatever earlier tests started
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("ray.init before the inputs were checked"))
    out = tmp_path / "fleet"
    assert fleet_main(["--scenes", str(tmp_path / "missing"), "--output", str(out)]) == 2
    assert "missing: scene manifest not found" in capsys.readouterr().err
    assert fleet_main(["--checkpoint", str(tmp_path / "nockpt"), "--output", str(out)]) == 2
    assert "nockpt: fixer checkpoint does not exist" in capsys.readouterr().err
    assert not out.exists()  # nothing written either


def test_evaluate_job_checks_its_settings_before_ray_starts(tmp_path, capsys, monkeypatch):
    sys.path.insert(0, JOBS)
    try:
        import evaluate as evaluate_job
    finally:
        sys.path.remove(JOBS)
    monkeypatch.setattr(evaluate_job.ray, "init", lambda *a, **k: pytest.fail("ray.init before the settings check"))
    argv = ["--input", str(tmp_path), "--output", str(tmp_path / "ev"), "--metrics", "psnr,bogus"]
    assert _exit_code(evaluate_job.main, argv) == 2
    assert "unknown metrics ['bogus']" in capsys.readouterr().err


def test_a_device_that_is_not_one_is_named():
    from difix3d.device import default_device

    with pytest.raises(Difix3DError, match="device 'bogus' is not a torch device"):
        default_device("bogus")


def test_a_new_runs_init_checkpoint_is_checked_on_the_driver(tmp_path):
    from difix3d.train.config import FinetuneConfig
    from difix3d.train.trainer import check_init

    config = FinetuneConfig(train_shards="x", storage_path=str(tmp_path), name="run", init=str(tmp_path / "nockpt"))
    with pytest.raises(MissingWeightsError, match="nockpt: no such checkpoint"):
        check_init(config)
    os.makedirs(tmp_path / "run" / "checkpoint_000001")  # a run that resumes from its own checkpoints
    check_init(config)
    check_init(FinetuneConfig(train_shards="x", storage_path=str(tmp_path), name="other", init="tiny"))


@pytest.mark.parametrize("command,expected", [
    ("finetune", ["--lr LR", "(default: 2e-05)", "max gradient norm; 0 = no clipping (default: 1.0)",
                  "steps between checkpoints", "(default: 1000)"]),
    ("evaluate", ["views per actor call (default: 16)", "GPU share per actor (default: 0.0)",
                  "torch hub folder holding checkpoints/ (default: torch's)"]),
])
def test_help_gives_each_options_default(command, expected, capsys):
    assert _exit_code(difix3d_main, [command, "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines: compare with single spaces
    for text in expected:
        assert text in out, text
    assert "(default: None)" not in out
    assert "default: torch's) (default" not in out  # a help that gives its default is left as it is


def test_finetune_help_takes_each_fields_own_comment_not_its_groups():
    from difix3d.train.cli import field_comments
    from difix3d.train.config import FinetuneConfig

    notes = field_comments(FinetuneConfig)
    assert "num_workers" not in notes  # under "# scale", a heading of the fields below it
    assert notes["grad_clip"] == "max gradient norm; 0 = no clipping"
    assert notes["train_vae"].startswith("Also train the VAE's own weights")  # the comment block above the field


def test_curate_help_gives_defaults(capsys):
    from difix3d.curate.cli import build_job_parser

    help_text = " ".join(build_job_parser().format_help().split())
    assert "seed of the reconstructions (default: 0)" in help_text
    assert "cycle: lateral shift in metres (default: 1.0 3.0)" in help_text  # as typed: two values


def test_synth_refuses_to_mix_a_new_segment_into_an_old_one(tmp_path, capsys):
    argv = ["synth", str(tmp_path), "--frames", "2", "--height", "16", "--width", "24", "--points", "50",
            "--shifts", "", "--device", "cpu"]
    assert difix3d_main(argv) == 0
    assert _exit_code(difix3d_main, argv) == 2
    assert "segment-000: segment folder is not empty" in capsys.readouterr().err


def test_evaluate_and_finetune_name_a_missing_input_before_ray_starts(tmp_path, capsys, monkeypatch):
    import ray

    sys.path.insert(0, JOBS)
    try:
        import evaluate as evaluate_job
    finally:
        sys.path.remove(JOBS)
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("ray.init before the input was checked"))
    assert evaluate_job.main(["--input", str(tmp_path / "nofleet"), "--output", str(tmp_path / "ev")]) == 2
    assert "nofleet: no such file or folder" in capsys.readouterr().err
    assert _exit_code(difix3d_main, ["finetune", "--train-shards", str(tmp_path / "noshards")]) == 2
    assert "noshards: no pair shards" in capsys.readouterr().err


def test_a_mistyped_init_preset_lists_the_presets(tmp_path):
    from difix3d.train.config import FinetuneConfig
    from difix3d.train.trainer import check_init

    with pytest.raises(MissingWeightsError, match=r"tyni: no such checkpoint, nor a preset \(init takes .*tiny"):
        check_init(FinetuneConfig(train_shards="x", storage_path=str(tmp_path), name="run", init="tyni"))


def test_a_shard_without_the_pair_columns_is_named_before_ray_starts(tmp_path, capsys, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    from difix3d.train.config import FinetuneConfig
    from difix3d.train.pairs import write_pair_shard
    from difix3d.train.trainer import finetune

    good = tmp_path / "pairs" / "a.parquet"
    image = np.zeros((8, 8, 3), np.uint8)
    write_pair_shard(str(good), [dict(degraded=image, target=image, reference=None, scene="s", camera="c",
                                      strategy="sparse", psnr=20.0)])
    pq.write_table(pa.table({"image": [b"x"], "label": [1]}), str(tmp_path / "pairs" / "b.parquet"))
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("ray.init before the shards were checked"))
    assert _exit_code(difix3d_main, ["finetune", "--train-shards", str(tmp_path / "pairs")]) == 2
    err = capsys.readouterr().err.strip()
    assert "b.parquet: not a pair shard: missing columns ['degraded', 'target'" in err and len(err.splitlines()) == 1
    with pytest.raises(InputError, match="b.parquet: not a pair shard"):  # the library entry point checks too
        finetune(FinetuneConfig(train_shards=str(tmp_path / "pairs"), storage_path=str(tmp_path / "runs")))
