"""The ``difix3d`` command. Each feature registers its subcommands from its own ``cli`` module, imported lazily
so that ``difix3d fix`` never pays for importing Ray Train or gsplat."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# subcommand -> module that defines ``add_parser(subparsers)`` registering it (with ``func=`` set as default)
_COMMANDS = {
    "fix": "difix3d.fixer.cli",
    "convert": "difix3d.fixer.cli",
    "synth": "difix3d.scene.cli",
    "pairs": "difix3d.curate.cli",
    "evaluate": "difix3d.eval.cli",
    "finetune": "difix3d.train.cli",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="difix3d", description="Difix3D+: fix 3D reconstructions with Difix.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in dict.fromkeys(_COMMANDS.values()):
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:  # a feature whose module is not present in this build
            if e.name and e.name.startswith("difix3d"):
                continue
            raise
        mod.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from difix3d.errors import exit_code_of_user_errors

    return exit_code_of_user_errors(f"difix3d {args.command}", args.func, args)


if __name__ == "__main__":
    sys.exit(main())
