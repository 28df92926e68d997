"""Every fixer checkpoint format, in one place; the model itself knows nothing of files.

- ours: ``<uri>/model.safetensors`` + ``<uri>/config.json`` (FixerConfig, prompt embedding inside the weights);
  any storage URI (local, s3://, gs://). Round-trips exactly.
- an SD-Turbo diffusers folder (or a hub id found in the local HF cache): a fresh Difix to fine-tune; the prompt
  embedding is computed once here with the folder's CLIP tokenizer and text encoder.
- the official Difix ``.pkl`` (``state_dict_unet`` whole or, as the original ``save_model`` writes it, its LoRA and
  conv_in tensors only; ``state_dict_vae`` LoRA + skip keys, ``rank_vae``, ``vae_lora_target_modules``): the rest of its
  UNet, its VAE base weights and its prompt come from an SD-Turbo folder (``base``).
- the diffusers-format ``nvidia/difix`` / ``nvidia/difix_ref`` folders: ``unet/`` plus ``vae/`` whose config carries
  ``gamma`` / ``ignore_skip`` / ``lora_rank`` and whose weights carry the skip convs and LoRA.
Nothing reaches the network: a hub id is looked up in the local cache only.
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import re
import warnings

import torch

from difix3d import storage
from difix3d.errors import CheckpointError, MissingWeightsError
from difix3d.fixer.config import ADAPTER_NAME, LORA_ALPHA, LORA_TARGETS, PRESETS, FixerConfig, preset_config
from difix3d.fixer.model import DifixModel, decoder_lora_modules

log = logging.getLogger(__name__)

FORMAT = "difix3d-fixer"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
SD_TURBO_ENV = "DIFIX3D_SD_TURBO"  # where an SD-Turbo folder lies, for .pkl checkpoints that need its base weights
OFFICIAL_PKL_KEYS = ("state_dict_unet", "state_dict_vae")
LAYOUTS = (f"{WEIGHTS_FILE} + {CONFIG_FILE}, an official Difix .pkl (torch.save of a dict with "
           f"{' and '.join(OFFICIAL_PKL_KEYS)}), or a diffusers folder with unet/ and vae/")
FETCH_SD_TURBO = ("fetch it with `huggingface-cli download stabilityai/sd-turbo --local-dir DIR` on a machine with "
                  f"internet and pass base=DIR (CLI: --base DIR) or set {SD_TURBO_ENV}=DIR")


def save_checkpoint(model: DifixModel, uri: str, provenance: dict | None = None) -> str:
    """Write ``model`` in our format under ``uri`` (a folder URI); returns ``uri``. Weights are written as they are
    (dtype kept; a model merged for serving as its merged weights, see :func:`_export_state`), the config last so a
    half-written checkpoint is never mistaken for a whole one. ``provenance`` (JSON-able, e.g. the fine-tuning run
    and step that produced it) is kept in the config for :func:`checkpoint_provenance`; loading ignores it."""
    from safetensors.torch import save

    state = _export_state(model, lambda k: True)
    storage.makedirs(uri)
    config_uri = storage.join(uri, CONFIG_FILE)
    if storage.exists(config_uri):  # over an older checkpoint: never new weights beside its config, if cut short
        storage.delete(config_uri)
    storage.write_bytes(storage.join(uri, WEIGHTS_FILE), save(state))
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "config": model.config.to_dict()}
    if provenance is not None:
        meta["provenance"] = provenance
    storage.write_json(storage.join(uri, CONFIG_FILE), meta)
    return uri


def checkpoint_provenance(uri: str) -> dict | None:
    """The ``provenance`` a checkpoint of ours at ``uri`` was saved with; None when it has none, or when ``uri``
    holds no whole checkpoint of ours (no config yet, or not our format)."""
    config_uri = storage.join(uri, CONFIG_FILE)
    if not storage.exists(config_uri):
        return None
    try:
        meta = json.loads(storage.read_text(config_uri))
    except ValueError:
        return None
    provenance = meta.get("provenance") if isinstance(meta, dict) and meta.get("format") == FORMAT else None
    return provenance if isinstance(provenance, dict) else None


def load_checkpoint(uri: str, device: str | torch.device | None = None, base: str | None = None) -> DifixModel:
    """Any supported checkpoint -> a :class:`DifixModel` in eval mode on ``device`` (CPU if None), in the dtype its
    weights were saved in (fp32 for the diffusers and .pkl layouts).

    ``base``: an SD-Turbo folder, needed only by the official ``.pkl`` format (default: ``$DIFIX3D_SD_TURBO``).
    Raises :class:`CheckpointError` (corrupt or mismatched, naming the file and keys) or :class:`MissingWeightsError`.
    """
    kind, path = detect_format(uri)
    if kind == "difix3d":
        model = _load_ours(path)
    elif kind == "official-pkl":
        model = _load_official_pkl(path, base or os.environ.get(SD_TURBO_ENV))
    elif kind == "nvidia-diffusers":
        model = _load_nvidia_folder(path)
    else:
        model = _load_sd_turbo(path)
    log.info("loaded %s fixer checkpoint %s (preset %s)", kind, uri, model.config.preset)
    return model.to(device or "cpu").eval()


def convert_checkpoint(src: str, dst: str, base: str | None = None) -> str:
    """Any supported checkpoint at ``src`` -> ours at ``dst``."""
    return save_checkpoint(load_checkpoint(src, base=base), dst)


def detect_format(uri: str) -> tuple[str, str]:
    """-> (kind, location): ``difix3d`` | ``official-pkl`` | ``nvidia-diffusers`` | ``sd-turbo``."""
    uri = str(uri)
    if storage.exists(uri) and not storage.is_dir(uri):
        if uri.endswith(".safetensors") and storage.exists(storage.join(os.path.dirname(uri), CONFIG_FILE)):
            return "difix3d", os.path.dirname(uri)
        return "official-pkl", uri
    if storage.is_dir(uri):
        if storage.exists(storage.join(uri, CONFIG_FILE)) and not storage.exists(storage.join(uri, "unet")):
            return "difix3d", uri
        if storage.is_local(uri) and os.path.isdir(os.path.join(uri, "unet")) and os.path.isdir(os.path.join(uri, "vae")):
            vae_cfg = _read_json_file(os.path.join(uri, "vae", CONFIG_FILE))
            if {"gamma", "ignore_skip", "lora_rank"} & set(vae_cfg) or "difix" in str(vae_cfg.get("_class_name", "")).lower():
                return "nvidia-diffusers", uri
            if _holds_difix_keys(os.path.join(uri, "vae")):  # a Difix VAE whose config lost its Difix keys: loaded
                return "nvidia-diffusers", uri                 # as SD-Turbo, its skip convs and LoRA were dropped
            return "sd-turbo", uri
        raise CheckpointError(uri, f"not a fixer checkpoint: expected {LAYOUTS}")
    if looks_like_hub_id(uri):
        return detect_format(_hub_cache_path(uri))
    raise MissingWeightsError(f"{uri}: no such checkpoint")


# --- ours ----------------------------------------------------------------------------------------------------------
def _load_ours(uri: str) -> DifixModel:
    cfg_uri, w_uri = storage.join(uri, CONFIG_FILE), storage.join(uri, WEIGHTS_FILE)
    if not storage.exists(cfg_uri):
        raise CheckpointError(cfg_uri, "missing: a difix3d checkpoint folder holds config.json and model.safetensors")
    try:
        meta = json.loads(storage.read_text(cfg_uri))
        if meta.get("format") != FORMAT:
            raise ValueError(f"format is {meta.get('format')!r}, expected {FORMAT!r}")
        config = FixerConfig.from_dict(meta["config"])
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(cfg_uri, f"not a difix3d fixer config: {e}") from e
    if not storage.exists(w_uri):
        raise CheckpointError(w_uri, "missing: the weights of this checkpoint were never written or were deleted")
    state = _read_safetensors(w_uri)
    return materialize(config, state, source=w_uri)


def materialize(config: FixerConfig, state: dict[str, torch.Tensor], source: str) -> DifixModel:
    """Build the model of ``config`` without allocating random weights, then take ``state`` (all keys, exactly; an
    encoder adapter of an older checkpoint folded into its weights, see :func:`_fold_encoder_lora`)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    state = _fold_encoder_lora(state, source)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config.unet)
        vae = AutoencoderKL.from_config(config.vae)
        model = _difix(config, unet, vae, torch.empty(1, config.prompt_tokens, config.cross_attention_dim), source)
    _check_keys(model.state_dict(), state, source)
    _check_shapes(model.state_dict(), state, source)
    model.load_state_dict(state, strict=True, assign=True)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type == "meta"]
    if left:
        raise CheckpointError(source, f"tensors not provided by the checkpoint: {left[:8]}")
    return model


# --- SD-Turbo folder -----------------------------------------------------------------------------------------------
def _load_sd_turbo(folder: str, lora_rank: int | None = None, lora_targets: tuple[str, ...] | None = None,
                   source: str | None = None) -> DifixModel:
    """A fresh Difix on an SD-Turbo folder's weights; ``lora_rank`` / ``lora_targets`` shape its decoder adapter
    (default: ours, the official Difix code's) as the checkpoint ``source`` (named in errors) asks."""
    unet, vae = _pretrained(folder, "unet"), _pretrained(folder, "vae")
    config = _config_from(unet, vae)
    prompt = encode_prompt(folder, config.prompt)
    config.prompt_tokens = prompt.shape[1]
    config.lora_rank = config.lora_rank if lora_rank is None else int(lora_rank)
    config.lora_targets = config.lora_targets if lora_targets is None else tuple(lora_targets)
    return _difix(config, unet, vae, prompt, source or folder)


def encode_prompt(folder: str, prompt: str) -> torch.Tensor:
    """CLIP text embedding ``[1, tokens, D]`` of ``prompt`` with the folder's tokenizer/ and text_encoder/."""
    from transformers import CLIPTextModel, CLIPTokenizer

    for sub in ("tokenizer", "text_encoder"):
        if not os.path.isdir(os.path.join(folder, sub)):
            raise MissingWeightsError(f"{os.path.join(folder, sub)}: missing; the prompt embedding is computed with "
                                      f"the SD-Turbo tokenizer and text encoder: {FETCH_SD_TURBO}")
    tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
    errors = []
    for variant in (None, "fp16"):  # as the UNet and VAE: a download may hold only the fp16 weights
        try:
            encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", variant=variant,
                                                    torch_dtype=torch.float32).eval()
            break
        except (OSError, ValueError) as e:
            errors.append(str(e).splitlines()[0])
    else:
        raise MissingWeightsError(f"{os.path.join(folder, 'text_encoder')}: cannot load the text encoder "
                                  f"({'; '.join(errors)}); {FETCH_SD_TURBO}")
    ids = tokenizer(prompt, max_length=tokenizer.model_max_length, padding="max_length", truncation=True,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        return encoder(ids)[0].float()  # last hidden state, as the official code uses


# --- official .pkl -------------------------------------------------------------------------------------------------
def _load_official_pkl(path: str, base: str | None) -> DifixModel:
    sd = _read_pkl(path)
    if not isinstance(sd, dict):
        raise CheckpointError(path, f"not an official Difix .pkl: it holds a {type(sd).__name__}, not a dict: "
                                    f"expected {LAYOUTS}")
    missing = [k for k in OFFICIAL_PKL_KEYS if k not in sd]
    if missing:
        held = sorted(map(str, sd))
        raise CheckpointError(path, f"not an official Difix .pkl: missing the keys {missing} (it holds "
                                    f"{held[:8]}{' ...' if len(held) > 8 else ''}): expected {LAYOUTS}")
    bad = [f"{k} is a {type(sd[k]).__name__}" for k in OFFICIAL_PKL_KEYS if not isinstance(sd[k], dict)]
    if bad:
        raise CheckpointError(path, f"not an official Difix .pkl: {', '.join(bad)}, not a dict of tensors: "
                                    f"expected {LAYOUTS}")
    if not base or not os.path.isdir(base):
        missing = _unet_tensors_missing(sd["state_dict_unet"])
        if missing:
            raise CheckpointError(path, f"its state_dict_unet lacks {missing} of the UNet's tensors (the official "
                                        "Difix save_model writes only the LoRA and conv_in ones): they come from "
                                        f"SD-Turbo, as the VAE's base weights do ({base or 'no base given'}): "
                                        f"{FETCH_SD_TURBO}")
        raise MissingWeightsError(f"{path}: the official Difix .pkl holds only the VAE's LoRA and skip weights, "
                                  f"their base comes from SD-Turbo ({base or 'no base given'}): {FETCH_SD_TURBO}")
    # the adapter is built in the checkpoint's own shape: its rank and target list (suffixes in the official Difix
    # code, full decoder module names in pix2pix-turbo-style code)
    model = _load_sd_turbo(base, sd.get("rank_vae", 4), sd.get("vae_lora_target_modules", LORA_TARGETS), path)
    # the file's UNet tensors over SD-Turbo's, as the official loader does: its save_model keeps only some of them
    unet_state = model.unet.state_dict()
    _check_keys(unet_state, unet_state | sd["state_dict_unet"], f"{path}[state_dict_unet]")  # unexpected ones
    from_base = len(unet_state.keys() - sd["state_dict_unet"].keys())
    if from_base:
        log.info("%s: %d of the UNet's %d tensors are not in the file and come from the SD-Turbo base %s", path,
                 from_base, len(unet_state), base)
    unet_state.update(sd["state_dict_unet"])
    vae_state = model.vae.state_dict()
    # the file holds exactly the adapter and skip-conv tensors (the VAE's base weights come from SD-Turbo), and older
    # files an encoder adapter too, folded into SD-Turbo's encoder weights
    _check_keys({k: v for k, v in vae_state.items() if "lora" in k or "skip" in k},
                {k: v for k, v in sd["state_dict_vae"].items() if not _ENCODER_LORA.match(k)},
                f"{path}[state_dict_vae] (rank_vae={model.config.lora_rank})")
    vae_state = _fold_encoder_lora(vae_state | sd["state_dict_vae"], f"{path}[state_dict_vae]")
    _check_shapes(model.unet.state_dict(), unet_state, f"{path}[state_dict_unet]")
    _check_shapes(model.vae.state_dict(), vae_state, f"{path}[state_dict_vae]")
    model.unet.load_state_dict(unet_state, strict=True)
    model.vae.load_state_dict(vae_state, strict=True)
    return model


# how torch.save's older, non-zip format begins: its magic number, pickled (the opcode and bytes of that long; the
# protocol header and framing before it vary with the pickle protocol)
_LEGACY_TORCH_SAVE = pickle.dumps(torch.serialization.MAGIC_NUMBER, protocol=2)[2:-1]


def _read_pkl(path: str):
    """The object a torch.save file holds, unpickled with ``weights_only`` (tensors and plain containers only: other
    objects are refused, never built). A file that does not load is a CheckpointError saying what it is instead: empty,
    not a torch.save file, a plain pickle, one holding other objects, or corrupt or truncated."""
    data = storage.read_bytes(path)
    try:
        with warnings.catch_warnings():  # torch's warning on a plain pickle's protocol: the error below says it all
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a bad file; the header tells what it is
        detail = re.search(r"WeightsUnpickler error: (.*)", str(e))
        detail = (detail[1] if detail else str(e)).strip().split("\n")[0].split(". ")[0]
        if not data:
            problem = "empty file (0 bytes), not a checkpoint"
        elif not data.startswith((b"PK\x03\x04", b"\x80")):  # neither torch.save's zip archive nor a pickle
            problem = f"not a torch.save file (it starts with {data[:16]!r})"
        elif data.startswith(b"\x80") and _LEGACY_TORCH_SAVE not in data[:32]:
            problem = "a plain Python pickle, not a torch.save file"
        elif data.startswith(b"\x80") and data[1] > 2 and "Unsupported operand" in str(e):
            problem = (f"an old-format torch.save file written with pickle protocol {data[1]}, which weights_only "
                       "loading cannot read: re-save it with torch.save's defaults")
        elif data.startswith(b"PK\x03\x04") and "not in a subdirectory" in str(e):  # torch.save's zips hold a folder
            problem = "a zip archive that is not a torch.save file"
        elif found := re.search(r"\bGLOBAL (\S+)", detail):  # weights_only refused to build an object
            problem = (f"holds Python objects other than tensors and plain containers ({found[1]}), which are not "
                       "unpickled as that could run arbitrary code")
        else:
            problem = f"corrupt or truncated torch.save file ({type(e).__name__}{': ' + detail if detail else ''})"
        raise CheckpointError(path, f"{problem}: expected {LAYOUTS}") from e


def _unet_tensors_missing(unet_state: dict[str, torch.Tensor]) -> int:
    """How many tensors of its UNet a .pkl's ``state_dict_unet`` lacks, judged by the preset whose UNet holds all of
    its keys in their shapes (0 when none does: nothing to tell without the base)."""
    from diffusers import UNet2DConditionModel

    for name in PRESETS:
        with torch.device("meta"):
            want = UNet2DConditionModel.from_config(preset_config(name).unet).state_dict()
        if all(k in want and tuple(want[k].shape) == tuple(v.shape) for k, v in unet_state.items()):
            return len(want.keys() - unet_state.keys())
    return 0


def save_official_pkl(model: DifixModel, path: str) -> None:
    """Write ``model`` in the official Difix layout (for exchanging with the original code and for tests). The layout
    has no place for ``skip_gamma`` (the original decoder's gamma is a constant 1): a model with another one is
    refused rather than written as one that loads back different."""
    if model.config.skip_gamma != 1.0:
        raise CheckpointError(path, f"the official .pkl layout cannot record skip_gamma={model.config.skip_gamma} "
                                    "(it loads back with 1.0): save in difix3d's format or as an nvidia/difix folder")
    state = _export_state(model, _in_official_pkl)
    sd = {"state_dict_unet": _strip(state, "unet."), "state_dict_vae": _strip(state, "vae."),
          "rank_vae": model.config.lora_rank,
          # full module names, as the official code writes them: the list goes to peft as it is, and suffixes would
          # wrap the encoder too
          "vae_lora_target_modules": decoder_lora_modules(model.vae, model.config.lora_targets),
          "optimizer": {}}
    storage.write_torch(path, sd)


def _in_official_pkl(key: str) -> bool:
    """Whether the official layout holds this model key: the whole UNet (the original's own files may hold less);
    of the VAE, the adapter and the skip convs only (its base weights come from SD-Turbo)."""
    return key.startswith("unet.") or (key.startswith("vae.") and ("lora" in key or "skip" in key))


# --- nvidia/difix diffusers folder ---------------------------------------------------------------------------------
def _load_nvidia_folder(folder: str) -> DifixModel:
    from diffusers import AutoencoderKL

    unet = _pretrained(folder, "unet")
    vae_dir = os.path.join(folder, "vae")
    vae_cfg = _read_json_file(os.path.join(vae_dir, CONFIG_FILE))
    vae = AutoencoderKL.from_config({k: v for k, v in vae_cfg.items() if k not in ("gamma", "ignore_skip", "lora_rank")})
    config = _config_from(unet, vae)
    config.lora_rank = int(vae_cfg.get("lora_rank", config.lora_rank))
    config.skip_gamma = 0.0 if vae_cfg.get("ignore_skip") else float(vae_cfg.get("gamma", config.skip_gamma))
    prompt = encode_prompt(folder, config.prompt)
    config.prompt_tokens = prompt.shape[1]
    model = _difix(config, unet, vae, prompt, os.path.join(vae_dir, CONFIG_FILE))
    w_path = _weights_file(vae_dir)
    want = model.vae.state_dict()
    state = _normalize_vae_keys(_fold_encoder_lora(_read_safetensors(w_path), w_path), want)
    if not any("lora_" in k for k in state):  # a merged export: LoRA folded into the base weights, adapter stays 0
        state.update(_zero_delta_lora(want))
        log.info("%s carries no LoRA weights: treating it as merged", w_path)
    _check_keys(want, state, w_path)
    _check_shapes(want, state, w_path)
    model.vae.load_state_dict(state, strict=True)
    return model


def save_nvidia_folder(model: DifixModel, folder: str, text_folder: str | None = None) -> None:
    """Write ``model`` as a diffusers-format Difix folder (unet/, vae/ with gamma/ignore_skip/lora_rank), copying
    tokenizer/ and text_encoder/ from ``text_folder`` (for exchanging with diffusers-based code and for tests). The
    layout records the LoRA rank but not its targets, which its readers take to be the official ones: a model with
    other targets is refused rather than written as one that does not load back."""
    import shutil

    if tuple(model.config.lora_targets) != tuple(LORA_TARGETS):
        raise CheckpointError(folder, f"an nvidia/difix folder cannot record the LoRA targets "
                                      f"{list(model.config.lora_targets)} (its readers assume {list(LORA_TARGETS)}): "
                                      "save in difix3d's format or as an official .pkl")

    from safetensors.torch import save_file

    model.unet.save_pretrained(os.path.join(folder, "unet"))
    vae_dir = os.path.join(folder, "vae")
    os.makedirs(vae_dir, exist_ok=True)
    cfg = {k: v for k, v in model.vae.config.items()}
    cfg.update(_class_name="AutoencoderKLDifix", gamma=model.config.skip_gamma, ignore_skip=False,
               lora_rank=model.config.lora_rank)
    with open(os.path.join(vae_dir, CONFIG_FILE), "w") as f:
        json.dump(cfg, f, indent=2, default=list)
    save_file(_strip(_export_state(model, lambda k: k.startswith("vae.")), "vae."),
              os.path.join(vae_dir, "diffusion_pytorch_model.safetensors"))
    if text_folder:
        for sub in ("tokenizer", "text_encoder"):
            shutil.copytree(os.path.join(text_folder, sub), os.path.join(folder, sub), dirs_exist_ok=True)


def _normalize_vae_keys(state: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a diffusers export's key names onto peft's (``x.weight`` -> ``x.base_layer.weight``,
    ``lora_A.weight`` -> ``lora_A.vae_skip.weight``); keys that match nothing are kept, so they get reported."""
    out = {}
    for k, v in state.items():
        cand = [k]
        for part in ("lora_A", "lora_B"):
            cand.append(k.replace(f".{part}.weight", f".{part}.{ADAPTER_NAME}.weight"))
        stem, _, leaf = k.rpartition(".")
        cand.append(f"{stem}.base_layer.{leaf}")
        out[next((c for c in cand if c in want), k)] = v
    return out


# --- helpers -------------------------------------------------------------------------------------------------------
def _export_state(model: DifixModel, keep) -> dict[str, torch.Tensor]:
    """The tensors of ``model.state_dict()`` whose keys ``keep`` selects, detached on the CPU, as every saver writes
    them. A LoRA layer merged for serving (:meth:`DifixModel.merge_lora`) holds its delta in its base weight: where
    that base weight is written too, its ``lora_B`` is written as zeros so loading does not add the delta twice;
    where it is not (the official .pkl takes the VAE's base weights from SD-Turbo), ``lora_B`` is written as it is
    and carries the delta."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if keep(k)}
    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer) and module.merged and f"{name}.base_layer.weight" in state:
            for adapter in module.merged_adapters:
                key = f"{name}.lora_B.{adapter}.weight"
                if key in state:
                    state[key] = torch.zeros_like(state[key])
    return state


def _strip(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of ``state`` under ``prefix``, keyed without it."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _difix(config: FixerConfig, unet, vae, prompt: torch.Tensor, source: str) -> DifixModel:
    """The :class:`DifixModel` of ``config`` on these networks; an adapter the checkpoint ``source`` shapes so that
    it fits no module of the VAE is a CheckpointError naming the file and the targets."""
    try:
        return DifixModel(config, unet, vae, prompt)
    except ValueError as e:  # peft: targets that match nothing, or modules it cannot wrap
        raise CheckpointError(source, f"its VAE LoRA targets {list(config.lora_targets)} (rank {config.lora_rank}) "
                                      f"do not fit the model's VAE: {e}") from e


def _zero_delta_lora(want: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LoRA tensors whose product is zero: ``lora_A`` as built, ``lora_B`` zeros."""
    return {k: torch.zeros_like(v) if "lora_B" in k else v for k, v in want.items() if "lora_" in k}


# a LoRA tensor of a VAE encoder layer: peft's key (lora_A.vae_skip.weight) or a diffusers export's (lora_A.weight)
_ENCODER_LORA = re.compile(r"^(?P<layer>(?:vae\.)?encoder\..+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


def _fold_encoder_lora(state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """``state`` (the model's, the VAE's or a .pkl's over SD-Turbo's) with any LoRA of the VAE encoder folded into its
    base weights, the keys of the layers it wrapped unwrapped (``x.base_layer.weight`` -> ``x.weight``).

    Checkpoints written before the adapter was restricted to the decoder carry one on the encoder: zero where the
    encoder was frozen (the weights stay exactly as they are), trained where the whole VAE was (``train_vae``, the
    bundled tiny fixer). Folding it, ``W + alpha / r * B A`` as peft merges, keeps their outputs. A LoRA tensor
    without its pair or its base weight is a CheckpointError naming them."""
    layers: dict[str, dict[str, str]] = {}
    out = {}
    for k, v in state.items():
        m = _ENCODER_LORA.match(k)
        if m:
            layers.setdefault(m["layer"], {})[m["ab"]] = k
        elif k.startswith(("encoder.", "vae.encoder.")):
            out[k.replace(".base_layer.", ".")] = v
        else:
            out[k] = v
    if not layers:
        return state
    incomplete = sorted(k for layer, ab in layers.items() for k in ab.values()
                        if len(ab) < 2 or f"{layer}.weight" not in out)
    if incomplete:
        raise CheckpointError(source, f"VAE encoder LoRA tensors without their pair or their layer's base weight: "
                                      f"{incomplete[:8]} ({len(incomplete)} in all)")
    nonzero = 0
    for layer, ab in layers.items():
        a, b, w = state[ab["A"]], state[ab["B"]], out[f"{layer}.weight"]
        if not b.any():
            continue
        try:
            delta = (b.flatten(1).float() @ a.flatten(1).float()).reshape(w.shape) * (LORA_ALPHA / a.shape[0])
        except RuntimeError as e:
            raise CheckpointError(source, f"{layer}: LoRA A {tuple(a.shape)} and B {tuple(b.shape)} do not fit its "
                                          f"weight {tuple(w.shape)}") from e
        out[f"{layer}.weight"] = (w.float() + delta).to(w.dtype)
        nonzero += 1
    log.debug("%s: the LoRA of %d VAE encoder layers (%d with a nonzero delta) folded into their weights: the adapter "
             "wraps the decoder only now", source, len(layers), nonzero)
    return out


def _check_keys(want: dict, got: dict, source: str) -> None:
    missing, unexpected = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''} ({len(missing)} in all)")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''} "
                         f"({len(unexpected)} in all)")
        raise CheckpointError(source, "; ".join(parts) + " — does it match the model's preset? Re-export it with "
                                                         "`difix3d convert`, or fetch the complete checkpoint")


def _check_shapes(want: dict, got: dict, source: str) -> None:
    bad = [f"{k}: {tuple(got[k].shape)} vs model {tuple(want[k].shape)}" for k in want
           if k in got and tuple(got[k].shape) != tuple(want[k].shape)]
    if bad:
        raise CheckpointError(source, f"shape mismatch in {len(bad)} tensors, e.g. {bad[:4]}")


def _read_safetensors(uri: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    try:
        return load(storage.read_bytes(uri))
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for one meaning: corrupt file
        raise CheckpointError(uri, f"not a readable safetensors file ({type(e).__name__}: {e})") from e


def _read_json_file(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return {}
    except json.JSONDecodeError as e:
        raise CheckpointError(path, f"not valid JSON: {e}") from e


def _holds_difix_keys(vae_folder: str) -> bool:
    """Whether the VAE folder's weights carry Difix's skip convs or decoder LoRA (read from the safetensors header)."""
    from safetensors import safe_open

    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors"):
        path = os.path.join(vae_folder, name)
        if os.path.exists(path):
            try:
                with safe_open(path, framework="pt") as f:
                    return any("skip_conv" in k or "lora_" in k for k in f.keys())
            except Exception:  # unreadable: the loader names the file
                return False
    return False


def _weights_file(folder: str) -> str:
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors"):
        if os.path.exists(os.path.join(folder, name)):
            return os.path.join(folder, name)
    raise MissingWeightsError(f"{folder}: no diffusion_pytorch_model.safetensors; fetch the complete nvidia/difix "
                              "folder (`huggingface-cli download nvidia/difix --local-dir DIR`)")


def _pretrained(folder: str, sub: str):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    cls = UNet2DConditionModel if sub == "unet" else AutoencoderKL
    errors = []
    for variant in (None, "fp16"):
        try:
            return cls.from_pretrained(folder, subfolder=sub, variant=variant, torch_dtype=torch.float32)
        except (OSError, EnvironmentError, ValueError) as e:
            errors.append(str(e).splitlines()[0])
    raise MissingWeightsError(f"{os.path.join(folder, sub)}: cannot load {cls.__name__} ({'; '.join(errors)}); "
                              "fetch the complete folder from the hub on a machine with internet")


def _config_from(unet, vae) -> FixerConfig:
    """A FixerConfig that rebuilds these diffusers models; preset named when the architecture is a known one."""
    unet_cfg = {k: v for k, v in unet.config.items() if not k.startswith("_")}
    vae_cfg = {k: v for k, v in vae.config.items() if not k.startswith("_")}
    preset = "custom"
    for name in ("sd-turbo", "tiny"):
        ref = preset_config(name)
        if all(_same(unet_cfg.get(k), v) for k, v in ref.unet.items()) and \
                all(_same(vae_cfg.get(k), v) for k, v in ref.vae.items()):
            preset = name
    return FixerConfig(preset=preset, unet=json.loads(json.dumps(unet_cfg, default=list)),
                       vae=json.loads(json.dumps(vae_cfg, default=list)))


def _same(a, b) -> bool:
    norm = lambda x: list(x) if isinstance(x, (list, tuple)) else x  # noqa: E731
    return norm(a) == norm(b)


def looks_like_hub_id(uri: str) -> bool:
    """``owner/name`` as Hugging Face spells repositories; ``ckpt/`` (a trailing slash) or ``runs/x`` where a local
    ``runs/`` exists are local paths, so a missing one is reported as missing rather than looked up in the hub."""
    owner, _, name = str(uri).partition("/")
    return ("://" not in uri and uri.count("/") == 1 and bool(owner) and bool(name)
            and not uri.startswith((".", "/", "~")) and not os.path.isdir(owner))


def _hub_cache_path(repo_id: str) -> str:
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(repo_id, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - not in the cache, whatever the exception type
        raise MissingWeightsError(f"{repo_id}: not a local path and not in the Hugging Face cache; fetch it with "
                                  f"`huggingface-cli download {repo_id}` on a machine with internet") from e
