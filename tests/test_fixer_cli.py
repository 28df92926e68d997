"""``difix3d fix`` on files and folders and ``difix3d convert``, through difix3d.cli.main."""

import os

import numpy as np
import pytest

from difix3d.cli import main
from difix3d.imageio import read_image, write_image


def _write(path, h, w, seed=0):
    write_image(str(path), np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_fix_folder_keeps_names_and_sizes(tmp_path):
    src = tmp_path / "renders"
    (src / "cam1").mkdir(parents=True)
    _write(src / "a.png", 40, 56)
    _write(src / "b.jpg", 37, 50, seed=1)
    _write(src / "cam1" / "c.png", 40, 56, seed=2)
    (src / "notes.txt").write_text("not an image")
    out = tmp_path / "fixed"
    assert main(["fix", str(src), "-o", str(out), "--batch", "2", "--device", "cpu"]) == 0
    assert read_image(str(out / "a.png")).shape == (40, 56, 3)
    assert read_image(str(out / "b.jpg")).shape == (37, 50, 3)
    assert read_image(str(out / "cam1" / "c.png")).shape == (40, 56, 3)
    assert not (out / "notes.txt").exists()


def test_fix_with_reference_changes_output(tmp_path):
    _write(tmp_path / "x.png", 32, 48)
    _write(tmp_path / "ref.png", 32, 48, seed=7)
    assert main(["fix", str(tmp_path / "x.png"), "-o", str(tmp_path / "plain"), "--device", "cpu"]) == 0
    assert main(["fix", str(tmp_path / "x.png"), "--ref", str(tmp_path / "ref.png"), "-o", str(tmp_path / "ref"),
                 "--device", "cpu"]) == 0
    plain, ref = read_image(str(tmp_path / "plain" / "x.png")), read_image(str(tmp_path / "ref" / "x.png"))
    assert plain.shape == ref.shape == (32, 48, 3) and not np.array_equal(plain, ref)


def test_reference_folder_is_looked_up_at_each_input_relative_path(tmp_path):
    for cam, seed in (("cam1", 1), ("cam2", 2)):
        _write(tmp_path / "in" / cam / "0.png", 32, 48, seed=seed)
    _write(tmp_path / "ref" / "cam1" / "0.png", 32, 48, seed=11)
    _write(tmp_path / "ref" / "cam2" / "0.png", 32, 48, seed=12)
    assert main(["fix", str(tmp_path / "in"), "--ref", str(tmp_path / "ref"), "-o", str(tmp_path / "out"),
                 "--device", "cpu"]) == 0
    # cam2's output equals fixing cam2's input with cam2's reference (not cam1's, not a same-named flat file)
    assert main(["fix", str(tmp_path / "in" / "cam2" / "0.png"), "--ref", str(tmp_path / "ref" / "cam2" / "0.png"),
                 "-o", str(tmp_path / "one"), "--device", "cpu"]) == 0
    assert np.array_equal(read_image(str(tmp_path / "out" / "cam2" / "0.png")), read_image(str(tmp_path / "one" / "0.png")))


def test_fix_errors_name_the_input(tmp_path, capsys):
    assert main(["fix", str(tmp_path / "missing.png"), "-o", str(tmp_path / "o")]) == 2
    assert "missing.png" in capsys.readouterr().err
    _write(tmp_path / "x.png", 32, 48)
    _write(tmp_path / "small_ref.png", 16, 16)  # another size: resized to the input's, as the official code does
    assert main(["fix", str(tmp_path / "x.png"), "--ref", str(tmp_path / "small_ref.png"),
                 "-o", str(tmp_path / "o"), "--device", "cpu"]) == 0
    assert read_image(str(tmp_path / "o" / "x.png")).shape == (32, 48, 3)
    (tmp_path / "broken_ref.png").write_bytes(b"not an image")
    assert main(["fix", str(tmp_path / "x.png"), "--ref", str(tmp_path / "broken_ref.png"),
                 "-o", str(tmp_path / "o2"), "--device", "cpu"]) == 2
    assert "broken_ref.png" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: --batch must be a positive count
        main(["fix", str(tmp_path / "x.png"), "-o", str(tmp_path / "o"), "--batch", "0"])
    assert "--batch: must be at least 1" in capsys.readouterr().err
    before = (tmp_path / "x.png").read_bytes()
    assert main(["fix", str(tmp_path / "x.png"), "-o", str(tmp_path), "--device", "cpu"]) == 2
    assert "x.png: -o" in capsys.readouterr().err and (tmp_path / "x.png").read_bytes() == before  # not replaced


def test_convert_official_pkl(tmp_path, capsys):
    import torch

    from difix3d.fixer.checkpoint import load_checkpoint, save_official_pkl
    from difix3d.fixer.testing import write_tiny_sd_turbo_folder

    base = write_tiny_sd_turbo_folder(str(tmp_path / "sd-turbo"))
    save_official_pkl(load_checkpoint(base), str(tmp_path / "m.pkl"))
    assert main(["convert", str(tmp_path / "m.pkl"), str(tmp_path / "ours"), "--base", base]) == 0
    assert sorted(os.listdir(tmp_path / "ours")) == ["config.json", "model.safetensors"]
    assert main(["convert", str(tmp_path / "m.pkl"), str(tmp_path / "x")]) == 2  # no base: names what to fetch
    sd = torch.load(str(tmp_path / "m.pkl"), weights_only=True)
    torch.save(sd | {"vae_lora_target_modules": ["nowhere"]}, str(tmp_path / "bad.pkl"))
    assert main(["convert", str(tmp_path / "bad.pkl"), str(tmp_path / "y"), "--base", base]) == 2  # no traceback
    assert "bad.pkl: its VAE LoRA targets ['nowhere']" in capsys.readouterr().err


def test_a_pkl_that_is_not_a_checkpoint_is_one_error_naming_it(tmp_path, capsys):
    (tmp_path / "notes.pkl").write_text("not weights\n")
    assert main(["convert", str(tmp_path / "notes.pkl"), str(tmp_path / "ours")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"difix3d convert: error: {tmp_path / 'notes.pkl'}: not a torch.save file"), err
    assert "expected model.safetensors + config.json, an official Difix .pkl (torch.save of a dict with " \
           "state_dict_unet and state_dict_vae), or a diffusers folder with unet/ and vae/" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "ours").exists()
    (tmp_path / "empty.pkl").write_bytes(b"")
    _write(tmp_path / "x.png", 32, 32)
    assert main(["fix", str(tmp_path / "x.png"), "--checkpoint", str(tmp_path / "empty.pkl"), "-o",
                 str(tmp_path / "o"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'empty.pkl'}: empty file (0 bytes), not a checkpoint: expected" in err
    assert len(err.strip().splitlines()) == 1


def test_outputs_never_replace_inputs_or_references(tmp_path, capsys):
    imgs, refs = tmp_path / "imgs", tmp_path / "refs"
    for folder in (imgs, imgs / "z", refs):
        folder.mkdir()
    for path in (imgs / "a.png", imgs / "z" / "a.png", refs / "a.png", refs / "z" / "a.png"):
        path.parent.mkdir(exist_ok=True)
        _write(path, 32, 48)
    (tmp_path / "link").symlink_to(imgs)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*.png")}
    cases = [(["fix", str(imgs), "-o", str(imgs / "z")], "imgs: -o .* inside this input folder"),
             (["fix", str(imgs), "--ref", str(refs), "-o", str(refs)], "refs: -o .* inside this input folder"),
             (["fix", str(imgs), "-o", str(tmp_path / "link")], "imgs: -o .* inside this input folder"),
             (["fix", str(imgs / "a.png"), "--ref", str(refs / "a.png"), "-o", str(refs)], "would overwrite")]
    import re

    for argv, pattern in cases:
        assert main(argv + ["--device", "cpu"]) == 2
        assert re.search(pattern, capsys.readouterr().err), argv
    assert {p: p.read_bytes() for p in tmp_path.rglob("*.png")} == before


def test_a_bad_image_is_named_and_skipped_and_the_others_are_fixed(tmp_path, capsys):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(3):
        _write(imgs / f"{i}.png", 32, 48, seed=i)
    (imgs / "1.png").write_bytes(b"not an image")
    assert main(["fix", str(imgs), "-o", str(tmp_path / "o"), "--batch", "4", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "1.png" in err and "1 of 3 images not fixed" in err
    assert sorted(os.listdir(tmp_path / "o")) == ["0.png", "2.png"]


def test_a_missing_reference_is_named_before_the_model_loads(tmp_path, capsys, monkeypatch):
    from difix3d.fixer import runner as runner_mod

    _write(tmp_path / "in" / "a.png", 16, 16)
    (tmp_path / "refs").mkdir()
    monkeypatch.setattr(runner_mod.FixerRunner, "from_checkpoint",
                        classmethod(lambda cls, *a, **k: pytest.fail("model loaded before --ref was checked")))
    assert main(["fix", str(tmp_path / "in"), "--ref", str(tmp_path / "refs"), "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "a.png: no reference for this image (looked for" in err and "1 of 1 inputs have none" in err
    assert main(["fix", str(tmp_path / "in"), "--ref", str(tmp_path / "nope.png"), "-o", str(tmp_path / "o")]) == 2
    assert "nope.png: reference image not found" in capsys.readouterr().err


def test_an_output_that_cannot_be_a_folder_is_named_before_the_model_loads(tmp_path, capsys, monkeypatch):
    from difix3d.fixer import runner as runner_mod

    _write(tmp_path / "in" / "a.png", 16, 16)
    (tmp_path / "taken.png").write_bytes(b"not a folder")
    monkeypatch.setattr(runner_mod.FixerRunner, "from_checkpoint",
                        classmethod(lambda cls, *a, **k: pytest.fail("model loaded before -o was checked")))
    assert main(["fix", str(tmp_path / "in"), "-o", str(tmp_path / "taken.png")]) == 2
    assert "taken.png: -o names a file, not a folder" in capsys.readouterr().err
    assert main(["fix", str(tmp_path / "in"), "-o", str(tmp_path / "taken.png" / "sub")]) != 0
    err = capsys.readouterr().err
    assert "taken.png" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    if os.geteuid() != 0:  # root may write anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert main(["fix", str(tmp_path / "in"), "-o", str(locked)]) == 2
        assert "not writable" in capsys.readouterr().err
