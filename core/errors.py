"""The one exception type the CLI turns into a clean message and exit code 2."""

import difflib


class GraftError(Exception):
    """Bad input from the user: a config, a file, a plugin name. Printed as one paragraph, no traceback."""


def did_you_mean(word, choices):
    """' Did you mean "x"?' when a close match exists, else an empty string."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f' Did you mean "{close[0]}"?' if close else ""
