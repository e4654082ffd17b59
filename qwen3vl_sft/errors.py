"""The error a user can fix: a problem with their data or flags, reported as one line (no traceback).

The scripts catch :class:`DataError` at their top level and exit with its message; the modules raise it
for anything the user's input decides (a malformed record, a missing file, a flag out of range).
"""


class DataError(ValueError):
    """A problem with the user's data or flags, reported as one line (no traceback)."""


class UsageError(DataError):
    """A flag whose value cannot work (its syntax, range, or a combination with another flag).

    A kind of :class:`DataError`, so the scripts' one handler reports both the same way."""
