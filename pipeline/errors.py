"""Errors that the command line reports as one line, without a traceback."""


class UserFacingError(RuntimeError):
    """An error whose message says everything the user needs: what failed, where, and why."""
