"""Command line of fine-tuning, built from :class:`FinetuneConfig` (one flag per field, defaults from the config).

Used by ``jobs/finetune.py`` and, once registered in ``difix3d.cli``, by ``difix3d finetune``.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import textwrap

from difix3d.argtypes import HelpFormatter, tells_default
from difix3d.errors import InputError
from difix3d.train.config import FinetuneConfig, LossWeights

_HELP = {
    "train_shards": "pair shards: folder, glob or file URI",
    "init": "tiny | sd-turbo preset (random weights: add --train-vae), bundled (the small demo fixer), or a checkpoint "
            "URI (ours, official .pkl, nvidia/difix folder, SD-Turbo folder)",
    "base": "SD-Turbo folder an official .pkl --init needs for its VAE base (default: $DIFIX3D_SD_TURBO)",
    "storage_path": "run storage URI; the same --name and --storage-path resume a run",
    "optimizer": "adamw (fp32 state; fused on CUDA) | adamw8bit (torchao 8-bit state: fits sd-turbo in less memory)",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="JSON file of FinetuneConfig fields (flags override it)")
    notes = field_comments(FinetuneConfig)
    for f in dataclasses.fields(FinetuneConfig):
        if f.name in ("loss", "perceptual_weights", "betas", "fail_once_at_step"):
            continue
        _add_field(parser, f.name, f.type, _with_default(_HELP.get(f.name) or notes.get(f.name), f))
    notes = field_comments(LossWeights)
    for f in dataclasses.fields(LossWeights):
        if f.name != "gram_layers":  # a mapping: --config JSON only
            _add_field(parser, f"loss.{f.name}", f.type, _with_default(notes.get(f.name, "loss weight"), f))
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--allow-random-perceptual", action="store_true",
                       help="train LPIPS/Gram with a random VGG16 stand-in (smoke tests only; results not comparable)")
    group.add_argument("--vgg-weights", metavar="PATH", help="local torchvision vgg16 state dict for LPIPS/Gram")


def config_from_args(args: argparse.Namespace) -> FinetuneConfig:
    d = read_config_file(args.config) if args.config else {}
    loss = d.pop("loss", {})
    loss = dict(loss) if isinstance(loss, dict) else loss
    for f in dataclasses.fields(FinetuneConfig):
        value = getattr(args, f.name, None)
        if value is not None:
            d[f.name] = value
    for f in dataclasses.fields(LossWeights):
        value = getattr(args, f"loss.{f.name}", None)
        if value is not None:
            loss[f.name] = value
    d["loss"] = loss
    if args.allow_random_perceptual:
        d["perceptual_weights"] = "random"
    elif args.vgg_weights:
        d["perceptual_weights"] = args.vgg_weights
    return FinetuneConfig.from_dict(d)


def read_config_file(path: str) -> dict:
    """The JSON object of a ``--config`` file; an :class:`InputError` naming it when it is not one."""
    try:
        with open(path) as f:
            d = json.load(f)
    except ValueError as e:
        raise InputError(path, f"not valid JSON ({e})") from e
    if not isinstance(d, dict):
        raise InputError(path, f"expected a JSON object of FinetuneConfig fields, got {type(d).__name__}")
    return d


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("finetune", help="fine-tune Difix on pair shards with Ray Train (DDP)",
                              formatter_class=HelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import ray

    from difix3d.train.trainer import finetune

    try:
        config = config_from_args(args)
    except InputError:
        raise
    except (ValueError, TypeError) as e:  # unknown fields, bad values: before Ray starts
        where = f"finetune settings (--config {args.config} and the options)" if args.config else "finetune arguments"
        raise InputError(where, str(e)) from e
    from difix3d.train.trainer import check_init, check_shards

    check_shards(config)  # a mistyped path, a shard that is not one, or a bad init fails at once, before Ray starts
    check_init(config)
    ray.init()  # joins the cluster under `ray job submit`, else starts a local one
    result = finetune(config, _shards_checked=True)
    print(json.dumps({"final": result.final_uri, "checkpoint": result.checkpoint_path, "metrics": result.metrics},
                     default=str))
    return 0


def field_comments(cls: type) -> dict[str, str]:
    """The comment of each dataclass field, trailing on its line or in the lines just above it, for --help (the
    configs document their fields in comments)."""
    lines = textwrap.dedent(inspect.getsource(cls)).splitlines()
    notes = {}
    for node in ast.parse("\n".join(lines)).body[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        text = []
        row = node.lineno - 2  # the lines above, while they are comments
        while row >= 0 and lines[row].strip().startswith("#"):
            text.insert(0, lines[row].strip().lstrip("#").strip())
            row -= 1
        if len(text) == 1 and (row < 0 or not lines[row].strip()):
            text = []  # a one-line comment after a blank line heads a group of fields ("# scale"), not this one
        end = node.end_lineno - 1  # the trailing comment, and its continuation lines
        code = lines[end]
        if "  # " in code:
            text.append(code.split("  # ", 1)[1].strip())
            while end + 1 < len(lines) and lines[end + 1].strip().startswith("#") and \
                    lines[end + 1].index("#") > len(code.split("  # ", 1)[0]):
                end += 1
                text.append(lines[end].strip().lstrip("#").strip())
        if text:
            notes[node.target.id] = " ".join(text)
    return notes


def _with_default(help_: str | None, f: dataclasses.Field) -> str | None:
    """``help_ (default: X)`` from the dataclass default (the flag's own default is None, so --config can set it)."""
    default = f.default if f.default is not dataclasses.MISSING else None
    if default is None or default == "" or tells_default(help_):
        return help_
    return f"{help_ or ''} (default: {default})".strip().replace("%", "%%")


def _add_field(parser: argparse.ArgumentParser, name: str, type_: object, help_: str | None) -> None:
    flag = "--" + name.replace("_", "-")
    t = str(type_)
    if t == "bool":
        parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_)
        return
    conv = {"int": int, "float": float}.get(t, str)
    parser.add_argument(flag, dest=name, type=conv, default=None, help=help_)
