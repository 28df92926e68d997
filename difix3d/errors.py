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


# what a user's paths cause: a missing input, an output path that is a file (or a folder where a file goes), a
# folder the user may not write
USER_PATH_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)


def user_error_message(e: BaseException) -> str:
    """One line for a project error or a path error: ``<path>: <problem>`` where the OS error names its path."""
    if isinstance(e, OSError) and not isinstance(e, Difix3DError) and e.filename and e.strerror:
        hint = {FileExistsError: " (a file is in the way of a folder this command writes)",
                NotADirectoryError: " (a file is in the way of a folder this command writes)",
                IsADirectoryError: " (a folder, where a file is to be written)",
                PermissionError: " (choose a path this user may write)"}.get(type(e), "")
        return f"{e.filename}: {e.strerror.lower()}{hint}"
    return str(e)


def exit_code_of_user_errors(prog: str, run, *args, **kwargs) -> int:
    """``run(*args, **kwargs)`` as a command's exit code: a project error (bad input, missing weights) or a path error
    (missing input, an output path that is a file, a folder not writable) prints ``prog: error: <message>`` and
    returns 2 instead of a traceback; anything else propagates."""
    import sys

    try:
        return int(run(*args, **kwargs) or 0)
    except (Difix3DError,) + USER_PATH_ERRORS as e:
        print(f"{prog}: error: {user_error_message(e)}", file=sys.stderr)
        return 2
