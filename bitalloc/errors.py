"""The one exception type for bad input: the CLI prints its message on one line, exit 2."""


class BitallocError(ValueError):
    """Bad input a user can fix (missing file, corrupt checkpoint, infeasible budget, ...)."""
