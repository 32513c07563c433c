"""The exception the CLI turns into a clean message and exit code 2, and the warning it prints as one line."""

import difflib


class GraftError(Exception):
    """Bad input from the user: a config, a file, a plugin name. Printed as one paragraph, no traceback."""


class GraftWarning(UserWarning):
    """Something the user should know that does not stop the run (files skipped, a head replaced). The CLI prints
    it as one ``Warning: ...`` line, once, from the main process only."""


def did_you_mean(word, choices):
    """' Did you mean "x"?' when a close match exists, else an empty string."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f' Did you mean "{close[0]}"?' if close else ""


def warn(message: str) -> None:
    """Tell the user something that does not stop the run: one ``Warning: ...`` line from the CLI."""
    import warnings

    warnings.warn(message, GraftWarning, stacklevel=3)
