"""Tiny stand-ins of real pretrained layouts, built offline: an SD-Turbo diffusers folder with a tiny CLIP text
encoder and tokenizer. For tests (ours and other features') that must exercise the loaders without the hub."""

from __future__ import annotations

import json
import os
import string

import torch

from difix3d.fixer.config import preset_config


def write_tiny_sd_turbo_folder(folder: str, seed: int = 0) -> str:
    """Write ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/`` of the ``tiny`` preset with random weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = preset_config("tiny")
    torch.manual_seed(seed)
    UNet2DConditionModel(**cfg.unet).save_pretrained(os.path.join(folder, "unet"))
    AutoencoderKL(**cfg.vae).save_pretrained(os.path.join(folder, "vae"))
    tokenizer = tiny_clip_tokenizer(os.path.join(folder, "_vocab"))
    tokenizer.save_pretrained(os.path.join(folder, "tokenizer"))
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=cfg.cross_attention_dim,
                                        intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    text.save_pretrained(os.path.join(folder, "text_encoder"))
    return folder


def tiny_clip_tokenizer(workdir: str):
    """A CLIPTokenizer over lowercase letters (character-level BPE with a few merges), max length 77 like CLIP's."""
    from transformers import CLIPTokenizer

    os.makedirs(workdir, exist_ok=True)
    tokens = ["<|startoftext|>", "<|endoftext|>"]
    tokens += list(string.ascii_lowercase) + [c + "</w>" for c in string.ascii_lowercase]
    merges = ["r e", "d e", "a t", "i o"]
    tokens += ["re", "de", "at", "io"]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    with open(os.path.join(workdir, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(workdir, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer(os.path.join(workdir, "vocab.json"), os.path.join(workdir, "merges.txt"),
                         model_max_length=77, pad_token="<|endoftext|>")
