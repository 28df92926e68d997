"""argparse types shared by the command lines: a bad value is a usage error (one line, exit 2), not a traceback."""

from __future__ import annotations

import argparse
import math
import re


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def number_list(text: str) -> tuple[float, ...]:
    """``"1,2,3"`` -> (1.0, 2.0, 3.0); ``""`` -> (). Finite numbers only."""
    try:
        values = tuple(float(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected finite numbers, got {text!r}")
    return values


def tells_default(help_text: str | None) -> bool:
    """Whether a help text already gives its default ("default: ...", "(default ...)")."""
    return bool(help_text) and re.search(r"\(default\b|\bdefault\s*[:=]", help_text, re.I) is not None


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Help that ends each option with its default, as ``ArgumentDefaultsHelpFormatter`` does, but only where there is
    one to tell: not for ``None``/``False`` defaults, nor where the help already speaks of its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (not action.option_strings or default is None or default is False or default == ""
                or default == argparse.SUPPRESS
                or tells_default(text) or isinstance(action, (argparse._HelpAction, argparse._VersionAction))):
            return text
        sep = " " if action.nargs not in (None, "?") else ","  # as the values are typed: 'LO HI' for nargs=2
        shown = (sep.join(str(v) for v in default).replace("%", "%%") if isinstance(default, (list, tuple))
                 else "%(default)s")
        return f"{text} (default: {shown})".strip()

    def _format_action(self, action: argparse.Action) -> str:
        if not action.help and action.option_strings:  # argparse prints no help line for these: give the default one
            action.help = self._get_help_string(action) or action.help
        return super()._format_action(action)
