"""Errors that name the input at fault, so a fleet job can record them per unit and go on."""

from __future__ import annotations


class Difix3DError(Exception):
    """Base class of every error difix3d raises on purpose."""


class InputError(Difix3DError, ValueError):
    """Bad input: names the file (or URI) and the problem, e.g. ``InputError("a/0.png", "not a PNG")``."""

    def __init__(self, source: str, problem: str):
        self.source = str(source)
        self.problem = problem
        super().__init__(f"{self.source}: {problem}")

    def __reduce__(self):  # rebuilt from (source, problem): the error survives pickling between Ray processes
        return type(self), (self.source, self.problem)


class CheckpointError(InputError):
    """A checkpoint that is missing, corrupt, or does not match the model it is loaded into."""


class MissingWeightsError(Difix3DError, FileNotFoundError):
    """Pretrained weights that are not on this machine; the message says what to fetch and where to put it."""


def exit_code_of_user_errors(prog: str, run, *args, **kwargs) -> int:
    """``run(*args, **kwargs)`` as a command's exit code: a project error (bad input, missing weights) or a missing
    file prints ``prog: error: <message>`` and returns 2 instead of a traceback; anything else propagates."""
    import sys

    try:
        return int(run(*args, **kwargs) or 0)
    except (Difix3DError, FileNotFoundError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
