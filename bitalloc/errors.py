"""The one exception type for bad input: the CLI prints its message on one line, exit 2."""


class BitallocError(ValueError):
    """Bad input a user can fix (missing file, corrupt checkpoint, infeasible budget, ...)."""


def check_path(value: object, what: str) -> None:
    """BitallocError unless ``value`` is a path (str or os.PathLike): the public functions'
    argument check, so that a wrong type is one clear line rather than a TypeError."""
    import os

    if isinstance(value, bool) or not isinstance(value, (str, os.PathLike)) or value == "":
        raise BitallocError(f"{what} must be a path (str or os.PathLike), got {value!r:.80}")
