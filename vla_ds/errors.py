"""Exceptions that the CLI reports as one line (exit code 2) instead of a traceback."""


class UsageError(Exception):
    """Bad input from the user: the message names the file or flag and the fix."""
