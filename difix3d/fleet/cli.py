"""Command line of the fleet job, built from :class:`FleetConfig` (one flag per field, its docstring as help)."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import sys
import textwrap
import typing

from difix3d.fixer.config import COMPILE_MODES

from .config import FleetConfig

_CHOICES = {"fixer_mode": ("pool", "local"), "device": ("auto", "cuda", "cpu"), "recon_preset": ("tiny", "paper"),
            "representation": ("3dgs", "nerfacto"),
            "pool_compile_mode": COMPILE_MODES}


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(
        prog="reconstruct_fleet.py",
        description="Progressive Difix3D+ reconstruction of many scenes on a Ray cluster sharing one fixing pool. "
                    "With no arguments: a few tiny synthetic driving segments on CPU, in a few minutes.")
    docs = field_docs(FleetConfig)
    hints = typing.get_type_hints(FleetConfig)
    for f in dataclasses.fields(FleetConfig):
        flag = "--" + f.name.replace("_", "-")
        flags = (flag, "-o") if f.name == "output" else (flag,)  # as difix3d fix
        help_ = docs.get(f.name, "")
        if f.name == "extra":
            parser.add_argument("--set", dest="extra", action="append", default=[], metavar="FIELD=VALUE",
                                help="override a ProgressiveConfig field (value parsed as JSON), repeatable")
            continue
        hint = hints[f.name]
        if hint is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=f.default,
                                help=help_)
            continue
        typ = next((t for t in typing.get_args(hint) if t is not type(None)), hint) or str
        parser.add_argument(*flags, dest=f.name, type=typ, default=f.default, choices=_CHOICES.get(f.name),
                            help=f"{help_} (default: {f.default})".strip())
    return parser


def config_from_args(args: argparse.Namespace) -> FleetConfig:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(FleetConfig) if f.name != "extra"}
    values["extra"] = dict(_parse_override(s) for s in (args.extra or []))
    return FleetConfig(**values)


def main(argv: list[str] | None = None) -> int:
    """Parse, check, run (``run_fleet`` joins the cluster under ``ray job submit`` or starts an embedded one once the
    inputs are checked), report."""
    from difix3d.errors import USER_PATH_ERRORS, Difix3DError, user_error_message

    from .driver import run_fleet
    from .scene_task import check_scene_settings

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
    except ValueError as e:
        parser.error(str(e))  # usage and exit 2
    try:
        config.validate()
        check_scene_settings(config)
    except ValueError as e:
        print(f"reconstruct_fleet: error: {e}", file=sys.stderr)
        return 2
    try:
        report = run_fleet(config)
    except (Difix3DError,) + USER_PATH_ERRORS as e:
        print(f"reconstruct_fleet: error: {user_error_message(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # the driver said how to resume; no traceback
        return 130
    return 1 if report.counts.get("failed") and not report.counts.get("done") else 0


def field_docs(cls: type) -> dict[str, str]:
    """The string literal under each dataclass field (attribute docstrings), for --help."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr) \
                and isinstance(getattr(nxt, "value", None), ast.Constant) and isinstance(nxt.value.value, str):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _parse_override(item: str) -> tuple[str, typing.Any]:
    if "=" not in item:
        raise ValueError(f"--set expects FIELD=VALUE, got {item!r}")
    key, raw = item.split("=", 1)
    try:
        return key.strip(), json.loads(raw)
    except json.JSONDecodeError:
        return key.strip(), raw
