"""The one user-facing error type.

Anything the user can fix (a config key, a path, a malformed row, an option) raises `RecsysError` with one line
naming what is wrong and where. The CLI prints that line and exits non-zero, with no traceback.
"""


class RecsysError(Exception):
    """A problem with the user's input: config, data, paths, options."""


def read_utf8(path) -> str:
    """A text file's contents (a leading BOM dropped); a byte that is not UTF-8 is a RecsysError at file:line."""
    from pathlib import Path

    raw = Path(path).read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise RecsysError(f"{path}:{line}: not UTF-8 text") from None
