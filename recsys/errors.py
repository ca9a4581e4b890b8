"""The one user-facing error type.

Anything the user can fix (a config key, a path, a malformed row, an option) raises `RecsysError` with one line
naming what is wrong and where. The CLI prints that line and exits non-zero, with no traceback.
"""


class RecsysError(Exception):
    """A problem with the user's input: config, data, paths, options."""
