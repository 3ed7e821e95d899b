"""The one exception type a user sees as a one-line message instead of a stack trace."""


class LmpipeError(Exception):
    """A problem the user can act on: bad input, a bad param, a missing file.

    The message names the file, row or key. Stages and the CLI print it on one line
    and exit with status 2; anything else is a bug and keeps its traceback.
    """
