"""make_representation: backends by name, config checks, and the message when the NeRF extra is missing
(runs without nerfstudio)."""

from __future__ import annotations

import sys

import pytest

from difix3d.recon.factory import KINDS, default_config, make_representation
from difix3d.recon.gaussians import GaussianConfig, GaussianSplat
from difix3d.recon.nerf import INSTALL_HINT, NerfConfig


@pytest.fixture(scope="module")
def segment(tmp_path_factory):
    from difix3d.scene.synthetic import make_segment

    return make_segment(str(tmp_path_factory.mktemp("seg") / "seg"), seed=1, frames=2, height=12, width=16,
                        num_points=50)


def test_3dgs_by_name_starts_from_the_scene_points(segment):
    rep = make_representation("3dgs", segment, GaussianConfig.tiny(10), device="cpu")
    assert isinstance(rep, GaussianSplat) and rep.num_primitives == 50 and rep.step == 0


def test_unknown_kind_and_mismatched_config_are_named(segment):
    with pytest.raises(ValueError, match="'nerf'.*3dgs, nerfacto"):
        make_representation("nerf", segment)
    with pytest.raises(TypeError, match="'3dgs' takes a GaussianConfig, got NerfConfig"):
        make_representation("3dgs", segment, NerfConfig.tiny())
    with pytest.raises(TypeError, match="'nerfacto' takes a NerfConfig, got GaussianConfig"):
        make_representation("nerfacto", segment, GaussianConfig.tiny())


def test_default_configs_are_the_papers_or_the_tiny_presets():
    assert KINDS == ("3dgs", "nerfacto")
    assert default_config("3dgs") == GaussianConfig()
    nerf = default_config("nerfacto")
    assert (nerf.iterations, nerf.rays_per_batch, nerf.num_levels, nerf.num_proposal_samples_per_ray) == (
        30_000, 4096, 16, (256, 96))  # nerfstudio's nerfacto method config
    assert default_config("nerfacto", iterations=50, tiny=True) == NerfConfig.tiny(50)
    assert NerfConfig.from_dict(__import__("dataclasses").asdict(NerfConfig.tiny(7))) == NerfConfig.tiny(7)


def test_missing_nerfstudio_says_what_to_install(segment, monkeypatch):
    monkeypatch.setitem(sys.modules, "nerfstudio.models.nerfacto", None)  # import of it now fails
    with pytest.raises(ImportError, match=r"pip install --no-deps nerfstudio==1\.1\.5") as err:
        make_representation("nerfacto", segment, NerfConfig.tiny(10), device="cpu")
    assert "difix3d[nerf]" in str(err.value) and INSTALL_HINT in str(err.value)
    assert isinstance(make_representation("3dgs", segment, device="cpu"), GaussianSplat)  # 3DGS needs no extra


def test_the_nerf_config_seed_is_kept_unless_a_seed_is_given(segment):
    pytest.importorskip("nerfstudio")
    cfg = __import__("dataclasses").replace(NerfConfig.tiny(5), seed=7)
    assert make_representation("nerfacto", segment, cfg, device="cpu").config.seed == 7
    assert make_representation("nerfacto", segment, cfg, device="cpu", seed=3).config.seed == 3
