"""The exceptions a stage ends with on purpose: a user error (one line, exit 2) and a kill (exit 143)."""


class LmpipeError(Exception):
    """A problem the user can act on: bad input, a bad param, a missing file.

    The message names the file, row or key. Stages and the CLI print it on one line
    and exit with status 2; anything else is a bug and keeps its traceback.
    """


class Terminated(BaseException):
    """Raised in the main thread on SIGTERM so the run can be closed as KILLED.

    A BaseException, like KeyboardInterrupt: `except Exception` in library code must not swallow it.
    """
