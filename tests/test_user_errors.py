"""Commands turn project errors and a user's path errors into one line and exit code 2, never a traceback."""

import pytest

from difix3d.errors import InputError, exit_code_of_user_errors


@pytest.mark.parametrize("make_error,expected", [
    (lambda p: open(p / "a-file" / "sub", "w"), "a-file/sub: not a directory (a file is in the way"),
    (lambda p: (p / "a-file").mkdir(), "a-file: file exists (a file is in the way"),
    (lambda p: open(p, "w"), ": is a directory (a folder, where a file is to be written)"),
    (lambda p: open(p / "missing" / "x"), "missing/x: no such file or directory"),
    (lambda p: (_ for _ in ()).throw(InputError("shard.parquet", "0 rows")), "shard.parquet: 0 rows"),
])
def test_path_and_input_errors_are_one_line(tmp_path, capsys, make_error, expected):
    (tmp_path / "a-file").write_text("x")
    assert exit_code_of_user_errors("difix3d x", make_error, tmp_path) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("difix3d x: error: ") and expected in err and "\n" not in err


def test_other_errors_still_raise():
    with pytest.raises(ZeroDivisionError):
        exit_code_of_user_errors("difix3d x", lambda: 1 / 0)
