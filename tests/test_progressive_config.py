"""The progressive run's budget drives the representation's schedules (LR decay, densification): one number,
``trainer.iterations``, whether set in Python or through the fleet's ``--set``."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

from difix3d import storage
from difix3d.errors import InputError
from difix3d.fleet.config import FleetConfig
from difix3d.fleet.scene_task import progressive_config
from difix3d.recon.gaussians import GaussianConfig
from difix3d.recon.outputs import SceneOutputs
from difix3d.recon.progressive import ProgressiveConfig, ProgressiveLoop, reconstruct_scene
from difix3d.recon.trainer import TrainerConfig
from difix3d.recon.view_fixers import OracleViewFixer
from test_progressive import make_street, tiny_config


def test_the_representations_iterations_follow_the_budget_unless_set(caplog):
    with caplog.at_level(logging.INFO, logger="difix3d.recon.progressive"):
        cfg = progressive_config(FleetConfig(extra={"trainer.iterations": 600})).budgeted()
    assert cfg.trainer.iterations == cfg.gaussian.iterations == 600
    assert "gaussian.iterations follows trainer.iterations: 600" in caplog.text
    assert ProgressiveConfig().budgeted().gaussian.iterations == 30_000  # the paper's 30k, from trainer's default
    same = progressive_config(FleetConfig(extra={"trainer.iterations": 600, "gaussian.iterations": 600}))
    assert same.budgeted() == same
    nerf = dataclasses.replace(ProgressiveConfig.tiny(), representation="nerfacto")
    assert nerf.budgeted() == nerf  # nerf None: Nerfacto's defaults, built at the budget when the run starts
    fleet_nerf = progressive_config(FleetConfig(representation="nerfacto", extra={"trainer.iterations": 600}))
    assert fleet_nerf.budgeted().nerf.iterations == 600  # the preset's NeRF follows --set trainer.iterations too


def test_a_representation_budget_set_apart_from_the_runs_is_an_error_naming_both():
    cfg = tiny_config(iterations=48)
    cfg = dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, iterations=96))
    with pytest.raises(ValueError, match=r"gaussian\.iterations 48 and trainer\.iterations 96 differ"):
        cfg.budgeted()
    with pytest.raises(ValueError, match=r"gaussian\.iterations 300 and trainer\.iterations 600 differ"):
        FleetConfig(extra={"trainer.iterations": 600, "gaussian.iterations": 300}).validate()  # on the driver


def test_batches_the_loop_does_not_take_are_refused():
    with pytest.raises(ValueError, match=r"trainer\.batch_size is 4: the progressive loop trains on one view"):
        FleetConfig(extra={"trainer.batch_size": 4}).validate()
    with pytest.raises(ValueError, match=r"gaussian\.batch_size is 2"):  # its learning rates would be scaled for 2
        ProgressiveConfig(gaussian=GaussianConfig(batch_size=2)).budgeted()


def test_a_derived_budget_decays_the_learning_rate_over_the_whole_run(tmp_path):
    torch.manual_seed(0)
    street = make_street()
    cfg = tiny_config(iterations=24, baseline=False, post_render=False,
                      gaussian=GaussianConfig.tiny(iterations=None, sh_degree=0, densify=False))
    reconstruct_scene(street, str(tmp_path), cfg, OracleViewFixer(street.render_gt), progress=False, device="cpu")
    assert storage.read_json(str(tmp_path / "config.json"))["gaussian"]["iterations"] == 24
    state = torch.load(SceneOutputs(str(tmp_path)).state(ProgressiveLoop.STATE_FILE), weights_only=False)
    means = state["representation"]["optimizers"]["means"]["param_groups"][0]
    assert means["lr"] / means["initial_lr"] == pytest.approx(cfg.gaussian.means_lr_final_factor, rel=1e-3)


def test_a_run_recorded_before_the_budget_was_derived_resumes_on_its_own_schedules(tmp_path, caplog):
    """Outputs written when gaussian.iterations kept the preset's number under another trainer.iterations (the fleet's
    --set trainer.iterations) resume as they started instead of being refused for a change nobody made."""
    torch.manual_seed(0)
    street = make_street()
    cfg = tiny_config(iterations=16, baseline=False, post_render=False,
                      gaussian=GaussianConfig.tiny(iterations=None, sh_degree=0, densify=False))
    fixer = OracleViewFixer(street.render_gt)
    reconstruct_scene(street, str(tmp_path), cfg, fixer, progress=False, device="cpu")
    record = storage.read_json(str(tmp_path / "config.json"))
    record["gaussian"]["iterations"] = 8  # what such a run recorded: the preset's budget, not the run's 16
    storage.write_json(str(tmp_path / "config.json"), record)
    for path in tmp_path.rglob("*.pt"):  # and what its saved states hold: the model was built with that budget
        state = torch.load(path, weights_only=False)
        if isinstance(state, dict) and "representation" in state:
            state["representation"]["config"]["iterations"] = 8
            torch.save(state, path)
    with caplog.at_level(logging.WARNING, logger="difix3d.recon.progressive"):
        reconstruct_scene(street, str(tmp_path), cfg, fixer, progress=False, device="cpu")
    assert "keeps the schedules it started with" in caplog.text
    assert storage.read_json(str(tmp_path / "config.json"))["gaussian"]["iterations"] == 8
    other = dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, iterations=20))
    with pytest.raises(InputError, match=r"trainer\.iterations 16 -> 20"):  # a real change is still refused
        reconstruct_scene(street, str(tmp_path), other, fixer, progress=False, device="cpu")
