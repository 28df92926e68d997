"""Checkpoints: ours round-trips; SD-Turbo, official .pkl and nvidia diffusers layouts (built here, offline) load and
reproduce outputs; corrupt and mismatched files give errors naming the file and the keys."""

import io
import json
import os
import pickle
import zipfile
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from difix3d.errors import CheckpointError, MissingWeightsError
from difix3d.fixer.checkpoint import (convert_checkpoint, detect_format, load_checkpoint, save_checkpoint,
                                      save_nvidia_folder, save_official_pkl)
from difix3d.fixer.model import build_model
from difix3d.fixer.testing import write_tiny_sd_turbo_folder


@pytest.fixture(scope="module")
def x():
    return torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1


@pytest.fixture(scope="module")
def sd_turbo(tmp_path_factory):
    return write_tiny_sd_turbo_folder(str(tmp_path_factory.mktemp("sd-turbo")))


@pytest.fixture(scope="module")
def trained(sd_turbo):
    """A Difix from the SD-Turbo folder with every part moved off its init, as after fine-tuning."""
    model = load_checkpoint(sd_turbo)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or ".skip_conv_" in name or name.startswith("unet."):
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return model.eval()


def _out(model, x):
    with torch.no_grad():
        return model(x[:1]), model(x[:1], x[1:])


def _assert_same_outputs(a, b, x, atol=5e-5):
    for ya, yb in zip(_out(a, x), _out(b, x)):
        torch.testing.assert_close(ya, yb, atol=atol, rtol=0)  # fp32 noise; weights are compared exactly elsewhere


def test_ours_round_trips_exactly(tmp_path, x):
    model = build_model("tiny", seed=3).eval()
    save_checkpoint(model, str(tmp_path / "ck"))
    assert sorted(os.listdir(tmp_path / "ck")) == ["config.json", "model.safetensors"]
    meta = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert meta["format"] == "difix3d-fixer" and meta["config"]["preset"] == "tiny"
    assert meta["config"]["timestep"] == 199 and meta["config"]["lora_rank"] == 4
    loaded = load_checkpoint(str(tmp_path / "ck"))
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    _assert_same_outputs(model, loaded, x)
    assert detect_format(str(tmp_path / "ck" / "model.safetensors"))[0] == "difix3d"


def test_sd_turbo_folder_gives_fresh_difix_with_prompt_embedding(sd_turbo):
    from transformers import CLIPTextModel, CLIPTokenizer

    assert detect_format(sd_turbo)[0] == "sd-turbo"
    model = load_checkpoint(sd_turbo)
    assert model.config.preset == "tiny"
    tok = CLIPTokenizer.from_pretrained(sd_turbo, subfolder="tokenizer")
    ids = tok("remove degradation", padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = CLIPTextModel.from_pretrained(sd_turbo, subfolder="text_encoder")(ids)[0]
    torch.testing.assert_close(model.prompt_embeds, expected)
    assert torch.all(model.vae.decoder.skip_conv_1.base_layer.weight == 1e-5)


def test_official_pkl_loads_with_its_sd_turbo_base(tmp_path, sd_turbo, trained, x):
    path = str(tmp_path / "model_10001.pkl")
    save_official_pkl(trained, path)
    sd = torch.load(path, weights_only=True)
    assert {"state_dict_unet", "state_dict_vae", "rank_vae", "vae_lora_target_modules"} <= set(sd)
    assert all("lora" in k or "skip" in k for k in sd["state_dict_vae"]) and not _encoder_lora(sd["state_dict_vae"])
    assert all(t.startswith("decoder.") for t in sd["vae_lora_target_modules"])  # full names: the original's peft
    assert detect_format(path)[0] == "official-pkl"
    _assert_same_outputs(trained, load_checkpoint(path, base=sd_turbo), x)
    with pytest.raises(MissingWeightsError, match="sd-turbo"):
        load_checkpoint(path, base=None)
    sd["state_dict_unet"]["conv_in.scale"] = torch.ones(1)  # a key the model lacks
    torch.save(sd, str(tmp_path / "broken.pkl"))
    with pytest.raises(CheckpointError, match=r"broken\.pkl\[state_dict_unet\].*unexpected keys.*conv_in\.scale"):
        load_checkpoint(str(tmp_path / "broken.pkl"), base=sd_turbo)


def test_pkl_of_the_official_save_model_takes_the_rest_of_its_unet_from_the_base(tmp_path, sd_turbo, trained, x,
                                                                               caplog):
    """The official ``save_model`` keeps only the UNet's LoRA and conv_in tensors; its loader takes the rest from
    SD-Turbo."""
    path = str(tmp_path / "model_5001.pkl")
    save_official_pkl(trained, path)
    sd = torch.load(path, weights_only=True)
    sd["state_dict_unet"] = {k: v for k, v in sd["state_dict_unet"].items() if "lora" in k or "conv_in" in k}
    torch.save(sd, path)
    base_unet = load_checkpoint(sd_turbo).unet.state_dict()
    with caplog.at_level("INFO", logger="difix3d.fixer.checkpoint"):
        loaded = load_checkpoint(path, base=sd_turbo)
    got, n = loaded.unet.state_dict(), len(base_unet) - 2
    assert all(torch.equal(got[k], (sd["state_dict_unet"] if "conv_in" in k else base_unet)[k]) for k in got)
    assert f"{n} of the UNet's {len(base_unet)} tensors are not in the file" in caplog.text
    expected = load_checkpoint(str(_saved(trained, tmp_path / "copy")))
    expected.unet.load_state_dict(got)  # the trained VAE adapter and skips on that UNet
    _assert_same_outputs(expected, loaded, x)
    with pytest.raises(CheckpointError, match=rf"model_5001\.pkl: .*lacks {n} of the UNet's tensors.*--base DIR"):
        load_checkpoint(path, base=None)


def test_pkl_with_full_decoder_module_targets_loads_converts_and_reloads(tmp_path, sd_turbo, x):
    """pix2pix-turbo-style code lists full decoder module names as targets: the adapter is rebuilt in that shape."""
    from difix3d.fixer.checkpoint import _load_sd_turbo
    from difix3d.fixer.config import LORA_TARGETS

    probe = _load_sd_turbo(sd_turbo)
    targets = [n[len("vae."):] for n, _ in probe.named_modules()
               if n.startswith("vae.decoder.") and any(n.endswith("." + t) for t in LORA_TARGETS)
               and "base_layer" not in n and "lora_" not in n]
    model = _load_sd_turbo(sd_turbo, lora_rank=8, lora_targets=tuple(targets))
    with torch.no_grad():
        for name, p in model.vae.named_parameters():
            if "lora_B" in name or "skip_conv" in name:
                p.add_(torch.randn_like(p) * 0.02)
    assert not any(n.startswith("encoder.") and "lora_" in n for n, _ in model.vae.named_parameters())
    save_official_pkl(model, str(tmp_path / "m.pkl"))
    loaded = load_checkpoint(str(tmp_path / "m.pkl"), base=sd_turbo)
    assert loaded.config.lora_rank == 8 and list(loaded.config.lora_targets) == targets
    _assert_same_outputs(model.eval(), loaded, x)
    convert_checkpoint(str(tmp_path / "m.pkl"), str(tmp_path / "ours"), base=sd_turbo)
    _assert_same_outputs(model, load_checkpoint(str(tmp_path / "ours")), x)


def _lora_on_the_whole_vae(monkeypatch):
    """Build models as they were built before the adapter was restricted to the decoder: peft matched the target
    suffixes in the whole VAE, encoder included."""
    import difix3d.fixer.model

    monkeypatch.setattr(difix3d.fixer.model, "decoder_lora_modules", lambda vae, targets: list(targets))


def _encoder_lora(state):
    return [k for k in state if "encoder." in k and ("lora_" in k or ".base_layer." in k)]


@pytest.mark.parametrize("encoder_delta", [0.0, 0.05], ids=["frozen-encoder", "trained-encoder"])
def test_checkpoints_written_with_an_encoder_adapter_keep_their_outputs(tmp_path, monkeypatch, sd_turbo, x,
                                                                         encoder_delta):
    """Zero encoder adapters (a frozen encoder) are dropped and leave the weights exactly as they were; trained
    ones (``train_vae``) are folded into the encoder's weights."""
    from difix3d.fixer.config import LORA_TARGETS

    with monkeypatch.context() as m:
        _lora_on_the_whole_vae(m)
        old = load_checkpoint(sd_turbo)
        g = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for name, p in old.named_parameters():
                if "lora_B" in name or ".skip_conv_" in name or name.startswith("unet."):
                    p.add_(torch.randn(p.shape, generator=g) * (encoder_delta if ".encoder." in name else 0.02))
        assert _encoder_lora(old.state_dict())
        save_checkpoint(old, str(tmp_path / "ours"))
        save_nvidia_folder(old, str(tmp_path / "nvidia"), text_folder=sd_turbo)
        save_official_pkl(old, str(tmp_path / "m.pkl"))
    sd = torch.load(str(tmp_path / "m.pkl"), weights_only=True)
    torch.save(sd | {"vae_lora_target_modules": list(LORA_TARGETS)}, str(tmp_path / "m.pkl"))  # as written then
    old_encoder = {k.replace(".base_layer.", "."): v for k, v in old.vae.encoder.state_dict().items()
                   if "lora_" not in k}
    for uri in ("ours", "nvidia", "m.pkl"):
        loaded = load_checkpoint(str(tmp_path / uri), base=sd_turbo)
        assert not _encoder_lora(loaded.state_dict())
        _assert_same_outputs(old.eval(), loaded, x, atol=5e-4 if encoder_delta else 0.0)  # folding rounds
        encoder = loaded.vae.encoder.state_dict()
        assert all(torch.equal(encoder[k], v) for k, v in old_encoder.items()) == (encoder_delta == 0), uri
    state = load_file(str(tmp_path / "ours" / "model.safetensors"))
    del state["vae.encoder.conv_in.lora_B.vae_skip.weight"]
    save_file(state, str(tmp_path / "ours" / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: VAE encoder LoRA .*encoder\.conv_in\.lora_A"):
        load_checkpoint(str(tmp_path / "ours"))


def test_the_bundled_fixer_keeps_its_outputs(monkeypatch, x):
    """The bundled tiny fixer was trained with its whole VAE, encoder adapter included."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from difix3d.fixer.bundled import default_checkpoint
    from difix3d.fixer.config import FixerConfig
    from difix3d.fixer.model import DifixModel

    folder = default_checkpoint(warn=False)
    config = FixerConfig.from_dict(json.loads(open(os.path.join(folder, "config.json")).read())["config"])
    state = load_file(os.path.join(folder, "model.safetensors"))
    assert any(v.any() for k, v in state.items() if "encoder." in k and "lora_B" in k)
    with monkeypatch.context() as m:
        _lora_on_the_whole_vae(m)
        old = DifixModel(config, UNet2DConditionModel.from_config(config.unet), AutoencoderKL.from_config(config.vae),
                         state["prompt_embeds"])
    old.load_state_dict(state, strict=True)
    _assert_same_outputs(old.eval(), load_checkpoint(folder), x)  # dropping its encoder adapter moves them by ~0.5


def test_pkl_missing_adapter_or_skip_weights_is_an_error(tmp_path, sd_turbo, trained):
    save_official_pkl(trained, str(tmp_path / "m.pkl"))
    sd = torch.load(str(tmp_path / "m.pkl"), weights_only=True)
    del sd["state_dict_vae"]["decoder.skip_conv_1.base_layer.weight"]
    torch.save(sd, str(tmp_path / "partial.pkl"))
    with pytest.raises(CheckpointError, match=r"partial\.pkl\[state_dict_vae\].*missing keys.*skip_conv_1"):
        load_checkpoint(str(tmp_path / "partial.pkl"), base=sd_turbo)


def test_pkl_whose_lora_targets_match_nothing_is_an_error_naming_file_and_targets(tmp_path, sd_turbo, trained):
    save_official_pkl(trained, str(tmp_path / "m.pkl"))
    sd = torch.load(str(tmp_path / "m.pkl"), weights_only=True)
    sd["vae_lora_target_modules"] = ["decoder.mid.block_1.conv1"]  # another code base's module names
    torch.save(sd, str(tmp_path / "other_names.pkl"))
    with pytest.raises(CheckpointError, match=r"other_names\.pkl: .*LoRA targets \['decoder\.mid\.block_1\.conv1'\]"):
        load_checkpoint(str(tmp_path / "other_names.pkl"), base=sd_turbo)


def test_a_model_merged_for_serving_saves_and_loads_without_doubling_lora(tmp_path, trained, x):
    from difix3d.fixer.runner import FixerRunner

    model = load_checkpoint(str(_saved(trained, tmp_path / "copy")))
    runner = FixerRunner(model, device="cpu")  # merges the LoRA into the decoder convs
    save_checkpoint(runner.model, str(tmp_path / "merged"))
    for ya, yb in zip(_out(trained, x), _out(load_checkpoint(str(tmp_path / "merged")), x)):
        torch.testing.assert_close(ya, yb, atol=5e-4, rtol=0)  # merging rounds; a doubled delta is ~100x larger


def test_a_merged_model_exports_to_every_format_with_its_merged_outputs(tmp_path, sd_turbo, trained, x):
    model = load_checkpoint(str(_saved(trained, tmp_path / "copy")))
    assert model.merge_lora() > 0  # what serving does in place; the model may then be saved in any layout
    expected = _out(model, x)
    save_checkpoint(model, str(tmp_path / "ours"))
    save_nvidia_folder(model, str(tmp_path / "nvidia"), text_folder=sd_turbo)
    save_official_pkl(model, str(tmp_path / "m.pkl"))
    for uri in ("ours", "nvidia", "m.pkl"):
        loaded = load_checkpoint(str(tmp_path / uri), base=sd_turbo)
        for ya, yb in zip(expected, _out(loaded, x)):
            torch.testing.assert_close(ya, yb, atol=5e-4, rtol=0, msg=uri)  # a delta added twice is ~100x larger


def _saved(model, path):
    save_checkpoint(model, str(path))
    return path


def test_fine_tuning_starts_from_a_pkl_with_the_configured_base(tmp_path, sd_turbo, trained, x, monkeypatch):
    from difix3d.train.config import FinetuneConfig
    from difix3d.train.loop import _initial_model_and_state

    path = str(tmp_path / "model_10001.pkl")
    save_official_pkl(trained, path)
    monkeypatch.delenv("DIFIX3D_SD_TURBO", raising=False)
    model, state = _initial_model_and_state(FinetuneConfig(init=path, base=sd_turbo), checkpoint=None)
    assert state is None and model.training
    _assert_same_outputs(trained, model.eval(), x)
    with pytest.raises(MissingWeightsError, match="sd-turbo"):
        _initial_model_and_state(FinetuneConfig(init=path), checkpoint=None)


def test_nvidia_diffusers_folder_loads(tmp_path, sd_turbo, trained, x):
    folder = str(tmp_path / "difix_ref")
    save_nvidia_folder(trained, folder, text_folder=sd_turbo)
    vae_cfg = json.loads(open(os.path.join(folder, "vae", "config.json")).read())
    assert {"gamma", "ignore_skip", "lora_rank"} <= set(vae_cfg)
    assert detect_format(folder)[0] == "nvidia-diffusers"
    wpath = os.path.join(folder, "vae", "diffusion_pytorch_model.safetensors")
    assert "encoder.conv_in.weight" in load_file(wpath) and not _encoder_lora(load_file(wpath))  # as the original's
    _assert_same_outputs(trained, load_checkpoint(folder), x)
    # diffusers-style names without peft's base_layer / adapter parts load the same
    state = load_file(wpath)
    plain = {k.replace(".base_layer.", ".").replace(".vae_skip.", "."): v for k, v in state.items()}
    save_file(plain, wpath)
    _assert_same_outputs(trained, load_checkpoint(folder), x)
    # a config without Difix's keys: the skip convs and LoRA in the weights still say what it is (loaded as SD-Turbo,
    # they were dropped and the outputs were those of an untrained fixer)
    vae_cfg = {k: v for k, v in vae_cfg.items() if k not in ("gamma", "ignore_skip", "lora_rank")}
    vae_cfg["_class_name"] = "AutoencoderKL"
    with open(os.path.join(folder, "vae", "config.json"), "w") as f:
        json.dump(vae_cfg, f)
    assert detect_format(folder)[0] == "nvidia-diffusers"
    _assert_same_outputs(trained, load_checkpoint(folder), x)


def test_convert_any_layout_to_ours(tmp_path, sd_turbo, trained, x):
    pkl = str(tmp_path / "m.pkl")
    save_official_pkl(trained, pkl)
    convert_checkpoint(pkl, str(tmp_path / "ours"), base=sd_turbo)
    _assert_same_outputs(trained, load_checkpoint(str(tmp_path / "ours")), x)


@pytest.fixture()
def ours(tmp_path):
    return save_checkpoint(build_model("tiny", seed=0), str(tmp_path / "ck"))


def test_corrupt_weights_name_the_file(ours):
    path = os.path.join(ours, "model.safetensors")
    with open(path, "r+b") as f:
        f.truncate(1000)
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*not a readable safetensors"):
        load_checkpoint(ours)


def test_missing_and_unexpected_keys_are_named(ours):
    path = os.path.join(ours, "model.safetensors")
    state = load_file(path)
    del state["vae.decoder.skip_conv_2.base_layer.weight"]
    state["vae.decoder.skip_conv_9.weight"] = torch.zeros(1)
    save_file(state, path)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(ours)
    msg = str(e.value)
    assert "model.safetensors" in msg and "missing keys" in msg and "skip_conv_2.base_layer.weight" in msg
    assert "unexpected keys" in msg and "skip_conv_9.weight" in msg


def test_weights_of_another_preset_are_a_shape_mismatch(ours):
    cfg_path = os.path.join(ours, "config.json")
    meta = json.loads(open(cfg_path).read())
    meta["config"]["unet"]["block_out_channels"] = [64, 64]
    open(cfg_path, "w").write(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*(shape mismatch|keys)"):
        load_checkpoint(ours)


def test_missing_files_and_bad_config(ours, tmp_path):
    os.remove(os.path.join(ours, "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*missing"):
        load_checkpoint(ours)
    open(os.path.join(ours, "config.json"), "w").write('{"format": "something-else"}')
    with pytest.raises(CheckpointError, match=r"config\.json.*not a difix3d fixer config"):
        load_checkpoint(ours)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a fixer checkpoint"):
        load_checkpoint(str(tmp_path / "empty"))
    with pytest.raises(MissingWeightsError):
        load_checkpoint(str(tmp_path / "nowhere" / "ck"))


# what every error on a file that is not a fixer checkpoint ends with: the layouts accepted
LAYOUTS = (r"expected model\.safetensors \+ config\.json, an official Difix \.pkl \(torch\.save of a dict with "
           r"state_dict_unet and state_dict_vae\), or a diffusers folder with unet/ and vae/")
BUILT = []  # what the payload below would append to, if it were ever unpickled


def _build(what):
    BUILT.append(what)


class _Payload:
    def __reduce__(self):
        return _build, ("built",)


def _torch_save_cut(path, legacy=False):
    buf = io.BytesIO()
    torch.save({"state_dict_unet": {"w": torch.zeros(256)}, "state_dict_vae": {}}, buf,
               _use_new_zipfile_serialization=not legacy)
    open(path, "wb").write(buf.getvalue()[:len(buf.getvalue()) // 2])


BAD_PKLS = {
    "text": (lambda p: open(p, "w").write("model weights: see the README\n"),
             r"not a torch\.save file \(it starts with b'model weights: s'\)"),
    "plain_pickle": (lambda p: pickle.dump({"unet": 1, "vae": 2}, open(p, "wb")),
                     r"a plain Python pickle, not a torch\.save file"),
    "plain_dict": (lambda p: torch.save({"unet": torch.zeros(1), "vae": torch.zeros(1)}, p),
                   r"not an official Difix \.pkl: missing the keys \['state_dict_unet', 'state_dict_vae'\] "
                   r"\(it holds \['unet', 'vae'\]\)"),
    "truncated": (_torch_save_cut, r"corrupt or truncated torch\.save file \(RuntimeError: PytorchStreamReader failed "
                                   r"reading zip archive: failed finding central directory\)"),
    "truncated_legacy": (lambda p: _torch_save_cut(p, legacy=True),
                         r"corrupt or truncated torch\.save file \(\w+Error[^)]*\)"),
    "empty": (lambda p: open(p, "wb").close(), r"empty file \(0 bytes\), not a checkpoint"),
    "list": (lambda p: torch.save([torch.zeros(1), 2], p), r"not an official Difix \.pkl: it holds a list, not a dict"),
    "unet_not_a_dict": (lambda p: torch.save({"state_dict_unet": [torch.zeros(1)], "state_dict_vae": {}}, p),
                        r"not an official Difix \.pkl: state_dict_unet is a list, not a dict of tensors"),
    "object": (lambda p: torch.save({"state_dict_unet": _Payload(), "state_dict_vae": {}}, p),
               r"holds Python objects other than tensors and plain containers \(\S*_build\), which are not "
               r"unpickled as that could run arbitrary code"),
    "legacy_protocol_4": (lambda p: torch.save({"state_dict_unet": {}, "state_dict_vae": {}}, p,
                                               _use_new_zipfile_serialization=False, pickle_protocol=4),
                          r"an old-format torch\.save file written with pickle protocol 4, which weights_only loading "
                          r"cannot read: re-save it with torch\.save's defaults"),
    "other_zip": (lambda p: zipfile.ZipFile(p, "w").writestr("a.txt", "hello"),
                  r"a zip archive that is not a torch\.save file"),
}


@pytest.mark.parametrize("kind", sorted(BAD_PKLS))
def test_a_pkl_that_is_not_a_difix_checkpoint_is_named_with_its_problem(tmp_path, sd_turbo, kind):
    write, problem = BAD_PKLS[kind]
    path = str(tmp_path / f"{kind}.pkl")
    write(path)
    assert detect_format(path)[0] == "official-pkl"
    for base in (sd_turbo, None):  # the file is judged before the base is asked for
        with pytest.raises(CheckpointError, match=rf"^{re.escape(path)}: {problem}: {LAYOUTS}$"):
            load_checkpoint(path, base=base)
    with pytest.raises(CheckpointError, match=rf"^{re.escape(path)}: {problem}"):
        convert_checkpoint(path, str(tmp_path / "ours"), base=sd_turbo)
    assert not (tmp_path / "ours").exists() and BUILT == []  # nothing written, no object of the file built


def test_local_looking_paths_are_not_taken_for_hub_ids(tmp_path, monkeypatch):
    from difix3d.fixer.checkpoint import looks_like_hub_id

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    assert looks_like_hub_id("stabilityai/sd-turbo") and looks_like_hub_id("nvidia/difix")
    for local in ("ckpt/", "runs/missing", "./a/b", "/abs/x", "~/x", "s3://b/c"):
        assert not looks_like_hub_id(local), local
    with pytest.raises(MissingWeightsError, match="ckpt/: no such checkpoint"):  # not "fetch it from the hub"
        load_checkpoint("ckpt/")


def test_a_checkpoint_saved_over_another_never_pairs_new_weights_with_the_old_config(tmp_path, monkeypatch):
    from difix3d import storage

    uri = str(tmp_path / "ck")
    save_checkpoint(build_model("tiny", seed=0), uri)
    newer = build_model("tiny", seed=1)
    newer.config.skip_gamma = 0.25

    def cut_short(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(storage, "write_json", cut_short)
    with pytest.raises(OSError):
        save_checkpoint(newer, uri)
    monkeypatch.undo()
    with pytest.raises(CheckpointError):  # half written: refused, not loaded as the old config with new weights
        load_checkpoint(uri)


def test_an_sd_turbo_folder_with_only_fp16_weights_computes_its_prompt(tmp_path):
    import shutil

    from difix3d.fixer.checkpoint import encode_prompt

    folder = write_tiny_sd_turbo_folder(str(tmp_path / "sd"))
    want = encode_prompt(folder, "remove degradation")
    enc = os.path.join(folder, "text_encoder")
    for name in os.listdir(enc):
        if name.endswith(".safetensors"):
            shutil.move(os.path.join(enc, name), os.path.join(enc, name.replace(".safetensors", ".fp16.safetensors")))
    assert torch.equal(encode_prompt(folder, "remove degradation"), want)
    for name in os.listdir(enc):
        if name.endswith(".safetensors"):
            os.remove(os.path.join(enc, name))
    with pytest.raises(MissingWeightsError, match="text_encoder: cannot load the text encoder"):
        encode_prompt(folder, "remove degradation")


def test_exporters_refuse_settings_their_layout_cannot_record(tmp_path, trained, sd_turbo):
    import copy

    model = copy.deepcopy(trained)
    model.config.skip_gamma = 0.5  # the official decoder's gamma is a constant 1
    with pytest.raises(CheckpointError, match="cannot record skip_gamma=0.5"):
        save_official_pkl(model, str(tmp_path / "m.pkl"))
    assert not (tmp_path / "m.pkl").exists()
    model = copy.deepcopy(trained)
    model.config.lora_targets = ("conv1", "conv2")  # nvidia/difix folders record the rank only
    with pytest.raises(CheckpointError, match="cannot record the LoRA targets"):
        save_nvidia_folder(model, str(tmp_path / "nvidia"), text_folder=sd_turbo)
    assert not (tmp_path / "nvidia").exists()
