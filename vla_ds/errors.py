"""The one exception the CLI reports as one line (exit code 2) instead of a traceback, and the
near-miss lookup its messages use for "did you mean" hints."""


class UsageError(ValueError):
    """Bad input from the user: the message names the file or flag and the fix.

    Library code raises it where it finds the bad input; only `vla_ds.cli` turns it into a line.
    A `ValueError`, so code that validates values (`except ValueError`) treats it as one.
    """


def near_miss(word: str, choices: list[str], cutoff: float = 0.75) -> str | None:
    """The choice `word` most likely misspells (difflib's ratio >= cutoff), for a "did you mean" hint."""
    import difflib

    near = difflib.get_close_matches(word, choices, n=1, cutoff=cutoff)
    return near[0] if near else None
