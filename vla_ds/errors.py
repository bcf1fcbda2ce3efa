"""The one exception the CLI reports as one line (exit code 2) instead of a traceback."""


class UsageError(ValueError):
    """Bad input from the user: the message names the file or flag and the fix.

    Library code raises it where it finds the bad input; only `vla_ds.cli` turns it into a line.
    A `ValueError`, so code that validates values (`except ValueError`) treats it as one.
    """
