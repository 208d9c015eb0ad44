"""Module names: their natural order and user regexes over them (shared by every stage)."""

from __future__ import annotations

import re
from collections.abc import Iterable

from .errors import BitallocError


def natural_key(name: str) -> list[str | int]:
    """Sort key that orders "layers.2" before "layers.10" (the order every source uses)."""
    return [int(part) if part.isdecimal() else part for part in re.split(r"(\d+)", name)]


def compile_patterns(kind: str, regexes: str | Iterable[str] | None) -> list[tuple[str, re.Pattern[str]]]:
    """(text, compiled) for each of ``regexes``; BitallocError naming a regex that does not compile."""
    if regexes is None:
        return []
    if isinstance(regexes, str):
        regexes = [regexes]
    compiled = []
    for regex in regexes:
        try:
            compiled.append((regex, re.compile(regex)))
        except (re.error, TypeError) as err:
            raise BitallocError(f"invalid {kind} regex {regex!r}: {err}") from None
    return compiled
